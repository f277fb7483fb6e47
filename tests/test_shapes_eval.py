"""The shapes evaluation's scoring (no model): ground truth fed back as predictions scores 1, worse
predictions score less, the checker-based scores, the whole `evaluate` loop with an oracle runner, and the
CLI's errors."""

from __future__ import annotations

import hashlib
import json

import numpy as np
import pytest
from visionllm_edge.results import Detection, Pose, Result, SemanticMap
from visionllm_edge.shapes import evaluate as ev
from visionllm_edge.shapes.instructions import make_sample
from visionllm_edge.shapes.world import CATEGORIES, KEYPOINTS, PERSON

pytest.importorskip("pycocotools")

SEED = 2024


def _key(image, *extra) -> str:
    h = hashlib.sha1(np.ascontiguousarray(np.asarray(image)).tobytes())
    h.update(repr(extra).encode())
    return h.hexdigest()


def _detections(scene, shift: float = 0.0, score: float = 1.0) -> list[Detection]:
    out = []
    for o in scene.objects:
        x0, y0, x1, y1 = o.box
        mask = np.roll(o.mask, int(round(shift)), axis=1) if shift else o.mask
        out.append(Detection(o.category, "det", score, (x0 + shift, y0, x1 + shift, y1), mask))
    return out


def _poses(scene, jitter: float = 0.0) -> list[Pose]:
    out = []
    for o in scene.people:
        kps = np.asarray(o.keypoints, np.float32).copy()
        kps[:, :2] += jitter
        out.append(Pose(PERSON, 1.0, o.box, kps, list(KEYPOINTS)))
    return out


class OracleRunner:
    """Answers every request with the ground truth of the sample it was made from."""

    backend = "oracle"

    def __init__(self, seed: int, n: int):
        self.by_key: dict[str, object] = {}
        for task in ev.TASKS:
            for i in range(n):
                s = make_sample(task, seed, i, canonical=True)
                if task == "generate":
                    self.by_key[_key(b"", s.instruction)] = s
                elif task in ("vqa", "region_caption", "caption"):
                    self.by_key[_key(s.scene.image, s.question, s.regions)] = s
                elif task in ("ground", "edit"):
                    self.by_key[_key(s.scene.image, s.phrases[0])] = s
                else:
                    self.by_key[_key(s.scene.image)] = s

    def _scene(self, image):
        s = self.by_key.get(_key(image))
        return None if s is None else s.scene

    def detect(self, image, classes):
        scene = self._scene(image)
        return Result(detections=_detections(scene) if scene else [])

    def segment(self, image, classes):
        scene = self._scene(image)
        if scene is None:
            return Result()
        return Result(segmentation=SemanticMap(scene.semantic_map(), list(CATEGORIES)))

    def pose(self, image, keypoint_names):
        scene = self._scene(image)
        return Result(poses=_poses(scene) if scene else [])

    def ground(self, image, phrase):
        s = self.by_key.get(_key(image, phrase))
        if s is None:
            return Result()
        box = s.scene.objects[s.targets[0][0]].box
        return Result(detections=[Detection(phrase, "grd", 0.9, box)])

    def ask(self, image, question, regions=None, max_new_tokens=16):
        s = self.by_key.get(_key(image, question, list(regions or [])))
        return Result(text="" if s is None else s.answer.upper() + "!")  # case and punctuation do not count

    def generate(self, caption, seed):
        s = self.by_key.get(_key(b"", caption))
        return Result(images=[] if s is None else [np.asarray(s.image_out)])

    def edit(self, image, instruction, seed):
        s = self.by_key.get(_key(image, instruction))
        return Result(images=[] if s is None else [np.asarray(s.image_out)])


def _scenes(task: str, n: int):
    return [make_sample(task, SEED, i, canonical=True).scene for i in range(n)]


def _detection_ap(scenes, **kw) -> tuple[dict, dict]:
    boxes, masks = [], []
    for k, scene in enumerate(scenes):
        b, m = ev.detection_results(Result(detections=_detections(scene, **kw)), k)
        boxes += b
        masks += m
    gt = ev.coco_ground_truth(scenes)
    return ev.coco_ap(gt, boxes, "bbox"), ev.coco_ap(gt, masks, "segm")


def test_ground_truth_as_detections_scores_one_and_shifted_boxes_less():
    scenes = _scenes("detect", 6)
    bbox, segm = _detection_ap(scenes)
    assert bbox["ap"] == pytest.approx(1.0) and bbox["ap50"] == pytest.approx(1.0)
    assert segm["ap"] == pytest.approx(1.0)
    shifted_bbox, shifted_segm = _detection_ap(scenes, shift=4.0)
    assert shifted_bbox["ap"] < 0.9 and shifted_segm["ap"] < 0.9
    assert shifted_bbox["ap50"] > shifted_bbox["ap"]
    far_bbox, _ = _detection_ap(scenes, shift=40.0)
    assert far_bbox["ap"] < shifted_bbox["ap"]


def test_detections_with_unknown_labels_are_left_out_and_no_results_score_zero():
    scene = _scenes("detect", 1)[0]
    r = Result(detections=[Detection("dog", "det", 0.9, (0, 0, 5, 5), np.zeros((128, 128), bool))])
    boxes, masks = ev.detection_results(r, 0)
    assert boxes == [] and masks == []
    assert ev.coco_ap(ev.coco_ground_truth([scene]), [], "bbox")["ap"] == 0.0


def test_ground_truth_as_keypoints_scores_one_and_jitter_less():
    scenes = [s for s in _scenes("pose", 6) if s.people]
    assert scenes

    def ap(jitter, area="box"):
        results = []
        for k, scene in enumerate(scenes):
            results += ev.pose_results(Result(poses=_poses(scene, jitter)), k)
        gt = ev.coco_ground_truth(scenes, keypoints=True, keypoint_area=area)
        assert {a["category_id"] for a in gt["annotations"]} == {CATEGORIES.index(PERSON) + 1}
        return ev.coco_ap(gt, results, "keypoints")["ap"]

    assert ap(0.0) == pytest.approx(1.0)
    assert ap(0.0, "mask") == pytest.approx(1.0)
    assert ap(3.0) < 1.0
    assert ap(3.0, "mask") < ap(3.0, "box")  # the drawn pixels make a smaller OKS scale than the box


def test_semantic_miou():
    scenes = _scenes("segment", 4)
    iou = ev.SemanticIoU()
    for scene in scenes:
        truth = scene.semantic_map()
        pred = ev.semantic_prediction(Result(segmentation=SemanticMap(truth, list(CATEGORIES))), truth.shape)
        iou.add(pred, truth)
    assert iou.miou() == pytest.approx(1.0)
    # Labels are matched by name, not position; a missing answer is all background.
    truth = scenes[0].semantic_map()
    order = list(reversed(CATEGORIES))
    remapped = np.where(truth < 0, -1, len(CATEGORIES) - 1 - truth)
    pred = ev.semantic_prediction(Result(segmentation=SemanticMap(remapped, order)), truth.shape)
    np.testing.assert_array_equal(pred, truth)
    assert (ev.semantic_prediction(Result(), truth.shape) == -1).all()
    half = ev.SemanticIoU()
    half.add(np.full((2, 2), 0), np.array([[0, 0], [-1, -1]]))
    assert half.miou() == pytest.approx(0.5)
    with pytest.raises(ev.EvaluationError, match="semantic map"):
        half.add(np.zeros((2, 3)), np.zeros((2, 2)))


def test_grounding_and_answers():
    box = (10.0, 10.0, 30.0, 30.0)
    good = Result(detections=[Detection("x", "grd", 0.9, (12.0, 11.0, 31.0, 30.0))])
    bad = Result(detections=[Detection("x", "grd", 0.9, (20.0, 20.0, 40.0, 40.0))])
    assert ev.grounding_correct(good, box) and not ev.grounding_correct(bad, box)
    assert not ev.grounding_correct(Result(), box)
    assert ev.box_iou(box, box) == pytest.approx(1.0)
    assert ev.normalize_answer(" Red  Circle. ") == "red circle"
    assert ev.word_f1("a red circle", "a red circle") == 1.0
    assert 0 < ev.word_f1("a blue circle", "a red circle") < 1


def test_checker_scoring_of_generation_and_editing():
    for i in range(8):
        s = make_sample("generate", SEED, i, canonical=True)
        assert ev.generation_correct(s.image_out, s.meta["color"], s.meta["kind"])
        other = next(c for c in ("red", "blue") if c != s.meta["color"])
        assert not ev.generation_correct(s.image_out, other, s.meta["kind"])
    right = 0
    for i in range(8):
        s = make_sample("edit", SEED, i, canonical=True)
        right += ev.edit_correct(s.image_out, s)
        assert not ev.edit_correct(s.scene.image, s), "an unedited picture must not count"
    assert right >= 7


def test_evaluate_with_an_oracle_scores_one_everywhere():
    report = ev.evaluate(OracleRunner(SEED, 3), seed=SEED, scenes=3, artifact="oracle")
    for task, keys in ev.METRICS.items():
        for key in keys:
            assert report[key] == pytest.approx(1.0), (key, report["details"][task])
    assert report["scenes"] == 3 and report["seed"] == SEED and report["backend"] == "oracle"
    assert report["held_out"] is True
    assert set(report["latency_ms"]) == set(ev.TASKS)
    assert report["latency_ms"]["detect"]["requests"] == 3
    json.dumps(report)  # serialisable as it is
    table = ev.format_report(report)
    assert "bbox_ap" in table and "edit_acc" in table


def test_evaluate_a_subset_leaves_the_rest_null():
    report = ev.evaluate(OracleRunner(SEED, 2), seed=SEED, scenes=2, tasks="ground,vqa")
    assert report["tasks"] == ["ground", "vqa"]
    assert report["rec_acc50"] == 1.0 and report["vqa_acc"] == 1.0
    assert report["bbox_ap"] is None and report["edit_acc"] is None
    assert all(v["acc"] == 1.0 for v in report["details"]["vqa"]["per_type"].values())


def test_bad_requests_are_named():
    with pytest.raises(ev.EvaluationError, match="unknown task.*'dance'"):
        ev.parse_tasks("detect,dance")
    with pytest.raises(ev.EvaluationError, match="positive"):
        ev.evaluate(OracleRunner(SEED, 1), scenes=0)


@pytest.mark.parametrize(
    "argv, message",
    [
        (["eval", "/nonexistent/artifact"], "not an artifact folder"),
        (["eval", "/nonexistent/artifact", "--tasks", "dance"], "unknown task"),
        (["eval", "/nonexistent/artifact", "--scenes", "0"], "--scenes"),
    ],
)
def test_cli_errors(argv, message, capsys):
    from visionllm_edge import cli

    assert cli.main(argv) == 2
    err = capsys.readouterr().err
    assert message in err, err


def test_evaluation_module_is_torch_free():
    import subprocess
    import sys

    code = "import sys, visionllm_edge.shapes.evaluate, pycocotools.cocoeval; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


@pytest.mark.slow
def test_runtime_and_reference_score_the_same(tiny_artifact, tiny_model):
    """Both backends through `evaluate` on tiny-random (random weights: the numbers are ~0, but they and
    the answers must agree)."""
    from visionllm_edge.export import ReferencePipeline

    kw = dict(seed=SEED, scenes=1, tasks="detect,segment,pose,ground,vqa,region_caption,generate,edit")
    got = ev.evaluate(ev.RuntimeRunner.load(tiny_artifact), **kw)
    want = ev.evaluate(ev.ReferenceRunner(ReferencePipeline(tiny_model)), **kw)
    assert got["backend"] == "onnxruntime" and want["backend"] == "reference"
    for task in got["tasks"]:
        for key in ev.METRICS[task]:
            assert got[key] is not None
            assert abs(got[key] - want[key]) <= 0.01, (key, got[key], want[key])
    assert got["details"]["vqa"]["failures"] == want["details"]["vqa"]["failures"]
    assert (
        got["details"]["detect"]["detections_per_image"] == want["details"]["detect"]["detections_per_image"]
    )
