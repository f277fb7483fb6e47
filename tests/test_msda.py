"""Multi-scale deformable attention: both PyTorch forms against a NumPy implementation of the formula,
against each other, on bad inputs, and through ONNX export (no GridSample) and ONNX Runtime."""

from __future__ import annotations

import importlib.util
import io

import numpy as np
import pytest
import torch
from visionllm_edge.export.models.msda import (
    multi_scale_deformable_attention,
    multi_scale_deformable_attention_gather,
)

FORMS = {
    "grid_sample": multi_scale_deformable_attention,
    "gather": multi_scale_deformable_attention_gather,
}
TOL = 1e-5


def msda_numpy(
    value: np.ndarray,
    spatial_shapes: list[tuple[int, int]],
    locations: np.ndarray,
    weights: np.ndarray,
) -> np.ndarray:
    """The formula in float64, written independently of the corner/floor logic under test.

    Bilinear sampling with zeros outside is the separable tent kernel summed over the map's pixels:
    `bilinear(V, x, y) = sum_{i, j} V[i, j] * max(0, 1 - |px - j|) * max(0, 1 - |py - i|)` with
    `px = x * W - 0.5`, `py = y * H - 0.5` (pixel centres at (j + 0.5) / W). Pixels beyond the map are
    absent from the sum, which is exactly the zero padding.
    """
    value = value.astype(np.float64)
    locations = locations.astype(np.float64)
    weights = weights.astype(np.float64)
    batch, _, heads, dim = value.shape
    queries = locations.shape[1]
    out = np.zeros((batch, queries, heads, dim))
    start = 0
    for level, (h, w) in enumerate(spatial_shapes):
        v = value[:, start : start + h * w].reshape(batch, h, w, heads, dim)
        start += h * w
        px = locations[:, :, :, level, :, 0] * w - 0.5  # [B, Q, heads, P]
        py = locations[:, :, :, level, :, 1] * h - 0.5
        kx = np.maximum(0.0, 1.0 - np.abs(px[..., None] - np.arange(w)))  # [B, Q, heads, P, W]
        ky = np.maximum(0.0, 1.0 - np.abs(py[..., None] - np.arange(h)))  # [B, Q, heads, P, H]
        a = weights[:, :, :, level]  # [B, Q, heads, P]
        out += np.einsum("bqhp,bqhpi,bqhpj,bijhd->bqhd", a, ky, kx, v, optimize=True)
    return out.reshape(batch, queries, heads * dim)


def _random_case(
    seed: int,
    spatial_shapes: list[tuple[int, int]],
    batch: int = 2,
    queries: int = 7,
    heads: int = 3,
    dim: int = 4,
    points: int = 3,
    low: float = -0.3,
    high: float = 1.3,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Random float32 inputs; locations spread over [low, high] so some fall outside the maps."""
    g = torch.Generator().manual_seed(seed)
    levels = len(spatial_shapes)
    total = sum(h * w for h, w in spatial_shapes)
    value = torch.randn(batch, total, heads, dim, generator=g)
    loc = low + (high - low) * torch.rand(batch, queries, heads, levels, points, 2, generator=g)
    logits = torch.randn(batch, queries, heads, levels * points, generator=g)
    weights = logits.softmax(-1).view(batch, queries, heads, levels, points)
    return value, loc, weights


def _put_special_locations(loc: torch.Tensor, spatial_shapes: list[tuple[int, int]]) -> torch.Tensor:
    """Overwrites the first points with exact borders, pixel centres, pixel edges and far-outside values."""
    loc = loc.clone()
    specials = torch.tensor(
        [
            [0.0, 0.0],
            [1.0, 1.0],
            [0.0, 1.0],
            [1.0, 0.5],
            [0.5, 0.0],
            [-1.0, 0.5],  # a whole map outside
            [2.0, 2.0],
            [-0.25, 1.25],
        ]
    )
    n = min(len(specials), loc.shape[1])
    loc[:, :n, :, :, 0] = specials[:n, None, None, :]
    for level, (h, w) in enumerate(spatial_shapes):
        # Exact pixel centres ((j + 0.5) / W) and pixel edges (j / W) on the second point, where P > 1.
        if loc.shape[4] > 1:
            for q in range(min(loc.shape[1], w + 1)):
                loc[:, q, :, level, 1, 0] = (q + 0.5 * (q % 2)) / w
            for q in range(min(loc.shape[1], h + 1)):
                loc[:, q, :, level, 1, 1] = (q + 0.5 * ((q + 1) % 2)) / h
    return loc


CASES = [
    # (seed, spatial_shapes, heads, points)
    (0, [(4, 6), (2, 3), (1, 1)], 3, 3),
    (1, [(5, 3), (1, 1)], 2, 4),
    (2, [(1, 1)], 1, 1),
    (3, [(7, 2), (3, 5), (2, 2), (1, 4)], 4, 2),
    (4, [(1, 6), (6, 1)], 2, 3),
]


@pytest.mark.parametrize("form", sorted(FORMS))
@pytest.mark.parametrize(("seed", "spatial_shapes", "heads", "points"), CASES)
def test_matches_numpy_formula(form, seed, spatial_shapes, heads, points):
    value, loc, weights = _random_case(seed, spatial_shapes, heads=heads, points=points, queries=9)
    loc = _put_special_locations(loc, spatial_shapes)
    expected = msda_numpy(value.numpy(), spatial_shapes, loc.numpy(), weights.numpy())
    got = FORMS[form](value, spatial_shapes, loc, weights)
    assert got.shape == (2, 9, heads * value.shape[-1])
    assert np.abs(got.double().numpy() - expected).max() <= TOL


@pytest.mark.parametrize("form", sorted(FORMS))
def test_outside_everywhere_is_zero(form):
    spatial_shapes = [(3, 4), (1, 1)]
    value, loc, weights = _random_case(5, spatial_shapes, low=1.6, high=3.0)
    got = FORMS[form](value, spatial_shapes, loc, weights)
    assert torch.count_nonzero(got) == 0


def test_gather_equals_grid_sample_large():
    spatial_shapes = [(32, 40), (16, 20), (8, 10), (4, 5)]
    value, loc, weights = _random_case(6, spatial_shapes, queries=300, heads=8, dim=32, points=4)
    reference = multi_scale_deformable_attention(value, spatial_shapes, loc, weights)
    got = multi_scale_deformable_attention_gather(value, spatial_shapes, loc, weights)
    assert (got - reference).abs().max().item() <= TOL


@pytest.mark.parametrize("form", sorted(FORMS))
def test_bad_inputs_raise(form):
    fn = FORMS[form]
    spatial_shapes = [(4, 6), (2, 3)]
    value, loc, weights = _random_case(7, spatial_shapes)
    with pytest.raises(ValueError, match="positions, spatial_shapes cover"):
        fn(value[:, :-1], spatial_shapes, loc, weights)
    with pytest.raises(ValueError, match="levels"):
        fn(value, spatial_shapes[:1], loc, weights)
    with pytest.raises(ValueError, match="levels"):
        fn(value, [*spatial_shapes, (1, 1)], loc, weights)
    with pytest.raises(ValueError, match="heads"):
        fn(value[:, :, :2], spatial_shapes, loc, weights)
    with pytest.raises(ValueError, match="attention_weights"):
        fn(value, spatial_shapes, loc, weights[..., :2])


class _GatherMSDA(torch.nn.Module):
    """A tiny exportable wrapper: spatial shapes are constants, the query count is dynamic."""

    def __init__(self, spatial_shapes: list[tuple[int, int]]):
        super().__init__()
        self.spatial_shapes = spatial_shapes

    def forward(self, value, locations, weights):
        return multi_scale_deformable_attention_gather(value, self.spatial_shapes, locations, weights)


def test_onnx_export_has_no_grid_sample_and_matches_ort():
    onnx = pytest.importorskip("onnx")
    spatial_shapes = [(4, 6), (2, 3), (1, 1)]
    value, loc, weights = _random_case(8, spatial_shapes, queries=5)
    module = _GatherMSDA(spatial_shapes).eval()
    buffer = io.BytesIO()
    # The TorchScript exporter: the dynamo one needs onnxscript, which is not a dependency.
    torch.onnx.export(
        module,
        (value, loc, weights),
        buffer,
        dynamo=False,
        opset_version=17,
        input_names=["value", "locations", "weights"],
        output_names=["out"],
        dynamic_axes={"locations": {1: "queries"}, "weights": {1: "queries"}, "out": {1: "queries"}},
    )
    model = onnx.load_from_string(buffer.getvalue())
    onnx.checker.check_model(model)
    op_types = {node.op_type for node in model.graph.node}
    assert "GridSample" not in op_types
    assert op_types & {"Gather", "GatherElements"}

    if importlib.util.find_spec("onnxruntime") is None:
        return
    import onnxruntime as ort

    session = ort.InferenceSession(buffer.getvalue(), providers=["CPUExecutionProvider"])
    for queries, seed in ((5, 9), (13, 10)):
        value, loc, weights = _random_case(seed, spatial_shapes, queries=queries)
        loc = _put_special_locations(loc, spatial_shapes)
        (got,) = session.run(
            None, {"value": value.numpy(), "locations": loc.numpy(), "weights": weights.numpy()}
        )
        expected = module(value, loc, weights).numpy()
        assert got.shape == expected.shape == (2, queries, value.shape[2] * value.shape[3])
        assert np.abs(got - expected).max() <= TOL
