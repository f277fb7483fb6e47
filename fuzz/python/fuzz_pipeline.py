"""Fuzzes a request end to end: `Pipeline`'s Python argument handling and the C++ loop behind it, on the
tiny-random artifact named by `VLE_TINY_ARTIFACT` (one Pipeline for the whole run, one thread, a KV arena of
256 rows so that any length limit is reached in milliseconds).

From the bytes: which call (a free request, its stream, a chat of up to three turns, or a task shortcut:
detect, segment, ground, pose, generate, edit), the image (none, a small RGB picture of any size, a gray,
RGBA or 16-bit one), the prompt and every text option (every special token, control characters, lone
surrogates), the regions (boxes and points of any numbers, NaN and inf included, masks of any shape,
things that are neither, more or fewer than the prompt's `<region>`s), and each request option with a value
of any type and range (max_new_tokens, temperature, top_k, top_p, repetition_penalty, seed, history,
answer_prefix, answer, instruction, noise, det_image, region_frame, decode) or an unknown keyword. With
random weights, sampling emits arbitrary token streams, routing tokens included, so the super-link router
and the decoders behind it see arbitrary groups.

`ValueError` and `TypeError` (pybind11's and the core's, both naming the option) are the documented
refusals; a request that answers must have a stop reason the loop knows and no more tokens than it was
allowed. Anything else is a finding.
"""

from __future__ import annotations

import atheris
import fuzzlib
import numpy as np
from visionllm_edge import Pipeline
from visionllm_edge.results import Result

PIPE = Pipeline.load(fuzzlib.artifact_dir(), threads=1, max_context=256)


def _warm_up() -> None:
    """Makes every graph's engine now: each is made on first use, and the first pose request took 16 s on the
    loaded 2-core machine, which -timeout would charge to whichever input came first."""
    image = np.zeros((32, 32, 3), np.uint8)
    PIPE(image, "<region>?", regions=[(1, 1, 9, 9)], max_new_tokens=1)
    PIPE.detect(image, ["a"])
    PIPE.pose(image, ["nose"])
    PIPE.generate_image("a")
    PIPE.edit_image(image, "b")


_warm_up()
#: The loop's stop reasons (csrc/loop/router.cpp, stop_reason_name).
STOP_REASONS = {"eos", "length"}


def picture(fdp: atheris.FuzzedDataProvider):
    """None, or a small picture in one of the forms a caller passes."""
    form = fdp.ConsumeIntInRange(0, 5)
    if form == 0:
        return None
    h, w = fdp.ConsumeIntInRange(1, 40), fdp.ConsumeIntInRange(1, 40)
    channels = {1: 3, 2: 3, 3: 4, 4: None, 5: 3}[form]
    dtype = np.uint16 if form == 5 else np.uint8
    shape = (h, w) if channels is None else (h, w, channels)
    count = int(np.prod(shape)) * np.dtype(dtype).itemsize
    raw = fdp.ConsumeBytes(count)
    return np.frombuffer(raw + bytes(count - len(raw)), dtype=dtype).reshape(shape)


def region(fdp: atheris.FuzzedDataProvider):
    form = fdp.ConsumeIntInRange(0, 5)
    if form == 0:
        return tuple(fuzzlib.number(fdp) for _ in range(4))
    if form == 1:
        return tuple(fuzzlib.number(fdp) for _ in range(2))
    if form == 2:
        h, w = fdp.ConsumeIntInRange(0, 48), fdp.ConsumeIntInRange(0, 48)
        return np.frombuffer(fdp.ConsumeBytes(h * w).ljust(h * w, b"\0"), np.uint8).reshape(h, w) > 127
    if form == 3:
        return fuzzlib.array(fdp, max_ndim=3, max_side=12)
    if form == 4:
        return [fuzzlib.number(fdp) for _ in range(fdp.ConsumeIntInRange(0, 6))]
    return fdp.PickValueInList([None, "box", 3, b"\x00\x01", {"x": 1}])


def value(fdp: atheris.FuzzedDataProvider):
    """An option value: mostly the right type, sometimes not."""
    form = fdp.ConsumeIntInRange(0, 4)
    if form <= 1:
        return fuzzlib.number(fdp)
    if form == 2:
        return fdp.ConsumeBool()
    if form == 3:
        return fuzzlib.text(fdp, 3)
    return fdp.PickValueInList([None, [], [1, 2], (0.5,), {"a": 1}, b"bytes"])


def options(fdp: atheris.FuzzedDataProvider) -> dict:
    kw: dict = {}
    for key in ("do_sample", "temperature", "top_k", "top_p", "repetition_penalty", "seed"):
        if fuzzlib.chance(fdp, 0.3):
            if fuzzlib.chance(fdp, 0.1):
                kw[key] = value(fdp)  # any type
            else:
                kw[key] = fdp.ConsumeBool() if key == "do_sample" else fuzzlib.number(fdp)
    # Mostly short answers, so that a second holds many requests; sometimes any value at all.
    kw["max_new_tokens"] = value(fdp) if fuzzlib.chance(fdp, 0.05) else fdp.ConsumeIntInRange(1, 12)
    for key in ("answer_prefix", "answer", "instruction"):
        if fuzzlib.chance(fdp, 0.1):
            kw[key] = value(fdp) if fuzzlib.chance(fdp, 0.1) else fuzzlib.text(fdp, 6)
    if fuzzlib.chance(fdp, 0.15):
        kw["history"] = [
            value(fdp) if fuzzlib.chance(fdp, 0.1) else (fuzzlib.text(fdp, 4), fuzzlib.text(fdp, 4))
            for _ in range(fdp.ConsumeIntInRange(0, 3))
        ]
    if fuzzlib.chance(fdp, 0.1):
        kw["noise"] = fuzzlib.array(fdp, max_ndim=4, max_side=8)
    if fuzzlib.chance(fdp, 0.1):
        kw["det_image"] = picture(fdp) if fdp.ConsumeBool() else {
            "pixel_values": fuzzlib.array(fdp, 4, 8), "pixel_mask": fuzzlib.array(fdp, 3, 8),
            "resized_hw": (fuzzlib.number(fdp), fuzzlib.number(fdp)),
        }  # fmt: skip
    if fuzzlib.chance(fdp, 0.05):
        kw["region_frame"] = fdp.PickValueInList(["image", "thumbnail", "pixels", ""])
    kw["decode"] = fuzzlib.chance(fdp, 0.1)  # denoising loops are the slowest thing a request does
    if fuzzlib.chance(fdp, 0.02):
        kw[fuzzlib.text(fdp, 2) or "x"] = value(fdp)
    return kw


def names(fdp: atheris.FuzzedDataProvider):
    if fuzzlib.chance(fdp, 0.1):
        return fuzzlib.text(fdp, 3)  # a bare string: refused, it would be split into letters
    return [fuzzlib.text(fdp, 3) or "x" for _ in range(fdp.ConsumeIntInRange(1, 4))]


def check(result: Result, kw: dict, generated: bool = True) -> None:
    """`generated`: the answer was decoded (a task shortcut's is forced: max_new_tokens does not bound it)."""
    assert isinstance(result, Result), type(result)
    assert result.stop_reason in STOP_REASONS, result.stop_reason
    limit = kw.get("max_new_tokens")
    forced = "answer" in kw or "answer_prefix" in kw  # their tokens are part of the answer's
    if generated and isinstance(limit, int) and limit > 0 and not forced:
        assert len(result.token_ids) <= limit, (len(result.token_ids), limit)
    for d in result.detections:
        assert 0.0 <= d.score <= 1.0 or np.isnan(d.score), d.score


def request(fdp: atheris.FuzzedDataProvider) -> None:
    call = fdp.ConsumeIntInRange(0, 31)
    image = picture(fdp)
    kw = options(fdp)
    if call < 12:
        regions = (
            [region(fdp) for _ in range(fdp.ConsumeIntInRange(0, 4))] if fuzzlib.chance(fdp, 0.3) else None
        )
        check(PIPE(image, fuzzlib.text(fdp), regions=regions, bgr=fdp.ConsumeBool(), **kw), kw)
    elif call < 15:
        pieces = list(PIPE.stream(image, fuzzlib.text(fdp), **kw))
        assert all(isinstance(p, str) for p in pieces[:-1]), pieces
        check(pieces[-1], kw)
    elif call < 18:
        chat = PIPE.chat(image)
        for _ in range(fdp.ConsumeIntInRange(1, 3)):
            check(chat.ask(fuzzlib.text(fdp, 6), **kw), kw)
    elif call < 21:
        check(PIPE.detect(image, names(fdp), **kw), kw, generated=False)
    elif call < 24:
        check(PIPE.segment(image, names(fdp), **kw), kw, generated=False)
    elif call < 27:
        check(PIPE.ground(image, fuzzlib.text(fdp, 4), **kw), kw, generated=False)
    elif call < 29:
        check(PIPE.generate_image(fuzzlib.text(fdp, 4), **kw), kw, generated=False)
    elif call < 31:
        kw.pop("instruction", None)  # the shortcut's own argument
        check(PIPE.edit_image(image, fuzzlib.text(fdp, 4), **kw), kw, generated=False)
    else:  # the keypoint decoder is the slowest graph of tiny-random (0.5 s a call here): one request in 32
        check(PIPE.pose(image, names(fdp), names(fdp), **kw), kw, generated=False)


def TestOneInput(data: bytes) -> None:
    try:
        request(atheris.FuzzedDataProvider(data))
    except UnicodeError:  # a ValueError, but no message of ours: text that failed to convert
        raise
    except (ValueError, TypeError):
        pass


if __name__ == "__main__":
    fuzzlib.main(TestOneInput)
