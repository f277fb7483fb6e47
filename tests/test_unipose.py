"""Parity of the UniPose keypoint decoder reference with the official GPU golden set.

The golden (`../shared/data/golden_dev/golden_unipose`, beside the repo root) was produced by the official
code with its CUDA deformable-attention op; its README §6 gives the expected CPU float32 tolerance. The 7B key
test needs only `../shared/data/visionllmv2-7b.keys.json` and the repo's 7B config.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from visionllm_edge.contract import compare  # noqa: E402
from visionllm_edge.export.models.unipose import (  # noqa: E402
    UniPose,
    load_unipose_component,
    pose_self_attention_mask,
    swin_sizes_from_state_dict,
)

REPO = Path(__file__).resolve().parents[1]
SHARED = Path(__file__).resolve().parents[2] / "shared/data"
GOLDEN = SHARED / "golden_dev/golden_unipose"
KEYS_7B = SHARED / "visionllmv2-7b.keys.json"
CONFIG_7B = REPO / "export/data/visionllmv2-7b.config.json"
INPUTS = (
    "pixel_values",
    "pixel_padding_mask",
    "obj_querys",
    "obj_query_masks",
    "kpt_querys",
    "kpt_query_masks",
)
OUTPUTS = ("pred_logits", "pred_boxes", "pred_keypoints")
TINY_SWIN = {"embed_dim": 12, "depths": [2, 2, 2, 2], "num_heads": [1, 2, 4, 4], "window_size": 7}

needs_golden = pytest.mark.skipif(
    not (GOLDEN / "golden_unipose.npz").is_file(), reason=f"UniPose golden set not found at {GOLDEN}"
)
needs_7b_keys = pytest.mark.skipif(not KEYS_7B.is_file(), reason=f"7B key list not found at {KEYS_7B}")


def _check(got, want, name: str, atol: float = 1e-4) -> None:
    got = got.detach().cpu().numpy() if isinstance(got, torch.Tensor) else np.asarray(got)
    mismatch = compare(got, want, atol=atol, rtol=1e-4)
    assert mismatch is None, f"{name}: {mismatch}"


@pytest.fixture(scope="module")
def golden():
    return np.load(GOLDEN / "golden_unipose.npz")


@pytest.fixture(scope="module")
def model():
    return load_unipose_component(GOLDEN)


@pytest.fixture(scope="module")
def inputs(golden):
    return [torch.from_numpy(golden[k]) for k in INPUTS]


@pytest.fixture(scope="module")
def run(model, inputs):
    with torch.no_grad():
        return model.forward_with_intermediates(*inputs)


def _config_7b() -> dict:
    return json.loads(CONFIG_7B.read_text())["unipose_config"]


# --- outputs ------------------------------------------------------------------------------------------


@needs_golden
def test_forward_matches_golden(model, inputs, golden, run):
    with torch.no_grad():
        outs = model(*inputs)
    assert isinstance(outs, tuple) and len(outs) == 3
    for name, got in zip(OUTPUTS, outs):
        assert got.dtype == torch.float32
        _check(got, golden[name], name)
        # forward() skips the unused last reference update; the outputs must not change.
        assert torch.equal(got, run[name]), name
    logits = outs[0].numpy()
    assert np.array_equal(np.isneginf(logits), np.isneginf(golden["pred_logits"]))
    assert np.isneginf(logits).sum() == 50 * 99


@needs_golden
def test_keypoint_layout(run, golden):
    kpts = run["pred_keypoints"][0]
    assert kpts.shape == (50, 204)
    vis = torch.full((), 1.0).sigmoid()
    assert torch.all(kpts[:, 136:] == vis)


# --- intermediates ------------------------------------------------------------------------------------

_INTERMEDIATES = [
    ("enc_memory", "inter_enc_memory"),
    ("enc_memory_text", "inter_enc_memory_text"),
    ("enc_key_padding_mask", "inter_enc_key_padding_mask"),
    ("enc_valid_ratios", "inter_enc_valid_ratios"),
    ("enc_spatial_shapes", "inter_enc_spatial_shapes"),
    ("text_position_ids", "inter_enc_text_position_ids"),
    ("topk0_input", "inter_topk0_input"),
    ("topk0_indices", "inter_topk0_indices"),
    ("enc_hs_topk", "inter_enc_hs_topk"),
    ("enc_ref_topk", "inter_enc_ref_topk"),
    ("init_box_proposal", "inter_init_box_proposal"),
    ("kpt_mask", "inter_kpt_mask"),
]


@needs_golden
@pytest.mark.parametrize(("ours", "theirs"), _INTERMEDIATES, ids=[o for o, _ in _INTERMEDIATES])
def test_encoder_intermediates(run, golden, ours, theirs):
    _check(run[ours], golden[theirs], ours)


@needs_golden
def test_backbone_and_projection_intermediates(run, golden):
    for i in range(3):
        _check(run["backbone_feats"][i], golden[f"inter_backbone_feat{i}"], f"backbone_feat{i}")
        _check(run["backbone_masks"][i], golden[f"inter_backbone_mask{i}"], f"backbone_mask{i}")
        _check(run["backbone_pos"][i], golden[f"inter_backbone_pos{i}"], f"backbone_pos{i}")
    for i in range(4):
        _check(run["srcs"][i], golden[f"inter_src{i}"], f"src{i}")
    n_obj = int(golden["obj_query_masks"].sum())
    _check(run["obj_proj_mean"][:, :n_obj], golden["inter_obj_proj_mean"], "obj_proj_mean")
    n_kpt = int(golden["kpt_query_masks"].sum())
    _check(run["kpt_embed"][0, :n_kpt], golden["inter_kpt_proj_mean"], "kpt_proj_mean")
    assert torch.all(run["kpt_embed"][0, n_kpt:] == 0)


@needs_golden
def test_decoder_intermediates(run, golden):
    _check(run["dec_hs"][0], golden["inter_dec_hs0"], "dec_hs0")
    _check(run["dec_hs"][1], golden["inter_dec_hs1"], "dec_hs1")
    _check(run["dec_hs"][2][:, ::69], golden["inter_dec_hs2_box_rows"], "dec_hs2_box_rows")
    assert len(run["dec_ref"]) == 4
    for i, ref in enumerate(run["dec_ref"]):
        _check(ref, golden[f"inter_dec_ref{i}"], f"dec_ref{i}")
    # The golden stores the layer-1 selection sequence-first: [Q, B] and [50, B].
    _check(run["topk1_input"].T, golden["inter_topk1_input"], "topk1_input")
    _check(run["topk1_indices"].T, golden["inter_topk1_indices"], "topk1_indices")


# --- the keypoint self-attention mask -----------------------------------------------------------------


@needs_golden
def test_attention_mask_matches_official(golden):
    want = np.unpackbits(golden["inter_attn_mask2_head0_packbits"], axis=-1)[:, :3450].astype(bool)
    got = pose_self_attention_mask(torch.from_numpy(golden["inter_kpt_mask"]))
    assert got.shape == (1, 3450, 3450) and got.dtype == torch.bool
    assert np.array_equal(got[0].numpy(), want)


@needs_golden
def test_attention_mask_used_by_forward(run, golden):
    want = np.unpackbits(golden["inter_attn_mask2_head0_packbits"], axis=-1)[:, :3450].astype(bool)
    assert np.array_equal(run["attn_mask2"][0].numpy(), want)


def _mask_by_rule(kpt_mask: list[bool], groups: int) -> np.ndarray:
    """README §7.4 written as plain per-entry rules, for a small independent cross-check."""
    k = len(kpt_mask) - 1
    n = groups * (k + 1)
    out = np.zeros((n, n), dtype=bool)
    for r in range(n):
        for c in range(n):
            if r // (k + 1) == c // (k + 1):
                out[r, c] = kpt_mask[r % (k + 1)] != kpt_mask[c % (k + 1)]
            elif r < groups * k:
                lo, hi = (r // k) * k, (r // k + 1) * k
                out[r, c] = c < lo or (c >= hi and hi < groups * k)
    return out


@pytest.mark.parametrize("pattern", [[True, True, False, True, False], [True, False, False, False, False]])
def test_attention_mask_small_rule(pattern):
    got = pose_self_attention_mask(torch.tensor([pattern, [True] * len(pattern)]), num_groups=3)
    assert np.array_equal(got[0].numpy(), _mask_by_rule(pattern, 3))
    assert np.array_equal(got[1].numpy(), _mask_by_rule([True] * len(pattern), 3))


# --- state dict ---------------------------------------------------------------------------------------


@needs_golden
def test_state_dict_layout_matches_golden(model):
    raw = torch.load(GOLDEN / "unipose_state_dict.pt", weights_only=True)
    want = [k.removeprefix("unipose.") for k in raw]
    sd = model.state_dict()
    assert list(sd) == want
    for key, tensor in raw.items():
        assert torch.equal(sd[key.removeprefix("unipose.")], tensor), key
    meta = json.loads((GOLDEN / "golden_meta.json").read_text())
    aliases = {
        a.removeprefix("unipose."): o.removeprefix("unipose.")
        for a, o in meta["state_dict"]["alias_map"].items()
    }
    params = dict(model.named_parameters(remove_duplicate=False))
    for alias, owner in aliases.items():
        assert params[alias] is params[owner], alias
    assert model.bbox_embed is model.transformer.decoder.bbox_embed
    assert model.pose_embed is model.transformer.decoder.pose_embed
    assert model.pose_hw_embed is model.transformer.decoder.pose_hw_embed
    idx = [k for k, v in sd.items() if v.dtype == torch.int64]
    assert len(idx) == 8 and all(k.endswith("relative_position_index") for k in idx)


@needs_golden
def test_swin_sizes_inferred():
    raw = torch.load(GOLDEN / "unipose_state_dict.pt", weights_only=True)
    sizes = swin_sizes_from_state_dict({k.removeprefix("unipose."): v for k, v in raw.items()})
    meta = json.loads((GOLDEN / "golden_meta.json").read_text())
    assert sizes == meta["swin_override"] == TINY_SWIN


@needs_7b_keys
def test_7b_state_dict_keys():
    cfg = json.loads(CONFIG_7B.read_text())["unipose_config"]
    listing = json.loads(KEYS_7B.read_text())
    want = {k.removeprefix("unipose."): v for k, v in listing["tensors"].items() if k.startswith("unipose.")}
    with torch.device("meta"):
        model = UniPose(cfg)
    sd = model.state_dict()
    assert len(want) == 859
    assert list(sd) == list(want)
    for key, tensor in sd.items():
        assert list(tensor.shape) == want[key]["shape"], key
        assert str(tensor.dtype).removeprefix("torch.") == want[key]["dtype"], key
    tied = {
        a.removeprefix("unipose."): o.removeprefix("unipose.")
        for a, o in listing["tied"].items()
        if a.startswith("unipose.")
    }
    first: dict[int, str] = {}
    ours = {}
    for name, p in model.named_parameters(remove_duplicate=False):
        owner = first.setdefault(id(p), name)
        if owner != name:
            ours[name] = owner
    assert ours == tied


# --- loading errors -----------------------------------------------------------------------------------


@needs_golden
def test_load_reports_bad_shape_and_missing_key(tmp_path):
    raw = torch.load(GOLDEN / "unipose_state_dict.pt", weights_only=True)
    (tmp_path / "unipose_config.json").write_text((GOLDEN / "unipose_config.json").read_text())
    bad = dict(raw)
    bad["unipose.transformer.tgt_embed.weight"] = torch.zeros(7, 256)
    torch.save(bad, tmp_path / "unipose_state_dict.pt")
    with pytest.raises(ValueError, match=r"tgt_embed\.weight.*\(7, 256\).*\(120, 256\)"):
        load_unipose_component(tmp_path)
    missing = dict(raw)
    del missing["unipose.transformer.decoder.hw.weight"]
    torch.save(missing, tmp_path / "unipose_state_dict.pt")
    with pytest.raises(ValueError, match=r"1 missing.*decoder\.hw\.weight"):
        load_unipose_component(tmp_path)
    (tmp_path / "unipose_state_dict.pt").unlink()
    with pytest.raises(FileNotFoundError, match="unipose_state_dict.pt"):
        load_unipose_component(tmp_path)


# --- input validation ---------------------------------------------------------------------------------


def test_bad_inputs_raise_value_error():
    # Validation runs before any compute, so a parameter-less (meta) model is enough.
    with torch.device("meta"):
        model = UniPose(_config_7b(), swin=TINY_SWIN)
    ok = {
        "pixel_values": torch.zeros(1, 3, 64, 96),
        "pixel_padding_mask": torch.zeros(1, 64, 96, dtype=torch.bool),
        "obj_querys": torch.zeros(1, 100, 4, 4096),
        "obj_query_masks": torch.zeros(1, 100, dtype=torch.bool),
        "kpt_querys": torch.zeros(1, 100, 4, 4096),
        "kpt_query_masks": torch.zeros(1, 100, dtype=torch.bool),
    }
    ok["obj_query_masks"][:, 0] = True
    cases = [
        (
            "pixel_values",
            torch.zeros(1, 3, 60, 96),
            r"pixel_values: expected .*multiples of 32.*\(1, 3, 60, 96\)",
        ),
        ("pixel_values", torch.zeros(3, 64, 96), r"pixel_values: expected \[B, 3, H, W\], got \(3, 64, 96\)"),
        ("pixel_padding_mask", torch.zeros(1, 64, 96), r"pixel_padding_mask: expected bool \[1, 64, 96\]"),
        ("obj_querys", torch.zeros(1, 100, 4, 64), r"obj_querys: expected \[1, N, num_embs, 4096\], got"),
        (
            "obj_query_masks",
            torch.ones(1, 99, dtype=torch.bool),
            r"obj_query_masks: expected bool \[1, 100\]",
        ),
        ("obj_query_masks", torch.zeros(1, 100, dtype=torch.bool), r"obj_query_masks: .*at least one True"),
        ("kpt_querys", torch.zeros(1, 10, 4, 4096), r"kpt_querys: expected at least 68"),
        ("kpt_query_masks", torch.ones(1, 100, dtype=torch.bool), r"kpt_query_masks: at most 68"),
    ]
    for name, value, pattern in cases:
        args = dict(ok)
        args[name] = value
        if name == "kpt_querys":
            args["kpt_query_masks"] = torch.zeros(1, 10, dtype=torch.bool)
        with pytest.raises(ValueError, match=pattern):
            model(*args.values())


def test_unsupported_config_raises():
    cfg = _config_7b()
    with pytest.raises(ValueError, match="num_body_points=0"):
        UniPose({**cfg, "num_body_points": 0}, swin=TINY_SWIN)
    with pytest.raises(ValueError, match="dec_layers=2"):
        UniPose({**cfg, "dec_layers": 2}, swin=TINY_SWIN)
    with pytest.raises(ValueError, match="dec_layers=4.*num_box_decoder_layers=4"):
        UniPose({**cfg, "dec_layers": 4, "num_box_decoder_layers": 4}, swin=TINY_SWIN)
    with pytest.raises(ValueError, match="num_queries=40; must be >= num_select=50"):
        UniPose({**cfg, "num_queries": 40}, swin=TINY_SWIN)
    with pytest.raises(ValueError, match="swin overrides"):
        with torch.device("meta"):
            UniPose(cfg, swin={"patch": 4})


# --- batching and device ------------------------------------------------------------------------------


@needs_golden
@pytest.mark.slow
def test_batch_of_two_matches_single_runs(model, inputs, golden):
    """Item 0 is the golden input; item 1 differs in image content, padding and keypoint count."""
    px, pad, obj, obj_m, kpt, kpt_m = inputs
    px1 = torch.flip(px, dims=[-1]).clone()
    pad1 = torch.zeros_like(pad)
    pad1[:, :, 200:] = True
    px1[pad1[:, None].expand_as(px1)] = 0
    kpt_m1 = torch.zeros_like(kpt_m)
    kpt_m1[:, :5] = True
    kpt1 = kpt.clone()
    kpt1[:, 3:5] = torch.randn(1, 2, *kpt.shape[2:], generator=torch.Generator().manual_seed(0))
    batch = [torch.cat(p) for p in zip(inputs, (px1, pad1, obj, obj_m, kpt1, kpt_m1))]
    with torch.no_grad():
        both = model(*batch)
        single1 = model(px1, pad1, obj, obj_m, kpt1, kpt_m1)
    for name, got, one in zip(OUTPUTS, both, single1):
        _check(got[:1], golden[name], f"{name} item 0")
        _check(got[1:], one.numpy(), f"{name} item 1", atol=1e-4)


@needs_golden
@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
def test_runs_on_cuda(model, inputs, golden):
    cuda = model.to("cuda")
    try:
        with torch.no_grad():
            outs = cuda(*[x.cuda() for x in inputs])
        for name, got in zip(OUTPUTS, outs):
            assert got.device.type == "cuda"
            _check(got, golden[name], name)
    finally:
        model.to("cpu")


# --- sizes from the config ----------------------------------------------------------------------------


def _small_config(**changes) -> tuple[dict, dict]:
    """The tiny-random UniPose config and Swin sizes, with 7 keypoints, 10 groups and hidden 128."""
    from visionllm_edge.export.config import config_tiny_random

    tiny = config_tiny_random()
    cfg = {**tiny.official["unipose_config"], "num_body_points": 7, "num_select": 10, "hidden_dim": 128}
    return {**cfg, **changes}, tiny.extension["unipose_swin"]


def test_official_sizes_are_the_defaults():
    cfg = _config_7b()
    for key in ("num_body_points", "num_select", "num_box_decoder_layers", "hidden_dim"):
        del cfg[key]
    with torch.device("meta"):
        model = UniPose(cfg, swin=TINY_SWIN)
    sizes = (model.num_body_points, model.num_groups, model.num_box_decoder_layers, model.hidden_dim)
    assert sizes == (68, 50, 2, 256)
    sd = model.state_dict()
    assert sd["transformer.decoder.hw.weight"].shape == (17, 2)
    assert sd["transformer.decoder.hw_append.weight"].shape == (51, 2)


@pytest.mark.parametrize("points, head, rest", [(7, 7, 0), (17, 17, 0), (20, 17, 3)])
def test_keypoint_sizes_split_as_the_checkpoint(points, head, rest):
    cfg, swin = _small_config(num_body_points=points)
    with torch.device("meta"):
        model = UniPose(cfg, swin=swin)
    sd = model.state_dict()
    assert sd["transformer.decoder.hw.weight"].shape == (head, 2)
    assert sd["transformer.decoder.hw_append.weight"].shape == (rest, 2)


def test_small_config_runs_with_fewer_keypoints_and_groups(tmp_path):
    cfg, swin = _small_config()
    torch.manual_seed(0)
    model = UniPose(cfg, swin=swin).eval()
    sizes = (model.num_body_points, model.num_groups, model.num_box_decoder_layers, model.hidden_dim)
    assert sizes == (7, 10, 2, 128)
    gen = torch.Generator().manual_seed(1)
    pixels = torch.randn(1, 3, 96, 160, generator=gen)
    padding = torch.zeros(1, 96, 160, dtype=torch.bool)
    padding[:, 80:] = True
    pixels[padding[:, None].expand_as(pixels)] = 0
    objects = torch.randn(1, 3, 4, 96, generator=gen)
    object_mask = torch.tensor([[True, True, False]])
    keypoints = torch.randn(1, 7, 4, 96, generator=gen)
    keypoint_mask = torch.ones(1, 7, dtype=torch.bool)
    inputs = (pixels, padding, objects, object_mask, keypoints, keypoint_mask)
    with torch.no_grad():
        run = model.forward_with_intermediates(*inputs)
    assert run["pred_logits"].shape == (1, 10, 3)
    assert run["pred_boxes"].shape == (1, 10, 4)
    assert run["pred_keypoints"].shape == (1, 10, 21)
    assert run["kpt_embed"].shape == (1, 7, 128)
    assert run["attn_mask2"].shape == (1, 80, 80)
    assert torch.isfinite(run["pred_boxes"]).all() and torch.isfinite(run["pred_keypoints"]).all()
    assert torch.isneginf(run["pred_logits"][..., 2]).all()
    assert torch.equal(run["pred_keypoints"][..., 14:], torch.full((1, 10, 7), torch.tensor(1.0).sigmoid()))

    # An empty `hw_append` survives saving and strict loading.
    (tmp_path / "unipose_config.json").write_text(json.dumps(cfg))
    torch.save({f"unipose.{k}": v for k, v in model.state_dict().items()}, tmp_path / "unipose_state_dict.pt")
    loaded = load_unipose_component(tmp_path)
    assert loaded.transformer.decoder.hw_append.weight.shape == (0, 2)
    with torch.no_grad():
        again = loaded(*inputs)
    for name, got in zip(OUTPUTS, again):
        assert torch.equal(got, run[name]), name

    with pytest.raises(ValueError, match="kpt_querys: expected at least 7"):
        model(pixels, padding, objects, object_mask, keypoints[:, :6], keypoint_mask[:, :6])
    too_many = torch.ones(1, 8, dtype=torch.bool)
    with pytest.raises(ValueError, match="kpt_query_masks: at most 7"):
        model(pixels, padding, objects, object_mask, torch.zeros(1, 8, 4, 96), too_many)


def test_hidden_dim_must_be_a_multiple_of_32():
    cfg, swin = _small_config(hidden_dim=100)
    with pytest.raises(ValueError, match=r"hidden_dim=100; must be a multiple of 32"):
        UniPose(cfg, swin=swin)
    cfg, swin = _small_config(hidden_dim=96, nheads=5)
    with pytest.raises(ValueError, match=r"hidden_dim=96; must be a multiple of nheads=5"):
        UniPose(cfg, swin=swin)
