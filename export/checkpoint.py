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
import tempfile
from pathlib import Path

import torch

from visionllm_edge.export.config import EXTENSION_KEY, ConfigError, ModelConfig, data_path, named_config
from visionllm_edge.export.model import VisionLLMv2, build_model

#: The official `wrap_llm_lora` adapter scale: lora_alpha / r = 64 / 32.
LORA_SCALING = 2.0
TOKENIZER_FILES = ("tokenizer.model", "tokenizer_config.json", "added_tokens.json", "special_tokens_map.json")
INDEX_NAME = "pytorch_model.bin.index.json"
SAFE_INDEX_NAME = "model.safetensors.index.json"


class CheckpointError(ValueError):
    """A checkpoint that cannot be loaded as it is; the message names the file and the key."""


# --- reading tensors -------------------------------------------------------------------------------------


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
    if not isinstance(tensors, dict):
        raise CheckpointError(f"{path}: expected a dict of tensors, got {type(tensors).__name__}")
    for key, value in tensors.items():
        if not isinstance(value, torch.Tensor):
            raise CheckpointError(f"{path}: key '{key}' holds a {type(value).__name__}, not a tensor")
    return tensors


def read_checkpoint_tensors(directory: Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """All tensors of a checkpoint folder and, per key, the file it came from."""
    files: list[Path]
    index_keys: dict[str, str] | None = None
    for index_name in (SAFE_INDEX_NAME, INDEX_NAME):
        index = directory / index_name
        if index.is_file():
            try:
                weight_map = json.loads(index.read_text())["weight_map"]
            except (json.JSONDecodeError, KeyError, TypeError) as e:
                raise CheckpointError(f"{index}: not a valid shard index ({e})") from None
            index_keys = dict(weight_map)
            files = [directory / name for name in sorted(set(weight_map.values()))]
            break
    else:
        singles = [directory / n for n in ("model.safetensors", "pytorch_model.bin") if (directory / n).is_file()]
        if not singles:
            raise CheckpointError(
                f"{directory}: no weights found (expected {INDEX_NAME}, {SAFE_INDEX_NAME}, model.safetensors "
                "or pytorch_model.bin)"
            )
        files = singles[:1]
    tensors: dict[str, torch.Tensor] = {}
    origin: dict[str, str] = {}
    for path in files:
        for key, value in _read_shard(path).items():
            tensors[key] = value
            origin[key] = path.name
    if index_keys is not None:
        for key, name in index_keys.items():
            if key not in tensors:
                raise CheckpointError(f"{directory / name}: key '{key}' is listed in the index but not in the shard")
    return tensors, origin


# --- key mapping -------------------------------------------------------------------------------------------

_PEFT_PREFIX = "llm.base_model.model."
_LORA = re.compile(r"^(?P<module>.+)\.lora_(?P<ab>[AB])\.(?P<adapter>[^.]+)\.weight$")


def merge_lora(tensors: dict[str, torch.Tensor], origin: dict[str, str], scaling: float = LORA_SCALING) -> dict[str, torch.Tensor]:
    """Maps peft-wrapped LLM keys to plain ones and merges each adapter: `W' = W + scaling * B @ A`.

    Accepts peft 0.6.2 names (`….q_proj.weight` beside `….q_proj.lora_A.default.weight`) and peft ≥ 0.7
    names (`….q_proj.base_layer.weight`).
    """
    out: dict[str, torch.Tensor] = {}
    adapters: dict[str, dict[str, tuple[str, torch.Tensor]]] = {}
    for key, value in tensors.items():
        plain = "llm." + key[len(_PEFT_PREFIX):] if key.startswith(_PEFT_PREFIX) else key
        m = _LORA.match(plain)
        if m:
            adapters.setdefault(m["module"], {})[m["ab"]] = (key, value)
            continue
        plain = plain.replace(".base_layer.weight", ".weight").replace(".base_layer.bias", ".bias")
        out[plain] = value
        if plain != key:
            origin[plain] = origin.get(key, "?")
    for module, pair in adapters.items():
        if set(pair) != {"A", "B"}:
            have = next(iter(pair.values()))[0]
            raise CheckpointError(f"{origin.get(have, '?')}: LoRA key '{have}' has no matching lora_{'B' if 'A' in pair else 'A'}")
        (key_a, a), (key_b, b) = pair["A"], pair["B"]
        wkey = module + ".weight"
        if wkey not in out:
            raise CheckpointError(f"{origin.get(key_a, '?')}: LoRA adapter '{key_a}' has no base weight '{wkey}'")
        w = out[wkey]
        if a.shape[1] != w.shape[1] or b.shape[0] != w.shape[0] or a.shape[0] != b.shape[1]:
            raise CheckpointError(
                f"{origin.get(key_a, '?')}: LoRA shapes do not fit '{wkey}' {tuple(w.shape)}: "
                f"A {tuple(a.shape)}, B {tuple(b.shape)}"
            )
        merged = w.float() + scaling * (b.float() @ a.float())
        out[wkey] = merged.to(w.dtype)
    return out


def load_state_into(model: VisionLLMv2, tensors: dict[str, torch.Tensor], origin: dict[str, str], source: str) -> None:
    """Copies `tensors` into `model` with strict checks; errors name the file, the key and both shapes."""
    own = model.state_dict(keep_vars=True)
    missing = [k for k in own if k not in tensors]
    unexpected = [k for k in tensors if k not in own]
    if missing:
        raise CheckpointError(
            f"{source}: {len(missing)} key(s) missing from the checkpoint, e.g. {missing[:5]}"
        )
    if unexpected:
        raise CheckpointError(
            f"{source}: {len(unexpected)} unexpected key(s), e.g. "
            + ", ".join(f"'{k}' (in {origin.get(k, '?')})" for k in unexpected[:5])
        )
    # Aliased keys (shared heads) name one tensor in the model: every alias must carry the same values.
    first_of: dict[int, str] = {}
    for key, param in own.items():
        value = tensors[key]
        if tuple(value.shape) != tuple(param.shape):
            raise CheckpointError(
                f"{origin.get(key, source)}: key '{key}' has shape {tuple(value.shape)}, the model expects "
                f"{tuple(param.shape)}"
            )
        if not (value.is_floating_point() == param.is_floating_point()):
            raise CheckpointError(f"{origin.get(key, source)}: key '{key}' has dtype {value.dtype}, expected {param.dtype}")
        ptr = param.data_ptr() if param.device.type != "meta" else id(param)
        if ptr in first_of and param.numel() > 0:
            other = first_of[ptr]
            if not torch.equal(tensors[other].to(value.dtype), value):
                raise CheckpointError(
                    f"{origin.get(key, source)}: aliased keys '{other}' and '{key}' share one tensor but hold different values"
                )
            continue
        first_of[ptr] = key
        with torch.no_grad():
            param.data.copy_(value.to(param.dtype))


# --- public API --------------------------------------------------------------------------------------------


def load_reference(path_or_name: str | Path, dtype: torch.dtype = torch.float32, seed: int = 0) -> VisionLLMv2:
    """Loads the PyTorch reference model.

    Args:
        path_or_name: a checkpoint folder in the official layout, or a configuration name (`tiny-random`:
            seeded random weights; `visionllmv2-7b` is a checkpoint folder's job: 28 GB of random weights help nobody).
        dtype: floating dtype of every parameter (float32 for parity).
        seed: seed of the random weights of a named configuration.

    Returns:
        The model in eval mode, with `model.tokenizer_dir` pointing at its tokenizer files.
    """
    if isinstance(path_or_name, str) and not Path(path_or_name).exists():
        if path_or_name == "tiny-random":
            model = build_model(named_config(path_or_name), seed=seed)
            _randomise(model, seed)
            model.tokenizer_dir = data_path(model.config.extension["tokenizer"])
            return model.to(dtype).eval().requires_grad_(False)
        raise CheckpointError(
            f"{path_or_name!r} is neither a checkpoint folder nor a configuration that can be built alone "
            "(known: 'tiny-random')"
        )
    directory = Path(path_or_name)
    if not directory.is_dir():
        raise CheckpointError(f"{directory}: not a directory")
    config = ModelConfig.from_file(directory / "config.json")
    _attach_diffusion_components(config, directory)
    model = build_model(config)
    tensors, origin = read_checkpoint_tensors(directory)
    tensors = merge_lora(tensors, origin)
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


def save_official(model: VisionLLMv2, directory: str | Path, max_shard_bytes: int = 2 << 30) -> Path:
    """Writes `model` in the official layout (config, sharded `.bin` + index, tokenizer files).

    Written to a temporary folder beside the target and renamed when complete, so an interrupted save
    leaves nothing that looks like a checkpoint. Alias keys are kept, as transformers 4.34 `.bin` saving does.
    """
    directory = Path(directory)
    if directory.exists():
        raise FileExistsError(f"{directory}: already exists; choose a new folder")
    directory.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{directory.name}.", dir=directory.parent))
    try:
        state = model.state_dict()
        shards: list[dict[str, torch.Tensor]] = [{}]
        size = 0
        seen: set[int] = set()
        for key, value in state.items():
            nbytes = value.numel() * value.element_size()
            if shards[-1] and size + nbytes > max_shard_bytes and value.data_ptr() not in seen:
                shards.append({})
                size = 0
            shards[-1][key] = value
            if value.data_ptr() not in seen:
                size += nbytes
                seen.add(value.data_ptr())
        n = len(shards)
        weight_map = {}
        total = 0
        for i, shard in enumerate(shards, start=1):
            name = f"pytorch_model-{i:05d}-of-{n:05d}.bin"
            torch.save(shard, tmp / name)
            for key, value in shard.items():
                weight_map[key] = name
                total += value.numel() * value.element_size()
        index = {"metadata": {"total_size": total}, "weight_map": weight_map}
        (tmp / INDEX_NAME).write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")
        config = model.config.to_dict()
        config.setdefault("architectures", ["VisionLLMv2Model"])
        config.setdefault("model_type", "visionllmv2")
        if EXTENSION_KEY in config and not config[EXTENSION_KEY]:
            del config[EXTENSION_KEY]
        (tmp / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
        tok_dir = getattr(model, "tokenizer_dir", None)
        if tok_dir is not None:
            for name in TOKENIZER_FILES:
                if (Path(tok_dir) / name).is_file():
                    shutil.copyfile(Path(tok_dir) / name, tmp / name)
        os.replace(tmp, directory)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return directory
