"""Image preprocessing of the reference pipeline (the runtime has its own, in C++, checked against this).

Three paths (research §8.9): CLIP tiles for the LLM (anyres), the decoders' image (resize, ImageNet
normalisation, zero pad to /32, pixel mask), and visual prompts rasterised to masks in the thumbnail frame.
"""

from __future__ import annotations

import numpy as np
import torch
from PIL import Image
from visionllm_edge import contract
from visionllm_edge.images import MAX_IMAGE_SIDE, load_image  # noqa: F401 - re-exported for the reference

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def choose_grid(width: int, height: int, tile_size: int, max_tiles: int) -> tuple[int, int]:
    """The official anyres grid (cols, rows): closest aspect ratio, ties to the larger grid by area."""
    aspect = width / height
    area = width * height
    best_diff = float("inf")
    best = (1, 1)
    for cols, rows in contract.anyres_candidates(max_tiles):
        diff = abs(aspect - cols / rows)
        if diff < best_diff:
            best_diff = diff
            best = (cols, rows)
        elif diff == best_diff and area > 0.5 * tile_size * tile_size * cols * rows:
            best = (cols, rows)
    return best


def clip_normalise(tile: Image.Image) -> np.ndarray:
    """`CLIPImageProcessor` on a tile that already has the processor's size: rescale and normalise, CHW."""
    arr = np.asarray(tile, dtype=np.float32) / np.float32(255.0)
    arr = (arr - np.asarray(CLIP_MEAN, np.float32)) / np.asarray(CLIP_STD, np.float32)
    return arr.transpose(2, 0, 1)


def anyres_tiles(image: Image.Image, tile_size: int, max_tiles: int) -> tuple[torch.Tensor, tuple[int, int]]:
    """The official `dynamic_preprocess` + CLIP normalisation: `[T, 3, S, S]` tiles and the (cols, rows) grid.

    Tiles are cut row-major from the image resized (PIL bicubic, aspect not kept) to the grid; when there
    is more than one, a thumbnail of the whole image is appended last.
    """
    cols, rows = choose_grid(image.width, image.height, tile_size, max_tiles)
    resized = image.resize((tile_size * cols, tile_size * rows), Image.BICUBIC)
    tiles = []
    for i in range(cols * rows):
        x, y = (i % cols) * tile_size, (i // cols) * tile_size
        tiles.append(resized.crop((x, y, x + tile_size, y + tile_size)))
    if len(tiles) > 1:
        tiles.append(image.resize((tile_size, tile_size), Image.BICUBIC))
    return torch.from_numpy(np.stack([clip_normalise(t) for t in tiles])), (cols, rows)


def detection_image(
    image: Image.Image, short_side: int, max_long_side: int
) -> tuple[torch.Tensor, torch.Tensor, tuple[int, int]]:
    """The decoders' input: keep-ratio resize (short side to `short_side`, long side at most `max_long_side`,
    bilinear), ImageNet normalisation, zero pad to a multiple of 32.

    Returns `[1, 3, Hp, Wp]` pixels, the `[1, Hp, Wp]` bool valid-pixel mask, and the resized (h, w).
    """
    w, h = image.size
    scale = min(short_side / min(w, h), max_long_side / max(w, h))
    nw, nh = max(1, int(w * scale + 0.5)), max(1, int(h * scale + 0.5))
    resized = image.resize((nw, nh), Image.BILINEAR)
    arr = np.asarray(resized, dtype=np.float32)
    arr = (arr - np.asarray(IMAGENET_MEAN, np.float32) * 255) / (np.asarray(IMAGENET_STD, np.float32) * 255)
    return pad_detection_image(torch.from_numpy(arr.transpose(2, 0, 1).copy())) + ((nh, nw),)


def pad_detection_image(chw: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Zero-pads a normalised `[3, h, w]` image to /32 and builds the valid-pixel mask (True = image)."""
    _, h, w = chw.shape
    hp, wp = -(-h // 32) * 32, -(-w // 32) * 32
    out = chw.new_zeros(1, 3, hp, wp)
    out[0, :, :h, :w] = chw
    mask = torch.zeros(1, hp, wp, dtype=torch.bool)
    mask[0, :h, :w] = True
    return out, mask


def region_mask(region, image_size: tuple[int, int], thumb_size: int) -> torch.Tensor:
    """Rasterises one visual prompt to a `[S, S]` float mask in the thumbnail frame.

    Args:
        region: an `H x W` bool mask in the original frame, an `(x0, y0, x1, y1)` box or an `(x, y)` point in
            original pixels.
        image_size: the original (width, height).
    """
    w, h = image_size
    sx, sy = thumb_size / w, thumb_size / h
    if isinstance(region, np.ndarray) and region.ndim == 2:
        if region.shape != (h, w):
            raise ValueError(f"region mask: expected shape ({h}, {w}) (the image), got {region.shape}")
        if not region.any():
            raise ValueError("region mask is empty")
        pil = Image.fromarray(region.astype(np.uint8) * 255, "L").resize(
            (thumb_size, thumb_size), Image.NEAREST
        )
        return torch.from_numpy((np.asarray(pil) > 127).astype(np.float32))
    coords = tuple(float(v) for v in region)
    mask = torch.zeros(thumb_size, thumb_size)
    if len(coords) == 4:
        x0, y0, x1, y1 = coords
        if not (0 <= x0 < x1 <= w and 0 <= y0 < y1 <= h):
            raise ValueError(f"region box {coords} is empty or outside the {w}x{h} image")
        c0, r0 = int(np.floor(x0 * sx)), int(np.floor(y0 * sy))
        c1, r1 = max(c0 + 1, int(np.ceil(x1 * sx))), max(r0 + 1, int(np.ceil(y1 * sy)))
        mask[r0:r1, c0:c1] = 1.0
        return mask
    if len(coords) == 2:
        x, y = coords
        if not (0 <= x < w and 0 <= y < h):
            raise ValueError(f"region point {coords} is outside the {w}x{h} image")
        mask[min(int(y * sy), thumb_size - 1), min(int(x * sx), thumb_size - 1)] = 1.0
        return mask
    raise ValueError(f"region: expected a mask, a 4-number box or a 2-number point, got {region!r}")
