"""Exporters of the vision tower (`vision.onnx`) and the region encoder (`region.onnx`).

`vision.onnx` is CLIP plus the `vl_bridge` projector on a batch of anyres tiles; it also hands out the last
tile's (the thumbnail's) last three CLIP layers, which is all the region encoder needs from CLIP, so the
runtime never runs CLIP twice.

`region.onnx` is the region encoder with one named export-time rewrite: the reference pools a region by
sampling every mask pixel with `grid_sample` (`torch.nonzero` + a per-region loop, i.e. NonZero and a
data-dependent gather in ONNX). Bilinear sampling at fixed pixel positions is linear and separable, so the
mean over a mask's pixels is a fixed linear map of the mask: `region_pooling_weights` and `pool_regions`
compute it with two constant interpolation matrices and plain MatMuls (tested against the reference
`RegionEncoder._pool`).
"""

from __future__ import annotations

import contextlib
import copy
import warnings

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from visionllm_edge import contract
from visionllm_edge.export.onnx.base import (
    ComponentExporter,
    ExportSettings,
    GraphExport,
    ValidationCase,
    register,
)

#: The region encoder reads the last three CLIP hidden states (layers -3, -2, -1).
REGION_LEVELS = 3

PRECISIONS = ("fp32", "fp16")


def _check_precision(settings: ExportSettings) -> None:
    if settings.precision not in PRECISIONS:
        raise ValueError(f"precision: expected one of {', '.join(PRECISIONS)}, got {settings.precision!r}")


# --- vision.onnx --------------------------------------------------------------------------------------------


class Float32LayerNorm(nn.Module):
    """A LayerNorm that computes in float32 whatever its input dtype, and returns the input dtype.

    In an fp16 graph the mean/variance of a 1024-wide row loses too much in half precision. The casts
    around it make the fp32 island explicit in the ONNX graph (Cast -> LayerNormalization -> Cast), so
    ONNX Runtime computes it in float32 and a TensorRT build can pin it by the graph's types.
    """

    def __init__(self, norm: nn.LayerNorm):
        super().__init__()
        self.normalized_shape = tuple(norm.normalized_shape)
        self.eps = norm.eps
        self.weight = nn.Parameter(norm.weight.detach().float().clone(), requires_grad=False)
        self.bias = nn.Parameter(norm.bias.detach().float().clone(), requires_grad=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.layer_norm(x.float(), self.normalized_shape, self.weight, self.bias, self.eps).to(x.dtype)


def half_with_float32_norms(module: nn.Module, prefix: str) -> tuple[nn.Module, list[str]]:
    """A float16 copy of `module` whose LayerNorms compute in float32.

    Args:
        module: left untouched (the reference keeps running in float32).
        prefix: name of the copy inside the exported module, for the names returned.

    Returns:
        The copy, and the qualified names of the modules that stay in float32.
    """
    half = copy.deepcopy(module).half()
    kept = []
    for name, child in list(half.named_modules()):
        if isinstance(child, nn.LayerNorm):
            parent_name, _, attr = name.rpartition(".")
            setattr(half.get_submodule(parent_name), attr, Float32LayerNorm(child))
            kept.append(f"{prefix}.{name}")
    return half, kept


#: Name under which `eager_attention_float32_softmax` is registered with transformers' attention functions.
FLOAT32_SOFTMAX_ATTENTION = "visionllm_edge_eager_fp32_softmax"


def eager_attention_float32_softmax(
    module, query, key, value, attention_mask, scaling, dropout=0.0, **kwargs
):
    """CLIP's eager attention with the scaled scores and the softmax in float32, for fp16 graphs.

    HF's eager attention asks for `softmax(..., dtype=float32)`, but the TorchScript exporter writes that
    as an fp16 `Softmax` followed by a Cast, so the exported softmax would run in half precision. Casting
    the scores first puts the Cast before the Softmax, where it keeps the precision.
    """
    scores = torch.matmul(query, key.transpose(-1, -2)).float() * scaling
    if attention_mask is not None:
        scores = scores + attention_mask.float()
    probs = torch.softmax(scores, dim=-1).to(query.dtype)
    return torch.matmul(probs, value).transpose(1, 2).contiguous(), None


def _register_float32_softmax_attention() -> None:
    from transformers import AttentionInterface

    AttentionInterface.register(FLOAT32_SOFTMAX_ATTENTION, eager_attention_float32_softmax)


@contextlib.contextmanager
def _static_tile_size_when_tracing():
    """Silences the `TracerWarning` of CLIP's embedding check that the input is `image_size` square.

    That check is Python control flow over the traced shape; in `vision.onnx` S is a static axis, so the
    branch is constant. Nothing else in the vision forward branches on a shape (the tile count T only flows
    through reshapes, which the tracer records as shape arithmetic).
    """
    if not torch.jit.is_tracing():
        yield
        return
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", torch.jit.TracerWarning)
        yield


class VisionGraph(nn.Module):
    """The forward of `vision.onnx`: tiles `[T,3,S,S]` -> `image_embeds [T,P,H]`, `region_levels [3,P,C]`.

    Args:
        vis_encoder: the HF `CLIPVisionModel`.
        vl_bridge: the projector from CLIP width C to LLM width H.
        vis_output_layer: the hidden-state index fed to the projector (-2 for the release).
        dtype: compute dtype of the weights; inputs and outputs stay float32 either way, so the runtime's
            buffers do not depend on the precision the artifact was exported at.
    """

    def __init__(
        self, vis_encoder: nn.Module, vl_bridge: nn.Module, vis_output_layer: int, dtype=torch.float32
    ):
        super().__init__()
        self.vis_encoder = vis_encoder
        self.vl_bridge = vl_bridge
        self.vis_output_layer = vis_output_layer
        self.dtype = dtype

    def forward(self, pixel_values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        with _static_tile_size_when_tracing():
            out = self.vis_encoder(pixel_values=pixel_values.to(self.dtype), output_hidden_states=True)
        hidden = out.hidden_states
        image_embeds = self.vl_bridge(hidden[self.vis_output_layer][:, 1:])
        # Only the thumbnail (the last tile) is the frame region masks are drawn in.
        region_levels = torch.stack([h[-1, 1:] for h in hidden[-REGION_LEVELS:]])
        return image_embeds.float(), region_levels.float()


def half_vision_graph(model) -> tuple[VisionGraph, list[str]]:
    """A float16 `VisionGraph` on copies of CLIP and the projector, with norms and softmax in float32.

    Returns:
        The graph module, and the qualified names (in it) of the modules that compute in float32: every
        LayerNorm the graph runs and every attention's softmax (with its score scaling).
    """
    clip, kept = half_with_float32_norms(model.vis_encoder, "vis_encoder")
    bridge, kept_bridge = half_with_float32_norms(model.vl_bridge, "vl_bridge")
    _register_float32_softmax_attention()
    # The copy has its own config object, shared by all its layers; the reference stays on plain eager.
    clip.config._attn_implementation = FLOAT32_SOFTMAX_ATTENTION
    # CLIP's pooled output, the only user of `post_layernorm`, is not a graph output: that norm is not in
    # the graph.
    kept = [n for n in kept + kept_bridge if not n.endswith("post_layernorm")]
    softmaxes = [f"vis_encoder.{n}.softmax" for n, _ in clip.named_modules() if n.endswith("self_attn")]
    return VisionGraph(clip, bridge, model.config.vis_output_layer, torch.float16), kept + softmaxes


def reference_vision_outputs(model, pixel_values: np.ndarray) -> dict[str, np.ndarray]:
    """`vision.onnx`'s outputs computed with the reference model (`VisionLLMv2.encode_image`)."""
    with torch.no_grad():
        feats = model.encode_image(torch.from_numpy(pixel_values))
        levels = torch.stack([h[-1, 1:] for h in feats.hidden_states[-REGION_LEVELS:]])
    out_names = contract.GRAPHS["vision"].outputs
    return {out_names[0]: feats.projected.numpy(), out_names[1]: levels.numpy()}


def _common_facts(model) -> dict:
    cfg = model.config
    return {
        "tile_size": cfg.image_size,
        "patches_per_tile": cfg.patches_per_tile,
        "vision_width": int(cfg.vision["hidden_size"]),
        "hidden_size": int(cfg.llm.hidden_size),
    }


@register
class VisionExporter(ComponentExporter):
    """CLIP + projector over a dynamic number of tiles (anyres tiles and the thumbnail, thumbnail last).

    Inputs and outputs are float32 at every precision. An fp16 export traces a float16 copy of CLIP on the
    CPU, where PyTorch's half-precision kernels are slow: for CLIP-L/14-336 expect minutes (about 3 s per
    layer and tile on a 2-core host), against seconds in float32.
    """

    name = "vision"

    def graphs(self, model, settings: ExportSettings) -> list[GraphExport]:
        _check_precision(settings)
        names = contract.GRAPHS["vision"]
        facts = {}
        if settings.precision == "fp16":
            module, facts["fp32_nodes"] = half_vision_graph(model)
        else:
            module = VisionGraph(model.vis_encoder, model.vl_bridge, model.config.vis_output_layer)
        size = model.config.image_size
        # Traced at T=2 so that no size-1 axis is mistaken for a broadcast constant.
        example = torch.zeros(2, 3, size, size)
        return [
            GraphExport(
                name="vision",
                module=module,
                example_inputs=(example,),
                input_names=list(names.inputs),
                output_names=list(names.outputs),
                dynamic_axes={names.inputs[0]: {0: "tiles"}, names.outputs[0]: {0: "tiles"}},
                facts=facts,
            )
        ]

    def validation_cases(
        self, model, settings: ExportSettings, rng: np.random.Generator
    ) -> dict[str, list[ValidationCase]]:
        size = model.config.image_size
        cases = []
        # 1 tile (thumbnail only), a mid-size grid, and the release's maximum (4 tiles + thumbnail).
        for tiles in (1, 3, 5):
            pixels = rng.standard_normal((tiles, 3, size, size)).astype(np.float32)
            cases.append(
                ValidationCase(
                    label=f"T={tiles}",
                    inputs={contract.GRAPHS["vision"].inputs[0]: pixels},
                    expected=reference_vision_outputs(model, pixels),
                )
            )
        return {"vision": cases}

    def manifest_facts(self, model, settings: ExportSettings) -> dict:
        return {**_common_facts(model), "vis_output_layer": int(model.config.vis_output_layer)}


# --- region.onnx --------------------------------------------------------------------------------------------


def bilinear_sampling_matrix(pixels: int, cells: int) -> np.ndarray:
    """Weights `[pixels, cells]` of `grid_sample` along one axis (bilinear, zeros, align_corners=False).

    Pixel `p` is sampled at the normalised coordinate `p / pixels` (the reference's `x / W`, no half-pixel
    shift), i.e. at cell position `c = p * cells / pixels - 0.5`. Bilinear weights are the tent kernel
    `max(0, 1 - |c - i|)`; cells outside `[0, cells)` are simply absent, which is the zero padding.
    """
    c = np.arange(pixels, dtype=np.float64) * cells / pixels - 0.5
    return np.maximum(0.0, 1.0 - np.abs(c[:, None] - np.arange(cells, dtype=np.float64)[None, :]))


def region_pooling_weights(masks: torch.Tensor, rows_t: torch.Tensor, cols: torch.Tensor) -> torch.Tensor:
    """Per region, the weight of each feature cell in the mean of bilinear samples at the mask's pixels.

    Sampling is separable, so `sum_{y,x} m[y,x] * sample(F, y, x)` equals `sum_{i,j} W[i,j] * F[:,i,j]` with
    `W = A_y^T m A_x`; dividing by the pixel count gives the reference's mean. An empty mask has `W = 0`, so
    it pools to the zero vector, as in the reference.

    Args:
        masks: `[R, S_y, S_x]`; a pixel counts when > 0 (as `torch.nonzero(mask > 0)` in the reference).
        rows_t: `A_y^T`, `[h, S_y]` from `bilinear_sampling_matrix(S_y, h)`.
        cols: `A_x`, `[S_x, w]` from `bilinear_sampling_matrix(S_x, w)`.

    Returns:
        `[R, h * w]`.
    """
    inside = (masks > 0).to(rows_t.dtype)
    weights = torch.matmul(torch.matmul(rows_t, inside), cols)  # [R, h, w]
    count = inside.sum(dim=(1, 2)).clamp(min=1.0)
    return (weights / count[:, None, None]).flatten(1)


def pool_regions(features: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """Pools `[R, C, h, w]` features with `region_pooling_weights` `[R, h * w]` to `[R, C]`."""
    return torch.matmul(features.flatten(2), weights[:, :, None]).squeeze(-1)


class RegionGraph(nn.Module):
    """The forward of `region.onnx`: thumbnail `[1,3,S,S]`, masks `[R,S,S]`, levels `[3,P,C]` -> `[R,H]`.

    The reference `RegionEncoder` with two exact rewrites: pooling by `region_pooling_weights` and
    `pool_regions` (no NonZero, no loop), and the first mask-embedding convolution split into its image and
    mask input channels, so the image part is computed once rather than for each of the R copies the
    reference stacks.

    Args:
        encoder: the reference `RegionEncoder` (its other weights are shared, not copied).
        tile_size: S.
        grid: the feature grid side (S / patch_size; P = grid * grid).
    """

    def __init__(self, encoder: nn.Module, tile_size: int, grid: int):
        super().__init__()
        first = encoder.mask_embedding[0]
        image_channels = first.in_channels - 1
        self.image_conv = nn.Conv2d(
            image_channels, first.out_channels, first.kernel_size, first.stride, bias=True
        ).requires_grad_(False)
        self.mask_conv = nn.Conv2d(1, first.out_channels, first.kernel_size, first.stride, bias=False)
        self.mask_conv.requires_grad_(False)
        with torch.no_grad():
            self.image_conv.weight.copy_(first.weight[:, :image_channels])
            self.image_conv.bias.copy_(first.bias)
            self.mask_conv.weight.copy_(first.weight[:, image_channels:])
        self.embedding_rest = encoder.mask_embedding[1:]
        self.up_dim = encoder.up_dim
        self.grid = grid
        sampling = bilinear_sampling_matrix(tile_size, grid).astype(np.float32)
        self.register_buffer("rows_t", torch.from_numpy(np.ascontiguousarray(sampling.T)))
        self.register_buffer("cols", torch.from_numpy(sampling))

    def forward(self, image: torch.Tensor, masks: torch.Tensor, region_levels: torch.Tensor) -> torch.Tensor:
        x = self.image_conv(image) + self.mask_conv(masks[:, None])  # [R, C', S/k, S/k] by broadcasting
        x = self.embedding_rest(x)  # [R, C, h, w]
        levels = region_levels.reshape(REGION_LEVELS, self.grid, self.grid, -1).permute(0, 3, 1, 2)
        # The masks, and so the pooling weights, are the same at every level.
        weights = region_pooling_weights(masks, self.rows_t, self.cols)
        outs = []
        for level in levels.unbind(0):
            x = x + level[None]
            outs.append(self.up_dim(pool_regions(x, weights)))
        return torch.stack(outs).mean(0)


def reference_region_outputs(model, pixel_values: np.ndarray, masks: np.ndarray) -> dict[str, np.ndarray]:
    """`region.onnx`'s inputs and output from the reference: `encode_image`, then `encode_regions`.

    Args:
        pixel_values: `[T,3,S,S]` tiles; the last one is the thumbnail.
        masks: `[R,S,S]` float 0/1.

    Returns:
        The graph's inputs (`image`, `masks`, `region_levels`) and its expected output, by name.
    """
    names = contract.GRAPHS["region"]
    with torch.no_grad():
        tiles = torch.from_numpy(pixel_values)
        feats = model.encode_image(tiles)
        embeds = model.encode_regions(tiles[-1], torch.from_numpy(masks), feats)
    levels = reference_vision_outputs(model, pixel_values)[contract.GRAPHS["vision"].outputs[1]]
    return {
        names.inputs[0]: pixel_values[-1:].copy(),
        names.inputs[1]: masks,
        names.inputs[2]: levels,
        names.outputs[0]: embeds.numpy(),
    }


def sample_masks(rng: np.random.Generator, size: int, kinds: list[str]) -> np.ndarray:
    """Masks `[len(kinds), size, size]` (float32 0/1) of the named kinds, for validation.

    Kinds: `pixel` (one random pixel), `corner` (the single pixel (0, 0)), `far_corner` (the pixel
    (S-1, S-1)), `full`, `empty`, `border_box` (a box touching two image borders), `blob` (a random
    ellipse), `noise` (scattered pixels, ~30%).
    """
    masks = np.zeros((len(kinds), size, size), dtype=np.float32)
    ys, xs = np.mgrid[:size, :size]
    for r, kind in enumerate(kinds):
        m = masks[r]
        if kind == "pixel":
            m[rng.integers(size), rng.integers(size)] = 1
        elif kind == "corner":
            m[0, 0] = 1
        elif kind == "far_corner":
            m[-1, -1] = 1
        elif kind == "full":
            m[:] = 1
        elif kind == "empty":
            pass
        elif kind == "border_box":
            h, w = rng.integers(size // 4, size, size=2)
            if rng.random() < 0.5:
                m[:h, :w] = 1
            else:
                m[size - h :, size - w :] = 1
        elif kind == "blob":
            cy, cx = rng.uniform(0, size, size=2)
            ry, rx = rng.uniform(size / 8, size / 2, size=2)
            m[((ys - cy) / ry) ** 2 + ((xs - cx) / rx) ** 2 <= 1] = 1
        elif kind == "noise":
            m[rng.random((size, size)) < 0.3] = 1
        else:
            raise ValueError(f"unknown mask kind {kind!r}")
    return masks


@register
class RegionExporter(ComponentExporter):
    """The region encoder on the thumbnail; the CLIP features come from `vision.onnx`'s `region_levels`.

    Always exported in float32: it is a small fraction of the vision tower's work, and its pooling sums up
    to S*S weighted samples, which is where half precision would lose the most.
    """

    name = "region"

    def available(self, model) -> bool:
        return hasattr(model, "region_encoder")

    def graphs(self, model, settings: ExportSettings) -> list[GraphExport]:
        _check_precision(settings)
        names = contract.GRAPHS["region"]
        cfg = model.config
        size = cfg.image_size
        grid = size // int(cfg.vision["patch_size"])
        module = RegionGraph(model.region_encoder, size, grid)
        width = int(cfg.vision["hidden_size"])
        example = (
            torch.zeros(1, 3, size, size),
            torch.ones(2, size, size),
            torch.zeros(REGION_LEVELS, cfg.patches_per_tile, width),
        )
        return [
            GraphExport(
                name="region",
                module=module,
                example_inputs=example,
                input_names=list(names.inputs),
                output_names=list(names.outputs),
                dynamic_axes={names.inputs[1]: {0: "regions"}, names.outputs[0]: {0: "regions"}},
                # `compute_precision`: this graph stays float32 whatever the artifact's precision.
                facts={"pooling": "all_pixels", "compute_precision": "fp32"},
            )
        ]

    def validation_cases(
        self, model, settings: ExportSettings, rng: np.random.Generator
    ) -> dict[str, list[ValidationCase]]:
        size = model.config.image_size
        output = contract.GRAPHS["region"].outputs[0]
        cases = []
        for kinds in (
            ["far_corner"],
            ["full", "blob"],
            ["border_box", "noise", "corner", "empty"],
        ):
            # One or two tiles: the thumbnail is the last either way.
            pixels = rng.standard_normal((len(kinds) % 2 + 1, 3, size, size)).astype(np.float32)
            values = reference_region_outputs(model, pixels, sample_masks(rng, size, kinds))
            expected = {output: values.pop(output)}
            cases.append(ValidationCase(label=f"R={len(kinds)}", inputs=values, expected=expected))
        return {"region": cases}

    def manifest_facts(self, model, settings: ExportSettings) -> dict:
        return _common_facts(model)
