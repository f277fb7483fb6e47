"""The chat template (official `vicuna_v1`) and the super-link placeholders, shared by runtime and reference.

Both sides must build the same conversation text for parity to mean anything, and the template is part of
the contract (the manifest repeats it), so it lives once, here. No torch.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from visionllm_edge import contract
from visionllm_edge.tokenizer import Span


@dataclass
class Conversation:
    """A templated conversation and where the user-written text sits in it."""

    text: str
    user_spans: list[Span]


def build_conversation(turns: list[tuple[str, str | None]]) -> Conversation:
    """Applies the official `vicuna_v1` template (`SeparatorStyle.TWO`, sep " ", sep2 "</s>").

    Args:
        turns: (user message, assistant message or None) pairs; a None answer leaves the prompt open
            ("... ASSISTANT:"), as for generation.
    """
    text = contract.SYSTEM_PROMPT + contract.SEP
    spans: list[Span] = []
    seps = (contract.SEP, contract.SEP2)
    for i, (user, answer) in enumerate(turns):
        text += contract.ROLES[0] + ": "
        spans.append(Span(len(text), len(text) + len(user)))
        text += user + seps[0]
        if answer is None:
            if i != len(turns) - 1:
                raise ValueError("only the last turn may have no answer")
            text += contract.ROLES[1] + ":"
        else:
            text += contract.ROLES[1] + ": " + answer + seps[1]
    return Conversation(text, spans)


def insert_placeholders(answer: str, num_embs: int, num_embs_gen: int) -> str:
    """Writes the super-link placeholders after every routing token that lacks them.

    `[DET]`, `[GRD]`, `[SEG]`, `[POSE]` get `[EMB][EMB2]..[EMB{num_embs}]`; `[GEN]` and `[EDIT]` get
    `num_embs_gen` x `[EMB]`, the layout of the official training data.
    """
    out = []
    pos = 0
    routing = re.compile("|".join(re.escape(t) for t in contract.ROUTING_TOKENS))
    for m in routing.finditer(answer):
        out.append(answer[pos : m.end()])
        kind = contract.ROUTING_TOKENS[m.group(0)]
        if kind in contract.GENERATION_KINDS:
            placeholder = contract.GENERATION_PLACEHOLDER * num_embs_gen
        else:
            placeholder = "".join(contract.ALL_PLACEHOLDERS[:num_embs])
        rest = answer[m.end() :]
        if not rest.startswith(placeholder):
            out.append(placeholder)
        pos = m.end()
    out.append(answer[pos:])
    return "".join(out)


def normalise_prompt(prompt: str) -> str:
    """Puts `<image>\\n` in front of a prompt that has no `<image>` (docs/architecture.md §9)."""
    if contract.IMAGE_TOKEN not in prompt:
        return contract.IMAGE_TOKEN + "\n" + prompt
    return prompt
