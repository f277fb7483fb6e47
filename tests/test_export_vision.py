"""`vision.onnx` and `region.onnx`: exported from tiny-random, checked with `onnx.checker`, run with ONNX
Runtime and compared with the PyTorch reference (`encode_image`, `encode_regions`), never with the export
modules."""

from __future__ import annotations

import types

import numpy as np
import onnx
import pytest
import torch
from visionllm_edge import contract
from visionllm_edge.export.checkpoint import load_reference
from visionllm_edge.export.models.region import OFFICIAL_MAX_POINTS, RegionEncoder
from visionllm_edge.export.onnx.base import ExportSettings, export_graph, exporter_for, run_onnx
from visionllm_edge.export.onnx.vision import (
    RegionExporter,
    VisionExporter,
    bilinear_sampling_matrix,
    pool_regions,
    reference_region_outputs,
    reference_vision_outputs,
    region_pooling_weights,
    sample_masks,
)

VISION = contract.GRAPHS["vision"]
REGION = contract.GRAPHS["region"]


@pytest.fixture(scope="module")
def model():
    return load_reference("tiny-random")


def _export(model, name: str, folder, precision: str = "fp32"):
    exporter = exporter_for(name)
    settings = ExportSettings(precision=precision)
    (graph,) = exporter.graphs(model, settings)
    path = folder / contract.GRAPHS[graph.name].file
    export_graph(graph, path, opset=settings.opset)
    return exporter, settings, graph, path


@pytest.fixture(scope="module")
def vision_fp32(model, tmp_path_factory):
    return _export(model, "vision", tmp_path_factory.mktemp("fp32"))


@pytest.fixture(scope="module")
def region_fp32(model, tmp_path_factory):
    return _export(model, "region", tmp_path_factory.mktemp("fp32"))


def _session(path):
    import onnxruntime as ort

    return ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])


def _check_cases(path, cases, atol, rtol) -> dict[str, float]:
    """Every case through ORT; returns the largest absolute error per `label/output`."""
    errors = {}
    for case in cases:
        got = run_onnx(path, case.inputs)
        for name, want in case.expected.items():
            mismatch = contract.compare(got[name], want, atol=atol, rtol=rtol)
            assert mismatch is None, f"{path.name} {case.label} {name}: {mismatch}"
            errors[f"{case.label}/{name}"] = float(np.abs(got[name].astype(np.float64) - want).max())
    return errors


# --- registry and facts -------------------------------------------------------------------------------------


def test_registered_by_name():
    assert isinstance(exporter_for("vision"), VisionExporter)
    assert isinstance(exporter_for("region"), RegionExporter)


def test_manifest_facts(model):
    facts = VisionExporter().manifest_facts(model, ExportSettings())
    assert facts == {
        "tile_size": 56,
        "patches_per_tile": 16,
        "vision_width": 48,
        "hidden_size": 96,
        "vis_output_layer": -2,
    }
    region = RegionExporter().manifest_facts(model, ExportSettings())
    assert region == {"tile_size": 56, "patches_per_tile": 16, "vision_width": 48, "hidden_size": 96}


def test_region_unavailable_without_encoder():
    assert not RegionExporter().available(types.SimpleNamespace(config=None))


def test_unknown_precision_is_an_error(model):
    with pytest.raises(ValueError, match="precision: expected one of fp32, fp16, got 'int3'"):
        VisionExporter().graphs(model, ExportSettings(precision="int3"))


# --- vision.onnx --------------------------------------------------------------------------------------------


def test_vision_graph_io_and_validation(model, vision_fp32):
    exporter, settings, graph, path = vision_fp32
    onnx.checker.check_model(str(path), full_check=True)
    proto = onnx.load(str(path))
    assert [i.name for i in proto.graph.input] == list(VISION.inputs)
    assert [o.name for o in proto.graph.output] == list(VISION.outputs)
    assert proto.graph.input[0].type.tensor_type.shape.dim[0].dim_param == "tiles"
    cases = exporter.validation_cases(model, settings, np.random.default_rng(1))["vision"]
    assert [c.label for c in cases] == ["T=1", "T=3", "T=5"]
    _check_cases(path, cases, exporter.atol, exporter.rtol)


def test_vision_one_session_changes_tile_count(model, vision_fp32):
    path = vision_fp32[3]
    sess = _session(path)
    rng = np.random.default_rng(2)
    for tiles in (1, 5, 1):
        pixels = rng.standard_normal((tiles, 3, 56, 56)).astype(np.float32)
        got = dict(zip(VISION.outputs, sess.run(list(VISION.outputs), {VISION.inputs[0]: pixels})))
        want = reference_vision_outputs(model, pixels)
        assert got[VISION.outputs[0]].shape == (tiles, 16, 96)
        assert got[VISION.outputs[1]].shape == (3, 16, 48)
        for name in VISION.outputs:
            contract.assert_close(got[name], want[name], f"T={tiles} {name}")


def test_vision_region_levels_are_the_thumbnails(model, vision_fp32):
    """The levels depend on the last tile only: changing the other tiles leaves them as they were."""
    sess = _session(vision_fp32[3])
    rng = np.random.default_rng(3)
    pixels = rng.standard_normal((3, 3, 56, 56)).astype(np.float32)
    other = pixels.copy()
    other[:2] = rng.standard_normal((2, 3, 56, 56))
    a = sess.run([VISION.outputs[1]], {VISION.inputs[0]: pixels})[0]
    b = sess.run([VISION.outputs[1]], {VISION.inputs[0]: other})[0]
    np.testing.assert_array_equal(a, b)


def test_vision_fp16(model, tmp_path):
    exporter, settings, graph, path = _export(model, "vision", tmp_path, "fp16")
    onnx.checker.check_model(str(path), full_check=True)
    # The reference is left as it was: float32, plain eager attention.
    assert model.vis_encoder.config._attn_implementation == "eager"
    assert next(model.vis_encoder.parameters()).dtype == torch.float32

    proto = onnx.shape_inference.infer_shapes(onnx.load(str(path)))
    for value in (*proto.graph.input, *proto.graph.output):
        assert value.type.tensor_type.elem_type == onnx.TensorProto.FLOAT, value.name
    dtypes = {v.name: v.type.tensor_type.elem_type for v in (*proto.graph.value_info, *proto.graph.input)}
    dtypes.update({i.name: i.data_type for i in proto.graph.initializer})
    kept = [n for n in proto.graph.node if n.op_type in ("LayerNormalization", "Softmax")]
    for node in kept:
        assert all(dtypes[i] == onnx.TensorProto.FLOAT for i in node.input if i), node.name
    assert any(i.data_type == onnx.TensorProto.FLOAT16 for i in proto.graph.initializer)
    fp32_nodes = graph.facts["fp32_nodes"]
    # 2 norms per layer + pre_layrnorm; one softmax per layer (3 layers); post_layernorm is not in the graph
    assert len(fp32_nodes) == len(kept) == 3 * 3 + 1
    assert not any("post_layernorm" in n for n in fp32_nodes)

    cases = exporter.validation_cases(model, settings, np.random.default_rng(4))["vision"]
    errors = _check_cases(path, cases, exporter.fp16_tolerance, exporter.fp16_tolerance)
    assert max(errors.values()) > 1e-6  # it is really computing in half precision


# --- region.onnx --------------------------------------------------------------------------------------------


def test_region_graph_io_and_validation(model, region_fp32):
    exporter, settings, graph, path = region_fp32
    onnx.checker.check_model(str(path), full_check=True)
    proto = onnx.load(str(path))
    assert [i.name for i in proto.graph.input] == list(REGION.inputs)
    assert [o.name for o in proto.graph.output] == list(REGION.outputs)
    # The rewrite is the point: no sampler, no data-dependent shapes or indices, no control flow.
    ops = {n.op_type for n in proto.graph.node}
    assert not ops & {"NonZero", "GridSample", "Loop", "If", "Gather", "GatherND", "ScatterND", "TopK"}, ops
    cases = exporter.validation_cases(model, settings, np.random.default_rng(5))["region"]
    assert [c.label for c in cases] == ["R=1", "R=2", "R=4"]
    _check_cases(path, cases, exporter.atol, exporter.rtol)


def test_region_masks_beyond_official_cap(model, region_fp32):
    """Masks of more than 2304 pixels: the reference pools every pixel and so must the graph."""
    rng = np.random.default_rng(6)
    masks = sample_masks(rng, 56, ["full", "noise", "pixel", "blob", "empty"])
    masks[1] = (rng.random((56, 56)) < 0.85).astype(np.float32)
    assert masks[0].sum() > OFFICIAL_MAX_POINTS and masks[1].sum() > OFFICIAL_MAX_POINTS
    pixels = rng.standard_normal((2, 3, 56, 56)).astype(np.float32)
    values = reference_region_outputs(model, pixels, masks)
    want = values.pop(REGION.outputs[0])
    got = _session(region_fp32[3]).run(list(REGION.outputs), values)[0]
    contract.assert_close(got, want, "region_embeds")
    # An empty mask pools to zero before `up_dim`, i.e. its embedding is the mean of three `up_dim` biases.
    np.testing.assert_allclose(got[4], model.region_encoder.up_dim.bias.numpy(), atol=1e-6)


def test_region_one_session_changes_region_count(model, region_fp32):
    sess = _session(region_fp32[3])
    rng = np.random.default_rng(7)
    pixels = rng.standard_normal((1, 3, 56, 56)).astype(np.float32)
    for kinds in (["blob", "noise", "border_box"], ["pixel"], ["blob"] * 6):
        values = reference_region_outputs(model, pixels, sample_masks(rng, 56, kinds))
        want = values.pop(REGION.outputs[0])
        got = sess.run(list(REGION.outputs), values)[0]
        assert got.shape == (len(kinds), 96)
        contract.assert_close(got, want, f"R={len(kinds)}")


@pytest.mark.parametrize(("size", "grid"), [(112, 8), (336, 24), (30, 5)])
def test_pooling_rewrite_equals_reference_sampler(size, grid):
    """`pool_regions` against the reference's per-pixel `grid_sample` (`RegionEncoder._pool`) directly."""
    rng = np.random.default_rng(size)
    kinds = ["full", "noise", "blob", "border_box", "corner", "far_corner", "pixel", "empty"]
    masks = torch.from_numpy(sample_masks(rng, size, kinds))
    features = torch.from_numpy(rng.standard_normal((len(kinds), 6, grid, grid)).astype(np.float32))
    sampling = bilinear_sampling_matrix(size, grid).astype(np.float32)
    weights = region_pooling_weights(masks, torch.from_numpy(sampling.T.copy()), torch.from_numpy(sampling))
    got = pool_regions(features, weights)
    want = RegionEncoder._pool(features, masks, size, size)
    contract.assert_close(got, want, f"S={size}")
    assert masks[0].sum() > OFFICIAL_MAX_POINTS or size < 48
    assert torch.all(got[-1] == 0)


def test_sampling_matrix_is_grid_sample():
    """Each row of A is `grid_sample` of the one-hot cells at `p / S` (zero padding, align_corners=False)."""
    size, cells = 20, 6
    eye = torch.eye(cells)[:, None, None, :]  # [cells, 1, 1, cells]: one-hot maps along x
    coords = torch.arange(size, dtype=torch.float32) / size * 2 - 1
    grid = torch.stack([coords, torch.zeros(size)], dim=-1)[None, None].expand(cells, 1, size, 2)
    sampled = torch.nn.functional.grid_sample(eye, grid, mode="bilinear", align_corners=False)[:, 0, 0]
    np.testing.assert_allclose(bilinear_sampling_matrix(size, cells), sampled.T.numpy(), atol=1e-6)
