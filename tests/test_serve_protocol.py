"""`serving.protocol` without a server or Triton: a `Result` survives `encode_result` / `decode_response`,
and requests are checked by name before anything runs (tests/test_serve.py goes through tritonserver)."""

from __future__ import annotations

import json

import numpy as np
import pytest
from visionllm_edge.results import Detection, Link, Pose, Result, SemanticMap
from visionllm_edge.serving import protocol


def _result() -> Result:
    rng = np.random.default_rng(0)
    label_map = rng.integers(-1, 2, size=(6, 9)).astype(np.int32)
    return Result(
        text="circle[DET] square[SEG]",
        token_ids=[5, 6, 7],
        stop_reason="length",
        links=[Link("det", "circle", 1, np.ones((4, 8), np.float32)), Link("seg", "square", 3)],
        detections=[
            Detection(
                "circle", "det", np.float32(0.75), (1.5, 2.25, 7.125, 5.0), rng.random((6, 9)) > 0.5, 3
            ),
            Detection("circle", "det", 0.5, (0.1, 0.2, 0.3, 0.4), None, 8),
            Detection("circle", "det", 0.25, (0.0, 1.0, 2.0, 3.0), rng.random((6, 9)) > 0.5, 11),
        ],
        segmentation=SemanticMap(label_map, ["sky", "grass"]),
        poses=[Pose("person", 0.9, (1.0, 2.0, 3.0, 4.0), np.float32([[1.23456, 2.5, 0.7]]), ["head"])],
        images=[
            rng.integers(0, 256, (4, 5, 3), dtype=np.uint8),
            rng.integers(0, 256, (3, 7, 3), dtype=np.uint8),
        ],
        timings={"prefill": 1.25},
    )


def test_a_result_survives_the_outputs_with_its_masks_semantic_map_and_images():
    want = _result()
    outputs = protocol.encode_result(want)
    assert [s.name for s in protocol.OUTPUTS] == list(outputs)
    # Two detection masks, then one per semantic-map label; images padded to the largest (4 x 7).
    assert outputs["masks"].shape == (4, 6, 9) and outputs["masks"].dtype == np.uint8
    assert outputs["images"].shape == (2, 4, 7, 3)
    got = protocol.decode_response(outputs)
    assert (got.text, got.token_ids, got.stop_reason) == (want.text, want.token_ids, want.stop_reason)
    assert [(lk.kind, lk.label, lk.position) for lk in got.links] == [
        (lk.kind, lk.label, lk.position) for lk in want.links
    ]
    for g, w in zip(got.detections, want.detections, strict=True):
        assert (g.label, g.kind, g.score, g.box_xyxy, g.query_index) == (
            w.label,
            w.kind,
            float(w.score),
            w.box_xyxy,
            w.query_index,
        )
        assert (g.mask is None) == (w.mask is None)
        if w.mask is not None:
            np.testing.assert_array_equal(g.mask, w.mask)
    np.testing.assert_array_equal(got.segmentation.label_map, want.segmentation.label_map)
    assert got.segmentation.labels == want.segmentation.labels
    np.testing.assert_allclose(got.poses[0].keypoints, [[1.235, 2.5, 0.7]], rtol=0, atol=1e-6)
    for g, w in zip(got.images, want.images, strict=True):
        np.testing.assert_array_equal(g, w)
    assert got.timings == want.timings


def test_an_empty_result_has_empty_tensors_and_absent_ones_read_as_empty():
    outputs = protocol.encode_result(Result(text="yes", token_ids=[1]))
    assert outputs["masks"].shape == (0, 0, 0) and outputs["images"].shape == (0, 0, 0, 3)
    got = protocol.decode_response({"result": outputs["result"]})  # what PyTriton sends for this result
    assert (got.text, got.detections, got.images, got.segmentation) == ("yes", [], [], None)


def test_masks_that_do_not_match_the_json_are_refused():
    outputs = protocol.encode_result(_result())
    outputs["masks"] = outputs["masks"][:3]
    with pytest.raises(ValueError, match="masks: expected 2 detection masks and 2 semantic-map masks, got 3"):
        protocol.decode_response(outputs)


def test_encode_request_sends_arrays_raw_and_bytes_encoded():
    image = np.zeros((4, 5, 3), np.uint8)
    inputs = protocol.encode_request(image, "What is in <region>?", [(1, 2, 3, 4)], max_new_tokens=4)
    assert set(inputs) == {"prompt", "image_raw", "regions", "options"}
    assert inputs["regions"].dtype == np.float32 and inputs["regions"].shape == (1, 4)
    assert json.loads(inputs["options"][0]) == {"max_new_tokens": 4}
    encoded = protocol.encode_request(b"\x89PNG...", "hi")
    assert set(encoded) == {"prompt", "image"} and encoded["image"].dtype == np.uint8


@pytest.mark.parametrize(
    "options, message",
    [
        ({"colour": 1}, r"options: unknown key\(s\) \['colour'\]"),
        ({"max_new_tokens": "8"}, r'options.max_new_tokens: expected an integer, got "8"'),
        ({"seed": True}, r"options.seed: expected an integer, got true"),
        ({"temperature": float("nan")}, r"options.temperature: expected a finite number"),
        ({"task": "caption"}, r"options.task: expected one of \['detect', "),
        ({"task": "detect"}, r"options.classes: task 'detect' needs it"),
        ({"task": "detect", "classes": "circle"}, r"options.classes: expected a non-empty list of strings"),
        ({"classes": ["circle"]}, r"options.classes: only with task detect or segment, got task None"),
        (
            {"task": "ground", "instruction": "x", "phrase": "a"},
            r"options.instruction: only for a free request",
        ),
    ],
)
def test_a_bad_option_is_refused_by_name(options, message):
    with pytest.raises(protocol.RequestError, match=message):
        protocol.check_options(options)


@pytest.mark.parametrize(
    "inputs, message",
    [
        (
            {"prompt": np.array([b"hi"], dtype=object), "extra": np.zeros(1)},
            r"inputs: unknown input\(s\) \['extra'\]",
        ),
        ({"prompt": np.array([b"\xff"], dtype=object)}, r"prompt: not valid UTF-8"),
        (
            {"prompt": np.array([b"a", b"b"], dtype=object)},
            r"prompt: expected one UTF-8 string \(BYTES \[1\]\), got shape \[2\]",
        ),
        (
            {
                "prompt": np.array([b"hi"], dtype=object),
                "image": np.zeros(3, np.uint8),
                "image_raw": np.zeros((2, 2, 3), np.uint8),
            },
            r"image and image_raw: give one image, got both",
        ),
        (
            {"prompt": np.array([b"hi"], dtype=object), "options": np.array([b"[1, 2]"], dtype=object)},
            r"options: expected a JSON object",
        ),
        (
            {
                "prompt": np.array([b"a circle"], dtype=object),
                "options": np.array([b'{"task": "detect", "classes": ["c"]}'], dtype=object),
                "image_raw": np.zeros((2, 2, 3), np.uint8),
            },
            r"prompt: must be empty for task 'detect'",
        ),
        (
            {
                "prompt": np.array([b"make it blue"], dtype=object),
                "options": np.array([b'{"task": "edit"}'], dtype=object),
            },
            r"image: task 'edit' needs an image",
        ),
        (
            {
                "prompt": np.array([b"a circle"], dtype=object),
                "options": np.array([b'{"task": "generate"}'], dtype=object),
                "image_raw": np.zeros((2, 2, 3), np.uint8),
            },
            r"image: task 'generate' takes no image",
        ),
    ],
    ids=[
        "unknown input",
        "prompt not UTF-8",
        "two prompts",
        "two images",
        "options a list",
        "prompt with detect",
        "edit without image",
        "generate with image",
    ],
)
def test_a_malformed_request_is_refused_before_the_pipeline_runs(inputs, message):
    with pytest.raises(protocol.RequestError, match=message):
        protocol.run_request(None, inputs)  # no pipeline: refused before one would be called
    with pytest.raises(protocol.RequestError, match=message):
        next(protocol.stream_request(None, inputs))
