"""The official evaluation templates (research §2.6): the question and the answer it forces, per task.

The task shortcuts (`detect`, `ground`, `segment`, `pose`, `generate_image`, `edit_image`) build these and run
prompt + answer through the LLM in one pass with the super-link placeholders in place, exactly as the official
evaluation does (it never lets the LLM choose the task or the classes). Texts are the first (test-mode)
template of each official dataset class.
"""

from __future__ import annotations


def _join(names) -> list[str]:
    names = [str(n).strip() for n in names]
    if not names or any(not n for n in names):
        raise ValueError(f"expected one or more non-empty names, got {names!r}")
    return names


def detection(classes) -> tuple[str, str]:
    """`coco_llava`: one `[DET]` group per class, in the given order (class k of the decoder = group k)."""
    names = _join(classes)
    question = f"Can you analyze the image and identify the {', '.join(names)} present?"
    answer = "Yes, here are the results for " + ", ".join(f"{n}[DET]" for n in names) + " in the image."
    return question, answer


def grounding(phrase: str) -> tuple[str, str]:
    """`refcoco_llava`: one `[GRD]` group for the referring expression."""
    (phrase,) = _join([phrase])
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
    (caption,) = _join([caption])
    return f"Generate image with caption: {caption.strip().rstrip('.')}.", "Here it is [GEN]."


def editing(instruction: str) -> tuple[str, str]:
    """`ip2p`: the instruction about the input image; the answer carries one `[EDIT]` group."""
    (instruction,) = _join([instruction])
    return instruction.strip().rstrip(".") + ".", "Here it is [EDIT]."
