"""The object decoder: open-vocabulary Grounding DINO (Swin-T) with a mask head, inference only.

VisionLLM v2 replaces Grounding DINO's BERT with the LLM: each `[DET]`/`[SEG]`/`[GRD]` group of N hidden
states becomes one "text" token through `patch2query` (an MLP) and a mean over the N rows. The rest is
Grounding DINO: a Swin backbone, four feature levels, an encoder that fuses image and text tokens, two-stage
query selection, a decoder with iterative box refinement, and a Mask2Former-style mask head on a stride-4
pixel decoder.

Parameter names (and the aliased `bbox_embed` / `mask_embed` entries) follow the official checkpoint with the
leading `gdino.` removed, so `load_state_dict(strict=True)` takes the official tensors as they are. Only the
inference path is implemented: no losses, no denoising queries, no auxiliary outputs.
"""

from __future__ import annotations

import contextlib
import copy
import math
import warnings
from collections.abc import Iterator
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from .msda import multi_scale_deformable_attention, resize_mask_nearest, spatial_shapes_tensor
from .swin import SwinBackbone, SwinSettings

_ACTIVATIONS = {"relu": F.relu, "gelu": F.gelu}
# Both the sine embeddings of boxes and text positions and the image-map embedding are angles in [0, 2*pi].
_TWO_PI = 2 * math.pi
# Clamp for inverse_sigmoid, as in DETR-family refinement: keeps log() finite at 0 and 1.
_INVERSE_SIGMOID_EPS = 1e-5
# The fusion attention clamps its logits to this range (a fp16 guard in the original; kept for parity).
_FUSION_LOGIT_CLAMP = 50000.0


@dataclass(frozen=True)
class GroundingDinoSettings:
    """The fields of the official `gdino_config` dict that define the inference graph.

    Attributes:
        d_model: Transformer width.
        num_queries: Object queries (boxes) produced per image.
        encoder_layers / decoder_layers: Depths.
        encoder_ffn_dim / decoder_ffn_dim: FFN widths (the encoder's also sets the fusion width, halved).
        encoder_attention_heads / decoder_attention_heads: Heads (the text enhancer and fusion use half the
            encoder's).
        encoder_n_points / decoder_n_points: Deformable sampling points per level and head.
        num_feature_levels: Feature levels seen by the encoder (3 backbone stages plus extra stride-2 convs).
        max_text_len: Width of the logits; slots past the number of text queries are `-inf`.
        mask_dim: Channels of the mask embedding.
        l_hidden_size: LLM hidden size (input of `patch2query`).
        positional_embedding_temperature: Temperature of the image-map sine embedding.
        activation_function: Encoder/decoder FFN activation.
        decoder_bbox_embed_share: One box head shared by all decoder layers (the release) or one per layer.
        norm: Mask pixel-decoder norm, `"GN"` (GroupNorm(32)) or `""` (none, convs get a bias).
        backbone: The Swin settings.
    """

    d_model: int
    num_queries: int
    encoder_layers: int
    decoder_layers: int
    encoder_ffn_dim: int
    decoder_ffn_dim: int
    encoder_attention_heads: int
    decoder_attention_heads: int
    encoder_n_points: int
    decoder_n_points: int
    num_feature_levels: int
    max_text_len: int
    mask_dim: int
    l_hidden_size: int
    positional_embedding_temperature: float
    activation_function: str
    decoder_bbox_embed_share: bool
    norm: str
    backbone: SwinSettings

    @classmethod
    def from_dict(cls, config: dict) -> GroundingDinoSettings:
        """Reads the official `gdino_config` dict (defaults are those of the official config class).

        Raises:
            ValueError: The dict asks for a variant this implementation does not have (one-stage,
                learned position embeddings, a non-Swin backbone, ...), naming the field.
        """

        def get(key, default=None):
            value = config.get(key, default)
            if value is None:
                raise ValueError(f"gdino_config is missing {key!r}")
            return value

        expected = {
            "two_stage": True,
            "embedding_init_target": True,
            "position_embedding_type": "sine",
            "query_dim": 4,
            "two_stage_bbox_embed_share": False,
        }
        for key, want in expected.items():
            if config.get(key, want) != want:
                raise ValueError(f"gdino_config.{key}={config[key]!r} is not supported (only {want!r})")
        settings = cls(
            d_model=int(get("d_model", 256)),
            num_queries=int(get("num_queries", 900)),
            encoder_layers=int(get("encoder_layers", 6)),
            decoder_layers=int(get("decoder_layers", 6)),
            encoder_ffn_dim=int(get("encoder_ffn_dim", 2048)),
            decoder_ffn_dim=int(get("decoder_ffn_dim", 2048)),
            encoder_attention_heads=int(get("encoder_attention_heads", 8)),
            decoder_attention_heads=int(get("decoder_attention_heads", 8)),
            encoder_n_points=int(get("encoder_n_points", 4)),
            decoder_n_points=int(get("decoder_n_points", 4)),
            num_feature_levels=int(get("num_feature_levels", 4)),
            max_text_len=int(get("max_text_len", 256)),
            mask_dim=int(get("mask_dim")),
            l_hidden_size=int(get("l_hidden_size")),
            positional_embedding_temperature=float(get("positional_embedding_temperature", 20)),
            activation_function=str(get("activation_function", "relu")),
            decoder_bbox_embed_share=bool(get("decoder_bbox_embed_share", True)),
            norm=str(config.get("norm", "GN")),
            backbone=SwinSettings.from_dict(get("backbone_config")),
        )
        if settings.activation_function not in _ACTIVATIONS:
            raise ValueError(
                f"gdino_config.activation_function={settings.activation_function!r} is not supported "
                f"(one of {sorted(_ACTIVATIONS)})"
            )
        if settings.norm not in ("GN", ""):
            raise ValueError(f"gdino_config.norm={settings.norm!r} is not supported ('GN' or '')")
        if len(settings.backbone.out_features) != 4:
            # Stage 1 (stride 4) feeds the mask pixel decoder, stages 2-4 the encoder.
            raise ValueError(
                f"backbone_config.out_features must name 4 stages, got {list(settings.backbone.out_features)}"
            )
        if settings.num_feature_levels < 3:
            raise ValueError(
                f"gdino_config.num_feature_levels must be >= 3, got {settings.num_feature_levels}"
            )
        return settings


# --- small pieces -----------------------------------------------------------------------------------


class _MLP(nn.Module):
    """Linear layers with ReLU between them (not after the last)."""

    def __init__(self, in_dim: int, hidden_dim: int, out_dim: int, num_layers: int):
        super().__init__()
        dims = [in_dim] + [hidden_dim] * (num_layers - 1) + [out_dim]
        self.layers = nn.ModuleList(nn.Linear(a, b) for a, b in zip(dims[:-1], dims[1:]))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for i, layer in enumerate(self.layers):
            x = layer(x)
            if i < len(self.layers) - 1:
                x = F.relu(x)
        return x


class _ConvNorm(nn.Conv2d):
    """Conv -> optional GroupNorm(32) -> optional ReLU; the norm is `.norm`, as in detectron2's Conv2d."""

    def __init__(self, in_ch: int, out_ch: int, kernel: int, norm: str, relu: bool):
        super().__init__(in_ch, out_ch, kernel, padding=kernel // 2, bias=norm == "")
        self.norm = nn.GroupNorm(32, out_ch) if norm == "GN" else None
        self.relu = relu

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = super().forward(x)
        if self.norm is not None:
            x = self.norm(x)
        return F.relu(x) if self.relu else x


def _sine_frequencies(num_feats: int, temperature: float, device: torch.device) -> torch.Tensor:
    """`temperature ** (2 * floor(i / 2) / num_feats)`: one frequency per sin/cos pair."""
    index = torch.arange(num_feats, dtype=torch.float32, device=device)
    return temperature ** (2 * torch.div(index, 2, rounding_mode="floor") / num_feats)


def _interleave_sin_cos(angles: torch.Tensor) -> torch.Tensor:
    """`[..., F]` angles -> `[..., F]` with sin of the even and cos of the odd entries, interleaved."""
    return torch.stack((angles[..., 0::2].sin(), angles[..., 1::2].cos()), dim=-1).flatten(-2)


def _map_position_embedding(mask: torch.Tensor, num_feats: int, temperature: float) -> torch.Tensor:
    """DETR's normalised sine embedding of a `[B, H, W]` validity mask -> `[B, 2 * num_feats, H, W]` (y, x).

    Coordinates are cumulative counts of valid pixels scaled to [0, 2*pi] by the valid extent, so padding
    does not shift the embedding of the valid region.
    """
    y = mask.cumsum(1, dtype=torch.float32)
    x = mask.cumsum(2, dtype=torch.float32)
    y = y / (y[:, -1:, :] + 1e-6) * _TWO_PI
    x = x / (x[:, :, -1:] + 1e-6) * _TWO_PI
    freqs = _sine_frequencies(num_feats, temperature, mask.device)
    pos_y = _interleave_sin_cos(y[..., None] / freqs)
    pos_x = _interleave_sin_cos(x[..., None] / freqs)
    return torch.cat((pos_y, pos_x), dim=-1).permute(0, 3, 1, 2)


def _coordinate_embedding(coord: torch.Tensor, num_feats: int) -> torch.Tensor:
    """Sine embedding of one scalar coordinate per token: `[B, N]` -> `[B, N, num_feats]`."""
    freqs = _sine_frequencies(num_feats, 10000, coord.device)
    return _interleave_sin_cos((coord * _TWO_PI)[..., None] / freqs)


@contextlib.contextmanager
def _quiet_input_checks_when_tracing() -> Iterator[None]:
    """Silences `TracerWarning`s while `torch.jit.trace` / `torch.onnx.export` runs the forward.

    Only the input checks turn traced sizes into Python values (to raise on a bad example); they steer no
    computation. Everything the graph computes from the image size (per-level shapes and start offsets, the
    feature-map grids, window paddings, mask sizes) is tensor arithmetic on traced shapes, so an exported
    graph takes any padded image size. Nothing data-dependent is turned into Python control flow.
    """
    if not torch.jit.is_tracing():
        yield
        return
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", torch.jit.TracerWarning)
        yield


def _inverse_sigmoid(x: torch.Tensor) -> torch.Tensor:
    x = x.clamp(min=0, max=1)
    return torch.log(x.clamp(min=_INVERSE_SIGMOID_EPS) / (1 - x).clamp(min=_INVERSE_SIGMOID_EPS))


def _downsample_mask(pixel_mask: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Nearest-neighbour resize of a `[B, H, W]` bool mask (the official `interpolate` default mode).

    `resize_mask_nearest` picks exactly `F.interpolate`'s source pixels, as gathers that follow a traced size.
    """
    return resize_mask_nearest(pixel_mask, size)


def _valid_ratio(mask: torch.Tensor) -> torch.Tensor:
    """`[B, H, W]` validity mask -> `[B, 2]` fraction of valid (width, height), read off row 0 / column 0."""
    _, height, width = mask.shape
    valid_h = mask[:, :, 0].sum(1).float() / height
    valid_w = mask[:, 0, :].sum(1).float() / width
    return torch.stack([valid_w, valid_h], -1)


# --- attention modules ------------------------------------------------------------------------------


class _MultiheadAttention(nn.Module):
    """`nn.MultiheadAttention` (batch-first, packed in-projection, same parameter names), math path only.

    Written out so that masks are per sample (`[B, Lq, Lk]` or `[B, Lk]`, True = blocked) and the graph is
    plain matmul/softmax for export.
    """

    def __init__(self, dim: int, heads: int):
        super().__init__()
        if dim % heads:
            raise ValueError(f"attention width {dim} is not divisible by {heads} heads")
        self.heads = heads
        self.in_proj_weight = nn.Parameter(torch.empty(3 * dim, dim))
        self.in_proj_bias = nn.Parameter(torch.zeros(3 * dim))
        self.out_proj = nn.Linear(dim, dim)
        nn.init.xavier_uniform_(self.in_proj_weight)

    def forward(
        self,
        query: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
        blocked: torch.Tensor | None = None,
        key_padding: torch.Tensor | None = None,
    ) -> torch.Tensor:
        batch, len_q, dim = query.shape
        head_dim = dim // self.heads
        w_q, w_k, w_v = self.in_proj_weight.chunk(3)
        b_q, b_k, b_v = self.in_proj_bias.chunk(3)

        def heads(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
            return F.linear(x, w, b).view(batch, -1, self.heads, head_dim).transpose(1, 2)

        q, k, v = heads(query, w_q, b_q), heads(key, w_k, b_k), heads(value, w_v, b_v)
        scores = (q * head_dim**-0.5) @ k.transpose(-1, -2)  # [B, heads, Lq, Lk]
        if blocked is not None:
            scores = scores.masked_fill(blocked[:, None], float("-inf"))
        if key_padding is not None:
            scores = scores.masked_fill(key_padding[:, None, None, :], float("-inf"))
        out = (scores.softmax(-1) @ v).transpose(1, 2).reshape(batch, len_q, dim)
        return self.out_proj(out)


class _DeformableAttention(nn.Module):
    """Multi-scale deformable attention (Deformable DETR): each query samples P points per level and head."""

    def __init__(self, dim: int, heads: int, levels: int, points: int):
        super().__init__()
        if dim % heads:
            raise ValueError(f"deformable attention width {dim} is not divisible by {heads} heads")
        self.heads, self.levels, self.points = heads, levels, points
        self.sampling_offsets = nn.Linear(dim, heads * levels * points * 2)
        self.attention_weights = nn.Linear(dim, heads * levels * points)
        self.value_proj = nn.Linear(dim, dim)
        self.output_proj = nn.Linear(dim, dim)

    def forward(
        self,
        query: torch.Tensor,
        memory: torch.Tensor,
        memory_valid: torch.Tensor,
        reference_points: torch.Tensor,
        spatial_shapes: list[tuple[int, int]],
    ) -> torch.Tensor:
        """Samples `memory` around `reference_points`.

        Args:
            query: `[B, Q, dim]`, position embedding already added.
            memory: `[B, S, dim]`, the flattened levels.
            memory_valid: `[B, S]` bool, False for padding (its values are zeroed before sampling).
            reference_points: `[B, Q, levels, 2]` points (x, y) or `[B, Q, levels, 4]` boxes (cx, cy, w, h),
                normalised to [0, 1] per level.
            spatial_shapes: `(H, W)` of each level: Python ints, or traced sizes while exporting.
        """
        batch, num_queries, dim = query.shape
        value = self.value_proj(memory).masked_fill(~memory_valid[..., None], 0.0)
        value = value.view(batch, memory.shape[1], self.heads, dim // self.heads)
        offsets = self.sampling_offsets(query).view(
            batch, num_queries, self.heads, self.levels, self.points, 2
        )
        weights = self.attention_weights(query).view(
            batch, num_queries, self.heads, self.levels * self.points
        )
        weights = weights.softmax(-1).view(batch, num_queries, self.heads, self.levels, self.points)
        if reference_points.shape[-1] == 2:
            # Offsets are in pixels of each level: (W_l, H_l) per level, from the (possibly traced) sizes.
            normalizer = spatial_shapes_tensor([(w, h) for h, w in spatial_shapes], query.dtype, query.device)
            locations = (
                reference_points[:, :, None, :, None, :] + offsets / normalizer[None, None, None, :, None]
            )
        else:
            # Offsets are in units of half the reference box, spread over the P points.
            centre = reference_points[:, :, None, :, None, :2]
            size = reference_points[:, :, None, :, None, 2:]
            locations = centre + offsets / self.points * size * 0.5
        # Boxes stay float32 through refinement (they come from float32 proposals); sample in value's dtype.
        out = multi_scale_deformable_attention(value, spatial_shapes, locations.to(value.dtype), weights)
        return self.output_proj(out)


class _BiAttention(nn.Module):
    """Image-to-text and text-to-image cross-attention sharing one logit matrix (Grounding DINO fusion)."""

    def __init__(self, dim: int, inner_dim: int, heads: int):
        super().__init__()
        if inner_dim % heads:
            raise ValueError(f"fusion width {inner_dim} is not divisible by {heads} heads")
        self.heads = heads
        self.head_dim = inner_dim // heads
        self.vision_proj = nn.Linear(dim, inner_dim)
        self.text_proj = nn.Linear(dim, inner_dim)
        self.values_vision_proj = nn.Linear(dim, inner_dim)
        self.values_text_proj = nn.Linear(dim, inner_dim)
        self.out_vision_proj = nn.Linear(inner_dim, dim)
        self.out_text_proj = nn.Linear(inner_dim, dim)

    def forward(
        self, vision: torch.Tensor, text: torch.Tensor, vision_pad: torch.Tensor, text_pad: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        batch, len_v, _ = vision.shape
        len_t = text.shape[1]

        def heads(x: torch.Tensor) -> torch.Tensor:  # [B, L, inner] -> [B, heads, L, hd]
            return x.view(batch, x.shape[1], self.heads, self.head_dim).transpose(1, 2)

        q_vision = heads(self.vision_proj(vision) * self.head_dim**-0.5)
        k_text = heads(self.text_proj(text))
        v_vision = heads(self.values_vision_proj(vision))
        v_text = heads(self.values_text_proj(text))

        logits = q_vision @ k_text.transpose(-1, -2)  # [B, heads, Lv, Lt]
        # The original subtracts the global max (over the whole batch) and clamps; softmax is shift-invariant,
        # so this only matters where the clamp bites, but it is kept to stay bit-close.
        logits = (logits - logits.max()).clamp(-_FUSION_LOGIT_CLAMP, _FUSION_LOGIT_CLAMP)
        text_logits = logits.transpose(-1, -2)
        text_logits = text_logits - text_logits.max(dim=-1, keepdim=True)[0]
        text_logits = text_logits.clamp(-_FUSION_LOGIT_CLAMP, _FUSION_LOGIT_CLAMP)
        text_logits = text_logits.masked_fill(vision_pad[:, None, None, :], float("-inf"))
        vision_logits = logits.masked_fill(text_pad[:, None, None, :], float("-inf"))

        vision_out = (vision_logits.softmax(-1) @ v_text).transpose(1, 2).reshape(batch, len_v, -1)
        text_out = (text_logits.softmax(-1) @ v_vision).transpose(1, 2).reshape(batch, len_t, -1)
        return self.out_vision_proj(vision_out), self.out_text_proj(text_out)


# --- encoder ----------------------------------------------------------------------------------------


class _TextEnhancerLayer(nn.Module):
    """Post-norm self-attention + FFN over the text tokens, with sine position embeddings on q/k."""

    def __init__(self, s: GroundingDinoSettings):
        super().__init__()
        self.self_attn = _MultiheadAttention(s.d_model, s.encoder_attention_heads // 2)
        self.fc1 = nn.Linear(s.d_model, s.encoder_ffn_dim // 2)
        self.fc2 = nn.Linear(s.encoder_ffn_dim // 2, s.d_model)
        self.layer_norm_before = nn.LayerNorm(s.d_model)
        self.layer_norm_after = nn.LayerNorm(s.d_model)
        self.activation = _ACTIVATIONS[s.activation_function]

    def forward(self, text: torch.Tensor, position: torch.Tensor, blocked: torch.Tensor) -> torch.Tensor:
        qk = text + position
        text = self.layer_norm_before(text + self.self_attn(qk, qk, text, blocked=blocked))
        return self.layer_norm_after(text + self.fc2(self.activation(self.fc1(text))))


class _FusionLayer(nn.Module):
    """Pre-norm bi-attention with layer-scale; note the residual adds to the *normalised* features."""

    def __init__(self, s: GroundingDinoSettings):
        super().__init__()
        self.layer_norm_vision = nn.LayerNorm(s.d_model)
        self.layer_norm_text = nn.LayerNorm(s.d_model)
        self.attn = _BiAttention(s.d_model, s.encoder_ffn_dim // 2, s.encoder_attention_heads // 2)
        self.vision_param = nn.Parameter(torch.full((s.d_model,), 1e-4))
        self.text_param = nn.Parameter(torch.full((s.d_model,), 1e-4))

    def forward(
        self, vision: torch.Tensor, text: torch.Tensor, vision_pad: torch.Tensor, text_pad: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        vision = self.layer_norm_vision(vision)
        text = self.layer_norm_text(text)
        delta_vision, delta_text = self.attn(vision, text, vision_pad, text_pad)
        return vision + self.vision_param * delta_vision, text + self.text_param * delta_text


class _DeformableLayer(nn.Module):
    """Post-norm deformable self-attention + FFN over the image tokens."""

    def __init__(self, s: GroundingDinoSettings):
        super().__init__()
        self.self_attn = _DeformableAttention(
            s.d_model, s.encoder_attention_heads, s.num_feature_levels, s.encoder_n_points
        )
        self.self_attn_layer_norm = nn.LayerNorm(s.d_model)
        self.fc1 = nn.Linear(s.d_model, s.encoder_ffn_dim)
        self.fc2 = nn.Linear(s.encoder_ffn_dim, s.d_model)
        self.final_layer_norm = nn.LayerNorm(s.d_model)
        self.activation = _ACTIVATIONS[s.activation_function]

    def forward(self, vision, position, valid, reference_points, spatial_shapes) -> torch.Tensor:
        attended = self.self_attn(vision + position, vision, valid, reference_points, spatial_shapes)
        vision = self.self_attn_layer_norm(vision + attended)
        return self.final_layer_norm(vision + self.fc2(self.activation(self.fc1(vision))))


class _EncoderLayer(nn.Module):
    def __init__(self, s: GroundingDinoSettings):
        super().__init__()
        self.text_enhancer_layer = _TextEnhancerLayer(s)
        self.fusion_layer = _FusionLayer(s)
        self.deformable_layer = _DeformableLayer(s)


class _Encoder(nn.Module):
    def __init__(self, s: GroundingDinoSettings):
        super().__init__()
        self.layers = nn.ModuleList(_EncoderLayer(s) for _ in range(s.encoder_layers))


# --- decoder ----------------------------------------------------------------------------------------


class _DecoderLayer(nn.Module):
    """Query self-attention, text cross-attention, deformable image cross-attention, FFN; all post-norm."""

    def __init__(self, s: GroundingDinoSettings):
        super().__init__()
        dim = s.d_model
        self.self_attn = _MultiheadAttention(dim, s.decoder_attention_heads)
        self.self_attn_layer_norm = nn.LayerNorm(dim)
        self.encoder_attn_text = _MultiheadAttention(dim, s.decoder_attention_heads)
        self.encoder_attn_text_layer_norm = nn.LayerNorm(dim)
        self.encoder_attn = _DeformableAttention(
            dim, s.decoder_attention_heads, s.num_feature_levels, s.decoder_n_points
        )
        self.encoder_attn_layer_norm = nn.LayerNorm(dim)
        self.fc1 = nn.Linear(dim, s.decoder_ffn_dim)
        self.fc2 = nn.Linear(s.decoder_ffn_dim, dim)
        self.final_layer_norm = nn.LayerNorm(dim)
        self.activation = _ACTIVATIONS[s.activation_function]

    def forward(
        self, queries, position, text, text_pad, memory, memory_valid, reference_points, spatial_shapes
    ) -> torch.Tensor:
        qk = queries + position
        queries = self.self_attn_layer_norm(queries + self.self_attn(qk, qk, queries))
        attended = self.encoder_attn_text(queries + position, text, text, key_padding=text_pad)
        queries = self.encoder_attn_text_layer_norm(queries + attended)
        attended = self.encoder_attn(
            queries + position, memory, memory_valid, reference_points, spatial_shapes
        )
        queries = self.encoder_attn_layer_norm(queries + attended)
        return self.final_layer_norm(queries + self.fc2(self.activation(self.fc1(queries))))


class _Decoder(nn.Module):
    def __init__(self, s: GroundingDinoSettings):
        super().__init__()
        self.layer_norm = nn.LayerNorm(s.d_model)
        self.layers = nn.ModuleList(_DecoderLayer(s) for _ in range(s.decoder_layers))
        # Input: the sine embedding of a (cx, cy, w, h) box, d_model / 2 features per coordinate.
        self.reference_points_head = _MLP(2 * s.d_model, s.d_model, s.d_model, 2)
        # `bbox_embed` is attached by GroundingDinoOV: the same modules as its own `bbox_embed`.


# --- the model body (`model.*`) -----------------------------------------------------------------------


class _ConvEncoder(nn.Module):
    def __init__(self, settings: SwinSettings):
        super().__init__()
        self.model = SwinBackbone(settings)


class _Backbone(nn.Module):
    def __init__(self, settings: SwinSettings):
        super().__init__()
        self.conv_encoder = _ConvEncoder(settings)


class _Body(nn.Module):
    """The official `OVGroundingDinoModel`'s parameters: backbone, projections, pixel decoder, transformer."""

    def __init__(self, s: GroundingDinoSettings):
        super().__init__()
        dim = s.d_model
        channels = s.backbone.out_channels
        self.backbone = _Backbone(s.backbone)
        # Levels 0-2 project backbone stages 2-4; extra levels are stride-2 3x3 convs on top of stage 4.
        projections = [nn.Sequential(nn.Conv2d(c, dim, 1), nn.GroupNorm(32, dim)) for c in channels[-3:]]
        in_ch = channels[-1]
        for _ in range(s.num_feature_levels - 3):
            projections.append(
                nn.Sequential(nn.Conv2d(in_ch, dim, 3, stride=2, padding=1), nn.GroupNorm(32, dim))
            )
            in_ch = dim
        self.input_proj_vision = nn.ModuleList(projections)
        self.num_fpn_levels = max(s.num_feature_levels - 3, 1)
        self.mask_features = nn.Conv2d(dim, s.mask_dim, 1)
        self.lateral_convs = nn.ModuleList(
            _ConvNorm(c, dim, 1, s.norm, relu=False) for c in channels[: self.num_fpn_levels]
        )
        self.output_convs = nn.ModuleList(
            _ConvNorm(dim, dim, 3, s.norm, relu=True) for _ in range(self.num_fpn_levels)
        )
        self.query_position_embeddings = nn.Embedding(s.num_queries, dim)
        # Predicts masks for the initial queries during training; unused at inference but in the checkpoint.
        self.mask_embed = _MLP(dim, dim, s.mask_dim, 3)
        self.encoder = _Encoder(s)
        self.decoder = _Decoder(s)
        self.level_embed = nn.Parameter(torch.zeros(s.num_feature_levels, dim))
        self.enc_output = nn.Linear(dim, dim)
        self.enc_output_norm = nn.LayerNorm(dim)
        self.encoder_output_bbox_embed = _MLP(dim, dim, 4, 3)


# --- public model -----------------------------------------------------------------------------------


class GroundingDinoOV(nn.Module):
    """VisionLLM v2's object decoder (OV Grounding DINO + mask head), the PyTorch reference for export.

    Holds no state that depends on the input size, so one instance serves any resolution.

    Args:
        config: The official `gdino_config` dict (as stored in the checkpoint's `config.json`).

    Raises:
        ValueError: The config describes an unsupported variant (see `GroundingDinoSettings.from_dict`).
    """

    def __init__(self, config: dict):
        super().__init__()
        s = GroundingDinoSettings.from_dict(config)
        self.settings = s
        self.model = _Body(s)
        # The official head lists repeat one module per decoder layer; registering the same object under
        # every index (and under `model.decoder.bbox_embed`) reproduces the checkpoint's alias keys.
        mask_embed = _MLP(s.d_model, s.d_model, s.mask_dim, 3)
        self.mask_embed = nn.ModuleList([mask_embed] * s.decoder_layers)
        bbox_embed = _MLP(s.d_model, s.d_model, 4, 3)
        if s.decoder_bbox_embed_share:
            self.bbox_embed = nn.ModuleList([bbox_embed] * s.decoder_layers)
        else:
            self.bbox_embed = nn.ModuleList(copy.deepcopy(bbox_embed) for _ in range(s.decoder_layers))
        self.model.decoder.bbox_embed = self.bbox_embed
        self.patch2query = _MLP(s.l_hidden_size, s.d_model, s.d_model, 3)

    # -- input checks ----------------------------------------------------------------------------------

    def _check_inputs(self, pixel_values, pixel_mask, text_query, text_query_masks, mask_query_indices):
        s = self.settings

        def fail(name: str, expected: str, got) -> None:
            raise ValueError(f"{name}: expected {expected}, got {got}")

        if pixel_values.dim() != 4 or pixel_values.shape[1] != s.backbone.num_channels:
            fail("pixel_values", f"shape [B, {s.backbone.num_channels}, H, W]", list(pixel_values.shape))
        batch, _, height, width = pixel_values.shape
        if height % 32 or width % 32:
            fail("pixel_values", "H and W multiples of 32", f"H={height}, W={width}")
        if not pixel_values.is_floating_point():
            fail("pixel_values", "a floating-point tensor", pixel_values.dtype)
        if list(pixel_mask.shape) != [batch, height, width]:
            fail("pixel_mask", f"shape [{batch}, {height}, {width}]", list(pixel_mask.shape))
        if text_query.dim() != 4 or text_query.shape[0] != batch or text_query.shape[-1] != s.l_hidden_size:
            fail("text_query", f"shape [{batch}, K, N, {s.l_hidden_size}]", list(text_query.shape))
        num_text = text_query.shape[1]
        if not 1 <= num_text <= s.max_text_len:
            fail("text_query", f"1 <= K <= max_text_len={s.max_text_len}", f"K={num_text}")
        if list(text_query_masks.shape) != [batch, num_text]:
            fail("text_query_masks", f"shape [{batch}, {num_text}]", list(text_query_masks.shape))
        if mask_query_indices is not None:
            if mask_query_indices.dim() != 2 or mask_query_indices.shape[0] != batch:
                fail("mask_query_indices", f"shape [{batch}, k]", list(mask_query_indices.shape))
            if mask_query_indices.dtype != torch.int64:
                fail("mask_query_indices", "dtype torch.int64", mask_query_indices.dtype)

    # -- stages ----------------------------------------------------------------------------------------

    def encode_text_queries(self, text_query: torch.Tensor) -> torch.Tensor:
        """`[B, K, N, L_hidden]` LLM rows -> `[B, K, d_model]`: one token per group (MLP, mean over N)."""
        return self.patch2query(text_query).mean(-2)

    def _text_attention_masks(self, valid: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Self-attention block and position ids of the text tokens.

        The first `n = valid.sum()` tokens attend to each other and are numbered 0..n-1; every other token
        attends only to itself and has position 0. (Valid tokens are expected first, as the official code
        assumes.)

        Returns:
            `blocked [B, K, K]` (True = may not attend) and `position_ids [B, K]` (int64).
        """
        num_text = valid.shape[1]
        count = valid.sum(-1)[:, None]  # [B, 1]
        index = torch.arange(num_text, device=valid.device)
        inside = index[None] < count  # [B, K]
        # `index == index.T` rather than `torch.eye(..., dtype=bool)`: the latter exports to a bool EyeLike,
        # which ONNX Runtime does not implement.
        allowed = (inside[:, :, None] & inside[:, None, :]) | (index[:, None] == index[None, :])
        position_ids = torch.where(inside, index[None], torch.zeros_like(index)[None])
        return ~allowed, position_ids

    def _multi_level_inputs(self, pixel_values: torch.Tensor, pixel_mask: torch.Tensor):
        """Backbone maps and the flattened encoder inputs.

        Returns:
            `(stage_maps, sources, masks, positions)`: the 4 backbone maps, then per encoder level the
            projected map `[B, d, H_l, W_l]`, its validity mask `[B, H_l, W_l]` and its position embedding.
        """
        body = self.model
        stage_maps = body.backbone.conv_encoder.model(pixel_values)
        num_feats = self.settings.d_model // 2
        temperature = self.settings.positional_embedding_temperature
        sources, masks = [], []
        for level, feature in enumerate(stage_maps[1:]):
            sources.append(body.input_proj_vision[level](feature))
            masks.append(_downsample_mask(pixel_mask, tuple(feature.shape[-2:])))
        first_extra = len(sources)
        for level in range(first_extra, self.settings.num_feature_levels):
            # The first extra level convolves the last backbone map, later ones the previous extra level.
            previous = stage_maps[-1] if level == first_extra else sources[-1]
            source = body.input_proj_vision[level](previous)
            sources.append(source)
            masks.append(_downsample_mask(pixel_mask, tuple(source.shape[-2:])))
        positions = [
            _map_position_embedding(m, num_feats, temperature).to(src.dtype) for m, src in zip(masks, sources)
        ]
        return stage_maps, sources, masks, positions

    def _encoder_reference_points(self, spatial_shapes, valid_ratios, device) -> torch.Tensor:
        """Pixel centres of every level, normalised by the valid extent, then re-scaled to each level."""
        points = []
        for level, (height, width) in enumerate(spatial_shapes):
            # `arange + 0.5` equals the official `linspace(0.5, n - 0.5, n)` exactly (its step is 1.0) and
            # follows a traced `n`.
            ref_y, ref_x = torch.meshgrid(
                torch.arange(height, dtype=torch.float32, device=device) + 0.5,
                torch.arange(width, dtype=torch.float32, device=device) + 0.5,
                indexing="ij",
            )
            ref_y = ref_y.reshape(-1)[None] / (valid_ratios[:, None, level, 1] * height)
            ref_x = ref_x.reshape(-1)[None] / (valid_ratios[:, None, level, 0] * width)
            points.append(torch.stack((ref_x, ref_y), -1))
        return torch.cat(points, 1)[:, :, None] * valid_ratios[:, None]

    def _proposals(self, memory: torch.Tensor, valid: torch.Tensor, spatial_shapes):
        """Two-stage proposals: one box per encoder token (its pixel, size 0.05 * 2**level).

        Returns:
            `object_query [B, S, d]` (the projected memory, zeroed where invalid) and `proposals [B, S, 4]`
            in logit space, `+inf` for padding and for boxes too close to the border.
        """
        batch = memory.shape[0]
        boxes, start = [], 0
        for level, (height, width) in enumerate(spatial_shapes):
            level_valid = valid[:, start : start + height * width].view(batch, height, width)
            valid_h = level_valid[:, :, 0].sum(1)
            valid_w = level_valid[:, 0, :].sum(1)
            # `arange` equals the official `linspace(0, n - 1, n)` exactly and follows a traced `n`.
            grid_y, grid_x = torch.meshgrid(
                torch.arange(height, dtype=torch.float32, device=memory.device),
                torch.arange(width, dtype=torch.float32, device=memory.device),
                indexing="ij",
            )
            grid = torch.cat([grid_x[..., None], grid_y[..., None]], -1)
            scale = torch.cat([valid_w[:, None], valid_h[:, None]], 1).view(batch, 1, 1, 2)
            grid = (grid[None].expand(batch, -1, -1, -1) + 0.5) / scale
            size = torch.ones_like(grid) * 0.05 * (2.0**level)
            boxes.append(torch.cat((grid, size), -1).view(batch, -1, 4))
            start += height * width
        proposals = torch.cat(boxes, 1)
        inside = ((proposals > 0.01) & (proposals < 0.99)).all(-1, keepdim=True)
        proposals = torch.log(proposals / (1 - proposals))
        proposals = proposals.masked_fill(~valid[..., None], float("inf")).masked_fill(~inside, float("inf"))
        object_query = memory.masked_fill(~valid[..., None], 0.0).masked_fill(~inside, 0.0)
        object_query = self.model.enc_output_norm(self.model.enc_output(object_query))
        return object_query, proposals

    def _class_logits(
        self, queries: torch.Tensor, text: torch.Tensor, text_valid: torch.Tensor
    ) -> torch.Tensor:
        """Dot product with each text token; `-inf` for invalid tokens and for slots up to `max_text_len`."""
        logits = (queries @ text.transpose(-1, -2)).masked_fill(~text_valid[:, None, :], float("-inf"))
        pad = self.settings.max_text_len - logits.shape[-1]
        return torch.cat([logits, logits.new_full((*logits.shape[:-1], pad), float("-inf"))], -1)

    # -- forward ---------------------------------------------------------------------------------------

    def forward(
        self,
        pixel_values: torch.Tensor,
        pixel_mask: torch.Tensor,
        text_query: torch.Tensor,
        text_query_masks: torch.Tensor,
        mask_query_indices: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Detects and segments the objects described by the text queries.

        Args:
            pixel_values: `[B, 3, H, W]` normalised image, zero-padded at the bottom/right; H and W
                multiples of 32.
            pixel_mask: `[B, H, W]` bool, True on valid (unpadded) pixels.
            text_query: `[B, K, N, L_hidden]` the LLM hidden states of K query groups of N rows.
            text_query_masks: `[B, K]` bool, True for real groups (which must come first).
            mask_query_indices: Optional `[B, k]` int64 query indices; when given, masks are computed only
                for those queries, in that order.

        Returns:
            `logits [B, Q, max_text_len]` (slots of invalid or absent groups are `-inf`),
            `pred_boxes [B, Q, 4]` (cx, cy, w, h in [0, 1] of the padded image) and
            `pred_masks [B, Q or k, H/4, W/4]` mask logits.

        Raises:
            ValueError: An input has the wrong rank, shape or dtype (the message names it).
        """
        with _quiet_input_checks_when_tracing():
            self._check_inputs(pixel_values, pixel_mask, text_query, text_query_masks, mask_query_indices)
            return self._forward(pixel_values, pixel_mask, text_query, text_query_masks, mask_query_indices)

    def forward_train(self, pixel_values, pixel_mask, text_query, text_query_masks) -> dict:
        """Training outputs: the final ones plus every decoder layer's and the encoder tokens' predictions.

        Returns a dict with `logits`, `boxes`, `masks` (all queries), `layers` (per decoder layer
        `(logits, boxes)`, the last equal to the final ones) and `encoder` (`(logits, boxes)` of every
        encoder token, the two-stage proposals). The initial boxes and each layer's refined boxes are
        detached before the next layer reads them, as DINO trains.
        """
        aux: dict = {"layers": []}
        logits, boxes, masks = self._forward(
            pixel_values, pixel_mask, text_query, text_query_masks, None, aux
        )
        return {"logits": logits, "boxes": boxes, "masks": masks, **aux}

    def _forward(self, pixel_values, pixel_mask, text_query, text_query_masks, mask_query_indices, aux=None):
        s, body = self.settings, self.model
        pixel_mask = pixel_mask.bool()
        text_valid = text_query_masks.bool()
        text_pad = ~text_valid

        # Text side.
        text = self.encode_text_queries(text_query)
        text_blocked, text_positions = self._text_attention_masks(text_valid)
        text_position_embedding = _coordinate_embedding(text_positions, s.d_model).to(text.dtype)

        # Image side: flatten the levels into one token sequence.
        stage_maps, sources, masks, positions = self._multi_level_inputs(pixel_values, pixel_mask)
        # Python ints in eager mode; traced sizes while exporting, so everything derived follows the input.
        spatial_shapes = [(src.shape[-2], src.shape[-1]) for src in sources]
        memory = torch.cat([src.flatten(2).transpose(1, 2) for src in sources], 1)
        valid = torch.cat([m.flatten(1) for m in masks], 1)
        vision_pad = ~valid
        level_positions = torch.cat(
            [pos.flatten(2).transpose(1, 2) + body.level_embed[level] for level, pos in enumerate(positions)],
            1,
        )
        valid_ratios = torch.stack([_valid_ratio(m) for m in masks], 1)  # [B, L, 2]
        if memory.shape[1] < s.num_queries:
            raise ValueError(
                f"pixel_values: expected an image with at least num_queries={s.num_queries} encoder tokens, "
                f"got {memory.shape[1]} for H={pixel_values.shape[2]}, W={pixel_values.shape[3]}"
            )

        # Encoder: fuse image and text, then refine each.
        reference_points = self._encoder_reference_points(spatial_shapes, valid_ratios, memory.device)
        reference_points = reference_points.to(memory.dtype)
        for layer in body.encoder.layers:
            memory, text = layer.fusion_layer(memory, text, vision_pad, text_pad)
            text = layer.text_enhancer_layer(text, text_position_embedding, text_blocked)
            memory = layer.deformable_layer(memory, level_positions, valid, reference_points, spatial_shapes)

        # Pixel decoder: upsample the finest encoder level onto the stride-4 backbone map.
        level_maps, start = [], 0
        for h, w in spatial_shapes:  # slices at running offsets (a `split` would freeze the sizes)
            chunk = memory[:, start : start + h * w]
            level_maps.append(chunk.transpose(1, 2).reshape(memory.shape[0], -1, h, w))
            start = start + h * w
        for idx in range(body.num_fpn_levels):
            lateral = body.lateral_convs[idx](stage_maps[idx])
            upsampled = F.interpolate(
                level_maps[0], size=lateral.shape[-2:], mode="bilinear", align_corners=False
            )
            level_maps.insert(0, body.output_convs[idx](lateral + upsampled))
        mask_features = body.mask_features(level_maps[0])

        # Two-stage query selection: the top-scoring encoder tokens give the initial boxes.
        object_query, proposals = self._proposals(memory, valid, spatial_shapes)
        token_scores = (object_query @ text.transpose(-1, -2)).masked_fill(
            text_pad[:, None, :], float("-inf")
        )
        top = torch.topk(token_scores.max(-1)[0], s.num_queries, dim=1)[1]
        coords = body.encoder_output_bbox_embed(object_query) + proposals
        boxes = torch.gather(coords, 1, top[..., None].expand(-1, -1, 4)).sigmoid()
        if aux is not None:
            aux["encoder"] = (self._class_logits(object_query, text, text_valid), coords.sigmoid(), valid)
            boxes = boxes.detach()
        queries = body.query_position_embeddings.weight[None].expand(memory.shape[0], -1, -1)

        # Decoder with iterative box refinement; the last layer's box comes from the normalised output.
        box_scale = torch.cat([valid_ratios, valid_ratios], -1)[:, None]  # [B, 1, L, 4]
        last = len(body.decoder.layers) - 1
        for idx, layer in enumerate(body.decoder.layers):
            level_boxes = boxes[:, :, None] * box_scale
            box_embedding = torch.cat(
                [_coordinate_embedding(level_boxes[:, :, 0, c], s.d_model // 2) for c in (1, 0, 2, 3)], -1
            )
            position = body.decoder.reference_points_head(box_embedding.to(queries.dtype))
            queries = layer(queries, position, text, text_pad, memory, valid, level_boxes, spatial_shapes)
            if idx < last:
                refined = (self.bbox_embed[idx](queries) + _inverse_sigmoid(boxes)).sigmoid()
                if aux is not None:
                    layer_logits = self._class_logits(body.decoder.layer_norm(queries), text, text_valid)
                    aux["layers"].append((layer_logits, refined))
                    refined = refined.detach()
                boxes = refined

        hidden = body.decoder.layer_norm(queries)
        logits = self._class_logits(hidden, text, text_valid)
        pred_boxes = (self.bbox_embed[last](hidden) + _inverse_sigmoid(boxes)).sigmoid()
        if mask_query_indices is not None:
            hidden = torch.gather(hidden, 1, mask_query_indices[..., None].expand(-1, -1, hidden.shape[-1]))
        pred_masks = torch.einsum("bqc,bchw->bqhw", self.mask_embed[last](hidden), mask_features)
        if aux is not None:
            aux["layers"].append((logits, pred_boxes))
        return logits, pred_boxes, pred_masks
