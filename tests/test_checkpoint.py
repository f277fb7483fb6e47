"""Official-format checkpoints: the 7B key list, LoRA merging, save/load round trip, and every bad file.

The 7B checks run on the meta device against the official key lists in `shared/data` (made by building the
official `VisionLLMv2Model` under `init_empty_weights`; see that folder's README §1): names, shapes, dtypes,
aliases and per-component counts must be equal, and the peft-wrapped (LoRA) key list must merge to exactly
the plain key set. Real numbers run at `tiny-random` size: a bit-exact round trip through `save_official`,
LoRA merged as `W + 2·B@A` under both peft namings, and one corrupted copy of a saved checkpoint per fault,
each of which must fail with a message that names the file, the key and (for shapes) both shapes.
"""

from __future__ import annotations

import importlib.util
import json
import re
import shutil
from pathlib import Path

import pytest
import torch
from visionllm_edge.export.checkpoint import (
    INDEX_NAME,
    LORA_SCALING,
    TOKENIZER_FILES,
    CheckpointError,
    load_reference,
    load_state_into,
    merge_lora,
    save_official,
)
from visionllm_edge.export.config import EXTENSION_KEY, ConfigError, config_7b
from visionllm_edge.export.model import build_model
from visionllm_edge.export.tokenizer import ChatTokenizer

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
SHARD_RE = re.compile(r"^pytorch_model-(\d{5})-of-(\d{5})\.bin$")
#: Small enough that tiny-random (about 29 MB) is written as several shards.
SHARD_BYTES = 12 << 20
LORA_RANK = 32
LORA_TARGETS = (
    "self_attn.q_proj",
    "self_attn.k_proj",
    "self_attn.v_proj",
    "self_attn.o_proj",
    "mlp.up_proj",
    "mlp.down_proj",
)


def _shared(name: str) -> dict:
    path = SHARED_DATA / name
    if not path.is_file():
        pytest.skip(f"shared data folder {SHARED_DATA} (the ../shared beside the repo) has no {name}")
    return json.loads(path.read_text())


def _dtype(name: str) -> torch.dtype:
    return {"float32": torch.float32, "bfloat16": torch.bfloat16, "int64": torch.int64}[name]


def _aliases(state: dict[str, torch.Tensor]) -> dict[str, str]:
    """alias key -> first key of the same tensor (identity on meta, storage otherwise)."""
    first: dict[int, str] = {}
    out = {}
    for key, value in state.items():
        ident = id(value) if value.device.type == "meta" else value.data_ptr()
        if ident in first:
            out[key] = first[ident]
        else:
            first[ident] = key
    return out


def _describe(state: dict[str, torch.Tensor]) -> dict[str, dict]:
    return {
        k: {"shape": list(v.shape), "dtype": str(v.dtype).removeprefix("torch.")} for k, v in state.items()
    }


def _diff(ours: dict[str, dict], ref: dict[str, dict]) -> str:
    missing = [k for k in ref if k not in ours]
    extra = [k for k in ours if k not in ref]
    wrong = [(k, ours[k], ref[k]) for k in ref if k in ours and ours[k] != ref[k]]
    return (
        f"{len(missing)} missing {missing[:5]}, {len(extra)} extra {extra[:5]}, "
        f"{len(wrong)} differ {wrong[:5]}"
    )


# --- 7B on the meta device ---------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def keys7b() -> dict:
    return _shared("visionllmv2-7b.keys.json")


@pytest.fixture(scope="module")
def lora_keys7b() -> dict:
    return _shared("visionllmv2-7b.lora.keys.json")


@pytest.fixture(scope="module")
def model7b(keys7b):
    return build_model(config_7b(), device="meta", official_dtypes=True)


def test_7b_keys_shapes_and_dtypes_equal_the_official_list(model7b, keys7b):
    state = model7b.state_dict()
    ours, ref = _describe(state), keys7b["tensors"]
    assert len(ref) == keys7b["meta"]["num_keys"] == 4742
    assert ours == ref, _diff(ours, ref)
    # Nothing was allocated: every float tensor is on meta (only the int64 Swin index buffers may be real).
    real = [k for k, v in state.items() if v.device.type != "meta" and v.dtype != torch.int64]
    assert not real, real[:5]


def test_7b_aliases_are_the_same_tensor_objects(model7b, keys7b):
    state = model7b.state_dict(keep_vars=True)
    tied = keys7b["tied"]
    assert len(tied) == keys7b["meta"]["num_tied_aliases"] == 258
    for alias, first in tied.items():
        assert state[alias] is state[first], f"'{alias}' is not the same tensor as '{first}'"
    # ... and no other keys share a tensor.
    assert _aliases(state) == tied


def _param_counts_module():
    path = REPO / "benchmarks" / "param_counts.py"
    spec = importlib.util.spec_from_file_location("param_counts", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_7b_per_component_parameter_counts_equal_the_official_ones(model7b, keys7b):
    counts = _param_counts_module()
    ours = counts.per_prefix_counts(model7b.state_dict(keep_vars=True))
    ref = keys7b["meta"]["per_prefix"]
    assert counts.compare(ours, ref) == []
    assert ours == ref
    assert sum(row["unique_numel"] for row in ours.values()) == keys7b["meta"]["unique_numel_total"]
    n_params = sum(p.numel() for p in model7b.parameters())  # parameters() yields each shared tensor once
    assert n_params == keys7b["meta"]["parameters_total"] == 9_372_576_358


def test_7b_lora_keys_merge_to_the_plain_key_set_and_load(model7b, keys7b, lora_keys7b):
    state: dict[str, torch.Tensor] = {}
    for key, spec in lora_keys7b["tensors"].items():
        first = lora_keys7b["tied"].get(key)
        if first:
            state[key] = state[first]
        else:
            state[key] = torch.empty(spec["shape"], dtype=_dtype(spec["dtype"]), device="meta")
    n_lora = sum(".lora_A." in k or ".lora_B." in k for k in state)
    assert n_lora == 32 * len(LORA_TARGETS) * 2 == 384
    origin = dict.fromkeys(state, "visionllmv2-7b.lora.keys.json")
    merged = merge_lora(state, origin)
    assert _describe(merged) == keys7b["tensors"], _diff(_describe(merged), keys7b["tensors"])

    # Exactly the adapted projections are new (merged) tensors; everything else passes through unchanged.
    def source(key: str) -> torch.Tensor | None:
        return state.get("llm.base_model.model." + key[4:] if key.startswith("llm.") else key)

    changed = {k for k, v in merged.items() if v is not source(k)}
    want = {f"llm.model.layers.{i}.{t}.weight" for i in range(32) for t in LORA_TARGETS}
    assert changed == want
    assert _aliases(merged) == keys7b["tied"]
    load_state_into(model7b, merged, origin, "visionllmv2-7b.lora.keys.json")
    # The loader's checks run on meta too: a wrong shape among the merged keys is still caught.
    bad = dict(merged, **{"llm.model.norm.weight": torch.empty(4095, device="meta")})
    with pytest.raises(CheckpointError, match=r"llm\.model\.norm\.weight.*\(4095,\).*\(4096,\)"):
        load_state_into(model7b, bad, origin, "meta")


# --- tiny-random: save once, copy per test -----------------------------------------------------------------


@pytest.fixture(scope="session")
def tiny():
    return load_reference("tiny-random")


@pytest.fixture(scope="session")
def saved(tiny, tmp_path_factory) -> Path:
    return save_official(tiny, tmp_path_factory.mktemp("saved") / "tiny", max_shard_bytes=SHARD_BYTES)


@pytest.fixture()
def ckpt(saved, tmp_path) -> Path:
    """A private copy of the saved tiny-random checkpoint, free to corrupt."""
    return Path(shutil.copytree(saved, tmp_path / "ckpt"))


def _index(folder: Path) -> dict[str, str]:
    return json.loads((folder / INDEX_NAME).read_text())["weight_map"]


def _shards(folder: Path) -> dict[str, dict[str, torch.Tensor]]:
    names = sorted(set(_index(folder).values()))
    return {name: torch.load(folder / name, weights_only=True) for name in names}


def _write(folder: Path, shards: dict[str, dict]) -> None:
    """Writes the shards and an index that lists exactly what they hold."""
    for name, shard in shards.items():
        torch.save(shard, folder / name)
    weight_map = {key: name for name, shard in shards.items() for key in shard}
    (folder / INDEX_NAME).write_text(json.dumps({"metadata": {}, "weight_map": weight_map}, indent=2))


def _shard_of(folder: Path, key: str) -> str:
    return _index(folder)[key]


def test_round_trip_is_bit_exact(tiny, saved):
    loaded = load_reference(saved)
    want, got = tiny.state_dict(), loaded.state_dict()
    assert list(got) == list(want)
    for key, value in want.items():
        assert got[key].dtype == value.dtype, key
        assert torch.equal(got[key], value), key
    assert loaded.config.official == tiny.config.official
    assert loaded.config.extension == tiny.config.extension
    assert _aliases(got) == _aliases(want) != {}
    assert Path(loaded.tokenizer_dir) == saved
    for name in TOKENIZER_FILES:
        assert (saved / name).read_bytes() == (Path(tiny.tokenizer_dir) / name).read_bytes(), name
    vocab = ChatTokenizer.from_directory(tiny.tokenizer_dir).vocab_size
    assert ChatTokenizer.from_directory(saved).vocab_size == vocab


def test_saved_folder_has_the_official_layout(tiny, saved):
    files = sorted(p.name for p in saved.iterdir())
    shard_files = [f for f in files if SHARD_RE.match(f)]
    assert set(files) == {"config.json", INDEX_NAME, *TOKENIZER_FILES, *shard_files}
    n = len(shard_files)
    assert n >= 2
    numbers = [SHARD_RE.match(f).groups() for f in shard_files]
    assert numbers == [(f"{k:05d}", f"{n:05d}") for k in range(1, n + 1)]
    index = json.loads((saved / INDEX_NAME).read_text())
    state = tiny.state_dict()
    assert set(index["weight_map"]) == set(state)  # every key, aliases included
    assert set(index["weight_map"].values()) == set(shard_files)
    aliases = _aliases(state)
    for name in shard_files:
        shard = torch.load(saved / name, weights_only=True)
        assert set(shard) == {k for k, v in index["weight_map"].items() if v == name}, name
        stored = sum(v.numel() * v.element_size() for k, v in shard.items() if k not in aliases)
        assert stored <= SHARD_BYTES or len(shard) == 1, (name, stored)
    # An alias is written beside its first key (one storage, one file), as transformers 4.34 does.
    where = index["weight_map"]
    assert {a: where[a] for a in aliases} == {a: where[f] for a, f in aliases.items()}
    unique_bytes = sum(v.numel() * v.element_size() for k, v in state.items() if k not in aliases)
    assert index["metadata"]["total_size"] == unique_bytes
    config = json.loads((saved / "config.json").read_text())
    assert config["architectures"] == ["VisionLLMv2Model"] and config["llm_config"]["hidden_size"] == 96
    assert [p.name for p in saved.parent.iterdir()] == ["tiny"]  # no temporary folder left behind


def test_saving_to_an_existing_folder_raises_and_touches_nothing(tiny, ckpt):
    before = sorted((p.name, p.stat().st_size) for p in ckpt.iterdir())
    with pytest.raises(FileExistsError, match="already exists"):
        save_official(tiny, ckpt)
    assert sorted((p.name, p.stat().st_size) for p in ckpt.iterdir()) == before
    assert [p.name for p in ckpt.parent.iterdir()] == ["ckpt"]


# --- LoRA at tiny size -------------------------------------------------------------------------------------


def _make_lora(folder: Path, base_layer: bool, seed: int = 7) -> dict[str, tuple]:
    """Rewrites a plain checkpoint as peft would save it; returns {plain weight key: (W, A, B)}."""
    g = torch.Generator().manual_seed(seed)
    adapters = {}
    shards = {}
    for name, shard in _shards(folder).items():
        out = {}
        for key, value in shard.items():
            if not key.startswith("llm."):
                out[key] = value
                continue
            module = key.removesuffix(".weight")
            wrapped = "llm.base_model.model." + key[4:]
            if any(module.endswith(t) for t in LORA_TARGETS) and ".layers." in module:
                a = torch.randn(LORA_RANK, value.shape[1], generator=g) * 0.1
                b = torch.randn(value.shape[0], LORA_RANK, generator=g) * 0.1
                adapters[key] = (value, a, b)
                stem = "llm.base_model.model." + module[4:]
                out[stem + (".base_layer.weight" if base_layer else ".weight")] = value
                out[stem + ".lora_A.default.weight"] = a
                out[stem + ".lora_B.default.weight"] = b
            else:
                out[wrapped] = value
        shards[name] = out
    _write(folder, shards)
    config = json.loads((folder / "config.json").read_text())
    config["use_llm_lora"] = True
    (folder / "config.json").write_text(json.dumps(config))
    return adapters


@pytest.mark.parametrize("base_layer", [False, True], ids=["peft-0.6.2", "peft-0.7-base_layer"])
def test_lora_checkpoint_loads_merged(tiny, ckpt, base_layer):
    adapters = _make_lora(ckpt, base_layer)
    index = _index(ckpt)
    assert sum(".lora_A.default." in k for k in index) == 3 * len(LORA_TARGETS)
    assert any(".base_layer." in k for k in index) == base_layer
    got = load_reference(ckpt).state_dict()
    want = tiny.state_dict()
    assert set(got) == set(want)
    for key, (w, a, b) in adapters.items():
        torch.testing.assert_close(got[key], w + 2.0 * (b @ a), rtol=0, atol=1e-6, msg=key)
        assert (got[key] - w).abs().max() > 0.05, key  # the adapter really moved the weight
    assert LORA_SCALING == 2.0
    for key in set(want) - set(adapters):
        assert torch.equal(got[key], want[key]), key


def test_lora_a_without_b_is_an_error(ckpt):
    _make_lora(ckpt, base_layer=False)
    key_b = "llm.base_model.model.model.layers.1.mlp.down_proj.lora_B.default.weight"
    key_a = key_b.replace("lora_B", "lora_A")
    shard = _shard_of(ckpt, key_b)
    shards = _shards(ckpt)
    del shards[shard][key_b]
    _write(ckpt, shards)
    with pytest.raises(CheckpointError) as e:
        load_reference(ckpt)
    msg = str(e.value)
    assert shard in msg and f"'{key_a}'" in msg and "no matching lora_B" in msg, msg


# --- every bad checkpoint names its fault ------------------------------------------------------------------


def _load_error(folder: Path, kind: type[Exception] = CheckpointError) -> str:
    with pytest.raises(kind) as e:
        load_reference(folder)
    return str(e.value)


def test_missing_shard_file(ckpt):
    name = sorted(set(_index(ckpt).values()))[-1]
    (ckpt / name).unlink()
    msg = _load_error(ckpt)
    assert name in msg and "missing" in msg, msg


def test_truncated_shard(ckpt):
    name = sorted(set(_index(ckpt).values()))[0]
    data = (ckpt / name).read_bytes()
    (ckpt / name).write_bytes(data[: len(data) // 2])
    msg = _load_error(ckpt)
    assert str(ckpt / name) in msg and "cannot read checkpoint shard" in msg, msg


def test_a_missing_key(ckpt):
    key = "llm.model.norm.weight"
    shards = _shards(ckpt)
    del shards[_shard_of(ckpt, key)][key]
    _write(ckpt, shards)
    msg = _load_error(ckpt)
    assert str(ckpt) in msg and "1 key(s) missing" in msg and f"'{key}'" in msg, msg


def test_a_missing_alias_is_filled_from_its_group(tiny, ckpt):
    # safetensors saving drops alias keys; the tensor is still there under its first name.
    aliases = _aliases(tiny.state_dict())
    alias = next(iter(aliases))
    shards = _shards(ckpt)
    del shards[_shard_of(ckpt, alias)][alias]
    _write(ckpt, shards)
    got = load_reference(ckpt).state_dict()
    assert torch.equal(got[alias], tiny.state_dict()[alias])
    # ... but not when every key of the group is gone.
    group = [alias, aliases[alias], *[a for a, f in aliases.items() if f == aliases[alias] and a != alias]]
    for key in group[1:]:
        del shards[_shard_of(ckpt, key)][key]
    _write(ckpt, shards)
    msg = _load_error(ckpt)
    assert "missing" in msg and f"'{aliases[alias]}'" in msg, msg


def test_an_unexpected_key(ckpt):
    key = "llm.model.extra_head.weight"
    shards = _shards(ckpt)
    name = sorted(shards)[0]
    shards[name][key] = torch.zeros(3, 3)
    _write(ckpt, shards)
    msg = _load_error(ckpt)
    assert "1 unexpected key(s)" in msg and f"'{key}' (in {name})" in msg, msg


def test_a_wrong_shape_names_both_shapes(ckpt):
    key = "vl_bridge.0.weight"
    name = _shard_of(ckpt, key)
    shards = _shards(ckpt)
    shards[name][key] = torch.zeros(97, 48)
    _write(ckpt, shards)
    msg = _load_error(ckpt)
    assert msg.startswith(name) and f"'{key}'" in msg and "(97, 48)" in msg and "(96, 48)" in msg, msg


def test_an_unknown_config_field(ckpt):
    config = json.loads((ckpt / "config.json").read_text())
    config["frobnicate_level"] = 3
    (ckpt / "config.json").write_text(json.dumps(config))
    msg = _load_error(ckpt, ConfigError)
    assert str(ckpt / "config.json") in msg and "frobnicate_level" in msg, msg


@pytest.mark.parametrize(
    "key, value, expected",
    [
        ("guidance_scale", 0, "must be a number > 0, got 0"),
        ("guidance_scale", "7.5", "must be a number > 0, got '7.5'"),
        ("diffusion_steps", 0, "must be an int in [1, 1000], got 0"),
        ("diffusion_steps", 20.0, "must be an int in [1, 1000], got 20.0"),
        ("diffusion_steps", True, "must be an int in [1, 1000], got True"),
        ("diffusion_steps", None, "must be an int in [1, 1000], got None"),
    ],
)
def test_a_bad_diffusion_setting_in_the_extension(ckpt, key, value, expected):
    config = json.loads((ckpt / "config.json").read_text())
    config.setdefault(EXTENSION_KEY, {})[key] = value
    (ckpt / "config.json").write_text(json.dumps(config))
    msg = _load_error(ckpt, ConfigError)
    assert str(ckpt / "config.json") in msg and f"'{EXTENSION_KEY}.{key}' {expected}" in msg, msg


def test_config_json_that_is_not_json(ckpt):
    (ckpt / "config.json").write_text('{"vis_encoder_config": {')
    msg = _load_error(ckpt, ConfigError)
    assert str(ckpt / "config.json") in msg and "not valid JSON" in msg, msg


def test_an_index_that_is_not_json(ckpt):
    (ckpt / INDEX_NAME).write_text("weight_map = {}")
    msg = _load_error(ckpt)
    assert str(ckpt / INDEX_NAME) in msg and "not a valid shard index" in msg, msg


@pytest.mark.parametrize(
    "value, kind",
    [(3, "int"), ({"a": torch.zeros(2)}, "dict"), ("text", "str")],
    ids=["int", "nested", "str"],
)
def test_a_shard_holding_a_non_tensor(ckpt, value, kind):
    shards = _shards(ckpt)
    name = sorted(shards)[-1]
    shards[name]["odd_entry"] = value
    _write(ckpt, shards)
    msg = _load_error(ckpt)
    assert str(ckpt / name) in msg and f"key 'odd_entry' holds a {kind}, not a tensor" in msg, msg


def _evil_restore(marker: str, tensors: dict) -> dict:
    Path(marker).write_text("code ran while loading")
    return tensors


class _Evil:
    """Unpickles into a valid shard, running `_evil_restore` first: only a full unpickler would do that."""

    def __init__(self, marker: Path, tensors: dict):
        self.marker, self.tensors = str(marker), tensors

    def __reduce__(self):
        return _evil_restore, (self.marker, self.tensors)


def test_a_pickled_object_is_refused_without_running_it(ckpt, tmp_path):
    name = sorted(set(_index(ckpt).values()))[0]
    marker = tmp_path / "marker"
    tensors = torch.load(ckpt / name, weights_only=True)
    torch.save(_Evil(marker, tensors), ckpt / name)
    # The file is a working exploit: a plain unpickler runs the code and gets a valid shard back.
    assert set(torch.load(ckpt / name, weights_only=False)) == set(tensors) and marker.exists()
    marker.unlink()
    msg = _load_error(ckpt)
    assert str(ckpt / name) in msg and "cannot read checkpoint shard" in msg and "_evil_restore" in msg, msg
    assert not marker.exists()


def test_an_index_key_its_shard_lacks(ckpt):
    key = "vl_bridge.2.bias"
    name = _shard_of(ckpt, key)
    index = json.loads((ckpt / INDEX_NAME).read_text())
    shards = _shards(ckpt)
    del shards[name][key]
    for n, shard in shards.items():
        torch.save(shard, ckpt / n)  # the index still lists the key
    msg = _load_error(ckpt)
    assert str(ckpt / name) in msg and f"'{key}' is listed in {INDEX_NAME} but not in the shard" in msg, msg
    # The key in another shard than the index says is just as wrong.
    other = next(n for n in shards if n != name)
    shards[other][key] = torch.zeros(96)
    torch.save(shards[other], ckpt / other)
    (ckpt / INDEX_NAME).write_text(json.dumps(index))
    msg = _load_error(ckpt)
    assert str(ckpt / other) in msg and f"'{key}'" in msg and f"lists it in {name}" in msg, msg


def test_a_key_in_two_shards(ckpt):
    key = "vl_bridge.2.bias"
    name = _shard_of(ckpt, key)
    shards = _shards(ckpt)
    other = next(n for n in shards if n != name)
    torch.save(dict(shards[other], **{key: shards[name][key]}), ckpt / other)
    msg = _load_error(ckpt)
    assert f"'{key}'" in msg and name in msg and other in msg, msg


def test_aliased_keys_with_different_values(tiny, ckpt):
    alias, first = next(iter(_aliases(tiny.state_dict()).items()))
    name = _shard_of(ckpt, alias)
    shards = _shards(ckpt)
    shards[name][alias] = shards[name][alias].clone() + 1  # a clone: the loaded pair shares storage
    _write(ckpt, shards)
    msg = _load_error(ckpt)
    assert f"'{first}'" in msg and f"'{alias}'" in msg and "different values" in msg and name in msg, msg
