"""The C++ results side (csrc/postprocess/results.cpp, csrc/loop/result.cpp, csrc/loop/templates.cpp) against
the Python SDK and the PyTorch reference: the task templates of `visionllm_edge.templates`, `Result.to_json`
(text equal, character for character), the uint8 conversion of generated images, and the post-processing of
the reference loop, `ReferencePipeline._postprocess` in export/reference.py (detections, masks, the semantic
map and poses on random decoder outputs). The reference shares no code with the C++ core, so the
post-processing tests need torch and skip without it.
"""

from __future__ import annotations

import functools
import math
import types

import numpy as np
import pytest
from visionllm_edge import _core, templates
from visionllm_edge.results import Detection, Link, Pose, Result, SemanticMap

# --- templates ----------------------------------------------------------------------------------------------

NAME_LISTS = [
    ["person"],
    [" person", "car\t", "traffic light"],
    ["caf\u00e9", "\u00a0sofa\u3000", "it's", 'say "hi"'],
]
PHRASES = ["the red ball", "  a dog on the left  ", "a circle...", "make it blue.", "x . . ", "\u2003tree"]
BAD_NAMES = [
    [],
    [""],
    ["cat", "  "],
    ["a", "\u3000\n"],
    ["ok", "it's", ""],
    ["cat[DET]"],  # a special token's spelling would add a group or a marker
    ["ok", "<region>"],
    ["a\x00b"],  # a control character
]


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


def test_label_delimiters_are_refused_in_list_names_only():
    # The answer's labels are split at the delimiters, so "cup of tea[DET]" would be labelled "tea"; a
    # phrase or a caption is never split.
    with pytest.raises(ValueError) as expected:
        templates.detection(["cup of tea"])
    with pytest.raises(ValueError) as got:
        _core.template_detection(["cup of tea"])
    assert str(got.value) == str(expected.value) == (
        "name 'cup of tea' contains ' of ', where the answer's labels are split: its label would not be the name"
    )
    assert _core.template_grounding("cup of tea") == templates.grounding("cup of tea")
    assert _core.template_generation("a cup of tea, on a table") == templates.generation("a cup of tea, on a table")


# --- Result.to_json -----------------------------------------------------------------------------------------

LABELS = [
    "person",
    "the red ball",
    "caf\u00e9 \U0001f600",
    'say "hi"',
    "tab\there",
    "back\\slash",
    "\x7f\x01",
]


def _random_result(rng: np.random.Generator) -> Result:
    def box():
        scale = 10.0 ** rng.integers(-7, 18)
        return tuple(float(v) for v in rng.normal(0, 1, 4) * scale)

    h, w = (int(v) for v in rng.integers(1, 6, 2))
    detections = []
    for i in range(int(rng.integers(0, 4))):
        score = float(np.float32(rng.random())) if i % 2 else 1 / (1 + math.exp(-rng.normal()))
        mask = rng.random((h, w)) > 0.5 if rng.random() > 0.3 else None
        detections.append(
            Detection(str(rng.choice(LABELS)), "det", score, box(), mask, int(rng.integers(0, 900)))
        )
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
    values = [
        0.1,
        100.0,
        1e-4,
        1e-5,
        1e16,
        9999999999999998.0,
        -0.0,
        5e-324,
        1.7976931348623157e308,
        0.1 + 0.2,
    ]
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


# --- post-processing against the reference's ReferencePipeline._postprocess ---------------------------------

POST = {
    "det_top_k": 6,
    "det_score_threshold": 0.3,
    "nms_iou": 0.5,
    "mask_threshold": 0.5,
    "seg_score_threshold": 0.3,
    "pose_top_k": 5,
    "pose_score_threshold": 0.3,
}


@pytest.fixture(scope="module")
def reference():
    """export/reference.py, the independent post-processing (it needs torch)."""
    pytest.importorskip("torch", reason="the reference post-processing (export/reference.py) needs torch")
    from visionllm_edge.export import reference as ref

    return ref


def _reference_postprocess(ref, links, raw, image_size, resized_hw, padded_hw, max_groups, post) -> Result:
    """`ReferencePipeline._postprocess` alone, on a stand-in pipeline and request that hold only what it
    reads: the settings, the object decoder's group width (`max_text_len`), the image size and the detection
    image's padded and resized sizes."""
    import torch

    settings = ref.PostProcessSettings(**post)
    config = types.SimpleNamespace(official={"gdino_config": {"max_text_len": max_groups}})
    fake = types.SimpleNamespace(post=settings, config=config)
    for name in ("_mask_to_image", "_detection", "_semantic_map"):
        setattr(fake, name, functools.partial(getattr(ref.ReferencePipeline, name), fake))
    prep = types.SimpleNamespace(
        image_size=image_size,
        det_resized=resized_hw,
        det_pixels=torch.zeros(1, 3, *padded_hw),
        history_objects=[],
    )
    result = Result()
    ref.ReferencePipeline._postprocess(fake, links, raw, prep, result)
    return result


def _by_query(items):
    """Detections or poses in an order that top-k and NMS ties cannot change: kind / label, query, score."""
    return sorted(items, key=lambda x: (x[0], x[1], x[-1], -x[2]))


# Groups of the object decoder: 8 groups in calls of 4, so [DET] and [GRD] groups fall in both calls.
# "one call" keeps the [SEG] groups in the first call; "both calls" puts one in each.
OBJECT_KINDS = {
    "one call": ["grd", "det", "seg", "seg", "det", "det", "det", "grd"],
    "both calls": ["grd", "det", "det", "seg", "det", "seg", "det", "grd"],
}


def _object_case(seed, layout):
    rng = np.random.default_rng(seed)
    max_groups, queries, chunks = 4, 12, 2
    resized, padded = (24, 20), (32, 32)
    width, height = 37, 45
    logits = rng.normal(-1, 2, (chunks, queries, max_groups)).astype(np.float32)
    boxes = rng.uniform(0.1, 0.9, (chunks, queries, 4)).astype(np.float32)
    masks = rng.normal(0, 3, (chunks, queries, padded[0] // 4, padded[1] // 4)).astype(np.float32)
    labels = ["cat", "dog", "cat", "sky", "cat", "dog", "cat", "sky"]
    # Slot i is the i-th object group of the answer: call i // max_groups, column i % max_groups.
    groups = [(kind, labels[i], i) for i, kind in enumerate(OBJECT_KINDS[layout])]
    return logits, boxes, masks, groups, max_groups, resized, padded, width, height


def _object_results_both(reference, seed, layout, nms):
    logits, boxes, masks, groups, max_groups, resized, padded, width, height = _object_case(seed, layout)
    post = dict(POST, nms_iou=nms)
    links = [Link(kind, label, 10 + slot) for kind, label, slot in groups]
    raw = {"object": {"logits": logits, "pred_boxes": boxes, "pred_masks": masks}}
    expected = _reference_postprocess(
        reference, links, raw, (width, height), resized, padded, max_groups, post
    )
    got = _core.object_results(logits, boxes, masks, groups, max_groups, resized, width, height, post)
    return got, expected, height, width


@pytest.mark.parametrize("seed", range(6))
@pytest.mark.parametrize("nms", [0.5, None])
@pytest.mark.parametrize("layout", list(OBJECT_KINDS))
def test_object_results_equal_reference(reference, seed, nms, layout):
    got, expected, height, width = _object_results_both(reference, seed, layout, nms)
    # The reference lists [GRD] first and [DET] after, then NMS sorts everything by score; C++ keeps [GRD]
    # first. Both are compared in one order, (kind, label, query, score).
    cpp = _by_query([(k, lab, s, tuple(b), m, q) for lab, k, s, b, m, q in got["detections"]])
    ref = _by_query(
        [(d.kind, d.label, d.score, d.box_xyxy, d.mask, d.query_index) for d in expected.detections]
    )
    assert [(k, lab, q) for k, lab, _s, _b, _m, q in cpp] == [(k, lab, q) for k, lab, _s, _b, _m, q in ref]
    assert len(cpp) > 2 and {"det", "grd"} <= {d[0] for d in cpp}
    if nms is None:  # without NMS the [DET] order is the reference's: score, then group, then query
        det_order = [(d[1], d[5]) for d in got["detections"] if d[1] == "det"]
        assert det_order == [(d.kind, d.query_index) for d in expected.detections if d.kind == "det"]
    for (kind, label, score, box, mask, query), e in zip(cpp, ref):
        # C++ takes a [GRD] score's sigmoid in float64, the reference in float32.
        assert score == pytest.approx(e[2], rel=1e-6, abs=1e-12)
        assert box == e[3]  # both in float64 from the float32 outputs, in the same order of operations
        np.testing.assert_array_equal(mask, e[4], err_msg=f"{kind} {label!r} query {query}")
    label_map, seg_labels = got["segmentation"]
    assert seg_labels == expected.segmentation.labels
    assert label_map.dtype == np.int32 and label_map.shape == (height, width)
    if layout == "one call":  # across calls: the test below
        np.testing.assert_array_equal(label_map, expected.segmentation.label_map)
        assert (label_map >= 0).any()


@pytest.mark.parametrize("seed", range(3))
def test_semantic_map_across_decoder_calls_equal_reference(reference, seed):
    got, expected, _h, _w = _object_results_both(reference, seed, "both calls", None)
    np.testing.assert_array_equal(got["segmentation"][0], expected.segmentation.label_map)


@pytest.mark.parametrize("seed", range(4))
def test_pose_results_equal_reference(reference, seed):
    rng = np.random.default_rng(seed)
    queries, kmax = 10, 5
    padded, resized, width, height = (32, 64), (30, 57), 114, 60
    objects, names = ["person", "cat"], ["nose", "left eye", "tail"]
    logits = np.full((1, queries, 100), -np.inf, np.float32)
    logits[0, :, :2] = rng.normal(0, 2, (queries, 2))
    logits[0, 3, :2] = logits[0, 5, :2]  # ties: the query-major order decides
    boxes = rng.uniform(0.1, 0.9, (1, queries, 4)).astype(np.float32)
    keypoints = rng.uniform(0, 1, (1, queries, 3 * kmax)).astype(np.float32)
    links = [Link("det", "person", 3), Link("det", "cat", 7)] + [
        Link("pose", n, 20 + i) for i, n in enumerate(names)
    ]
    raw = {"pose": {"pred_logits": logits, "pred_boxes": boxes, "pred_keypoints": keypoints}}
    expected = _reference_postprocess(reference, links, raw, (width, height), resized, padded, 4, POST)
    got = _core.pose_results(logits, boxes, keypoints, objects, names, padded, resized, width, height, POST)
    assert len(got["poses"]) == len(expected.poses) > 1
    assert got["detections"] == [] and got["segmentation"] is None
    # The same order: score, then query, then object (ties included).
    for (label, score, box, kps, kp_names, query), e in zip(got["poses"], expected.poses):
        assert (label, kp_names, query) == (e.label, e.keypoint_names, e.query_index)
        assert score == pytest.approx(e.score, rel=1e-6)
        assert tuple(box) == e.box_xyxy
        assert kps.dtype == np.float32 and kps.shape == (len(names), 3)
        np.testing.assert_array_equal(kps, e.keypoints)
