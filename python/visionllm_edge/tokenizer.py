"""The device-side tokenizer: `tokenizer.json` read with the `tokenizers` library, no torch, no transformers.

The reference side (`visionllm_edge.export.tokenizer.ChatTokenizer`) tokenises with the slow sentencepiece
`LlamaTokenizer`. A fast tokenizer used the ordinary way (`Tokenizer.encode`) does not give the same ids in
every case: it splits added tokens with its own whitespace rules, and it cannot leave a special token that
a user typed as text. So this class does what `ChatTokenizer` does, step by step: it splits on special
tokens itself (same leftmost-longest match, same `lstrip`/`rstrip` handling, same protected-span rule) and
replaces only the innermost step, `sentencepiece.encode`, by the BPE model stored in `tokenizer.json`
(`Tokenizer.model.tokenize`, which bypasses the normalizer, the pre-tokenizer and the added tokens). The
slow tokenizer's own wrapping around that step (the `"▁"` prefix and the `<unk>` trick of `legacy=False`,
the dummy prefix of `legacy=True`, the rule that drops a lone `"▁"` before a leading special token) is
reproduced here literally. `export/tokenizer_convert.py` writes a `tokenizer.json` whose BPE model gives the
same pieces as sentencepiece, and records the settings below in the file's own structure.

Settings read from `tokenizer.json` (written by `convert_tokenizer`, the layout `LlamaConverter` uses):

* `legacy=False`: no normalizer, a `Metaspace` pre-tokenizer; `prepend_scheme` `"first"` means the slow
  tokenizer's `add_prefix_space=True`, `"never"` means False.
* `legacy=True`: no pre-tokenizer, a normalizer `[Prepend("▁")?, Replace(" ", "▁")]`; the `Prepend` is
  there when the sentencepiece model has `add_dummy_prefix`.
* The decoder ends with `Strip(" ", 1, 0)` when `add_prefix_space` is set.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path

from visionllm_edge import contract

SPIECE_UNDERLINE = "\u2581"
#: Marker for an `<image>` position inside a token list before it is expanded to patch tokens (the value
#: the official `tokenizer_image_token` uses; `visionllm_edge.export.tokenizer` uses the same).
IMAGE_SENTINEL = -200


@dataclass(frozen=True)
class Span:
    """A half-open character range `[start, end)` of user-written text."""

    start: int
    end: int


@dataclass(frozen=True)
class TokenizerSettings:
    """The slow tokenizer's settings that change how text is split into pieces and joined back.

    Attributes:
        legacy: `LlamaTokenizer.legacy`.
        add_prefix_space: `LlamaTokenizer.add_prefix_space` (prefix `"▁"` before the text when not legacy;
            strip it again when decoding).
        add_dummy_prefix: whether the sentencepiece model the slow tokenizer runs puts a "▁" in front of
            each text: the model's own flag when `legacy`, always off otherwise (`legacy=False` loads the
            model with it switched off).
        clean_up_tokenization_spaces: `PreTrainedTokenizer.clean_up_tokenization_spaces`, for `decode`.
    """

    legacy: bool = False
    add_prefix_space: bool = True
    add_dummy_prefix: bool = False
    clean_up_tokenization_spaces: bool = False


def settings_from_tokenizer_json(data: dict) -> TokenizerSettings:
    """Reads the tokenizer settings from the structure of a parsed `tokenizer.json`.

    Raises:
        ValueError: the layout is not one `convert_tokenizer` (or `LlamaConverter`) writes.
    """
    model = data.get("model") or {}
    if model.get("type") != "BPE" or not model.get("byte_fallback"):
        raise ValueError(
            "tokenizer.json: expected a BPE model with byte_fallback (a converted Llama tokenizer)"
        )
    normalizer, pre = data.get("normalizer"), data.get("pre_tokenizer")
    decoder_steps = (data.get("decoder") or {}).get("decoders") or []
    strips = bool(decoder_steps) and decoder_steps[-1].get("type") == "Strip"
    if pre is not None:
        if (
            normalizer is not None
            or pre.get("type") != "Metaspace"
            or pre.get("replacement") != SPIECE_UNDERLINE
            or pre.get("split", True)
            or pre.get("prepend_scheme") not in ("first", "never")
        ):
            raise ValueError(
                f"tokenizer.json: unsupported pre_tokenizer {pre!r} (with normalizer {normalizer!r})"
            )
        return TokenizerSettings(legacy=False, add_prefix_space=pre["prepend_scheme"] == "first")
    steps = (normalizer or {}).get("normalizers") or []
    kinds = [s.get("type") for s in steps]
    if kinds not in (["Replace"], ["Prepend", "Replace"]) or (
        kinds[0] == "Prepend" and steps[0].get("prepend") != SPIECE_UNDERLINE
    ):
        raise ValueError(f"tokenizer.json: unsupported normalizer {normalizer!r} without a pre_tokenizer")
    replace = steps[-1]
    if replace.get("pattern") != {"String": " "} or replace.get("content") != SPIECE_UNDERLINE:
        raise ValueError(f"tokenizer.json: unsupported Replace step {replace!r}")
    return TokenizerSettings(legacy=True, add_prefix_space=strips, add_dummy_prefix=kinds[0] == "Prepend")


class RuntimeTokenizer:
    """Tokenisation identical to `ChatTokenizer` (the slow `LlamaTokenizer`), from a `tokenizer.json`.

    Args:
        path: the `tokenizer.json` written by `visionllm_edge.export.tokenizer_convert.convert_tokenizer`.
        settings: overrides the settings read from the file (see `settings_from_tokenizer_json`).

    Raises:
        FileNotFoundError: `path` does not exist.
        ValueError: the file's layout is not supported, or it lacks the VisionLLM v2 special tokens.
    """

    def __init__(self, path: str | Path, settings: TokenizerSettings | None = None):
        from tokenizers import Tokenizer

        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"{path}: no such tokenizer.json")
        data = json.loads(path.read_text(encoding="utf-8"))
        self.settings = settings or settings_from_tokenizer_json(data)
        self.path = path
        self._tok = Tokenizer.from_file(str(path))
        self._model = self._tok.model
        # The special-token table comes from the file's `added_tokens`, with the flags the slow tokenizer
        # splits by (the fast tokenizer's own matching is not used, see the module docstring).
        self._special: dict[str, int] = {}
        self._strip: dict[str, tuple[bool, bool]] = {}
        self._all_special: set[str] = set()
        for added in data.get("added_tokens") or []:
            content = added["content"]
            self._special[content] = int(added["id"])
            self._strip[content] = (bool(added.get("lstrip")), bool(added.get("rstrip")))
            if added.get("special"):
                self._all_special.add(content)
        missing = [t for t in (*contract.ADDED_TOKENS, "<s>", "</s>", "<unk>") if t not in self._special]
        if missing:
            raise ValueError(f"{path}: tokenizer lacks the special tokens {missing}")
        ordered = sorted(self._special, key=len, reverse=True)
        self._pattern = re.compile("|".join(re.escape(t) for t in ordered))
        self.bos_id = self._special[contract.BOS_TOKEN]
        self.eos_id = self._special[contract.EOS_TOKEN]
        unk = data["model"].get("unk_token") or "<unk>"
        self._unk_token = unk
        self._unk_length = len(self._sp_encode(unk))
        vocab = self._tok.get_vocab(with_added_tokens=True)
        self._id_to_piece = {i: p for p, i in vocab.items()}
        self._base_size = self._tok.get_vocab_size(with_added_tokens=False)
        self._base_vocab = {p: i for p, i in vocab.items() if i < self._base_size}
        # The sentencepiece model's control pieces (`<s>`, `</s>`) are the base pieces the slow tokenizer
        # registered as added tokens, bar `<unk>` (the converter refuses user-defined pieces).
        self._control = {t for t, i in self._special.items() if i < self._base_size and t != unk}
        # The added tokens `PreTrainedTokenizer._decode` keeps out of `convert_tokens_to_string`: the
        # non-special ones and the special ones past the sentencepiece vocabulary. (transformers takes the
        # latter from `additional_special_tokens` only; tokenizer.json cannot tell those from a named
        # special token such as a pad token; the golden checkpoint lists every added token there.)
        self._decode_apart = {
            t for t, i in self._special.items() if t not in self._all_special or i >= self._base_size
        }

    # --- ids -------------------------------------------------------------------------------------------

    def token_id(self, token: str) -> int:
        """Id of a special token such as `[DET]`.

        Raises:
            KeyError: `token` is not a special (added) token.
        """
        try:
            return self._special[token]
        except KeyError:
            raise KeyError(f"{token!r} is not a special token of this tokenizer") from None

    @property
    def vocab_size(self) -> int:
        """Size of the whole vocabulary, added tokens included (`len(tokenizer)`)."""
        return self._tok.get_vocab_size(with_added_tokens=True)

    # --- the sentencepiece step ----------------------------------------------------------------------------

    def _sp_encode(self, text: str) -> list[tuple[str, int]]:
        """`sp_model.encode(text, out_type=str)` of the slow tokenizer's sentencepiece model, with ids.

        The model's normalizer is the identity (checked by the converter), so sentencepiece only turns
        spaces into "▁" and, when the dummy prefix is on (only for `legacy=True`), puts one "▁" in front.
        """
        if not text:
            return []
        text = text.replace(" ", SPIECE_UNDERLINE)
        if self.settings.add_dummy_prefix:
            text = SPIECE_UNDERLINE + text
        return [(t.value, t.id) for t in self._model.tokenize(text)]

    def _text_pieces(self, text: str) -> list[tuple[str, int]]:
        """`LlamaTokenizer._tokenize`.

        For `legacy=False`, text that starts with "▁" or a space is encoded behind an `<unk>` whose pieces
        are then dropped, so that sentencepiece sees the "▁" as a word start.
        """
        if self.settings.legacy or not text.startswith((SPIECE_UNDERLINE, " ")):
            return self._sp_encode(text)
        pieces = self._sp_encode(self._unk_token + text)
        return pieces[self._unk_length :] if len(pieces) >= self._unk_length else pieces

    # --- tokenisation ----------------------------------------------------------------------------------

    def _split(self, text: str, protected: list[Span]) -> list[tuple[str, bool]]:
        """Splits `text` at special tokens, skipping non-marker tokens inside protected spans.

        Returns (piece, is_special) pairs after the added tokens' lstrip/rstrip handling; the same rule as
        `ChatTokenizer._split` and `PreTrainedTokenizer.tokenize`.
        """
        pieces: list[list] = []
        pos = 0
        for m in self._pattern.finditer(text):
            token = m.group(0)
            inside = any(s.start <= m.start() and m.end() <= s.end for s in protected)
            if inside and token not in contract.INPUT_MARKERS:
                continue
            if m.start() > pos:
                pieces.append([text[pos : m.start()], False])
            pieces.append([token, True])
            pos = m.end()
        if pos < len(text):
            pieces.append([text[pos:], False])
        # Left to right, each special token strips its neighbours' whitespace by its own flags; Python's
        # str.strip, as the slow tokenizer uses (its idea of whitespace differs from the fast tokenizer's).
        for i, (piece, special) in enumerate(pieces):
            if not special:
                continue
            lstrip, rstrip = self._strip[piece]
            if rstrip and i + 1 < len(pieces) and pieces[i + 1][0]:
                pieces[i + 1][0] = pieces[i + 1][0].lstrip()
            if lstrip and i > 0 and pieces[i - 1][0]:
                pieces[i - 1][0] = pieces[i - 1][0].rstrip()
        return [(p, s) for p, s in pieces if p]

    def encode_text(
        self, text: str, protected_spans: tuple[Span, ...] | list[Span] = (), add_bos: bool = True
    ) -> list[int]:
        """Token ids of `text`, as the slow `tokenizer(text).input_ids` gives them.

        Args:
            text: the text; special tokens in it act as tokens except inside `protected_spans`.
            protected_spans: character ranges of user-written text, where only `<image>`, `<region>`,
                `<reg>` and `</reg>` act as tokens and every other special-token string stays text.
            add_bos: put the BOS id first.

        Returns:
            The ids.
        """
        protected = list(protected_spans)
        tokens: list[tuple[str, int]] = []
        if text:
            if not self.settings.legacy:
                text = text.replace(SPIECE_UNDERLINE, " ")
                if self.settings.add_prefix_space:
                    text = SPIECE_UNDERLINE + text
                    protected = [Span(s.start + 1, s.end + 1) for s in protected]
            for piece, special in self._split(text, protected):
                if special:
                    tokens.append((piece, self._special[piece]))
                else:
                    tokens.extend(self._text_pieces(piece))
            # `LlamaTokenizer.tokenize` (legacy=False) drops the prefix "▁" when a special token follows it.
            if (
                not self.settings.legacy
                and len(tokens) > 1
                and tokens[0][0] == SPIECE_UNDERLINE
                and tokens[1][0] in self._all_special
            ):
                tokens = tokens[1:]
        # The slow tokenizer maps pieces back to ids by their string, so a piece spelled like an added
        # token gets that token's id.
        ids = [self._special.get(piece, idx) for piece, idx in tokens]
        return ([self.bos_id] if add_bos else []) + ids

    def tokenize_with_image(self, prompt: str, protected: tuple[Span, ...] | list[Span] = ()) -> list[int]:
        """The official `tokenizer_image_token`, as `ChatTokenizer.tokenize_with_image`.

        Each chunk between `<image>`s is tokenised on its own with its BOS removed, `IMAGE_SENTINEL` goes
        where each `<image>` was, and one BOS starts the list.

        Args:
            prompt: the templated text.
            protected: user-text spans of `prompt` (see `encode_text`).

        Returns:
            The ids, with `IMAGE_SENTINEL` for each `<image>`.
        """
        chunks: list[list[int]] = []
        start = 0
        for part in prompt.split(contract.IMAGE_TOKEN):
            local = [
                Span(max(s.start, start) - start, min(s.end, start + len(part)) - start) for s in protected
            ]
            local = [s for s in local if s.end > s.start]
            chunks.append(self.encode_text(part, local) if part else [self.bos_id])
            start += len(part) + len(contract.IMAGE_TOKEN)
        ids: list[int] = []
        offset = 0
        if chunks and chunks[0] and chunks[0][0] == self.bos_id:
            offset = 1
            ids.append(self.bos_id)
        for i, chunk in enumerate(chunks):
            if i > 0:
                ids.append(IMAGE_SENTINEL)
            ids.extend(chunk[offset:])
        return ids

    # --- decoding --------------------------------------------------------------------------------------

    def _sp_decode(self, pieces: list[str]) -> str:
        """`SentencePieceProcessor.decode(pieces)` (sentencepiece 0.2), rule for rule.

        The fast tokenizer's decoders differ in corner cases that the slow decode reaches: a run of byte
        pieces that is not valid UTF-8 (sentencepiece replaces byte by byte, `ByteFallback` the whole run),
        and strings that are not pieces (`convert_tokens_to_string` strips the "▁" off the first token, and
        sentencepiece then returns such a string verbatim, "▁"s included).
        """
        strip_bos_ws = self.settings.add_dummy_prefix
        text = ""
        pending = bytearray()
        is_bos_ws, bos_ws_seen = True, False
        for piece in pieces:
            if piece not in self._control and _BYTE_PIECE.fullmatch(piece) and piece in self._base_vocab:
                pending.append(int(piece[3:5], 16))
                continue
            text += _decode_bytes(pending)
            pending.clear()
            if bos_ws_seen or text:
                is_bos_ws = False
            bos_ws_seen = False
            if piece in self._control:
                continue
            if piece not in self._base_vocab or piece == self._unk_token:
                # An unknown piece: `<unk>` itself shows as the unknown surface, anything else verbatim.
                text += _UNK_SURFACE if piece == self._unk_token else piece
                continue
            if is_bos_ws and strip_bos_ws and piece.startswith(SPIECE_UNDERLINE):
                piece, bos_ws_seen = piece[1:], True
            text += piece.replace(SPIECE_UNDERLINE, " ")
        return text + _decode_bytes(pending)

    def _tokens_to_string(self, tokens: list[str]) -> str:
        """`LlamaTokenizer.convert_tokens_to_string` (transformers 4.57)."""
        tokens = list(tokens)
        if tokens[0].startswith(SPIECE_UNDERLINE) and self.settings.add_prefix_space:
            tokens[0] = tokens[0][1:]
        current: list[str] = []
        out = ""
        prev_is_special = False
        for i, token in enumerate(tokens):
            if token in self._all_special:
                if not prev_is_special and i != 0 and self.settings.legacy:
                    out += " "
                out += self._sp_decode(current) + token
                prev_is_special = True
                current = []
            else:
                if (
                    prev_is_special
                    and i == 1
                    and self.settings.add_prefix_space
                    and not token.startswith(SPIECE_UNDERLINE)
                ):
                    out += " "
                current.append(token)
                prev_is_special = False
        return out + self._sp_decode(current)

    def decode(self, ids, skip_special_tokens: bool = False) -> str:
        """Text of `ids`, as the slow tokenizer's `decode(ids)` gives it (`ChatTokenizer.decode`).

        Args:
            ids: token ids.
            skip_special_tokens: leave out special tokens.

        Returns:
            The text.

        Raises:
            ValueError: an id is outside the vocabulary.
        """
        tokens = []
        for i in ids:
            piece = self._id_to_piece.get(int(i))
            if piece is None:
                raise ValueError(f"token id {int(i)} is outside the vocabulary (size {self.vocab_size})")
            tokens.append(piece)
        # `PreTrainedTokenizer._decode`: the added tokens past the base vocabulary are kept apart, the runs
        # between them go through `convert_tokens_to_string`, and the parts are joined with a space
        # (`spaces_between_special_tokens` defaults to True in `decode`).
        parts: list[str] = []
        run: list[str] = []
        for token in tokens:
            if skip_special_tokens and token in self._all_special:
                continue
            if token in self._decode_apart:
                if run:
                    text = self._tokens_to_string(run)
                    if text:
                        parts.append(text)
                    run = []
                parts.append(token)
            else:
                run.append(token)
        if run:
            parts.append(self._tokens_to_string(run))
        text = " ".join(parts)
        if self.settings.clean_up_tokenization_spaces:
            text = _clean_up_tokenization(text)
        return text


_BYTE_PIECE = re.compile(r"<0x[0-9A-F]{2}>")
#: sentencepiece's default `unk_surface` (" \u2047 ").
_UNK_SURFACE = " \u2047 "


def _decode_bytes(data: bytes) -> str:
    """UTF-8 as sentencepiece decodes byte pieces: each byte that does not start a valid character becomes
    one U+FFFD (Python's `errors="replace"` would replace a whole truncated sequence with one)."""
    out = []
    pos = 0
    while pos < len(data):
        for size in (1, 2, 3, 4):
            try:
                out.append(bytes(data[pos : pos + size]).decode("utf-8"))
            except UnicodeDecodeError:
                continue
            pos += size
            break
        else:
            out.append("\ufffd")
            pos += 1
    return "".join(out)


def _clean_up_tokenization(text: str) -> str:
    """`PreTrainedTokenizerBase.clean_up_tokenization`."""
    for a, b in ((" .", "."), (" ?", "?"), (" !", "!"), (" ,", ","), (" ' ", "'"), (" n't", "n't")):
        text = text.replace(a, b)
    for a, b in ((" 'm", "'m"), (" 's", "'s"), (" 've", "'ve"), (" 're", "'re")):
        text = text.replace(a, b)
    return text
