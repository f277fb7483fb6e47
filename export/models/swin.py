"""Swin Transformer backbone (feature-pyramid form), with the parameter names of transformers' `SwinBackbone`.

The object decoder loads its backbone through `AutoBackbone`, so the checkpoint stores transformers' names
(`embeddings.patch_embeddings.projection`, `encoder.layers.N.blocks.M.attention.self.query`, ...,
`hidden_states_norms.stageN`). This module reproduces that computation in plain PyTorch with no state that
depends on the input size: the window size and the cyclic shift are fixed by the config, exactly as
`SwinBackbone` runs its stages (it always partitions, so it never shrinks the window to a small feature map).
A feature map smaller than the window is zero-padded up to one window, and the padded positions take part in
attention as keys, as they do in transformers.

Every size-dependent quantity (window padding, the shifted-window mask, patch-merging padding, the stage
sizes) is computed with tensor-friendly arithmetic on the map's own shape: while `torch.onnx.export` traces,
`x.shape[i]` is a traced value, so the exported graph takes any input height and width.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

# The shifted-window mask uses this finite penalty (not -inf) between regions that the cyclic shift brought
# together; any other value changes the softmax slightly.
_SHIFT_MASK_PENALTY = -100.0


@dataclass(frozen=True)
class SwinSettings:
    """The subset of a transformers `SwinConfig` dict that the backbone needs.

    Attributes:
        embed_dim: Channels of stage 1; stage i has `embed_dim * 2**i`.
        depths: Blocks per stage.
        num_heads: Attention heads per stage.
        window_size: Side of the square attention window.
        patch_size: Side of the non-overlapping patch embedding.
        num_channels: Input image channels.
        mlp_ratio: Hidden width of each block's MLP relative to its channels.
        qkv_bias: Whether query/key/value projections have a bias.
        layer_norm_eps: Epsilon of the LayerNorms inside the blocks.
        out_features: Stage names (`stage1` .. `stageN`) whose normalised outputs are returned.
    """

    embed_dim: int
    depths: tuple[int, ...]
    num_heads: tuple[int, ...]
    window_size: int = 7
    patch_size: int = 4
    num_channels: int = 3
    mlp_ratio: float = 4.0
    qkv_bias: bool = True
    layer_norm_eps: float = 1e-5
    out_features: tuple[str, ...] = ("stage1", "stage2", "stage3", "stage4")

    @classmethod
    def from_dict(cls, config: dict) -> SwinSettings:
        """Reads a transformers `SwinConfig` dict (as stored under `backbone_config`).

        Raises:
            ValueError: The dict describes something this backbone does not implement.
        """
        model_type = config.get("model_type", "swin")
        if model_type != "swin":
            raise ValueError(f"backbone_config.model_type must be 'swin', got {model_type!r}")
        if config.get("use_absolute_embeddings", False):
            raise ValueError("backbone_config.use_absolute_embeddings=True is not supported")
        if config.get("hidden_act", "gelu") != "gelu":
            raise ValueError(f"backbone_config.hidden_act must be 'gelu', got {config.get('hidden_act')!r}")
        depths = tuple(int(d) for d in config["depths"])
        heads = tuple(int(h) for h in config["num_heads"])
        if len(depths) != len(heads):
            raise ValueError(f"backbone_config: {len(depths)} depths but {len(heads)} num_heads")
        stage_names = [f"stage{i + 1}" for i in range(len(depths))]
        out_features = tuple(config.get("out_features") or [stage_names[-1]])
        unknown = [name for name in out_features if name not in stage_names]
        if unknown:
            raise ValueError(
                f"backbone_config.out_features has unknown stages {unknown}; known: {stage_names}"
            )
        return cls(
            embed_dim=int(config["embed_dim"]),
            depths=depths,
            num_heads=heads,
            window_size=int(config.get("window_size", 7)),
            patch_size=int(config.get("patch_size", 4)),
            num_channels=int(config.get("num_channels", 3)),
            mlp_ratio=float(config.get("mlp_ratio", 4.0)),
            qkv_bias=bool(config.get("qkv_bias", True)),
            layer_norm_eps=float(config.get("layer_norm_eps", 1e-5)),
            out_features=out_features,
        )

    def stage_channels(self, stage: int) -> int:
        """Channels of stage `stage` (0-based)."""
        return self.embed_dim * 2**stage

    @property
    def out_channels(self) -> list[int]:
        """Channels of each returned feature map, in `out_features` order."""
        return [self.stage_channels(int(name[len("stage") :]) - 1) for name in self.out_features]


def _relative_position_index(window: int) -> torch.Tensor:
    """Index into the `(2w-1)^2` bias table for every (query, key) pair of a `w x w` window."""
    rows, cols = torch.meshgrid(torch.arange(window), torch.arange(window), indexing="ij")
    coords = torch.stack([rows.flatten(), cols.flatten()])  # [2, w*w]
    delta = coords[:, :, None] - coords[:, None, :]  # [2, w*w, w*w], in [-(w-1), w-1]
    return (delta[0] + window - 1) * (2 * window - 1) + (delta[1] + window - 1)


def _to_windows(x: torch.Tensor, window: int) -> torch.Tensor:
    """`[B, H, W, C]` (H, W multiples of `window`) -> `[B * nH * nW, window*window, C]`, windows row-major."""
    batch, height, width, channels = x.shape
    x = x.view(batch, height // window, window, width // window, window, channels)
    return x.permute(0, 1, 3, 2, 4, 5).reshape(-1, window * window, channels)


def _from_windows(windows: torch.Tensor, window: int, height: int, width: int) -> torch.Tensor:
    """Inverse of `_to_windows`."""
    channels = windows.shape[-1]
    x = windows.view(-1, height // window, width // window, window, window, channels)
    return x.permute(0, 1, 3, 2, 4, 5).reshape(-1, height, width, channels)


def _band(size: int, window: int, shift: int, device: torch.device) -> torch.Tensor:
    """Band of each index along one padded axis: 0 before `size - window`, 1 before `size - shift`, else 2."""
    index = torch.arange(size, device=device)
    return (index >= size - window).to(torch.int64) + (index >= size - shift).to(torch.int64)


def _shift_mask(height: int, width: int, window: int, shift: int, device: torch.device) -> torch.Tensor:
    """Additive mask `[nH * nW, w*w, w*w]` that keeps the shifted windows from mixing unrelated regions.

    After the cyclic roll, a window at the bottom/right edge holds pixels from up to four regions that are not
    neighbours in the image; label each region and forbid attention between different labels.
    """
    # Bands [0, -window), [-window, -shift), [-shift, end) per axis; region = 3 * row band + column band.
    # Written as comparisons rather than slice assignments: those trace to ScatterND chains, and an empty
    # band (a map no larger than one window) breaks `torch.onnx.export`.
    row_band = _band(height, window, shift, device)
    col_band = _band(width, window, shift, device)
    labels = (3 * row_band[:, None] + col_band[None, :]).to(torch.float32)[None, :, :, None]
    labels = _to_windows(labels, window)[..., 0]  # [nW, w*w]; not squeeze(-1), which exports as an If
    different = labels[:, None, :] != labels[:, :, None]
    return torch.zeros(different.shape, device=device).masked_fill(different, _SHIFT_MASK_PENALTY)


class _SelfAttentionCore(nn.Module):
    """Windowed multi-head attention with a learned relative position bias (`attention.self`)."""

    def __init__(self, dim: int, heads: int, window: int, qkv_bias: bool):
        super().__init__()
        if dim % heads:
            raise ValueError(f"Swin stage width {dim} is not divisible by its {heads} heads")
        self.heads = heads
        self.head_dim = dim // heads
        self.window = window
        self.relative_position_bias_table = nn.Parameter(torch.zeros((2 * window - 1) ** 2, heads))
        # Persistent because the checkpoint stores it (transformers registers it without persistent=False).
        self.register_buffer("relative_position_index", _relative_position_index(window))
        self.query = nn.Linear(dim, dim, bias=qkv_bias)
        self.key = nn.Linear(dim, dim, bias=qkv_bias)
        self.value = nn.Linear(dim, dim, bias=qkv_bias)

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        windows, tokens, dim = x.shape

        def split(t: torch.Tensor) -> torch.Tensor:
            return t.view(windows, tokens, self.heads, self.head_dim).transpose(1, 2)

        q, k, v = split(self.query(x)), split(self.key(x)), split(self.value(x))
        scores = q @ k.transpose(-1, -2) / (self.head_dim**0.5)
        bias = self.relative_position_bias_table[self.relative_position_index.view(-1)]
        scores = scores + bias.view(tokens, tokens, self.heads).permute(2, 0, 1).unsqueeze(0)
        if mask is not None:
            per_image = mask.shape[0]
            scores = scores.view(windows // per_image, per_image, self.heads, tokens, tokens)
            scores = (scores + mask[None, :, None]).view(windows, self.heads, tokens, tokens)
        out = scores.softmax(-1) @ v
        return out.transpose(1, 2).reshape(windows, tokens, dim)


class _Dense(nn.Module):
    """A single `dense` Linear, the container transformers uses for `attention.output` and `output`."""

    def __init__(self, in_dim: int, out_dim: int):
        super().__init__()
        self.dense = nn.Linear(in_dim, out_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.dense(x)


class _WindowAttention(nn.Module):
    def __init__(self, dim: int, heads: int, window: int, qkv_bias: bool):
        super().__init__()
        self.self = _SelfAttentionCore(dim, heads, window, qkv_bias)
        self.output = _Dense(dim, dim)

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        return self.output(self.self(x, mask))


class _SwinBlock(nn.Module):
    """One (shifted-)window transformer block; odd blocks of a stage shift by half a window."""

    def __init__(self, dim: int, heads: int, settings: SwinSettings, shift: int):
        super().__init__()
        self.window = settings.window_size
        self.shift = shift
        hidden = int(settings.mlp_ratio * dim)
        self.layernorm_before = nn.LayerNorm(dim, eps=settings.layer_norm_eps)
        self.attention = _WindowAttention(dim, heads, self.window, settings.qkv_bias)
        self.layernorm_after = nn.LayerNorm(dim, eps=settings.layer_norm_eps)
        self.intermediate = _Dense(dim, hidden)
        self.output = _Dense(hidden, dim)

    def forward(self, x: torch.Tensor, height: int, width: int) -> torch.Tensor:
        batch, _, channels = x.shape
        window, shift = self.window, self.shift
        # Padding is applied after the norm, so padded positions are exact zeros (keys of value `bias`).
        h = self.layernorm_before(x).view(batch, height, width, channels)
        # Non-negative operands only: traced, `%` is exported integer arithmetic on a shape, and C-style and
        # floor modulo (which ONNX Mod's `fmod` picks between) differ on negatives.
        pad_h, pad_w = (window - height % window) % window, (window - width % window) % window
        h = F.pad(h, (0, 0, 0, pad_w, 0, pad_h))
        full_h, full_w = height + pad_h, width + pad_w
        mask = None
        if shift > 0:
            h = torch.roll(h, shifts=(-shift, -shift), dims=(1, 2))
            mask = _shift_mask(full_h, full_w, window, shift, x.device).to(x.dtype)
        h = self.attention(_to_windows(h, window), mask)
        h = _from_windows(h, window, full_h, full_w)
        if shift > 0:
            h = torch.roll(h, shifts=(shift, shift), dims=(1, 2))
        h = h[:, :height, :width, :].reshape(batch, height * width, channels)
        x = x + h
        return x + self.output(F.gelu(self.intermediate(self.layernorm_after(x))))


class _PatchMerging(nn.Module):
    """2x2 neighbourhood concat (odd sizes zero-padded) -> LayerNorm -> linear to twice the channels."""

    def __init__(self, dim: int):
        super().__init__()
        self.reduction = nn.Linear(4 * dim, 2 * dim, bias=False)
        self.norm = nn.LayerNorm(4 * dim)

    def forward(self, x: torch.Tensor, height: int, width: int) -> torch.Tensor:
        batch, _, channels = x.shape
        x = x.view(batch, height, width, channels)
        x = F.pad(x, (0, 0, 0, width % 2, 0, height % 2))
        # transformers' concat order: (even row, even col), (odd, even), (even, odd), (odd, odd).
        x = torch.cat([x[:, 0::2, 0::2], x[:, 1::2, 0::2], x[:, 0::2, 1::2], x[:, 1::2, 1::2]], dim=-1)
        return self.reduction(self.norm(x.reshape(batch, -1, 4 * channels)))


class _SwinStage(nn.Module):
    def __init__(self, settings: SwinSettings, stage: int):
        super().__init__()
        dim = settings.stage_channels(stage)
        self.blocks = nn.ModuleList(
            _SwinBlock(
                dim, settings.num_heads[stage], settings, 0 if i % 2 == 0 else settings.window_size // 2
            )
            for i in range(settings.depths[stage])
        )
        self.downsample = _PatchMerging(dim) if stage < len(settings.depths) - 1 else None

    def forward(self, x: torch.Tensor, height: int, width: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Returns (the stage output before downsampling, the input of the next stage)."""
        for block in self.blocks:
            x = block(x, height, width)
        merged = self.downsample(x, height, width) if self.downsample is not None else x
        return x, merged


class _PatchEmbeddings(nn.Module):
    def __init__(self, settings: SwinSettings):
        super().__init__()
        self.patch = settings.patch_size
        self.projection = nn.Conv2d(
            settings.num_channels, settings.embed_dim, kernel_size=self.patch, stride=self.patch
        )

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        height, width = pixel_values.shape[-2:]
        patch = self.patch
        pad_w, pad_h = (patch - width % patch) % patch, (patch - height % patch) % patch
        pixel_values = F.pad(pixel_values, (0, pad_w, 0, pad_h))
        return self.projection(pixel_values)


class _Embeddings(nn.Module):
    def __init__(self, settings: SwinSettings):
        super().__init__()
        self.patch_embeddings = _PatchEmbeddings(settings)
        self.norm = nn.LayerNorm(settings.embed_dim)

    def forward(self, pixel_values: torch.Tensor) -> tuple[torch.Tensor, int, int]:
        x = self.patch_embeddings(pixel_values)
        height, width = x.shape[-2:]
        return self.norm(x.flatten(2).transpose(1, 2)), height, width


class _Encoder(nn.Module):
    def __init__(self, settings: SwinSettings):
        super().__init__()
        self.layers = nn.ModuleList(_SwinStage(settings, i) for i in range(len(settings.depths)))


class SwinBackbone(nn.Module):
    """Swin feature pyramid: one LayerNorm-ed `[B, C_i, H_i, W_i]` map per requested stage.

    Stateless with respect to the input size (see the module docstring), so one instance serves any
    resolution, and an exported graph does not depend on the first image it saw.

    Args:
        settings: Architecture, usually `SwinSettings.from_dict(config["backbone_config"])`.
    """

    def __init__(self, settings: SwinSettings):
        super().__init__()
        self.settings = settings
        self.embeddings = _Embeddings(settings)
        self.encoder = _Encoder(settings)
        self.hidden_states_norms = nn.ModuleDict(
            {name: nn.LayerNorm(ch) for name, ch in zip(settings.out_features, settings.out_channels)}
        )

    @property
    def channels(self) -> list[int]:
        """Channels of each returned map, in `out_features` order."""
        return self.settings.out_channels

    def forward(self, pixel_values: torch.Tensor) -> list[torch.Tensor]:
        """Runs the backbone.

        Args:
            pixel_values: `[B, num_channels, H, W]`.

        Returns:
            One `[B, C, H_i, W_i]` map per entry of `out_features`, in that order; stage i has stride
            `patch_size * 2**i`.
        """
        x, height, width = self.embeddings(pixel_values)
        outputs = {}
        for index, stage in enumerate(self.encoder.layers):
            name = f"stage{index + 1}"
            before, x = stage(x, height, width)
            if name in self.hidden_states_norms:
                normed = self.hidden_states_norms[name](before)
                outputs[name] = normed.transpose(1, 2).reshape(before.shape[0], -1, height, width)
            height, width = (height + 1) // 2, (width + 1) // 2
        return [outputs[name] for name in self.settings.out_features]
