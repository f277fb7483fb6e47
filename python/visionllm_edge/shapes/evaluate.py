"""The evaluation of a shapes-world model on a held-out split (`visionllm-edge eval`).

Every task's samples come from `make_sample(task, seed, i, canonical=True)` for `i < scenes`, with a seed
that training never uses (default 2024; training draws from seeds 1, 101, 201 and 301, the tokenizer corpus
from 7919). The model is reached through a *runner* — an object with the methods `detect`, `segment`,
`pose`, `ground`, `ask`, `generate` and `edit` (see `Runner`) — so the same code scores the ONNX Runtime
pipeline (`RuntimeRunner`, no torch) and the PyTorch reference (`ReferenceRunner`).

Metrics (all in [0, 1]):

- `bbox_ap`, `bbox_ap50`, `segm_ap`: pycocotools COCOeval ('bbox', 'segm') of `detect(image, CATEGORIES)`
  against `Scene.to_coco` (category id = `CATEGORIES` index + 1). Every returned detection counts: the
  runners lower the score thresholds to 0 and keep COCO's 100 best per image.
- `semantic_miou`: `segment(image, CATEGORIES)` against `Scene.semantic_map()`; intersection and union of
  each category summed over the split, averaged over the categories with a non-zero union.
- `keypoint_ap`: COCOeval 'keypoints' of `pose(image, KEYPOINTS)` with the world's `OKS_SIGMAS`, persons
  only. The OKS scale of a stick figure is its box area (`KEYPOINT_AREA`): the area of its one-pixel-thin
  drawing would make the scale depend on the line width; `details` also gives the AP with the mask area.
- `rec_acc50`: the top-scoring box of `ground(image, phrase)` has IoU >= 0.5 with the target's box.
- `vqa_acc`: greedy free generation, exact match after lower-casing and stripping punctuation (per question
  type in `details`); `region_caption_acc`: the same for "what is in <region>" with a box or point prompt.
- `generation_acc`: the checker finds a shape of the asked colour and kind in the generated image.
- `edit_acc`: the checker finds one more shape of the new colour and kind than the source has, and none of
  the old colour and kind (the edited shape is the only one of its colour and kind in the source).
- `caption_word_f1` (extra): word-level F1 of the caption against the reference.

`details` holds per-task breakdowns, the checker's ceiling on the ground-truth pictures, and a few failing
examples; `latency_ms` the mean, p90 and max wall time of each task's requests (after one warm-up request
per task, so that graph loading is not counted).
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import re
import string
import time
from collections.abc import Callable
from typing import Protocol

import numpy as np

from visionllm_edge.results import Result
from visionllm_edge.shapes import checker
from visionllm_edge.shapes.instructions import CAPTION_QUESTION, REGION_QUESTION, Sample, make_sample
from visionllm_edge.shapes.world import CATEGORIES, KEYPOINTS, OKS_SIGMAS, PERSON, SKELETON, Scene

#: The held-out split's default seed (disjoint from every seed training and the tokenizer use).
DEFAULT_SEED = 2024
#: Seeds whose scenes the model was trained on (export/train/stages.py) or its tokenizer was built from.
TRAINING_SEEDS = (1, 101, 201, 301, 7919)
DEFAULT_SCENES = 200
#: Tasks in the order they run; `caption` is scored by word F1 only.
TASKS = ("detect", "segment", "pose", "ground", "vqa", "region_caption", "caption", "generate", "edit")
#: The report's top-level metrics, per task (None where the task did not run).
METRICS = {
    "detect": ("bbox_ap", "bbox_ap50", "segm_ap"),
    "segment": ("semantic_miou",),
    "pose": ("keypoint_ap",),
    "ground": ("rec_acc50",),
    "vqa": ("vqa_acc",),
    "region_caption": ("region_caption_acc",),
    "caption": ("caption_word_f1",),
    "generate": ("generation_acc",),
    "edit": ("edit_acc",),
}
#: Post-processing for evaluation: every query ranked (score threshold 0), COCO's maxDets kept per image
#: (100 boxes, 20 poses). Mask and semantic-map thresholds stay the model's: they shape the prediction.
EVAL_POSTPROCESS = {
    "det_score_threshold": 0.0,
    "det_top_k": 100,
    "pose_score_threshold": 0.0,
    "pose_top_k": 20,
}
#: OKS scale of a person: "box" (its box area) or "mask" (its drawn pixels, as `Scene.to_coco` gives).
KEYPOINT_AREA = "box"
#: Greedy answer limits: one-word answers and the one-sentence caption.
MAX_ANSWER_TOKENS = 16
MAX_CAPTION_TOKENS = 64
#: Failing examples kept per task in `details`.
EXAMPLES = 5

_CATEGORY_ID = {c: i + 1 for i, c in enumerate(CATEGORIES)}
_PUNCT = re.compile(f"[{re.escape(string.punctuation)}]")


class EvaluationError(ValueError):
    """A bad evaluation request (unknown task, no scenes, an artifact that cannot be evaluated)."""


# --- runners ----------------------------------------------------------------------------------------------


class Runner(Protocol):
    """What the evaluation asks of a model. Every method returns a `Result`."""

    backend: str

    def detect(self, image, classes) -> Result: ...
    def segment(self, image, classes) -> Result: ...
    def pose(self, image, keypoint_names) -> Result: ...
    def ground(self, image, phrase: str) -> Result: ...
    def ask(self, image, question: str, regions=None, max_new_tokens: int = MAX_ANSWER_TOKENS) -> Result: ...
    def generate(self, caption: str, seed: int) -> Result: ...
    def edit(self, image, instruction: str, seed: int) -> Result: ...


class RuntimeRunner:
    """The ONNX Runtime `Pipeline` (torch-free), loaded with the post-processing of `EVAL_POSTPROCESS`.

    Make it with `RuntimeRunner.load(artifact)`; a `Pipeline` handed in directly must have been loaded with
    `postprocess=EVAL_POSTPROCESS` for the scores to mean what the evaluation reports.
    """

    backend = "onnxruntime"

    def __init__(self, pipeline):
        self.pipe = pipeline

    @classmethod
    def load(cls, artifact, threads: int = 0, providers=None) -> RuntimeRunner:
        """`Pipeline.load(artifact)`; the name `shapes-tiny` means the bundled model's cached export."""
        from pathlib import Path

        from visionllm_edge.pipeline import Pipeline

        if str(artifact) == "shapes-tiny" and not Path(artifact).exists():
            try:
                from visionllm_edge.demo import ensure_artifact
            except ImportError as e:
                raise EvaluationError(f"the bundled shapes-tiny cannot be exported here ({e})") from None
            artifact, _ = ensure_artifact()
        if not Path(artifact).is_dir():
            raise EvaluationError(
                f"{artifact}: not an artifact folder (the onnxruntime backend evaluates a folder written by "
                f"'visionllm-edge export'; '--backend reference' takes a checkpoint folder or 'shapes-tiny')"
            )
        return cls(
            Pipeline.load(artifact, threads=threads, providers=providers, postprocess=EVAL_POSTPROCESS)
        )

    def detect(self, image, classes) -> Result:
        return self.pipe.detect(image, classes)

    def segment(self, image, classes) -> Result:
        return self.pipe.segment(image, classes)

    def pose(self, image, keypoint_names) -> Result:
        return self.pipe.pose(image, keypoint_names)

    def ground(self, image, phrase: str) -> Result:
        return self.pipe.ground(image, phrase)

    def ask(self, image, question: str, regions=None, max_new_tokens: int = MAX_ANSWER_TOKENS) -> Result:
        return self.pipe(image, question, regions=regions, max_new_tokens=max_new_tokens)

    def generate(self, caption: str, seed: int) -> Result:
        return self.pipe.generate_image(caption, seed=seed)

    def edit(self, image, instruction: str, seed: int) -> Result:
        return self.pipe.edit_image(image, instruction, seed=seed)


class ReferenceRunner:
    """The PyTorch `ReferencePipeline` (needs torch), with the runtime's forced answers and noise.

    Diffusion noise is drawn as the runtime draws it (`numpy.random.default_rng(seed)`), so both backends
    denoise from the same latents.
    """

    backend = "reference"

    def __init__(self, reference):
        import dataclasses

        self.ref = reference
        self.ref.post = dataclasses.replace(reference.post, **EVAL_POSTPROCESS)

    @classmethod
    def load(cls, source) -> ReferenceRunner:
        try:
            from visionllm_edge.export import ReferencePipeline, load_reference
        except ImportError as e:
            raise EvaluationError(f"'--backend reference' needs the [export] extra (torch): {e}") from None
        return cls(ReferencePipeline(load_reference(source)))

    def _forced(self, image, qa, history=(), **kw) -> Result:
        q, a = qa
        return self.ref.answer(image, q, a, history=history, **kw)

    def detect(self, image, classes) -> Result:
        from visionllm_edge import templates

        return self._forced(image, templates.detection(classes))

    def segment(self, image, classes) -> Result:
        from visionllm_edge import templates

        return self._forced(image, templates.segmentation(classes))

    def pose(self, image, keypoint_names) -> Result:
        from visionllm_edge import templates

        history, q, a = templates.pose(keypoint_names)
        return self._forced(image, (q, a), history=history)

    def ground(self, image, phrase: str) -> Result:
        from visionllm_edge import templates

        return self._forced(image, templates.grounding(phrase))

    def ask(self, image, question: str, regions=None, max_new_tokens: int = MAX_ANSWER_TOKENS) -> Result:
        return self.ref.run(image, question, regions=regions, max_new_tokens=max_new_tokens)

    def _noise(self, kind: str, seed: int) -> np.ndarray:
        decoder = getattr(self.ref.model, {"gen": "sd", "edit": "ip2p"}[kind])
        latent = self.ref.config.image_size_for(kind) // decoder.vae_scale_factor
        return np.random.default_rng(seed).standard_normal((1, 4, latent, latent)).astype(np.float32)

    def generate(self, caption: str, seed: int) -> Result:
        from visionllm_edge import templates

        qa = templates.generation(caption)
        return self._forced(None, qa, instruction=caption, seed=seed, noise=self._noise("gen", seed))

    def edit(self, image, instruction: str, seed: int) -> Result:
        from visionllm_edge import templates

        qa = templates.editing(instruction)
        return self._forced(image, qa, instruction=instruction, seed=seed, noise=self._noise("edit", seed))


# --- metric building blocks ---------------------------------------------------------------------------------


def _pycocotools():
    try:
        from pycocotools import mask as mask_utils
        from pycocotools.coco import COCO
        from pycocotools.cocoeval import COCOeval
    except ImportError:
        raise EvaluationError(
            "the COCO metrics need pycocotools: pip install 'visionllm-edge[eval]' (or pycocotools)"
        ) from None
    return COCO, COCOeval, mask_utils


def coco_ground_truth(
    scenes: list[Scene], keypoints: bool = False, keypoint_area: str = KEYPOINT_AREA
) -> dict:
    """A COCO ground-truth dataset of `scenes` (image id = position in the list).

    Args:
        keypoints: persons only, with their keypoints (for keypoint AP); else every object.
        keypoint_area: the persons' `area` (the OKS scale): "box" or "mask" (see `KEYPOINT_AREA`).
    """
    if keypoint_area not in ("box", "mask"):
        raise EvaluationError(f"keypoint_area must be 'box' or 'mask', got {keypoint_area!r}")
    images, annotations = [], []
    for image_id, scene in enumerate(scenes):
        image, anns = scene.to_coco(image_id, len(annotations) + 1)
        images.append(image)
        for ann in anns:
            if keypoints:
                if ann["category_id"] != _CATEGORY_ID[PERSON]:
                    continue
                if keypoint_area == "box":
                    ann = {**ann, "area": float(ann["bbox"][2] * ann["bbox"][3])}
            annotations.append(ann)
    for k, ann in enumerate(annotations):
        ann["id"] = k + 1
    categories = [{"id": _CATEGORY_ID[c], "name": c, "supercategory": "shape"} for c in CATEGORIES]
    person = categories[CATEGORIES.index(PERSON)]
    person.update(
        supercategory=PERSON, keypoints=list(KEYPOINTS), skeleton=[[a + 1, b + 1] for a, b in SKELETON]
    )
    if keypoints:
        categories = [person]
    return {"images": images, "annotations": annotations, "categories": categories}


def detection_results(result: Result, image_id: int) -> tuple[list[dict], list[dict]]:
    """COCO results of a `detect` answer: `(boxes, masks)`; masks RLE-encoded by pycocotools.

    Detections whose label is not a category (an answer that named something else) are left out.
    """
    _, _, mask_utils = _pycocotools()
    boxes, masks = [], []
    for d in result.detections:
        if d.kind != "det" or d.label not in _CATEGORY_ID:
            continue
        x0, y0, x1, y1 = (float(v) for v in d.box_xyxy)
        common = {"image_id": image_id, "category_id": _CATEGORY_ID[d.label], "score": float(d.score)}
        boxes.append({**common, "bbox": [x0, y0, x1 - x0, y1 - y0]})
        if d.mask is not None:
            rle = mask_utils.encode(np.asfortranarray(np.asarray(d.mask, dtype=np.uint8)))
            masks.append({**common, "segmentation": rle})
    return boxes, masks


def pose_results(result: Result, image_id: int) -> list[dict]:
    """COCO keypoint results of a `pose` answer (persons; keypoints in `KEYPOINTS` order)."""
    out = []
    for p in result.poses:
        if p.label != PERSON:
            continue
        names = list(p.keypoint_names)
        kps = np.asarray(p.keypoints, dtype=np.float64).reshape(-1, 3)
        flat: list[float] = []
        for name in KEYPOINTS:
            if name in names:
                x, y, _v = kps[names.index(name)]
                flat += [float(x), float(y), 2.0]
            else:
                flat += [0.0, 0.0, 0.0]
        out.append(
            {
                "image_id": image_id,
                "category_id": _CATEGORY_ID[PERSON],
                "keypoints": flat,
                "score": float(p.score),
            }
        )
    return out


def coco_ap(ground_truth: dict, results: list[dict], iou_type: str) -> dict[str, float | None]:
    """COCOeval's AP, AP50 and AP75 (None where the ground truth has no instance; 0 without results)."""
    COCO, COCOeval, _ = _pycocotools()
    if not ground_truth["annotations"]:
        return {"ap": None, "ap50": None, "ap75": None}
    if not results:
        return {"ap": 0.0, "ap50": 0.0, "ap75": 0.0}
    quiet = io.StringIO()
    with contextlib.redirect_stdout(quiet):
        gt = COCO()
        gt.dataset = {k: list(v) for k, v in ground_truth.items()}
        gt.createIndex()
        dt = gt.loadRes([dict(r) for r in results])
        ev = COCOeval(gt, dt, iou_type)
        if iou_type == "keypoints":
            ev.params.kpt_oks_sigmas = np.array(OKS_SIGMAS, dtype=np.float64)
        ev.params.imgIds = [im["id"] for im in ground_truth["images"]]
        ev.evaluate()
        ev.accumulate()
        ev.summarize()
    s = ev.stats
    return {name: (None if s[i] < 0 else float(s[i])) for name, i in (("ap", 0), ("ap50", 1), ("ap75", 2))}


class SemanticIoU:
    """Intersection and union per category, summed over a split (`add` one picture at a time)."""

    def __init__(self, categories=CATEGORIES):
        self.categories = tuple(categories)
        self.intersection = np.zeros(len(self.categories), np.int64)
        self.union = np.zeros(len(self.categories), np.int64)

    def add(self, predicted: np.ndarray, truth: np.ndarray) -> None:
        """Two `H x W` maps of category indices (-1: background)."""
        predicted, truth = np.asarray(predicted), np.asarray(truth)
        if predicted.shape != truth.shape:
            raise EvaluationError(f"semantic map is {predicted.shape}, the ground truth {truth.shape}")
        for c in range(len(self.categories)):
            p, t = predicted == c, truth == c
            self.intersection[c] += int(np.count_nonzero(p & t))
            self.union[c] += int(np.count_nonzero(p | t))

    def per_category(self) -> dict[str, float | None]:
        return {
            c: (float(i / u) if u else None)
            for c, i, u in zip(self.categories, self.intersection, self.union)
        }

    def miou(self) -> float | None:
        ious = [v for v in self.per_category().values() if v is not None]
        return float(np.mean(ious)) if ious else None


def semantic_prediction(result: Result, shape: tuple[int, int]) -> np.ndarray:
    """The answer's semantic map as `CATEGORIES` indices (-1 for background and unknown labels)."""
    seg = result.segmentation
    if seg is None:
        return np.full(shape, -1, np.int32)
    lut = np.array(
        [CATEGORIES.index(lab) if lab in CATEGORIES else -1 for lab in seg.labels] + [-1], np.int32
    )
    label_map = np.asarray(seg.label_map)
    return lut[np.where(label_map < 0, len(seg.labels), label_map)]


def box_iou(a, b) -> float:
    """IoU of two `(x0, y0, x1, y1)` boxes."""
    w = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    h = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = w * h
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return float(inter / union) if union > 0 else 0.0


def grounding_correct(result: Result, target_box, threshold: float = 0.5) -> bool:
    """Whether the best `[GRD]` box (the top-scoring one) has IoU >= `threshold` with `target_box`."""
    grounded = [d for d in result.detections if d.kind == "grd"] or list(result.detections)
    if not grounded:
        return False
    best = max(grounded, key=lambda d: d.score)
    return box_iou(best.box_xyxy, target_box) >= threshold


def normalize_answer(text: str) -> str:
    """Lower-cased, punctuation removed, whitespace collapsed."""
    return " ".join(_PUNCT.sub(" ", text.lower()).split())


def word_f1(predicted: str, reference: str) -> float:
    """Word-level F1 of two texts after `normalize_answer` (bag of words)."""
    p, r = normalize_answer(predicted).split(), normalize_answer(reference).split()
    if not p or not r:
        return float(p == r)
    common = sum(min(p.count(w), r.count(w)) for w in set(p))
    if not common:
        return 0.0
    precision, recall = common / len(p), common / len(r)
    return 2 * precision * recall / (precision + recall)


def generation_correct(image, color: str, kind: str) -> bool:
    """Whether the checker finds a `color` `kind` in the generated picture."""
    return checker.contains(image, color, kind)


def edit_correct(image, sample: Sample) -> bool:
    """Whether the edited picture shows the recoloured shape: one more `new` shape of its kind than the source
    has, and no `old` one left (the target is the source's only shape of its old colour and kind)."""
    kind, old, new = sample.meta["kind"], sample.meta["old"], sample.meta["new"]
    before = sum(o.category == kind and o.color == new for o in sample.scene.objects)
    found = checker.find_shapes(image)
    after = sum(s.kind == kind and s.color == new for s in found)
    return after > before and not any(s.kind == kind and s.color == old for s in found)


def _image(result: Result):
    if not result.images:
        return None
    return result.images[0]


# --- the evaluation -----------------------------------------------------------------------------------------


class _Clock:
    """Wall time of each task's requests."""

    def __init__(self):
        self.times: dict[str, list[float]] = {}

    def __call__(self, task: str, fn: Callable[[], Result]) -> Result:
        start = time.perf_counter()
        out = fn()
        self.times.setdefault(task, []).append((time.perf_counter() - start) * 1000.0)
        return out

    def summary(self) -> dict[str, dict]:
        return {
            t: {
                "mean": round(float(np.mean(v)), 2),
                "p90": round(float(np.percentile(v, 90)), 2),
                "max": round(float(np.max(v)), 2),
                "requests": len(v),
            }
            for t, v in self.times.items()
        }


def _warm_up(runner: Runner, task: str, sample: Sample) -> None:
    """One untimed request of the task on a blank picture, so graph loading is not in the latencies."""
    from PIL import Image

    size = sample.scene.image.size if sample.scene is not None else (64, 64)
    blank = Image.new("RGB", size, (220, 220, 220))
    if task == "detect":
        runner.detect(blank, CATEGORIES)
    elif task == "segment":
        runner.segment(blank, CATEGORIES)
    elif task == "pose":
        runner.pose(blank, KEYPOINTS)
    elif task == "ground":
        runner.ground(blank, "circle")
    elif task in ("vqa", "caption"):
        runner.ask(blank, sample.question, max_new_tokens=2)
    elif task == "region_caption":
        runner.ask(blank, REGION_QUESTION, regions=[(1.0, 1.0, 9.0, 9.0)], max_new_tokens=2)
    elif task == "generate":
        runner.generate("a small red square", seed=0)
    elif task == "edit":
        runner.edit(blank, "make the square red", seed=0)


def _failure(samples: list, k: int, expected, got) -> None:
    if len(samples) < EXAMPLES:
        samples.append({"index": k, "expected": expected, "got": got})


def _eval_detect(runner, samples, clock):
    boxes, masks = [], []
    for k, s in enumerate(samples):
        r = clock("detect", lambda s=s: runner.detect(s.scene.image, CATEGORIES))
        b, m = detection_results(r, k)
        boxes += b
        masks += m
    gt = coco_ground_truth([s.scene for s in samples])
    bbox, segm = coco_ap(gt, boxes, "bbox"), coco_ap(gt, masks, "segm")
    metrics = {"bbox_ap": bbox["ap"], "bbox_ap50": bbox["ap50"], "segm_ap": segm["ap"]}
    details = {"bbox": bbox, "segm": segm, "detections_per_image": len(boxes) / max(1, len(samples))}
    return metrics, details


def _eval_segment(runner, samples, clock):
    iou = SemanticIoU()
    for s in samples:
        r = clock("segment", lambda s=s: runner.segment(s.scene.image, CATEGORIES))
        truth = s.scene.semantic_map()
        iou.add(semantic_prediction(r, truth.shape), truth)
    return {"semantic_miou": iou.miou()}, {"iou_per_category": iou.per_category()}


def _eval_pose(runner, samples, clock):
    results = []
    for k, s in enumerate(samples):
        r = clock("pose", lambda s=s: runner.pose(s.scene.image, KEYPOINTS))
        results += pose_results(r, k)
    scenes = [s.scene for s in samples]
    box = coco_ap(coco_ground_truth(scenes, keypoints=True, keypoint_area="box"), results, "keypoints")
    mask = coco_ap(coco_ground_truth(scenes, keypoints=True, keypoint_area="mask"), results, "keypoints")
    main = box if KEYPOINT_AREA == "box" else mask
    return {"keypoint_ap": main["ap"]}, {"oks_area_box": box, "oks_area_mask": mask}


def _eval_ground(runner, samples, clock):
    right, failures = [], []
    for k, s in enumerate(samples):
        phrase = s.phrases[0]
        r = clock("ground", lambda s=s, p=phrase: runner.ground(s.scene.image, p))
        target = s.scene.objects[s.targets[0][0]].box
        ok = grounding_correct(r, target)
        right.append(ok)
        if not ok:
            got = [round(v, 1) for v in r.detections[0].box_xyxy] if r.detections else None
            _failure(failures, k, {"phrase": phrase, "box": [round(v, 1) for v in target]}, got)
    return {"rec_acc50": float(np.mean(right))}, {"failures": failures}


def _eval_answers(task, runner, samples, clock, by):
    right, groups, failures = [], {}, []
    for k, s in enumerate(samples):
        r = clock(task, lambda s=s: runner.ask(s.scene.image, s.question, regions=s.regions or None))
        ok = normalize_answer(r.text) == normalize_answer(s.answer)
        right.append(ok)
        groups.setdefault(s.meta.get(by, "?"), []).append(ok)
        if not ok:
            _failure(failures, k, {"question": s.question, "answer": s.answer}, r.text)
    per = {g: {"acc": float(np.mean(v)), "n": len(v)} for g, v in sorted(groups.items())}
    return float(np.mean(right)), {f"per_{by}": per, "failures": failures}


def _eval_vqa(runner, samples, clock):
    acc, details = _eval_answers("vqa", runner, samples, clock, "type")
    return {"vqa_acc": acc}, details


def _eval_region_caption(runner, samples, clock):
    acc, details = _eval_answers("region_caption", runner, samples, clock, "region")
    return {"region_caption_acc": acc}, details


def _eval_caption(runner, samples, clock):
    f1, exact, failures = [], [], []
    for k, s in enumerate(samples):
        r = clock(
            "caption",
            lambda s=s: runner.ask(s.scene.image, CAPTION_QUESTION, max_new_tokens=MAX_CAPTION_TOKENS),
        )
        f1.append(word_f1(r.text, s.answer))
        exact.append(normalize_answer(r.text) == normalize_answer(s.answer))
        if not exact[-1]:
            _failure(failures, k, s.answer, r.text)
    return {"caption_word_f1": float(np.mean(f1))}, {"exact": float(np.mean(exact)), "failures": failures}


def _eval_generate(runner, samples, clock):
    right, ceiling, failures = [], [], []
    for k, s in enumerate(samples):
        r = clock("generate", lambda s=s, k=k: runner.generate(s.instruction, seed=k))
        image = _image(r)
        ok = image is not None and generation_correct(image, s.meta["color"], s.meta["kind"])
        right.append(ok)
        ceiling.append(generation_correct(s.image_out, s.meta["color"], s.meta["kind"]))
        if not ok:
            found = [] if image is None else [f"{f.color} {f.kind}" for f in checker.find_shapes(image)]
            _failure(failures, k, s.instruction, found)
    return {"generation_acc": float(np.mean(right))}, {
        "checker_on_targets": float(np.mean(ceiling)),
        "failures": failures,
    }


def _eval_edit(runner, samples, clock):
    right, ceiling, source, failures = [], [], [], []
    for k, s in enumerate(samples):
        r = clock("edit", lambda s=s, k=k: runner.edit(s.scene.image, s.instruction, seed=k))
        image = _image(r)
        ok = image is not None and edit_correct(image, s)
        right.append(ok)
        ceiling.append(edit_correct(s.image_out, s))
        source.append(edit_correct(s.scene.image, s))
        if not ok:
            found = [] if image is None else [f"{f.color} {f.kind}" for f in checker.find_shapes(image)]
            _failure(failures, k, s.instruction, found)
    return {"edit_acc": float(np.mean(right))}, {
        "checker_on_targets": float(np.mean(ceiling)),
        "checker_on_unedited_sources": float(np.mean(source)),
        "failures": failures,
    }


_EVALUATORS = {
    "detect": _eval_detect,
    "segment": _eval_segment,
    "pose": _eval_pose,
    "ground": _eval_ground,
    "vqa": _eval_vqa,
    "region_caption": _eval_region_caption,
    "caption": _eval_caption,
    "generate": _eval_generate,
    "edit": _eval_edit,
}


def parse_tasks(tasks) -> tuple[str, ...]:
    """Task names from a list or a comma-separated string (None or "all": every task), in `TASKS` order."""
    if tasks is None:
        return TASKS
    if isinstance(tasks, str):
        tasks = [tasks]
    names = [t.strip() for item in tasks for t in str(item).split(",") if t.strip()]
    if names == ["all"]:
        return TASKS
    unknown = [t for t in names if t not in TASKS]
    if unknown or not names:
        raise EvaluationError(
            f"unknown task(s) {', '.join(map(repr, unknown)) or '(none given)'}; known: {', '.join(TASKS)}"
        )
    return tuple(t for t in TASKS if t in names)


def split_fingerprint(seed: int, scenes: int, tasks) -> str:
    """A short hash of the split's questions and answers (two reports with the same one saw the same data)."""
    h = hashlib.sha1()
    for task in tasks:
        for i in range(min(scenes, 20)):
            s = make_sample(task, seed, i, canonical=True)
            h.update(f"{task}|{s.question}|{s.answer}|{s.instruction}".encode())
    return h.hexdigest()[:12]


def evaluate(
    runner: Runner,
    seed: int = DEFAULT_SEED,
    scenes: int = DEFAULT_SCENES,
    tasks=None,
    artifact: str | None = None,
    log: Callable[[str], None] | None = None,
) -> dict:
    """Scores `runner` on the held-out split of `seed`: `scenes` samples per task.

    Args:
        runner: a `Runner` (`RuntimeRunner`, `ReferenceRunner`, or anything with the same methods).
        tasks: names from `TASKS` (a list or a comma-separated string; default: all).
        artifact: recorded in the report.
        log: called with one line per finished task (e.g. `print`).

    Returns:
        The report: the top-level metrics of `METRICS` (None for tasks not run), `scenes`, `seed`, `backend`,
        `artifact`, `tasks`, `latency_ms` per task and `details` per task.
    """
    if int(scenes) <= 0:
        raise EvaluationError(f"--scenes must be a positive number of scenes per task, got {scenes}")
    names = parse_tasks(tasks)
    report: dict = {key: None for task in TASKS for key in METRICS[task]}
    report.update(
        scenes=int(scenes),
        seed=int(seed),
        backend=getattr(runner, "backend", type(runner).__name__),
        artifact=None if artifact is None else str(artifact),
        tasks=list(names),
        held_out=int(seed) not in TRAINING_SEEDS,
        split=split_fingerprint(int(seed), int(scenes), names),
        keypoint_area=KEYPOINT_AREA,
    )
    clock = _Clock()
    details: dict = {}
    wall: dict = {}
    for task in names:
        start = time.perf_counter()
        samples = [make_sample(task, int(seed), i, canonical=True) for i in range(int(scenes))]
        _warm_up(runner, task, samples[0])
        metrics, details[task] = _EVALUATORS[task](runner, samples, clock)
        report.update(metrics)
        wall[task] = round(time.perf_counter() - start, 2)
        if log is not None:
            shown = ", ".join(f"{k} {_fmt(v)}" for k, v in metrics.items())
            log(f"{task}: {shown}  ({len(samples)} scenes, {wall[task]:.1f} s)")
    report["latency_ms"] = clock.summary()
    report["wall_s"] = wall
    report["details"] = details
    return report


def _fmt(v) -> str:
    return "n/a" if v is None else f"{v:.3f}"


def format_report(report: dict) -> str:
    """A readable table of a report: one line per metric, then the latencies."""
    lines = [
        f"evaluation of {report.get('artifact') or '(model)'} on {report['backend']}: seed {report['seed']}, "
        f"{report['scenes']} scenes per task"
        + ("" if report.get("held_out", True) else " (A TRAINING SEED)"),
        f"{'task':<16}{'metric':<22}{'value':>8}",
    ]
    for task in TASKS:
        for key in METRICS[task]:
            if task in report.get("tasks", TASKS):
                lines.append(f"{task:<16}{key:<22}{_fmt(report.get(key)):>8}")
    lat = report.get("latency_ms", {})
    if lat:
        lines.append(f"{'latency (ms)':<16}{'mean':>10}{'p90':>10}{'max':>10}")
        for task, v in lat.items():
            lines.append(f"{task:<16}{v['mean']:>10.1f}{v['p90']:>10.1f}{v['max']:>10.1f}")
    return "\n".join(lines)


def run_evaluation(
    artifact,
    backend: str = "onnxruntime",
    seed: int = DEFAULT_SEED,
    scenes: int = DEFAULT_SCENES,
    tasks=None,
    json_path=None,
    threads: int = 0,
    log: Callable[[str], None] | None = print,
) -> dict:
    """What `visionllm-edge eval` does: checks the request, loads the backend, evaluates, prints the table and
    writes the JSON report.

    Args:
        artifact: an artifact folder (`onnxruntime`), or a checkpoint folder or `shapes-tiny` (`reference`).
        backend: "onnxruntime" (the runtime, no torch) or "reference" (PyTorch).
        json_path: where to write the report (None: not written).
        threads: intra-op threads per ONNX Runtime session (0: its default).
        log: progress and the table go here.
    """
    names = parse_tasks(tasks)  # named errors before anything loads
    if int(scenes) <= 0:
        raise EvaluationError(f"--scenes must be a positive number of scenes per task, got {scenes}")
    if backend == "onnxruntime":
        runner = RuntimeRunner.load(artifact, threads=threads)
    elif backend == "reference":
        runner = ReferenceRunner.load(artifact)
    else:
        raise EvaluationError(f"unknown backend {backend!r}; known: 'onnxruntime', 'reference'")
    if log is not None and int(seed) in TRAINING_SEEDS:
        log(f"warning: seed {seed} is a training seed; this split is not held out")
    report = evaluate(runner, seed=seed, scenes=scenes, tasks=names, artifact=str(artifact), log=log)
    if log is not None:
        log(format_report(report))
    if json_path:
        import json
        from pathlib import Path

        Path(json_path).write_text(json.dumps(report, indent=2) + "\n")
        if log is not None:
            log(f"wrote {json_path}")
    return report
