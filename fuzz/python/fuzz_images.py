"""Fuzzes `visionllm_edge.images.load_image`, the one door every picture of a request comes through.

The first byte picks what the rest is (its value mod 4, so a seed is that byte and a file):
  0. a file of any content (a path is what `visionllm-edge run` and most callers pass): Pillow's decoders
     behind the header-first pixel-count cap;
  1. a PIL image of any mode and size made from raw bytes (16-bit, float, CMYK, palette, LAB, ...);
  2. a numpy array of any dtype, shape and stride, NaN and inf included, as RGB or BGR;
  3. a broadcast array of any shape up to 2**17 a side (no memory behind it): the size cap must refuse it
     before anything the size of the picture is allocated.
A returned image must be RGB and the size of its input. `ValueError` and `TypeError` are the documented
refusals; anything else is a finding.
"""

from __future__ import annotations

import atheris
import fuzzlib
import numpy as np
from PIL import Image
from visionllm_edge import images
from visionllm_edge.images import load_image

# The pixel cap lowered from 179 M to 4 M pixels for the fuzzer: the same checks and refusals, but a picture
# inside the cap decodes in milliseconds and a few MB, not seconds and up to 1.5 GB (the first 60 s run peaked
# at 1543 MB, near -rss_limit_mb=2048). tests/test_hostile.py tests the production cap.
images.MAX_IMAGE_PIXELS = 1 << 22

#: Pillow modes a caller's PIL image may have.
MODES = ("1", "L", "P", "RGB", "RGBA", "RGBX", "RGBa", "CMYK", "YCbCr", "LAB", "HSV", "LA", "La", "PA", "I",
         "F", "I;16", "I;16B", "I;16L", "I;16N")  # fmt: skip

_FILE = fuzzlib.scratch_dir("vle-fuzz-images-") / "image"


def _size(image) -> tuple[int, int]:
    if isinstance(image, np.ndarray):
        return image.shape[1], image.shape[0]
    return image.size


def TestOneInput(data: bytes) -> None:
    if not data:
        return
    kind = data[0] % 4
    fdp = atheris.FuzzedDataProvider(data[1:])
    bgr = False
    if kind == 0:
        with open(_FILE, "wb") as f:
            f.write(data[1:])
        image = _FILE
    elif kind == 1:
        mode = fdp.PickValueInList(list(MODES))
        size = (fdp.ConsumeIntInRange(0, 48), fdp.ConsumeIntInRange(0, 48))
        try:
            image = Image.frombytes(mode, size, fdp.ConsumeBytes(fdp.remaining_bytes()))
        except ValueError:  # not enough bytes for that mode and size: Pillow's refusal, not ours
            return
    elif kind == 2:
        bgr = fdp.ConsumeBool()
        image = fuzzlib.array(fdp, max_ndim=4, max_side=40)
    else:
        bgr = fdp.ConsumeBool()
        shape = tuple(fdp.ConsumeIntInRange(0, 1 << 17) for _ in range(fdp.ConsumeIntInRange(2, 3)))
        dtype = fdp.PickValueInList(["uint8", "uint16"])
        image = np.broadcast_to(np.zeros((1,) * len(shape), dtype), shape)
    try:
        out = load_image(image, bgr=bgr)
    except (ValueError, TypeError):
        return
    assert isinstance(out, Image.Image) and out.mode == "RGB", (type(out), getattr(out, "mode", None))
    if kind != 0:
        assert out.size == _size(image), (out.size, _size(image))
    assert out.width * out.height > 0


if __name__ == "__main__":
    fuzzlib.main(TestOneInput)
