"""COCO encodings without pycocotools: uncompressed RLE masks (pycocotools reads them as ground truth)."""

from __future__ import annotations

import numpy as np


def encode_mask(mask: np.ndarray) -> dict:
    """`H x W` bool mask -> uncompressed COCO RLE `{"size": [h, w], "counts": [...]}` (column-major runs,
    starting with a run of zeros)."""
    mask = np.asarray(mask, dtype=bool)
    if mask.ndim != 2:
        raise ValueError(f"mask: expected H x W, got shape {mask.shape}")
    flat = mask.T.reshape(-1).astype(np.int8)
    change = np.flatnonzero(np.diff(flat)) + 1
    edges = np.concatenate([[0], change, [flat.size]])
    counts = np.diff(edges).tolist()
    if flat.size and flat[0] == 1:
        counts = [0, *counts]
    return {"size": [int(mask.shape[0]), int(mask.shape[1])], "counts": [int(c) for c in counts]}


def decode_mask(rle: dict) -> np.ndarray:
    """Inverse of `encode_mask`."""
    h, w = rle["size"]
    flat = np.zeros(h * w, dtype=bool)
    at, value = 0, False
    for c in rle["counts"]:
        flat[at : at + c] = value
        at += c
        value = not value
    if at != h * w:
        raise ValueError(f"RLE counts sum to {at}, expected {h * w} for size {h}x{w}")
    return flat.reshape(w, h).T
