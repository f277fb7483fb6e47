"""Writes the seed corpora of the Python harnesses, fuzz/corpus/py_<name>/ (committed; run again only to
change them): `python fuzz/python/make_seeds.py ARTIFACT [ARTIFACT...]`, the artifacts being exported ones
whose manifests seed the manifest harness (tiny-random and shapes-tiny were used). The C++ harnesses'
seeds are fuzz/cpp/make_seeds.py's.

  py_images: the first byte 0 and a picture file each: PNG (RGB, 16-bit gray, palette, gray + alpha), JPEG
      (RGB, CMYK), GIF, BMP, 16-bit TIFF, WebP; a PNG whose header claims 16385 x 1 and one claiming more
      pixels than the cap, with a few bytes of data; a truncated PNG; and one input of each other kind.
  py_manifest: each artifact's manifest with its files pointed at the placeholder folder of
      `fuzzlib.make_placeholder_artifact` (sha256 and sizes rewritten), and variants that name the hostile
      entries of that folder, climb out of it, or break the JSON (a duplicate key, NaN, a newer schema
      version, an unknown key, truncation, deep nesting).
  py_pipeline, py_tokenizer, py_results, py_node: bytes from a seeded generator, of several lengths (what
      they decode to is the harness's business; the fuzzer grows them from there).
Inputs that found a fault are added by hand as regression_<what> (kept when this runs again).
"""

from __future__ import annotations

import copy
import hashlib
import io
import json
import random
import struct
import sys
import zlib
from pathlib import Path

import fuzzlib
import numpy as np
from PIL import Image

CORPUS = Path(__file__).resolve().parents[1] / "corpus"


def _png_header_only(width: int, height: int) -> bytes:
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", ihdr)
        + chunk(b"IDAT", zlib.compress(b"\0" * 16))
        + chunk(b"IEND", b"")
    )


def _encoded(image: Image.Image, fmt: str, **kw) -> bytes:
    buf = io.BytesIO()
    image.save(buf, fmt, **kw)
    return buf.getvalue()


def image_seeds() -> dict[str, bytes]:
    rng = np.random.default_rng(0)
    rgb = Image.fromarray(rng.integers(0, 256, (6, 8, 3), dtype=np.uint8), "RGB")
    gray16 = Image.fromarray(rng.integers(0, 65536, (5, 7), dtype=np.uint16))
    files = {
        "rgb.png": _encoded(rgb, "PNG"),
        "gray16.png": _encoded(gray16, "PNG"),
        "palette.png": _encoded(rgb.convert("P"), "PNG"),
        "gray_alpha.png": _encoded(rgb.convert("LA"), "PNG"),
        "rgb.jpg": _encoded(rgb, "JPEG"),
        "cmyk.jpg": _encoded(rgb.convert("CMYK"), "JPEG"),
        "rgb.gif": _encoded(rgb, "GIF"),
        "rgb.bmp": _encoded(rgb, "BMP"),
        "gray16.tif": _encoded(gray16, "TIFF"),
        "rgb.webp": _encoded(rgb, "WEBP"),
        "side_over_cap.png": _png_header_only(16385, 1),
        "pixels_over_cap.png": _png_header_only(16384, 16384),
    }
    files["truncated.png"] = files["rgb.png"][: len(files["rgb.png"]) // 2]
    seeds = {f"file_{name}": b"\0" + data for name, data in files.items()}
    gen = random.Random(0)
    for kind in (1, 2, 3):
        seeds[f"kind{kind}"] = bytes([kind]) + gen.randbytes(200)
    return seeds


def _point_at_placeholders(manifest: dict) -> dict:
    """The manifest with every file entry's sha256 and size those of the placeholder of the same name."""
    files = fuzzlib.placeholder_files()
    out = copy.deepcopy(manifest)

    def sha(name: str) -> str:
        return hashlib.sha256(files[name]).hexdigest()

    for entry in out["graphs"].values():
        entry["sha256"], entry["size_bytes"] = sha(entry["file"]), len(files[entry["file"]])
        entry["external_data"] = [f for f in entry["external_data"] if f in files]
    for entry in (
        out["embeddings"],
        out["tokenizer"],
        out["tokenizer"]["sentencepiece"],
        *out["extra_files"].values(),
    ):
        entry["sha256"] = sha(entry["file"])
    return out


def manifest_seeds(artifacts: list[Path]) -> dict[str, bytes]:
    seeds: dict[str, bytes] = {}
    base = None
    for artifact in artifacts:
        manifest = _point_at_placeholders(json.loads((artifact / "manifest.json").read_text()))
        seeds[f"{manifest['model']['name']}.json"] = json.dumps(manifest).encode()
        base = base or manifest
    text = json.dumps(base)
    for name, path in {
        "outside_link": fuzzlib.OUTSIDE_LINK,
        "device_link": fuzzlib.DEVICE_LINK,
        "fifo": fuzzlib.FIFO,
        "folder": fuzzlib.FOLDER,
        "parent": "../outside-the-artifact.onnx",
        "absolute": "/etc/hostname",
        "sub_folder": "sub/llm.onnx",
        "dot_segments": "sub/../llm.onnx",
    }.items():
        variant = copy.deepcopy(base)
        variant["graphs"]["llm"]["file"] = path
        if path in fuzzlib.placeholder_files():  # so that the parser gets past the size and the hash
            content = fuzzlib.placeholder_files()[path]
            variant["graphs"]["llm"]["sha256"] = hashlib.sha256(content).hexdigest()
            variant["graphs"]["llm"]["size_bytes"] = len(content)
        seeds[f"llm_{name}.json"] = json.dumps(variant).encode()
    external = copy.deepcopy(base)
    external["graphs"]["llm"]["external_data"] = ["llm.onnx.data", "../outside-the-artifact.onnx"]
    seeds["external_data_outside.json"] = json.dumps(external).encode()
    newer = copy.deepcopy(base)
    newer["schema_version"] += 1
    seeds["newer_schema.json"] = json.dumps(newer).encode()
    unknown = copy.deepcopy(base)
    unknown["model"]["context_length"] = 4096
    seeds["unknown_key.json"] = json.dumps(unknown).encode()
    seeds["duplicate_key.json"] = text.replace('"model": {', '"model": {"name": "twice",', 1).encode()
    seeds["nan.json"] = text.replace(
        f'"rope_theta": {json.dumps(base["model"]["rope_theta"])}', '"rope_theta": NaN'
    ).encode()
    seeds["huge_context.json"] = text.replace(
        f'"max_context": {base["model"]["max_context"]}', '"max_context": 9223372036854775807'
    ).encode()
    seeds["truncated.json"] = text[: len(text) // 2].encode()
    seeds["deep.json"] = b"[" * 5000 + b"]" * 5000
    return seeds


def random_seeds(seed: int) -> dict[str, bytes]:
    gen = random.Random(seed)
    return {f"random_{n:04d}": gen.randbytes(n) for n in (16, 64, 128, 256, 512, 1024, 2048, 4000)}


def write(name: str, seeds: dict[str, bytes]) -> None:
    folder = CORPUS / name  # other files there (regression inputs) are kept
    folder.mkdir(parents=True, exist_ok=True)
    for file, data in seeds.items():
        (folder / file).write_bytes(data)
    print(f"{folder}: {len(seeds)} seeds, {sum(map(len, seeds.values()))} bytes")


def main(argv: list[str]) -> int:
    if not argv:
        print(__doc__, file=sys.stderr)
        return 2
    write("py_images", image_seeds())
    write("py_manifest", manifest_seeds([Path(a) for a in argv]))
    for k, name in enumerate(("py_pipeline", "py_tokenizer", "py_results", "py_node")):
        write(name, random_seeds(k))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
