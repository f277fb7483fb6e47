"""The Swin Transformer backbone of the UniPose keypoint decoder, inference only.

Parameter names follow the official UniPose backbone (`backbone.0.*` inside `UniPose`), so an official
state dict loads without renaming. Three behaviours of that backbone matter for parity and are kept on
purpose:

* a feature map that is not a multiple of the window is zero-padded *after* `norm1`, and those padded
  tokens take part in the (unshifted) window attention without any mask;
* the shifted-window mask uses -100 (not -inf) between regions;
* only the stages named in `out_indices` get an output `norm{i}` (UniPose uses stages 1, 2, 3).

No Python control flow or `int()` depends on the input size: paddings, window counts and the shifted-window
mask are computed from the map's own shape with arithmetic that also works on traced sizes, so one exported
graph takes any input height and width.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

#: Sizes of the backbones the official `build_swin_transformer` knows, by config name.
SWIN_PRESETS: dict[str, dict] = {
    "swin_T_224_1k": {"embed_dim": 96, "depths": [2, 2, 6, 2], "num_heads": [3, 6, 12, 24], "window_size": 7},
    "swin_B_224_22k": {
        "embed_dim": 128,
        "depths": [2, 2, 18, 2],
        "num_heads": [4, 8, 16, 32],
        "window_size": 7,
    },
    "swin_B_384_22k": {
        "embed_dim": 128,
        "depths": [2, 2, 18, 2],
        "num_heads": [4, 8, 16, 32],
        "window_size": 12,
    },
    "swin_L_224_22k": {
        "embed_dim": 192,
        "depths": [2, 2, 18, 2],
        "num_heads": [6, 12, 24, 48],
        "window_size": 7,
    },
    "swin_L_384_22k": {
        "embed_dim": 192,
        "depths": [2, 2, 18, 2],
        "num_heads": [6, 12, 24, 48],
        "window_size": 12,
    },
}


def _relative_position_index(window: int) -> torch.Tensor:
    """Index into the `(2w-1)^2` bias table for every (query, key) pair of a `w x w` window."""
    ys, xs = torch.meshgrid(torch.arange(window), torch.arange(window), indexing="ij")
    coords = torch.stack((ys.flatten(), xs.flatten()))  # [2, w*w]
    rel = coords[:, :, None] - coords[:, None, :]  # [2, w*w, w*w]
    # Shift both offsets to be non-negative, then flatten (dy, dx) row-major over a (2w-1)-wide table.
    return (rel[0] + window - 1) * (2 * window - 1) + (rel[1] + window - 1)


def _to_windows(x: torch.Tensor, window: int) -> torch.Tensor:
    """`[B, H, W, C]` (H, W multiples of `window`) -> `[B * nW, window * window, C]`, windows row-major."""
    b, h, w, c = x.shape
    x = x.view(b, h // window, window, w // window, window, c).permute(0, 1, 3, 2, 4, 5)
    return x.reshape(-1, window * window, c)


def _from_windows(windows: torch.Tensor, window: int, h: int, w: int) -> torch.Tensor:
    """Inverse of `_to_windows`: `[B * nW, window * window, C]` -> `[B, h, w, C]`."""
    c = windows.shape[-1]
    x = windows.view(-1, h // window, w // window, window, window, c).permute(0, 1, 3, 2, 4, 5)
    return x.reshape(-1, h, w, c)


class WindowAttention(nn.Module):
    """Multi-head self-attention inside windows, with a learned relative position bias.

    Args:
        dim: Channels.
        window: Window side.
        heads: Attention heads.
    """

    def __init__(self, dim: int, window: int, heads: int):
        super().__init__()
        self.window = window
        self.heads = heads
        self.scale = (dim // heads) ** -0.5
        self.relative_position_bias_table = nn.Parameter(torch.zeros((2 * window - 1) ** 2, heads))
        # Persistent: the official checkpoint carries it, and strict loading expects the key.
        self.register_buffer("relative_position_index", _relative_position_index(window), persistent=True)
        self.qkv = nn.Linear(dim, dim * 3)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor, shift_mask: torch.Tensor | None) -> torch.Tensor:
        """Attends within each window.

        Args:
            x: `[B * nW, N, C]` window tokens.
            shift_mask: `[nW, N, N]` additive mask (0 / -100) for shifted windows, or None.

        Returns:
            `[B * nW, N, C]`.
        """
        bw, n, c = x.shape
        qkv = self.qkv(x).view(bw, n, 3, self.heads, c // self.heads).permute(2, 0, 3, 1, 4)
        q, k, v = qkv[0] * self.scale, qkv[1], qkv[2]
        attn = q @ k.transpose(-2, -1)
        bias = self.relative_position_bias_table[self.relative_position_index.reshape(-1)]
        attn = attn + bias.view(n, n, self.heads).permute(2, 0, 1).unsqueeze(0)
        if shift_mask is not None:
            nw = shift_mask.shape[0]
            attn = (attn.view(bw // nw, nw, self.heads, n, n) + shift_mask[None, :, None]).view(
                bw, self.heads, n, n
            )
        out = attn.softmax(-1) @ v
        return self.proj(out.transpose(1, 2).reshape(bw, n, c))


class SwinMlp(nn.Module):
    """The block's two-layer GELU MLP (names `fc1`, `fc2`)."""

    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """`[..., dim]` -> `[..., dim]`."""
        return self.fc2(F.gelu(self.fc1(x)))


class SwinBlock(nn.Module):
    """One (shifted) window attention block, pre-norm, with the MLP.

    Args:
        dim: Channels.
        heads: Attention heads.
        window: Window side.
        shift: Cyclic shift (0 or `window // 2`).
        mlp_ratio: MLP hidden width over `dim`.
    """

    def __init__(self, dim: int, heads: int, window: int, shift: int, mlp_ratio: float = 4.0):
        super().__init__()
        self.window = window
        self.shift = shift
        self.norm1 = nn.LayerNorm(dim)
        self.attn = WindowAttention(dim, window, heads)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = SwinMlp(dim, int(dim * mlp_ratio))

    def forward(self, x: torch.Tensor, h: int, w: int, shift_mask: torch.Tensor) -> torch.Tensor:
        """`[B, h*w, C]` -> `[B, h*w, C]`."""
        b, _, c = x.shape
        ws = self.window
        y = self.norm1(x).view(b, h, w, c)
        # Padding after the norm: padded tokens are exact zeros that still join the attention.
        pad_b, pad_r = (ws - h % ws) % ws, (ws - w % ws) % ws
        y = F.pad(y, (0, 0, 0, pad_r, 0, pad_b))
        hp, wp = h + pad_b, w + pad_r
        if self.shift > 0:
            y = torch.roll(y, shifts=(-self.shift, -self.shift), dims=(1, 2))
        y = self.attn(_to_windows(y, ws), shift_mask if self.shift > 0 else None)
        y = _from_windows(y, ws, hp, wp)
        if self.shift > 0:
            y = torch.roll(y, shifts=(self.shift, self.shift), dims=(1, 2))
        y = y[:, :h, :w, :].reshape(b, h * w, c)
        x = x + y
        return x + self.mlp(self.norm2(x))


class PatchMerging(nn.Module):
    """2x2 neighbourhood concatenation, LayerNorm, then a linear map from 4C to 2C."""

    def __init__(self, dim: int):
        super().__init__()
        self.reduction = nn.Linear(4 * dim, 2 * dim, bias=False)
        self.norm = nn.LayerNorm(4 * dim)

    def forward(self, x: torch.Tensor, h: int, w: int) -> torch.Tensor:
        """`[B, h*w, C]` -> `[B, ceil(h/2)*ceil(w/2), 2C]`."""
        b, _, c = x.shape
        x = x.view(b, h, w, c)
        # Always padded (by zero rows/columns when even): a size test would freeze into the traced graph.
        x = F.pad(x, (0, 0, 0, w % 2, 0, h % 2))
        # Concatenation order (0,0), (1,0), (0,1), (1,1) as (row, col) offsets matches the trained weights.
        x = torch.cat([x[:, 0::2, 0::2], x[:, 1::2, 0::2], x[:, 0::2, 1::2], x[:, 1::2, 1::2]], -1)
        return self.reduction(self.norm(x.reshape(b, -1, 4 * c)))


class SwinStage(nn.Module):
    """`depth` blocks alternating plain and shifted windows, then an optional patch merging."""

    def __init__(self, dim: int, depth: int, heads: int, window: int, downsample: bool):
        super().__init__()
        self.window = window
        self.shift = window // 2
        self.blocks = nn.ModuleList(
            SwinBlock(dim, heads, window, 0 if i % 2 == 0 else window // 2) for i in range(depth)
        )
        self.downsample = PatchMerging(dim) if downsample else None

    def _shift_mask(self, h: int, w: int, x: torch.Tensor) -> torch.Tensor:
        """`[nW, N, N]` additive mask that keeps shifted windows from mixing wrapped-around regions."""
        ws, s = self.window, self.shift
        # ceil(h / ws) * ws with integer arithmetic (a traced size has no `math.ceil`).
        hp, wp = h + (ws - h % ws) % ws, w + (ws - w % ws) % ws
        # Bands [0, -ws), [-ws, -s), [-s, end) per axis; region label = 3 * row band + column band. Written as
        # comparisons rather than slice assignments: those trace to ScatterND chains, and an empty band (a
        # map no larger than one window) breaks `torch.onnx.export`.
        rows, cols = torch.arange(hp, device=x.device), torch.arange(wp, device=x.device)
        row_band = (rows >= hp - ws).to(torch.int64) + (rows >= hp - s).to(torch.int64)
        col_band = (cols >= wp - ws).to(torch.int64) + (cols >= wp - s).to(torch.int64)
        region = (3 * row_band[:, None] + col_band[None, :]).to(torch.float32)[None, :, :, None]
        ids = _to_windows(region, ws)[..., 0]  # [nW, N]; not squeeze(-1), which exports as an If
        diff = ids[:, None, :] - ids[:, :, None]
        return torch.zeros_like(diff).masked_fill(diff != 0, -100.0).to(x.dtype)

    def forward(self, x: torch.Tensor, h: int, w: int) -> tuple[torch.Tensor, torch.Tensor, int, int]:
        """Runs the stage.

        Returns:
            (stage output `[B, h*w, C]`, input of the next stage, its h, its w).
        """
        mask = self._shift_mask(h, w, x)
        for blk in self.blocks:
            x = blk(x, h, w, mask)
        if self.downsample is None:
            return x, x, h, w
        return x, self.downsample(x, h, w), (h + 1) // 2, (w + 1) // 2


class PatchEmbed(nn.Module):
    """Non-overlapping `patch x patch` convolution, then LayerNorm over channels."""

    def __init__(self, embed_dim: int, patch: int = 4, in_chans: int = 3):
        super().__init__()
        self.patch = patch
        self.proj = nn.Conv2d(in_chans, embed_dim, kernel_size=patch, stride=patch)
        self.norm = nn.LayerNorm(embed_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """`[B, 3, H, W]` -> `[B, C, ceil(H/p), ceil(W/p)]`."""
        h, w = x.shape[-2:]
        p = self.patch
        # Always padded (by nothing on /patch sizes), with non-negative operands: traced, `%` is exported
        # integer arithmetic on a shape, and C-style and floor modulo differ on negatives.
        x = F.pad(x, (0, (p - w % p) % p, 0, (p - h % p) % p))
        x = self.proj(x)
        return self.norm(x.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)


class SwinBackbone(nn.Module):
    """Swin Transformer returning the normalised feature maps of `out_indices`.

    Args:
        embed_dim: Channels of stage 0 (doubles at every stage).
        depths: Blocks per stage.
        num_heads: Attention heads per stage.
        window_size: Window side.
        out_indices: Stages whose outputs are returned (each gets a `norm{i}`).
    """

    def __init__(
        self,
        embed_dim: int,
        depths: list[int],
        num_heads: list[int],
        window_size: int,
        out_indices: tuple[int, ...] = (1, 2, 3),
    ):
        super().__init__()
        if len(depths) != len(num_heads):
            raise ValueError(f"depths {list(depths)} and num_heads {list(num_heads)} differ in length")
        self.out_indices = tuple(out_indices)
        self.num_features = [embed_dim * 2**i for i in range(len(depths))]
        self.patch_embed = PatchEmbed(embed_dim)
        self.layers = nn.ModuleList(
            SwinStage(self.num_features[i], depths[i], num_heads[i], window_size, i < len(depths) - 1)
            for i in range(len(depths))
        )
        for i in self.out_indices:
            self.add_module(f"norm{i}", nn.LayerNorm(self.num_features[i]))

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        """`[B, 3, H, W]` -> list of `[B, C_i, H_i, W_i]` for the stages in `out_indices`."""
        x = self.patch_embed(x)
        h, w = x.shape[-2:]
        x = x.flatten(2).transpose(1, 2)
        outs = []
        for i, stage in enumerate(self.layers):
            out, x, nh, nw = stage(x, h, w)
            if i in self.out_indices:
                out = getattr(self, f"norm{i}")(out)
                outs.append(out.view(out.shape[0], h, w, -1).permute(0, 3, 1, 2).contiguous())
            h, w = nh, nw
        return outs
