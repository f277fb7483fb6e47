"""Fuzzes the tokenizer from Python (`visionllm_edge.tokenizer.RuntimeTokenizer`, over the C++ tokenizer) and
the chat template around it (`visionllm_edge.conversation`), on the tokenizer of the artifact named by
`VLE_TINY_ARTIFACT`.

From the bytes: text with every special token, odd characters and lone surrogates, protected spans of any
bounds (reversed, negative, past the end, overlapping), encode with or without BOS, `tokenize_with_image`,
and decode of arbitrary ids (negative, past the vocabulary, huge) with and without skipping special
tokens; the `vicuna_v1` template of fuzzed turns and the super-link placeholders after fuzzed answers.

Checks on what is returned: ids are inside the vocabulary (or the image sentinel), BOS comes first when
asked for, decoding gives a str, and user text protected whole never becomes an added token's id other
than the four input markers, nor <s> or </s> (special tokens typed by a user stay text). `ValueError` and
`TypeError` are the documented refusals.
"""

from __future__ import annotations

import atheris
import fuzzlib
from visionllm_edge import contract
from visionllm_edge.conversation import build_conversation, insert_placeholders, normalise_prompt
from visionllm_edge.manifest import load_manifest
from visionllm_edge.tokenizer import IMAGE_SENTINEL, RuntimeTokenizer, Span

TOKENIZER = RuntimeTokenizer.from_manifest(load_manifest(fuzzlib.artifact_dir(), verify_hashes=False))
VOCAB = TOKENIZER.vocab_size
#: Ids that text a user typed must never become (docs/architecture.md §3, step 3): every added token but
#: `<image>`, `<region>`, `<reg>`, `</reg>`, and <s> / </s>.
FORBIDDEN_IN_USER_TEXT = {
    TOKENIZER.token_id(t) for t in contract.ADDED_TOKENS if t not in contract.INPUT_MARKERS
} | {TOKENIZER.bos_id, TOKENIZER.eos_id}


def spans(fdp: atheris.FuzzedDataProvider, length: int) -> list[Span]:
    out = []
    for _ in range(fdp.ConsumeIntInRange(0, 3)):
        if fuzzlib.chance(fdp, 0.2):
            out.append(Span(fdp.ConsumeInt(4), fdp.ConsumeInt(4)))  # anything
        else:
            a, b = fdp.ConsumeIntInRange(0, length), fdp.ConsumeIntInRange(0, length)
            out.append(Span(min(a, b), max(a, b)))
    return out


def ids(fdp: atheris.FuzzedDataProvider) -> list[int]:
    out = []
    for _ in range(fdp.ConsumeIntInRange(0, 24)):
        if fuzzlib.chance(fdp, 0.05):
            out.append(fdp.PickValueInList([-1, VOCAB, IMAGE_SENTINEL, 2**31, 2**63 - 1, -(2**63)]))
        else:
            out.append(fdp.ConsumeIntInRange(0, VOCAB - 1))
    return out


def check_ids(out: list[int], bos: bool) -> None:
    assert all(0 <= i < VOCAB for i in out), out
    if bos:
        assert out and out[0] == TOKENIZER.bos_id, out


def TestOneInput(data: bytes) -> None:
    fdp = atheris.FuzzedDataProvider(data)
    op = fdp.ConsumeIntInRange(0, 4)
    try:
        if op == 0:
            text = fuzzlib.text(fdp)
            bos = fdp.ConsumeBool()
            check_ids(TOKENIZER.encode_text(text, spans(fdp, len(text)), add_bos=bos), bos)
        elif op == 1:
            text = fuzzlib.text(fdp)
            out = TOKENIZER.tokenize_with_image(text, spans(fdp, len(text)))
            assert out and out[0] == TOKENIZER.bos_id, out
            assert all(0 <= i < VOCAB or i == IMAGE_SENTINEL for i in out), out
        elif op == 2:
            given = ids(fdp)
            text = TOKENIZER.decode(given, skip_special_tokens=fdp.ConsumeBool())
            assert isinstance(text, str), type(text)
        elif op == 3:
            # User text, protected whole: a special token typed there stays text, so the only added tokens
            # its ids may hold are the four input markers (no routing token injected, no early </s>).
            text = fuzzlib.text(fdp)
            out = TOKENIZER.encode_text(text, [Span(0, len(text))], add_bos=False)
            injected = sorted(set(out) & FORBIDDEN_IN_USER_TEXT)
            assert not injected, (text, injected)
            assert isinstance(TOKENIZER.decode(out), str)
        else:
            turns = [(fuzzlib.text(fdp, 4), fuzzlib.text(fdp, 4) if fdp.ConsumeBool() else None)
                     for _ in range(fdp.ConsumeIntInRange(1, 3))]  # fmt: skip
            conv = build_conversation([(normalise_prompt(u), a) for u, a in turns])
            for s in conv.user_spans:
                assert 0 <= s.start <= s.end <= len(conv.text), (s, len(conv.text))
            answer = insert_placeholders(
                fuzzlib.text(fdp, 6), fdp.ConsumeIntInRange(0, 8), fdp.ConsumeIntInRange(0, 64)
            )
            TOKENIZER.tokenize_with_image(conv.text + answer, conv.user_spans)
    except UnicodeError:  # a ValueError, but no message of ours: text that failed to convert
        raise
    except (ValueError, TypeError):
        pass


if __name__ == "__main__":
    fuzzlib.main(TestOneInput)
