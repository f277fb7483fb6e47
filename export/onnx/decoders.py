"""Exporters of the two deformable-attention decoders: `det.onnx` (Grounding DINO + masks) and `pose.onnx`.

Two export-time decisions, both explicit here:

**The deformable attention is swapped for its gather form while exporting** (`msda_export_patch`). The
reference decoders sample with `grid_sample`; TensorRT has silently miscompiled GridSample-decomposed MSDA
(`NVIDIA/TensorRT#4813`), so the graphs use `msda.multi_scale_deformable_attention_gather` (explicit bilinear
corners and GatherElements), which is tested equal to the `grid_sample` form. The graphs hold no GridSample
node; the decoders have no other `grid_sample` use (the GDINO pixel decoder's upsampling is a plain bilinear
`interpolate`, i.e. ONNX Resize, and the masks' nearest downsampling is a pair of Gathers).

**The image height and width are dynamic** (`height`, `width` axes of `pixel_values` / `pixel_mask`;
`mask_height`, `mask_width` of `pred_masks`). The runtime pads each image exactly as the official model
does, bottom/right with zeros to the next multiple of 32 (`preprocess.pad_detection_image`), and feeds that
size as it is: no size bucket. Padding further would change the outputs (the decoders' GroupNorms, Swin
windows and two-stage query selection all see the padded area: on tiny-random a bucket moved GDINO logits by
up to 6 and UniPose logits by 23), so one graph must serve every padded size. It does because every
size-dependent quantity in the traced forward is computed in the graph from the feature maps' shapes:

* Swin (both backbones): window padding, the shifted-window masks (index comparisons), patch-merging
  padding and the stage sizes are integer arithmetic on traced sizes (`swin.py`, `unipose_swin.py`);
* deformable attention: level shapes are traced sizes; the gather form derives each level's pixel scale,
  clamp bounds, row stride and start offset from them (`msda.py`);
* encoders: reference points, valid ratios, position embeddings, the levels' nearest-downsampled validity
  masks, two-stage proposals and GDINO's per-level split of the memory for the mask pixel decoder (a
  bilinear `interpolate` to the traced size of the stride-4 map) all follow the traced sizes.

What stays fixed in a graph: batch 1, the number of feature levels, queries, groups and keypoints, all set by
the weights. The graphs hold no shape guard: `facts["image_size"]` gives the range the runtime feeds
(`min_side` .. `max_side`, both multiples of `size_divisibility` = 32) and `min_encoder_tokens` the least
number of encoder tokens (the two-stage top-k takes `num_queries` of them; `encoder_tokens` counts them
for a size; below it the reference raises and ONNX Runtime fails at the TopK node). A side that is not a
multiple of 32 is outside the contract: the PyTorch modules reject it, the graphs run it without complaint
and return what the reference would compute at that size with its /32 check lifted, which is not what the
official model (which pads to /32) returns for that image.

Box conventions (what the runtime's post-processing needs): `det` boxes are (cx, cy, w, h) normalised to the
*valid* region (GDINO rescales by the valid ratios), so they scale by the resized image size; `pose` boxes
and keypoints are normalised to the *padded* (/32) image.
"""

from __future__ import annotations

import contextlib
import threading
import warnings
from collections.abc import Iterator

import numpy as np
import torch
from torch import nn
from visionllm_edge import contract
from visionllm_edge.export.models import gdino as gdino_module
from visionllm_edge.export.models import unipose as unipose_module
from visionllm_edge.export.models.msda import multi_scale_deformable_attention_gather
from visionllm_edge.export.onnx.base import (
    ComponentExporter,
    ExportSettings,
    GraphExport,
    ValidationCase,
    register,
)

#: Padded image sides are multiples of this (the backbones' largest stride).
SIZE_DIVISIBILITY = 32
#: `pred_masks` are at 1/4 of the padded image (the stride of the first Swin stage).
MASK_STRIDE = 4
#: Object and keypoint slots of `pose.onnx` (the reference loop's fixed 100; keypoints use the first K, the
#: model's `num_body_points`, 68 in the release).
POSE_SLOTS = 100
#: The decoders run in float32 whatever the artifact's precision (deploy research 5(ii).4: FP32 deformable
#: attention is the known-good split; FP16 MSDA needs its own kernels and checks).
COMPUTE_PRECISION = "fp32"
PRECISIONS = ("fp32", "fp16")

DET = contract.GRAPHS["det"]
POSE = contract.GRAPHS["pose"]


# --- the export patch ---------------------------------------------------------------------------------------

#: The model modules whose deformable attention layers call `multi_scale_deformable_attention` by global name.
_MSDA_USERS = (gdino_module, unipose_module)
_MSDA_NAME = "multi_scale_deformable_attention"
# The swap is process-wide; the lock keeps two exports from interleaving their save/restore.
_PATCH_LOCK = threading.RLock()


@contextlib.contextmanager
def msda_export_patch() -> Iterator[None]:
    """Swaps both decoders' deformable attention for the gather form (no `grid_sample`) inside the block.

    The object decoder (`gdino`) and the keypoint decoder (`unipose`) call
    `msda.multi_scale_deformable_attention` through their module globals; inside the block those names point
    at `multi_scale_deformable_attention_gather`, the same function written with GatherElements. The
    originals are restored on exit, also on error. While the block runs, every decoder forward in this
    process uses the gather form, so reference outputs must be computed outside it (`reference_*_outputs`
    refuse to run inside).
    """
    with _PATCH_LOCK:
        saved = [(module, getattr(module, _MSDA_NAME)) for module in _MSDA_USERS]
        for module in _MSDA_USERS:
            setattr(module, _MSDA_NAME, multi_scale_deformable_attention_gather)
        try:
            yield
        finally:
            for module, original in saved:
                setattr(module, _MSDA_NAME, original)


def msda_patched() -> bool:
    """Whether `msda_export_patch` is active (any decoder module points at the gather form)."""
    gather = multi_scale_deformable_attention_gather
    return any(getattr(module, _MSDA_NAME) is gather for module in _MSDA_USERS)


@contextlib.contextmanager
def _quiet_tracing() -> Iterator[None]:
    """Silences `TracerWarning`s while tracing.

    The only Python values the decoders take from traced tensors are in their input checks (shapes, /32
    sides, UniPose's checks on input *values*: at least one object slot, at most K keypoints); they run on
    the example and steer no computation, so nothing size-dependent is frozen into the graph. The graph does
    not repeat the checks: the runtime must keep to them.
    """
    if not torch.jit.is_tracing():
        yield
        return
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", torch.jit.TracerWarning)
        yield


# --- image sizes --------------------------------------------------------------------------------------------


def _round_up(value: int, multiple: int) -> int:
    return -(-value // multiple) * multiple


def decoder_size_range(short_side: int, max_long_side: int) -> dict[str, int]:
    """The padded image sizes the decoder graphs are fed: `{"min_side", "max_side", "size_divisibility"}`.

    Both sides of a padded image are multiples of `size_divisibility` (32) between `min_side` (32) and
    `max_side`. `preprocess.detection_image` scales by `min(short_side / short, max_long_side / long)`, so
    neither side of the resized image exceeds `max_long_side`; padded to /32, neither exceeds `max_side`.
    (The graphs have no hard upper bound; `max_side` is what the preprocessing produces and what is
    validated.)

    Args:
        short_side: the preprocessing's target short side (`config.det_short_side`).
        max_long_side: its cap on the long side (`config.det_max_long_side`).

    Raises:
        ValueError: a size is not positive.
    """
    if short_side < 1 or max_long_side < 1:
        raise ValueError(f"detection sizes must be positive, got short={short_side}, long={max_long_side}")
    return {
        "min_side": SIZE_DIVISIBILITY,
        "max_side": _round_up(max_long_side, SIZE_DIVISIBILITY),
        "size_divisibility": SIZE_DIVISIBILITY,
    }


def padded_image_size(height: int, width: int) -> tuple[int, int]:
    """`(H, W)` of an image of `height x width` valid pixels padded to /32, as the official model pads."""
    return _round_up(height, SIZE_DIVISIBILITY), _round_up(width, SIZE_DIVISIBILITY)


def encoder_tokens(height: int, width: int, num_levels: int) -> int:
    """Encoder tokens (summed `H_l * W_l`) of a padded `height x width` image with `num_levels` levels.

    Levels 0-2 are the backbone maps at strides 8, 16, 32; each further level is a stride-2 3x3 conv
    (padding 1) of the previous one, i.e. halves rounding up. The two-stage top-k needs at least
    `num_queries` tokens (`facts["min_encoder_tokens"]`).
    """
    sizes = [(-(-height // stride), -(-width // stride)) for stride in (8, 16, 32)][:num_levels]
    while len(sizes) < num_levels:
        h, w = sizes[-1]
        sizes.append((-(-h // 2), -(-w // 2)))
    return sum(h * w for h, w in sizes)


def _size_range(model) -> dict[str, int]:
    return decoder_size_range(model.config.det_short_side, model.config.det_max_long_side)


def _check_image(pixel_values: torch.Tensor, pixel_mask: torch.Tensor) -> None:
    """Eager-mode guard of the wrappers (the graphs carry no shape guard; the runtime keeps to the facts)."""
    if torch.jit.is_tracing():
        return
    if pixel_values.dim() != 4 or pixel_values.shape[:2] != (1, 3):
        raise ValueError(f"pixel_values: expected shape [1, 3, H, W], got {list(pixel_values.shape)}")
    height, width = pixel_values.shape[-2:]
    if height % SIZE_DIVISIBILITY or width % SIZE_DIVISIBILITY:
        expected = f"H and W multiples of {SIZE_DIVISIBILITY}"
        raise ValueError(f"pixel_values: expected {expected}, got {height}x{width}")
    if tuple(pixel_mask.shape) != (1, height, width) or pixel_mask.dtype != torch.bool:
        got = f"{pixel_mask.dtype} {list(pixel_mask.shape)}"
        raise ValueError(f"pixel_mask: expected bool [1, {height}, {width}], got {got}")


def _check_precision(settings: ExportSettings) -> None:
    if settings.precision not in PRECISIONS:
        raise ValueError(f"precision: expected one of {', '.join(PRECISIONS)}, got {settings.precision!r}")


def _image_inputs(rng: np.random.Generator, valid_hw: tuple[int, int]) -> dict[str, np.ndarray]:
    """A random image of `valid_hw` pixels zero-padded bottom/right to /32, and its valid-pixel mask."""
    vh, vw = valid_hw
    height, width = padded_image_size(vh, vw)
    pixels = np.zeros((1, 3, height, width), np.float32)
    pixels[:, :, :vh, :vw] = rng.standard_normal((1, 3, vh, vw), dtype=np.float32)
    mask = np.zeros((1, height, width), bool)
    mask[:, :vh, :vw] = True
    return {"pixel_values": pixels, "pixel_mask": mask}


def _case_regions(model, rng: np.random.Generator) -> list[tuple[int, int]]:
    """Valid regions of the three validation images, padded to three different sizes: portrait and landscape
    at the preprocessing's extremes (no padding needed at all on tiny-random), then a smaller random one,
    at least 32 pixels shorter (so its padded size differs) and at least 2/3 of the long side wide (enough
    encoder tokens for UniPose's query selection)."""
    short = min(model.config.det_short_side, model.config.det_max_long_side)
    long = model.config.det_max_long_side
    low = max(1, long // 3)
    high = max(low, short - SIZE_DIVISIBILITY)
    small = (int(rng.integers(low, high + 1)), int(rng.integers(long * 2 // 3, long + 1)))
    return [(long, short), (short, long), small]


def _example_region(model) -> tuple[int, int]:
    """The valid region of the traced example: landscape, the long side full, the short side 2/3 valid."""
    short = min(model.config.det_short_side, model.config.det_max_long_side)
    # 5/6 rather than less: no level of the example may be 1 pixel high (a size-1 dim can be specialised by
    # broadcasting while tracing). Tiny-random: 80x160 valid, 96x160 padded.
    return max(1, short * 5 // 6), model.config.det_max_long_side


# --- det.onnx -----------------------------------------------------------------------------------------------


class DetectionGraph(nn.Module):
    """The forward of `det.onnx`: the object decoder with the gather-form MSDA, at any padded image size.

    Args:
        gdino: the reference `GroundingDinoOV` (shared, not copied).
    """

    def __init__(self, gdino: nn.Module):
        super().__init__()
        self.gdino = gdino

    def forward(
        self,
        pixel_values: torch.Tensor,
        pixel_mask: torch.Tensor,
        text_query: torch.Tensor,
        text_query_mask: torch.Tensor,
        mask_query_index: torch.Tensor,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Runs the object decoder.

        Args:
            pixel_values: `[1, 3, H, W]` normalised image, zero-padded bottom/right to /32 (H, W dynamic).
            pixel_mask: `[1, H, W]` bool, True on the valid (resized image) pixels, a top-left rectangle.
            text_query: `[1, K, N, Hl]` link states of K groups, 1 <= K <= max_text_len.
            text_query_mask: `[1, K]` bool, True for real groups (which come first).
            mask_query_index: `[1, k]` int64 queries whose masks are wanted, in the order wanted.

        Returns:
            `logits [1, Q, max_text_len]` (-inf past the real groups), `pred_boxes [1, Q, 4]` (cx, cy, w, h of
            the valid region) and `pred_masks [1, k, H/4, W/4]` mask logits.
        """
        with _quiet_tracing(), msda_export_patch():
            _check_image(pixel_values, pixel_mask)
            return self.gdino(pixel_values, pixel_mask, text_query, text_query_mask, mask_query_index)


def det_facts(model) -> dict:
    """What the runtime needs to feed `det.onnx` and read its outputs; also the component's manifest facts."""
    s = model.gdino.settings
    return {
        "image_size": _size_range(model),
        "size_divisibility": SIZE_DIVISIBILITY,
        "min_encoder_tokens": s.num_queries,
        "num_feature_levels": s.num_feature_levels,
        "num_queries": s.num_queries,
        "max_text_len": s.max_text_len,
        "max_groups": s.max_text_len,
        "mask_stride": MASK_STRIDE,
        "box_format": "cxcywh",
        "box_frame": "valid_region",
        "mask_frame": "padded_image",
        "padding": "bottom_right_zeros",
        "deformable_attention": "gather",
        "compute_precision": COMPUTE_PRECISION,
    }


def _det_inputs(
    rng: np.random.Generator,
    valid_hw: tuple[int, int],
    num_groups: int,
    num_valid: int,
    mask_queries: np.ndarray,
    num_embs: int,
    hidden: int,
) -> dict[str, np.ndarray]:
    """Fresh random `det.onnx` inputs: an image of `valid_hw` pixels padded to /32 (as the official model)."""
    group_mask = np.zeros((1, num_groups), bool)
    group_mask[:, :num_valid] = True
    return {
        **_image_inputs(rng, valid_hw),
        "text_query": rng.standard_normal((1, num_groups, num_embs, hidden), dtype=np.float32),
        "text_query_mask": group_mask,
        "mask_query_index": np.asarray(mask_queries, np.int64).reshape(1, -1),
    }


@torch.no_grad()
def reference_det_outputs(
    model, inputs: dict[str, np.ndarray], all_masks: bool = False
) -> dict[str, np.ndarray]:
    """The reference object decoder's outputs for `det.onnx` inputs (original `grid_sample` MSDA).

    Args:
        model: the reference model (`load_reference`).
        inputs: `det.onnx` inputs by name.
        all_masks: return the masks of all Q queries instead of those `mask_query_index` asks for.

    Raises:
        RuntimeError: called inside `msda_export_patch` (the result would not be the reference's).
    """
    if msda_patched():
        raise RuntimeError("reference outputs must be computed outside msda_export_patch()")
    t = {name: torch.from_numpy(np.asarray(value)) for name, value in inputs.items()}
    index = None if all_masks else t["mask_query_index"]
    outputs = model.gdino(t["pixel_values"], t["pixel_mask"], t["text_query"], t["text_query_mask"], index)
    return {name: out.numpy() for name, out in zip(DET.outputs, outputs)}


#: Dynamic axes shared by both graphs' image inputs.
_IMAGE_AXES = {"pixel_values": {2: "height", 3: "width"}, "pixel_mask": {1: "height", 2: "width"}}


@register
class DetExporter(ComponentExporter):
    """`det.onnx`: the object decoder (OV Grounding DINO + mask head) on LLM link states."""

    name = "det"

    def available(self, model) -> bool:
        return getattr(model, "gdino", None) is not None

    def graphs(self, model, settings: ExportSettings) -> list[GraphExport]:
        _check_precision(settings)
        s = model.gdino.settings
        rng = np.random.default_rng(settings.seed)
        # Traced with K=3 and k=2, not 1: a size-1 dim can be specialised by broadcasting while tracing.
        example = _det_inputs(
            rng, _example_region(model), 3, 3, np.array([0, s.num_queries - 1]), model.config.num_embs,
            s.l_hidden_size,
        )  # fmt: skip
        return [
            GraphExport(
                name="det",
                module=DetectionGraph(model.gdino).eval(),
                example_inputs=tuple(torch.from_numpy(example[name]) for name in DET.inputs),
                input_names=list(DET.inputs),
                output_names=list(DET.outputs),
                dynamic_axes={
                    **_IMAGE_AXES,
                    "text_query": {1: "groups"},
                    "text_query_mask": {1: "groups"},
                    "mask_query_index": {1: "mask_queries"},
                    "pred_masks": {1: "mask_queries", 2: "mask_height", 3: "mask_width"},
                },
                facts=det_facts(model),
            )
        ]

    def validation_cases(self, model, settings, rng: np.random.Generator) -> dict[str, list[ValidationCase]]:
        """Three images padded to three different sizes (portrait, landscape, a smaller random one) and 1, 3,
        7 groups (the last with two padded groups), each with its own random mask queries."""
        s = model.gdino.settings
        plans = zip(_case_regions(model, rng), (1, 3, 7), (1, 3, 5), (1, 3, 5))
        cases = []
        for valid_hw, groups, valid_groups, num_masks in plans:
            queries = rng.choice(s.num_queries, size=min(num_masks, s.num_queries), replace=False)
            inputs = _det_inputs(
                rng, valid_hw, groups, valid_groups, queries, model.config.num_embs, s.l_hidden_size
            )
            height, width = inputs["pixel_mask"].shape[1:]
            label = (
                f"K={groups}({valid_groups} valid),k={queries.size},"
                f"valid={valid_hw[0]}x{valid_hw[1]},padded={height}x{width}"
            )
            cases.append(ValidationCase(label, inputs, reference_det_outputs(model, inputs)))
        return {"det": cases}

    def manifest_facts(self, model, settings: ExportSettings) -> dict:
        return det_facts(model)


# --- pose.onnx ----------------------------------------------------------------------------------------------


class PoseGraph(nn.Module):
    """The forward of `pose.onnx`: UniPose with the gather-form MSDA, at any padded image size.

    Args:
        unipose: the reference `UniPose` (shared, not copied).
    """

    def __init__(self, unipose: nn.Module):
        super().__init__()
        self.unipose = unipose

    def forward(
        self,
        pixel_values: torch.Tensor,
        pixel_mask: torch.Tensor,
        object_query: torch.Tensor,
        object_query_mask: torch.Tensor,
        keypoint_query: torch.Tensor,
        keypoint_query_mask: torch.Tensor,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Runs the keypoint decoder.

        Args:
            pixel_values: `[1, 3, H, W]` normalised image, zero-padded bottom/right to /32 (H, W dynamic).
            pixel_mask: `[1, H, W]` bool, True on valid pixels (UniPose itself takes the inverse).
            object_query: `[1, 100, N, Hl]` link states of the object groups, real ones first, zeros after.
            object_query_mask: `[1, 100]` bool; at least one True.
            keypoint_query: `[1, 100, N, Hl]` link states of the keypoint groups; the first K slots are read
                (K = the model's `num_body_points`, 68 in the release).
            keypoint_query_mask: `[1, 100]` bool; at most K True, first.

        Returns:
            `pred_logits [1, G, 100]` (-inf on empty object slots), `pred_boxes [1, G, 4]` (cx, cy, w, h of
            the padded image) and `pred_keypoints [1, G, 3K]` (`x0, y0, ..., x{K-1}, y{K-1}, v0..v{K-1}`,
            padded image frame); G = the model's `num_select` (50 in the release), so `[1, 50, 204]` there.
        """
        with _quiet_tracing(), msda_export_patch():
            _check_image(pixel_values, pixel_mask)
            padding = ~pixel_mask
            return self.unipose(
                pixel_values, padding, object_query, object_query_mask, keypoint_query, keypoint_query_mask
            )


def pose_facts(model) -> dict:
    """What the runtime needs to feed `pose.onnx` and read its outputs; also the component's facts."""
    return {
        "image_size": _size_range(model),
        "size_divisibility": SIZE_DIVISIBILITY,
        "min_encoder_tokens": model.unipose.num_queries,
        "num_feature_levels": model.unipose.num_feature_levels,
        "num_groups": model.unipose.num_groups,
        "max_objects": POSE_SLOTS,
        "max_keypoints": model.unipose.num_body_points,
        "query_slots": POSE_SLOTS,
        "keypoint_layout": "xy_then_visibility",
        "box_format": "cxcywh",
        "box_frame": "padded_image",
        "keypoint_frame": "padded_image",
        "padding": "bottom_right_zeros",
        "deformable_attention": "gather",
        "compute_precision": COMPUTE_PRECISION,
    }


def _pose_inputs(
    rng: np.random.Generator,
    valid_hw: tuple[int, int],
    num_objects: int,
    num_keypoints: int,
    num_embs: int,
    hidden: int,
) -> dict[str, np.ndarray]:
    """Fresh random `pose.onnx` inputs laid out as the reference loop does (real slots first, zeros after),
    with an image of `valid_hw` pixels padded to /32."""
    inputs = _image_inputs(rng, valid_hw)
    for prefix, count in (("object", num_objects), ("keypoint", num_keypoints)):
        states = np.zeros((1, POSE_SLOTS, num_embs, hidden), np.float32)
        states[:, :count] = rng.standard_normal((1, count, num_embs, hidden), dtype=np.float32)
        slots = np.zeros((1, POSE_SLOTS), bool)
        slots[:, :count] = True
        inputs[f"{prefix}_query"] = states
        inputs[f"{prefix}_query_mask"] = slots
    return inputs


@torch.no_grad()
def reference_pose_outputs(model, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """The reference UniPose's outputs for `pose.onnx` inputs (original `grid_sample` MSDA).

    Raises:
        RuntimeError: called inside `msda_export_patch`.
    """
    if msda_patched():
        raise RuntimeError("reference outputs must be computed outside msda_export_patch()")
    t = {name: torch.from_numpy(np.asarray(value)) for name, value in inputs.items()}
    outputs = model.unipose(
        t["pixel_values"], ~t["pixel_mask"], t["object_query"], t["object_query_mask"],
        t["keypoint_query"], t["keypoint_query_mask"],
    )  # fmt: skip
    return {name: out.numpy() for name, out in zip(POSE.outputs, outputs)}


@register
class PoseExporter(ComponentExporter):
    """`pose.onnx`: the UniPose keypoint decoder on LLM link states."""

    name = "pose"

    def available(self, model) -> bool:
        return getattr(model, "unipose", None) is not None

    def graphs(self, model, settings: ExportSettings) -> list[GraphExport]:
        _check_precision(settings)
        if model.unipose.num_body_points > POSE_SLOTS:
            raise ValueError(
                f"pose: unipose num_body_points={model.unipose.num_body_points} exceeds the graph's "
                f"{POSE_SLOTS} keypoint slots"
            )
        rng = np.random.default_rng(settings.seed)
        hidden = model.unipose.l_hidden_size
        keypoints = min(3, model.unipose.num_body_points)
        example = _pose_inputs(rng, _example_region(model), 2, keypoints, model.config.num_embs, hidden)
        return [
            GraphExport(
                name="pose",
                module=PoseGraph(model.unipose).eval(),
                example_inputs=tuple(torch.from_numpy(example[name]) for name in POSE.inputs),
                input_names=list(POSE.inputs),
                output_names=list(POSE.outputs),
                dynamic_axes=dict(_IMAGE_AXES),
                facts=pose_facts(model),
            )
        ]

    def validation_cases(self, model, settings, rng: np.random.Generator) -> dict[str, list[ValidationCase]]:
        """Three images padded to three different sizes and (objects, keypoints) = (1, 3), (2, 5), (3, K).

        K is the model's `num_body_points` (68 in the release); the keypoint counts are capped at K.
        """
        k = model.unipose.num_body_points
        plans = zip(_case_regions(model, rng), (1, 2, 3), (min(3, k), min(5, k), k))
        sizes = (model.config.num_embs, model.unipose.l_hidden_size)
        cases = []
        for valid_hw, objects, keypoints in plans:
            inputs = _pose_inputs(rng, valid_hw, objects, keypoints, *sizes)
            height, width = inputs["pixel_mask"].shape[1:]
            label = (
                f"objects={objects},keypoints={keypoints},"
                f"valid={valid_hw[0]}x{valid_hw[1]},padded={height}x{width}"
            )
            cases.append(ValidationCase(label, inputs, reference_pose_outputs(model, inputs)))
        return {"pose": cases}

    def manifest_facts(self, model, settings: ExportSettings) -> dict:
        return pose_facts(model)
