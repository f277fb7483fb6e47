"""Multi-scale deformable attention, the core sampling step, in plain PyTorch.

The official UniPose op is CUDA-only and Grounding DINO's fallback uses `grid_sample`; both compute

    out[b, q, h*D:(h+1)*D] = sum_{l, p} A[b, q, h, l, p] * bilinear(V_l[b, :, h], loc[b, q, h, l, p])

with `loc` in [0, 1] relative to level l's (H_l, W_l) map, pixel centres at (i + 0.5) / W_l, and zeros
outside the map. `multi_scale_deformable_attention` is the reference for both decoders;
`multi_scale_deformable_attention_gather` is the export form (explicit bilinear corners and `torch.gather`,
no `grid_sample`), tested against it and against a NumPy implementation of the formula.

Level shapes come in two forms. The reference (`grid_sample`) takes Python ints. The export form also takes
them as tensors, an int64 `[L, 2]` tensor or `(H_l, W_l)` pairs of 0-d tensors (what `x.shape[-2]` is
while `torch.onnx.export` traces), so a traced graph computes every level size, start offset and clamp
bound from the feature maps it is given: one graph serves any input resolution.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence

import torch
import torch.nn.functional as F

#: A level size: a Python int, or a 0-d int64 tensor (a traced size while exporting).
Size = int | torch.Tensor
#: Per-level `(H_l, W_l)`: pairs of sizes, or an int64 `[L, 2]` tensor.
SpatialShapes = Sequence[tuple[Size, Size]] | torch.Tensor


def level_pairs(spatial_shapes: SpatialShapes) -> list[tuple[Size, Size]]:
    """`(H_l, W_l)` per level as a list of pairs; rows of a `[L, 2]` tensor become pairs of 0-d tensors.

    Raises:
        ValueError: a tensor that is not `[L, 2]` integer.
    """
    if isinstance(spatial_shapes, torch.Tensor):
        if spatial_shapes.dim() != 2 or spatial_shapes.shape[-1] != 2 or spatial_shapes.is_floating_point():
            raise ValueError(
                f"spatial_shapes: expected an integer [L, 2] tensor, got {spatial_shapes.dtype} "
                f"{list(spatial_shapes.shape)}"
            )
        return [(spatial_shapes[level, 0], spatial_shapes[level, 1]) for level in range(len(spatial_shapes))]
    return [(h, w) for h, w in spatial_shapes]


def _size_tensor(size: Size, dtype: torch.dtype, device: torch.device | None) -> torch.Tensor:
    if isinstance(size, torch.Tensor):
        return size.to(device=device, dtype=dtype)
    # `torch.full`, not `torch.tensor`: the latter warns while tracing (its result becomes a constant, which
    # is right for a Python number but not worth a warning).
    return torch.full((), size, dtype=dtype, device=device)


def spatial_shapes_tensor(
    spatial_shapes: SpatialShapes, dtype: torch.dtype = torch.int64, device: torch.device | None = None
) -> torch.Tensor:
    """`[L, 2]` tensor of `(H_l, W_l)`, built from the sizes themselves (traced sizes stay traced).

    The same values as `torch.tensor(spatial_shapes, dtype=dtype)`; unlike it, a traced size is not frozen
    into a constant.
    """
    rows = [
        torch.stack((_size_tensor(h, torch.int64, device), _size_tensor(w, torch.int64, device)))
        for h, w in level_pairs(spatial_shapes)
    ]
    return torch.stack(rows).to(dtype)


def _nearest_source_index(in_size: Size, out_size: Size, device: torch.device) -> torch.Tensor:
    """PyTorch's `nearest` source index along one axis: `min(floor(i * (in / out)), in - 1)` in float32.

    The same float32 arithmetic as ATen's `nearest_idx` (the scale is `(float)in / out`), so the indices are
    identical to `F.interpolate(..., mode="nearest")` for every pair of sizes.
    """
    scale = _size_tensor(in_size, torch.float32, device) / _size_tensor(out_size, torch.float32, device)
    index = torch.floor(torch.arange(out_size, dtype=torch.float32, device=device) * scale).to(torch.int64)
    return torch.minimum(index, _size_tensor(in_size, torch.int64, device) - 1)


def resize_mask_nearest(mask: torch.Tensor, size: tuple[Size, Size]) -> torch.Tensor:
    """Nearest-neighbour resize of a `[B, H, W]` mask to `size`, equal to `F.interpolate(mode="nearest")`.

    Written as two row/column gathers with the source indices computed from the sizes: exported, the output
    size follows the traced `size` and the indices are exactly PyTorch's (an ONNX `Resize` recomputes the
    scale as `out / in`, which can round a source index differently).
    """
    height, width = mask.shape[-2:]
    rows = _nearest_source_index(height, size[0], mask.device)
    cols = _nearest_source_index(width, size[1], mask.device)
    # A bool mask is gathered as float32 (as the official code resizes it): Gather on bool is not supported
    # by every ONNX backend.
    values = mask.to(torch.float32) if mask.dtype == torch.bool else mask
    return values.index_select(-2, rows).index_select(-1, cols).to(mask.dtype)


def _check_inputs(
    value: torch.Tensor,
    spatial_shapes: SpatialShapes,
    sampling_locations: torch.Tensor,
    attention_weights: torch.Tensor,
) -> list[tuple[Size, Size]]:
    """Validates the shapes shared by both forms and returns the levels' `(H_l, W_l)` pairs.

    Raises:
        ValueError: naming the mismatch (level count, covered positions, heads, weights' shape).
    """
    if torch.jit.is_tracing():
        # While `torch.onnx.export` traces, shapes are traced values and each Python comparison below warns
        # (TracerWarning). The checks only steer Python control flow, nothing enters the graph, and they
        # still matter here: a wrong `spatial_shapes` would otherwise go unnoticed at the example.
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", torch.jit.TracerWarning)
            return _check_shapes(value, spatial_shapes, sampling_locations, attention_weights)
    return _check_shapes(value, spatial_shapes, sampling_locations, attention_weights)


def _check_shapes(
    value: torch.Tensor,
    spatial_shapes: SpatialShapes,
    sampling_locations: torch.Tensor,
    attention_weights: torch.Tensor,
) -> list[tuple[Size, Size]]:
    """The body of `_check_inputs`."""
    if value.dim() != 4:
        raise ValueError(f"value must be [B, S, heads, D], got shape {tuple(value.shape)}")
    if sampling_locations.dim() != 6 or sampling_locations.shape[-1] != 2:
        raise ValueError(
            f"sampling_locations must be [B, Q, heads, L, P, 2], got shape {tuple(sampling_locations.shape)}"
        )
    pairs = level_pairs(spatial_shapes)
    levels = sampling_locations.shape[3]
    if len(pairs) != levels:
        raise ValueError(f"spatial_shapes has {len(pairs)} levels, sampling_locations has {levels}")
    covered = sum(h * w for h, w in pairs)
    if covered != value.shape[1]:
        raise ValueError(f"value has {value.shape[1]} positions, spatial_shapes cover {int(covered)}")
    if sampling_locations.shape[2] != value.shape[2]:
        raise ValueError(
            f"value has {value.shape[2]} heads, sampling_locations has {sampling_locations.shape[2]}"
        )
    if attention_weights.shape != sampling_locations.shape[:-1]:
        raise ValueError(
            f"attention_weights has shape {tuple(attention_weights.shape)}, expected "
            f"{tuple(sampling_locations.shape[:-1])} (sampling_locations without the last axis)"
        )
    return pairs


def multi_scale_deformable_attention(
    value: torch.Tensor,
    spatial_shapes: list[tuple[int, int]],
    sampling_locations: torch.Tensor,
    attention_weights: torch.Tensor,
) -> torch.Tensor:
    """Samples and mixes multi-scale features.

    Args:
        value: `[B, S, heads, D]`, the levels' flattened maps concatenated along S (row-major per level).
        spatial_shapes: `(H_l, W_l)` per level (read as Python ints; this form is not exported);
            `sum(H_l * W_l) == S`.
        sampling_locations: `[B, Q, heads, L, P, 2]` normalised (x, y) in [0, 1].
        attention_weights: `[B, Q, heads, L, P]`, already softmax-normalised over (L, P).

    Returns:
        `[B, Q, heads * D]`.
    """
    batch, _, heads, dim = value.shape
    _, queries, _, levels, points, _ = sampling_locations.shape
    checked = _check_inputs(value, spatial_shapes, sampling_locations, attention_weights)
    pairs = [(int(h), int(w)) for h, w in checked]
    per_level = value.split([h * w for h, w in pairs], dim=1)
    grids = 2.0 * sampling_locations - 1.0
    sampled = []
    for level, (h, w) in enumerate(pairs):
        # [B, HW, heads, D] -> [B*heads, D, H, W]
        v = per_level[level].flatten(2).transpose(1, 2).reshape(batch * heads, dim, int(h), int(w))
        # [B, Q, heads, P, 2] -> [B*heads, Q, P, 2]
        g = grids[:, :, :, level].transpose(1, 2).flatten(0, 1)
        sampled.append(F.grid_sample(v, g, mode="bilinear", padding_mode="zeros", align_corners=False))
    # [B*heads, D, Q, L*P]
    stacked = torch.stack(sampled, dim=-2).flatten(-2)
    weights = attention_weights.transpose(1, 2).reshape(batch * heads, 1, queries, levels * points)
    out = (stacked * weights).sum(-1).view(batch, heads * dim, queries)
    return out.transpose(1, 2).contiguous()


def multi_scale_deformable_attention_gather(
    value: torch.Tensor,
    spatial_shapes: SpatialShapes,
    sampling_locations: torch.Tensor,
    attention_weights: torch.Tensor,
    level_start_index: torch.Tensor | None = None,
) -> torch.Tensor:
    """Same result as `multi_scale_deformable_attention`, without `grid_sample`.

    TensorRT has silently miscompiled chains of GridSample nodes, so the export form computes the four
    bilinear corners explicitly and reads them with `torch.gather` from the flattened maps. It exports to
    plain ONNX ops (GatherElements, Mul, Add, Floor, Min/Max, comparisons, Cast) that TensorRT parses.
    Corners outside the map are read at a clamped index and multiplied by a zero validity mask, which
    reproduces `grid_sample`'s `padding_mode="zeros"`, `align_corners=False`.

    Shapes may be tensors (see the module docstring): every size-dependent number (the pixel scale of each
    level, the clamp bounds, the row stride and each level's start in `value`) is computed from them with
    tensor ops, so a graph traced with `torch.onnx.export` follows the level shapes of its input: dynamic
    image size as well as query count and batch. Only the number of levels is fixed (by the weights).

    Memory: the levels are processed one at a time and the attention weights are folded into the corner
    weights before the reduction, so the largest intermediate is `[B*heads, Q*P*4, D]` per level (the
    gathered corners and their index), never `[B, Q, heads, L, P, H*W]`.

    Args:
        value: `[B, S, heads, D]`, the levels' flattened maps concatenated along S (row-major per level).
        spatial_shapes: `(H_l, W_l)` per level: Python ints, 0-d int64 tensors or an int64 `[L, 2]` tensor;
            `sum(H_l * W_l) == S`.
        sampling_locations: `[B, Q, heads, L, P, 2]` normalised (x, y) in [0, 1]; values outside are
            allowed and read zeros beyond the map.
        attention_weights: `[B, Q, heads, L, P]`, already softmax-normalised over (L, P).
        level_start_index: optional `[L]` int64 start of each level in S (Deformable DETR's
            `level_start_index`); by default the running sum of `H_l * W_l`.

    Returns:
        `[B, Q, heads * D]`.

    Raises:
        ValueError: if the shapes disagree (see `_check_inputs`).
    """
    batch, _, heads, dim = value.shape
    points = sampling_locations.shape[4]
    pairs = _check_inputs(value, spatial_shapes, sampling_locations, attention_weights)
    dtype, device = sampling_locations.dtype, sampling_locations.device
    # [B, S, heads, D] -> [B*heads, S, D]: each (b, h) map is one row of the gathers below.
    v = value.transpose(1, 2).reshape(batch * heads, -1, dim)
    # [B, Q, heads, L, P, 2] -> [B, heads, Q, L, P, 2]
    locations = sampling_locations.transpose(1, 2)
    weights = attention_weights.transpose(1, 2)
    out = None
    start: Size = 0
    for level, (h, w) in enumerate(pairs):
        if level_start_index is not None:
            start = level_start_index[level]
        h_f, w_f = _size_tensor(h, dtype, device), _size_tensor(w, dtype, device)
        # [B*heads, Q, P]; pixel coordinates with centres on integers (align_corners=False).
        x = locations[..., level, :, 0].reshape(batch * heads, -1, points) * w_f - 0.5
        y = locations[..., level, :, 1].reshape(batch * heads, -1, points) * h_f - 0.5
        x0 = torch.floor(x)
        y0 = torch.floor(y)
        fx = x - x0
        fy = y - y0
        corners_x = (x0, x0 + 1.0, x0, x0 + 1.0)
        corners_y = (y0, y0, y0 + 1.0, y0 + 1.0)
        weight_x = (1.0 - fx, fx, 1.0 - fx, fx)
        weight_y = (1.0 - fy, 1.0 - fy, fy, fy)
        attn = weights[..., level, :].reshape(batch * heads, -1, points)
        last_x, last_y = w_f - 1.0, h_f - 1.0
        indices, corner_weights = [], []
        for cx, cy, wx, wy in zip(corners_x, corners_y, weight_x, weight_y):
            valid = (cx >= 0) & (cx <= last_x) & (cy >= 0) & (cy <= last_y)
            # Clamp in float before the cast: the clamped read is in range and the mask zeroes it.
            xi = torch.minimum(cx.clamp(min=0), last_x).to(torch.int64)
            yi = torch.minimum(cy.clamp(min=0), last_y).to(torch.int64)
            indices.append(start + yi * w + xi)
            corner_weights.append(wx * wy * valid.to(wx.dtype) * attn)
        # [B*heads, Q, P*4]
        index = torch.stack(indices, dim=-1).flatten(-2)
        corner_weight = torch.stack(corner_weights, dim=-1).flatten(-2).to(value.dtype)
        # [B*heads, Q*P*4, D]: gather along S; the index is broadcast over D as GatherElements requires.
        flat_index = index.flatten(1).unsqueeze(-1).expand(-1, -1, dim)
        sampled = torch.gather(v, 1, flat_index).view(batch * heads, -1, points * 4, dim)
        # [B*heads, Q, D]
        contribution = (sampled * corner_weight.unsqueeze(-1)).sum(2)
        out = contribution if out is None else out + contribution
        start = start + h * w
    # [B*heads, Q, D] -> [B, Q, heads * D]
    return out.view(batch, heads, -1, dim).transpose(1, 2).reshape(batch, -1, heads * dim)
