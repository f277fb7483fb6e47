"""The official evaluation templates (research §2.6): the question and the answer it forces, per task.

The task shortcuts (`detect`, `ground`, `segment`, `pose`, `generate_image`, `edit_image`) build these and run
prompt + answer through the LLM in one pass with the super-link placeholders in place, exactly as the official
evaluation does (it never lets the LLM choose the task or the classes). Texts are the first (test-mode)
template of each official dataset class.
"""

from __future__ import annotations

from visionllm_edge import contract


def _join(names, list_item: bool = True) -> list[str]:
    """The names stripped, with the C++ templates' checks and messages (csrc/loop/templates.cpp)."""
    if isinstance(names, str):  # a str is iterable: "cat" would become the classes c, a, t
        raise TypeError(f"expected a list of names, got the string {names!r}")
    names = [str(n).strip() for n in names]
    if not names or any(not n for n in names):
        raise ValueError(f"expected one or more non-empty names, got {names!r}")
    for n in names:
        if control := next((c for c in n if ord(c) < 0x20 or c == "\x7f"), None):
            raise ValueError(f"name {n!r} contains the control character {control!r}")
        if list_item and (d := next((d for d in contract.LABEL_DELIMITERS if d in n), None)):
            raise ValueError(f"name {n!r} contains {d!r}, where the answer's labels are split: its label would not be the name")
        if token := next((t for t in contract.REQUIRED_TOKENS if t in n), None):
            raise ValueError(f"name {n!r} contains the special token {token!r}")
    return names


def detection(classes) -> tuple[str, str]:
    """`coco_llava`: one `[DET]` group per class, in the given order (class k of the decoder = group k)."""
    names = _join(classes)
    question = f"Can you analyze the image and identify the {', '.join(names)} present?"
    answer = "Yes, here are the results for " + ", ".join(f"{n}[DET]" for n in names) + " in the image."
    return question, answer


def grounding(phrase: str) -> tuple[str, str]:
    """`refcoco_llava`: one `[GRD]` group for the referring expression."""
    (phrase,) = _join([phrase], list_item=False)
    return f"Where can we locate the {phrase} in the image?", "Yes, it is [GRD]."


def segmentation(classes) -> tuple[str, str]:
    """`ade20k_llava`: one `[SEG]` group per class."""
    names = _join(classes)
    question = (
        "Could you aid me in generating unique masks for every category present in "
        f"{', '.join(names)} in this image?"
    )
    answer = "Yes, here are the results for " + ", ".join(f"{n}[SEG]" for n in names) + " in the image."
    return question, answer


def pose(keypoint_names, objects=("person",)) -> tuple[list[tuple[str, str]], str, str]:
    """`coco_pose_llava`: a detection turn for the objects, then the keypoint turn.

    Returns:
        (history, question, answer): the first turn as history, and the keypoint question and answer.
    """
    names = _join(keypoint_names)
    objects = _join(objects)
    history = [detection(objects)]
    question = f"Can you examine the image and pinpoint the keypoint locations of the {', '.join(names)}?"
    answer = (
        "Utilizing keypoints detection, the image analysis reveals the location of "
        + ", ".join(f"{n}[POSE]" for n in names)
        + "."
    )
    return history, question, answer


def generation(caption: str) -> tuple[str, str]:
    """`text2img`: an instruction with the caption; the answer carries one `[GEN]` group."""
    (caption,) = _join([caption], list_item=False)
    return f"Generate image with caption: {caption.strip().rstrip('.')}.", "Here it is [GEN]."


def editing(instruction: str) -> tuple[str, str]:
    """`ip2p`: the instruction about the input image; the answer carries one `[EDIT]` group."""
    (instruction,) = _join([instruction], list_item=False)
    return instruction.strip().rstrip(".") + ".", "Here it is [EDIT]."
