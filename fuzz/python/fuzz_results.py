"""Fuzzes post-processing as Python reaches it with arbitrary arrays: the result types of
`visionllm_edge.results` (`to_dict`, `to_json`, `to_coco`, `str`, `rle_encode`), the drawing of
`visionllm_edge.visualize` (`draw_result`, `skeleton_for`), and the core's post-processing of raw decoder
outputs (`_core.object_results`, `_core.pose_results`: top-k, boxes, NMS, masks, the semantic map and
keypoints) on logits, boxes, masks and keypoints of any shape and any finite value, huge ones included (the
loop refuses a decoder's non-finite outputs before post-processing, csrc/loop/dispatch.cpp).

A result built from the bytes has labels of any text, scores and boxes of any value, masks and label maps
of any dtype and shape, keypoints of any shape. What comes back must have the documented shape: a drawn
picture is the input's size, RGB uint8; a COCO dict holds one annotation per detection, labelled
segmentation map class and pose; every box the core returns is finite. `ValueError` and `TypeError` are the
documented refusals.
"""

from __future__ import annotations

import json

import atheris
import fuzzlib
import numpy as np
from visionllm_edge import _core
from visionllm_edge.results import Detection, Pose, Result, SemanticMap, rle_encode
from visionllm_edge.visualize import COCO_KEYPOINTS, draw_result, skeleton_for

KINDS = ["det", "grd", "seg", "pose", "gen", "edit", ""]


def floats(fdp: atheris.FuzzedDataProvider, shape: tuple[int, ...], finite: bool = False) -> np.ndarray:
    """float32 of `shape` from the bytes: any value (NaN, inf and huge ones included), or with `finite`
    every non-finite one replaced by the largest float32 of its sign (NaN by 0)."""
    count = int(np.prod(shape, dtype=np.int64))
    raw = fdp.ConsumeBytes(4 * count)
    out = np.frombuffer(raw + bytes(4 * count - len(raw)), np.float32).reshape(shape).copy()
    if fuzzlib.chance(fdp, 0.5):
        out = np.round(out % 8 - 4, 2)  # ordinary logits and boxes, so that some score above a threshold
    return np.nan_to_num(out) if finite else out


def label(fdp: atheris.FuzzedDataProvider) -> str:
    return fuzzlib.text(fdp, 3) if fuzzlib.chance(fdp, 0.3) else fdp.PickValueInList(["a", "b", "person", ""])


def mask(fdp: atheris.FuzzedDataProvider, h: int, w: int):
    if fuzzlib.chance(fdp, 0.3):
        return None
    if fuzzlib.chance(fdp, 0.7):
        return (
            fuzzlib.array(fdp, max_ndim=2, max_side=24).astype(bool)
            if fdp.ConsumeBool()
            else np.zeros((h, w), bool)
        )
    return fuzzlib.array(fdp, max_ndim=3, max_side=24)


def box(fdp: atheris.FuzzedDataProvider) -> tuple:
    return tuple(
        fuzzlib.number(fdp) if fuzzlib.chance(fdp, 0.3) else fdp.ConsumeRegularFloat() % 64 for _ in range(4)
    )


def result(fdp: atheris.FuzzedDataProvider, h: int, w: int) -> Result:
    r = Result(text=fuzzlib.text(fdp, 3))
    for _ in range(fdp.ConsumeIntInRange(0, 4)):
        r.detections.append(Detection(label(fdp), fdp.PickValueInList(KINDS), fuzzlib.number(fdp), box(fdp),
                                      mask(fdp, h, w), fdp.ConsumeIntInRange(-1, 900)))  # fmt: skip
    if fuzzlib.chance(fdp, 0.3):
        labels = [label(fdp) for _ in range(fdp.ConsumeIntInRange(0, 3))]
        label_map = fdp.ConsumeBytes(h * w).ljust(h * w, b"\0")
        lm = np.frombuffer(label_map, np.uint8).reshape(h, w).astype(np.int32) % (len(labels) + 1) - 1
        r.segmentation = SemanticMap(lm if fuzzlib.chance(fdp, 0.8) else fuzzlib.array(fdp, 3, 16), labels)
    for _ in range(fdp.ConsumeIntInRange(0, 2)):
        k = fdp.ConsumeIntInRange(0, 17)
        names = [
            fdp.PickValueInList(list(COCO_KEYPOINTS)) if fdp.ConsumeBool() else label(fdp) for _ in range(k)
        ]
        kps = floats(fdp, (k, 3)) if fuzzlib.chance(fdp, 0.8) else fuzzlib.array(fdp, 3, 6)
        r.poses.append(
            Pose(label(fdp), fuzzlib.number(fdp), box(fdp), kps, names, fdp.ConsumeIntInRange(-1, 900))
        )
    return r


def from_result(fdp: atheris.FuzzedDataProvider) -> None:
    h, w = fdp.ConsumeIntInRange(1, 48), fdp.ConsumeIntInRange(1, 48)
    r = result(fdp, h, w)
    json.loads(r.to_json())
    str(r)
    coco = r.to_coco(image_id=fdp.ConsumeIntInRange(0, 9), keypoint_threshold=fdp.ConsumeRegularFloat())
    labelled = 0
    if r.segmentation is not None:  # a semantic-map class gives an annotation when it has pixels
        present = set(np.unique(np.asarray(r.segmentation.label_map)).tolist())
        labelled = len(present & set(range(len(r.segmentation.labels))))
    assert len(coco["annotations"]) == len(r.detections) + len(r.poses) + labelled, coco
    image = np.frombuffer(fdp.ConsumeBytes(h * w * 3).ljust(h * w * 3, b"\0"), np.uint8).reshape(h, w, 3)
    drawn = draw_result(
        image, r, alpha=fdp.ConsumeFloatInRange(0.0, 1.0), keypoint_threshold=fdp.ConsumeRegularFloat()
    )
    assert drawn.shape == (h, w, 3) and drawn.dtype == np.uint8, (drawn.shape, drawn.dtype)


def raw_outputs(fdp: atheris.FuzzedDataProvider) -> None:
    post = {
        "det_top_k": fdp.ConsumeIntInRange(-1, 20),
        "det_score_threshold": fuzzlib.number(fdp),
        "nms_iou": None if fdp.ConsumeBool() else fuzzlib.number(fdp),
        "mask_threshold": fuzzlib.number(fdp),
        "seg_score_threshold": fuzzlib.number(fdp),
        "pose_top_k": fdp.ConsumeIntInRange(-1, 20),
        "pose_score_threshold": fuzzlib.number(fdp),
    }
    width, height = fdp.ConsumeIntInRange(-1, 64), fdp.ConsumeIntInRange(-1, 64)
    resized = (fdp.ConsumeIntInRange(-1, 64), fdp.ConsumeIntInRange(-1, 64))
    q, k = fdp.ConsumeIntInRange(0, 12), fdp.ConsumeIntInRange(0, 4)

    def shape(usual: tuple[int, ...]) -> tuple[int, ...]:
        if fuzzlib.chance(fdp, 0.85):
            return usual
        return tuple(fdp.ConsumeIntInRange(0, 6) for _ in range(fdp.ConsumeIntInRange(0, 4)))

    if fdp.ConsumeBool():
        chunks, mh, mw = (
            fdp.ConsumeIntInRange(0, 2),
            fdp.ConsumeIntInRange(0, 16),
            fdp.ConsumeIntInRange(0, 16),
        )
        groups = [(fdp.PickValueInList(KINDS), label(fdp), fdp.ConsumeIntInRange(-1, 5)) for _ in range(k)]
        logits = floats(fdp, shape((chunks, q, k)), True)
        boxes = floats(fdp, shape((chunks, q, 4)), True)
        masks = floats(fdp, shape((chunks, q, mh, mw)), True)
        max_groups = fdp.ConsumeIntInRange(-1, 6)
        out = _core.object_results(logits, boxes, masks, groups, max_groups, resized, width, height, post)
    else:
        kp = fdp.ConsumeIntInRange(0, 6)
        names = [label(fdp) for _ in range(kp)]
        objects = [label(fdp) for _ in range(fdp.ConsumeIntInRange(0, 3))]
        padded = (fdp.ConsumeIntInRange(-1, 64), fdp.ConsumeIntInRange(-1, 64))
        logits = floats(fdp, shape((1, q, len(objects))), True)
        boxes = floats(fdp, shape((1, q, 4)), True)
        keypoints = floats(fdp, shape((1, q, kp * 3)), True)
        out = _core.pose_results(
            logits, boxes, keypoints, objects, names, padded, resized, width, height, post
        )
    for d in out["detections"]:
        assert all(np.isfinite(d[3])), d
    for p in out["poses"]:
        assert all(np.isfinite(p[2])), p


def TestOneInput(data: bytes) -> None:
    fdp = atheris.FuzzedDataProvider(data)
    op = fdp.ConsumeIntInRange(0, 3)
    try:
        if op == 0:
            rle = rle_encode(fuzzlib.array(fdp, max_ndim=3, max_side=32))
            assert sum(rle["counts"]) == rle["size"][0] * rle["size"][1], rle
        elif op == 1:
            names = [fdp.PickValueInList(list(COCO_KEYPOINTS)) if fdp.ConsumeBool() else fuzzlib.text(fdp, 2)
                     for _ in range(fdp.ConsumeIntInRange(0, 20))]  # fmt: skip
            for a, b in skeleton_for(names):
                assert 0 <= a < len(names) and 0 <= b < len(names) and a != b, (a, b, names)
        elif op == 2:
            from_result(fdp)
        else:
            raw_outputs(fdp)
    except UnicodeError:  # a ValueError, but no message of ours: text that failed to convert
        raise
    except (ValueError, TypeError):
        pass


if __name__ == "__main__":
    fuzzlib.main(TestOneInput)
