"""Image input shared by the runtime and the reference: path / PIL / array in, RGB PIL image out. No torch."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image

#: Largest accepted image side; a bigger one is rejected before any allocation.
MAX_IMAGE_SIDE = 16384


def load_image(image, bgr: bool = False) -> Image.Image:
    """A path, a PIL image or an `H x W x 3` uint8 array (RGB, or BGR with `bgr=True`) to an RGB PIL image.

    Grayscale, RGBA, palette and 16-bit images are converted; unreadable files and empty images are errors.
    """
    if isinstance(image, (str, Path)):
        path = Path(image)
        try:
            with Image.open(path) as im:
                im.load()
                pil = im.copy()
        except FileNotFoundError:
            raise ValueError(f"image file not found: {path}") from None
        except Exception as e:  # PIL raises many types for corrupt files
            raise ValueError(f"cannot read image {path}: {e}") from None
    elif isinstance(image, Image.Image):
        pil = image
    elif isinstance(image, np.ndarray):
        arr = image
        if arr.ndim == 2:
            arr = np.repeat(arr[:, :, None], 3, axis=2)
        if arr.ndim != 3 or arr.shape[2] not in (3, 4):
            raise ValueError(f"image array: expected H x W x 3 (or 4), got shape {arr.shape}")
        if arr.dtype == np.uint16:
            arr = (arr >> 8).astype(np.uint8)
        elif arr.dtype != np.uint8:
            raise ValueError(f"image array: expected dtype uint8 (or uint16), got {arr.dtype}")
        arr = arr[:, :, :3]
        if bgr:
            arr = arr[:, :, ::-1]
        pil = Image.fromarray(np.ascontiguousarray(arr), "RGB")
    else:
        raise TypeError(f"image: expected a path, a PIL.Image or a numpy array, got {type(image).__name__}")
    if pil.width == 0 or pil.height == 0:
        raise ValueError(f"image has zero size ({pil.width}x{pil.height})")
    if max(pil.width, pil.height) > MAX_IMAGE_SIDE:
        raise ValueError(f"image is {pil.width}x{pil.height}; the largest side allowed is {MAX_IMAGE_SIDE}")
    if pil.mode in ("I;16", "I;16B", "I;16L", "I"):
        arr = np.asarray(pil, dtype=np.float64)
        pil = Image.fromarray(np.clip(arr / 257.0, 0, 255).astype(np.uint8), "L")
    if pil.mode == "RGBA":
        pil = pil.convert("RGB")  # alpha is dropped, as CLIPImageProcessor's convert_rgb does
    elif pil.mode != "RGB":
        pil = pil.convert("RGB")
    return pil
