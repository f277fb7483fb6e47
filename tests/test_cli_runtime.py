"""`Result.to_coco` / `Result.draw`, and the runtime CLI (`run`, `chat`, `info`) on the tiny artifact.

The first half builds results by hand (no artifact, milliseconds). The second runs `main([...])` on the
session's `tiny_artifact`; the tiny-random weights answer noise, so routing is forced with an answer prefix
where a decoder must run.
"""

from __future__ import annotations

import io
import json

import numpy as np
import pytest
from PIL import Image
from visionllm_edge.cli import main
from visionllm_edge.results import Detection, Pose, Result, SemanticMap, rle_encode
from visionllm_edge.visualize import COCO_KEYPOINTS, skeleton_for

# --- COCO export ------------------------------------------------------------------------------------------


def rle_decode(rle: dict) -> np.ndarray:
    """COCO uncompressed RLE back to a mask, written independently of the encoder (column-major runs)."""
    h, w = rle["size"]
    flat = np.zeros(h * w, dtype=bool)
    pos, value = 0, False
    for count in rle["counts"]:
        flat[pos : pos + count] = value
        pos += count
        value = not value
    assert pos == h * w, "the runs must cover every pixel exactly"
    return flat.reshape((h, w), order="F")


def test_rle_known_counts():
    # Column-major: [[0, 1, 1], [1, 1, 0]] reads 0,1 | 1,1 | 1,0 -> one 0, four 1s, one 0.
    assert rle_encode(np.array([[0, 1, 1], [1, 1, 0]], bool)) == {"size": [2, 3], "counts": [1, 4, 1]}
    # A set first pixel starts with an empty background run, as COCO requires.
    assert rle_encode(np.array([[1, 0], [0, 0]], bool))["counts"] == [0, 1, 3]
    assert rle_encode(np.zeros((3, 4), bool))["counts"] == [12]
    assert rle_encode(np.ones((3, 4), bool))["counts"] == [0, 12]


@pytest.mark.parametrize("seed", range(5))
def test_rle_round_trip(seed):
    rng = np.random.default_rng(seed)
    h, w = rng.integers(1, 40, size=2)
    mask = rng.random((h, w)) < rng.uniform(0.05, 0.95)
    mask[0, 0] = bool(seed % 2)  # both starting values
    rle = rle_encode(mask)
    assert rle["size"] == [int(h), int(w)]
    assert all(isinstance(c, int) for c in rle["counts"])
    np.testing.assert_array_equal(rle_decode(rle), mask)


def _mask(h, w, box):
    m = np.zeros((h, w), bool)
    x0, y0, x1, y1 = box
    m[y0:y1, x0:x1] = True
    return m


def test_to_coco_detections_and_categories():
    cat_mask = _mask(30, 40, (5, 6, 15, 20))
    result = Result(
        detections=[
            Detection("cat", "det", 0.9, (5.0, 6.0, 15.0, 20.0), cat_mask, 3),
            Detection("dog", "det", 0.8, (1.5, 2.5, 11.5, 4.5)),
            Detection("cat", "det", 0.4, (0.0, 0.0, 2.0, 2.0)),
        ]
    )
    coco = result.to_coco(image_id=7, category_ids={"dog": 18})
    json.dumps(coco)  # plain Python types only
    anns = coco["annotations"]
    assert [a["id"] for a in anns] == [1, 2, 3]
    assert all(a["image_id"] == 7 for a in anns)
    # Given ids are kept; new labels continue after the largest given one.
    assert [a["category_id"] for a in anns] == [19, 18, 19]
    assert coco["categories"] == [
        {"id": 18, "name": "dog", "supercategory": ""},
        {"id": 19, "name": "cat", "supercategory": ""},
    ]
    assert anns[0]["bbox"] == [5.0, 6.0, 10.0, 14.0]
    assert anns[1]["bbox"] == [1.5, 2.5, 10.0, 2.0]
    assert anns[0]["score"] == pytest.approx(0.9)
    assert anns[0]["area"] == cat_mask.sum()
    np.testing.assert_array_equal(rle_decode(anns[0]["segmentation"]), cat_mask)
    assert "segmentation" not in anns[1]
    # Without a mapping, ids are assigned from 1 in order of appearance.
    assert [c["name"] for c in result.to_coco()["categories"]] == ["cat", "dog"]


def test_to_coco_semantic_map():
    label_map = -np.ones((10, 12), np.int32)
    label_map[:4] = 0
    label_map[6:, 3:9] = 1
    coco = Result(segmentation=SemanticMap(label_map, ["sky", "grass", "road"])).to_coco()
    anns = coco["annotations"]
    assert len(anns) == 2  # "road" has no pixels
    assert anns[0]["bbox"] == [0.0, 0.0, 12.0, 4.0]
    assert anns[1]["bbox"] == [3.0, 6.0, 6.0, 4.0]
    np.testing.assert_array_equal(rle_decode(anns[1]["segmentation"]), label_map == 1)


def test_to_coco_keypoints():
    kps = np.array([[10.0, 11.0, 0.9], [12.0, 13.0, 0.2], [14.0, 15.0, 0.7]], np.float32)
    pose = Pose("person", 0.95, (8.0, 9.0, 20.0, 30.0), kps, ["nose", "left eye", "right_eye"])
    coco = Result(poses=[pose]).to_coco(category_ids={"person": 1})
    (ann,) = coco["annotations"]
    assert ann["keypoints"] == pytest.approx([10.0, 11.0, 2, 12.0, 13.0, 1, 14.0, 15.0, 2])
    assert [type(v) for v in ann["keypoints"][2::3]] == [int, int, int]
    assert ann["num_keypoints"] == 3
    assert ann["keypoint_scores"] == pytest.approx([0.9, 0.2, 0.7])
    assert ann["bbox"] == [8.0, 9.0, 12.0, 21.0]
    (cat,) = coco["categories"]
    assert cat["keypoints"] == ["nose", "left eye", "right_eye"]
    # COCO's face edges among these three, 1-based: nose-left eye, nose-right eye, left eye-right eye.
    assert sorted(map(sorted, cat["skeleton"])) == [[1, 2], [1, 3], [2, 3]]


def test_skeleton_only_for_known_names():
    assert len(skeleton_for(COCO_KEYPOINTS)) == 19
    assert skeleton_for(["beak", "tail"]) == []


# --- drawing ----------------------------------------------------------------------------------------------


def _grey(h=48, w=64):
    return np.full((h, w, 3), 128, np.uint8)


def test_draw_empty_result_is_the_image():
    image = _grey()
    out = Result(text="no objects").draw(image)
    assert out.shape == image.shape and out.dtype == np.uint8
    np.testing.assert_array_equal(out, image)
    # Generated images are not drawn either.
    np.testing.assert_array_equal(Result(images=[np.zeros((8, 8, 3), np.uint8)]).draw(image), image)


def test_draw_detection_changes_pixels_in_its_box():
    image = _grey()
    box = (20, 20, 44, 40)
    result = Result(detections=[Detection("cat", "det", 0.9, tuple(map(float, box)), _mask(48, 64, box))])
    out = result.draw(image)
    assert out.shape == (48, 64, 3) and out.dtype == np.uint8
    inside = out[box[1] + 3 : box[3] - 3, box[0] + 3 : box[2] - 3]
    assert (inside != 128).any(axis=-1).all(), "the mask overlay covers the inside of the box"
    assert (out[box[1], box[0] : box[2]] != 128).any(), "the box outline is drawn"
    np.testing.assert_array_equal(out[44:, :10], image[44:, :10])  # far corner untouched
    np.testing.assert_array_equal(image, _grey())  # the input is not modified


def test_draw_semantic_map_and_poses(tmp_path):
    image = _grey(100, 160)
    label_map = -np.ones((100, 160), np.int32)
    label_map[70:] = 1
    kps = np.array([[110.0, 60.0, 0.9], [106.0, 56.0, 0.9], [114.0, 56.0, 0.9]])
    named = Pose("person", 0.9, (90.0, 30.0, 130.0, 90.0), kps, ["nose", "left eye", "right eye"])
    unknown = Pose("bird", 0.8, (20.0, 40.0, 50.0, 65.0), np.array([[30.0, 55.0, 0.9]]), ["beak"])
    result = Result(segmentation=SemanticMap(label_map, ["sky", "grass"]), poses=[named, unknown])
    path = tmp_path / "scene.png"
    Image.fromarray(image).save(path)
    out = result.draw(path)  # a path works as the image too
    assert out.shape == (100, 160, 3)
    assert (out[90, 60] != 128).any(), "the semantic overlay colours its label's pixels"
    assert (out[60, 110] != 128).any(), "a keypoint dot is drawn"
    assert (out[56, 110] != 128).any(), "the eyes are joined by a skeleton line"
    assert (out[45, 95] == 128).all(), "inside the box, away from keypoints, the picture shows through"
    assert (out[5:12, 5:12] != 128).any(), "the legend is drawn"
    # Masks and label maps of another size than the picture are resized rather than rejected.
    small = Result(segmentation=SemanticMap(label_map[::2, ::2], ["sky", "grass"])).draw(image)
    assert (small[90, 60] != 128).any()


# --- the CLI on the tiny artifact -------------------------------------------------------------------------


@pytest.fixture(scope="module")
def scene(tmp_path_factory):
    from visionllm_edge.demo import demo_scene

    path = tmp_path_factory.mktemp("cli") / "scene.png"
    demo_scene().save(path)
    return path


def test_run_writes_json_and_drawing(tiny_artifact, scene, tmp_path, capsys):
    out_json, out_png = tmp_path / "result.json", tmp_path / "result.png"
    argv = ["run", str(tiny_artifact), "--image", str(scene), "--prompt", "Describe the image."]
    argv += ["--max-new-tokens", "4", "--json", str(out_json), "--draw", str(out_png), "--timings"]
    assert main(argv) == 0
    out = capsys.readouterr().out
    data = json.loads(out_json.read_text())
    assert "text" in data and data["text"] in out
    assert "timings (ms):" in out and "total" in out and "prefill" in out
    with Image.open(out_png) as im, Image.open(scene) as original:
        assert im.size == original.size


def test_run_forced_detection(tiny_artifact, scene, tmp_path, capsys):
    out_png = tmp_path / "det.png"
    argv = ["run", str(tiny_artifact), "--image", str(scene), "--prompt", "Find the circle."]
    argv += ["--answer-prefix", "circle[DET]", "--max-new-tokens", "1", "--draw", str(out_png)]
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert "groups: det 'circle'" in out
    assert "detections:" in out and "det 'circle' " in out
    with Image.open(out_png) as drawn, Image.open(scene) as original:
        assert (np.asarray(drawn.convert("RGB")) != np.asarray(original.convert("RGB"))).any()


def test_chat_two_turns_keeps_history(tiny_artifact, scene, capsys, monkeypatch):
    from visionllm_edge.pipeline import Pipeline

    seen = []
    stream = Pipeline.stream

    def recording_stream(self, image, prompt, **kw):
        seen.append((prompt, kw.get("history")))
        return stream(self, image, prompt, **kw)

    monkeypatch.setattr(Pipeline, "stream", recording_stream)
    monkeypatch.setattr("sys.stdin", io.StringIO("Describe the image.\n\nWhat else?\n"))
    argv = ["chat", str(tiny_artifact), "--image", str(scene), "--max-new-tokens", "3", "--timings"]
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert "> Describe the image." in out and "> What else?" in out
    assert out.count("timings (ms):") == 2
    assert [p for p, _ in seen] == ["Describe the image.", "What else?"]
    assert seen[0][1] == ()
    assert len(seen[1][1]) == 1 and seen[1][1][0][0] == "Describe the image."


def test_chat_stops_at_exit(tiny_artifact, scene, capsys, monkeypatch):
    monkeypatch.setattr("sys.stdin", io.StringIO("exit\nnever asked\n"))
    assert main(["chat", str(tiny_artifact), "--image", str(scene)]) == 0
    assert "never asked" not in capsys.readouterr().out


def test_info(tiny_artifact, capsys):
    assert main(["info", str(tiny_artifact)]) == 0
    out = capsys.readouterr().out
    manifest = json.loads((tiny_artifact / "manifest.json").read_text())
    for name, graph in manifest["graphs"].items():
        assert f"  {name}: {graph['file']}" in out
    assert "validation: passed" in out
    assert "past_key.{0.." in out  # per-layer inputs collapse into one line
    for token in ("[DET]", "[POSE]"):
        assert token in out


def test_errors_exit_2(tiny_artifact, scene, tmp_path, capsys):
    assert main(["info", str(tmp_path / "missing")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("visionllm-edge: error: ") and "does not exist" in err

    argv = ["run", str(tmp_path / "missing"), "--image", str(scene), "--prompt", "Hi."]
    assert main(argv) == 2
    assert "visionllm-edge: error: " in capsys.readouterr().err

    argv = ["run", str(tiny_artifact), "--image", str(tmp_path / "missing.png"), "--prompt", "Hi."]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("visionllm-edge: error: ") and "image file not found" in err

    bad = tmp_path / "bad.png"
    bad.write_bytes(b"not an image")
    assert main(["run", str(tiny_artifact), "--image", str(bad), "--prompt", "Hi."]) == 2
    assert "cannot read image" in capsys.readouterr().err

    newer = tmp_path / "newer"
    newer.mkdir()
    data = json.loads((tiny_artifact / "manifest.json").read_text())
    data["schema_version"] = 999
    (newer / "manifest.json").write_text(json.dumps(data))
    assert main(["info", str(newer)]) == 2
    assert "newer visionllm-edge" in capsys.readouterr().err



def test_gpu_flags_and_their_bad_inputs(tiny_artifact, scene, tmp_path, capsys):
    from visionllm_edge.runtime.engine import available_providers

    run = ["run", str(tiny_artifact), "--image", str(scene), "--prompt", "Hi.", "--max-new-tokens", "2"]
    # BackendUnavailableError is a RuntimeError, not a ValueError; it is a user error all the same.
    if "TensorrtExecutionProvider" not in available_providers():
        assert main([*run, "--backend", "tensorrt", "--fp16", "--engine-cache", str(tmp_path)]) == 2
        err = capsys.readouterr().err
        assert "the TensorRT backend needs ONNX Runtime's TensorrtExecutionProvider" in err
        assert "'CPUExecutionProvider'" in err
        assert not any(tmp_path.iterdir())  # nothing was cached
    # An unknown provider names what this onnxruntime has.
    assert main([*run, "--providers", "NoSuchExecutionProvider,CPUExecutionProvider"]) == 2
    err = capsys.readouterr().err
    assert "['NoSuchExecutionProvider'] are not in this onnxruntime build" in err and "'CPUExecutionProvider'" in err
    # --fp16 and --engine-cache mean something to TensorRT only: with the onnxruntime backend they are errors.
    assert main([*run, "--fp16"]) == 2
    assert "fp16 applies to the tensorrt backend only" in capsys.readouterr().err
    assert main([*run, "--engine-cache", str(tmp_path)]) == 2
    assert "engine_cache applies to the tensorrt backend only" in capsys.readouterr().err
    assert main([*run, "--device-id", "-1"]) == 2
    assert "device_id must be a CUDA device index (0 or more), got -1" in capsys.readouterr().err
    # The flags reach the loop: the default device on the CPU provider runs.
    assert main([*run, "--providers", "CPUExecutionProvider", "--device-id", "0"]) == 0
