"""The test tokenizer widened to the release's layout: 32000 SentencePiece pieces, then the 26 added tokens.

The random-weight 7B-width configurations (`visionllmv2-7b`, `visionllmv2-7b-2layer`) have the release's
32026-row embedding and lm_head, but no released tokenizer is on our machines. With the 526-id test tokenizer
their random weights decode ids the runtime rightly refuses ("token id 16485 is outside the vocabulary"). So
they carry this one, built from `tiny_tokenizer` at export time rather than committed:

* pieces 0..499 are the test tokenizer's, unchanged, so any text tokenizes to the same pieces as before;
* pieces 500..31999 are fillers, one character each from the Supplementary Private Use Area-A
  (U+F0000 + k), normal pieces with scores below every real one. Being single characters they create no BPE
  merge, and only text holding those private-use characters can produce them;
* the 26 added tokens follow at 32000..32025 in the official order (`contract.ADDED_TOKENS`), the ids of the
  release (`[GEN]` 32016 and `[EDIT]` 32017, as the release's `sd_config` / `ip2p_config.trigger_token_id`).

The folder is written once into the user's cache (`$XDG_CACHE_HOME/visionllm-edge/tokenizers/`), named after
a hash of the source files and of this layout, through a temporary folder and a rename.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from pathlib import Path

from visionllm_edge import contract

#: The name a configuration's `visionllm_edge.tokenizer` gives to ask for this tokenizer.
WIDE_TOKENIZER = "tiny_tokenizer_wide"
#: The bundled folder it is made from.
SOURCE_TOKENIZER = "tiny_tokenizer"
#: SentencePiece pieces of the release (Vicuna-7B-v1.5's Llama tokenizer); the added tokens follow.
BASE_PIECES = 32000
#: First code point of the fillers: Supplementary Private Use Area-A (U+F0000..U+FFFFD), 65534 characters.
FILLER_START = 0xF0000
#: Bumped whenever the layout below changes, so that a cached folder of an older layout is not reused.
LAYOUT_VERSION = 1

_NORMAL = 1  # sentencepiece ModelProto.SentencePiece.Type.NORMAL


def filler_piece(piece_id: int, base: int) -> str:
    """The piece of filler id `piece_id` (base <= piece_id < BASE_PIECES) for a source of `base` pieces."""
    return chr(FILLER_START + piece_id - base)


def _model_pb2():
    from sentencepiece import sentencepiece_model_pb2

    return sentencepiece_model_pb2


def widen_model(model_bytes: bytes, pieces: int = BASE_PIECES) -> bytes:
    """The serialized SentencePiece model with filler pieces appended up to `pieces`."""
    proto = _model_pb2().ModelProto()
    proto.ParseFromString(model_bytes)
    base = len(proto.pieces)
    if not base < pieces <= base + (0xFFFFD - FILLER_START + 1):
        raise ValueError(f"cannot widen a {base}-piece sentencepiece model to {pieces} pieces")
    existing = {p.piece for p in proto.pieces}
    lowest = min(p.score for p in proto.pieces)
    for piece_id in range(base, pieces):
        text = filler_piece(piece_id, base)
        if text in existing:
            raise ValueError(f"the source model already has the filler piece U+{ord(text):X}")
        new = proto.pieces.add()
        new.piece, new.type, new.score = text, _NORMAL, lowest - 1 - (piece_id - base)
    proto.trainer_spec.vocab_size = pieces
    return proto.SerializeToString()


def _shifted_files(source: Path, base: int, pieces: int) -> dict[str, str]:
    """The JSON files with every added token's id moved from base + k to pieces + k (<unk>, <s>, </s> are
    pieces of the model and keep theirs)."""

    def move(idx: int) -> int:
        return idx if idx < base else idx - base + pieces

    config = json.loads((source / "tokenizer_config.json").read_text())
    decoder = config["added_tokens_decoder"]
    config["added_tokens_decoder"] = {str(move(int(k))): v for k, v in decoder.items()}
    added = {name: move(idx) for name, idx in json.loads((source / "added_tokens.json").read_text()).items()}
    want = {name: pieces + k for k, name in enumerate(contract.ADDED_TOKENS)}
    wrong = {name: added.get(name) for name in want if added.get(name) != want[name]}
    if wrong:
        raise ValueError(f"{source}: added tokens out of the official order after widening: {wrong}")

    def dump(value: dict) -> str:
        return json.dumps(value, indent=2, sort_keys=True, ensure_ascii=False) + "\n"

    return {
        "tokenizer_config.json": dump(config),
        "added_tokens.json": dump(added),
        "special_tokens_map.json": (source / "special_tokens_map.json").read_text(),
    }


def write_wide_tokenizer(source: str | Path, out: str | Path, pieces: int = BASE_PIECES) -> Path:
    """Writes the widened tokenizer folder `out` (must not exist) from the tokenizer folder `source`."""
    source, out = Path(source), Path(out)
    model = (source / "tokenizer.model").read_bytes()
    proto = _model_pb2().ModelProto()
    proto.ParseFromString(model)
    files = _shifted_files(source, len(proto.pieces), pieces)
    out.mkdir(parents=True)
    (out / "tokenizer.model").write_bytes(widen_model(model, pieces))
    for name, text in files.items():
        (out / name).write_text(text)
    return out


def _source_key(source: Path) -> str:
    digest = hashlib.sha256(f"layout {LAYOUT_VERSION} pieces {BASE_PIECES}\n".encode())
    for name in ("tokenizer.model", "tokenizer_config.json", "added_tokens.json", "special_tokens_map.json"):
        digest.update(name.encode() + b"\0" + (source / name).read_bytes())
    return digest.hexdigest()[:16]


def wide_tokenizer_dir(cache: str | Path | None = None) -> Path:
    """The widened test tokenizer's folder, made on first use (the same files on every machine)."""
    from visionllm_edge.demo import cache_root
    from visionllm_edge.export.config import data_path

    source = data_path(SOURCE_TOKENIZER)
    root = Path(cache) if cache is not None else cache_root() / "tokenizers"
    folder = root / f"{WIDE_TOKENIZER}-{_source_key(source)}"
    if folder.is_dir():
        return folder
    root.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{folder.name}.", dir=root))
    try:
        write_wide_tokenizer(source, tmp / "t")
        try:
            os.replace(tmp / "t", folder)
        except OSError:
            if not folder.is_dir():  # not another process having written the same folder first
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return folder
