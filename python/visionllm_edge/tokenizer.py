"""The device-side tokenizer: a thin layer over the C++ tokenizer (`_core.Tokenizer`); no torch, no
transformers.

The reference side (`visionllm_edge.export.tokenizer.ChatTokenizer`) tokenises with the slow sentencepiece
`LlamaTokenizer`. The C++ tokenizer (csrc/tokenizer/) gives the same ids: SentencePiece's C++ library on the
artifact's `tokenizer.model` (written by `visionllm_edge.export.tokenizer_convert.convert_tokenizer` with the
slow tokenizer's settings baked in) does the innermost step, and the slow tokenizer's own logic around it
is reproduced there: the split at added tokens (leftmost-longest), their `lstrip`/`rstrip` with Python's
whitespace, the protected spans of user text where only `<image>`, `<region>`, `<reg>`, `</reg>` act as
tokens, the `"▁"` prefix and the `<unk>` trick of `legacy=False`, and the decode rules of
`convert_tokens_to_string` and sentencepiece (byte pieces, U+FFFD). `tokenizer.json` gives the added
tokens and records `legacy` and `add_prefix_space` in its structure (`LlamaConverter`'s layout).

Spans here are character offsets (Python string indices); the binding converts them to the byte offsets
of the C++ side.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from visionllm_edge import _core, contract

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
            each text: the model's own flag when `legacy`, always off otherwise.
    """

    legacy: bool = False
    add_prefix_space: bool = True
    add_dummy_prefix: bool = False


def _pairs(spans) -> list[tuple[int, int]]:
    return [(int(s.start), int(s.end)) for s in spans]


class RuntimeTokenizer:
    """Tokenisation identical to `ChatTokenizer` (the slow `LlamaTokenizer`), from the artifact's files.

    Args:
        path: the `tokenizer.json` written by `convert_tokenizer`.
        sentencepiece: the `tokenizer.model` written with it; default `tokenizer.model` beside `path`.
        expected_ids: special token -> id (the manifest's `tokens`); each must agree with the files.
        legacy, add_prefix_space: the manifest's flags, checked against the file's layout; None takes them
            from the file.

    Raises:
        FileNotFoundError: a file does not exist.
        ValueError: a file's layout is not supported, it lacks the VisionLLM v2 special tokens, or the files
            disagree with each other or with `expected_ids` / the flags ("tokenizer mismatch").
    """

    def __init__(
        self,
        path: str | Path,
        sentencepiece: str | Path | None = None,
        *,
        expected_ids: dict[str, int] | None = None,
        legacy: bool | None = None,
        add_prefix_space: bool | None = None,
    ):
        path = Path(path)
        model = (
            Path(sentencepiece) if sentencepiece is not None else path.with_name(contract.SENTENCEPIECE_FILE)
        )
        for file, what in ((path, "tokenizer.json"), (model, "tokenizer.model")):
            if not file.is_file():
                raise FileNotFoundError(f"{file}: no such {what}")
        self.path = path
        self.sentencepiece_path = model
        self._core = _core.Tokenizer(
            str(path), str(model), dict(expected_ids or {}), legacy=legacy, add_prefix_space=add_prefix_space
        )
        self.settings = TokenizerSettings(
            legacy=self._core.legacy,
            add_prefix_space=self._core.add_prefix_space,
            add_dummy_prefix=self._core.add_dummy_prefix,
        )
        self.bos_id: int = self._core.bos_id
        self.eos_id: int = self._core.eos_id

    @classmethod
    def from_manifest(cls, manifest) -> RuntimeTokenizer:
        """The tokenizer of a parsed artifact manifest (`visionllm_edge.manifest.Manifest`): its
        `tokenizer.json` and `tokenizer.sentencepiece` files, checked against its token table and flags."""
        info = manifest.tokenizer
        return cls(
            info.path,
            info.sentencepiece.path,
            expected_ids=dict(manifest.tokens),
            legacy=info.legacy,
            add_prefix_space=info.add_prefix_space,
        )

    # --- ids -------------------------------------------------------------------------------------------

    def token_id(self, token: str) -> int:
        """Id of a special token such as `[DET]`.

        Raises:
            KeyError: `token` is not a special (added) token.
        """
        try:
            return self._core.token_id(token)
        except ValueError:
            raise KeyError(f"{token!r} is not a special token of this tokenizer") from None

    @property
    def vocab_size(self) -> int:
        """Size of the whole vocabulary, added tokens included (`len(tokenizer)`)."""
        return self._core.vocab_size

    # --- tokenisation ----------------------------------------------------------------------------------

    def encode_text(
        self, text: str, protected_spans: tuple[Span, ...] | list[Span] = (), add_bos: bool = True
    ) -> list[int]:
        """Token ids of `text`, as the slow `tokenizer(text).input_ids` gives them.

        Args:
            text: the text; special tokens in it act as tokens except inside `protected_spans`.
            protected_spans: character ranges of user-written text, where only `<image>`, `<region>`,
                `<reg>` and `</reg>` act as tokens and every other special-token string stays text.
            add_bos: put the BOS id first.
        """
        return self._core.encode_text(text, _pairs(protected_spans), add_bos)

    def tokenize_with_image(self, prompt: str, protected: tuple[Span, ...] | list[Span] = ()) -> list[int]:
        """The official `tokenizer_image_token`, as `ChatTokenizer.tokenize_with_image`: each chunk between
        `<image>`s tokenised on its own with its BOS removed, `IMAGE_SENTINEL` where each `<image>` was, one
        BOS first."""
        return self._core.tokenize_with_image(prompt, _pairs(protected))

    # --- decoding --------------------------------------------------------------------------------------

    def decode(self, ids, skip_special_tokens: bool = False) -> str:
        """Text of `ids`, as the slow tokenizer's `decode(ids)` gives it (`ChatTokenizer.decode`).

        Raises:
            ValueError: an id is outside the vocabulary.
        """
        return self._core.decode([int(i) for i in ids], skip_special_tokens)
