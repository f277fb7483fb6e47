"""The perception node (`visionllm_edge.node`, csrc/node/) and KV prefix reuse across frames, on tiny-random.

Reuse across frames: a request on a new image keeps the KV rows before the first patch token (the system
prompt) and still gives the tokens a fresh Pipeline gives (boxes agree to float rounding: the reused rows came
from a prefill of other shapes). The node: its outputs equal `Pipeline`'s task results on the same picture for
every encoding it takes (rgb8, bgr8, rgba8, bgra8 with row padding, mono8), carry the frame's stamp, follow
set_prompt, and run on the worker thread; the node and the Pipeline it is compared with see the same requests
in the same order, so those comparisons are exact. The scheduling itself (rate, dropping, stop/start,
failures) is tested in C++ (csrc/tests/test_perception_node.cpp).
"""

from __future__ import annotations

import array
import time
from types import SimpleNamespace

import numpy as np
import pytest
from conftest import scene
from visionllm_edge.contract import IMAGE_PATCH_TOKEN
from visionllm_edge.node import PerceptionNode
from visionllm_edge.pipeline import Pipeline

CLASSES = ["circle", "square"]
#: Random weights score few [SEG] pixels above the manifest's threshold; both sides lower it alike.
POSTPROCESS = {"seg_score_threshold": 0.0}


class Collecting(PerceptionNode):
    """A node on the artifact that collects its outputs and failures."""

    def __init__(self, artifact, task="detect", names=CLASSES, text="", rate_hz=0.0):
        self.outputs: list[dict] = []
        self.failures: list[tuple[dict, str]] = []
        super().__init__(
            artifact,
            self.outputs.append,
            task=task,
            names=names,
            text=text,
            rate_hz=rate_hz,
            on_failure=lambda header, message: self.failures.append((header, message)),
            postprocess=POSTPROCESS,
        )

    def run(self, msg) -> dict:
        """Pushes one message and runs it now; its output."""
        self.push_message(msg)
        assert self.process_pending()
        assert not self.failures, self.failures
        return self.outputs[-1]


def message(rgb: np.ndarray, encoding: str, stamp=(0, 0), pad: int = 0) -> SimpleNamespace:
    """The picture as a sensor_msgs/Image-like message of `encoding`, rows padded by `pad` junk bytes."""
    if encoding == "mono8":
        pixels = gray(rgb)[..., None]
    else:
        pixels = rgb[..., ::-1] if encoding.startswith("bgr") else rgb
        if encoding.endswith("a8"):
            alpha = np.full(rgb.shape[:2] + (1,), 77, dtype=np.uint8)
            pixels = np.concatenate([pixels, alpha], axis=-1)
    h, w, c = pixels.shape
    rows = np.full((h, w * c + pad), 0xEE, dtype=np.uint8)
    rows[:, : w * c] = pixels.reshape(h, w * c)
    header = SimpleNamespace(stamp=SimpleNamespace(sec=stamp[0], nanosec=stamp[1]), frame_id="camera_optical")
    return SimpleNamespace(
        header=header,
        height=h,
        width=w,
        encoding=encoding,
        is_bigendian=0,
        step=w * c + pad,
        data=array.array("B", rows.tobytes()),
    )  # rclpy's type for uint8[]


def gray(rgb: np.ndarray) -> np.ndarray:
    return np.round(rgb.astype(np.float64) @ [0.299, 0.587, 0.114]).astype(np.uint8)


def corners(det: dict) -> tuple[float, float, float, float]:
    b = det["bbox"]
    cx, cy, sx, sy = b["center"]["x"], b["center"]["y"], b["size_x"], b["size_y"]
    return (cx - sx / 2, cy - sy / 2, cx + sx / 2, cy + sy / 2)


def assert_same_detections(out: dict, want, what: str):
    assert len(out["detections"]) == len(want.detections) > 0, what
    for i, (got, ref) in enumerate(zip(out["detections"], want.detections)):
        assert got["id"] == str(i)
        assert got["results"][0]["hypothesis"]["class_id"] == ref.label, what
        assert got["results"][0]["hypothesis"]["score"] == ref.score, what
        assert got["bbox"]["center"]["theta"] == 0
        # centre and size computed from the corners in double: back to corners within rounding
        np.testing.assert_allclose(corners(got), ref.box_xyxy, rtol=0, atol=1e-9, err_msg=what)


@pytest.fixture(scope="module")
def artifact(tiny_artifact):
    return tiny_artifact


# --- KV prefix reuse across frames ------------------------------------------------------------------------


def test_a_new_frame_reuses_the_system_prompt_and_answers_as_a_fresh_pipeline(artifact):
    pipe = Pipeline.load(artifact)
    first, second = scene(31, 120, 90), scene(32, 100, 80)
    kw = dict(max_new_tokens=8, repetition_penalty=1.3)
    pipe(first, "Describe the image.", **kw)
    again = pipe(second, "Describe the image.", **kw)
    fresh = Pipeline.load(artifact)(second, "Describe the image.", **kw)

    reused = again.raw["stats"]["reused_rows"]
    patch = pipe.manifest.token_id(IMAGE_PATCH_TOKEN)
    first_patch = int(np.flatnonzero(again.raw["input_ids"] == patch)[0])
    assert 0 < reused <= first_patch  # nothing that saw the old image is reused
    assert fresh.raw["stats"]["reused_rows"] == 0
    assert again.timings.get("vision", 0) > 0  # it is a new frame, encoded
    assert again.token_ids == fresh.token_ids
    assert again.text == fresh.text


def test_detection_on_a_new_frame_after_reuse_equals_a_fresh_pipeline(artifact):
    pipe = Pipeline.load(artifact)
    pipe.detect(scene(33, 120, 90), CLASSES)
    again = pipe.detect(scene(34, 120, 90), CLASSES)
    fresh = Pipeline.load(artifact).detect(scene(34, 120, 90), CLASSES)
    assert again.raw["stats"]["reused_rows"] > 0
    assert [d.label for d in again.detections] == [d.label for d in fresh.detections]
    # The reused rows were computed in another prefill (other batch shapes): equal to float rounding.
    np.testing.assert_allclose(
        [d.box_xyxy for d in again.detections], [d.box_xyxy for d in fresh.detections], rtol=1e-4, atol=1e-4
    )
    np.testing.assert_allclose(
        [d.score for d in again.detections], [d.score for d in fresh.detections], rtol=1e-4, atol=1e-5
    )


# --- the node ---------------------------------------------------------------------------------------------


def test_node_detections_equal_pipeline_detect_for_every_encoding(artifact):
    node, pipe = Collecting(artifact), Pipeline.load(artifact, postprocess=POSTPROCESS)
    picture = scene(35, 120, 90)
    for i, encoding in enumerate(["rgb8", "bgr8", "rgba8", "bgra8", "mono8"]):
        stamp = (1700000000 + i, 250 * i)
        out = node.run(message(picture, encoding, stamp=stamp, pad=3 * i))
        seen = np.repeat(gray(picture)[..., None], 3, axis=-1) if encoding == "mono8" else picture
        want = pipe.detect(seen, CLASSES)
        assert out["header"] == {"stamp": stamp, "frame_id": "camera_optical"}
        assert out["task"] == "detect"
        assert_same_detections(out, want, encoding)
        assert all(d["mask"] is None and d["keypoints"] == [] for d in out["detections"])
        assert out["answer"] == want.text
        assert out["counters"] == {"received": i + 1, "processed": i + 1, "dropped": 0, "failed": 0}
        assert out["stats"]["reused_rows"] == want.raw["stats"]["reused_rows"]
    # The colour frames are one picture (the whole prefix reused); the grey one is a new frame that still
    # reuses the system prompt.
    assert 0 < node.outputs[-1]["stats"]["reused_rows"] < node.outputs[1]["stats"]["reused_rows"]


def test_set_prompt_changes_the_task_from_the_next_frame(artifact):
    node, pipe = Collecting(artifact), Pipeline.load(artifact, postprocess=POSTPROCESS)
    picture = scene(36, 100, 100)
    out = node.run(message(picture, "rgb8", stamp=(1, 0)))
    assert_same_detections(out, pipe.detect(picture, CLASSES), "detect")

    node.set_prompt("ground", text="the red circle")
    out = node.run(message(picture, "rgb8", stamp=(2, 0)))
    assert out["task"] == "ground"
    assert_same_detections(out, pipe.ground(picture, "the red circle"), "ground")

    node.set_prompt("segment", names=["circle", "square"])
    out = node.run(message(picture, "rgb8", stamp=(3, 0)))
    want = pipe.segment(picture, ["circle", "square"]).segmentation
    present = [i for i in range(len(want.labels)) if (want.label_map == i).any()]
    assert present, "the semantic map is empty: the comparison would prove nothing"
    assert [d["results"][0]["hypothesis"]["class_id"] for d in out["detections"]] == [
        want.labels[i] for i in present
    ]
    for got, i in zip(out["detections"], present):
        assert got["mask"].dtype == np.uint8 and got["mask"].shape == (100, 100)
        np.testing.assert_array_equal(got["mask"], (want.label_map == i).astype(np.uint8) * 255)
        ys, xs = np.nonzero(want.label_map == i)
        assert corners(got) == (xs.min(), ys.min(), xs.max() + 1, ys.max() + 1)

    node.set_prompt("pose", names=["nose", "left eye"], objects=["person"])
    out = node.run(message(picture, "rgb8", stamp=(4, 0)))
    want = pipe.pose(picture, ["nose", "left eye"], ["person"])
    assert len(out["detections"]) == len(want.poses) > 0
    for got, ref in zip(out["detections"], want.poses):
        np.testing.assert_allclose(corners(got), ref.box_xyxy, rtol=0, atol=1e-9)
        assert [k["name"] for k in got["keypoints"]] == ref.keypoint_names
        np.testing.assert_array_equal([[k["x"], k["y"], k["score"]] for k in got["keypoints"]], ref.keypoints)

    node.set_prompt("question", text="What is in the picture?", max_new_tokens=6)
    out = node.run(message(picture, "rgb8", stamp=(5, 0)))
    assert out["task"] == "question"
    assert out["answer"] == pipe(picture, "What is in the picture?", max_new_tokens=6).text
    assert out["stats"]["reused_rows"] > 0


def test_bad_frames_and_prompts_are_value_errors(artifact):
    node = Collecting(artifact)
    picture = scene(37, 40, 30)
    bad = message(picture, "rgb8")
    bad.encoding = "rgb16"
    with pytest.raises(
        ValueError, match=r"'rgb16' is not supported; supported: rgb8, bgr8, rgba8, bgra8, mono8"
    ):
        node.push_message(bad)
    short = message(picture, "rgb8")
    short.data = short.data[:-1]
    with pytest.raises(
        ValueError, match=r"data has 3599 bytes, expected at least step 120 x height 30 = 3600"
    ):
        node.push_message(short)
    with pytest.raises(ValueError, match=r"unknown task 'track'"):
        node.set_prompt("track")
    with pytest.raises(ValueError, match=r"node prompt \(ground\): text is empty"):
        node.set_prompt("ground")
    with pytest.raises(TypeError, match=r"must be uint8, got float32"):
        node.push(picture.astype(np.float32))
    with pytest.raises(ValueError, match=r"a rgba8 picture is H x W x 4, got shape \(30, 40, 3\)"):
        node.push(picture, "rgba8")
    assert node.counters["received"] == 0


def test_push_of_a_numpy_picture_equals_the_message_path(artifact):
    node = Collecting(artifact)
    picture = scene(39, 64, 48)
    node.push(picture[..., ::-1], "bgr8", stamp=(7, 8), frame_id="cam")
    assert node.process_pending()
    node.push(gray(picture), "mono8")
    assert node.process_pending()
    again = Collecting(artifact)
    want = [again.run(message(picture, "bgr8")), again.run(message(picture, "mono8"))]
    assert node.outputs[0]["header"] == {"stamp": (7, 8), "frame_id": "cam"}
    for got, ref in zip(node.outputs, want):
        assert got["detections"] == ref["detections"]


def test_the_worker_thread_runs_the_newest_frame(artifact):
    node = Collecting(artifact, rate_hz=50.0)
    node.start()
    try:
        assert node.running
        node.push_message(message(scene(38, 64, 64), "rgb8", stamp=(10, 0)))
        deadline = time.monotonic() + 60
        while not node.outputs and time.monotonic() < deadline:
            time.sleep(0.01)
    finally:
        node.stop()
    assert not node.running
    assert not node.failures, node.failures
    assert [o["header"]["stamp"] for o in node.outputs] == [(10, 0)]
    assert node.outputs[0]["latency_ms"] >= node.outputs[0]["run_ms"] > 0
