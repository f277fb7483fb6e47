"""Writes the seed corpora of the C++ harnesses (fuzz/corpus/<name>/) that are made rather than copied
(run from the repository root with .venv/bin/python fuzz/cpp/make_seeds.py; the output is committed).
The manifest seeds are the tiny-random and shapes-tiny exports' manifest.json (shapes-tiny's file sizes
set to tiny-random's, so both pass the harness's stub files), and embeddings_tiny_random.safetensors is
tiny-random's embeddings file; the rest is written here: safetensors files of every dtype and layout the reader meets, images of every mode
and format the decoder takes, prompts with every special token, and a few byte strings for the
structure-reading harnesses (region, router, postprocess). The regression_* entries are crash inputs the
fuzzers found, kept as found.

Inputs of harnesses that read parameters with FuzzedDataProvider take them from the END of the input
(integers) and the text from the front; fuzz_image takes a 16-byte parameter prefix before the file.
"""
import io
import json
import struct
from pathlib import Path

import numpy as np
from PIL import Image

ROOT = Path(__file__).resolve().parent.parent / "corpus"
SPECIALS = ["<s>", "</s>", "<unk>", "[PAD]", "<image>", "<im_patch>", "<region>", "<img>", "</img>", "<reg>",
            "</reg>", "<det>", "</det>", "<grd>", "</grd>", "[DET]", "[GRD]", "[SEG]", "[POSE]", "[GEN]",
            "[EDIT]", "[EMB]", "[EMB2]", "[EMB3]", "[EMB4]", "[EMB5]", "[EMB6]", "[EMB7]", "[EMB8]"]


def write(folder, name, data):
    path = ROOT / folder
    path.mkdir(parents=True, exist_ok=True)
    (path / name).write_bytes(data)


def safetensors(tensors, metadata=None):
    header, blobs, offset = {}, [], 0
    for name, array, dtype in tensors:
        raw = array.tobytes()
        header[name] = {"dtype": dtype, "shape": list(array.shape), "data_offsets": [offset, offset + len(raw)]}
        blobs.append(raw)
        offset += len(raw)
    if metadata:
        header["__metadata__"] = metadata
    text = json.dumps(header).encode()
    text += b" " * (-len(text) % 8)  # the data 8-byte aligned, as the format's writers do
    return struct.pack("<Q", len(text)) + text + b"".join(blobs)


def safetensors_seeds():
    rng = np.random.default_rng(0)
    write("safetensors", "f32_two.safetensors", safetensors(
        [("token_embeddings", rng.standard_normal((8, 4)).astype("<f4"), "F32"),
         ("queries.det", rng.standard_normal((4, 4)).astype("<f4"), "F32")], {"format": "pt"}))
    write("safetensors", "dtypes.safetensors", safetensors(
        [("f16", rng.standard_normal((3, 2)).astype("<f2"), "F16"),
         ("bf16", (rng.integers(0, 1 << 16, (2, 3))).astype("<u2"), "BF16"),
         ("f64", rng.standard_normal((2,)).astype("<f8"), "F64"),
         ("i64", np.arange(3, dtype="<i8"), "I64"),
         ("i32", np.arange(4, dtype="<i4"), "I32"),
         ("bool", np.array([1, 0, 1], np.uint8), "BOOL"),
         ("u8", np.arange(5, dtype=np.uint8), "U8")]))
    write("safetensors", "scalar_and_empty.safetensors", safetensors(
        [("scalar", np.array(1.5, "<f4"), "F32"), ("empty", np.zeros((0, 4), "<f4"), "F32")]))
    write("safetensors", "nonfinite.safetensors", safetensors(
        [("t", np.array([np.nan, np.inf, -np.inf, 1e38], "<f4"), "F32")]))


def images():
    rng = np.random.default_rng(1)
    rgb = Image.fromarray(rng.integers(0, 256, (6, 8, 3), dtype=np.uint8), "RGB")
    out = {}
    for mode in ["RGB", "RGBA", "L", "LA", "P", "1"]:
        buf = io.BytesIO()
        rgb.convert(mode).save(buf, "PNG")
        out[f"{mode.lower()}.png"] = buf.getvalue()
    buf = io.BytesIO()
    Image.fromarray((rng.integers(0, 1 << 16, (6, 8))).astype(np.uint16)).save(buf, "PNG")
    out["gray16.png"] = buf.getvalue()
    for name, kwargs in [("baseline.jpg", {}), ("progressive.jpg", {"progressive": True}),
                         ("subsampled.jpg", {"subsampling": 2, "quality": 50})]:
        buf = io.BytesIO()
        rgb.save(buf, "JPEG", **kwargs)
        out[name] = buf.getvalue()
    buf = io.BytesIO()
    rgb.convert("CMYK").save(buf, "JPEG")
    out["cmyk.jpg"] = buf.getvalue()
    buf = io.BytesIO()
    rgb.convert("L").save(buf, "JPEG")
    out["gray.jpg"] = buf.getvalue()
    for mode in ["RGB", "P", "L", "1"]:
        buf = io.BytesIO()
        rgb.convert(mode).save(buf, "BMP")
        out[f"{mode.lower()}.bmp"] = buf.getvalue()
    buf = io.BytesIO()
    rgb.convert("RGBA").save(buf, "BMP")
    out["rgba.bmp"] = buf.getvalue()
    # A PNG whose header claims 16384 x 16384 (above the pixel cap) with one row of data: refused from the header.
    png = out["rgb.png"]
    bomb = bytearray(png)
    ihdr = png.index(b"IHDR")
    bomb[ihdr + 4:ihdr + 12] = struct.pack(">II", 16384, 16384)
    out["bomb_header.png"] = bytes(bomb)
    # The 16-byte parameter prefix: byte values that pick the file path and mid-range sizes.
    params = bytes([1, 7, 200, 3, 2, 2, 90, 130, 31, 0, 64, 64, 5, 9, 17, 33])
    for name, data in out.items():
        write("image", name, params + data)
    # Camera frames: the parameter prefix picks the frame path (first byte 0), the data follows.
    frame = bytes([0, 2, 8, 6, 3, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0])
    write("image", "frame_rgb8", frame + rng.integers(0, 256, 8 * 6 * 3, dtype=np.uint8).tobytes())


def tokenizer_seeds():
    # The last byte picks the entry point (0 encode, 1 <image> path, 2 decode, 3 conversation, 4 placeholders).
    texts = {
        "specials": " ".join(SPECIALS),
        "prompt": "<image>\nPlease detect the red circle and the <region> in the image.",
        "answer": "<det>red circle</det>[DET][EMB][EMB2][EMB3][EMB4], and a square[DET].",
        "unicode": "caf\u00e9 \u6f22\u5b57 \U0001f600 \u0130stanbul \u212a \u00a0\u2003tab\tnew\nline",
        "markers": "<reg></reg><reg><region></reg><image><image> <im_patch>",
    }
    for mode in range(5):
        for name, text in texts.items():
            write("tokenizer", f"{name}_{mode}", text.encode() + bytes([0, 0, mode]))
    write("tokenizer", "invalid_utf8_0", b"ok \xff\xfe \xc3\x28 \xe2\x82 \xf0\x9f\x98 \xed\xa0\x80 end" + bytes([0, 0, 0]))
    write("tokenizer", "ids_2", bytes(range(0, 64)) + bytes([0, 2]))


def structure_seeds():
    rng = np.random.default_rng(2)
    for harness in ["region", "router", "postprocess"]:
        for i in range(4):
            write(harness, f"random_{i}", rng.integers(0, 256, 64 + 96 * i, dtype=np.uint8).tobytes())
    # Floats the decoders may emit, as little-endian words: NaN, inf, -inf, huge, denormal, zero, one.
    words = struct.pack("<7f", float("nan"), float("inf"), float("-inf"), 3e38, 1e-45, 0.0, 1.0)
    write("postprocess", "nonfinite", words * 12)


if __name__ == "__main__":
    safetensors_seeds()
    images()
    tokenizer_seeds()
    structure_seeds()
