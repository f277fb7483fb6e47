"""Instruction data for the shapes world, in VisionLLM v2's own question/answer formats (research §2.6).

Perception tasks use the official templates (`visionllm_edge.templates`), exactly as the task shortcuts
send them; text tasks (VQA, captioning, region captioning) use short questions with one-word or one-phrase
answers. Every sample is a pure function of `(seed, index, task)`.

A `Sample` carries what training and evaluation need: the conversation, the visual prompts, the phrase
of every super-link group in answer order (what the decoder is asked to find) and the ground truth.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
from PIL import Image

from visionllm_edge import templates
from visionllm_edge.shapes import world
from visionllm_edge.shapes.world import CATEGORIES, COLORS, KEYPOINTS, KINDS, SIZES, Scene, SceneObject

TEXT_TASKS = ("vqa", "caption", "region_caption")
PERCEPTION_TASKS = ("detect", "ground", "segment", "pose")
GENERATION_TASKS = ("generate", "edit")
TASKS = TEXT_TASKS + PERCEPTION_TASKS + GENERATION_TASKS + ("interactive",)

#: Canvas sides: scenes for perception and text tasks, images for generation and editing.
SCENE_SIZE = 128
GEN_SIZE = 64

REGION_QUESTION = "What is in <reg>region1<region></reg>? Answer briefly."
CAPTION_QUESTION = "Describe the image briefly."


@dataclass
class Sample:
    """One instruction sample.

    Attributes:
        task: a `TASKS` name.
        scene: the picture and its objects (None for generation).
        question, answer: the last turn.
        history: earlier `(question, answer)` turns.
        regions: visual prompts for `<region>` markers (boxes `(x0, y0, x1, y1)` or points `(x, y)`).
        phrases: per super-link group of the whole conversation, in order, the text the group stands for.
        targets: per group, the objects it refers to (indices into `scene.objects`).
        instruction: generation caption / edit instruction.
        image_out: the generation or editing target picture.
        meta: task-specific facts (e.g. the VQA question type).
    """

    task: str
    scene: Scene | None
    question: str
    answer: str
    history: list[tuple[str, str]] = field(default_factory=list)
    regions: list[tuple] = field(default_factory=list)
    phrases: list[str] = field(default_factory=list)
    targets: list[list[int]] = field(default_factory=list)
    instruction: str | None = None
    image_out: Image.Image | None = None
    meta: dict = field(default_factory=dict)


def _plural(kind: str) -> str:
    return "crosses" if kind == "cross" else kind + "s"


def _listing(names: list[str]) -> str:
    if len(names) == 1:
        return names[0]
    return ", ".join(names[:-1]) + " and " + names[-1]


def unique_description(scene: Scene, k: int) -> str | None:
    """The shortest of 'kind' / 'color kind' / 'size color kind' that names object k alone (or None)."""
    o = scene.objects[k]
    if o.category == world.PERSON:
        return o.category if scene.count(world.PERSON) == 1 else None
    for fields in (("category",), ("color", "category"), ("size", "color", "category")):
        same = [p for p in scene.objects if all(getattr(p, f) == getattr(o, f) for f in fields)]
        if len(same) == 1:
            return " ".join(getattr(o, f) for f in fields)
    return None


def _scene_for(task: str, seed: int, index: int) -> Scene:
    if task == "pose":
        return world.make_scene(seed, index, SCENE_SIZE, 0, 3, people=(1, 2))
    if task == "edit":
        # Shapes apart (the checker sees touching shapes of one colour as one blob), and at least one
        # that its colour and kind name alone (else the instruction would be ambiguous): redraw until so.
        for attempt in range(50):
            scene = world.make_scene(
                seed, index + attempt * 1_000_003, GEN_SIZE, 1, 3, shape_scale=1.0, max_overlap=0.0, gap=2.0
            )
            names = [o.short_name for o in scene.objects]
            if any(names.count(n) == 1 for n in names):
                return scene
        return scene
    with_people = (1, 1) if world.scene_rng(seed, index, "people").random() < 0.3 else (0, 0)
    return world.make_scene(seed, index, SCENE_SIZE, 1, 5, people=with_people)


def vqa(scene: Scene, rng: np.random.Generator) -> tuple[str, str, str]:
    """`(question, answer, type)`: count, colour, shape, position or yes/no."""
    shapes = scene.shapes
    for _ in range(20):
        kind = str(rng.choice(["count", "color", "shape", "position", "yesno"]))
        if kind == "count":
            k = str(rng.choice(KINDS))
            return f"How many {_plural(k)} are there?", str(scene.count(k)), kind
        if kind == "yesno":
            if rng.random() < 0.5 and shapes:
                o = shapes[int(rng.integers(len(shapes)))]
                color, k = o.color, o.category
            else:
                color, k = str(rng.choice(list(COLORS))), str(rng.choice(KINDS))
            present = any(o.color == color and o.category == k for o in shapes)
            return f"Is there a {color} {k}?", "yes" if present else "no", kind
        if not shapes:
            continue
        o = shapes[int(rng.integers(len(shapes)))]
        if kind == "color" and scene.count(o.category) == 1:
            return f"What color is the {o.category}?", o.color, kind
        if kind == "shape" and sum(p.color == o.color for p in shapes) == 1:
            return f"What shape is the {o.color} object?", o.category, kind
        if kind == "position" and (asked := position_question(scene, o)) is not None:
            return (*asked, kind)
    k = str(rng.choice(KINDS))
    return f"How many {_plural(k)} are there?", str(scene.count(k)), "count"


def position_question(scene: Scene, o: SceneObject) -> tuple[str, str] | None:
    """`(question, answer)` asking which half holds `o`, or None when its short name is not its own or it
    sits too near the middle to say."""
    if sum(p.short_name == o.short_name for p in scene.shapes) != 1:
        return None
    cx = o.center[0] / scene.image.width
    if abs(cx - 0.5) <= 0.1:
        return None
    return f"Is the {o.short_name} on the left or the right?", "left" if cx < 0.5 else "right"


def caption(scene: Scene) -> str:
    """'There is a large red circle, a small blue square and a person.' (left to right)."""
    objs = sorted(scene.objects, key=lambda o: o.center[0])
    return "There is " + _listing(["a " + o.name for o in objs]) + "."


def region_point(obj: SceneObject, rng: np.random.Generator) -> tuple[float, float]:
    """A point on the object's visible mask, near its centre (pixel centre coordinates)."""
    ys, xs = np.nonzero(obj.mask)
    cx, cy = xs.mean(), ys.mean()
    order = np.argsort((xs - cx) ** 2 + (ys - cy) ** 2)
    pick = order[int(rng.integers(0, max(1, len(order) // 4)))]
    return float(xs[pick]) + 0.5, float(ys[pick]) + 0.5


def make_sample(task: str, seed: int, index: int, canonical: bool = False) -> Sample:
    """One sample of `task`.

    Args:
        canonical: the evaluation form — all categories in their fixed order for detection and
            segmentation, every keypoint for pose (training varies order and subsets).
    """
    if task not in TASKS:
        raise ValueError(f"unknown task {task!r}; known: {', '.join(TASKS)}")
    rng = world.scene_rng(seed, index, "task:" + task)
    if task == "generate":
        kind, color, size = str(rng.choice(KINDS)), str(rng.choice(list(COLORS))), str(rng.choice(SIZES))
        cap = f"a {size} {color} {kind}"
        q, a = templates.generation(cap)
        image = world.single_shape_image(kind, color, size, GEN_SIZE, rng, center=True)
        return Sample(task, None, q, a, phrases=[cap], targets=[[]], instruction=cap, image_out=image,
                      meta={"kind": kind, "color": color, "size": size})  # fmt: skip
    scene = _scene_for(task, seed, index)
    objs = scene.objects
    if task == "vqa":
        q, a, qtype = vqa(scene, rng)
        return Sample(task, scene, q, a, meta={"type": qtype})
    if task == "caption":
        return Sample(task, scene, CAPTION_QUESTION, caption(scene))
    if task in ("region_caption", "interactive"):
        k = int(rng.integers(len(objs)))
        o = objs[k]
        region = o.box if rng.random() < 0.5 else region_point(o, rng)
        if task == "region_caption":
            return Sample(task, scene, REGION_QUESTION, o.short_name, regions=[region], targets=[[k]],
                          meta={"region": "box" if len(region) == 4 else "point"})  # fmt: skip
        q = "Can you segment <reg>region1<region></reg> in the image?"
        return Sample(task, scene, q, "Yes, here are the results for region1[DET] in the image.",
                      regions=[region], phrases=[o.short_name], targets=[[k]])  # fmt: skip
    if task in ("detect", "segment"):
        if canonical:
            classes = list(CATEGORIES)
        else:
            present = sorted({o.category for o in objs})
            extra = [c for c in CATEGORIES if c not in present]
            rng.shuffle(extra)
            classes = present + extra[: int(rng.integers(0, len(extra) + 1))]
            rng.shuffle(classes)
        q, a = (templates.detection if task == "detect" else templates.segmentation)(classes)
        targets = [[i for i, o in enumerate(objs) if o.category == c] for c in classes]
        return Sample(task, scene, q, a, phrases=list(classes), targets=targets)
    if task == "ground":
        choices = [(k, d) for k in range(len(objs)) if (d := unique_description(scene, k)) is not None]
        if not choices:  # every object has a twin: name the first exactly by all attributes
            choices = [(0, objs[0].name)]
        k, phrase = choices[int(rng.integers(len(choices)))]
        o = objs[k]
        if o.color is not None and rng.random() < 0.3 and not canonical:
            phrase = o.name  # more specific than needed is still unique
        q, a = templates.grounding(phrase)
        return Sample(task, scene, q, a, phrases=[phrase], targets=[[k]])
    if task == "pose":
        names = list(KEYPOINTS)
        history, q, a = templates.pose(names)
        people = [i for i, o in enumerate(objs) if o.category == world.PERSON]
        return Sample(task, scene, q, a, history=history, phrases=[world.PERSON, *names],
                      targets=[people] + [people] * len(names))  # fmt: skip
    # edit: recolour one shape that its colour and kind name alone
    names = [o.short_name for o in objs]
    candidates = [i for i, n in enumerate(names) if names.count(n) == 1] or [0]
    k = candidates[int(rng.integers(len(candidates)))]
    o = objs[k]
    new_color = str(rng.choice([c for c in COLORS if c != o.color]))
    unique = scene.count(o.category) == 1
    target_name = o.category if unique else o.short_name
    instruction = f"make the {target_name} {new_color}"
    q, a = templates.editing(instruction)
    out = recolor(scene, k, new_color)
    return Sample(task, scene, q, a, phrases=[instruction], targets=[[k]], instruction=instruction,
                  image_out=out, meta={"kind": o.category, "old": o.color, "new": new_color})  # fmt: skip


def recolor(scene: Scene, k: int, color: str) -> Image.Image:
    """The scene with object k's visible pixels painted in `color` (the editing ground truth)."""
    arr = np.asarray(scene.image).copy()
    arr[scene.objects[k].mask] = COLORS[color]
    return Image.fromarray(arr)


def task_mixture(seed: int, index: int, weights: dict[str, float]) -> str:
    """The task of training sample `index` under `weights` (deterministic)."""
    names = sorted(weights)
    p = np.array([weights[n] for n in names], np.float64)
    r = world.scene_rng(seed, index, "mixture").random()
    return names[int(np.searchsorted(np.cumsum(p / p.sum()), r, side="right").clip(0, len(names) - 1))]
