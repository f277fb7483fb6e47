"""The shapes world: deterministic scenes of coloured shapes and stick figures, with COCO-style annotations.

Everything is a pure function of `(seed, index)`: the same call gives the same pixels and annotations on
any machine (numpy's PCG64 and Pillow's rasteriser, no global state). Only numpy and Pillow are used, so
the runtime-side evaluation can generate its held-out split without torch.

A scene holds up to a few shapes — 4 kinds x 5 colours x 2 sizes, allowed to overlap a little (masks are
what stays visible) — on a varied light background, and optionally stick figures ("person") with 7 named
keypoints. `Scene.to_coco()` gives the ground truth in the format pycocotools reads.
"""

from __future__ import annotations

import zlib
from dataclasses import dataclass, field

import numpy as np
from PIL import Image, ImageDraw

KINDS = ("circle", "square", "triangle", "cross")
COLORS = {
    "red": (215, 35, 35),
    "green": (35, 165, 60),
    "blue": (40, 75, 220),
    "yellow": (235, 200, 30),
    "purple": (145, 55, 195),
}
SIZES = ("small", "large")
#: Object categories of the detector, in COCO category-id order (id = index + 1).
CATEGORIES = (*KINDS, "person")
PERSON = "person"
#: The stick figure's keypoints, in annotation order.
KEYPOINTS = ("head", "neck", "left hand", "right hand", "hip", "left foot", "right foot")
#: Per-keypoint OKS sigmas (COCO's definition; values from the COCO body keypoints they resemble:
#: nose/shoulder/wrist/hip/ankle = .026/.079/.062/.107/.089, the head widened to .05 for its larger circle).
OKS_SIGMAS = (0.05, 0.079, 0.062, 0.062, 0.107, 0.089, 0.089)
SKELETON = ((0, 1), (1, 2), (1, 3), (1, 4), (4, 5), (4, 6))
FIGURE_COLOR = (45, 45, 50)

#: Pixel sizes (the shape's bounding-box side) on a 128-pixel canvas; scaled with the canvas.
_SIDE = {"small": (14, 20), "large": (28, 38)}
_MAX_OVERLAP = 0.15  # largest fraction of a new shape's box that may cover earlier boxes
_MIN_VISIBLE = 0.6  # a shape mostly hidden by later ones is not placed


@dataclass
class SceneObject:
    """One annotated object.

    Attributes:
        category: a `CATEGORIES` name.
        color, size: for shapes (None for a person).
        box: `(x0, y0, x1, y1)` in pixels, of the visible mask.
        mask: `H x W` bool, the visible pixels.
        keypoints: for a person, `[K, 3]` float (x, y, visibility 2).
    """

    category: str
    color: str | None
    size: str | None
    box: tuple[float, float, float, float]
    mask: np.ndarray
    keypoints: np.ndarray | None = None

    @property
    def name(self) -> str:
        """'large red circle' / 'person'."""
        return self.category if self.color is None else f"{self.size} {self.color} {self.category}"

    @property
    def short_name(self) -> str:
        """'red circle' / 'person'."""
        return self.category if self.color is None else f"{self.color} {self.category}"

    @property
    def center(self) -> tuple[float, float]:
        x0, y0, x1, y1 = self.box
        return (x0 + x1) / 2, (y0 + y1) / 2


@dataclass
class Scene:
    """A generated picture and its objects (painting order: later objects cover earlier ones)."""

    image: Image.Image
    objects: list[SceneObject] = field(default_factory=list)
    seed: int = 0
    index: int = 0

    @property
    def shapes(self) -> list[SceneObject]:
        return [o for o in self.objects if o.category != PERSON]

    @property
    def people(self) -> list[SceneObject]:
        return [o for o in self.objects if o.category == PERSON]

    def count(self, category: str) -> int:
        return sum(o.category == category for o in self.objects)

    def semantic_map(self) -> np.ndarray:
        """`H x W` int32 map of category indices (`CATEGORIES`), -1 for background."""
        out = np.full((self.image.height, self.image.width), -1, np.int32)
        for o in self.objects:
            out[o.mask] = CATEGORIES.index(o.category)
        return out

    def to_coco(self, image_id: int, first_annotation_id: int) -> tuple[dict, list[dict]]:
        """`(image entry, annotation entries)` for a COCO ground-truth file (RLE masks, xywh boxes)."""
        from visionllm_edge.shapes.coco import encode_mask

        image = {"id": image_id, "width": self.image.width, "height": self.image.height}
        anns = []
        for k, o in enumerate(self.objects):
            x0, y0, x1, y1 = o.box
            ann = {
                "id": first_annotation_id + k,
                "image_id": image_id,
                "category_id": CATEGORIES.index(o.category) + 1,
                "bbox": [x0, y0, x1 - x0, y1 - y0],
                "area": float(o.mask.sum()),
                "iscrowd": 0,
                "segmentation": encode_mask(o.mask),
            }
            if o.keypoints is not None:
                ann["keypoints"] = [float(v) for v in o.keypoints.reshape(-1)]
                ann["num_keypoints"] = int((o.keypoints[:, 2] > 0).sum())
            anns.append(ann)
        return image, anns


def scene_rng(seed: int, index: int, salt: str = "") -> np.random.Generator:
    """A generator that depends only on `(seed, index, salt)`."""
    return np.random.default_rng([int(seed) & 0xFFFFFFFF, int(index) & 0xFFFFFFFF, zlib.crc32(salt.encode())])


def background(rng: np.random.Generator, size: int) -> np.ndarray:
    """A light, low-saturation background: a tint, a linear gradient and fine noise (`H x W x 3` uint8)."""
    base = rng.uniform(200, 240)
    tint = rng.uniform(-12, 12, size=3)
    yy, xx = np.mgrid[0:size, 0:size] / max(size - 1, 1)
    angle = rng.uniform(0, 2 * np.pi)
    ramp = (np.cos(angle) * xx + np.sin(angle) * yy - 0.5) * rng.uniform(0, 30)
    noise = rng.normal(0, rng.uniform(0, 5), size=(size, size, 3))
    img = base + tint[None, None] + ramp[..., None] + noise
    return np.clip(img, 0, 255).astype(np.uint8)


def shape_polygon(kind: str, cx: float, cy: float, side: float) -> list[tuple[float, float]] | None:
    """Outline of a shape whose bounding box is `side` wide, centred at `(cx, cy)` (None for a circle)."""
    h = side / 2
    if kind == "square":
        return [(cx - h, cy - h), (cx + h, cy - h), (cx + h, cy + h), (cx - h, cy + h)]
    if kind == "triangle":  # apex up
        return [(cx, cy - h), (cx + h, cy + h), (cx - h, cy + h)]
    if kind == "cross":  # arms a third of the side wide
        a = side / 6
        return [
            (cx - a, cy - h), (cx + a, cy - h), (cx + a, cy - a), (cx + h, cy - a), (cx + h, cy + a),
            (cx + a, cy + a), (cx + a, cy + h), (cx - a, cy + h), (cx - a, cy + a), (cx - h, cy + a),
            (cx - h, cy - a), (cx - a, cy - a),
        ]  # fmt: skip
    if kind == "circle":
        return None
    raise ValueError(f"unknown shape kind {kind!r}; known: {', '.join(KINDS)}")


def draw_shape(draw: ImageDraw.ImageDraw, kind: str, cx: float, cy: float, side: float, fill) -> None:
    poly = shape_polygon(kind, cx, cy, side)
    if poly is None:
        h = side / 2
        draw.ellipse([cx - h, cy - h, cx + h - 1, cy + h - 1], fill=fill)
    else:
        draw.polygon(poly, fill=fill)


def _mask_of(size: int, paint) -> np.ndarray:
    canvas = Image.new("L", (size, size), 0)
    paint(ImageDraw.Draw(canvas), 255)
    return np.asarray(canvas) > 127


def _box_of(mask: np.ndarray) -> tuple[float, float, float, float]:
    ys, xs = np.nonzero(mask)
    return float(xs.min()), float(ys.min()), float(xs.max() + 1), float(ys.max() + 1)


def _overlap(box, boxes) -> float:
    x0, y0, x1, y1 = box
    area = max((x1 - x0) * (y1 - y0), 1e-6)
    worst = 0.0
    for b in boxes:
        w = max(0.0, min(x1, b[2]) - max(x0, b[0]))
        h = max(0.0, min(y1, b[3]) - max(y0, b[1]))
        worst = max(worst, w * h / area)
    return worst


def stick_figure(rng: np.random.Generator, size: int, boxes) -> tuple[np.ndarray, float] | None:
    """Keypoints `[7, 2]` and line width of a figure that fits the canvas and avoids `boxes` (or None)."""
    for _ in range(30):
        height = rng.uniform(0.35, 0.55) * size
        cx = rng.uniform(0.2, 0.8) * size
        top = rng.uniform(0.04, 0.96) * size - 0  # the head's top
        top = min(top, size * 0.97 - height)
        if top < size * 0.03:
            continue
        head_r = 0.09 * height
        head = (cx + rng.uniform(-0.04, 0.04) * height, top + head_r)
        neck = (cx, top + 2 * head_r + 0.02 * height)
        hip = (cx + rng.uniform(-0.05, 0.05) * height, top + 0.58 * height)
        arm = 0.32 * height
        la, ra = rng.uniform(np.pi * 0.55, np.pi * 1.2), rng.uniform(-np.pi * 0.2, np.pi * 0.45)
        lhand = (neck[0] + arm * np.cos(la), neck[1] + 0.1 * height + arm * np.sin(la) * 0.8)
        rhand = (neck[0] + arm * np.cos(ra), neck[1] + 0.1 * height + arm * np.sin(ra) * 0.8)
        leg = 0.42 * height
        ll, rl = rng.uniform(np.pi * 0.55, np.pi * 0.75), rng.uniform(np.pi * 0.25, np.pi * 0.45)
        lfoot = (hip[0] + leg * np.cos(ll), hip[1] + leg * np.sin(ll))
        rfoot = (hip[0] + leg * np.cos(rl), hip[1] + leg * np.sin(rl))
        pts = np.array([head, neck, lhand, rhand, hip, lfoot, rfoot], np.float64)
        x0, y0 = pts[:, 0].min() - head_r, pts[:, 1].min() - head_r
        x1, y1 = pts[:, 0].max() + head_r, pts[:, 1].max() + 2
        if x0 < 1 or y0 < 1 or x1 > size - 2 or y1 > size - 2:
            continue
        if _overlap((x0, y0, x1, y1), boxes) > 0.05:
            continue
        return pts, max(2.0, size / 64)
    return None


def _paint_figure(draw: ImageDraw.ImageDraw, pts: np.ndarray, width: float, fill) -> None:
    w = int(round(width))
    for a, b in SKELETON:
        draw.line([tuple(pts[a]), tuple(pts[b])], fill=fill, width=w)
    head_r = float(np.linalg.norm(pts[0] - pts[1])) * 0.55
    hx, hy = pts[0]
    draw.ellipse([hx - head_r, hy - head_r, hx + head_r, hy + head_r], fill=fill)


def make_scene(
    seed: int,
    index: int,
    size: int = 128,
    min_shapes: int = 1,
    max_shapes: int = 5,
    people: tuple[int, int] = (0, 0),
    kinds=KINDS,
    shape_scale: float | None = None,
    max_overlap: float = _MAX_OVERLAP,
    gap: float = 0.0,
) -> Scene:
    """One scene, a pure function of its arguments.

    Args:
        seed, index: which scene.
        size: canvas side in pixels.
        min_shapes, max_shapes: how many shapes to try to place (fewer when no room is left).
        people: `(min, max)` stick figures, placed first.
        kinds: shape kinds to draw from.
        shape_scale: multiplies the shape sizes (default: the canvas side / 128).
        max_overlap: largest fraction of a new shape's box that may cover earlier boxes.
        gap: pixels kept free around each shape's box (with `max_overlap=0`: shapes never touch).
    """
    rng = scene_rng(seed, index, f"scene{size}")
    img = Image.fromarray(background(rng, size))
    draw = ImageDraw.Draw(img)
    placed: list[tuple[str, str | None, str | None, np.ndarray, np.ndarray | None]] = []
    boxes: list[tuple[float, float, float, float]] = []
    scale = size / 128 if shape_scale is None else shape_scale
    for _ in range(int(rng.integers(people[0], people[1] + 1))):
        fig = stick_figure(rng, size, boxes)
        if fig is None:
            continue
        pts, width = fig
        _paint_figure(draw, pts, width, FIGURE_COLOR)
        mask = _mask_of(size, lambda d, f, p=pts, w=width: _paint_figure(d, p, w, f))
        kp = np.concatenate([pts, np.full((len(pts), 1), 2.0)], 1)
        placed.append((PERSON, None, None, mask, kp))
        boxes.append(_box_of(mask))
    person_boxes = list(boxes)
    n_shapes = int(rng.integers(min_shapes, max_shapes + 1))
    for _ in range(n_shapes):
        for _attempt in range(25):
            kind = str(rng.choice(kinds))
            color = str(rng.choice(list(COLORS)))
            sz = str(rng.choice(SIZES))
            lo, hi = _SIDE[sz]
            side = rng.uniform(lo, hi) * scale
            cx, cy = rng.uniform(side / 2 + 1, size - side / 2 - 1, size=2)
            box = (cx - side / 2, cy - side / 2, cx + side / 2, cy + side / 2)
            grown = (box[0] - gap, box[1] - gap, box[2] + gap, box[3] + gap)
            if _overlap(grown, boxes) > max_overlap or _overlap(grown, person_boxes) > 0:
                continue
            mask = _mask_of(size, lambda d, f, k=kind, x=cx, y=cy, s=side: draw_shape(d, k, x, y, s, f))
            # Later shapes hide what they cover; drop the new one if an earlier one would mostly vanish.
            if any(m[3][mask].sum() > (1 - _MIN_VISIBLE) * m[3].sum() for m in placed):
                continue
            for m in placed:
                m[3][mask] = False
            draw_shape(draw, kind, cx, cy, side, COLORS[color])
            placed.append((kind, color, sz, mask, None))
            boxes.append(box)
            break
    objects = [
        SceneObject(cat, color, sz, _box_of(mask), mask, kp)
        for cat, color, sz, mask, kp in placed
        if mask.any()
    ]
    return Scene(img, objects, seed, index)


def single_shape_image(
    kind: str, color: str, size_name: str, canvas: int, rng: np.random.Generator, center: bool = False
) -> Image.Image:
    """A generation target: one shape on a plain light background."""
    bg = np.full((canvas, canvas, 3), rng.uniform(225, 245), np.float64) + rng.uniform(-8, 8, size=3)
    img = Image.fromarray(np.clip(bg, 0, 255).astype(np.uint8))
    lo, hi = _SIDE[size_name]
    side = rng.uniform(lo, hi) * canvas / 64  # relative to a 64-pixel canvas: shapes fill more of it
    if center:
        cx = cy = canvas / 2
    else:
        cx, cy = rng.uniform(side / 2 + 2, canvas - side / 2 - 2, size=2)
    draw_shape(ImageDraw.Draw(img), kind, cx, cy, side, COLORS[color])
    return img
