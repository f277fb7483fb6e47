"""Multi-scale deformable attention, the core sampling step, in plain PyTorch.

The official UniPose op is CUDA-only and Grounding DINO's fallback uses `grid_sample`; both compute

    out[b, q, h*D:(h+1)*D] = sum_{l, p} A[b, q, h, l, p] * bilinear(V_l[b, :, h], loc[b, q, h, l, p])

with `loc` in [0, 1] relative to level l's (H_l, W_l) map, pixel centres at (i + 0.5) / W_l, and zeros
outside the map. `multi_scale_deformable_attention` is the reference for both decoders;
`multi_scale_deformable_attention_gather` is the export form (explicit bilinear corners and `torch.gather`,
no `grid_sample`), tested against it and against a NumPy implementation of the formula.
"""

from __future__ import annotations

import warnings

import torch
import torch.nn.functional as F


def _check_inputs(
    value: torch.Tensor,
    spatial_shapes: list[tuple[int, int]],
    sampling_locations: torch.Tensor,
    attention_weights: torch.Tensor,
) -> list[int]:
    """Validates the shapes shared by both forms and returns the per-level sizes `H_l * W_l`.

    Raises:
        ValueError: naming the mismatch (level count, covered positions, heads, weights' shape).
    """
    if torch.jit.is_tracing():
        # While `torch.onnx.export` traces, shapes are traced values and each Python comparison below warns
        # (TracerWarning). The checks only steer Python control flow, nothing enters the graph, and they
        # still matter here: a wrong `spatial_shapes` would otherwise be baked in silently.
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", torch.jit.TracerWarning)
            return _check_shapes(value, spatial_shapes, sampling_locations, attention_weights)
    return _check_shapes(value, spatial_shapes, sampling_locations, attention_weights)


def _check_shapes(
    value: torch.Tensor,
    spatial_shapes: list[tuple[int, int]],
    sampling_locations: torch.Tensor,
    attention_weights: torch.Tensor,
) -> list[int]:
    """The body of `_check_inputs`."""
    if value.dim() != 4:
        raise ValueError(f"value must be [B, S, heads, D], got shape {tuple(value.shape)}")
    if sampling_locations.dim() != 6 or sampling_locations.shape[-1] != 2:
        raise ValueError(
            f"sampling_locations must be [B, Q, heads, L, P, 2], got shape {tuple(sampling_locations.shape)}"
        )
    levels = sampling_locations.shape[3]
    if len(spatial_shapes) != levels:
        raise ValueError(f"spatial_shapes has {len(spatial_shapes)} levels, sampling_locations has {levels}")
    sizes = [int(h) * int(w) for h, w in spatial_shapes]
    if sum(sizes) != value.shape[1]:
        raise ValueError(f"value has {value.shape[1]} positions, spatial_shapes cover {sum(sizes)}")
    if sampling_locations.shape[2] != value.shape[2]:
        raise ValueError(
            f"value has {value.shape[2]} heads, sampling_locations has {sampling_locations.shape[2]}"
        )
    if attention_weights.shape != sampling_locations.shape[:-1]:
        raise ValueError(
            f"attention_weights has shape {tuple(attention_weights.shape)}, expected "
            f"{tuple(sampling_locations.shape[:-1])} (sampling_locations without the last axis)"
        )
    return sizes


def multi_scale_deformable_attention(
    value: torch.Tensor,
    spatial_shapes: list[tuple[int, int]],
    sampling_locations: torch.Tensor,
    attention_weights: torch.Tensor,
) -> torch.Tensor:
    """Samples and mixes multi-scale features.

    Args:
        value: `[B, S, heads, D]`, the levels' flattened maps concatenated along S (row-major per level).
        spatial_shapes: `(H_l, W_l)` per level, as Python ints; `sum(H_l * W_l) == S`.
        sampling_locations: `[B, Q, heads, L, P, 2]` normalised (x, y) in [0, 1].
        attention_weights: `[B, Q, heads, L, P]`, already softmax-normalised over (L, P).

    Returns:
        `[B, Q, heads * D]`.
    """
    batch, _, heads, dim = value.shape
    _, queries, _, levels, points, _ = sampling_locations.shape
    sizes = _check_inputs(value, spatial_shapes, sampling_locations, attention_weights)
    per_level = value.split(sizes, dim=1)
    grids = 2.0 * sampling_locations - 1.0
    sampled = []
    for level, (h, w) in enumerate(spatial_shapes):
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
    spatial_shapes: list[tuple[int, int]],
    sampling_locations: torch.Tensor,
    attention_weights: torch.Tensor,
) -> torch.Tensor:
    """Same result as `multi_scale_deformable_attention`, without `grid_sample`.

    TensorRT has silently miscompiled chains of GridSample nodes, so the export form computes the four
    bilinear corners explicitly and reads them with `torch.gather` from each level's flattened map. It
    exports to plain ONNX ops (Gather/GatherElements, Mul, Add, Floor, Clip, comparisons, Cast) that
    TensorRT parses. Corners outside the map are read at a clamped index and multiplied by a zero validity
    mask, which reproduces `grid_sample`'s `padding_mode="zeros"`, `align_corners=False`.

    It traces with `torch.onnx.export` with a dynamic query count (and batch). `spatial_shapes` are Python
    ints, so the level sizes, split points and clamp bounds are baked into the graph as constants: one
    exported graph serves one set of level shapes, i.e. one input resolution.

    Memory: levels are processed one at a time and the attention weights are folded into the corner
    weights before the reduction, so the largest intermediate is `[B*heads, Q*P*4, D]` per level (the
    gathered corners and their index), never `[B, Q, heads, L, P, H*W]`.

    Args:
        value: `[B, S, heads, D]`, the levels' flattened maps concatenated along S (row-major per level).
        spatial_shapes: `(H_l, W_l)` per level, as Python ints; `sum(H_l * W_l) == S`.
        sampling_locations: `[B, Q, heads, L, P, 2]` normalised (x, y) in [0, 1]; values outside are
            allowed and read zeros beyond the map.
        attention_weights: `[B, Q, heads, L, P]`, already softmax-normalised over (L, P).

    Returns:
        `[B, Q, heads * D]`.

    Raises:
        ValueError: if the shapes disagree (see `_check_inputs`).
    """
    batch, _, heads, dim = value.shape
    points = sampling_locations.shape[4]
    sizes = _check_inputs(value, spatial_shapes, sampling_locations, attention_weights)
    per_level = value.split(sizes, dim=1)
    # [B, Q, heads, L, P, 2] -> [B, heads, Q, L, P, 2]: heads next to batch so each (b, h) map is one row
    # of the gather below.
    locations = sampling_locations.transpose(1, 2)
    weights = attention_weights.transpose(1, 2)
    out = None
    for level, (h, w) in enumerate(spatial_shapes):
        h, w = int(h), int(w)
        # [B, HW, heads, D] -> [B*heads, HW, D]
        v = per_level[level].transpose(1, 2).reshape(batch * heads, h * w, dim)
        # [B*heads, Q, P]; pixel coordinates with centres on integers (align_corners=False).
        x = locations[..., level, :, 0].reshape(batch * heads, -1, points) * w - 0.5
        y = locations[..., level, :, 1].reshape(batch * heads, -1, points) * h - 0.5
        x0 = torch.floor(x)
        y0 = torch.floor(y)
        fx = x - x0
        fy = y - y0
        corners_x = (x0, x0 + 1.0, x0, x0 + 1.0)
        corners_y = (y0, y0, y0 + 1.0, y0 + 1.0)
        weight_x = (1.0 - fx, fx, 1.0 - fx, fx)
        weight_y = (1.0 - fy, 1.0 - fy, fy, fy)
        attn = weights[..., level, :].reshape(batch * heads, -1, points)
        indices, corner_weights = [], []
        for cx, cy, wx, wy in zip(corners_x, corners_y, weight_x, weight_y):
            valid = (cx >= 0) & (cx <= w - 1) & (cy >= 0) & (cy <= h - 1)
            # Clamp in float before the cast: the clamped read is in range and the mask zeroes it.
            xi = cx.clamp(0, w - 1).to(torch.int64)
            yi = cy.clamp(0, h - 1).to(torch.int64)
            indices.append(yi * w + xi)
            corner_weights.append(wx * wy * valid.to(wx.dtype) * attn)
        # [B*heads, Q, P*4]
        index = torch.stack(indices, dim=-1).flatten(-2)
        corner_weight = torch.stack(corner_weights, dim=-1).flatten(-2).to(value.dtype)
        # [B*heads, Q*P*4, D]: gather along HW; the index is broadcast over D as GatherElements requires.
        flat_index = index.flatten(1).unsqueeze(-1).expand(-1, -1, dim)
        sampled = torch.gather(v, 1, flat_index).view(batch * heads, -1, points * 4, dim)
        # [B*heads, Q, D]
        contribution = (sampled * corner_weight.unsqueeze(-1)).sum(2)
        out = contribution if out is None else out + contribution
    # [B*heads, Q, D] -> [B, Q, heads * D]
    return out.view(batch, heads, -1, dim).transpose(1, 2).reshape(batch, -1, heads * dim)
