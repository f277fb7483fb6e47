"""The region encoder: visual prompts (masks) to one LLM embedding each.

A small conv stack embeds (image, mask) to the CLIP patch grid; the last three CLIP layers' features of the
thumbnail are added to it one level at a time; at every level the mask's pixels are bilinearly sampled from
the running feature map, averaged, and projected to the LLM width; the three levels are averaged.

**Determinism.** The official encoder samples at most 2304 of the mask's pixels with `torch.multinomial`,
uniformly without replacement. For masks of ≤ 2304 pixels it therefore takes every pixel, which is what we
always do (`pooling="all"`), so the two agree exactly there. For larger masks the official result is a
random subset mean whose expectation is our all-pixel mean; the two differ by sampling noise only.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

#: The official encoder's cap on sampled pixels (48 x 48).
OFFICIAL_MAX_POINTS = 2304


class LayerNorm2d(nn.Module):
    """LayerNorm over the channel axis of an NCHW map."""

    def __init__(self, channels: int, eps: float = 1e-6):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(channels))
        self.bias = nn.Parameter(torch.zeros(channels))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        mean = x.mean(1, keepdim=True)
        var = (x - mean).pow(2).mean(1, keepdim=True)
        x = (x - mean) / torch.sqrt(var + self.eps)
        return self.weight[:, None, None] * x + self.bias[:, None, None]


class RegionEncoder(nn.Module):
    """Args: hidden_dim (256 in the release), embed_dim (CLIP width), out_dim (LLM width), patch_size."""

    def __init__(self, hidden_dim: int, embed_dim: int, out_dim: int, patch_size: int):
        super().__init__()
        if patch_size % 2:
            raise ValueError(f"patch_size must be even, got {patch_size}")
        k = patch_size // 2
        self.mask_embedding = nn.Sequential(
            nn.Conv2d(4, hidden_dim // 4, kernel_size=k, stride=k),
            LayerNorm2d(hidden_dim // 4),
            nn.GELU(),
            nn.Conv2d(hidden_dim // 4, hidden_dim, kernel_size=2, stride=2),
            LayerNorm2d(hidden_dim),
            nn.GELU(),
            nn.Conv2d(hidden_dim, embed_dim, kernel_size=1),
        )
        self.up_dim = nn.Linear(embed_dim, out_dim)

    def forward(
        self, images: torch.Tensor, masks: torch.Tensor, level_features: list[torch.Tensor]
    ) -> torch.Tensor:
        """Encodes R regions.

        Args:
            images: `[R, 3, S, S]` CLIP-normalised thumbnail, repeated per region.
            masks: `[R, 1, S, S]` binary masks in the thumbnail frame.
            level_features: three `[R, P, C]` CLIP hidden states (layers -3, -2, -1) without CLS.

        Returns:
            `[R, out_dim]`.
        """
        if images.shape[-2:] != masks.shape[-2:] or masks.shape[1] != 1:
            raise ValueError(
                f"masks: expected [R, 1, {images.shape[-2]}, {images.shape[-1]}], got {tuple(masks.shape)}"
            )
        masks = masks.to(images.dtype)
        x = self.mask_embedding(torch.cat([images, masks], dim=1))
        regions, _, h, w = x.shape
        mask_h, mask_w = masks.shape[-2:]
        outs = []
        for feats in level_features:
            if feats.dim() == 3:
                feats = feats.reshape(regions, h, w, -1).permute(0, 3, 1, 2)
            x = x + feats
            outs.append(self.up_dim(self._pool(x, masks[:, 0], mask_h, mask_w)))
        return torch.stack(outs).mean(0)

    @staticmethod
    def _pool(features: torch.Tensor, masks: torch.Tensor, mask_h: int, mask_w: int) -> torch.Tensor:
        """Mean of the features bilinearly sampled at every mask pixel (x / W, y / H); 0 for an empty mask."""
        pooled = []
        for r in range(features.shape[0]):
            ys, xs = torch.nonzero(masks[r] > 0, as_tuple=True)
            if ys.numel() == 0:
                pooled.append(features.new_zeros(features.shape[1]))
                continue
            # The official sampler uses (x / W, y / H) as normalised coordinates (no half-pixel shift).
            coords = torch.stack([xs.to(features.dtype) / mask_w, ys.to(features.dtype) / mask_h], dim=-1)
            grid = (2.0 * coords - 1.0)[None, :, None, :]
            sampled = F.grid_sample(features[r : r + 1], grid, mode="bilinear", align_corners=False)
            pooled.append(sampled[0, :, :, 0].mean(-1))
        return torch.stack(pooled)
