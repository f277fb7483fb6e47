"""The C++ label rule (`_core.label_groups`) against the reference's `answer_labels` on generated text.

The generators build answers and questions from the pieces each part of the rule reacts to (routing tokens,
placeholders, delimiters, `<det>` tags, pointing words, grounding verbs, " in the image" clauses, sentence
ends) and then mix in what the C++ must treat as Python does: Unicode whitespace, letters whose case
folding reaches ASCII (U+0130, U+0131, U+017F, U+212A), upper/lower case and non-ASCII text. Seeds are
fixed, so a failure names a case that reproduces.
"""

from __future__ import annotations

import random

import pytest
from visionllm_edge import _core, contract

pytest.importorskip("torch", reason="the reference label rule is in visionllm_edge.export, which needs torch")
from visionllm_edge.export.reference import answer_labels  # noqa: E402

SPACES = [" ", " ", " ", "  ", "\t", "\n", "\u00a0", "\u3000", "\u2009", "\u0085", "\x1c", "\u2028"]
ODD_LETTERS = ["\u0130", "\u0131", "\u017f", "\u212a", "\u00e9", "\u732b", "\u00df", "\u0399"]

ANSWER_WORDS = (
    "person|dog|a red circle|left eye|sky|It|is|it|this|that|here|Here|yes|Yes|sure|ok|okay|OK|the|results|"
    "for|and|of|caf\u00e9|\u732b"
).split("|")
ANSWER_MARKS = [*contract.LABEL_DELIMITERS, *contract.ALL_PLACEHOLDERS[:3]] + (
    ",|.|:|<det>|</det>|<det|det>|[EM|B]|[|]|!|?"
).split("|")

VERBS = (
    "locate|find|ground|detect|where is|where are|where's|point to|segment|see|Locate|FIND|Where's|WHERE IS|"
    "Point to|seg|wher"
).split("|")
QUESTION_WORDS = (
    "the|The|this|red ball|cat|dog|little|thee|is|in|within|on|image|picture|photo|images|\u732b|it"
).split("|")
QUESTION_MARKS = ["?", ".", "!", "<", ">", ",", "<image>", "'", "\n"]


def vary(rng: random.Random, piece: str) -> str:
    """`piece` in another case now and then, sometimes with one letter swapped for an odd one."""
    r = rng.random()
    if r < 0.15:
        piece = piece.upper()
    elif r < 0.25:
        piece = piece.swapcase()
    if piece and rng.random() < 0.08:
        i = rng.randrange(len(piece))
        piece = piece[:i] + rng.choice(ODD_LETTERS) + piece[i + 1 :]
    return piece


def join(rng: random.Random, pieces: list[str]) -> str:
    out = ""
    for piece in pieces:
        out += piece
        r = rng.random()
        if r < 0.45:
            out += " "
        elif r < 0.6:
            out += rng.choice(SPACES)
    return out


def random_answer(rng: random.Random) -> str:
    pieces = []
    for _ in range(rng.randint(0, 14)):
        r = rng.random()
        if r < 0.1:
            pieces.append(tagged_phrase(rng))
        elif r < 0.25:
            pieces.append(rng.choice(list(contract.ROUTING_TOKENS)))
        elif r < 0.6:
            pieces.append(vary(rng, rng.choice(ANSWER_WORDS)))
        elif r < 0.95:
            pieces.append(rng.choice(ANSWER_MARKS))
        else:
            pieces.append(rng.choice(SPACES + ODD_LETTERS))
    return join(rng, pieces)


def tagged_phrase(rng: random.Random) -> str:
    """`<det>phrase</det>` and a routing token, with what may sit between (spaces, newlines, text)."""
    inner = [vary(rng, rng.choice(ANSWER_WORDS + ANSWER_MARKS)) for _ in range(rng.randint(0, 4))]
    between = rng.choice(["", "", " ", "\n", " \u3000", "x", "</det>"])
    return "<det>" + join(rng, inner) + "</det>" + between + rng.choice(list(contract.ROUTING_TOKENS))


def pointing_answer(rng: random.Random) -> str:
    """An answer whose [GRD] label is near the pointing-words rule: "Sure , it is [GRD]." and neighbours."""
    pieces = []
    if rng.random() < 0.6:
        pieces.append(vary(rng, rng.choice(["yes", "sure", "ok", "okay", "oka", "yess"])))
        pieces.append(rng.choice(["", ",", " ,", ", ", ",,", " , ", "\u00a0,"]))
    for word in ("it this that here its".split(), ["it", "is", "i"], ["is", "it", ""]):
        if rng.random() < 0.6:
            pieces.append(vary(rng, rng.choice(word)))
    answer = join(rng, pieces) + rng.choice(["", "\n", ".", "\n.", " :", "\n\n"])
    return answer + "[GRD]" + rng.choice(["", ".", " [GRD]", "[DET]"])


def random_question(rng: random.Random) -> str:
    pieces = []
    if rng.random() < 0.3:
        pieces.append("<image>\n")
    for _ in range(rng.randint(0, 12)):
        r = rng.random()
        if r < 0.25:
            pieces.append(vary(rng, rng.choice(VERBS)))
        elif r < 0.75:
            pieces.append(vary(rng, rng.choice(QUESTION_WORDS)))
        elif r < 0.95:
            pieces.append(rng.choice(QUESTION_MARKS))
        else:
            pieces.append(rng.choice(SPACES + ODD_LETTERS))
    return join(rng, pieces)


def grounding_question(rng: random.Random) -> str:
    """A question near the grounding pattern: verb, "the", a phrase, an optional " in the image", an end."""
    pieces = [vary(rng, rng.choice(["Please", "Can you", "", "<image>"]))]
    pieces.append(vary(rng, rng.choice(VERBS)))
    if rng.random() < 0.5:
        pieces.append(vary(rng, rng.choice(["the", "the", "thE", "this", "th"])))
    pieces += [vary(rng, rng.choice(QUESTION_WORDS)) for _ in range(rng.randint(0, 3))]
    if rng.random() < 0.5:
        pieces += [vary(rng, w) for w in rng.choice([["is", "in"], ["in"], ["within"], ["on"], ["is", "on"]])]
        pieces.append(vary(rng, rng.choice(["the", "this", "a"])))
        pieces.append(vary(rng, rng.choice(["image", "picture", "photo", "images"])))
    pieces.append(rng.choice(["", "?", ".", "!", " ?", "\n", "<", "? And find the cat."]))
    return join(rng, pieces)


def check(answer: str, question: str, instruction: str | None) -> None:
    want = answer_labels(answer, question, instruction)
    got = _core.label_groups(answer, question, instruction)
    assert got == want, (answer, question, instruction)


@pytest.mark.parametrize("seed", range(4))
def test_random_answers_and_questions(seed):
    rng = random.Random(1000 + seed)
    for _ in range(1500):
        instruction = None if rng.random() < 0.85 else rng.choice([" draw it ", "", "\u3000make it blue\n"])
        check(random_answer(rng), random_question(rng), instruction)


@pytest.mark.parametrize("seed", range(4))
def test_grounding_answers_and_questions(seed):
    rng = random.Random(2000 + seed)
    for _ in range(1500):
        answer = pointing_answer(rng) if rng.random() < 0.7 else random_answer(rng) + "[GRD]"
        question = grounding_question(rng) if rng.random() < 0.8 else random_question(rng)
        check(answer, question, None)


def test_the_generators_reach_every_branch():
    """The generated text is not degenerate: the reference makes its labels in each way many times."""
    rng = random.Random(3000)
    seen = {"own text": 0, "asked phrase": 0, "whole question": 0, "tag": 0}
    for _ in range(2000):
        answer, question = pointing_answer(rng), grounding_question(rng)
        whole = question.replace("<image>", " ").strip()
        for kind, label in answer_labels(answer, question):
            if kind == "grd" and label and label in answer and label not in question:
                seen["own text"] += 1
            elif kind == "grd" and label and label != whole and label not in answer:
                seen["asked phrase"] += 1
            elif kind == "grd" and label and label == whole and label not in answer:
                seen["whole question"] += 1
        answer = random_answer(rng)
        labels = [label for _, label in answer_labels(answer, "q")]
        seen["tag"] += sum(1 for label in labels if label and f"<det>{label}</det>" in answer)
    assert all(count >= 50 for count in seen.values()), seen
