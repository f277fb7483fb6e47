"""`visionllm-edge demo`: the bundled `shapes-tiny` model through the runtime, one request of every kind.

The first run exports the bundled checkpoint (`visionllm_edge/export/data/shapes_tiny`, or the folder
`$VLE_SHAPES_TINY` names) into the user's cache folder (`$XDG_CACHE_HOME` or `~/.cache`, then
`visionllm-edge/shapes-tiny-<key>`, the key a short hash of the weights, the config and the package version);
later runs load that artifact and need no torch. The requests run on `visionllm_edge.Pipeline` (ONNX Runtime)
on scenes of the shapes world generated from `--seed`: VQA, captioning, region captioning from a box,
detection, grounding, semantic segmentation, pose, generation and editing. Each prints the question, the
answer or what the decoders found, the ground truth where there is one and the per-stage timings, and the
pictures (scenes annotated with `Result.draw`, generated and edited images, all upscaled 4x with nearest
neighbours so that 64- and 128-pixel pictures can be seen) go into `--out`.

`--reference` runs the older demo instead: the PyTorch reference on `tiny-random` (random weights, so the
answers are noise) with routing forced by answer prefixes.
"""

from __future__ import annotations

import dataclasses
import hashlib
import os
import time
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

#: Scenes of the demo come from this seed unless `--seed` says otherwise (training uses seeds 1, 101, 201).
DEMO_SEED = 7
#: Pictures are written this many times larger (nearest neighbour): scenes are 128 pixels, generations 64.
UPSCALE = 4
#: Where the exported artifact is cached, under the user's cache folder.
CACHE_SUBDIR = "visionllm-edge"
#: The bundled model's name (the cache folder starts with it).
MODEL_NAME = "shapes-tiny"

#: The requests, in the order they run: (kind, what it shows).
KINDS = (
    ("vqa", "visual question answering"),
    ("caption", "captioning"),
    ("region_caption", "region captioning from a box"),
    ("detection", "detection of every category"),
    ("grounding", "grounding a referring expression"),
    ("segmentation", "semantic segmentation"),
    ("pose", "pose (keypoints of the stick figures)"),
    ("generation", "image generation"),
    ("editing", "image editing"),
)


class DemoError(ValueError):
    """The demo cannot run as asked; the message says why and what to do."""


# --- the artifact ------------------------------------------------------------------------------------------


def cache_root() -> Path:
    """`$XDG_CACHE_HOME/visionllm-edge`, or `~/.cache/visionllm-edge` when that is unset or relative."""
    base = os.environ.get("XDG_CACHE_HOME", "").strip()
    root = Path(base) if base and Path(base).is_absolute() else Path.home() / ".cache"
    return root / CACHE_SUBDIR


def artifact_key(checkpoint: Path) -> str:
    """A short hash of the checkpoint's weights and config, this package's version and the manifest schema.

    A retrained model, a new version of the exporter or a new artifact format gets a folder of its own (an
    artifact of an older schema is refused by the runtime); the same ones reuse it.
    """
    from visionllm_edge import __version__, contract

    h = hashlib.sha256()
    for name in ("model.safetensors", "config.json"):
        with open(checkpoint / name, "rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                h.update(block)
        h.update(b"\0")
    h.update(__version__.encode())
    h.update(f"schema {contract.MANIFEST_SCHEMA_VERSION}".encode())
    return h.hexdigest()[:12]


def _bundled_checkpoint() -> Path:
    """The bundled checkpoint folder, checked (needs the export extra: the first run exports it)."""
    try:
        from visionllm_edge.export.train.ship import require_bundled
    except ImportError as e:
        raise DemoError(
            f"the demo exports the bundled {MODEL_NAME} model on its first run, which needs the host side "
            f"(pip install 'visionllm-edge[export]'; {e}); or pass --artifact with an exported folder"
        ) from None
    return require_bundled()


def ensure_artifact(cache_dir: Path | None = None, progress: bool = True) -> tuple[Path, float | None]:
    """The cached artifact of the bundled model, exported into the cache first when it is not there.

    Args:
        cache_dir: where artifacts are cached (default `cache_root()`).
        progress: print what the export does.

    Returns:
        `(artifact folder, seconds the export took)`; the seconds are None when the cache had it.

    Raises:
        CheckpointError: the bundled model is absent or unreadable (the message names the file).
    """
    checkpoint = _bundled_checkpoint()
    target = (cache_dir or cache_root()) / f"{MODEL_NAME}-{artifact_key(checkpoint)}"
    if (target / "manifest.json").is_file():
        return target, None
    from visionllm_edge.export.exporter import export

    print(f"first run: exporting the bundled {MODEL_NAME} model ({checkpoint}) to {target}", flush=True)
    start = time.perf_counter()
    # The exporter writes into a hidden partial folder beside the target and renames it when complete, so an
    # interrupted export leaves nothing that looks cached. Every graph is checked against the PyTorch
    # reference at its first validation shape ("quick"); the full check at every shape is what
    # `visionllm-edge export shapes-tiny OUT` and the tests run.
    export(checkpoint, target, validate="quick", overwrite=True, progress=progress)
    seconds = time.perf_counter() - start
    print(f"exported in {seconds:.1f} s", flush=True)
    return target, seconds


# --- the requests ------------------------------------------------------------------------------------------


def _upscaled(image) -> Image.Image:
    """`image` (PIL or `H x W x 3` uint8) made `UPSCALE` times larger with nearest neighbours."""
    im = image if isinstance(image, Image.Image) else Image.fromarray(np.ascontiguousarray(image))
    return im.convert("RGB").resize((im.width * UPSCALE, im.height * UPSCALE), Image.Resampling.NEAREST)


def _scaled(result, factor: float):
    """A copy of `result` with boxes and keypoints in a picture `factor` times larger (masks are resized
    when drawn), so that the annotations are drawn at the upscaled picture's resolution."""
    detections = [
        dataclasses.replace(d, box_xyxy=tuple(float(v) * factor for v in d.box_xyxy))
        for d in result.detections
    ]
    poses = []
    for p in result.poses:
        keypoints = np.array(p.keypoints, dtype=np.float64, copy=True)
        keypoints[:, :2] *= factor
        poses.append(
            dataclasses.replace(p, box_xyxy=tuple(float(v) * factor for v in p.box_xyxy), keypoints=keypoints)
        )
    return dataclasses.replace(result, detections=detections, poses=poses)


def _box(box) -> str:
    return "[" + ", ".join(f"{v:.0f}" for v in box) + "]"


def _scene_index(seed: int) -> int:
    """The first scene of `seed` with objects of three or more categories (a scene worth looking at)."""
    from visionllm_edge.shapes.instructions import make_sample

    for index in range(1000):
        if len({o.category for o in make_sample("caption", seed, index).scene.objects}) >= 3:
            return index
    return 0


def _edit_sample(seed: int):
    """The first editing scene of `seed` with exactly one square, and that square is not blue."""
    from visionllm_edge.shapes.instructions import make_sample

    for index in range(1000):
        sample = make_sample("edit", seed, index, canonical=True)
        squares = [k for k, o in enumerate(sample.scene.objects) if o.category == "square"]
        if len(squares) == 1 and sample.scene.objects[squares[0]].color != "blue":
            return sample.scene, squares[0]
    raise DemoError(f"seed {seed}: no editing scene with one square that is not blue among the first 1000")


class _Report:
    """Prints each request and writes its pictures into `out_dir`."""

    def __init__(self, out_dir: Path):
        self.out_dir = out_dir
        self.pictures: dict[str, list[Path]] = {}
        self.results: dict = {}

    def save(self, kind: str, name: str, image, upscale: bool = True) -> Path:
        """Writes `name.png`: `image` enlarged `UPSCALE` times, or as it is when it was drawn enlarged."""
        path = self.out_dir / f"{name}.png"
        picture = _upscaled(image) if upscale else Image.fromarray(np.ascontiguousarray(image))
        picture.save(path)
        self.pictures.setdefault(kind, []).append(path)
        print(f"   wrote {path}")
        return path

    def show(self, kind: str, question: str, result, truth: list[str], answer: bool = True) -> None:
        from visionllm_edge.cli import _print_summary

        title = dict(KINDS)[kind]
        print(f"\n== {kind}: {title}")
        print(f"   question: {question}")
        if answer:
            print(f"   answer:   {result.text}")
        _print_summary(result, indent="   ")
        for i, line in enumerate(truth):
            print(f"   {'truth:' if i == 0 else '':<9} {line}")
        stages = ", ".join(f"{stage} {ms:.1f}" for stage, ms in result.timings.items())
        print(f"   timings (ms): {stages}")
        self.results[kind] = result


def run_requests(pipe, seed: int, out_dir: Path) -> _Report:
    """Runs the nine requests on scenes generated from `seed`, printing them and writing their pictures.

    Args:
        pipe: a `Pipeline` (or anything with its call and task shortcuts).
        seed: the scenes' seed; the same seed gives the same scenes and requests.
        out_dir: folder for the pictures (created).

    Returns:
        What was shown: `results` (kind -> `Result`) and `pictures` (kind -> paths written).
    """
    from visionllm_edge import templates
    from visionllm_edge.shapes import checker
    from visionllm_edge.shapes.instructions import make_sample, recolor
    from visionllm_edge.shapes.world import CATEGORIES, KEYPOINTS, SKELETON

    out_dir.mkdir(parents=True, exist_ok=True)
    report = _Report(out_dir)
    index = _scene_index(seed)
    vqa = make_sample("vqa", seed, index, canonical=True)
    scene = vqa.scene  # the text, detection, grounding and segmentation requests all ask about this scene
    image = scene.image
    big = _upscaled(image)
    print(
        f"scene {index} of seed {seed}, {image.width}x{image.height}: "
        + ", ".join(o.name for o in scene.objects)
    )
    report.save("scene", "scene", image)

    result = pipe(image, vqa.question, max_new_tokens=16)
    report.show("vqa", vqa.question, result, [vqa.answer])

    caption = make_sample("caption", seed, index, canonical=True)
    result = pipe(image, caption.question, max_new_tokens=48)
    report.show("caption", caption.question, result, [caption.answer])

    region = make_sample("region_caption", seed, index, canonical=True)
    target = scene.objects[region.targets[0][0]]
    result = pipe(image, region.question, regions=[target.box], max_new_tokens=16)
    report.show(
        "region_caption", f"{region.question}  (region {_box(target.box)})", result, [target.short_name]
    )
    marked = big.copy()
    ImageDraw.Draw(marked).rectangle([v * UPSCALE for v in target.box], outline=(255, 0, 255), width=3)
    report.save("region_caption", "region_caption", np.asarray(marked), upscale=False)

    question = templates.detection(CATEGORIES)[0]
    result = pipe.detect(image, CATEGORIES)
    report.show("detection", question, result, [f"{o.name} {_box(o.box)}" for o in scene.objects], False)
    report.save("detection", "detection", _scaled(result, UPSCALE).draw(big), upscale=False)

    ground = make_sample("ground", seed, index, canonical=True)
    phrase, grounded = ground.phrases[0], scene.objects[ground.targets[0][0]]
    result = pipe.ground(image, phrase)
    report.show(
        "grounding", templates.grounding(phrase)[0], result, [f"{grounded.name} {_box(grounded.box)}"], False
    )
    report.save("grounding", "grounding", _scaled(result, UPSCALE).draw(big), upscale=False)

    semantic = scene.semantic_map()
    pixels = [
        f"{c} {int((semantic == i).sum())} px" for i, c in enumerate(CATEGORIES) if (semantic == i).any()
    ]
    result = pipe.segment(image, CATEGORIES)
    report.show("segmentation", templates.segmentation(CATEGORIES)[0], result, [", ".join(pixels)], False)
    report.save("segmentation", "segmentation", _scaled(result, UPSCALE).draw(big), upscale=False)

    pose = make_sample("pose", seed, 0, canonical=True)
    people = pose.scene.people
    result = pipe.pose(pose.scene.image, KEYPOINTS)
    truth = [f"{len(people)} person(s): " + ", ".join(_box(o.box) for o in people)]
    report.show("pose", templates.pose(KEYPOINTS)[1], result, truth, False)
    skeleton = [(KEYPOINTS[a], KEYPOINTS[b]) for a, b in SKELETON]
    drawn = _scaled(result, UPSCALE).draw(_upscaled(pose.scene.image), skeleton=skeleton)
    report.save("pose", "pose", drawn, upscale=False)

    caption_text = "a large red circle"
    result = pipe.generate_image(caption_text, seed=seed)
    found = [f"{f.color} {f.kind}" for f in checker.find_shapes(result.images[0])] if result.images else []
    truth = [f"checker finds: {', '.join(found) or 'no clean shape'} (wanted: red circle)"]
    report.show("generation", templates.generation(caption_text)[0], result, truth, False)
    for i, generated in enumerate(result.images):
        report.save("generation", "generation" if i == 0 else f"generation_{i}", generated)

    edit_scene, square = _edit_sample(seed)
    instruction = "make the square blue"
    result = pipe.edit_image(edit_scene.image, instruction, seed=seed)
    found = [f"{f.color} {f.kind}" for f in checker.find_shapes(result.images[0])] if result.images else []
    truth = [
        f"the {edit_scene.objects[square].name} turns blue",
        f"checker finds: {', '.join(found) or 'no clean shape'}",
    ]
    report.show("editing", templates.editing(instruction)[0], result, truth, False)
    report.save("editing", "editing_input", edit_scene.image)
    for i, edited in enumerate(result.images):
        report.save("editing", "editing" if i == 0 else f"editing_{i}", edited)
    report.save("editing", "editing_truth", recolor(edit_scene, square, "blue"))
    return report


def run_demo(
    out_dir: str | Path = "visionllm-edge-demo",
    artifact: str | Path | None = None,
    seed: int = DEMO_SEED,
    cache_dir: Path | None = None,
) -> _Report:
    """`visionllm-edge demo`: the bundled model (exported into the cache when needed) through `Pipeline`.

    Args:
        out_dir: folder for the pictures.
        artifact: an exported artifact folder to use instead of the bundled model.
        seed: the scenes' seed.
        cache_dir: where the bundled model's artifact is cached (default `cache_root()`).
    """
    from visionllm_edge.manifest import load_manifest
    from visionllm_edge.pipeline import Pipeline

    start = time.perf_counter()
    if artifact is None:
        folder, _ = ensure_artifact(cache_dir)
        hint = f" (remove {folder} to export it again)"
    else:
        folder, hint = Path(artifact), ""
    t0 = time.perf_counter()
    try:
        # Every engine now, so that the timings below are the requests' own.
        pipe = Pipeline.load(folder, components=load_manifest(folder, verify_hashes=False).components)
    except ValueError as e:  # a broken manifest or a file whose hash changed
        raise DemoError(f"{e}{hint}") from None
    m = pipe.manifest.model
    print(
        f"artifact: {folder}\nmodel: {m.name}, LLM {m.num_layers} layers x {m.hidden_size}; "
        f"{len(pipe.manifest.graphs)} graphs loaded in {time.perf_counter() - t0:.1f} s"
    )
    report = run_requests(pipe, seed, Path(out_dir))
    print(f"\npictures in {Path(out_dir).resolve()}; demo done in {time.perf_counter() - start:.1f} s")
    return report


# --- the reference demo on tiny-random (--reference) --------------------------------------------------------

#: (title, prompt, answer prefix, regions) — routing is forced with the prefix, as random weights never route.
DEMO_REQUESTS = [
    ("chat", "Describe the image.", None, None),
    (
        "detection",
        "Can you analyze the image and identify the circle, square present?",
        "Yes, here are the results for circle[DET], square[DET]",
        None,
    ),
    ("grounding", "Where can we locate the red circle in the image?", "It is [GRD]", None),
    ("segmentation", "Please segment the sky and the grass.", "sky[SEG], grass[SEG]", None),
    (
        "pose",
        "Please find the keypoints of the person.",
        "person[DET]. nose[POSE], left hand[POSE], right hand[POSE]",
        None,
    ),
    ("region", "What is in <reg>region1<region></reg>?", None, [(20.0, 20.0, 70.0, 70.0)]),
    ("generation", "Draw a large red circle.", "Sure, here it is [GEN]", None),
    ("editing", "Make the square blue.", "Here it is [EDIT]", None),
]


def demo_scene(width: int = 160, height: int = 120) -> Image.Image:
    """A small deterministic scene: sky, grass, a red circle, a green square and a stick figure."""
    im = Image.new("RGB", (width, height), (135, 180, 235))
    d = ImageDraw.Draw(im)
    d.rectangle((0, height * 2 // 3, width, height), fill=(70, 150, 60))
    d.ellipse((20, 20, 70, 70), fill=(220, 40, 40))
    d.rectangle((95, 30, 135, 70), fill=(40, 200, 90))
    cx = 120
    d.ellipse((cx - 5, 78, cx + 5, 88), outline=(0, 0, 0), width=2)
    d.line((cx, 88, cx, 104), fill=(0, 0, 0), width=2)
    d.line((cx - 10, 94, cx + 10, 94), fill=(0, 0, 0), width=2)
    d.line((cx, 104, cx - 7, 116), fill=(0, 0, 0), width=2)
    d.line((cx, 104, cx + 7, 116), fill=(0, 0, 0), width=2)
    return im


def run_reference_demo(out_dir: Path) -> None:
    """The PyTorch reference on `tiny-random` (random weights): the request loop end to end, answers noise."""
    from visionllm_edge.export import ReferencePipeline, load_reference

    out_dir.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    pipe = ReferencePipeline(load_reference("tiny-random"))
    print(f"loaded tiny-random (seeded random weights) in {(time.perf_counter() - start) * 1000:.0f} ms")
    image = demo_scene()
    image.save(out_dir / "scene.png")
    for title, prompt, prefix, regions in DEMO_REQUESTS:
        t0 = time.perf_counter()
        result = pipe.run(image, prompt, regions=regions, answer_prefix=prefix, max_new_tokens=12)
        total = (time.perf_counter() - t0) * 1000
        print(f"\n== {title}: {prompt!r}" + (f" (answer prefix {prefix!r})" if prefix else ""))
        print(result)
        print(f"  total {total:.0f} ms")
        if result.detections or result.segmentation is not None or result.poses:
            path = out_dir / f"{title}.png"
            Image.fromarray(result.draw(np.asarray(image))).save(path)
            print(f"  wrote {path}")
        for i, im in enumerate(result.images):
            path = out_dir / f"{title}_{i}.png"
            Image.fromarray(np.ascontiguousarray(im)).save(path)
            print(f"  wrote {path}")
    print(f"\npictures in {out_dir.resolve()}")
