"""Official-format checkpoints: load (sharded `.bin` or safetensors, optional peft LoRA) and save.

The released layout (HF `OpenGVLab/VisionLLMv2`): `config.json`, `pytorch_model-0000K-of-0000N.bin` with
`pytorch_model.bin.index.json`, tokenizer files. Loading never unpickles arbitrary objects
(`torch.load(weights_only=True)`), merges peft-0.6.2 LoRA adapters into plain `llm.model.*` weights
(`W + alpha/r * B @ A`, r 32, alpha 64 as the official `wrap_llm_lora` fixes them), accepts the aliased keys
of shared heads, and reports every problem with the file, the key and both shapes.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path

import torch
from visionllm_edge.export.config import EXTENSION_KEY, ConfigError, ModelConfig, named_config, tokenizer_dir
from visionllm_edge.export.model import VisionLLMv2, build_model

#: The official `wrap_llm_lora` adapter scale: lora_alpha / r = 64 / 32.
LORA_SCALING = 2.0
TOKENIZER_FILES = ("tokenizer.model", "tokenizer_config.json", "added_tokens.json", "special_tokens_map.json")
INDEX_NAME = "pytorch_model.bin.index.json"
SAFE_INDEX_NAME = "model.safetensors.index.json"


class CheckpointError(ValueError):
    """A checkpoint that cannot be loaded as it is; the message names the file and the key."""


# --- reading tensors -------------------------------------------------------------------------------------


def _check_shard_contents(path: Path, tensors) -> None:
    """A shard must be a dict of string keys to tensors; anything else is named with its file and key."""
    if not isinstance(tensors, dict):
        raise CheckpointError(f"{path}: expected a dict of tensors, got {type(tensors).__name__}")
    for key, value in tensors.items():
        if not isinstance(key, str):
            raise CheckpointError(f"{path}: key {key!r} is a {type(key).__name__}, not a string")
        if not isinstance(value, torch.Tensor):
            raise CheckpointError(f"{path}: key '{key}' holds a {type(value).__name__}, not a tensor")


def _read_shard(path: Path) -> dict[str, torch.Tensor]:
    if not path.is_file():
        raise CheckpointError(f"{path}: shard file is missing")
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            tensors = load_file(str(path))
        else:
            tensors = torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception as e:  # truncated zip, bad pickle opcode, a forbidden global, ...
        raise CheckpointError(f"{path}: cannot read checkpoint shard ({type(e).__name__}: {e})") from None
    _check_shard_contents(path, tensors)
    return tensors


def _read_index(index: Path) -> dict[str, str]:
    try:
        weight_map = json.loads(index.read_text())["weight_map"]
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, KeyError, TypeError) as e:
        raise CheckpointError(f"{index}: not a valid shard index ({type(e).__name__}: {e})") from None

    def is_file_name(v: object) -> bool:
        return isinstance(v, str) and v not in ("", ".", "..") and "/" not in v and "\\" not in v

    if not isinstance(weight_map, dict) or not all(
        isinstance(k, str) and is_file_name(v) for k, v in weight_map.items()
    ):
        raise CheckpointError(f"{index}: 'weight_map' must map each key to a shard file name in the folder")
    return dict(weight_map)


def read_checkpoint_tensors(directory: Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """All tensors of a checkpoint folder and, per key, the file it came from.

    With an index, the index and the shards must agree exactly: every listed key is in the shard the index
    names, and no shard holds a key the index does not list there. A key in two shards is an error.
    """
    files: list[Path]
    index_keys: dict[str, str] | None = None
    index_path: Path | None = None
    for index_name in (SAFE_INDEX_NAME, INDEX_NAME):
        index = directory / index_name
        if index.is_file():
            index_path = index
            index_keys = _read_index(index)
            files = [directory / name for name in sorted(set(index_keys.values()))]
            break
    else:
        singles = [directory / n for n in ("model.safetensors", "pytorch_model.bin")]
        singles = [path for path in singles if path.is_file()]
        if not singles:
            raise CheckpointError(
                f"{directory}: no weights found (expected {INDEX_NAME}, {SAFE_INDEX_NAME}, model.safetensors "
                "or pytorch_model.bin)"
            )
        files = singles[:1]
    absent = [path.name for path in files if not path.is_file()]
    if absent:
        raise CheckpointError(
            f"{directory / absent[0]}: shard file is missing ({len(absent)} of {len(files)} shard(s) listed "
            f"in {index_path.name if index_path else 'the folder'} are absent: {absent[:5]})"
        )
    tensors: dict[str, torch.Tensor] = {}
    origin: dict[str, str] = {}
    for path in files:
        for key, value in _read_shard(path).items():
            if key in origin:
                raise CheckpointError(f"{path}: key '{key}' is also in {origin[key]}")
            if index_keys is not None and index_keys.get(key) != path.name:
                where = f"lists it in {index_keys[key]}" if key in index_keys else "does not list it"
                raise CheckpointError(f"{path}: holds key '{key}' but {index_path.name} {where}")
            tensors[key] = value
            origin[key] = path.name
    if index_keys is not None:
        for key, name in index_keys.items():
            if key not in tensors:
                raise CheckpointError(
                    f"{directory / name}: key '{key}' is listed in {index_path.name} but not in the shard"
                )
    return tensors, origin


def _same_tensor_key(t: torch.Tensor) -> object:
    """Equal for two names of one tensor: the object on meta (no storage), the memory it views otherwise."""
    if t.device.type == "meta" or t.numel() == 0:
        return id(t)
    return (t.device, t.data_ptr(), t.dtype, tuple(t.shape), t.stride())


# --- key mapping -------------------------------------------------------------------------------------------

_PEFT_PREFIX = "llm.base_model.model."
_LORA = re.compile(r"^(?P<module>.+)\.lora_(?P<ab>[AB])\.(?P<adapter>[^.]+)\.weight$")


def merge_lora(
    tensors: dict[str, torch.Tensor], origin: dict[str, str], scaling: float = LORA_SCALING
) -> dict[str, torch.Tensor]:
    """Maps peft-wrapped LLM keys to plain ones and merges each adapter: `W' = W + scaling * B @ A`.

    Accepts peft 0.6.2 names (`….q_proj.weight` beside `….q_proj.lora_A.default.weight`) and peft ≥ 0.7
    names (`….q_proj.base_layer.weight`). Two keys that map to one plain name, an A without its B (or the
    reverse), an adapter without a base weight and shapes that do not fit are errors naming file and key.
    On the meta device only shapes flow (key-set checks of the 7B).
    """
    out: dict[str, torch.Tensor] = {}
    source_of: dict[str, str] = {}
    adapters: dict[str, dict[str, tuple[str, torch.Tensor]]] = {}
    adapter_name: dict[str, tuple[str, str]] = {}
    for key, value in tensors.items():
        plain = "llm." + key[len(_PEFT_PREFIX) :] if key.startswith(_PEFT_PREFIX) else key
        m = _LORA.match(plain)
        if m:
            module = m["module"]
            first = adapter_name.setdefault(module, (m["adapter"], key))
            if first[0] != m["adapter"]:
                raise CheckpointError(
                    f"{origin.get(key, '?')}: '{key}' is a second LoRA adapter ('{m['adapter']}') on "
                    f"'{module}' beside '{first[0]}' ({first[1]}); only one adapter can be merged"
                )
            adapters.setdefault(module, {})[m["ab"]] = (key, value)
            continue
        plain = plain.replace(".base_layer.weight", ".weight").replace(".base_layer.bias", ".bias")
        if plain in out:
            raise CheckpointError(
                f"{origin.get(key, '?')}: keys '{source_of[plain]}' (in {origin.get(source_of[plain], '?')}) "
                f"and '{key}' both map to '{plain}'"
            )
        out[plain] = value
        source_of[plain] = key
        if plain != key:
            origin[plain] = origin.get(key, "?")
    for module, pair in adapters.items():
        if set(pair) != {"A", "B"}:
            have = next(iter(pair.values()))[0]
            lacking = "B" if "A" in pair else "A"
            raise CheckpointError(
                f"{origin.get(have, '?')}: LoRA key '{have}' has no matching lora_{lacking}"
            )
        (key_a, a), (key_b, b) = pair["A"], pair["B"]
        wkey = module + ".weight"
        if wkey not in out:
            raise CheckpointError(
                f"{origin.get(key_a, '?')}: LoRA adapter '{key_a}' has no base weight '{wkey}'"
            )
        w = out[wkey]
        fits = a.dim() == b.dim() == w.dim() == 2
        if not fits or a.shape[1] != w.shape[1] or b.shape[0] != w.shape[0] or a.shape[0] != b.shape[1]:
            raise CheckpointError(
                f"{origin.get(key_a, '?')}: LoRA shapes do not fit '{wkey}' {tuple(w.shape)}: "
                f"A '{key_a}' {tuple(a.shape)}, B '{key_b}' {tuple(b.shape)}"
            )
        merged = w.float() + scaling * (b.float() @ a.float())
        out[wkey] = merged.to(w.dtype)
    return out


def _uncovered(own: dict[str, torch.Tensor], present) -> list[str]:
    """Model keys with no value among `present`: neither the key nor another name of its tensor (an alias)."""
    covered = {_same_tensor_key(p) for k, p in own.items() if k in present}
    return [k for k, p in own.items() if k not in present and _same_tensor_key(p) not in covered]


def load_state_into(
    model: VisionLLMv2,
    tensors: dict[str, torch.Tensor],
    origin: dict[str, str],
    source: str,
    release: Callable[[torch.Tensor], None] | None = None,
) -> None:
    """Copies `tensors` into `model` with strict checks; errors name the file, the key and both shapes.

    Aliased keys (one tensor under several names, the shared heads) must all hold the same values; an alias
    may be absent (safetensors saving drops them) as long as one key of its group is present. Meta tensors
    (model or checkpoint) carry no values: only names and shapes are checked. `release`, when given, is
    called with each checkpoint tensor once its values are read (partial loading hands back the pages of a
    memory-mapped shard there, see `_MappedShards`).
    """
    own = model.state_dict(keep_vars=True)
    ident = _same_tensor_key
    missing = _uncovered(own, tensors)
    unexpected = [k for k in tensors if k not in own]
    if missing or unexpected:
        parts = []
        if missing:
            parts.append(f"{len(missing)} key(s) missing from the checkpoint, e.g. {missing[:5]}")
        if unexpected:
            parts.append(
                f"{len(unexpected)} unexpected key(s), e.g. "
                + ", ".join(f"'{k}' (in {origin.get(k, '?')})" for k in unexpected[:5])
            )
        raise CheckpointError(f"{source}: " + "; ".join(parts))
    first_of: dict[object, str] = {}
    for key, param in own.items():
        if key not in tensors:
            continue  # an absent alias: its group is loaded through another key
        value = tensors[key]
        where = origin.get(key, source)
        if tuple(value.shape) != tuple(param.shape):
            raise CheckpointError(
                f"{where}: key '{key}' has shape {tuple(value.shape)}, the model expects {tuple(param.shape)}"
            )
        if value.is_floating_point() != param.is_floating_point() or value.is_complex() != param.is_complex():
            raise CheckpointError(f"{where}: key '{key}' has dtype {value.dtype}, expected {param.dtype}")
        ptr = ident(param)
        if ptr in first_of:
            other = first_of[ptr]
            ref = tensors[other]
            if (
                param.numel() > 0
                and value is not ref
                and "meta" not in (value.device.type, ref.device.type)
                and not torch.equal(ref.to(value.dtype), value)
            ):
                raise CheckpointError(
                    f"{where}: aliased keys '{other}' (in {origin.get(other, source)}) and '{key}' share one "
                    "tensor but hold different values"
                )
            if release is not None:
                release(value)
            continue
        first_of[ptr] = key
        if param.device.type == "meta":
            continue  # nothing to copy into
        with torch.no_grad():
            param.data.copy_(value.to(param.dtype))
        if release is not None:
            release(value)


# --- public API --------------------------------------------------------------------------------------------


#: Named configurations `load_reference` builds with seeded random weights (the 7B needs its checkpoint).
BUILDABLE_CONFIGS = ("tiny-random", "visionllmv2-7b-2layer")
#: The trained model shipped inside the package (`export/data/shapes_tiny`).
BUNDLED_MODEL = "shapes-tiny"


def load_reference(
    path_or_name: str | Path, dtype: torch.dtype = torch.float32, seed: int = 0
) -> VisionLLMv2:
    """Loads the PyTorch reference model.

    Args:
        path_or_name: a checkpoint folder in the official layout, or a configuration name (`tiny-random`:
            seeded random weights; `visionllmv2-7b` is a checkpoint folder's job: 28 GB of random weights
            help nobody).
        dtype: floating dtype of every parameter (float32 for parity).
        seed: seed of the random weights of a named configuration.

    Returns:
        The model in eval mode, with `model.tokenizer_dir` pointing at its tokenizer files.
    """
    if isinstance(path_or_name, str) and not Path(path_or_name).exists():
        if path_or_name == BUNDLED_MODEL:
            from visionllm_edge.export.train.ship import require_bundled

            return load_reference(require_bundled(), dtype=dtype)
        if path_or_name in BUILDABLE_CONFIGS:
            model = build_model(named_config(path_or_name), seed=seed)
            _randomise(model, seed)
            model.tokenizer_dir = tokenizer_dir(model.config)
            return model.to(dtype).eval().requires_grad_(False)
        raise CheckpointError(
            f"{path_or_name!r} is neither a checkpoint folder nor a configuration that can be built alone "
            f"(known: {', '.join(BUILDABLE_CONFIGS)})"
        )
    directory = Path(path_or_name)
    if not directory.is_dir():
        raise CheckpointError(f"{directory}: not a directory")
    config = ModelConfig.from_file(directory / "config.json")
    _attach_diffusion_components(config, directory)
    # Files first: a broken shard or a bad LoRA pair is reported before any time goes into building.
    tensors, origin = read_checkpoint_tensors(directory)
    tensors = merge_lora(tensors, origin)
    model = build_model(config)
    load_state_into(model, tensors, origin, str(directory))
    model.tokenizer_dir = directory
    return model.to(dtype).eval().requires_grad_(False)


def _attach_diffusion_components(config: ModelConfig, directory: Path) -> None:
    """Finds the SD / IP2P component architectures the official `sd_model_id` folder describes.

    The official code reads them from a local folder relative to its working directory; we look beside the
    checkpoint (and its parent) and fall back to the public SD-1.5 / IP2P configs that ship with the package.
    """
    found = dict(config.extension.get("diffusion_components") or {})
    for kind, attr in (("gen", "sd"), ("edit", "ip2p")):
        if kind in found or not config.uses(attr):
            continue
        model_id = config.official[f"{attr}_config"].get("sd_model_id")
        if not model_id:
            continue
        for base in (directory, directory.parent, Path.cwd()):
            folder = (base / model_id).resolve()
            if (folder / "unet" / "config.json").is_file():
                parts = {}
                for part in ("unet", "vae", "text_encoder"):
                    try:
                        parts[part] = json.loads((folder / part / "config.json").read_text())
                    except (OSError, json.JSONDecodeError) as e:
                        raise ConfigError(f"{folder / part / 'config.json'}: cannot read ({e})") from None
                found[kind] = parts
                break
    if found:
        config.extension["diffusion_components"] = found


def _randomise(model: VisionLLMv2, seed: int) -> None:
    """Seeded noise on every parameter so that nothing stays at a trivial init (zero heads, unit norms).

    Same rule as the golden data's builder: >=2-D tensors N(0, 0.5/sqrt(fan_in)), 1-D weights N(0, 0.1),
    other 1-D tensors N(0, 0.05), added once per distinct tensor.
    """
    g = torch.Generator().manual_seed(seed + 1)
    seen = set()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if id(p) in seen:
                continue
            seen.add(id(p))
            if p.dim() >= 2:
                fan_in = p[0].numel()
                p.add_(torch.randn(p.shape, generator=g) * (0.5 / fan_in**0.5))
            elif name.endswith("weight"):
                p.add_(torch.randn(p.shape, generator=g) * 0.1)
            else:
                p.add_(torch.randn(p.shape, generator=g) * 0.05)


def _plan_shards(
    state: dict[str, torch.Tensor], max_shard_bytes: int, dtype: torch.dtype | None = None
) -> tuple[list[list[str]], int]:
    """Which keys go into which shard, in key order, and the bytes of the distinct tensors.

    Bytes are counted in each tensor's own dtype, or, with `dtype`, floating tensors in that one (the dtype
    they will be written in).

    A new shard starts when the next distinct tensor would take the current one over `max_shard_bytes`.
    Alias keys are kept, as transformers 4.34 `.bin` saving does: in the shard of the first key of their
    tensor, counted once in the total. On meta (no storage) an alias must be the same object as its first
    key, as in `state_dict(keep_vars=True)`.
    """
    shards: list[list[str]] = [[]]
    size = 0
    total = 0
    shard_of: dict[object, int] = {}  # a tensor -> its shard (aliases follow their first key)
    for key, value in state.items():
        ident = _same_tensor_key(value)
        if ident in shard_of:
            shards[shard_of[ident]].append(key)
            continue
        itemsize = value.element_size()
        if dtype is not None and value.is_floating_point():
            itemsize = torch.empty(0, dtype=dtype).element_size()
        nbytes = value.numel() * itemsize
        if shards[-1] and size + nbytes > max_shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append(key)
        shard_of[ident] = len(shards) - 1
        size += nbytes
        total += nbytes
    return shards, total


def _write_official(
    directory: Path,
    config: ModelConfig,
    tokenizer_dir: Path | None,
    plan: list[list[str]],
    total: int,
    shard_tensors: Callable[[list[str]], dict[str, torch.Tensor]],
) -> Path:
    """Writes an official-layout folder: each shard of `plan` from `shard_tensors(keys)` in turn (only one
    shard's tensors alive at a time), the index, `config.json` and the tokenizer files.

    Written to a temporary folder beside the target and renamed when complete, so an interrupted save
    leaves nothing that looks like a checkpoint.
    """
    if directory.exists():
        raise FileExistsError(f"{directory}: already exists; choose a new folder")
    directory.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{directory.name}.", dir=directory.parent))
    try:
        n = len(plan)
        weight_map = {}
        for i, keys in enumerate(plan, start=1):
            name = f"pytorch_model-{i:05d}-of-{n:05d}.bin"
            torch.save(shard_tensors(keys), tmp / name)
            for key in keys:
                weight_map[key] = name
        index = {"metadata": {"total_size": total}, "weight_map": weight_map}
        (tmp / INDEX_NAME).write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")
        raw = config.to_dict()
        # As `save_pretrained` writes them (a null left in memory would otherwise reach the file).
        raw["architectures"] = raw.get("architectures") or ["VisionLLMv2Model"]
        raw["model_type"] = raw.get("model_type") or "visionllmv2"
        if EXTENSION_KEY in raw and not raw[EXTENSION_KEY]:
            del raw[EXTENSION_KEY]
        (tmp / "config.json").write_text(json.dumps(raw, indent=2, sort_keys=True) + "\n")
        if tokenizer_dir is not None:
            for name in TOKENIZER_FILES:
                if (Path(tokenizer_dir) / name).is_file():
                    shutil.copyfile(Path(tokenizer_dir) / name, tmp / name)
        os.replace(tmp, directory)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return directory


def save_official(model: VisionLLMv2, directory: str | Path, max_shard_bytes: int = 2 << 30) -> Path:
    """Writes `model` in the official layout (config, sharded `.bin` + index, tokenizer files).

    Written to a temporary folder beside the target and renamed when complete (see `_write_official`); alias
    keys are kept in the shard of the first key of their tensor (see `_plan_shards`).
    """
    state = model.state_dict()
    plan, total = _plan_shards(state, max_shard_bytes)
    return _write_official(
        Path(directory),
        model.config,
        getattr(model, "tokenizer_dir", None),
        plan,
        total,
        lambda keys: {key: state[key] for key in keys},
    )


def save_random_official(
    config: ModelConfig | str,
    directory: str | Path,
    *,
    seed: int = 0,
    dtype: torch.dtype = torch.float16,
    max_shard_bytes: int = 2 << 30,
    tokenizer: str | Path | None = None,
) -> Path:
    """Writes a seeded random-weight checkpoint of `config` in the official layout, never holding the model.

    For the released 7B (9.4 G parameters: 37 GB in float32, 19 GB in float16), which no machine of ours can
    build in memory: the model is built with its parameters on the meta device (`_parameters_on_meta`; buffers
    real), the shards are planned from the meta state as `save_official` plans them, and each shard's tensors
    are drawn in `dtype` when that shard is written and dropped after it, so the peak is about one shard
    (`max_shard_bytes`). Floating buffers are converted to `dtype`, others kept.

    The values follow `_randomise`'s noise on a zero start, except 1-D `weight`s, which start at one (the
    norms' scales): >=2-D N(0, 0.5/sqrt(fan_in)), 1-D weights 1 + N(0, 0.1), other 1-D tensors N(0, 0.05),
    one draw per distinct tensor (aliases share it), a generator seeded with `seed` + 1 drawing in key
    order. They are not the values `load_reference` gives a buildable configuration (that starts from each
    module's own initialisation, which needs the model in memory); for speed and memory any values do.

    Args:
        config: a `ModelConfig` or a named configuration (`visionllmv2-7b`).
        directory: the new checkpoint folder (must not exist).
        seed: seed of the values (the same seed writes the same files).
        dtype: floating dtype on disk (the release is float16).
        max_shard_bytes: shard size, as in `save_official`.
        tokenizer: tokenizer files to copy; default `config.tokenizer_dir(config)`: the configuration's
            bundled tokenizer, or for the released config (none named) the test tokenizer widened to its
            32026 ids (`wide_tokenizer`: no released tokenizer is on our machines).

    Returns:
        The folder.
    """
    if isinstance(config, str):
        config = named_config(config)
    folder = Path(tokenizer) if tokenizer is not None else tokenizer_dir(config)
    with _parameters_on_meta():
        model = build_model(config)
    state = model.state_dict(keep_vars=True)
    plan, total = _plan_shards(state, max_shard_bytes, dtype)
    generator = torch.Generator().manual_seed(seed + 1)

    def draw(key: str, value: torch.Tensor) -> torch.Tensor:
        if value.device.type != "meta":  # a buffer
            return value.detach().to(dtype) if value.is_floating_point() else value.detach().clone()
        if not value.is_floating_point():
            raise CheckpointError(f"{config.source}: parameter '{key}' has dtype {value.dtype}; cannot draw it")
        out = torch.empty(value.shape, dtype=dtype)
        if value.dim() >= 2:
            return out.normal_(0.0, 0.5 / value[0].numel() ** 0.5, generator=generator)
        if key.endswith("weight"):
            return out.normal_(1.0, 0.1, generator=generator)
        return out.normal_(0.0, 0.05, generator=generator)

    def shard_tensors(keys: list[str]) -> dict[str, torch.Tensor]:
        drawn: dict[object, torch.Tensor] = {}
        out = {}
        for key in keys:
            ident = _same_tensor_key(state[key])
            if ident not in drawn:
                drawn[ident] = draw(key, state[key])
            out[key] = drawn[ident]
        return out

    return _write_official(Path(directory), config, folder, plan, total, shard_tensors)


# --- partial loading: only the parts one exported component needs -----------------------------------------

#: What each exported component reads from the model (top-level modules or deeper module paths).
#: `region` validates against `encode_image`, so it needs the vision tower and projector as well; `llm` also
#: provides the artifact's embedding tables (`llm.model.embed_tokens` and the query tables), and
#: `embeddings` is those tables alone, for an export without the LLM graph.
COMPONENT_PARTS: dict[str, tuple[str, ...]] = {
    "vision": ("vis_encoder", "vl_bridge"),
    "region": ("vis_encoder", "vl_bridge", "region_encoder"),
    "llm": ("llm", "emb_embeddings_det", "emb_embeddings_pose", "emb_embeddings_gen", "emb_embeddings_edit"),
    "embeddings": (
        "llm.model.embed_tokens",
        "emb_embeddings_det",
        "emb_embeddings_pose",
        "emb_embeddings_gen",
        "emb_embeddings_edit",
    ),
    "det": ("gdino",),
    "pose": ("unipose",),
    "gen": ("sd",),
    "edit": ("ip2p",),
}


def _parameters_on_meta():
    """Within it, every parameter a module registers is moved to the meta device; buffers stay real.

    The same idea as `accelerate.init_empty_weights(include_buffers=False)`: constructors and their weight
    initialisation run at no memory cost, while buffers computed at construction (index tables, position ids,
    rotary tables) keep their values, which materialising a module built wholly on meta would lose. The
    patch of `nn.Module.register_parameter` is process-wide while it lasts: build nothing else concurrently.
    """
    import contextlib

    from torch import nn

    @contextlib.contextmanager
    def patched():
        original = nn.Module.register_parameter

        def register_parameter(module, name, param):
            original(module, name, param)
            if param is not None and param.device.type != "meta":
                extra = dict(module._parameters[name].__dict__)
                module._parameters[name] = type(param)(
                    module._parameters[name].to("meta"), requires_grad=param.requires_grad
                )
                module._parameters[name].__dict__.update(extra)

        nn.Module.register_parameter = register_parameter
        try:
            yield
        finally:
            nn.Module.register_parameter = original

    return patched()


def _under(key: str, prefixes: tuple[str, ...]) -> bool:
    return any(key == p or key.startswith(p + ".") for p in prefixes)


def _plain_key(key: str) -> str:
    """The model key a checkpoint key loads into (peft names mapped; LoRA A/B keys keep their suffix)."""
    plain = "llm." + key[len(_PEFT_PREFIX) :] if key.startswith(_PEFT_PREFIX) else key
    return plain.replace(".base_layer.weight", ".weight").replace(".base_layer.bias", ".bias")


def _checkpoint_files(directory: Path) -> tuple[Path | None, dict[str, str] | None, list[Path]]:
    """The index (path and weight map) if there is one, and the weight files of a checkpoint folder."""
    for index_name in (SAFE_INDEX_NAME, INDEX_NAME):
        index = directory / index_name
        if index.is_file():
            weight_map = _read_index(index)
            return index, weight_map, [directory / name for name in sorted(set(weight_map.values()))]
    singles = [directory / n for n in ("model.safetensors", "pytorch_model.bin")]
    singles = [path for path in singles if path.is_file()]
    if not singles:
        raise CheckpointError(
            f"{directory}: no weights found (expected {INDEX_NAME}, {SAFE_INDEX_NAME}, model.safetensors "
            "or pytorch_model.bin)"
        )
    return None, None, singles[:1]


def _open_shard_lazily(path: Path) -> tuple[list[str], object, str]:
    """The keys of one shard, a `key -> tensor` getter that reads only that tensor, and how it was opened.

    `.bin` shards are opened with `torch.load(mmap=True, weights_only=True)`: the pickle is read, tensor data
    stays in the file until a tensor is used. A legacy (pre-zip) `.bin` cannot be mapped and is read whole
    (mode `read`). safetensors files are opened with `safe_open` and read tensor by tensor.
    """
    if not path.is_file():
        raise CheckpointError(f"{path}: shard file is missing")
    try:
        if path.suffix == ".safetensors":
            from safetensors import safe_open

            handle = safe_open(str(path), framework="pt")  # closed when the getter is dropped
            return list(handle.keys()), handle.get_tensor, "safetensors"
        mode = "mmap"
        try:
            tensors = torch.load(str(path), map_location="cpu", weights_only=True, mmap=True)
        except RuntimeError as e:
            if "mmap" not in str(e):
                raise
            mode = "read"  # a legacy-format file: mmap needs the zip format torch.save writes since 1.6
            tensors = torch.load(str(path), map_location="cpu", weights_only=True)
    except CheckpointError:
        raise
    except Exception as e:  # truncated zip, bad pickle opcode, a forbidden global, ...
        raise CheckpointError(f"{path}: cannot read checkpoint shard ({type(e).__name__}: {e})") from None
    _check_shard_contents(path, tensors)
    return list(tensors), tensors.__getitem__, mode


class _PartView:
    """The part of a model's state dict under some prefixes, in the shape `load_state_into` reads."""

    def __init__(self, model: VisionLLMv2, prefixes: tuple[str, ...]):
        self.model = model
        self.prefixes = prefixes

    def state_dict(self, keep_vars: bool = False) -> dict[str, torch.Tensor]:
        own = self.model.state_dict(keep_vars=keep_vars)
        return {k: v for k, v in own.items() if _under(k, self.prefixes)}


def _resolve_parts(model: VisionLLMv2, parts) -> tuple[str, ...]:
    if isinstance(parts, str):
        parts = [parts]
    prefixes: list[str] = []
    for part in parts:
        for prefix in COMPONENT_PARTS.get(part, (part,)):
            try:
                model.get_submodule(prefix)
            except AttributeError:
                raise CheckpointError(
                    f"{model.config.source}: the model has no '{prefix}' (asked for {part!r}; components: "
                    f"{', '.join(COMPONENT_PARTS)}, or a module path such as 'vis_encoder')"
                ) from None
            if prefix not in prefixes:
                prefixes.append(prefix)
    return tuple(prefixes)


def load_reference_parts(
    directory: str | Path, prefixes: list[str] | tuple[str, ...], dtype: torch.dtype = torch.float32
) -> VisionLLMv2:
    """Loads only some parts of a checkpoint folder; everything else stays on the meta device (no memory).

    The whole model is built with its parameters on `meta` (buffers real), the parameters under `prefixes`
    are materialised on the CPU, and only the shards that hold their keys are opened (`.bin` memory-mapped,
    see `_open_shard_lazily`); only the needed tensors are read from them. The checks are those of
    `load_reference` for the loaded part: every needed key present (a missing one is an error naming it and
    the shard or index it should be in), no unexpected key under the prefixes, shapes, dtypes, aliases, LoRA
    pairs (merged as `merge_lora` does). The loaded values are bit-identical to `load_reference`'s.

    Args:
        directory: a checkpoint folder in the official layout.
        prefixes: component names (`vision region llm det pose gen edit embeddings`, see `COMPONENT_PARTS`)
            and/or module paths of the model (`vis_encoder`, `llm.model.embed_tokens`, ...). An empty list
            loads no weights: the model's config, structure and tokenizer folder only.
        dtype: floating dtype of the loaded parameters; each tensor is converted as it is read, so a float16
            load never holds a float32 copy of the part.

    Returns:
        The model in eval mode with `tokenizer_dir` and `checkpoint_dir` (the folder, for `read_parts`)
        set, `loaded_parts` (the module paths loaded) and
        `shard_modes` (`{shard file: "mmap" | "read" | "safetensors"}` for each shard opened; `read` is a
        legacy-format `.bin` that could not be memory-mapped and was read whole).
    """
    directory = Path(directory)
    if not directory.is_dir():
        raise CheckpointError(f"{directory}: not a directory")
    config = ModelConfig.from_file(directory / "config.json")
    _attach_diffusion_components(config, directory)
    index_path, weight_map, files = _checkpoint_files(directory)
    absent = [path.name for path in files if not path.is_file()]
    if absent:
        raise CheckpointError(
            f"{directory / absent[0]}: shard file is missing ({len(absent)} of {len(files)} shard(s) listed "
            f"in {index_path.name if index_path else 'the folder'} are absent: {absent[:5]})"
        )
    with _parameters_on_meta():
        model = build_model(config)
    parts = _resolve_parts(model, prefixes)

    # Materialise the needed parameters (aliases stay one tensor) on the CPU, uninitialised until loaded, in
    # the dtype asked for: a float16 load never holds a float32 copy (each tensor is converted as it is read).
    materialised: dict[int, torch.nn.Parameter] = {}
    keep_alive = []  # the meta parameters replaced, so that their ids stay unique while we map them
    for prefix in parts:
        for module in model.get_submodule(prefix).modules():
            for name, param in module._parameters.items():
                if param is None or param.device.type != "meta":
                    continue
                new = materialised.get(id(param))
                if new is None:
                    new = torch.nn.Parameter(
                        torch.empty(param.shape, dtype=dtype if param.is_floating_point() else param.dtype),
                        requires_grad=param.requires_grad,
                    )
                    materialised[id(param)] = new
                    keep_alive.append(param)
                module._parameters[name] = new
    del keep_alive
    # Buffers outside the loaded parts carry nothing either.
    for name, module in model.named_modules():
        for bname, buf in module._buffers.items():
            full = f"{name}.{bname}" if name else bname
            if buf is not None and buf.device.type != "meta" and not _under(full, parts):
                module._buffers[bname] = buf.to("meta")

    shard_modes: dict[str, str] = {}
    _fill(_PartView(model, parts), directory, index_path, weight_map, files, parts, shard_modes)
    model.tokenizer_dir = directory
    model.checkpoint_dir = directory
    model.loaded_parts = parts
    model.shard_modes = shard_modes
    return model.to(dtype).eval().requires_grad_(False)


def read_parts(
    model: VisionLLMv2, prefixes: list[str] | tuple[str, ...], dtype: torch.dtype = torch.float32
) -> dict[str, torch.Tensor]:
    """The checkpoint values of the state under `prefixes`, read again from the folder `model` came from.

    For a model from `load_reference_parts` (its `checkpoint_dir`), whatever its own tensors under `prefixes`
    are now (loaded in another dtype, or released to meta by `release_parts`): new tensors in `dtype` (float
    ones), read as `load_reference_parts` reads them (only the shards that hold them, memory-mapped, each
    tensor converted as it is read, the same checks and LoRA merge) and bit-identical to its values. The model
    is not changed. This is how a component exported in float16 gets float32 reference weights back one
    module at a time.

    Returns:
        `{model key: tensor}` for every state key under `prefixes` (aliases share one tensor).
    """
    directory = getattr(model, "checkpoint_dir", None)
    if directory is None:
        raise CheckpointError(
            "read_parts: the model was not loaded from a checkpoint folder by load_reference_parts "
            "(it has no checkpoint_dir)"
        )
    parts = _resolve_parts(model, prefixes)
    fresh: dict[object, torch.Tensor] = {}
    state: dict[str, torch.Tensor] = {}
    for key, value in _PartView(model, parts).state_dict(keep_vars=True).items():
        ident = _same_tensor_key(value)
        if ident not in fresh:
            fresh[ident] = torch.empty(value.shape, dtype=dtype if value.is_floating_point() else value.dtype)
        state[key] = fresh[ident]
    index_path, weight_map, files = _checkpoint_files(Path(directory))
    _fill(_DictView(state), Path(directory), index_path, weight_map, files, parts, {})
    return state


def release_parts(model: VisionLLMv2, prefixes: list[str] | tuple[str, ...]) -> None:
    """Moves the parameters under `prefixes` back to the meta device, which frees their memory.

    The inverse of loading them with `load_reference_parts` (aliases stay one tensor); `read_parts` reads
    their values again. Buffers stay (they are small). `loaded_parts` keeps recording what was loaded.
    """
    parts = _resolve_parts(model, prefixes)
    moved: dict[int, torch.nn.Parameter] = {}
    keep_alive = []  # the released parameters, so that their ids stay unique until every alias is mapped
    for prefix in parts:
        for module in model.get_submodule(prefix).modules():
            for name, param in module._parameters.items():
                if param is None or param.device.type == "meta":
                    continue
                new = moved.get(id(param))
                if new is None:
                    new = torch.nn.Parameter(param.detach().to("meta"), requires_grad=param.requires_grad)
                    moved[id(param)] = new
                    keep_alive.append(param)
                module._parameters[name] = new
    del keep_alive


class _DictView:
    """A `{key: tensor}` dict in the shape `load_state_into` reads (its `state_dict`)."""

    def __init__(self, state: dict[str, torch.Tensor]):
        self.state = state

    def state_dict(self, keep_vars: bool = False) -> dict[str, torch.Tensor]:
        return dict(self.state)


def _fill(view, directory: Path, index_path, weight_map, files, parts, shard_modes: dict[str, str]) -> None:
    """Reads the checkpoint tensors under `parts` into the tensors of `view` (checked, LoRA merged).

    The pages of memory-mapped shards are handed back tensor by tensor as they are copied: the mapped
    checkpoint would otherwise stay resident beside the loaded copy until every shard is closed.
    """
    own = view.state_dict(keep_vars=True)
    if not own:
        return
    mapped = _MappedShards()
    tensors, origin = _read_needed(directory, index_path, weight_map, files, parts, own, shard_modes, mapped)
    tensors = merge_lora(tensors, origin)
    load_state_into(view, tensors, origin, str(directory), release=mapped.release)  # type: ignore[arg-type]
    del tensors


class _MappedShards:
    """The address ranges where this process maps the shards opened so far (Linux `/proc/self/maps`).

    `release(tensor)` hands back to the kernel the whole pages of a tensor that lie in one of them
    (`madvise(MADV_DONTNEED)`): pages of a private, read-only file mapping that are dropped come back from
    the file if they are read again, so this changes the resident size, never a value. Tensors elsewhere
    (a LoRA merge, a legacy shard read whole) are left alone; off Linux it does nothing.
    """

    _MADV_DONTNEED = 4

    def __init__(self):
        self.ranges: list[tuple[int, int]] = []
        self._madvise = None
        if sys.platform.startswith("linux"):
            try:
                import ctypes

                libc = ctypes.CDLL("libc.so.6", use_errno=True)
                libc.madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
                self._madvise = libc.madvise
                self._page = os.sysconf("SC_PAGE_SIZE")
            except (OSError, AttributeError, ValueError):
                self._madvise = None

    def add(self, path: Path) -> None:
        """Records the mappings of `path` (call after opening it)."""
        if self._madvise is None:
            return
        target = str(path.resolve())
        try:
            with open("/proc/self/maps") as maps:
                for line in maps:
                    fields = line.rstrip("\n").split(maxsplit=5)
                    if len(fields) == 6 and fields[5] == target:
                        lo, hi = (int(x, 16) for x in fields[0].split("-"))
                        self.ranges.append((lo, hi))
        except OSError:
            pass

    def release(self, tensor: torch.Tensor) -> None:
        if self._madvise is None or not self.ranges or tensor.device.type != "cpu":
            return
        storage = tensor.untyped_storage()
        start = storage.data_ptr()
        end = start + storage.nbytes()
        if not any(lo <= start and end <= hi for lo, hi in self.ranges):
            return
        first = -(-start // self._page) * self._page
        last = end // self._page * self._page
        if last > first:
            self._madvise(first, last - first, self._MADV_DONTNEED)


def _read_needed(
    directory: Path,
    index_path: Path | None,
    weight_map: dict[str, str] | None,
    files: list[Path],
    parts: tuple[str, ...],
    own: dict[str, torch.Tensor],
    shard_modes: dict[str, str],
    mapped: _MappedShards | None = None,
) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """The checkpoint tensors under `parts` (raw names; LoRA not merged yet) and the file of each."""
    if weight_map is not None:
        needed_raw = {k: v for k, v in weight_map.items() if _under(_plain_key(k), parts)}
        # Every needed model key (or another name of its tensor) must be listed before any shard is opened.
        unlisted = _uncovered(own, {_plain_key(k) for k in needed_raw})
        if unlisted:
            raise CheckpointError(
                f"{index_path}: needed key '{unlisted[0]}' is not listed (in no shard; {len(unlisted)} "
                f"key(s) of {', '.join(parts)} missing, e.g. {unlisted[:5]})"
            )
        shard_names = sorted(set(needed_raw.values()))
    else:
        needed_raw = None
        shard_names = [files[0].name]
    tensors: dict[str, torch.Tensor] = {}
    origin: dict[str, str] = {}
    for shard in shard_names:
        path = directory / shard
        keys, get, mode = _open_shard_lazily(path)
        shard_modes[shard] = mode
        if mapped is not None and mode != "read":
            mapped.add(path)
        for key in keys:
            if weight_map is not None and weight_map.get(key) != shard:
                where = f"lists it in {weight_map[key]}" if key in weight_map else "does not list it"
                raise CheckpointError(f"{path}: holds key '{key}' but {index_path.name} {where}")
            if key in origin:
                raise CheckpointError(f"{path}: key '{key}' is also in {origin[key]}")
            if _under(_plain_key(key), parts):
                tensors[key] = get(key)
                origin[key] = shard
        if weight_map is not None:
            for key, name in needed_raw.items():
                if name == shard and key not in tensors:
                    raise CheckpointError(
                        f"{path}: needed key '{key}' is listed in {index_path.name} but not in the shard"
                    )
        del get
    if weight_map is None:
        missing = _uncovered(own, {_plain_key(k) for k in tensors})
        if missing:
            raise CheckpointError(
                f"{files[0]}: needed key '{missing[0]}' is not in the file ({len(missing)} key(s) of "
                f"{', '.join(parts)} missing, e.g. {missing[:5]})"
            )
    return tensors, origin
