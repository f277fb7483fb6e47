"""The C++ results side (csrc/postprocess/results.cpp, csrc/loop/result.cpp, csrc/loop/templates.cpp) against
the Python SDK: the task templates of `visionllm_edge.templates`, `Result.to_json` (text equal, character for
character), the uint8 conversion of generated images, and the post-processing of `Pipeline._postprocess`
(detections, masks, the semantic map and poses equal on random decoder outputs).
"""

from __future__ import annotations

import math
import types

import numpy as np
import pytest
from visionllm_edge import _core, templates
from visionllm_edge.pipeline import Pipeline
from visionllm_edge.results import Detection, Link, Pose, Result, SemanticMap

# --- templates -----------------------------------------------------------------------------------------------

NAME_LISTS = [
    ["person"],
    [" person", "car\t", "traffic light"],
    ["caf\u00e9", "\u00a0sofa\u3000", "it's", 'say "hi"'],
]
PHRASES = ["the red ball", "  a dog on the left  ", "a circle...", "make it blue.", "x . . ", "\u2003tree"]
BAD_NAMES = [[], [""], ["cat", "  "], ["a", "\u3000\n"], ["ok", "it's", ""]]


@pytest.mark.parametrize("names", NAME_LISTS)
def test_list_templates_equal_python(names):
    assert _core.template_detection(names) == templates.detection(names)
    assert _core.template_segmentation(names) == templates.segmentation(names)
    history, question, answer = templates.pose(names, objects=names[::-1])
    assert _core.template_pose(names, names[::-1]) == (history, question, answer)
    assert _core.template_pose(names, ["person"]) == templates.pose(names)


@pytest.mark.parametrize("phrase", PHRASES)
def test_phrase_templates_equal_python(phrase):
    assert _core.template_grounding(phrase) == templates.grounding(phrase)
    assert _core.template_generation(phrase) == templates.generation(phrase)
    assert _core.template_editing(phrase) == templates.editing(phrase)


@pytest.mark.parametrize("names", BAD_NAMES)
def test_template_errors_equal_python(names):
    with pytest.raises(ValueError) as expected:
        templates.detection(names)
    with pytest.raises(ValueError) as got:
        _core.template_detection(names)
    assert str(got.value) == str(expected.value)
    with pytest.raises(ValueError) as got_pose:
        _core.template_pose(["nose"], names)
    assert str(got_pose.value) == str(expected.value)
    if len(names) == 1:
        with pytest.raises(ValueError) as got_one:
            _core.template_generation(names[0])
        assert str(got_one.value) == str(expected.value)


# --- Result.to_json -----------------------------------------------------------------------------------------

LABELS = ["person", "the red ball", "caf\u00e9 \U0001f600", 'say "hi"', "tab\there", "back\\slash", "\x7f\x01"]


def _random_result(rng: np.random.Generator) -> Result:
    def box():
        scale = 10.0 ** rng.integers(-7, 18)
        return tuple(float(v) for v in rng.normal(0, 1, 4) * scale)

    h, w = (int(v) for v in rng.integers(1, 6, 2))
    detections = []
    for i in range(int(rng.integers(0, 4))):
        score = float(np.float32(rng.random())) if i % 2 else 1 / (1 + math.exp(-rng.normal()))
        mask = rng.random((h, w)) > 0.5 if rng.random() > 0.3 else None
        detections.append(Detection(str(rng.choice(LABELS)), "det", score, box(), mask, int(rng.integers(0, 900))))
    segmentation = None
    if rng.random() > 0.4:
        labels = [str(v) for v in rng.choice(LABELS, int(rng.integers(1, 4)))]  # may repeat a label
        segmentation = SemanticMap(rng.integers(-1, len(labels), (h, w)).astype(np.int32), labels)
    poses = []
    for _ in range(int(rng.integers(0, 3))):
        k = int(rng.integers(0, 4))
        kps = (rng.normal(0, 1, (k, 3)) * 10.0 ** rng.integers(-4, 4)).astype(np.float32)
        poses.append(Pose("person", float(np.float32(rng.random())), box(), kps, LABELS[:k], 0))
    timings = {}
    for stage in rng.choice(["vision", "llm_prefill", "decode", "object_decoder"], int(rng.integers(0, 6))):
        timings[str(stage)] = timings.get(str(stage), 0.0) + float(rng.random() * 10.0 ** rng.integers(-4, 5))
    return Result(
        text="".join(rng.choice(LABELS, 3)),
        token_ids=[int(v) for v in rng.integers(0, 32000, int(rng.integers(0, 5)))],
        stop_reason=str(rng.choice(["eos", "length", "stop"])),
        links=[Link("det", str(rng.choice(LABELS)), int(rng.integers(0, 500)))],
        detections=detections,
        segmentation=segmentation,
        poses=poses,
        images=[np.zeros((int(rng.integers(1, 9)), int(rng.integers(1, 9)), 3), np.uint8)],
        timings=timings,
    )


def _cpp_json(r: Result, indent) -> str:
    # Timings go in as the loop records them: a stage may be listed twice, and the JSON sums it.
    timings = []
    for stage, ms in r.timings.items():
        timings += [(stage, ms / 2), (stage, ms / 2)] if ms > 1 else [(stage, ms)]
    return _core.result_to_json(
        r.text,
        r.token_ids,
        r.stop_reason,
        [(lk.kind, lk.label, lk.position) for lk in r.links],
        [(d.label, d.kind, d.score, d.box_xyxy, d.mask, d.query_index) for d in r.detections],
        None if r.segmentation is None else (r.segmentation.label_map, r.segmentation.labels),
        [(p.label, p.score, p.box_xyxy, p.keypoints, p.keypoint_names, p.query_index) for p in r.poses],
        [list(im.shape) for im in r.images],
        timings,
        indent,
    )


@pytest.mark.parametrize("seed", range(40))
def test_to_json_equals_python(seed):
    r = _random_result(np.random.default_rng(seed))
    # Timings summed from halves differ from the Python sum by rounding; compare on the C++ sums.
    r.timings = {k: (v / 2 + v / 2 if v > 1 else v) for k, v in r.timings.items()}
    for indent in (2, None, 0, 4):
        assert _cpp_json(r, indent) == r.to_json(indent=indent)


def test_to_json_special_floats_equal_python():
    values = [0.1, 100.0, 1e-4, 1e-5, 1e16, 9999999999999998.0, -0.0, 5e-324, 1.7976931348623157e308, 0.1 + 0.2]
    values += [float("nan"), float("inf"), -float("inf")]
    for v in values:
        r = Result(detections=[Detection("x", "grd", v, (v, v, v, v), None, 0)], timings={"vision": v})
        assert _cpp_json(r, 2) == r.to_json(), v


# --- generated images to uint8 ------------------------------------------------------------------------------


def test_images_to_uint8_equals_python():
    rng = np.random.default_rng(0)
    images = rng.normal(0.5, 0.6, (2, 3, 5, 7)).astype(np.float32)
    images[0, 0, 0, :4] = [0.5 / 255, 1.5 / 255, 254.5 / 255, 1.0]
    got = _core.images_to_uint8(images)
    expected = [(np.clip(im.transpose(1, 2, 0), 0, 1) * 255 + 0.5).astype(np.uint8) for im in images]
    assert len(got) == 2
    for g, e in zip(got, expected):
        assert g.dtype == np.uint8 and g.shape == (5, 7, 3)
        np.testing.assert_array_equal(g, e)
    with pytest.raises(TypeError, match="images must be float32, got float64"):
        _core.images_to_uint8(images.astype(np.float64))


# --- post-processing against Pipeline._postprocess ------------------------------------------------------------

POST = {
    "det_top_k": 6,
    "det_score_threshold": 0.3,
    "nms_iou": 0.5,
    "mask_threshold": 0.5,
    "seg_score_threshold": 0.3,
    "pose_top_k": 5,
    "pose_score_threshold": 0.3,
}


def _python_postprocess(raw, groups, keypoint_groups, labels, size, max_groups, post):
    """Pipeline._postprocess on a stand-in pipeline that holds only what it reads."""
    router = types.SimpleNamespace(
        groups_for=lambda kind: {"groups": groups} if kind == "object" else {"keypoints": keypoint_groups}
    )
    spec = types.SimpleNamespace(facts={"max_groups": max_groups})
    fake = types.SimpleNamespace(post=post, router=router, _graph_spec=lambda name: spec)
    fake._detection = types.MethodType(Pipeline._detection, fake)
    frame = types.SimpleNamespace(size=size)
    result = Result()
    Pipeline._postprocess(fake, raw, labels, frame, result)
    return result


def _group(kind, position, index):
    return types.SimpleNamespace(kind=kind, position=position, index=index)


@pytest.mark.parametrize("seed", range(6))
@pytest.mark.parametrize("nms", [0.5, None])
def test_object_results_equal_python(seed, nms):
    rng = np.random.default_rng(seed)
    max_groups, queries, chunks = 4, 12, 2
    resized, padded = (24, 20), (32, 32)
    width, height = 37, 45
    logits = rng.normal(-1, 2, (chunks, queries, max_groups)).astype(np.float32)
    boxes = rng.uniform(0.1, 0.9, (chunks, queries, 4)).astype(np.float32)
    masks = rng.normal(0, 3, (chunks, queries, padded[0] // 4, padded[1] // 4)).astype(np.float32)
    kinds = ["grd", "det", "det", "seg", "det", "seg", "det", "grd"]
    groups = [_group(kind, 10 + i, i) for i, kind in enumerate(kinds)]
    labels = {10 + i: ["cat", "dog", "cat", "sky"][i % 4] for i in range(len(kinds))}
    post = dict(POST, nms_iou=nms)
    raw = {
        "object": {
            "logits": logits,
            "pred_boxes": boxes,
            "pred_masks": masks,
            "_det": (np.zeros((1, 3, *padded), np.float32), None, resized),
        }
    }
    expected = _python_postprocess(raw, groups, [], labels, (width, height), max_groups, post)
    got = _core.object_results(
        logits, boxes, masks, [(g.kind, labels[g.position], g.index) for g in groups], max_groups, resized, width,
        height, post,
    )
    assert len(got["detections"]) == len(expected.detections) > 2
    for (label, kind, score, box, mask, query), e in zip(got["detections"], expected.detections):
        assert (label, kind, query) == (e.label, e.kind, e.query_index)
        assert score == e.score  # bit for bit: the same float64 / float32 sigmoid
        assert tuple(box) == e.box_xyxy
        np.testing.assert_array_equal(mask, e.mask)
    label_map, seg_labels = got["segmentation"]
    assert seg_labels == expected.segmentation.labels
    np.testing.assert_array_equal(label_map, expected.segmentation.label_map)


@pytest.mark.parametrize("seed", range(4))
def test_pose_results_equal_python(seed):
    rng = np.random.default_rng(seed)
    queries, kmax = 10, 5
    padded, resized, width, height = (32, 64), (30, 57), 114, 60
    objects = [_group("det", 3, 0), _group("det", 7, 1)]
    keypoint_groups = [_group("pose", 20 + i, 0) for i in range(3)]
    labels = {3: "person", 7: "cat", 20: "nose", 21: "left eye", 22: "tail"}
    logits = np.full((1, queries, 100), -np.inf, np.float32)
    logits[0, :, :2] = rng.normal(0, 2, (queries, 2))
    logits[0, 3, :2] = logits[0, 5, :2]  # ties: the query-major order decides
    boxes = rng.uniform(0.1, 0.9, (1, queries, 4)).astype(np.float32)
    keypoints = rng.uniform(0, 1, (1, queries, 3 * kmax)).astype(np.float32)
    raw = {
        "pose": {
            "pred_logits": logits,
            "pred_boxes": boxes,
            "pred_keypoints": keypoints,
            "_det": (np.zeros((1, 3, *padded), np.float32), None, resized),
            "_objects": objects,
        }
    }
    expected = _python_postprocess(raw, [], keypoint_groups, labels, (width, height), 4, POST)
    got = _core.pose_results(
        logits, boxes, keypoints, ["person", "cat"], ["nose", "left eye", "tail"], padded, resized, width, height, POST
    )
    assert len(got["poses"]) == len(expected.poses) > 1
    for (label, score, box, kps, names, query), e in zip(got["poses"], expected.poses):
        assert (label, names, query) == (e.label, e.keypoint_names, e.query_index)
        assert score == e.score
        assert tuple(box) == e.box_xyxy
        np.testing.assert_array_equal(kps, e.keypoints)
