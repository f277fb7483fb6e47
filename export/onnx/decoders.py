"""Exporters of the two deformable-attention decoders: `det.onnx` (Grounding DINO + masks) and `pose.onnx`.

Two export-time decisions, both explicit here:

**The deformable attention is swapped for its gather form while exporting** (`msda_export_patch`). The
reference decoders sample with `grid_sample`; TensorRT has silently miscompiled GridSample-decomposed MSDA
(`NVIDIA/TensorRT#4813`), so the graphs use `msda.multi_scale_deformable_attention_gather` (explicit bilinear
corners and GatherElements), which is tested equal to the `grid_sample` form. The graphs hold no GridSample
node; the decoders have no other `grid_sample` use (the GDINO pixel decoder's upsampling is a plain bilinear
`interpolate`, i.e. ONNX Resize).

**One static image size per graph (a size bucket).** The export form of MSDA, the Swin backbones' window
partitions and the encoders' reference grids take per-level sizes as Python ints, so a traced graph is only
right at the size it was traced at. Making H and W symbolic would mean rewriting all of those; instead each
graph is exported at one padded size and its `pixel_values` / `pixel_mask` dims are static, so ONNX Runtime
(and a TensorRT profile) rejects any other size instead of running it wrong. The bucket is one square of side
`max_long_side` rounded up to /32 (1344 for the release, 160 for tiny-random): the detection preprocessing
never makes a side longer than that, in either orientation, so every image fits. The alternative, a
landscape `[pad(min(short, long)), pad(long)]` and a portrait bucket, costs ~40% fewer pixels per call
(800x1344 vs 1344x1344) but needs two files per decoder, which the one-file-per-graph manifest does not
carry today. The runtime resizes as usual, pads bottom/right with zeros into the bucket and passes the
valid-pixel mask.

Padding is masked, not free: the decoders' GroupNorms, Swin windows and query selection see the padded
map, so an image padded into the bucket does not give bit-identical results to the same image padded only
to /32. Reference runs that are compared with the runtime must therefore pad into the bucket too (the
reference loop takes a prepared `det_image`).

Box conventions (what the runtime's post-processing needs): `det` boxes are (cx, cy, w, h) normalised to the
*valid* region (GDINO rescales by the valid ratios), so they scale by the resized image size; `pose` boxes
and keypoints are normalised to the *padded* bucket image.
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
#: Object and keypoint slots of `pose.onnx` (the reference loop's fixed 100; keypoints use the first 68).
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

    Every Python number the decoders take from a shape (input checks, per-level sizes, window counts) is
    meant to become a constant: a graph serves one image size, which its static input dims enforce. UniPose's
    checks on input *values* (at least one object slot, at most 68 keypoints) run on the example only and are
    not part of the graph: the runtime must keep to them.
    """
    if not torch.jit.is_tracing():
        yield
        return
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", torch.jit.TracerWarning)
        yield


# --- the size bucket ----------------------------------------------------------------------------------------


def _round_up(value: int, multiple: int) -> int:
    return -(-value // multiple) * multiple


def decoder_image_size(short_side: int, max_long_side: int) -> tuple[int, int]:
    """The static `(H, W)` both decoder graphs are exported at: one square bucket for every image.

    `preprocess.detection_image` scales by `min(short_side / short, max_long_side / long)`, so neither side
    of the resized image exceeds `max_long_side` (the short side is at most `min(short_side, max_long_side)`);
    padded to /32 that bounds both orientations.

    Args:
        short_side: the preprocessing's target short side (`config.det_short_side`).
        max_long_side: its cap on the long side (`config.det_max_long_side`).

    Raises:
        ValueError: a size is not positive.
    """
    if short_side < 1 or max_long_side < 1:
        raise ValueError(f"detection sizes must be positive, got short={short_side}, long={max_long_side}")
    side = _round_up(max_long_side, SIZE_DIVISIBILITY)
    return side, side


def _image_size(model) -> tuple[int, int]:
    return decoder_image_size(model.config.det_short_side, model.config.det_max_long_side)


def _check_image(pixel_values: torch.Tensor, pixel_mask: torch.Tensor, image_size: tuple[int, int]) -> None:
    """Eager-mode guard of the wrappers: the graph's static dims reject other sizes, so does the module."""
    height, width = image_size
    if tuple(pixel_values.shape) != (1, 3, height, width):
        got = list(pixel_values.shape)
        raise ValueError(f"pixel_values: expected shape [1, 3, {height}, {width}], got {got}")
    if tuple(pixel_mask.shape) != (1, height, width) or pixel_mask.dtype != torch.bool:
        got = f"{pixel_mask.dtype} {list(pixel_mask.shape)}"
        raise ValueError(f"pixel_mask: expected bool [1, {height}, {width}], got {got}")


def _check_precision(settings: ExportSettings) -> None:
    if settings.precision not in PRECISIONS:
        raise ValueError(f"precision: expected one of {', '.join(PRECISIONS)}, got {settings.precision!r}")


# --- det.onnx -----------------------------------------------------------------------------------------------


class DetectionGraph(nn.Module):
    """The forward of `det.onnx`: the object decoder at one image size, with the gather-form MSDA.

    Args:
        gdino: the reference `GroundingDinoOV` (shared, not copied).
        image_size: the static `(H, W)` of the bucket.
    """

    def __init__(self, gdino: nn.Module, image_size: tuple[int, int]):
        super().__init__()
        self.gdino = gdino
        self.image_size = tuple(image_size)

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
            pixel_values: `[1, 3, H, W]` normalised image, zero-padded bottom/right into the bucket.
            pixel_mask: `[1, H, W]` bool, True on the valid (resized image) pixels, a top-left rectangle.
            text_query: `[1, K, N, Hl]` link states of K groups, 1 <= K <= max_text_len.
            text_query_mask: `[1, K]` bool, True for real groups (which come first).
            mask_query_index: `[1, k]` int64 queries whose masks are wanted, in the order wanted.

        Returns:
            `logits [1, Q, max_text_len]` (-inf past the real groups), `pred_boxes [1, Q, 4]` (cx, cy, w, h of
            the valid region) and `pred_masks [1, k, H/4, W/4]` mask logits.
        """
        with _quiet_tracing(), msda_export_patch():
            _check_image(pixel_values, pixel_mask, self.image_size)
            return self.gdino(pixel_values, pixel_mask, text_query, text_query_mask, mask_query_index)


def det_facts(model) -> dict:
    """What the runtime needs to feed `det.onnx` and read its outputs; also the component's manifest facts."""
    s = model.gdino.settings
    height, width = _image_size(model)
    return {
        "image_size": [height, width],
        "image_buckets": [{"file": DET.file, "image_size": [height, width]}],
        "size_divisibility": SIZE_DIVISIBILITY,
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
    image_size: tuple[int, int],
    valid_hw: tuple[int, int],
    num_groups: int,
    num_valid: int,
    mask_queries: np.ndarray,
    num_embs: int,
    hidden: int,
) -> dict[str, np.ndarray]:
    """Fresh random `det.onnx` inputs: an image in the top-left `valid_hw` of the bucket, zeros elsewhere."""
    height, width = image_size
    vh, vw = valid_hw
    pixels = np.zeros((1, 3, height, width), np.float32)
    pixels[:, :, :vh, :vw] = rng.standard_normal((1, 3, vh, vw), dtype=np.float32)
    mask = np.zeros((1, height, width), bool)
    mask[:, :vh, :vw] = True
    group_mask = np.zeros((1, num_groups), bool)
    group_mask[:, :num_valid] = True
    return {
        "pixel_values": pixels,
        "pixel_mask": mask,
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


@register
class DetExporter(ComponentExporter):
    """`det.onnx`: the object decoder (OV Grounding DINO + mask head) on LLM link states."""

    name = "det"

    def available(self, model) -> bool:
        return getattr(model, "gdino", None) is not None

    def graphs(self, model, settings: ExportSettings) -> list[GraphExport]:
        _check_precision(settings)
        image_size = _image_size(model)
        s = model.gdino.settings
        rng = np.random.default_rng(settings.seed)
        # Traced with K=3 and k=2, not 1: a size-1 dim can be specialised by broadcasting while tracing.
        height, width = image_size
        example = _det_inputs(
            rng, image_size, (height * 2 // 3, width), 3, 3, np.array([0, s.num_queries - 1]),
            model.config.num_embs, s.l_hidden_size,
        )  # fmt: skip
        return [
            GraphExport(
                name="det",
                module=DetectionGraph(model.gdino, image_size).eval(),
                example_inputs=tuple(torch.from_numpy(example[name]) for name in DET.inputs),
                input_names=list(DET.inputs),
                output_names=list(DET.outputs),
                dynamic_axes={
                    "text_query": {1: "groups"},
                    "text_query_mask": {1: "groups"},
                    "mask_query_index": {1: "mask_queries"},
                    "pred_masks": {1: "mask_queries"},
                },
                facts=det_facts(model),
            )
        ]

    def validation_cases(self, model, settings, rng: np.random.Generator) -> dict[str, list[ValidationCase]]:
        """Three images with different valid regions (portrait, landscape, a smaller random one) and 1, 3, 7
        groups (the last with two padded groups), each with its own random mask queries."""
        s = model.gdino.settings
        image_size = _image_size(model)
        short = min(model.config.det_short_side, model.config.det_max_long_side)
        long = model.config.det_max_long_side
        small = (int(rng.integers(long // 3, short + 1)), int(rng.integers(long // 3, long + 1)))
        plans = [((long, short), 1, 1, 1), ((short, long), 3, 3, 3), (small, 7, 5, 5)]
        cases = []
        for valid_hw, groups, valid_groups, num_masks in plans:
            queries = rng.choice(s.num_queries, size=min(num_masks, s.num_queries), replace=False)
            inputs = _det_inputs(
                rng, image_size, valid_hw, groups, valid_groups, queries, model.config.num_embs,
                s.l_hidden_size,
            )  # fmt: skip
            label = f"K={groups}({valid_groups} valid),k={queries.size},valid={valid_hw[0]}x{valid_hw[1]}"
            cases.append(ValidationCase(label, inputs, reference_det_outputs(model, inputs)))
        return {"det": cases}

    def manifest_facts(self, model, settings: ExportSettings) -> dict:
        return det_facts(model)


# --- pose.onnx ----------------------------------------------------------------------------------------------


class PoseGraph(nn.Module):
    """The forward of `pose.onnx`: UniPose at one image size, with the gather-form MSDA.

    Args:
        unipose: the reference `UniPose` (shared, not copied).
        image_size: the static `(H, W)` of the bucket.
    """

    def __init__(self, unipose: nn.Module, image_size: tuple[int, int]):
        super().__init__()
        self.unipose = unipose
        self.image_size = tuple(image_size)

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
            pixel_values: `[1, 3, H, W]` normalised image, zero-padded bottom/right into the bucket.
            pixel_mask: `[1, H, W]` bool, True on valid pixels (UniPose itself takes the inverse).
            object_query: `[1, 100, N, Hl]` link states of the object groups, real ones first, zeros after.
            object_query_mask: `[1, 100]` bool; at least one True.
            keypoint_query: `[1, 100, N, Hl]` link states of the keypoint groups; the first 68 slots are read.
            keypoint_query_mask: `[1, 100]` bool; at most 68 True, first.

        Returns:
            `pred_logits [1, 50, 100]` (-inf on empty object slots), `pred_boxes [1, 50, 4]` (cx, cy, w, h of
            the padded image) and `pred_keypoints [1, 50, 204]` (`x0, y0, ..., x67, y67, v0..v67`, padded
            image frame).
        """
        with _quiet_tracing(), msda_export_patch():
            _check_image(pixel_values, pixel_mask, self.image_size)
            padding = ~pixel_mask
            return self.unipose(
                pixel_values, padding, object_query, object_query_mask, keypoint_query, keypoint_query_mask
            )


def pose_facts(model) -> dict:
    """What the runtime needs to feed `pose.onnx` and read its outputs; also the component's facts."""
    height, width = _image_size(model)
    return {
        "image_size": [height, width],
        "image_buckets": [{"file": POSE.file, "image_size": [height, width]}],
        "size_divisibility": SIZE_DIVISIBILITY,
        "num_groups": unipose_module.NUM_GROUPS,
        "max_objects": POSE_SLOTS,
        "max_keypoints": unipose_module.NUM_BODY_POINTS,
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
    image_size: tuple[int, int],
    valid_hw: tuple[int, int],
    num_objects: int,
    num_keypoints: int,
    num_embs: int,
    hidden: int,
) -> dict[str, np.ndarray]:
    """Fresh random `pose.onnx` inputs laid out as the reference loop does (real slots first, zeros after)."""
    height, width = image_size
    vh, vw = valid_hw
    pixels = np.zeros((1, 3, height, width), np.float32)
    pixels[:, :, :vh, :vw] = rng.standard_normal((1, 3, vh, vw), dtype=np.float32)
    mask = np.zeros((1, height, width), bool)
    mask[:, :vh, :vw] = True
    inputs = {"pixel_values": pixels, "pixel_mask": mask}
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
        image_size = _image_size(model)
        height, width = image_size
        rng = np.random.default_rng(settings.seed)
        hidden = model.unipose.l_hidden_size
        example = _pose_inputs(rng, image_size, (height * 2 // 3, width), 2, 3, model.config.num_embs, hidden)
        return [
            GraphExport(
                name="pose",
                module=PoseGraph(model.unipose, image_size).eval(),
                example_inputs=tuple(torch.from_numpy(example[name]) for name in POSE.inputs),
                input_names=list(POSE.inputs),
                output_names=list(POSE.outputs),
                dynamic_axes={},
                facts=pose_facts(model),
            )
        ]

    def validation_cases(self, model, settings, rng: np.random.Generator) -> dict[str, list[ValidationCase]]:
        """Three images with different valid regions and (objects, keypoints) = (1, 3), (2, 5), (3, 68)."""
        image_size = _image_size(model)
        short = min(model.config.det_short_side, model.config.det_max_long_side)
        long = model.config.det_max_long_side
        small = (int(rng.integers(long // 3, short + 1)), int(rng.integers(long // 3, long + 1)))
        plans = [((long, short), 1, 3), ((short, long), 2, 5), (small, 3, unipose_module.NUM_BODY_POINTS)]
        sizes = (model.config.num_embs, model.unipose.l_hidden_size)
        cases = []
        for valid_hw, objects, keypoints in plans:
            inputs = _pose_inputs(rng, image_size, valid_hw, objects, keypoints, *sizes)
            label = f"objects={objects},keypoints={keypoints},valid={valid_hw[0]}x{valid_hw[1]}"
            cases.append(ValidationCase(label, inputs, reference_pose_outputs(model, inputs)))
        return {"pose": cases}

    def manifest_facts(self, model, settings: ExportSettings) -> dict:
        return pose_facts(model)
