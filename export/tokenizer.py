"""Tokenisation and the chat template, exactly as the official code does them.

The official pipeline uses the slow `LlamaTokenizer` (`legacy` from the checkpoint's tokenizer config) with
the 26 added special tokens, the `vicuna_v1` template, and tokenises prompts chunk-wise around `<image>`
(`tokenizer_image_token`). We reproduce that with one difference the SDK needs: in text a *user* wrote,
only the input markers (`<image>`, `<region>`, `<reg>`, `</reg>`) act as tokens, and any other special
token spelled there stays text. To do that we split on special tokens ourselves (the same leftmost match and
the same `lstrip`/`rstrip` handling as `PreTrainedTokenizer.tokenize`) while knowing which character spans
came from the user; text pieces go through the tokenizer's own sentencepiece step.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

from visionllm_edge import contract
from visionllm_edge.conversation import Conversation, build_conversation, insert_placeholders  # noqa: F401
from visionllm_edge.tokenizer import Span  # torch-free, shared with the device runtime

SPIECE_UNDERLINE = "\u2581"
#: Marker for an `<image>` position inside a token list before it is expanded to patch tokens.
IMAGE_SENTINEL = -200


class ChatTokenizer:
    """The official tokenizer plus the template and the protected-user-text rule.

    Args:
        hf_tokenizer: a slow `transformers.LlamaTokenizer` with the added tokens registered.
    """

    def __init__(self, hf_tokenizer):
        self.hf = hf_tokenizer
        self.legacy = bool(getattr(hf_tokenizer, "legacy", True))
        self.add_prefix_space = bool(getattr(hf_tokenizer, "add_prefix_space", True))
        self._special: dict[str, int] = {}
        self._strip: dict[str, tuple[bool, bool]] = {}
        for idx, added in hf_tokenizer.added_tokens_decoder.items():
            self._special[added.content] = int(idx)
            self._strip[added.content] = (bool(added.lstrip), bool(added.rstrip))
        missing = [t for t in (*contract.ADDED_TOKENS, "<s>", "</s>", "<unk>") if t not in self._special]
        if missing:
            raise ValueError(f"tokenizer lacks the special tokens {missing}")
        # Longest alternatives first so that a regex alternation finds the longest token at each position.
        ordered = sorted(self._special, key=len, reverse=True)
        self._pattern = re.compile("|".join(re.escape(t) for t in ordered))
        self._all_special = set(hf_tokenizer.all_special_tokens)
        self.bos_id = self._special["<s>"]
        self.eos_id = self._special["</s>"]

    # --- loading ---------------------------------------------------------------------------------------

    @classmethod
    def from_directory(cls, directory: str | Path) -> ChatTokenizer:
        """Loads the slow tokenizer from a checkpoint folder and checks it against `added_tokens.json`."""
        from transformers import LlamaTokenizer

        directory = Path(directory)
        if not (directory / "tokenizer.model").is_file():
            raise FileNotFoundError(
                f"{directory}: no tokenizer.model (the official tokenizer files are needed)"
            )
        hf = LlamaTokenizer.from_pretrained(str(directory))
        tok = cls(hf)
        added = directory / "added_tokens.json"
        if added.is_file():
            declared = json.loads(added.read_text())
            for name, idx in declared.items():
                if tok._special.get(name) != idx:
                    raise ValueError(
                        f"{added}: token {name!r} has id {idx} there but {tok._special.get(name)} "
                        "in the tokenizer"
                    )
        base = len(hf.sp_model)
        for offset, name in enumerate(contract.ADDED_TOKENS):
            if tok._special[name] != base + offset:
                raise ValueError(
                    f"{directory}: special token {name!r} has id {tok._special[name]}, "
                    f"expected {base + offset} "
                    "(the official order of added tokens)"
                )
        return tok

    # --- ids -------------------------------------------------------------------------------------------

    def token_id(self, token: str) -> int:
        """Id of a special token such as `[DET]`."""
        try:
            return self._special[token]
        except KeyError:
            raise KeyError(f"{token!r} is not a special token of this tokenizer") from None

    @property
    def vocab_size(self) -> int:
        return len(self.hf)

    def decode(self, ids, skip_special_tokens: bool = False) -> str:
        return self.hf.decode(list(ids), skip_special_tokens=skip_special_tokens)

    # --- tokenisation ----------------------------------------------------------------------------------

    def _split(self, text: str, protected: list[Span]) -> list[tuple[str, bool]]:
        """Splits `text` at special tokens, skipping non-marker tokens inside protected spans.

        Returns (piece, is_special) pairs after the added tokens' lstrip/rstrip handling.
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
        # Same order of operations as PreTrainedTokenizer.tokenize: left to right, each special token strips
        # the whitespace of its neighbours according to its own flags.
        for i, (piece, special) in enumerate(pieces):
            if not special:
                continue
            lstrip, rstrip = self._strip[piece]
            if rstrip and i + 1 < len(pieces) and pieces[i + 1][0]:
                pieces[i + 1][0] = pieces[i + 1][0].lstrip()
            if lstrip and i > 0 and pieces[i - 1][0]:
                pieces[i - 1][0] = pieces[i - 1][0].rstrip()
        return [(p, s) for p, s in pieces if p]

    def _text_pieces(self, text: str) -> list[str]:
        """The sentencepiece step of the slow tokenizer (`LlamaTokenizer._tokenize`)."""
        return self.hf._tokenize(text)

    def encode_text(
        self, text: str, protected: tuple[Span, ...] | list[Span] = (), add_bos: bool = True
    ) -> list[int]:
        """Token ids of `text`, as `tokenizer(text).input_ids` gives them, honouring protected spans."""
        protected = list(protected)
        tokens: list[str] = []
        if text:
            if not self.legacy:
                text = text.replace(SPIECE_UNDERLINE, " ")
                if self.add_prefix_space:
                    text = SPIECE_UNDERLINE + text
                    protected = [Span(s.start + 1, s.end + 1) for s in protected]
            for piece, special in self._split(text, protected):
                if special:
                    tokens.append(piece)
                else:
                    tokens.extend(self._text_pieces(piece))
            if (
                not self.legacy
                and len(tokens) > 1
                and tokens[0] == SPIECE_UNDERLINE
                and tokens[1] in self._all_special
            ):
                tokens = tokens[1:]
        ids = [self._special[t] if t in self._special else self.hf.sp_model.piece_to_id(t) for t in tokens]
        return ([self.bos_id] if add_bos else []) + ids

    def tokenize_with_image(self, prompt: str, protected: tuple[Span, ...] | list[Span] = ()) -> list[int]:
        """The official `tokenizer_image_token`: chunks around `<image>`, each tokenised with its BOS
        removed, `IMAGE_SENTINEL` where each `<image>` was, one BOS at the start."""
        chunks: list[list[int]] = []
        start = 0
        parts = prompt.split(contract.IMAGE_TOKEN)
        for part in parts:
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
