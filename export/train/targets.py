"""Fixed link targets: what the LLM's super-link rows should be for a phrase, before any training.

The staging (decoders first, then the LLM) needs one agreed representation of "the rows that mean
'red circle' to the object decoder". We fix it in advance instead of learning it: every word has a
deterministic Gaussian vector (seeded by the word), a phrase is the normalised sum of its words, and each
of a group's N rows adds a fixed per-row, per-kind offset. The decoders learn to read these rows (with
noise, so they tolerate an imperfect LLM); the LLM learns to write them. Both stages can then train at the
same time, and neither needs the other.
"""

from __future__ import annotations

import zlib
from functools import lru_cache

import numpy as np

#: Words that carry no meaning for a decoder.
STOP_WORDS = frozenset({"a", "an", "the", "make", "of", "in", "on", "is", "it"})
#: Weight of the per-row offset relative to the phrase vector.
ROW_OFFSET = 0.3


@lru_cache(maxsize=4096)
def word_vector(word: str, width: int) -> np.ndarray:
    rng = np.random.default_rng(zlib.crc32(f"word:{word}".encode()))
    return rng.standard_normal(width).astype(np.float32)


@lru_cache(maxsize=256)
def row_offsets(kind: str, rows: int, width: int) -> np.ndarray:
    rng = np.random.default_rng(zlib.crc32(f"rows:{kind}".encode()))
    return rng.standard_normal((rows, width)).astype(np.float32)


def phrase_rows(phrase: str, kind: str, rows: int, width: int) -> np.ndarray:
    """`[rows, width]` float32 target rows for `phrase` behind a routing token of `kind`; RMS 1 per row."""
    words = [w for w in phrase.lower().replace(",", " ").split() if w not in STOP_WORDS]
    if not words:
        raise ValueError(f"phrase {phrase!r} has no content words")
    v = sum(word_vector(w, width) for w in words) / np.sqrt(len(words))
    out = v[None] + ROW_OFFSET * row_offsets(kind, rows, width)
    return (out / np.sqrt((out**2).mean(-1, keepdims=True))).astype(np.float32)
