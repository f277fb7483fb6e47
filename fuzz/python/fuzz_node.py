"""Fuzzes the perception node from Python (`visionllm_edge.node.PerceptionNode`), whose frames come from a
camera topic nobody checked: `push_message` with `sensor_msgs/Image`-like messages of any height, width,
step, encoding, byte order, stamp, frame id and data length; `push` with arrays of any dtype and shape; and
`set_prompt` with any task, names and text; then `process_pending` runs the pending frame on this thread.
One node on the tiny-random artifact named by `VLE_TINY_ARTIFACT` (one thread, `rate_hz` 0).

A frame the node took and ran must answer with the stamp and frame id it was pushed with, and boxes that
are finite with sizes of at least 0. A run that fails goes to `on_failure` (the node goes on): its message
must name something. `ValueError` and `TypeError` are the documented refusals of `push`, `push_message`
and `set_prompt`.
"""

from __future__ import annotations

from types import SimpleNamespace

import atheris
import fuzzlib
import numpy as np
from visionllm_edge.node import ENCODINGS, PerceptionNode

OUTPUTS: list[dict] = []
FAILURES: list[str] = []
NODE = PerceptionNode(
    fuzzlib.artifact_dir(),
    OUTPUTS.append,
    task="detect",
    names=["circle"],
    rate_hz=0.0,
    threads=1,
    on_failure=lambda header, message: FAILURES.append(message),
)


def _warm_up() -> None:
    """Makes the engines of both decoders now: each is made on first use, and the node's first frame took
    16 s on the loaded 2-core machine, which -timeout would charge to whichever input came first."""
    for task, names in (("pose", ["nose"]), ("detect", ["circle"])):
        NODE.set_prompt(task, names)
        NODE.push(np.zeros((32, 32, 3), np.uint8))
        assert NODE.process_pending() and OUTPUTS, (task, FAILURES)
        OUTPUTS.clear()


_warm_up()
TASKS = ["detect", "segment", "ground", "pose", "question", "caption", ""]


def message(fdp: atheris.FuzzedDataProvider) -> SimpleNamespace:
    encoding = (
        fdp.PickValueInList([*ENCODINGS, "rgb16", "yuv422", ""])
        if fdp.ConsumeBool()
        else fuzzlib.text(fdp, 2)
    )
    h, w = fdp.ConsumeIntInRange(0, 40), fdp.ConsumeIntInRange(0, 40)
    channels = {"rgb8": 3, "bgr8": 3, "rgba8": 4, "bgra8": 4, "mono8": 1}.get(encoding, 3)
    step = w * channels if fuzzlib.chance(fdp, 0.7) else fdp.ConsumeIntInRange(0, 200)
    if fuzzlib.chance(fdp, 0.1):  # sizes and steps that overflow 32 bits when multiplied
        h, w, step = (fdp.PickValueInList([2**16, 2**31 - 1, 2**32 - 1]) for _ in range(3))
    size = step * h if fuzzlib.chance(fdp, 0.8) and step * h < 1 << 16 else fdp.ConsumeIntInRange(0, 4096)
    data = fdp.ConsumeBytes(size).ljust(size, b"\0")
    stamp = SimpleNamespace(
        sec=fdp.ConsumeIntInRange(-(2**31), 2**31 - 1), nanosec=fdp.ConsumeIntInRange(0, 2**32 - 1)
    )
    header = SimpleNamespace(stamp=stamp, frame_id=fuzzlib.text(fdp, 2))
    return SimpleNamespace(
        header=header,
        height=h,
        width=w,
        encoding=encoding,
        is_bigendian=fdp.ConsumeIntInRange(0, 1),
        step=step,
        data=data,
    )


def TestOneInput(data: bytes) -> None:
    fdp = atheris.FuzzedDataProvider(data)
    OUTPUTS.clear()
    FAILURES.clear()
    pushed = None
    try:
        op = fdp.ConsumeIntInRange(0, 5)
        if op <= 2:
            msg = message(fdp)
            NODE.push_message(msg)
            pushed = ((msg.header.stamp.sec, msg.header.stamp.nanosec), msg.header.frame_id)
        elif op <= 4:
            stamp, frame_id = (fdp.ConsumeIntInRange(0, 2**31 - 1), fdp.ConsumeIntInRange(0, 10**9)), "array"
            NODE.push(
                fuzzlib.array(fdp, max_ndim=3, max_side=40),
                fdp.PickValueInList(list(ENCODINGS)),
                stamp,
                frame_id,
            )
            pushed = (stamp, frame_id)
        else:
            names = [fuzzlib.text(fdp, 3) for _ in range(fdp.ConsumeIntInRange(0, 3))]
            task = fdp.PickValueInList(TASKS) if fdp.ConsumeBool() else fuzzlib.text(fdp, 2)
            objects = [fuzzlib.text(fdp, 2) for _ in range(fdp.ConsumeIntInRange(0, 2))]
            NODE.set_prompt(task, names, objects, fuzzlib.text(fdp, 4), fdp.ConsumeIntInRange(-1, 8))
    except UnicodeError:  # a ValueError, but no message of ours: text that failed to convert
        raise
    except (ValueError, TypeError):
        pass
    NODE.process_pending()
    for failure in FAILURES:
        assert isinstance(failure, str) and failure, failure
    for out in OUTPUTS:
        header = out["header"]
        assert pushed is not None, out
        assert (tuple(header["stamp"]), header["frame_id"]) == pushed, (
            header,
            pushed,
        )
        for d in out["detections"]:
            box = d["bbox"]
            values = [box["center"]["x"], box["center"]["y"], box["size_x"], box["size_y"]]
            assert np.isfinite(values).all() and box["size_x"] >= 0 and box["size_y"] >= 0, box


if __name__ == "__main__":
    fuzzlib.main(TestOneInput)
