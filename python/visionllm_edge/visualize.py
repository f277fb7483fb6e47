"""Drawing a `Result` onto its image: boxes, masks, the semantic map, pose keypoints. Pillow and numpy only.

Used by `Result.draw(image)` and `visionllm-edge run --draw`. Overlays are blended in numpy (one pass per
mask, no per-pixel Python); outlines and text go through `PIL.ImageDraw`. Generated images (`Result.images`)
are not drawn: they are pictures of their own, which the CLI writes next to the annotated one.
"""

from __future__ import annotations

import colorsys
import re
from collections.abc import Iterable, Sequence
from typing import TYPE_CHECKING

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from visionllm_edge.images import load_image

if TYPE_CHECKING:
    from visionllm_edge.results import Result

#: The 17 COCO person keypoints, in COCO's order (names as the pose prompts spell them: spaces, lower case).
COCO_KEYPOINTS: tuple[str, ...] = (
    "nose",
    "left eye",
    "right eye",
    "left ear",
    "right ear",
    "left shoulder",
    "right shoulder",
    "left elbow",
    "right elbow",
    "left wrist",
    "right wrist",
    "left hip",
    "right hip",
    "left knee",
    "right knee",
    "left ankle",
    "right ankle",
)

#: COCO's person skeleton as name pairs (the `skeleton` of COCO's person category, 1-based there).
COCO_SKELETON: tuple[tuple[str, str], ...] = tuple(
    (COCO_KEYPOINTS[a - 1], COCO_KEYPOINTS[b - 1])
    for a, b in (
        (16, 14), (14, 12), (17, 15), (15, 13), (12, 13), (6, 12), (7, 13), (6, 7), (6, 8), (7, 9),
        (8, 10), (9, 11), (2, 3), (1, 2), (1, 3), (2, 4), (3, 5), (4, 6), (5, 7),
    )
)  # fmt: skip

#: Twenty well-separated colours (Tableau 10 and its light variants, reordered so neighbours differ).
_PALETTE: tuple[tuple[int, int, int], ...] = (
    (31, 119, 180), (255, 127, 14), (44, 160, 44), (214, 39, 40), (148, 103, 189),
    (140, 86, 75), (227, 119, 194), (188, 189, 34), (23, 190, 207), (127, 127, 127),
    (174, 199, 232), (255, 187, 120), (152, 223, 138), (255, 152, 150), (197, 176, 213),
    (196, 156, 148), (247, 182, 210), (219, 219, 141), (158, 218, 229), (199, 199, 199),
)  # fmt: skip


def normalize_keypoint_name(name: str) -> str:
    """`Left_Shoulder`, `left-shoulder` and `left shoulder` are one keypoint."""
    return re.sub(r"[\s_\-]+", " ", name.strip().lower())


def skeleton_for(
    names: Sequence[str], skeleton: Iterable[tuple[str, str]] | None = None
) -> list[tuple[int, int]]:
    """The skeleton edges among `names`, as 0-based index pairs into `names`.

    Args:
        names: the keypoint names of a pose (the order of the `[POSE]` groups).
        skeleton: name pairs to connect; default COCO's person skeleton. Edges whose ends are not both among
            `names` are left out, so a prompt that asks for some COCO keypoints gets the edges between those.

    Returns:
        The edges; empty when no edge of the skeleton has both ends named (the skeleton is then "unknown").
    """
    index: dict[str, int] = {}
    for i, n in enumerate(names):
        index.setdefault(normalize_keypoint_name(n), i)
    edges = []
    for a, b in COCO_SKELETON if skeleton is None else skeleton:
        ia, ib = index.get(normalize_keypoint_name(a)), index.get(normalize_keypoint_name(b))
        if ia is not None and ib is not None and ia != ib:
            edges.append((ia, ib))
    return edges


def colour(i: int) -> tuple[int, int, int]:
    """The i-th label colour: the palette first, then golden-ratio hues (distinct however many labels)."""
    if i < len(_PALETTE):
        return _PALETTE[i]
    h = (i * 0.6180339887498949) % 1.0
    r, g, b = colorsys.hsv_to_rgb(h, 0.75, 0.95)
    return (int(r * 255), int(g * 255), int(b * 255))


def label_colours(labels: Iterable[str]) -> dict[str, tuple[int, int, int]]:
    """One colour per distinct label, in order of first appearance."""
    out: dict[str, tuple[int, int, int]] = {}
    for lab in labels:
        if lab not in out:
            out[lab] = colour(len(out))
    return out


def _font(size: int):
    try:
        return ImageFont.load_default(size=size)
    except (TypeError, ValueError, OSError):  # a Pillow built without FreeType has only the bitmap font
        return ImageFont.load_default()


def _text_colour(bg: tuple[int, int, int]) -> tuple[int, int, int]:
    # Black on light fills, white on dark ones (ITU-R BT.601 luma).
    return (0, 0, 0) if 0.299 * bg[0] + 0.587 * bg[1] + 0.114 * bg[2] > 140 else (255, 255, 255)


def _fit(array: np.ndarray, shape: tuple[int, int], what: str) -> np.ndarray:
    """A mask or label map of another size, resized (nearest) to `shape` so it can still be overlaid."""
    if array.ndim != 2:
        raise ValueError(f"{what}: expected an H x W array, got shape {array.shape}")
    if array.shape == shape:
        return array
    if array.dtype == np.bool_:
        im = Image.fromarray(array.astype(np.uint8) * 255).resize(
            (shape[1], shape[0]), Image.Resampling.NEAREST
        )
        return np.asarray(im) > 127
    im = Image.fromarray(array.astype(np.int32)).resize((shape[1], shape[0]), Image.Resampling.NEAREST)
    return np.asarray(im).astype(array.dtype)


def _blend(rgb: np.ndarray, mask: np.ndarray, fill: tuple[int, int, int], alpha: float) -> None:
    if mask.any():
        region = rgb[mask].astype(np.float32)
        rgb[mask] = np.clip(
            region * (1.0 - alpha) + np.asarray(fill, np.float32) * alpha + 0.5, 0, 255
        ).astype(np.uint8)


def _finite_box(box) -> tuple[float, float, float, float] | None:
    vals = [float(v) for v in box]
    return tuple(vals) if len(vals) == 4 and all(np.isfinite(vals)) else None


def _tagged_box(draw, box, text: str, fill, width: int, font, size: tuple[int, int]) -> None:
    w, h = size
    x0, y0, x1, y1 = box
    # Clip to the picture so boxes that run off the edge (raw decoder boxes may) still show their sides.
    x0, x1 = sorted((min(max(x0, 0.0), w - 1.0), min(max(x1, 0.0), w - 1.0)))
    y0, y1 = sorted((min(max(y0, 0.0), h - 1.0), min(max(y1, 0.0), h - 1.0)))
    draw.rectangle((x0, y0, x1, y1), outline=fill, width=width)
    if not text:
        return
    left, top, right, bottom = draw.textbbox((0, 0), text, font=font)
    tw, th = right - left + 4, bottom - top + 2
    # The tag sits above the box; inside its top edge when there is no room above.
    ty = y0 - th if y0 - th >= 0 else y0
    tx = min(x0, max(0.0, w - tw))
    draw.rectangle((tx, ty, tx + tw, ty + th), fill=fill)
    draw.text((tx + 2 - left, ty + 1 - top), text, fill=_text_colour(fill), font=font)


def draw_result(
    image,
    result: Result,
    alpha: float = 0.45,
    keypoint_threshold: float = 0.5,
    skeleton: Iterable[tuple[str, str]] | None = None,
    bgr: bool = False,
) -> np.ndarray:
    """Draws a result's detections, masks, semantic map and poses on a copy of its image.

    Args:
        image: the request's image (path, PIL image, or `H x W x 3` uint8 array; BGR with `bgr=True`).
        result: what the pipeline returned for that image (boxes and masks are in its pixel frame).
        alpha: opacity of the mask and semantic-map overlays.
        keypoint_threshold: keypoints whose visibility is below this are drawn hollow and left out of the
            skeleton.
        skeleton: keypoint name pairs to connect (default: COCO's person skeleton where the names match it).
        bgr: `image` is a BGR array (OpenCV); the returned array is RGB either way.

    Returns:
        `H x W x 3` uint8 RGB; equal to the input when the result has nothing to draw.
    """
    rgb = np.array(load_image(image, bgr=bgr), dtype=np.uint8)  # a copy: the caller's array stays as it is
    h, w = rgb.shape[:2]
    seg = result.segmentation
    colours = label_colours(
        [d.label for d in result.detections] + (list(seg.labels) if seg is not None else [])
        + [p.label for p in result.poses]
    )  # fmt: skip
    if seg is not None and seg.labels:
        label_map = _fit(np.asarray(seg.label_map), (h, w), "segmentation.label_map")
        for i, lab in enumerate(seg.labels):
            _blend(rgb, label_map == i, colours[lab], alpha)
    for i, d in enumerate(result.detections):
        if d.mask is not None:
            _blend(
                rgb,
                _fit(np.asarray(d.mask, dtype=bool), (h, w), f"detections[{i}].mask"),
                colours[d.label],
                alpha,
            )
    if not result.detections and not result.poses and (seg is None or not seg.labels):
        return rgb
    pil = Image.fromarray(rgb)
    draw = ImageDraw.Draw(pil)
    line = max(1, round(min(h, w) / 250))
    font = _font(max(10, min(32, round(min(h, w) / 30))))
    for d in result.detections:
        box = _finite_box(d.box_xyxy)
        if box is not None:
            _tagged_box(draw, box, f"{d.label} {d.score:.2f}", colours[d.label], line, font, (w, h))
    for p in result.poses:
        _draw_pose(draw, p, colours[p.label], line, font, (w, h), keypoint_threshold, skeleton)
    if seg is not None and seg.labels:
        _legend(draw, seg.labels, colours, font, line)
    return np.asarray(pil).copy()


def _draw_pose(draw, pose, fill, line: int, font, size, threshold: float, skeleton) -> None:
    box = _finite_box(pose.box_xyxy)
    if box is not None:
        _tagged_box(draw, box, f"{pose.label} {pose.score:.2f}", fill, line, font, size)
    kps = np.asarray(pose.keypoints, dtype=np.float64).reshape(-1, 3)
    names = list(pose.keypoint_names)
    # Drawn: keypoints within a picture's size of the picture. Pillow's drawing takes C longs, so a keypoint
    # at 1e30 would not be drawn but raise (a SystemError from ImageDraw.text); one that far off shows
    # nothing anyway.
    w, h = size
    offset = np.abs(np.nan_to_num(kps[:, :2], nan=np.inf) - [w / 2, h / 2])
    drawable = (offset <= [1.5 * w, 1.5 * h]).all(axis=1)
    visible = drawable & (np.nan_to_num(kps[:, 2], nan=0.0) >= threshold)
    edges = skeleton_for(names, skeleton)
    for a, b in edges:
        if a < len(kps) and b < len(kps) and visible[a] and visible[b]:
            draw.line((kps[a, 0], kps[a, 1], kps[b, 0], kps[b, 1]), fill=fill, width=line)
    r = line + 2
    for i, (x, y, _v) in enumerate(kps):
        if not drawable[i]:
            continue
        if visible[i]:
            draw.ellipse((x - r, y - r, x + r, y + r), fill=fill, outline=(255, 255, 255))
        else:
            draw.ellipse((x - r, y - r, x + r, y + r), outline=fill, width=1)
        if not edges and i < len(names):
            # Without a skeleton the dots alone do not say which keypoint is which.
            draw.text((x + r + 1, y - r), names[i], fill=fill, font=font)


def _legend(draw, labels: Sequence[str], colours, font, line: int) -> None:
    rows = [lab or "(unnamed)" for lab in labels]
    boxes = [draw.textbbox((0, 0), t, font=font) for t in rows]
    row_h = max(b[3] - b[1] for b in boxes) + 4
    swatch = row_h - 4
    width = max(b[2] - b[0] for b in boxes) + swatch + 12
    pad = 3 + line
    draw.rectangle(
        (pad, pad, pad + width, pad + row_h * len(rows) + 4), fill=(255, 255, 255), outline=(0, 0, 0)
    )
    for k, (lab, text, b) in enumerate(zip(labels, rows, boxes)):
        y = pad + 4 + k * row_h
        draw.rectangle((pad + 4, y, pad + 4 + swatch, y + swatch), fill=colours[lab], outline=(0, 0, 0))
        draw.text((pad + swatch + 8 - b[0], y - b[1]), text, fill=(0, 0, 0), font=font)
