"""Multi-scale deformable attention, the core sampling step, in plain PyTorch.

The official UniPose op is CUDA-only and Grounding DINO's fallback uses `grid_sample`; both compute

    out[b, q, h*D:(h+1)*D] = sum_{l, p} A[b, q, h, l, p] * bilinear(V_l[b, :, h], loc[b, q, h, l, p])

with `loc` in [0, 1] relative to level l's (H_l, W_l) map, pixel centres at (i + 0.5) / W_l, and zeros
outside the map. This module is the reference for both decoders; the export patch (a gather-based
bilinear form that TensorRT parses correctly) is tested against it.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


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
    if len(spatial_shapes) != levels:
        raise ValueError(f"spatial_shapes has {len(spatial_shapes)} levels, sampling_locations has {levels}")
    sizes = [int(h) * int(w) for h, w in spatial_shapes]
    if sum(sizes) != value.shape[1]:
        raise ValueError(f"value has {value.shape[1]} positions, spatial_shapes cover {sum(sizes)}")
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
