"""UniPose, the keypoint decoder behind `[POSE]`, as a plain-PyTorch inference reference.

This follows the official OpenGVLab VisionLLM v2 `UniPose` (a Grounding-DINO-style detector with keypoint
groups) operation for operation, in eval mode only: no losses, no denoising queries, no BERT. The "text" side
is the LLM: the 4 hidden states of every object / keypoint query go through the `projection_llava` /
`projection_kpt_llava` MLPs and are averaged.

Pipeline, per image:

1. Swin backbone (stages 1-3) plus one extra stride-2 level, each projected to `hidden_dim` and given a sine
   position embedding computed from the padding mask.
2. Encoder: per layer, image-text fusion (bi-directional attention), a text self-attention layer, and a
   multi-scale deformable self-attention layer over the image tokens.
3. Two-stage query selection: the `num_queries` image tokens with the highest object score become the
   decoder's reference boxes.
4. Decoder: the first `num_box_decoder_layers` (2) layers refine boxes; after the last of them the best G
   (`num_select`, 50) queries each become a group of 1 box row + K (`num_body_points`, 68) keypoint rows
   (G * (K + 1) = 3450 rows); later layers refine boxes and keypoints.
5. Heads on the last layer: object logits (dot product with the projected object queries), boxes and K
   keypoints per group.

The official code hard-wires 68 keypoints, 50 groups and 2 box-only decoder layers; the released config
carries the same numbers under `num_body_points`, `num_select` and `num_box_decoder_layers`. Here they are
read from the config (those values by default), so that a smaller model can use fewer keypoints and groups;
the official sizes build the official model. The decoder self-attention mask of the keypoint layers is
reproduced *exactly*, including its off-by-one windows (see `pose_self_attention_mask`).

The deformable attention runs through `msda.multi_scale_deformable_attention` (float32, like the official
op). Nothing here caches input-size-dependent state; masks and grids are rebuilt per call on the input's
device, from the maps' own shapes with tensor arithmetic (no `int()` of a shape, no size-dependent Python
branch), so a graph traced with `torch.onnx.export` takes any padded image size.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from .msda import multi_scale_deformable_attention, resize_mask_nearest, spatial_shapes_tensor
from .unipose_swin import SWIN_PRESETS, SwinBackbone

#: Official default of `num_body_points`, the keypoint rows per group (the official decoder is built without
#: passing the config value, so it is always 68 there).
NUM_BODY_POINTS = 68
#: Official default of `num_select`, the pose groups kept after the box-only layers (hard-coded in the
#: official decoder, forward and mask).
NUM_GROUPS = 50
#: Official default of `num_box_decoder_layers`, the decoder layers that refine boxes only (the official
#: decoder's default, never taken from the config).
NUM_BOX_DECODER_LAYERS = 2
#: Official default of `hidden_dim`.
HIDDEN_DIM = 256
#: Rows of the decoder's `hw` embedding in the official checkpoint; keypoints beyond go to `hw_append`.
HW_ROWS = 17

# Config values the official code asserts or silently relies on; anything else builds a different model.
_REQUIRED: dict[str, Any] = {
    "two_stage_type": "standard",
    "query_dim": 4,
    "dec_pred_bbox_embed_share": True,
    "dec_pred_class_embed_share": True,
    "two_stage_bbox_embed_share": False,
    "two_stage_class_embed_share": False,
    "two_stage_add_query_num": 0,
    "two_stage_pat_embed": 0,
    "two_stage_learn_wh": False,
    "binary_query_selection": False,
    "embed_init_tgt": True,
    "decoder_sa_type": "sa",
    "use_text_enhancer": True,
    "use_fusion_layer": True,
    "use_text_cross_attention": True,
    "transformer_activation": "relu",
    "pre_norm": False,
    "position_embedding": "sine",
    "dilation": False,
    "add_channel_attention": False,
    "use_deformable_box_attn": False,
    "ffn_extra_layernorm": False,
    "return_interm_indices": [1, 2, 3],
}
# Attributes the released config may lack; the values the official model was built with.
_ASSUMED: dict[str, Any] = {
    "num_body_points": NUM_BODY_POINTS,
    "num_select": NUM_GROUPS,
    "num_box_decoder_layers": NUM_BOX_DECODER_LAYERS,
    "hidden_dim": HIDDEN_DIM,
    "sub_sentence_present": True,
    "focal_alpha": 0.25,
}
_NEEDED = (
    "nheads", "num_queries", "num_feature_levels", "enc_layers", "dec_layers",
    "dim_feedforward", "enc_n_points", "dec_n_points", "l_hidden_size", "backbone",
    "pe_temperatureH", "pe_temperatureW",
)  # fmt: skip


# --- small helpers ------------------------------------------------------------------------------------


def inverse_sigmoid(x: torch.Tensor, eps: float = 1e-3) -> torch.Tensor:
    """`log(x / (1 - x))` with both terms clamped at `eps`, the official variant (eps 1e-3)."""
    x = x.clamp(min=0, max=1)
    return torch.log(x.clamp(min=eps) / (1 - x).clamp(min=eps))


class MLP(nn.Module):
    """Linear layers with ReLU between them (parameter names `layers.{i}`).

    Args:
        in_dim: Input width.
        hidden_dim: Width of every hidden layer.
        out_dim: Output width.
        num_layers: Number of linear layers.
    """

    def __init__(self, in_dim: int, hidden_dim: int, out_dim: int, num_layers: int):
        super().__init__()
        dims = [in_dim] + [hidden_dim] * (num_layers - 1) + [out_dim]
        self.layers = nn.ModuleList(nn.Linear(a, b) for a, b in zip(dims[:-1], dims[1:]))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """`[..., in_dim]` -> `[..., out_dim]`."""
        for i, layer in enumerate(self.layers):
            x = layer(x)
            if i < len(self.layers) - 1:
                x = F.relu(x)
        return x


class MultiheadAttention(nn.Module):
    """Batch-first multi-head attention with `nn.MultiheadAttention`'s parameter names.

    Written out so that the masks' meaning is explicit (`blocked`: True = may not attend) and the module
    stays exportable; numerically it is the same scaled dot-product attention.

    Args:
        dim: Model width.
        heads: Attention heads.
    """

    def __init__(self, dim: int, heads: int):
        super().__init__()
        self.heads = heads
        self.in_proj_weight = nn.Parameter(torch.empty(3 * dim, dim))
        self.in_proj_bias = nn.Parameter(torch.zeros(3 * dim))
        self.out_proj = nn.Linear(dim, dim)
        nn.init.xavier_uniform_(self.in_proj_weight)

    def forward(
        self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, blocked: torch.Tensor | None = None
    ) -> torch.Tensor:
        """Attends `query` to `key`/`value`.

        Args:
            query: `[B, Lq, C]`.
            key: `[B, Lk, C]`.
            value: `[B, Lk, C]`.
            blocked: bool, broadcastable to `[B, heads, Lq, Lk]`; True = this pair is masked out.

        Returns:
            `[B, Lq, C]`.
        """
        b, lq, c = query.shape
        lk = key.shape[1]
        d = c // self.heads
        wq, wk, wv = self.in_proj_weight.chunk(3)
        bq, bk, bv = self.in_proj_bias.chunk(3)
        q = F.linear(query, wq, bq).view(b, lq, self.heads, d).transpose(1, 2)
        k = F.linear(key, wk, bk).view(b, lk, self.heads, d).transpose(1, 2)
        v = F.linear(value, wv, bv).view(b, lk, self.heads, d).transpose(1, 2)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=None if blocked is None else ~blocked)
        return self.out_proj(out.transpose(1, 2).reshape(b, lq, c))


class MSDeformAttn(nn.Module):
    """Multi-scale deformable attention with the official parameter names.

    Args:
        dim: Model width.
        levels: Feature levels.
        heads: Attention heads.
        points: Sampling points per head and level.
    """

    def __init__(self, dim: int, levels: int, heads: int, points: int):
        super().__init__()
        self.levels, self.heads, self.points = levels, heads, points
        self.sampling_offsets = nn.Linear(dim, heads * levels * points * 2)
        self.attention_weights = nn.Linear(dim, heads * levels * points)
        self.value_proj = nn.Linear(dim, dim)
        self.output_proj = nn.Linear(dim, dim)

    def forward(
        self,
        query: torch.Tensor,
        reference_points: torch.Tensor,
        value: torch.Tensor,
        spatial_shapes: list[tuple[int, int]],
        padding_mask: torch.Tensor,
    ) -> torch.Tensor:
        """Samples `value` around the reference points.

        Args:
            query: `[B, Q, C]`.
            reference_points: `[B, Q, levels, 2]` points or `[B, Q, levels, 4]` boxes (cx, cy, w, h),
                in [0, 1].
            value: `[B, S, C]` flattened levels.
            spatial_shapes: `(H_l, W_l)` per level.
            padding_mask: `[B, S]`, True = padding (its values are zeroed).

        Returns:
            `[B, Q, C]`.
        """
        b, q, _ = query.shape
        s = value.shape[1]
        v = self.value_proj(value).masked_fill(padding_mask[..., None], 0.0)
        v = v.view(b, s, self.heads, -1)
        offsets = self.sampling_offsets(query).view(b, q, self.heads, self.levels, self.points, 2)
        weights = self.attention_weights(query).view(b, q, self.heads, self.levels * self.points)
        weights = weights.softmax(-1).view(b, q, self.heads, self.levels, self.points)
        if reference_points.shape[-1] == 2:
            # Offsets are in pixels of each level: normalise by (W_l, H_l), from the (possibly traced) sizes.
            norm = spatial_shapes_tensor([(w, h) for h, w in spatial_shapes], offsets.dtype, offsets.device)
            loc = reference_points[:, :, None, :, None, :] + offsets / norm[None, None, None, :, None, :]
        else:
            # Offsets are relative to the reference box: scaled by half its size over the point count.
            ref = reference_points[:, :, None, :, None]
            loc = ref[..., :2] + offsets / self.points * ref[..., 2:] * 0.5
        # The official op runs in float32 whatever the model dtype.
        out = multi_scale_deformable_attention(v.float(), spatial_shapes, loc.float(), weights.float())
        return self.output_proj(out.to(value.dtype))


def contrastive_logits(x: torch.Tensor, text: torch.Tensor, text_valid: torch.Tensor) -> torch.Tensor:
    """Object logits: dot product of queries with the (encoded) object queries; -inf on invalid slots.

    Args:
        x: `[B, Q, C]`.
        text: `[B, T, C]`.
        text_valid: `[B, T]` bool, True = a real object query.

    Returns:
        `[B, Q, T]`.
    """
    return (x @ text.transpose(-1, -2)).masked_fill(~text_valid[:, None, :], float("-inf"))


def _sine_2d(mask: torch.Tensor, num_feats: int, temp_h: float, temp_w: float) -> torch.Tensor:
    """Normalised sine position embedding of the valid area, `[B, 2 * num_feats, H, W]` (y half first)."""
    valid = ~mask
    y = valid.cumsum(1, dtype=torch.float32)
    x = valid.cumsum(2, dtype=torch.float32)
    eps, scale = 1e-6, 2 * math.pi
    y = y / (y[:, -1:, :] + eps) * scale
    x = x / (x[:, :, -1:] + eps) * scale
    dim = torch.arange(num_feats, dtype=torch.float32, device=mask.device)
    px = x[..., None] / temp_w ** (2 * (dim // 2) / num_feats)
    py = y[..., None] / temp_h ** (2 * (dim // 2) / num_feats)
    px = torch.stack((px[..., 0::2].sin(), px[..., 1::2].cos()), dim=4).flatten(3)
    py = torch.stack((py[..., 0::2].sin(), py[..., 1::2].cos()), dim=4).flatten(3)
    return torch.cat((py, px), dim=3).permute(0, 3, 1, 2)


def _sine_1d(pos: torch.Tensor, num_feats: int, temperature: float = 10000.0) -> torch.Tensor:
    """Interleaved sin/cos embedding of `pos * 2pi`, `[..., num_feats]`."""
    dim = torch.arange(num_feats, dtype=torch.float32, device=pos.device)
    dim = temperature ** (2 * torch.div(dim, 2, rounding_mode="floor") / num_feats)
    e = pos.to(torch.float32)[..., None] * (2 * math.pi) / dim
    return torch.stack((e[..., 0::2].sin(), e[..., 1::2].cos()), dim=-1).flatten(-2)


def _sine_box(box: torch.Tensor, num_feats: int = HIDDEN_DIM // 2) -> torch.Tensor:
    """`[B, Q, 4]` (cx, cy, w, h) -> `[B, Q, 4 * num_feats]`, blocks in the order y, x, w, h.

    The official code fixes `num_feats` at 128 (`hidden_dim` 256); here it is `hidden_dim // 2`, so that the
    embedding keeps the width `2 * hidden_dim` that `ref_point_head` takes.
    """
    dim = torch.arange(num_feats, dtype=torch.float32, device=box.device)
    dim = 10000 ** (2 * (dim // 2) / num_feats)

    def embed(c: torch.Tensor) -> torch.Tensor:
        e = (c * (2 * math.pi))[..., None] / dim
        return torch.stack((e[..., 0::2].sin(), e[..., 1::2].cos()), dim=-1).flatten(-2)

    return torch.cat([embed(box[..., i]) for i in (1, 0, 2, 3)], dim=-1)


def _valid_ratio(mask: torch.Tensor) -> torch.Tensor:
    """Fraction of unpadded columns and rows of a `[B, H, W]` padding mask, `[B, 2]` as (w, h)."""
    valid_w = (~mask[:, 0, :]).sum(1).float() / mask.shape[2]
    valid_h = (~mask[:, :, 0]).sum(1).float() / mask.shape[1]
    return torch.stack([valid_w, valid_h], -1)


def _resize_mask(mask: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Nearest-neighbour resize of a `[B, H, W]` bool mask (the official `F.interpolate` default mode).

    `resize_mask_nearest` picks exactly `F.interpolate`'s source pixels, as gathers that follow a traced size.
    """
    return resize_mask_nearest(mask, size)


def pose_self_attention_mask(kpt_mask: torch.Tensor, num_groups: int = NUM_GROUPS) -> torch.Tensor:
    """The decoder self-attention mask of the keypoint layers, exactly as the official inference builds it.

    The official intent is block-diagonal groups of `1 + K` rows (box + K keypoints). Its code does two
    passes that do not line up, and the trained model saw the result, so it is reproduced here:

    1. For rows `r < G*K` (not `G*(K+1)`), everything outside the window `[K*(r//K), K*(r//K+1))` is
       blocked, except that the right side stays open when that window ends at `G*K`. Rows `G*K..` are
       untouched (open).
    2. Each diagonal `(K+1) x (K+1)` group block is then overwritten: row i may see column j of its own
       group iff `kpt_mask[i] == kpt_mask[j]` (so padded keypoints see each other, not the real ones).

    Args:
        kpt_mask: `[B, K+1]` bool: `[True, kpt_query_masks[:, :K]...]`.
        num_groups: G.

    Returns:
        `[B, G*(K+1), G*(K+1)]` bool, True = blocked.
    """
    b, group = kpt_mask.shape
    k = group - 1
    n = num_groups * group
    dev = kpt_mask.device
    idx = torch.arange(n, device=dev)
    window = idx // k
    start, end = window * k, (window + 1) * k
    first_pass = (idx[None, :] < start[:, None]) | (
        (idx[None, :] >= end[:, None]) & (end[:, None] < num_groups * k)
    )
    # Out of place: the in-place `&=` (aten::__iand_) has no ONNX export.
    first_pass = first_pass & (idx < num_groups * k)[:, None]
    same_group = (idx // group)[:, None] == (idx // group)[None, :]
    member = kpt_mask[:, idx % group]  # [B, n]
    differs = member[:, :, None] != member[:, None, :]
    # Boolean algebra rather than `torch.where` on bools: ONNX Runtime has no bool `Where` kernel.
    return (same_group[None] & differs) | (~same_group[None] & first_pass[None])


# --- encoder ------------------------------------------------------------------------------------------


class BiMultiHeadAttention(nn.Module):
    """Image <-> text cross attention of the fusion layer, both directions from one score matrix.

    Args:
        v_dim: Image token width.
        l_dim: Text token width.
        embed_dim: Attention width.
        heads: Attention heads.
    """

    def __init__(self, v_dim: int, l_dim: int, embed_dim: int, heads: int):
        super().__init__()
        self.heads = heads
        self.scale = (embed_dim // heads) ** -0.5
        self.v_proj = nn.Linear(v_dim, embed_dim)
        self.l_proj = nn.Linear(l_dim, embed_dim)
        self.values_v_proj = nn.Linear(v_dim, embed_dim)
        self.values_l_proj = nn.Linear(l_dim, embed_dim)
        self.out_v_proj = nn.Linear(embed_dim, v_dim)
        self.out_l_proj = nn.Linear(embed_dim, l_dim)

    def _heads(self, x: torch.Tensor) -> torch.Tensor:
        b, n, _ = x.shape
        return x.view(b, n, self.heads, -1).transpose(1, 2)

    def forward(
        self, v: torch.Tensor, l: torch.Tensor, v_pad: torch.Tensor, l_pad: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Returns the updates `(delta_v [B, Nv, v_dim], delta_l [B, Nl, l_dim])`; pads are True = padding."""
        b, nv, _ = v.shape
        nl = l.shape[1]
        q = self._heads(self.v_proj(v) * self.scale)
        k = self._heads(self.l_proj(l))
        vals_v = self._heads(self.values_v_proj(v))
        vals_l = self._heads(self.values_l_proj(l))
        scores = q @ k.transpose(-1, -2)  # [B, H, Nv, Nl]
        # The official stabiliser subtracts one global max (over the whole batch) and clamps to +-5e4 for
        # fp16; softmax ignores the shift, the clamp only bites on extreme values. Kept for parity.
        scores = (scores - scores.max()).clamp(min=-50000, max=50000)
        scores_l = scores.transpose(-1, -2)
        scores_l = (scores_l - scores_l.amax(-1, keepdim=True)).clamp(min=-50000, max=50000)
        probs_l = scores_l.masked_fill(v_pad[:, None, None, :], float("-inf")).softmax(-1)
        probs_v = scores.masked_fill(l_pad[:, None, None, :], float("-inf")).softmax(-1)
        out_v = (probs_v @ vals_l).transpose(1, 2).reshape(b, nv, -1)
        out_l = (probs_l @ vals_v).transpose(1, 2).reshape(b, nl, -1)
        return self.out_v_proj(out_v), self.out_l_proj(out_l)


class FusionLayer(nn.Module):
    """Pre-norm bi-directional image-text attention with per-channel layer scales `gam_v`, `gam_l`.

    Note the residuals start from the *normalised* inputs, as in the official block.
    """

    def __init__(self, dim: int, embed_dim: int, heads: int):
        super().__init__()
        self.gam_v = nn.Parameter(torch.full((dim,), 1e-4))
        self.gam_l = nn.Parameter(torch.full((dim,), 1e-4))
        self.layer_norm_v = nn.LayerNorm(dim)
        self.layer_norm_l = nn.LayerNorm(dim)
        self.attn = BiMultiHeadAttention(dim, dim, embed_dim, heads)

    def forward(
        self, v: torch.Tensor, l: torch.Tensor, v_pad: torch.Tensor, l_pad: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """`(image [B, Nv, C], text [B, Nl, C])` -> updated pair."""
        v = self.layer_norm_v(v)
        l = self.layer_norm_l(l)
        dv, dl = self.attn(v, l, v_pad, l_pad)
        return v + self.gam_v * dv, l + self.gam_l * dl


class TextEnhancerLayer(nn.Module):
    """Post-norm self-attention + ReLU FFN over the object-query tokens."""

    def __init__(self, dim: int, heads: int, ffn: int):
        super().__init__()
        self.self_attn = MultiheadAttention(dim, heads)
        self.linear1 = nn.Linear(dim, ffn)
        self.linear2 = nn.Linear(ffn, dim)
        self.norm1 = nn.LayerNorm(dim)
        self.norm2 = nn.LayerNorm(dim)

    def forward(self, text: torch.Tensor, pos: torch.Tensor, blocked: torch.Tensor) -> torch.Tensor:
        """`[B, T, C]` -> `[B, T, C]`; `blocked` `[B, heads, T, T]` True = masked."""
        qk = text + pos
        text = self.norm1(text + self.self_attn(qk, qk, text, blocked))
        return self.norm2(text + self.linear2(F.relu(self.linear1(text))))


class DeformableEncoderLayer(nn.Module):
    """Post-norm multi-scale deformable self-attention + ReLU FFN over the image tokens."""

    def __init__(self, dim: int, ffn: int, levels: int, heads: int, points: int):
        super().__init__()
        self.self_attn = MSDeformAttn(dim, levels, heads, points)
        self.norm1 = nn.LayerNorm(dim)
        self.linear1 = nn.Linear(dim, ffn)
        self.linear2 = nn.Linear(ffn, dim)
        self.norm2 = nn.LayerNorm(dim)

    def forward(
        self,
        src: torch.Tensor,
        pos: torch.Tensor,
        reference_points: torch.Tensor,
        spatial_shapes: list[tuple[int, int]],
        padding_mask: torch.Tensor,
    ) -> torch.Tensor:
        """`[B, S, C]` -> `[B, S, C]`."""
        src = self.norm1(src + self.self_attn(src + pos, reference_points, src, spatial_shapes, padding_mask))
        return self.norm2(src + self.linear2(F.relu(self.linear1(src))))


class TransformerEncoder(nn.Module):
    """Per layer: fusion, text enhancer, deformable image self-attention (in that order)."""

    def __init__(self, num_layers: int, dim: int, heads: int, ffn: int, levels: int, points: int):
        super().__init__()
        self.layers = nn.ModuleList(
            DeformableEncoderLayer(dim, ffn, levels, heads, points) for _ in range(num_layers)
        )
        self.text_layers = nn.ModuleList(
            TextEnhancerLayer(dim, heads // 2, ffn // 2) for _ in range(num_layers)
        )
        self.fusion_layers = nn.ModuleList(FusionLayer(dim, ffn // 2, heads // 2) for _ in range(num_layers))

    @staticmethod
    def reference_points(spatial_shapes: list[tuple[int, int]], valid_ratios: torch.Tensor) -> torch.Tensor:
        """Pixel centres of every level, in units of the valid area, seen from every level: `[B, S, L, 2]`."""
        dev = valid_ratios.device
        refs = []
        for lvl, (h, w) in enumerate(spatial_shapes):
            # `arange + 0.5` equals the official `linspace(0.5, n - 0.5, n)` exactly (its step is 1.0) and
            # follows a traced `n`.
            ys, xs = torch.meshgrid(
                torch.arange(h, dtype=torch.float32, device=dev) + 0.5,
                torch.arange(w, dtype=torch.float32, device=dev) + 0.5,
                indexing="ij",
            )
            ry = ys.reshape(-1)[None] / (valid_ratios[:, None, lvl, 1] * h)
            rx = xs.reshape(-1)[None] / (valid_ratios[:, None, lvl, 0] * w)
            refs.append(torch.stack((rx, ry), -1))
        return torch.cat(refs, 1)[:, :, None] * valid_ratios[:, None]

    def forward(
        self,
        src: torch.Tensor,
        pos: torch.Tensor,
        spatial_shapes: list[tuple[int, int]],
        valid_ratios: torch.Tensor,
        padding_mask: torch.Tensor,
        text: torch.Tensor,
        text_pad: torch.Tensor,
        text_pos: torch.Tensor,
        text_blocked: torch.Tensor,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Returns `(memory [B, S, C], text memory [B, T, C])`."""
        ref = self.reference_points(spatial_shapes, valid_ratios) if len(self.layers) else None
        for layer, text_layer, fusion in zip(self.layers, self.text_layers, self.fusion_layers):
            src, text = fusion(src, text, padding_mask, text_pad)
            text = text_layer(text, text_pos, text_blocked)
            src = layer(src, pos, ref, spatial_shapes, padding_mask)
        return src, text


# --- decoder ------------------------------------------------------------------------------------------


class DecoderLayer(nn.Module):
    """Post-norm: self-attention, text cross-attention, deformable image cross-attention, ReLU FFN."""

    def __init__(self, dim: int, ffn: int, levels: int, heads: int, points: int):
        super().__init__()
        self.cross_attn = MSDeformAttn(dim, levels, heads, points)
        self.norm1 = nn.LayerNorm(dim)
        self.ca_text = MultiheadAttention(dim, heads)
        self.catext_norm = nn.LayerNorm(dim)
        self.self_attn = MultiheadAttention(dim, heads)
        self.norm2 = nn.LayerNorm(dim)
        self.linear1 = nn.Linear(dim, ffn)
        self.linear2 = nn.Linear(ffn, dim)
        self.norm3 = nn.LayerNorm(dim)

    def forward(
        self,
        tgt: torch.Tensor,
        query_pos: torch.Tensor,
        reference_points: torch.Tensor,
        self_blocked: torch.Tensor | None,
        text: torch.Tensor,
        text_pad: torch.Tensor,
        memory: torch.Tensor,
        memory_pad: torch.Tensor,
        spatial_shapes: list[tuple[int, int]],
    ) -> torch.Tensor:
        """`[B, Q, C]` -> `[B, Q, C]`; `reference_points` `[B, Q, L, 4]`."""
        qk = tgt + query_pos
        tgt = self.norm2(tgt + self.self_attn(qk, qk, tgt, self_blocked))
        tgt = self.catext_norm(tgt + self.ca_text(tgt + query_pos, text, text, text_pad[:, None, None, :]))
        ca = self.cross_attn(tgt + query_pos, reference_points, memory, spatial_shapes, memory_pad)
        tgt = self.norm1(tgt + ca)
        return self.norm3(tgt + self.linear2(F.relu(self.linear1(tgt))))


class TransformerDecoder(nn.Module):
    """The decoder stack; `bbox_embed`, `pose_embed`, `pose_hw_embed` are attached by `UniPose`."""

    bbox_embed: nn.ModuleList
    pose_embed: nn.ModuleList
    pose_hw_embed: nn.ModuleList

    def __init__(
        self,
        num_layers: int,
        dim: int,
        heads: int,
        ffn: int,
        levels: int,
        points: int,
        num_body_points: int = NUM_BODY_POINTS,
    ):
        super().__init__()
        self.layers = nn.ModuleList(DecoderLayer(dim, ffn, levels, heads, points) for _ in range(num_layers))
        self.norm = nn.LayerNorm(dim)
        self.ref_point_head = MLP(2 * dim, dim, dim, 2)
        # Per-keypoint initial box sizes (relative to the person box), split 17 + 51 in the official
        # checkpoint: the first (up to) 17 keypoints in `hw`, the rest (possibly none) in `hw_append`.
        head = min(num_body_points, HW_ROWS)
        self.hw = nn.Embedding(head, 2)
        self.hw_append = nn.Embedding(num_body_points - head, 2)


# --- the model ----------------------------------------------------------------------------------------


def _settings(config: dict) -> dict:
    """Validates an official `unipose_config` dict and fills the attributes the release assumes."""
    if not isinstance(config, dict):
        raise TypeError(f"config must be the official unipose_config dict, got {type(config).__name__}")
    cfg = {**_ASSUMED, **config}
    missing = [k for k in _NEEDED if k not in cfg]
    if missing:
        raise ValueError(f"unipose config lacks {missing}")
    for key, want in _REQUIRED.items():
        if key in cfg and cfg[key] != want:
            raise ValueError(f"unipose config {key}={cfg[key]!r} is not supported (the model needs {want!r})")
    if cfg["backbone"] not in SWIN_PRESETS:
        raise ValueError(f"unipose config backbone={cfg['backbone']!r}; supported: {sorted(SWIN_PRESETS)}")
    for key in ("hidden_dim", "num_body_points", "num_select", "num_box_decoder_layers"):
        value = cfg[key]
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"unipose config {key}={value!r}; must be a positive integer")
    if cfg["hidden_dim"] % 32:
        raise ValueError(
            f"unipose config hidden_dim={cfg['hidden_dim']}; must be a multiple of 32 "
            "(the input projections use GroupNorm(32, hidden_dim))"
        )
    if cfg["hidden_dim"] % cfg["nheads"]:
        raise ValueError(
            f"unipose config hidden_dim={cfg['hidden_dim']}; must be a multiple of nheads={cfg['nheads']}"
        )
    box_layers = cfg["num_box_decoder_layers"]
    if cfg["dec_layers"] < box_layers + 1:
        raise ValueError(
            f"unipose config dec_layers={cfg['dec_layers']}; the keypoint decoder needs >= {box_layers + 1} "
            f"(num_box_decoder_layers={box_layers} box-only layers, then keypoint layers)"
        )
    if cfg["num_queries"] < cfg["num_select"]:
        raise ValueError(
            f"unipose config num_queries={cfg['num_queries']}; must be >= num_select={cfg['num_select']}"
        )
    if cfg["num_feature_levels"] < 3:
        raise ValueError(f"unipose config num_feature_levels={cfg['num_feature_levels']}; must be >= 3")
    return cfg


class UniPose(nn.Module):
    """The UniPose keypoint decoder (inference).

    `state_dict()` keys are the official ones without the `unipose.` prefix, including the shared
    `bbox_embed` / `pose_embed` / `pose_hw_embed` heads under both the decoder's and the model's names.

    Args:
        config: The official `unipose_config` dict.
        swin: Optional Swin size overrides `{"embed_dim", "depths", "num_heads", "window_size"}`; by default
            the sizes of `config["backbone"]` (swin_T_224_1k: 96, [2, 2, 6, 2], [3, 6, 12, 24], 7).
    """

    def __init__(self, config: dict, swin: dict | None = None):
        super().__init__()
        cfg = _settings(config)
        sizes = dict(SWIN_PRESETS[cfg["backbone"]])
        if swin:
            unknown = set(swin) - set(sizes)
            if unknown:
                raise ValueError(f"swin overrides {sorted(unknown)} unknown; allowed: {sorted(sizes)}")
            sizes.update(swin)
        self.swin_sizes = sizes
        dim = self.hidden_dim = int(cfg["hidden_dim"])
        self.nheads = int(cfg["nheads"])
        self.num_queries = int(cfg["num_queries"])
        self.num_feature_levels = levels = int(cfg["num_feature_levels"])
        self.l_hidden_size = int(cfg["l_hidden_size"])
        self.pe_temperature = (float(cfg["pe_temperatureH"]), float(cfg["pe_temperatureW"]))
        self.num_body_points = int(cfg["num_body_points"])
        self.num_groups = int(cfg["num_select"])
        self.num_box_decoder_layers = box_layers = int(cfg["num_box_decoder_layers"])
        enc_layers, dec_layers, ffn = (
            int(cfg["enc_layers"]),
            int(cfg["dec_layers"]),
            int(cfg["dim_feedforward"]),
        )

        interm = list(cfg["return_interm_indices"])
        swin_net = SwinBackbone(
            sizes["embed_dim"], list(sizes["depths"]), list(sizes["num_heads"]), int(sizes["window_size"]),
            out_indices=tuple(interm),
        )  # fmt: skip
        # The official Joiner is Sequential(swin, position_embedding): only index 0 has parameters.
        self.backbone = nn.ModuleList([swin_net])
        channels = [swin_net.num_features[i] for i in interm]

        self.transformer = nn.Module()
        t = self.transformer
        if levels > 1 and enc_layers > 0:
            t.level_embed = nn.Parameter(torch.zeros(levels, dim))
        else:
            t.level_embed = None
        t.encoder = TransformerEncoder(enc_layers, dim, self.nheads, ffn, levels, int(cfg["enc_n_points"]))
        t.decoder = TransformerDecoder(
            dec_layers, dim, self.nheads, ffn, levels, int(cfg["dec_n_points"]), self.num_body_points
        )
        t.tgt_embed = nn.Embedding(self.num_queries, dim)
        t.enc_output = nn.Linear(dim, dim)
        t.enc_output_norm = nn.LayerNorm(dim)
        t.enc_out_bbox_embed = MLP(dim, dim, 4, 3)

        self.projection_llava = MLP(self.l_hidden_size, dim, dim, 3)
        self.projection_kpt_llava = MLP(self.l_hidden_size, dim, dim, 3)

        proj = [nn.Sequential(nn.Conv2d(c, dim, kernel_size=1), nn.GroupNorm(32, dim)) for c in channels]
        in_ch = channels[-1]
        for _ in range(levels - len(channels)):
            proj.append(
                nn.Sequential(
                    nn.Conv2d(in_ch, dim, kernel_size=3, stride=2, padding=1), nn.GroupNorm(32, dim)
                )
            )
            in_ch = dim
        self.input_proj = nn.ModuleList(proj)

        # One module per head kind, listed once per decoder layer that uses it (official sharing).
        bbox, pose, pose_hw = MLP(dim, dim, 4, 3), MLP(dim, dim, 2, 3), MLP(dim, dim, 2, 3)
        self.bbox_embed = nn.ModuleList([bbox] * dec_layers)
        self.pose_embed = nn.ModuleList([pose] * (dec_layers - box_layers + 1))
        self.pose_hw_embed = nn.ModuleList([pose_hw] * (dec_layers - box_layers))
        t.decoder.bbox_embed = self.bbox_embed
        t.decoder.pose_embed = self.pose_embed
        t.decoder.pose_hw_embed = self.pose_hw_embed

    # --- inputs -----------------------------------------------------------------------------------

    def _check_inputs(
        self, pixel_values, pixel_padding_mask, obj_querys, obj_query_masks, kpt_querys, kpt_query_masks
    ):
        def fail(name: str, want: str, got: Any) -> None:
            shape = tuple(got.shape) if isinstance(got, torch.Tensor) else type(got).__name__
            raise ValueError(f"{name}: expected {want}, got {shape}")

        named = {
            "pixel_values": pixel_values, "pixel_padding_mask": pixel_padding_mask, "obj_querys": obj_querys,
            "obj_query_masks": obj_query_masks, "kpt_querys": kpt_querys, "kpt_query_masks": kpt_query_masks,
        }  # fmt: skip
        for name, value in named.items():
            if not isinstance(value, torch.Tensor):
                fail(name, "a torch.Tensor", value)
        if pixel_values.dim() != 4 or pixel_values.shape[1] != 3:
            fail("pixel_values", "[B, 3, H, W]", pixel_values)
        b, _, h, w = pixel_values.shape
        if h % 32 or w % 32:
            fail("pixel_values", "H and W multiples of 32 (zero-padded)", pixel_values)
        if pixel_padding_mask.shape != (b, h, w) or pixel_padding_mask.dtype != torch.bool:
            fail("pixel_padding_mask", f"bool [{b}, {h}, {w}] (True = padding)", pixel_padding_mask)
        lh = self.l_hidden_size
        for q_name, m_name, q, m in (
            ("obj_querys", "obj_query_masks", obj_querys, obj_query_masks),
            ("kpt_querys", "kpt_query_masks", kpt_querys, kpt_query_masks),
        ):
            if q.dim() != 4 or q.shape[0] != b or q.shape[-1] != lh:
                fail(q_name, f"[{b}, N, num_embs, {lh}]", q)
            if m.shape != q.shape[:2] or m.dtype != torch.bool:
                fail(m_name, f"bool [{b}, {q.shape[1]}]", m)
        k = self.num_body_points
        if kpt_querys.shape[1] < k:
            fail("kpt_querys", f"at least {k} keypoint slots [{b}, >={k}, ...]", kpt_querys)
        # These two need values, not shapes; they fail loudly rather than produce NaN / silent truncation.
        if not bool(obj_query_masks.any(1).all()):
            raise ValueError("obj_query_masks: every batch item needs at least one True (valid) object slot")
        n_kpt = kpt_query_masks.sum(1)
        if bool((n_kpt > k).any()):
            raise ValueError(f"kpt_query_masks: at most {k} valid keypoints per item, got {n_kpt.tolist()}")

    # --- forward ----------------------------------------------------------------------------------

    def forward(
        self,
        pixel_values: torch.Tensor,
        pixel_padding_mask: torch.Tensor,
        obj_querys: torch.Tensor,
        obj_query_masks: torch.Tensor,
        kpt_querys: torch.Tensor,
        kpt_query_masks: torch.Tensor,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Runs the decoder.

        Args:
            pixel_values: `[B, 3, H, W]` normalised image, zero-padded to multiples of 32.
            pixel_padding_mask: `[B, H, W]` bool, True = padding.
            obj_querys: `[B, Nobj, num_embs, l_hidden_size]` LLM states of the object queries.
            obj_query_masks: `[B, Nobj]` bool, True = a real object query.
            kpt_querys: `[B, Nkpt >= K, num_embs, l_hidden_size]` LLM states of the keypoint queries
                (K = `num_body_points`, 68 in the release).
            kpt_query_masks: `[B, Nkpt]` bool; the first `sum` slots (at most K) are used as keypoints.

        Returns:
            `(pred_logits [B, G, Nobj], pred_boxes [B, G, 4], pred_keypoints [B, G, 3K])`, float32, with
            G = `num_select` (50 in the release). Logits are -inf on invalid object slots; boxes are
            (cx, cy, w, h) in [0, 1] of the padded image; keypoints are
            `[x0, y0, ..., x{K-1}, y{K-1}, v0, ..., v{K-1}]` with the constant v = sigmoid(1).
        """
        return self._run(
            pixel_values, pixel_padding_mask, obj_querys, obj_query_masks, kpt_querys, kpt_query_masks
        )

    def forward_with_intermediates(self, *inputs: torch.Tensor) -> dict[str, Any]:
        """Same inputs as `forward`; returns the outputs plus the intermediate tensors, for debugging/parity.

        Keys (K keypoints, G groups; 68 and 50 in the release): `pred_logits`, `pred_boxes`,
        `pred_keypoints`, `obj_proj_mean` [B, Nobj, C], `kpt_embed` [B, K, C], `backbone_feats` /
        `backbone_masks` / `backbone_pos` (lists), `srcs` (list),
        `enc_memory`, `enc_memory_text`, `enc_key_padding_mask`, `enc_valid_ratios`, `enc_spatial_shapes`,
        `text_position_ids`, `topk0_input` [B, S], `topk0_indices` [B, Q], `enc_hs_topk`, `enc_ref_topk`,
        `init_box_proposal`, `dec_hs` (list), `dec_ref` (list, layers + 1), `topk1_input` [B, Q],
        `topk1_indices` [B, G], `kpt_mask` [B, K+1], `attn_mask2` [B, G(K+1), G(K+1)].
        """
        record: dict[str, Any] = {}
        logits, boxes, kpts = self._run(*inputs, record=record)
        record.update(pred_logits=logits, pred_boxes=boxes, pred_keypoints=kpts)
        return record

    def _run(
        self,
        pixel_values: torch.Tensor,
        pixel_padding_mask: torch.Tensor,
        obj_querys: torch.Tensor,
        obj_query_masks: torch.Tensor,
        kpt_querys: torch.Tensor,
        kpt_query_masks: torch.Tensor,
        record: dict[str, Any] | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        self._check_inputs(
            pixel_values, pixel_padding_mask, obj_querys, obj_query_masks, kpt_querys, kpt_query_masks
        )
        dtype = self.transformer.tgt_embed.weight.dtype
        pixel_values = pixel_values.to(dtype)
        b = pixel_values.shape[0]
        k = self.num_body_points
        g = self.num_groups
        dev = pixel_values.device

        # Text side: object queries (the "classes") and keypoint queries from the LLM.
        obj_text = self.projection_llava(obj_querys.to(dtype)).mean(-2)  # [B, T, C]
        text = obj_text
        text_valid = obj_query_masks
        n_kpt = kpt_query_masks.sum(1)
        kpt_slot = torch.arange(k, device=dev)
        kpt_embed = self.projection_kpt_llava(kpt_querys[:, :k].to(dtype)).mean(-2)
        # Only the first n_kpt slots carry a query (official prefix copy); the rest are zero embeddings.
        kpt_embed = torch.where(
            (kpt_slot[None] < n_kpt[:, None])[..., None], kpt_embed, torch.zeros_like(kpt_embed)
        )
        kpt_mask = torch.cat((torch.ones_like(kpt_query_masks[:, :1]), kpt_query_masks[:, :k]), dim=1)

        n_obj = text_valid.sum(1)
        t_idx = torch.arange(text.shape[1], device=dev)
        in_prefix = t_idx[None] < n_obj[:, None]  # [B, T]
        position_ids = torch.where(in_prefix, t_idx[None], torch.zeros_like(t_idx)[None])
        # `t_idx == t_idx.T`, not `torch.eye(..., dtype=bool)`: that exports to a bool EyeLike, which ONNX
        # Runtime does not implement.
        text_attend = (t_idx[:, None] == t_idx[None, :])[None] | (
            in_prefix[:, :, None] & in_prefix[:, None, :]
        )
        # The official text layer repeats the [B, T, T] mask head-major (`repeat(nhead, 1, 1)`) while
        # attention reads it batch-major, so item b, head h uses the mask of item (b * heads + h) % B.
        # Kept for parity; it equals per-item masks when B = 1 or all items have as many object queries.
        heads_t = self.nheads // 2
        text_blocked = (~text_attend).repeat(heads_t, 1, 1).view(b, heads_t, *text_attend.shape[1:])
        text_pos = _sine_1d(position_ids, self.hidden_dim).to(dtype)
        text_pad = ~text_valid

        # Backbone and input projections.
        feats = self.backbone[0](pixel_values)
        srcs, masks, poss = [], [], []
        th, tw = self.pe_temperature
        for lvl, feat in enumerate(feats):
            m = _resize_mask(pixel_padding_mask, feat.shape[-2:])
            srcs.append(self.input_proj[lvl](feat))
            masks.append(m)
            poss.append(_sine_2d(m, self.hidden_dim // 2, th, tw).to(feat.dtype))
        for lvl in range(len(feats), self.num_feature_levels):
            src = self.input_proj[lvl](feats[-1] if lvl == len(feats) else srcs[-1])
            m = _resize_mask(pixel_padding_mask, src.shape[-2:])
            srcs.append(src)
            masks.append(m)
            poss.append(_sine_2d(m, self.hidden_dim // 2, th, tw).to(src.dtype))

        # Flatten levels.
        t = self.transformer
        # Python ints in eager mode; traced sizes while exporting, so everything derived follows the input.
        spatial_shapes = [(s.shape[-2], s.shape[-1]) for s in srcs]
        src_flat = torch.cat([s.flatten(2).transpose(1, 2) for s in srcs], 1)
        pad_flat = torch.cat([m.flatten(1) for m in masks], 1)
        pos_flat = []
        for lvl, p in enumerate(poss):
            p = p.flatten(2).transpose(1, 2)
            pos_flat.append(p if t.level_embed is None else p + t.level_embed[lvl].view(1, 1, -1))
        pos_flat = torch.cat(pos_flat, 1)
        valid_ratios = torch.stack([_valid_ratio(m) for m in masks], 1)  # [B, L, 2]
        if src_flat.shape[1] < self.num_queries:
            raise ValueError(
                f"pixel_values: the image gives {src_flat.shape[1]} tokens, fewer than num_queries="
                f"{self.num_queries}; use a larger (padded) image, got {tuple(pixel_values.shape)}"
            )

        memory, text = t.encoder(
            src_flat, pos_flat, spatial_shapes, valid_ratios, pad_flat, text, text_pad, text_pos, text_blocked
        )

        # Two-stage selection of the decoder's initial boxes.
        out_mem, proposals = _encoder_proposals(memory, pad_flat, spatial_shapes)
        out_mem = t.enc_output_norm(t.enc_output(out_mem))
        scores0 = contrastive_logits(out_mem, text, text_valid).max(-1).values
        coords = t.enc_out_bbox_embed(out_mem) + proposals
        top0 = torch.topk(scores0, self.num_queries, dim=1).indices
        ref_unsig = torch.gather(coords, 1, top0[..., None].expand(-1, -1, 4))
        tgt = t.tgt_embed.weight[None].expand(b, -1, -1)

        hs, refs, sel = self._decode(
            tgt, ref_unsig.sigmoid(), memory, pad_flat, spatial_shapes, valid_ratios,
            text, text_valid, kpt_embed, kpt_mask, full_refs=record is not None,
        )  # fmt: skip

        # Heads on the last layer's normalised output, relative to the references that layer read.
        last = len(t.decoder.layers) - 1
        group = k + 1
        h_last = hs[-1].view(b, g, group, -1)
        r_last = refs[last].view(b, g, group, 4)
        h_box = h_last[:, :, 0]
        boxes = (self.bbox_embed[last](h_box) + inverse_sigmoid(r_last[:, :, 0])).sigmoid()
        logits = contrastive_logits(h_box, text, text_valid)
        xy = self.pose_embed[last - self.num_box_decoder_layers](h_last[:, :, 1:]) + inverse_sigmoid(
            r_last[:, :, 1:, :2]
        )
        xy = xy.sigmoid().flatten(2)  # [B, G, 2K] as x0, y0, x1, y1, ...
        vis = torch.ones_like(xy[..., :k]).sigmoid()  # the model predicts no visibility: sigmoid(1)
        keypoints = torch.cat((xy, vis), -1)

        if record is not None:
            record.update(
                obj_proj_mean=obj_text,
                kpt_embed=kpt_embed, kpt_mask=kpt_mask, text_position_ids=position_ids,
                backbone_feats=feats, backbone_masks=masks[: len(feats)], backbone_pos=poss[: len(feats)],
                srcs=srcs, enc_memory=memory, enc_memory_text=text, enc_key_padding_mask=pad_flat,
                enc_valid_ratios=valid_ratios,
                enc_spatial_shapes=torch.tensor(spatial_shapes, dtype=torch.long),
                topk0_input=scores0, topk0_indices=top0,
                enc_hs_topk=torch.gather(out_mem, 1, top0[..., None].expand(-1, -1, out_mem.shape[-1])),
                enc_ref_topk=ref_unsig.sigmoid(),
                init_box_proposal=torch.gather(proposals, 1, top0[..., None].expand(-1, -1, 4)).sigmoid(),
                dec_hs=hs, dec_ref=refs, **sel,
            )  # fmt: skip
        return logits.float(), boxes.float(), keypoints.float()

    def _decode(
        self,
        tgt: torch.Tensor,
        ref: torch.Tensor,
        memory: torch.Tensor,
        memory_pad: torch.Tensor,
        spatial_shapes: list[tuple[int, int]],
        valid_ratios: torch.Tensor,
        text: torch.Tensor,
        text_valid: torch.Tensor,
        kpt_embed: torch.Tensor,
        kpt_mask: torch.Tensor,
        full_refs: bool,
    ) -> tuple[list[torch.Tensor], list[torch.Tensor], dict[str, torch.Tensor]]:
        """Runs the decoder layers.

        Returns:
            `(normalised outputs per layer, references [initial, after layer 0, ...], selection info)`.
            The update after the last layer feeds no output, so it is only computed when `full_refs`.
        """
        dec = self.transformer.decoder
        b = tgt.shape[0]
        k, g, box_layers = self.num_body_points, self.num_groups, self.num_box_decoder_layers
        group = k + 1
        ratios4 = torch.cat([valid_ratios, valid_ratios], -1)[:, None]  # [B, 1, L, 4]
        text_pad = ~text_valid
        out = tgt
        hs, refs, sel = [], [ref], {}
        blocked = None
        n_layers = len(dec.layers)
        for lid, layer in enumerate(dec.layers):
            ref_in = ref[:, :, None] * ratios4  # [B, Q, L, 4]
            query_pos = dec.ref_point_head(_sine_box(ref_in[:, :, 0], self.hidden_dim // 2).to(out.dtype))
            out = layer(out, query_pos, ref_in, blocked, text, text_pad, memory, memory_pad, spatial_shapes)
            hs.append(dec.norm(out))
            if lid == n_layers - 1 and not full_refs:
                break
            if lid < box_layers:
                new_ref = (self.bbox_embed[lid](out) + inverse_sigmoid(ref)).sigmoid()
            if lid == box_layers - 1:
                # Keep the G best queries; each becomes a group of its box row and K keypoint rows.
                scores = contrastive_logits(out, text, text_valid).max(-1).values  # [B, Q]
                top = torch.topk(scores, g, dim=1).indices
                box_ref = torch.gather(new_ref, 1, top[..., None].expand(-1, -1, 4))
                box_out = torch.gather(out, 1, top[..., None].expand(-1, -1, out.shape[-1]))
                delta = self.pose_embed[-1](kpt_embed)  # [B, K, 2], the same for every group
                kpt_xy = (inverse_sigmoid(box_ref[:, :, None, :2]) + delta[:, None]).sigmoid()
                size = torch.cat((dec.hw.weight, dec.hw_append.weight), 0).sigmoid()  # [K, 2]
                kpt_wh = size[None, None] * box_ref[:, :, None, 2:]
                kpt_ref = torch.cat((kpt_xy, kpt_wh), -1)  # [B, G, K, 4]
                new_ref = torch.cat((box_ref[:, :, None], kpt_ref), 2).flatten(1, 2)
                kpt_rows = kpt_embed[:, None].expand(-1, g, -1, -1)
                out = torch.cat((box_out[:, :, None], kpt_rows), 2).flatten(1, 2)
                mask2 = pose_self_attention_mask(kpt_mask, num_groups=g)
                blocked = mask2[:, None]
                sel = {"topk1_input": scores, "topk1_indices": top, "attn_mask2": mask2}
            if lid >= box_layers:
                pose_i = lid - box_layers
                o = out.view(b, g, group, -1)
                r = inverse_sigmoid(ref).view(b, g, group, 4)
                box = (self.bbox_embed[lid](o[:, :, 0]) + r[:, :, 0]).sigmoid()
                o_kpt = o[:, :, 1:]
                delta = torch.cat((self.pose_embed[pose_i](o_kpt), self.pose_hw_embed[pose_i](o_kpt)), -1)
                kpt = (r[:, :, 1:] + delta).sigmoid()
                new_ref = torch.cat((box[:, :, None], kpt), 2).view(b, g * group, 4)
            ref = new_ref
            refs.append(ref)
        return hs, refs, sel


def _encoder_proposals(
    memory: torch.Tensor, padding_mask: torch.Tensor, spatial_shapes: list[tuple[int, int]]
) -> tuple[torch.Tensor, torch.Tensor]:
    """One proposal box per image token (its cell centre in the valid area, size 0.05 * 2^level).

    Returns:
        `(memory with padding / out-of-range tokens zeroed, unsigmoided proposals with +inf there)`.
    """
    b = memory.shape[0]
    dev = memory.device
    props, start = [], 0
    for lvl, (h, w) in enumerate(spatial_shapes):
        m = padding_mask[:, start : start + h * w].view(b, h, w)
        valid_h = (~m[:, :, 0]).sum(1)
        valid_w = (~m[:, 0, :]).sum(1)
        # `arange` equals the official `linspace(0, n - 1, n)` exactly and follows a traced `n`.
        gy, gx = torch.meshgrid(
            torch.arange(h, dtype=torch.float32, device=dev),
            torch.arange(w, dtype=torch.float32, device=dev),
            indexing="ij",
        )
        grid = torch.stack((gx, gy), -1)
        scale = torch.stack((valid_w, valid_h), -1).view(b, 1, 1, 2)
        grid = (grid[None].expand(b, -1, -1, -1) + 0.5) / scale
        wh = torch.ones_like(grid) * 0.05 * (2.0**lvl)
        props.append(torch.cat((grid, wh), -1).view(b, -1, 4))
        start += h * w
    props = torch.cat(props, 1)
    inside = ((props > 0.01) & (props < 0.99)).all(-1, keepdim=True)
    props = torch.log(props / (1 - props))
    props = props.masked_fill(padding_mask[..., None], float("inf")).masked_fill(~inside, float("inf"))
    out = memory.masked_fill(padding_mask[..., None], 0.0).masked_fill(~inside, 0.0)
    return out, props


# --- loading ------------------------------------------------------------------------------------------


def swin_sizes_from_state_dict(state: dict[str, torch.Tensor], source: str = "state dict") -> dict:
    """Infers `{"embed_dim", "depths", "num_heads", "window_size"}` of the backbone from tensor shapes.

    Args:
        state: UniPose state dict without the `unipose.` prefix.
        source: Name used in error messages (e.g. the file path).
    """
    prefix = "backbone.0."
    key = prefix + "patch_embed.proj.weight"
    if key not in state:
        raise ValueError(f"{source}: missing {key!r}; cannot infer the Swin sizes")
    embed_dim = int(state[key].shape[0])
    depths, heads, windows = [], [], []
    stage = 0
    while any(k.startswith(f"{prefix}layers.{stage}.") for k in state):
        head = f"{prefix}layers.{stage}.blocks."
        names = {k[len(head) :].split(".")[0] for k in state if k.startswith(head)}
        if not all(n.isdigit() for n in names):
            raise ValueError(f"{source}: unexpected Swin block names {sorted(names)} under {head!r}")
        blocks = {int(n) for n in names}
        if not blocks or blocks != set(range(len(blocks))):
            raise ValueError(f"{source}: Swin stage {stage} has blocks {sorted(blocks)}; expected 0..n-1")
        table_key = f"{prefix}layers.{stage}.blocks.0.attn.relative_position_bias_table"
        if table_key not in state:
            raise ValueError(f"{source}: missing {table_key!r}")
        table = state[table_key].shape
        side = math.isqrt(int(table[0]))
        if side * side != table[0] or side % 2 == 0:
            raise ValueError(f"{source}: {table_key} has shape {tuple(table)}; expected [(2w-1)^2, heads]")
        depths.append(len(blocks))
        heads.append(int(table[1]))
        windows.append((side + 1) // 2)
        stage += 1
    if not depths or len(set(windows)) != 1:
        raise ValueError(f"{source}: cannot infer the Swin sizes (stages {depths}, windows {windows})")
    return {"embed_dim": embed_dim, "depths": depths, "num_heads": heads, "window_size": windows[0]}


def load_unipose_component(directory: str | Path) -> UniPose:
    """Builds a `UniPose` from a folder with `unipose_config.json` and `unipose_state_dict.pt`.

    The state dict may carry the official `unipose.` prefix (as in `VisionLLMv2Model`) or none. The Swin
    sizes are inferred from its shapes; loading is strict and every alias key must equal its original.

    Args:
        directory: The folder.

    Returns:
        The model in eval mode, on CPU, with the checkpoint's dtype.

    Raises:
        FileNotFoundError: A file is missing.
        ValueError: The config is unsupported or the state dict does not match the model (names the key
            and the shapes).
    """
    directory = Path(directory)
    cfg_path = directory / "unipose_config.json"
    sd_path = directory / "unipose_state_dict.pt"
    for p in (cfg_path, sd_path):
        if not p.is_file():
            raise FileNotFoundError(f"UniPose component file missing: {p}")
    try:
        config = json.loads(cfg_path.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{cfg_path}: not valid JSON ({e})") from e
    raw = torch.load(sd_path, map_location="cpu", weights_only=True)
    if not isinstance(raw, dict):
        raise ValueError(f"{sd_path}: expected a dict of tensors, got {type(raw).__name__}")
    prefixed = [k.startswith("unipose.") for k in raw]
    if any(prefixed) and not all(prefixed):
        odd = next(k for k in raw if not k.startswith("unipose."))
        raise ValueError(f"{sd_path}: mixes 'unipose.'-prefixed and bare keys (e.g. {odd!r})")
    state = {(k[len("unipose.") :] if k.startswith("unipose.") else k): v for k, v in raw.items()}
    try:
        swin = swin_sizes_from_state_dict(state, source=str(sd_path))
        with torch.device("meta"):
            model = UniPose(config, swin=swin)
    except (ValueError, TypeError) as e:
        raise ValueError(f"{cfg_path} / {sd_path}: {e}") from e

    expected = model.state_dict()
    missing = [k for k in expected if k not in state]
    unexpected = [k for k in state if k not in expected]
    if missing or unexpected:
        raise ValueError(
            f"{sd_path}: keys do not match the model built from {cfg_path.name}: "
            f"{len(missing)} missing (e.g. {missing[:5]}), "
            f"{len(unexpected)} unexpected (e.g. {unexpected[:5]})"
        )
    for key, want in expected.items():
        got = state[key]
        if not isinstance(got, torch.Tensor) or tuple(got.shape) != tuple(want.shape):
            shape = tuple(got.shape) if isinstance(got, torch.Tensor) else type(got).__name__
            raise ValueError(f"{sd_path}: {key!r} has shape {shape}, the model expects {tuple(want.shape)}")
        if (want.dtype == torch.int64) != (got.dtype == torch.int64):
            raise ValueError(f"{sd_path}: {key!r} has dtype {got.dtype}, the model expects {want.dtype}")
    # Keys naming one shared tensor must agree, or strict loading would silently keep the last one.
    first_name: dict[int, str] = {}
    for name, tensor in model.named_parameters(remove_duplicate=False):
        owner = first_name.setdefault(id(tensor), name)
        if owner != name and not torch.equal(state[owner], state[name]):
            raise ValueError(f"{sd_path}: alias {name!r} differs from {owner!r}; they must be one tensor")
    model.load_state_dict(state, strict=True, assign=True)
    return model.eval()
