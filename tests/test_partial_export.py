"""Partial checkpoint loading (`load_reference_parts`) and the component-by-component export built on it.

A tiny-random checkpoint is saved in the official layout (several shards); loading one component must give
exactly the weights of a full load for that component and meta tensors everywhere else, open only the shards
that hold its keys, and fail on a missing needed key with a message naming it. Exporting the checkpoint
folder (component by component, the default for a folder) must give validated graphs, the embedding tables
and a manifest the runtime's parser accepts.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from visionllm_edge import contract
from visionllm_edge.export.checkpoint import (
    COMPONENT_PARTS,
    INDEX_NAME,
    CheckpointError,
    load_reference,
    load_reference_parts,
    save_official,
)

#: Small enough that tiny-random (about 29 MB) is written as several shards.
SHARD_BYTES = 6 << 20


@pytest.fixture(scope="module")
def full_model():
    return load_reference("tiny-random")


@pytest.fixture(scope="module")
def checkpoint(full_model, tmp_path_factory) -> Path:
    return save_official(full_model, tmp_path_factory.mktemp("partial") / "ckpt", max_shard_bytes=SHARD_BYTES)


def _copy(checkpoint: Path, tmp_path: Path) -> Path:
    target = tmp_path / "ckpt"
    shutil.copytree(checkpoint, target)
    return target


def test_vision_part_equals_full_load_and_the_rest_is_meta(full_model, checkpoint):
    part = load_reference_parts(checkpoint, ["vision"])
    assert part.loaded_parts == COMPONENT_PARTS["vision"]
    full = full_model.state_dict()
    state = part.state_dict()
    assert state.keys() == full.keys()
    loaded = [k for k in state if k.split(".")[0] in ("vis_encoder", "vl_bridge")]
    assert loaded
    for key, value in state.items():
        if key in loaded:
            assert value.device.type == "cpu", key
            assert value.dtype == full[key].dtype, key
            assert torch.equal(value, full[key]), key
        else:
            assert value.device.type == "meta", key
    # Only the shards that hold vision keys were opened, memory-mapped.
    weight_map = json.loads((checkpoint / INDEX_NAME).read_text())["weight_map"]
    assert set(part.shard_modes) == {weight_map[k] for k in loaded}
    assert len(set(weight_map.values())) > len(part.shard_modes)
    assert set(part.shard_modes.values()) == {"mmap"}
    # Buffers computed at construction (not in the state dict) are the full model's.
    np.testing.assert_array_equal(
        part.vis_encoder.vision_model.embeddings.position_ids.numpy(),
        full_model.vis_encoder.vision_model.embeddings.position_ids.numpy(),
    )
    size = part.config.image_size
    pixels = torch.randn(2, 3, size, size, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.equal(part.encode_image(pixels).projected, full_model.encode_image(pixels).projected)


def test_no_parts_loads_no_weights(checkpoint):
    skeleton = load_reference_parts(checkpoint, [])
    assert skeleton.shard_modes == {}
    assert all(t.device.type == "meta" for t in skeleton.state_dict().values())
    assert skeleton.tokenizer_dir == checkpoint


def test_missing_needed_key_is_named(checkpoint, tmp_path):
    folder = _copy(checkpoint, tmp_path)
    key = "vl_bridge.2.weight"
    weight_map = json.loads((folder / INDEX_NAME).read_text())["weight_map"]
    shard = folder / weight_map[key]
    tensors = torch.load(shard, weights_only=True)
    del tensors[key]
    torch.save(tensors, shard)
    # Listed in the index but absent from its shard: the error names the key and the shard.
    with pytest.raises(CheckpointError, match=rf"{shard.name}.*'{key}'") as e:
        load_reference_parts(folder, ["vision"])
    assert "listed in" in str(e.value)
    # Absent from the index as well: the error names the key and the index.
    index = json.loads((folder / INDEX_NAME).read_text())
    del index["weight_map"][key]
    (folder / INDEX_NAME).write_text(json.dumps(index))
    with pytest.raises(CheckpointError, match=rf"{INDEX_NAME}: needed key '{key}'"):
        load_reference_parts(folder, ["vision"])
    # A component that does not need the key still loads.
    load_reference_parts(folder, ["det"])


def test_unknown_part_is_an_error(checkpoint):
    with pytest.raises(CheckpointError, match="no 'bert'"):
        load_reference_parts(checkpoint, ["bert"])


def test_component_by_component_export(full_model, checkpoint, tmp_path):
    from safetensors.numpy import load_file
    from visionllm_edge.export.exporter import export
    from visionllm_edge.manifest import load_manifest

    out = tmp_path / "artifact"
    report = export(checkpoint, out, components=["vision", "llm"], progress=False)
    assert report.validation["passed"]
    assert set(report.validation["graphs"]) == {"vision", "llm"}
    assert all(g["passed"] for g in report.validation["graphs"].values())
    manifest = load_manifest(out)
    assert set(manifest.graphs) == {"vision", "llm"}
    assert (out / "vision.onnx").is_file() and (out / "llm.onnx").is_file()
    tables = load_file(str(out / contract.EMBEDDINGS_FILE))
    token_table = full_model.llm.model.embed_tokens.weight.numpy()
    np.testing.assert_array_equal(tables["token_embeddings"], token_table)
    np.testing.assert_array_equal(tables["queries.det"], full_model.emb_embeddings_det.weight.numpy())
    # A request that routes to a decoder the artifact lacks names the missing graph.
    from visionllm_edge import Pipeline

    pipe = Pipeline.load(out)
    with pytest.raises(ValueError, match="this artifact has no 'det' graph"):
        pipe.detect(np.zeros((64, 64, 3), np.uint8), ["circle"])


def test_export_without_llm_still_writes_the_embeddings(full_model, checkpoint, tmp_path):
    from safetensors.numpy import load_file
    from visionllm_edge.export.exporter import export
    from visionllm_edge.manifest import load_manifest

    out = tmp_path / "vision-only"
    export(checkpoint, out, components=["vision"], validate=False, progress=False)
    assert set(load_manifest(out).graphs) == {"vision"}
    tables = load_file(str(out / contract.EMBEDDINGS_FILE))
    token_table = full_model.llm.model.embed_tokens.weight.numpy()
    np.testing.assert_array_equal(tables["token_embeddings"], token_table)
    np.testing.assert_array_equal(tables["queries.gen"], full_model.emb_embeddings_gen.weight.numpy())


def test_lora_checkpoint_merges_as_the_full_load(full_model, checkpoint, tmp_path):
    """peft-wrapped LLM keys with adapters: the partial LLM is bit-identical to `load_reference`'s merge."""
    folder = _copy(checkpoint, tmp_path)
    index = json.loads((folder / INDEX_NAME).read_text())
    g = torch.Generator().manual_seed(3)
    shards: dict[str, dict] = {}
    weight_map = {}
    for name in sorted(set(index["weight_map"].values())):
        out = {}
        for key, value in torch.load(folder / name, weights_only=True).items():
            if not key.startswith("llm."):
                out[key] = value
                continue
            stem = "llm.base_model.model." + key[4:].removesuffix(".weight")
            if key.endswith(("self_attn.q_proj.weight", "mlp.down_proj.weight")):
                out[stem + ".weight"] = value
                out[stem + ".lora_A.default.weight"] = torch.randn(32, value.shape[1], generator=g) * 0.1
                out[stem + ".lora_B.default.weight"] = torch.randn(value.shape[0], 32, generator=g) * 0.1
            else:
                out["llm.base_model.model." + key[4:]] = value
        shards[name] = out
        weight_map.update({k: name for k in out})
    for name, out in shards.items():
        torch.save(out, folder / name)
    (folder / INDEX_NAME).write_text(json.dumps({"metadata": index["metadata"], "weight_map": weight_map}))
    config = json.loads((folder / "config.json").read_text())
    config["use_llm_lora"] = True
    (folder / "config.json").write_text(json.dumps(config))
    want = load_reference(folder).state_dict()
    got = load_reference_parts(folder, ["llm"]).state_dict()
    llm_keys = [k for k in want if k.startswith("llm.")]
    moved = "llm.model.layers.0.self_attn.q_proj.weight"
    assert not torch.equal(want[moved], full_model.state_dict()[moved])  # the adapters were merged
    for key in llm_keys:
        assert torch.equal(got[key], want[key]), key


def test_single_file_checkpoints(full_model, tmp_path):
    """A safetensors file is read tensor by tensor; a legacy (pre-zip) `.bin` cannot be mapped and is read."""
    from safetensors.torch import save_file

    state = full_model.state_dict()
    seen: set = set()
    unique = {}
    for key, value in state.items():  # safetensors refuses shared tensors; aliases may be absent
        if value.data_ptr() not in seen:
            seen.add(value.data_ptr())
            unique[key] = value.contiguous()
    folders = {"safetensors": tmp_path / "st", "read": tmp_path / "legacy"}
    for mode, folder in folders.items():
        folder.mkdir()
        shutil.copy(full_model.tokenizer_dir / "tokenizer.model", folder)
        (folder / "config.json").write_text(json.dumps(full_model.config.to_dict()))
        if mode == "safetensors":
            save_file(unique, str(folder / "model.safetensors"))
        else:
            torch.save(state, folder / "pytorch_model.bin", _use_new_zipfile_serialization=False)
        part = load_reference_parts(folder, ["vision"])
        file = "model.safetensors" if mode == "safetensors" else "pytorch_model.bin"
        assert part.shard_modes == {file: mode}
        got = part.state_dict()
        for key in got:
            if key.startswith(("vis_encoder.", "vl_bridge.")):
                assert torch.equal(got[key], state[key]), key
            else:
                assert got[key].device.type == "meta", key
