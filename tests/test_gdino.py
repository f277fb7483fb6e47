"""The object decoder (OV Grounding DINO + mask head) against the official golden outputs and key lists."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from visionllm_edge.contract import compare
from visionllm_edge.export.models.gdino import GroundingDinoOV
from visionllm_edge.export.models.swin import SwinBackbone, SwinSettings

GOLDEN = Path(__file__).parent / "fixtures" / "golden_dev"
TINY = GOLDEN / "tiny_official"
REPO = Path(__file__).resolve().parents[1]
KEYS_7B = REPO.parent / "shared" / "data" / "visionllmv2-7b.keys.json"
CONFIG_7B = REPO / "export" / "data" / "visionllmv2-7b.config.json"
INPUT_NAMES = ("pixel_values", "pixel_mask", "text_query", "text_query_masks")
OUTPUT_NAMES = ("logits", "pred_boxes", "pred_masks")


def _tiny_config() -> dict:
    return json.loads((TINY / "config.json").read_text())["gdino_config"]


def _tiny_gdino_state_dict() -> dict[str, torch.Tensor]:
    state = {}
    for shard in sorted(TINY.glob("pytorch_model-*-of-*.bin")):
        tensors = torch.load(shard, map_location="cpu", weights_only=True)
        state.update({k[len("gdino.") :]: v for k, v in tensors.items() if k.startswith("gdino.")})
    return state


@pytest.fixture(scope="module")
def golden() -> dict[str, np.ndarray]:
    with np.load(GOLDEN / "golden_gdino.npz") as data:
        return dict(data)


@pytest.fixture(scope="module")
def model() -> GroundingDinoOV:
    module = GroundingDinoOV(_tiny_config()).eval()
    module.load_state_dict(_tiny_gdino_state_dict(), strict=True)
    return module


def _inputs(golden: dict, prefix: str = "") -> list[torch.Tensor]:
    return [torch.from_numpy(golden[prefix + name]) for name in INPUT_NAMES]


def _assert_matches(outputs, golden: dict, prefix: str = "") -> None:
    for name, got in zip(OUTPUT_NAMES, outputs):
        mismatch = compare(got.numpy(), golden[prefix + name])
        assert mismatch is None, f"{prefix}{name}: {mismatch}"


def test_tiny_checkpoint_loads_strictly():
    module = GroundingDinoOV(_tiny_config())
    state = _tiny_gdino_state_dict()
    assert list(module.state_dict()) == list(state)
    result = module.load_state_dict(state, strict=True)
    assert not result.missing_keys and not result.unexpected_keys


def test_patch2query_mean(model, golden):
    with torch.no_grad():
        got = model.encode_text_queries(torch.from_numpy(golden["text_query"]))
    assert compare(got.numpy(), golden["patch2query_mean"]) is None


@pytest.mark.parametrize("prefix", ["", "e2e_"], ids=["direct_K4", "end_to_end_K7"])
def test_matches_official_golden(model, golden, prefix):
    with torch.no_grad():
        outputs = model(*_inputs(golden, prefix))
    _assert_matches(outputs, golden, prefix)
    num_valid = int(golden[prefix + "text_query_masks"].sum())
    assert (
        torch.isinf(outputs[0][..., num_valid:]).all() and torch.isfinite(outputs[0][..., :num_valid]).all()
    )


def test_batch_with_padded_text_queries(model, golden):
    """Two images in one batch, the first with K=4 groups padded to 7: each row equals its own golden."""
    direct, e2e = _inputs(golden), _inputs(golden, "e2e_")
    extra = e2e[2].shape[1] - direct[2].shape[1]
    direct[2] = torch.cat([direct[2], torch.randn(1, extra, *direct[2].shape[2:])], 1)
    direct[3] = torch.cat([direct[3], torch.zeros(1, extra, dtype=torch.bool)], 1)
    batch = [torch.cat([a, b]) for a, b in zip(direct, e2e)]
    with torch.no_grad():
        outputs = model(*batch)
    _assert_matches([o[:1] for o in outputs], golden)
    _assert_matches([o[1:] for o in outputs], golden, "e2e_")


def test_mask_query_indices_selects_rows(model, golden):
    inputs = _inputs(golden)
    indices = torch.tensor([[7, 0, 19, 3, 7]])
    with torch.no_grad():
        full = model(*inputs)
        chosen = model(*inputs, mask_query_indices=indices)
    assert torch.equal(chosen[0], full[0]) and torch.equal(chosen[1], full[1])
    assert chosen[2].shape == (1, 5, 24, 16)
    torch.testing.assert_close(chosen[2], full[2][:, indices[0]], rtol=1e-6, atol=1e-6)


def test_no_state_depends_on_input_size(model, golden):
    """A large image, then the golden one, then the large one again through one instance."""
    generator = torch.Generator().manual_seed(0)
    large = [
        torch.randn(1, 3, 256, 320, generator=generator),
        torch.ones(1, 256, 320, dtype=torch.bool),
        torch.randn(1, 3, 4, 96, generator=generator),
        torch.ones(1, 3, dtype=torch.bool),
    ]
    large[1][:, 200:, :] = False
    with torch.no_grad():
        first = model(*large)
        small = model(*_inputs(golden))
        third = model(*large)
    for a, b in zip(first, third):
        assert torch.equal(a, b)
    assert first[2].shape == (1, 20, 64, 80)
    _assert_matches(small, golden)


def test_swin_matches_transformers_swin_backbone():
    """Our Swin equals transformers' SwinBackbone (which always partitions: window and shift never shrink)."""
    transformers = pytest.importorskip("transformers")
    config = dict(_tiny_config()["backbone_config"])
    reference = transformers.SwinBackbone(transformers.SwinConfig(**config)).eval()
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for param in reference.parameters():
            param.copy_(torch.randn(param.shape, generator=generator) * 0.3)
    ours = SwinBackbone(SwinSettings.from_dict(config)).eval()
    ours.load_state_dict(reference.state_dict(), strict=True)
    for height, width in [(96, 64), (64, 32), (160, 224)]:
        pixels = torch.randn(2, 3, height, width, generator=generator)
        with torch.no_grad():
            want = reference(pixels).feature_maps
            got = ours(pixels)
        for a, b in zip(got, want):
            torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6)


def test_7b_keys_shapes_and_aliases_on_meta():
    if not KEYS_7B.exists():
        pytest.skip(f"7B key list not found at {KEYS_7B}")
    listing = json.loads(KEYS_7B.read_text())
    want = {k[len("gdino.") :]: v for k, v in listing["tensors"].items() if k.startswith("gdino.")}
    config = json.loads(CONFIG_7B.read_text())["gdino_config"]
    with torch.device("meta"):
        module = GroundingDinoOV(config)
    state = module.state_dict()
    assert len(want) == 843
    assert list(state) == list(want)
    for key, tensor in state.items():
        assert list(tensor.shape) == want[key]["shape"], key
        assert str(tensor.dtype).removeprefix("torch.") == want[key]["dtype"], key
    tied = {
        a[len("gdino.") :]: b[len("gdino.") :] for a, b in listing["tied"].items() if a.startswith("gdino.")
    }
    assert len(tied) == 96
    params = dict(module.named_parameters(remove_duplicate=False))
    assert all(params[alias] is params[first] for alias, first in tied.items())


@pytest.mark.parametrize(
    ("index", "value", "message"),
    [
        (0, torch.zeros(3, 96, 64), "pixel_values: expected shape [B, 3, H, W]"),
        (0, torch.zeros(1, 3, 90, 64), "pixel_values: expected H and W multiples of 32"),
        (1, torch.ones(1, 64, 96, dtype=torch.bool), "pixel_mask: expected shape [1, 96, 64]"),
        (2, torch.zeros(1, 4, 4, 95), "text_query: expected shape [1, K, N, 96]"),
        (2, torch.zeros(1, 257, 4, 96), "text_query: expected 1 <= K <= max_text_len=256"),
        (3, torch.ones(1, 5, dtype=torch.bool), "text_query_masks: expected shape [1, 4]"),
    ],
)
def test_bad_inputs_name_the_argument(model, golden, index, value, message):
    inputs = _inputs(golden)
    inputs[index] = value
    with pytest.raises(ValueError, match=message.replace("[", r"\[").replace("]", r"\]")):
        model(*inputs)


def test_bad_mask_query_indices(model, golden):
    with pytest.raises(ValueError, match="mask_query_indices: expected dtype torch.int64"):
        model(*_inputs(golden), mask_query_indices=torch.zeros(1, 2, dtype=torch.int32))
    with pytest.raises(ValueError, match="mask_query_indices: expected shape"):
        model(*_inputs(golden), mask_query_indices=torch.zeros(2, dtype=torch.int64))


def test_image_with_fewer_tokens_than_queries_is_rejected(golden):
    module = GroundingDinoOV({**_tiny_config(), "num_queries": 100}).eval()
    _, _, text, text_valid = _inputs(golden)
    with pytest.raises(ValueError, match="at least num_queries=100 encoder tokens, got 22 for H=32, W=32"):
        module(torch.zeros(1, 3, 32, 32), torch.ones(1, 32, 32, dtype=torch.bool), text, text_valid)


def test_unsupported_config_is_rejected():
    config = _tiny_config()
    with pytest.raises(ValueError, match="gdino_config.two_stage=False is not supported"):
        GroundingDinoOV({**config, "two_stage": False})
    with pytest.raises(ValueError, match="backbone_config.model_type must be 'swin'"):
        GroundingDinoOV({**config, "backbone_config": {**config["backbone_config"], "model_type": "resnet"}})
