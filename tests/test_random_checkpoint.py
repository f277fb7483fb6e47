"""`save_random_official`: a random-weight checkpoint written shard by shard, never holding the model.

At `tiny-random` size: the folder loads through `load_reference`'s strict checks (every key, shape and alias),
every floating tensor is in the asked dtype, the index's total is the bytes of the distinct tensors, the
values follow the documented rule and the seed, and a shard's tensors are gone before the next shard is
drawn (what lets the 7B's 19 GB be written on a 23 GB machine).
"""

from __future__ import annotations

import gc
import json
import weakref
from pathlib import Path

import pytest
import torch
from visionllm_edge.export import checkpoint
from visionllm_edge.export.checkpoint import INDEX_NAME, load_reference, save_random_official
from visionllm_edge.export.config import named_config
from visionllm_edge.export.model import build_model

#: Small enough that tiny-random (about 12 MB in float16) is written as several shards.
SHARD_BYTES = 2 << 20


def _read(folder: Path) -> dict[str, torch.Tensor]:
    out = {}
    for name in sorted(set(json.loads((folder / INDEX_NAME).read_text())["weight_map"].values())):
        out.update(torch.load(folder / name, weights_only=True))
    return out


@pytest.fixture(scope="module")
def written(tmp_path_factory) -> Path:
    return save_random_official("tiny-random", tmp_path_factory.mktemp("rand") / "ck", max_shard_bytes=SHARD_BYTES)


def test_loads_with_every_key_and_alias(written):
    model = load_reference(written, dtype=torch.float16)
    expected = build_model(named_config("tiny-random"), device="meta").state_dict(keep_vars=True)
    state = model.state_dict()
    assert state.keys() == expected.keys()
    for key, value in state.items():
        assert tuple(value.shape) == tuple(expected[key].shape), key
    stored = _read(written)
    assert stored.keys() == expected.keys()
    # Each alias group of the meta model is one tensor in the files.
    groups: dict[int, list[str]] = {}
    for key, value in expected.items():
        groups.setdefault(id(value), []).append(key)
    aliased = [keys for keys in groups.values() if len(keys) > 1]
    assert aliased, "tiny-random has shared heads; the check below would prove nothing"
    for keys in aliased:
        assert len({stored[k].data_ptr() for k in keys}) == 1, keys


def test_dtype_shards_and_total(written):
    stored = _read(written)
    index = json.loads((written / INDEX_NAME).read_text())
    assert len(set(index["weight_map"].values())) > 1
    for key, value in stored.items():
        if value.is_floating_point():
            assert value.dtype == torch.float16, key
    distinct = {v.data_ptr(): v for v in stored.values()}.values()
    assert index["metadata"]["total_size"] == sum(v.numel() * v.element_size() for v in distinct)
    for name in set(index["weight_map"].values()):
        shard = torch.load(written / name, weights_only=True)
        size = sum(v.numel() * v.element_size() for v in {t.data_ptr(): t for t in shard.values()}.values())
        assert size <= SHARD_BYTES or len({t.data_ptr() for t in shard.values()}) == 1, name


def test_values_follow_the_rule_and_the_seed(written, tmp_path):
    stored = _read(written)
    params = dict(build_model(named_config("tiny-random"), device="meta").named_parameters())
    big = max((k for k in params if params[k].dim() >= 2), key=lambda k: params[k].numel())
    want = 0.5 / params[big][0].numel() ** 0.5
    got = stored[big].float()
    assert abs(got.mean().item()) < 0.1 * want
    assert abs(got.std().item() / want - 1) < 0.05
    norms = [k for k, p in params.items() if p.dim() == 1 and k.endswith("weight")]
    scales = torch.cat([stored[k].float() for k in norms])
    assert abs(scales.mean().item() - 1) < 0.02 and abs(scales.std().item() / 0.1 - 1) < 0.1

    same = _read(save_random_official("tiny-random", tmp_path / "same", max_shard_bytes=SHARD_BYTES))
    other = _read(save_random_official("tiny-random", tmp_path / "other", seed=1, max_shard_bytes=SHARD_BYTES))
    assert all(torch.equal(same[k], v) for k, v in stored.items())
    assert not torch.equal(other[big], stored[big])


def test_one_shard_alive_at_a_time(tmp_path, monkeypatch):
    saved = torch.save
    previous: list[weakref.ref] = []
    leaked: list[int] = []

    def save(obj, path, *args, **kwargs):
        gc.collect()
        leaked.append(sum(ref() is not None for ref in previous))
        previous[:] = [weakref.ref(t) for t in obj.values() if t.is_floating_point()]
        return saved(obj, path, *args, **kwargs)

    monkeypatch.setattr(checkpoint.torch, "save", save)
    save_random_official("tiny-random", tmp_path / "ck", max_shard_bytes=SHARD_BYTES)
    assert len(leaked) > 2 and leaked == [0] * len(leaked)


def test_refuses_an_existing_folder(tmp_path):
    (tmp_path / "ck").mkdir()
    with pytest.raises(FileExistsError, match="ck: already exists"):
        save_random_official("tiny-random", tmp_path / "ck")
