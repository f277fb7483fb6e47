"""A pixel checker: which coloured shapes a picture contains (for generation and editing accuracy).

Pixels are assigned to the nearest palette colour when they are close to it and saturated (the world's
backgrounds are light and nearly grey); each colour's 4-connected components large enough to be a shape
are classified by their silhouette in their bounding box:

- square: fills ~100 % of its box;
- circle: ~79 % (pi / 4);
- triangle (apex up): ~50 %, its bottom strip nearly full and its top strip nearly empty;
- cross: ~56 %, its bottom strip filled only in the middle third and its centre filled.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from visionllm_edge.shapes.world import COLORS

_PALETTE = np.array(list(COLORS.values()), np.float32)
_NAMES = list(COLORS)
#: Largest RGB distance to a palette colour for a pixel to count as that colour.
MAX_COLOR_DISTANCE = 90.0
#: Smallest component, as a fraction of the picture's area.
MIN_AREA_FRACTION = 0.01


@dataclass
class FoundShape:
    color: str
    kind: str
    box: tuple[int, int, int, int]  # x0, y0, x1, y1 (exclusive)
    area: int


def color_labels(rgb: np.ndarray) -> np.ndarray:
    """`H x W` palette index per pixel, -1 where no palette colour is near (or the pixel is greyish)."""
    px = np.asarray(rgb, np.float32)[..., :3]
    dist = np.linalg.norm(px[:, :, None, :] - _PALETTE[None, None], axis=-1)
    best = dist.argmin(-1)
    saturation = px.max(-1) - px.min(-1)
    ok = (dist.min(-1) < MAX_COLOR_DISTANCE) & (saturation > 60)
    return np.where(ok, best, -1)


def components(mask: np.ndarray) -> list[np.ndarray]:
    """4-connected components of a bool mask, each as an `[n, 2]` array of (y, x)."""
    h, w = mask.shape
    seen = np.zeros_like(mask, dtype=bool)
    out = []
    for y0, x0 in zip(*np.nonzero(mask)):
        if seen[y0, x0]:
            continue
        stack = [(y0, x0)]
        seen[y0, x0] = True
        pts = []
        while stack:
            y, x = stack.pop()
            pts.append((y, x))
            for ny, nx in ((y - 1, x), (y + 1, x), (y, x - 1), (y, x + 1)):
                if 0 <= ny < h and 0 <= nx < w and mask[ny, nx] and not seen[ny, nx]:
                    seen[ny, nx] = True
                    stack.append((ny, nx))
        out.append(np.array(pts))
    return out


def classify(patch: np.ndarray) -> str | None:
    """The kind of a silhouette cropped to its bounding box (None when it is no clean shape)."""
    h, w = patch.shape
    if h < 4 or w < 4 or max(h, w) > 1.6 * min(h, w):
        return None
    fill = patch.mean()
    strip = max(1, h // 5)
    bottom = patch[-strip:].mean()
    top = patch[:strip].mean()
    centre = patch[h // 3 : h - h // 3, w // 3 : w - w // 3].mean()
    if fill > 0.9:
        return "square"
    if 0.68 < fill <= 0.9:
        return "circle"
    if 0.35 < fill <= 0.68:
        if bottom > 0.7 and top < 0.45:
            return "triangle"
        if bottom < 0.55 and centre > 0.8:
            return "cross"
    return None


def find_shapes(image) -> list[FoundShape]:
    """Every coloured shape the picture shows (PIL image or `H x W x 3` uint8 array)."""
    rgb = np.asarray(image)
    labels = color_labels(rgb)
    min_area = MIN_AREA_FRACTION * labels.size
    found = []
    for ci, name in enumerate(_NAMES):
        for pts in components(labels == ci):
            if len(pts) < min_area:
                continue
            y0, x0 = pts.min(0)
            y1, x1 = pts.max(0) + 1
            patch = np.zeros((y1 - y0, x1 - x0), bool)
            patch[pts[:, 0] - y0, pts[:, 1] - x0] = True
            kind = classify(patch)
            if kind is not None:
                found.append(FoundShape(name, kind, (int(x0), int(y0), int(x1), int(y1)), len(pts)))
    return found


def contains(image, color: str, kind: str) -> bool:
    """Whether the picture shows a `color` `kind`."""
    return any(s.color == color and s.kind == kind for s in find_shapes(image))
