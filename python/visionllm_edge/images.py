"""Image input shared by the runtime and the reference: path / PIL / array in, RGB PIL image out. No torch."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image

#: Largest accepted image side; a bigger one is rejected before any allocation.
MAX_IMAGE_SIDE = 16384
#: Most pixels a file may decode to, checked from its header before any pixel is decoded (Pillow's own
#: decompression-bomb error threshold, held here so that a caller who lowers or disables Pillow's limit does
#: not disable ours; the C++ decoder has the same one).
MAX_IMAGE_PIXELS = 178956970


def _check_size(width: int, height: int, what: str) -> None:
    if width == 0 or height == 0:
        raise ValueError(f"{what}has zero size ({width}x{height})")
    if max(width, height) > MAX_IMAGE_SIDE:
        raise ValueError(f"{what}is {width}x{height}; the largest side allowed is {MAX_IMAGE_SIDE}")
    if width * height > MAX_IMAGE_PIXELS:
        raise ValueError(
            f"{what}is {width}x{height} = {width * height} pixels; the most allowed is {MAX_IMAGE_PIXELS}"
        )


def load_image(image, bgr: bool = False) -> Image.Image:
    """A path, a PIL image or an `H x W x 3` uint8 array (RGB, or BGR with `bgr=True`) to an RGB PIL image.

    Grayscale, RGBA, palette and 16-bit images are converted; unreadable files and empty images are errors.
    """
    if isinstance(image, (str, Path)):
        path = Path(image)
        try:
            im = Image.open(path)  # reads the header only
        except FileNotFoundError:
            raise ValueError(f"image file not found: {path}") from None
        except Exception as e:  # PIL raises many types for corrupt files
            raise ValueError(f"cannot read image {path}: {e}") from None
        with im:
            _check_size(im.width, im.height, f"image {path} ")  # before a pixel is decoded
            try:
                im.load()
                pil = im.copy()
            except Exception as e:
                raise ValueError(f"cannot read image {path}: {e}") from None
    elif isinstance(image, Image.Image):
        pil = image
    elif isinstance(image, np.ndarray):
        arr = image
        if arr.ndim not in (2, 3) or (arr.ndim == 3 and arr.shape[2] not in (3, 4)):
            raise ValueError(f"image array: expected H x W x 3 (or 4), got shape {arr.shape}")
        if arr.dtype not in (np.uint8, np.uint16):
            raise ValueError(f"image array: expected dtype uint8 (or uint16), got {arr.dtype}")
        # Before anything is copied: a broadcast view claims any size with no memory behind it, and the
        # conversions below would allocate that size.
        _check_size(arr.shape[1], arr.shape[0], "image ")
        if arr.dtype == np.uint16:
            arr = (arr >> 8).astype(np.uint8)
        arr = np.repeat(arr[:, :, None], 3, axis=2) if arr.ndim == 2 else arr[:, :, :3]
        if bgr:
            arr = arr[:, :, ::-1]
        pil = Image.fromarray(np.ascontiguousarray(arr), "RGB")
    else:
        raise TypeError(f"image: expected a path, a PIL.Image or a numpy array, got {type(image).__name__}")
    _check_size(pil.width, pil.height, "image ")
    if pil.mode in ("I;16", "I;16B", "I;16L", "I"):
        # v // 257 of the value clipped to 16 bits: what truncating clip(v / 257, 0, 255) gives, in integers
        # (float64 would take 8 bytes a pixel, four times the picture).
        arr = np.clip(np.asarray(pil), 0, 65535) // 257
        pil = Image.fromarray(arr.astype(np.uint8), "L")
    if pil.mode == "RGBA":
        pil = pil.convert("RGB")  # alpha is dropped, as CLIPImageProcessor's convert_rgb does
    elif pil.mode != "RGB":
        pil = pil.convert("RGB")
    return pil
