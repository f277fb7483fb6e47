"""`det.onnx` and `pose.onnx`: exported from tiny-random, checked with `onnx.checker`, run with ONNX Runtime
and compared with the reference decoders (original `grid_sample` deformable attention), never with the export
modules."""

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
    decoder_image_size,
    msda_export_patch,
    msda_patched,
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


# --- registry, bucket, patch --------------------------------------------------------------------------------


def test_registered():
    assert isinstance(exporter_for("det"), DetExporter)
    assert isinstance(exporter_for("pose"), PoseExporter)


def test_bucket_covers_every_preprocessed_image():
    assert decoder_image_size(96, 160) == (160, 160)
    cfg = config_7b()
    assert decoder_image_size(cfg.det_short_side, cfg.det_max_long_side) == (1344, 1344)
    side, _ = decoder_image_size(96, 160)
    for w, h in ((640, 480), (480, 640), (1000, 100), (100, 1000), (333, 333), (161, 97), (3, 2000)):
        pixels, mask, (rh, rw) = pp.detection_image(Image.new("RGB", (w, h)), 96, 160)
        assert pixels.shape[-2] <= side and pixels.shape[-1] <= side, (w, h)
        assert mask[0, :rh, :rw].all()
    with pytest.raises(ValueError, match="positive"):
        decoder_image_size(0, 160)


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


def _static_dims(value_info) -> list:
    return [
        d.dim_value if d.HasField("dim_value") else d.dim_param for d in value_info.type.tensor_type.shape.dim
    ]


def _valid_hw(mask: np.ndarray) -> tuple[int, int]:
    return int(mask[0].any(1).sum()), int(mask[0].any(0).sum())


# --- det.onnx -----------------------------------------------------------------------------------------------


def test_det_graph_is_valid_and_has_no_grid_sample(model, det):
    _, graph, path, _ = det
    onnx.checker.check_model(str(path), full_check=True)
    proto = onnx.load(str(path))
    assert [i.name for i in proto.graph.input] == list(DET.inputs)
    assert [o.name for o in proto.graph.output] == list(DET.outputs)
    assert "GridSample" not in _op_types(path)
    side = graph.facts["image_size"][0]
    dims = {i.name: _static_dims(i) for i in proto.graph.input}
    assert dims["pixel_values"] == [1, 3, side, side]
    assert dims["pixel_mask"] == [1, side, side]
    assert dims["text_query"][1] == dims["text_query_mask"][1] == "groups"
    assert dims["mask_query_index"][1] == "mask_queries"
    types = {i.name: i.type.tensor_type.elem_type for i in proto.graph.input}
    assert types["pixel_mask"] == types["text_query_mask"] == onnx.TensorProto.BOOL
    assert types["mask_query_index"] == onnx.TensorProto.INT64


def test_det_cases_match_reference(det, det_session):
    _, _, _, cases = det
    assert len(cases) >= 3
    assert len({c.inputs["text_query"].shape[1] for c in cases}) == len(cases)  # different K
    assert len({_valid_hw(c.inputs["pixel_mask"]) for c in cases}) == len(cases)
    for case in cases:
        got = _run(det_session, case.inputs)
        _assert_matches(got, case.expected, f"det {case.label}")
        # The padded groups' (and the absent slots') logits are -inf, exactly where the reference has them.
        valid = int(case.inputs["text_query_mask"].sum())
        assert np.isneginf(got["logits"][..., valid:]).all()


def test_det_one_session_small_then_large_valid_region(det, det_session):
    """Two valid regions inside one bucket, through one session, in both orders, each as the reference."""
    _, _, _, cases = det
    by_area = sorted(cases, key=lambda c: int(c.inputs["pixel_mask"].sum()))
    small, large = by_area[0], by_area[-1]
    assert small.inputs["pixel_mask"].sum() < large.inputs["pixel_mask"].sum()
    for case in (small, large, small):
        _assert_matches(_run(det_session, case.inputs), case.expected, f"det {case.label}")


def test_det_rejects_other_image_size(model, det, det_session):
    _, graph, _, cases = det
    side = graph.facts["image_size"][0]
    inputs = dict(cases[0].inputs)
    inputs["pixel_values"] = inputs["pixel_values"][:, :, : side - 32]
    inputs["pixel_mask"] = inputs["pixel_mask"][:, : side - 32]
    with pytest.raises(Exception, match="(?i)invalid dimensions|dimension"):
        det_session.run(None, inputs)
    module = DetectionGraph(model.gdino, (side, side))
    tensors = [torch.from_numpy(inputs[name]) for name in DET.inputs]
    with pytest.raises(ValueError, match="pixel_values: expected shape"):
        module(*tensors)


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
    assert facts["image_size"] == [160, 160]
    assert facts["image_buckets"] == [{"file": DET.file, "image_size": [160, 160]}]
    assert facts["num_queries"] == model.gdino.settings.num_queries
    assert facts["max_text_len"] == facts["max_groups"] == 256
    assert facts["mask_stride"] == 4
    assert facts["box_frame"] == "valid_region"
    with pytest.raises(ValueError, match="precision"):
        exporter.graphs(model, ExportSettings(precision="bf16"))


# --- pose.onnx ----------------------------------------------------------------------------------------------


def test_pose_graph_is_valid_and_has_no_grid_sample(pose):
    _, graph, path, _ = pose
    onnx.checker.check_model(str(path), full_check=True)
    proto = onnx.load(str(path))
    assert [i.name for i in proto.graph.input] == list(POSE.inputs)
    assert [o.name for o in proto.graph.output] == list(POSE.outputs)
    assert "GridSample" not in _op_types(path)
    side = graph.facts["image_size"][0]
    dims = {i.name: _static_dims(i) for i in proto.graph.input}
    assert dims["pixel_values"] == [1, 3, side, side]
    assert dims["object_query_mask"] == dims["keypoint_query_mask"] == [1, 100]


def test_pose_cases_match_reference(pose, pose_session):
    """All cases through one session: different valid regions (portrait, landscape, smaller) in one bucket."""
    _, _, _, cases = pose
    assert len(cases) >= 3
    assert len({_valid_hw(c.inputs["pixel_mask"]) for c in cases}) == len(cases)
    for case in cases:
        got = _run(pose_session, case.inputs)
        _assert_matches(got, case.expected, f"pose {case.label}")
        objects = int(case.inputs["object_query_mask"].sum())
        assert np.isneginf(got["pred_logits"][..., objects:]).all()


def test_pose_rejects_other_image_size(pose, pose_session):
    _, graph, _, cases = pose
    side = graph.facts["image_size"][0]
    inputs = dict(cases[0].inputs)
    inputs["pixel_values"] = np.zeros((1, 3, side, side + 32), np.float32)
    inputs["pixel_mask"] = np.ones((1, side, side + 32), bool)
    with pytest.raises(Exception, match="(?i)invalid dimensions|dimension"):
        pose_session.run(None, inputs)


def test_pose_facts(model, pose):
    exporter, graph, _, _ = pose
    facts = exporter.manifest_facts(model, ExportSettings())
    assert facts == graph.facts
    assert facts["image_size"] == [160, 160]
    assert (facts["num_groups"], facts["max_objects"], facts["max_keypoints"]) == (50, 100, 68)
    assert facts["box_frame"] == facts["keypoint_frame"] == "padded_image"
