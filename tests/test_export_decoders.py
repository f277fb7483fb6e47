"""`det.onnx` and `pose.onnx`: exported from tiny-random, checked with `onnx.checker`, run with ONNX Runtime
and compared with the reference decoders (original `grid_sample` deformable attention), never with the export
modules. Each graph is exported once, with symbolic height and width, and one session runs images padded to
/32 only (as the official model pads) at several different sizes, each against the reference at that size."""

from __future__ import annotations

import time

import numpy as np
import onnx
import pytest
import torch
from PIL import Image
from visionllm_edge import contract
from visionllm_edge.export import preprocess as pp
from visionllm_edge.export.checkpoint import load_reference
from visionllm_edge.export.config import config_7b
from visionllm_edge.export.models import gdino as gdino_module
from visionllm_edge.export.models import msda
from visionllm_edge.export.models import unipose as unipose_module
from visionllm_edge.export.onnx.base import ExportSettings, export_graph, exporter_for
from visionllm_edge.export.onnx.decoders import (
    DetectionGraph,
    DetExporter,
    PoseExporter,
    PoseGraph,
    _det_inputs,
    _pose_inputs,
    decoder_size_range,
    encoder_tokens,
    msda_export_patch,
    msda_patched,
    padded_image_size,
    reference_det_outputs,
    reference_pose_outputs,
)

DET = contract.GRAPHS["det"]
POSE = contract.GRAPHS["pose"]


@pytest.fixture(scope="module")
def model():
    return load_reference("tiny-random")


def _export(model, name: str, folder):
    exporter = exporter_for(name)
    settings = ExportSettings()
    (graph,) = exporter.graphs(model, settings)
    path = folder / contract.GRAPHS[graph.name].file
    start = time.perf_counter()
    export_graph(graph, path, opset=settings.opset)
    print(f"{name}: exported in {time.perf_counter() - start:.1f} s")
    cases = exporter.validation_cases(model, settings, np.random.default_rng(7))[name]
    return exporter, graph, path, cases


def _session(path):
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    return ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])


def _run(session, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    names = [o.name for o in session.get_outputs()]
    return dict(zip(names, session.run(names, inputs)))


def _assert_matches(got: dict, want: dict, label: str) -> None:
    errors = {}
    for name, expected in want.items():
        mismatch = contract.compare(got[name], expected, atol=1e-4, rtol=1e-4)
        assert mismatch is None, f"{label}: {name}: {mismatch}"
        finite = np.isfinite(expected)
        errors[name] = float(np.abs(got[name][finite] - expected[finite]).max()) if finite.any() else 0.0
    print(f"{label}: max abs errors {errors}")


@pytest.fixture(scope="module")
def det(model, tmp_path_factory):
    return _export(model, "det", tmp_path_factory.mktemp("det"))


@pytest.fixture(scope="module")
def pose(model, tmp_path_factory):
    return _export(model, "pose", tmp_path_factory.mktemp("pose"))


@pytest.fixture(scope="module")
def det_session(det):
    return _session(det[2])


@pytest.fixture(scope="module")
def pose_session(pose):
    return _session(pose[2])


# --- registry, size range, shape helpers, patch -------------------------------------------------------------


def test_registered():
    assert isinstance(exporter_for("det"), DetExporter)
    assert isinstance(exporter_for("pose"), PoseExporter)


def test_size_range_covers_every_preprocessed_image():
    assert decoder_size_range(96, 160) == {"min_side": 32, "max_side": 160, "size_divisibility": 32}
    cfg = config_7b()
    assert decoder_size_range(cfg.det_short_side, cfg.det_max_long_side)["max_side"] == 1344
    limits = decoder_size_range(96, 160)
    for w, h in ((640, 480), (480, 640), (1000, 100), (100, 1000), (333, 333), (161, 97), (3, 2000)):
        pixels, mask, (rh, rw) = pp.detection_image(Image.new("RGB", (w, h)), 96, 160)
        for side in pixels.shape[-2:]:
            assert limits["min_side"] <= side <= limits["max_side"] and side % 32 == 0, (w, h)
        assert tuple(pixels.shape[-2:]) == padded_image_size(rh, rw)  # the official /32 padding, no more
        assert mask[0, :rh, :rw].all() and mask.sum() == rh * rw
    with pytest.raises(ValueError, match="positive"):
        decoder_size_range(0, 160)


def test_encoder_tokens_counts_the_reference_memory(model):
    """`encoder_tokens` is the encoder length; below `num_queries` tokens the reference refuses the image."""
    levels = model.unipose.num_feature_levels
    hidden = (model.config.num_embs, model.unipose.l_hidden_size)
    rng = np.random.default_rng(0)
    for valid_hw in ((96, 160), (150, 70)):
        inputs = _pose_inputs(rng, valid_hw, 1, 3, *hidden)
        tensors = [torch.from_numpy(inputs[name]) for name in POSE.inputs]
        tensors[1] = ~tensors[1]
        with torch.no_grad():
            record = model.unipose.forward_with_intermediates(*tensors)
        assert record["enc_memory"].shape[1] == encoder_tokens(*padded_image_size(*valid_hw), levels)
    assert encoder_tokens(64, 64, levels) < model.unipose.num_queries
    inputs = _pose_inputs(rng, (64, 64), 1, 3, *hidden)
    with pytest.raises(ValueError, match="num_queries"):
        reference_pose_outputs(model, inputs)


def test_resize_mask_nearest_equals_interpolate():
    """The gather form of the masks' nearest downsampling picks exactly `F.interpolate`'s pixels."""
    generator = torch.Generator().manual_seed(0)
    for height in range(1, 200, 7):
        mask = torch.rand(2, height, 5, generator=generator) > 0.5
        outs = {1, max(1, height // 8), max(1, height // 3), -(-height // 64), height, 2 * height // 3 or 1}
        for out in outs:
            want = torch.nn.functional.interpolate(mask[:, None].float(), size=(out, 3))[:, 0].bool()
            assert torch.equal(msda.resize_mask_nearest(mask, (out, 3)), want), (height, out)
    big = torch.rand(1, 1344, 800, generator=generator) > 0.5
    for size in ((168, 100), (21, 13), (11, 7)):
        want = torch.nn.functional.interpolate(big[:, None].float(), size=size)[:, 0].bool()
        assert torch.equal(msda.resize_mask_nearest(big, size), want)


def test_gather_msda_takes_tensor_shapes():
    """Shapes as an `[L, 2]` tensor, as 0-d tensors, with `level_start_index`: the int result, exactly."""
    generator = torch.Generator().manual_seed(1)
    shapes = [(12, 20), (6, 10), (3, 5), (2, 3)]
    tokens = sum(h * w for h, w in shapes)
    value = torch.randn(1, tokens, 4, 8, generator=generator)
    locations = torch.rand(1, 9, 4, len(shapes), 3, 2, generator=generator) * 1.2 - 0.1
    weights = torch.rand(1, 9, 4, len(shapes), 3, generator=generator)
    want = msda.multi_scale_deformable_attention_gather(value, shapes, locations, weights)
    as_tensor = torch.tensor(shapes)
    starts = torch.tensor([0, 240, 300, 315])
    for form, extra in (
        (as_tensor, {}),
        ([(torch.tensor(h), torch.tensor(w)) for h, w in shapes], {}),
        (as_tensor, {"level_start_index": starts}),
    ):
        got = msda.multi_scale_deformable_attention_gather(value, form, locations, weights, **extra)
        assert torch.equal(got, want)
    reference = msda.multi_scale_deformable_attention(value, as_tensor, locations, weights)
    assert contract.compare(want.numpy(), reference.numpy(), atol=1e-5, rtol=1e-5) is None
    with pytest.raises(ValueError, match="spatial_shapes cover"):
        msda.multi_scale_deformable_attention_gather(value, as_tensor[:, :1].repeat(1, 2), locations, weights)
    with pytest.raises(ValueError, match=r"integer \[L, 2\]"):
        msda.multi_scale_deformable_attention_gather(value, as_tensor.float(), locations, weights)


def test_msda_export_patch_swaps_and_restores():
    originals = [m.multi_scale_deformable_attention for m in (gdino_module, unipose_module)]
    assert all(fn is msda.multi_scale_deformable_attention for fn in originals)
    assert not msda_patched()
    with msda_export_patch():
        assert msda_patched()
        assert gdino_module.multi_scale_deformable_attention is msda.multi_scale_deformable_attention_gather
        assert unipose_module.multi_scale_deformable_attention is msda.multi_scale_deformable_attention_gather
        with msda_export_patch():  # nesting keeps the outer patch
            pass
        assert msda_patched()
    assert not msda_patched()
    with pytest.raises(KeyError), msda_export_patch():
        raise KeyError("boom")
    assert [m.multi_scale_deformable_attention for m in (gdino_module, unipose_module)] == originals


def test_msda_export_patch_matches_original(model):
    """Each decoder's deformable attention layer gives the same result inside the patch as outside.

    Reference locations include points outside [0, 1] (zero padding) and on a level's border.
    """
    torch.manual_seed(0)
    shapes = [(12, 10), (6, 5), (3, 3), (2, 2)]
    assert model.gdino.settings.num_feature_levels == model.unipose.num_feature_levels == len(shapes)
    tokens = sum(h * w for h, w in shapes)
    gd_layer = model.gdino.model.decoder.layers[0].encoder_attn
    up_layer = model.unipose.transformer.decoder.layers[0].cross_attn
    gd_dim, up_dim = model.gdino.settings.d_model, model.unipose.hidden_dim
    boxes = torch.rand(1, 9, len(shapes), 4) * 1.2 - 0.1
    gd_args = (torch.randn(1, 9, gd_dim), torch.randn(1, tokens, gd_dim), torch.rand(1, tokens) > 0.1)
    up_args = (
        torch.randn(1, 9, up_dim),
        boxes,
        torch.randn(1, tokens, up_dim),
        shapes,
        torch.rand(1, tokens) < 0.1,
    )

    def run():
        with torch.no_grad():
            return gd_layer(*gd_args, boxes, shapes), up_layer(*up_args)

    original = run()
    with msda_export_patch():
        patched = run()
    for want, got in zip(original, patched):
        assert contract.compare(got.numpy(), want.numpy(), atol=1e-5, rtol=1e-5) is None


def _slice_assigned_labels(height: int, width: int, window: int, shift: int) -> torch.Tensor:
    """The official shifted-window region labels, built by slice assignment (the form both Swins replaced)."""
    labels = torch.zeros(1, height, width, 1)
    bands = (slice(0, -window), slice(-window, -shift), slice(-shift, None))
    for i, rows in enumerate(bands):
        for j, cols in enumerate(bands):
            labels[:, rows, cols, :] = 3 * i + j
    return labels


@pytest.mark.parametrize("window,shift", [(7, 3), (12, 6)])
def test_swin_shift_masks_equal_slice_assignment_form(window, shift):
    """Including maps no larger than one window, where the first band is empty (what broke the export)."""
    from visionllm_edge.export.models import swin, unipose_swin

    stage = unipose_swin.SwinStage(8, 2, 1, window, False)
    for height in (window, 2 * window, 3 * window):
        for width in (window, 3 * window):
            ids = swin._to_windows(_slice_assigned_labels(height, width, window, shift), window)[..., 0]
            blocked = ids[:, None, :] != ids[:, :, None]
            want = torch.zeros(blocked.shape).masked_fill(blocked, -100.0)
            assert torch.equal(swin._shift_mask(height, width, window, shift, torch.device("cpu")), want)
            # UniPose's stage pads the unpadded map itself.
            assert torch.equal(stage._shift_mask(height - window + 1, width, torch.zeros(1)), want)


def test_reference_refuses_inside_patch(model):
    with msda_export_patch(), pytest.raises(RuntimeError, match="outside msda_export_patch"):
        reference_det_outputs(model, {})
    with msda_export_patch(), pytest.raises(RuntimeError, match="outside msda_export_patch"):
        reference_pose_outputs(model, {})


def _op_types(path) -> set[str]:
    graph = onnx.load(str(path)).graph
    ops = {node.op_type for node in graph.node}
    for node in graph.node:  # subgraphs (If/Loop bodies) too
        for attr in node.attribute:
            if attr.g is not None:
                ops |= {n.op_type for n in attr.g.node}
    return ops


def _dims(value_info) -> list:
    return [
        d.dim_value if d.HasField("dim_value") else d.dim_param for d in value_info.type.tensor_type.shape.dim
    ]


def _valid_hw(mask: np.ndarray) -> tuple[int, int]:
    return int(mask[0].any(1).sum()), int(mask[0].any(0).sum())


def _padded_hw(inputs: dict) -> tuple[int, int]:
    return tuple(inputs["pixel_mask"].shape[1:])


def _crop(inputs: dict, height: int, width: int) -> dict:
    """The inputs with the image cut to `height x width` (a size the runtime never feeds)."""
    out = dict(inputs)
    out["pixel_values"] = np.ascontiguousarray(inputs["pixel_values"][:, :, :height, :width])
    out["pixel_mask"] = np.ascontiguousarray(inputs["pixel_mask"][:, :height, :width])
    return out


#: Valid regions of the size sweeps (padded /32 only): small, large, extreme aspect, small again.
SWEEP = ((70, 120), (150, 160), (20, 150), (64, 96), (70, 120))


# --- det.onnx -----------------------------------------------------------------------------------------------


def _det_case(model, rng, valid_hw, groups=4, valid_groups=3, queries=(0, 7, 19)):
    s = model.gdino.settings
    return _det_inputs(
        rng, valid_hw, groups, valid_groups, np.array(queries), model.config.num_embs, s.l_hidden_size
    )


def test_det_graph_is_valid_with_symbolic_image_size(model, det):
    _, graph, path, _ = det
    onnx.checker.check_model(str(path), full_check=True)
    proto = onnx.load(str(path))
    assert [i.name for i in proto.graph.input] == list(DET.inputs)
    assert [o.name for o in proto.graph.output] == list(DET.outputs)
    assert "GridSample" not in _op_types(path)
    dims = {i.name: _dims(i) for i in proto.graph.input}
    assert dims["pixel_values"] == [1, 3, "height", "width"]
    assert dims["pixel_mask"] == [1, "height", "width"]
    assert dims["text_query"][1] == dims["text_query_mask"][1] == "groups"
    assert dims["mask_query_index"][1] == "mask_queries"
    outputs = {o.name: _dims(o) for o in proto.graph.output}
    # The named axes; the exporter leaves other output dims symbolic where its shape inference stops.
    assert outputs["pred_masks"][1:] == ["mask_queries", "mask_height", "mask_width"]
    assert [len(outputs[name]) for name in DET.outputs] == [3, 3, 4]
    types = {i.name: i.type.tensor_type.elem_type for i in proto.graph.input}
    assert types["pixel_mask"] == types["text_query_mask"] == onnx.TensorProto.BOOL
    assert types["mask_query_index"] == onnx.TensorProto.INT64


def test_det_cases_match_reference(det, det_session):
    """The validation cases: three different padded sizes (and K), one session, each as the reference."""
    _, _, _, cases = det
    assert len(cases) >= 3
    assert len({c.inputs["text_query"].shape[1] for c in cases}) == len(cases)  # different K
    assert len({_padded_hw(c.inputs) for c in cases}) == len(cases)  # different image sizes
    for case in cases:
        assert _padded_hw(case.inputs) == padded_image_size(*_valid_hw(case.inputs["pixel_mask"]))
        got = _run(det_session, case.inputs)
        _assert_matches(got, case.expected, f"det {case.label}")
        # The padded groups' (and the absent slots') logits are -inf, exactly where the reference has them.
        valid = int(case.inputs["text_query_mask"].sum())
        assert np.isneginf(got["logits"][..., valid:]).all()
        height, width = _padded_hw(case.inputs)
        assert got["pred_masks"].shape[2:] == (height // 4, width // 4)


def test_det_one_session_many_sizes(model, det_session):
    """Small, large (the max side), an extreme aspect, small again: each padded to /32 only, as reference."""
    rng = np.random.default_rng(11)
    seen = set()
    for valid_hw in SWEEP:
        inputs = _det_case(model, rng, valid_hw)
        seen.add(_padded_hw(inputs))
        label = f"det valid={valid_hw[0]}x{valid_hw[1]} padded={_padded_hw(inputs)}"
        _assert_matches(_run(det_session, inputs), reference_det_outputs(model, inputs), label)
    assert {(96, 128), (160, 160), (32, 160), (64, 96)} <= seen


def test_det_size_not_multiple_of_32(model, det_session):
    """Outside the contract (the runtime always pads to /32). The module refuses such a size; the graph, which
    carries no shape guard, runs it and returns what the reference computes at that size with its /32 check
    lifted, which is not what the official model gives for that image (it pads to /32 first)."""
    official = _det_case(model, np.random.default_rng(13), (100, 122))  # padded to 128 x 128
    unpadded = _crop(official, 100, 122)
    tensors = [torch.from_numpy(unpadded[name]) for name in DET.inputs]
    with pytest.raises(ValueError, match="multiples of 32"):
        DetectionGraph(model.gdino)(*tensors)
    got = _run(det_session, unpadded)
    assert got["pred_masks"].shape[2:] == (25, 31)  # the backbone pads to /4 itself
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(model.gdino, "_check_inputs", lambda *args: None)
        lifted = reference_det_outputs(model, unpadded)
    _assert_matches(got, lifted, "det 100x122 unpadded (reference with the check lifted)")
    want = reference_det_outputs(model, official)
    finite = np.isfinite(want["logits"])
    assert np.abs(got["logits"][finite] - want["logits"][finite]).max() > 1e-3


def test_det_mask_query_index_selects_those_masks(model, det, det_session):
    """Any subset (with repeats, in any order) gives exactly those queries' masks; K up to max_text_len."""
    _, graph, _, cases = det
    num_queries, max_groups = graph.facts["num_queries"], graph.facts["max_groups"]
    inputs = dict(cases[1].inputs)
    rng = np.random.default_rng(3)
    inputs["text_query"] = rng.standard_normal(
        (1, max_groups, *inputs["text_query"].shape[2:]), dtype=np.float32
    )
    inputs["text_query_mask"] = np.ones((1, max_groups), bool)
    inputs["mask_query_index"] = np.arange(num_queries, dtype=np.int64)[None]
    want = reference_det_outputs(model, inputs, all_masks=True)
    everything = _run(det_session, inputs)
    _assert_matches(everything, want, f"det K={max_groups}, all {num_queries} masks")
    for index in ([num_queries - 1, 0, 5, 5], [2]):
        inputs["mask_query_index"] = np.asarray([index], np.int64)
        got = _run(det_session, inputs)["pred_masks"]
        assert got.shape == (1, len(index), *want["pred_masks"].shape[2:])
        assert contract.compare(got, want["pred_masks"][:, index]) is None
        assert contract.compare(got, everything["pred_masks"][:, index], atol=1e-6, rtol=1e-6) is None


def test_det_facts(model, det):
    exporter, graph, _, _ = det
    facts = exporter.manifest_facts(model, ExportSettings())
    assert facts == graph.facts
    assert facts["image_size"] == {"min_side": 32, "max_side": 160, "size_divisibility": 32}
    assert "image_buckets" not in facts
    assert facts["min_encoder_tokens"] == facts["num_queries"] == model.gdino.settings.num_queries
    assert facts["max_text_len"] == facts["max_groups"] == 256
    assert facts["mask_stride"] == 4
    assert facts["box_frame"] == "valid_region"
    with pytest.raises(ValueError, match="precision"):
        exporter.graphs(model, ExportSettings(precision="bf16"))


# --- pose.onnx ----------------------------------------------------------------------------------------------


def test_pose_graph_is_valid_with_symbolic_image_size(pose):
    _, _, path, _ = pose
    onnx.checker.check_model(str(path), full_check=True)
    proto = onnx.load(str(path))
    assert [i.name for i in proto.graph.input] == list(POSE.inputs)
    assert [o.name for o in proto.graph.output] == list(POSE.outputs)
    assert "GridSample" not in _op_types(path)
    dims = {i.name: _dims(i) for i in proto.graph.input}
    assert dims["pixel_values"] == [1, 3, "height", "width"]
    assert dims["pixel_mask"] == [1, "height", "width"]
    assert dims["object_query_mask"] == dims["keypoint_query_mask"] == [1, 100]
    outputs = {o.name: _dims(o) for o in proto.graph.output}
    assert [len(outputs[name]) for name in POSE.outputs] == [3, 3, 3]


def test_pose_cases_match_reference(pose, pose_session):
    """All cases through one session: three different padded sizes, each as the reference."""
    _, _, _, cases = pose
    assert len(cases) >= 3
    assert len({_padded_hw(c.inputs) for c in cases}) == len(cases)
    for case in cases:
        got = _run(pose_session, case.inputs)
        _assert_matches(got, case.expected, f"pose {case.label}")
        objects = int(case.inputs["object_query_mask"].sum())
        assert np.isneginf(got["pred_logits"][..., objects:]).all()


def test_pose_one_session_many_sizes(model, pose_session):
    """Small, large, a wide one, small again (UniPose needs >= num_queries=120 encoder tokens: no 32x160)."""
    rng = np.random.default_rng(12)
    hidden = (model.config.num_embs, model.unipose.l_hidden_size)
    seen = set()
    for valid_hw in ((70, 120), (150, 160), (50, 150), (128, 70), (70, 120)):
        inputs = _pose_inputs(rng, valid_hw, 2, 7, *hidden)
        seen.add(_padded_hw(inputs))
        label = f"pose valid={valid_hw[0]}x{valid_hw[1]} padded={_padded_hw(inputs)}"
        _assert_matches(_run(pose_session, inputs), reference_pose_outputs(model, inputs), label)
    assert {(96, 128), (160, 160), (64, 160), (128, 96)} <= seen


def test_pose_size_not_multiple_of_32(model, pose_session):
    """As for det: refused by the module, run by the graph as the reference with its /32 check lifted."""
    hidden = (model.config.num_embs, model.unipose.l_hidden_size)
    official = _pose_inputs(np.random.default_rng(14), (90, 130), 2, 5, *hidden)  # padded to 96 x 160
    unpadded = _crop(official, 90, 130)
    tensors = [torch.from_numpy(unpadded[name]) for name in POSE.inputs]
    with pytest.raises(ValueError, match="multiples of 32"):
        PoseGraph(model.unipose)(*tensors)
    got = _run(pose_session, unpadded)
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(model.unipose, "_check_inputs", lambda *args: None)
        lifted = reference_pose_outputs(model, unpadded)
    _assert_matches(got, lifted, "pose 90x130 unpadded (reference with the check lifted)")
    want = reference_pose_outputs(model, official)
    finite = np.isfinite(want["pred_logits"])
    assert np.abs(got["pred_logits"][finite] - want["pred_logits"][finite]).max() > 1e-3


def test_pose_too_few_encoder_tokens_fails_loudly(model, pose, pose_session):
    """64x64 gives 85 encoder tokens, fewer than `min_encoder_tokens` (120): an error, not a wrong answer."""
    _, graph, _, _ = pose
    assert encoder_tokens(64, 64, model.unipose.num_feature_levels) < graph.facts["min_encoder_tokens"]
    hidden = (model.config.num_embs, model.unipose.l_hidden_size)
    inputs = _pose_inputs(np.random.default_rng(15), (64, 64), 1, 3, *hidden)
    with pytest.raises(Exception, match="TopK"):
        pose_session.run(None, inputs)


def test_pose_facts(model, pose):
    exporter, graph, _, _ = pose
    facts = exporter.manifest_facts(model, ExportSettings())
    assert facts == graph.facts
    assert facts["image_size"] == {"min_side": 32, "max_side": 160, "size_divisibility": 32}
    assert facts["min_encoder_tokens"] == model.unipose.num_queries == 120
    assert (facts["num_groups"], facts["max_objects"], facts["max_keypoints"]) == (50, 100, 68)
    assert facts["box_frame"] == facts["keypoint_frame"] == "padded_image"


def test_pose_graph_of_a_small_config(tmp_path):
    """UniPose with 7 keypoints, 10 groups and hidden 128: the graph, its facts and cases follow the model."""
    from types import SimpleNamespace

    from visionllm_edge.export.config import config_tiny_random
    from visionllm_edge.export.models.unipose import UniPose

    tiny = config_tiny_random()
    cfg = {**tiny.official["unipose_config"], "num_body_points": 7, "num_select": 10, "hidden_dim": 128}
    torch.manual_seed(0)
    small = SimpleNamespace(config=tiny, unipose=UniPose(cfg, swin=tiny.extension["unipose_swin"]).eval())
    exporter, graph, path, cases = _export(small, "pose", tmp_path)
    assert (graph.facts["num_groups"], graph.facts["max_keypoints"]) == (10, 7)
    assert [int(c.inputs["keypoint_query_mask"].sum()) for c in cases] == [3, 5, 7]
    session = _session(path)
    for case in cases:
        got = _run(session, case.inputs)
        assert got["pred_boxes"].shape == (1, 10, 4)
        assert got["pred_keypoints"].shape == (1, 10, 21)
        _assert_matches(got, case.expected, f"small pose {case.label}")
