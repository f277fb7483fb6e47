"""`vle-run` (the C++ example, no Python) against `visionllm-edge run --json` on one artifact: one request of
every task, run both ways in subprocesses, compared field by field.

    python3 benchmarks/vle_run_parity.py ARTIFACT [--vle-run build/cpu/vle-run] [--max-new-tokens N]

Both programs get the same PNG scene (stb and Pillow decode PNG identically; their JPEG decoders differ),
the same prompt, answer prefix, region and seed. Compared: the answer text, token ids, stop reason and
routed groups (equal), the printed summary (equal line for line, the `wrote ...` lines aside), detections
(label, kind, query and mask area equal; score within 1e-6; box within 1e-3), the semantic map (labels and
pixels per label equal), poses (box and keypoints within 1e-3), the generated images (shape equal, pixels
within 1e-3 of full scale; the Python command saves them beside its `--draw` picture, vle-run under
`--save-images`), and `ldd vle-run` naming no libpython. One line per task; exit status 1 on a mismatch.

Not a timing: it lives here because it runs on an artifact folder the way the benchmarks do. The pytest
version is tests/test_vle_run.py (the tiny-random artifact).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

REPO = Path(__file__).resolve().parents[1]
DEFAULT_VLE_RUN = REPO / "build" / "cpu" / "vle-run"
BUILD_COMMAND = "cmake --preset cpu && cmake --build --preset cpu"

#: The sampled request's settings (also benchmarks/gpu_check.py's, which runs these requests in-process).
SAMPLING = dict(temperature=1.3, top_k=40, top_p=0.95, repetition_penalty=1.1)

#: Boxes and keypoints (pixels), generated images (full scale 1) and scores may differ by at most these.
BOX_TOL = 1e-3
IMAGE_TOL = 1e-3
SCORE_TOL = 1e-6


@dataclass(frozen=True)
class Request:
    task: str
    prompt: str
    answer_prefix: str | None = None
    region: str | None = None  # x0,y0,x1,y1 in pixels, as both commands take it
    image_outputs: bool = False  # [GEN] / [EDIT]: generated images to compare
    sample: bool = False  # seeded sampling (temperature, top-k, top-p, repetition penalty) instead of greedy


def _requests() -> list[Request]:
    """One request per task, and a sampled caption. Perception and generation answers are forced with the
    official templates' answers (as the task shortcuts send them) so that every decoder runs, also on
    random weights."""
    from visionllm_edge import templates

    keypoints = ["head", "neck", "left hand", "right hand", "hip", "left foot", "right foot"]
    det_q, det_a = templates.detection(["circle", "square", "person"])
    grd_q, grd_a = templates.grounding("red circle")
    seg_q, seg_a = templates.segmentation(["circle", "square"])
    _history, pose_q, pose_a = templates.pose(keypoints)
    # vle-run and `visionllm-edge run` take no history: the object turn goes into the same answer.
    pose_prefix = templates.detection(["person"])[1] + " " + pose_a
    gen_q, gen_a = templates.generation("a large red circle")
    edit_q, edit_a = templates.editing("make the circle blue")
    return [
        Request("vqa", "How many circles are there?"),
        Request("sampled_caption", "Describe the image briefly.", sample=True),
        Request("caption", "Describe the image briefly."),
        Request(
            "region_caption", "What is in <reg>region1<region></reg>? Answer briefly.", region="20,20,70,70"
        ),
        Request("detection", det_q, det_a),
        Request("grounding", grd_q, grd_a),
        Request("segmentation", seg_q, seg_a),
        Request("pose", pose_q, pose_prefix),
        Request("generation", gen_q, gen_a, image_outputs=True),
        Request("editing", edit_q, edit_a, image_outputs=True),
    ]


REQUESTS = _requests()
TASKS = [r.task for r in REQUESTS]


def write_scene(path: Path) -> Path:
    """The demo's small scene (sky, grass, a red circle, a green square, a stick figure) as a PNG."""
    from visionllm_edge.demo import demo_scene

    demo_scene().save(path)
    return path


def find_vle_run(given: str | None = None) -> Path:
    return Path(given or os.environ.get("VLE_RUN") or DEFAULT_VLE_RUN)


# --- running both ----------------------------------------------------------------------------------------


@dataclass
class Run:
    """One command's outcome: its stdout, the JSON it wrote and the generated images it saved."""

    stdout: str
    result: dict
    images: list[np.ndarray]


def _common_args(req: Request, image: Path, max_new_tokens: int, seed: int, threads: int) -> list[str]:
    args = ["--image", str(image), "--prompt", req.prompt, "--max-new-tokens", str(max_new_tokens)]
    args += ["--seed", str(seed), "--threads", str(threads)]
    if req.answer_prefix is not None:
        args += ["--answer-prefix", req.answer_prefix]
    if req.region is not None:
        args += ["--region", req.region]
    if req.sample:
        args += ["--sample"]
        for key, value in SAMPLING.items():
            args += ["--" + key.replace("_", "-"), str(value)]
    return args


def _run(cmd: list[str], timeout: float) -> str:
    # Both print UTF-8; a stray byte would show as an escape (and differ) rather than stop the comparison.
    env = dict(os.environ, PYTHONIOENCODING="utf-8")
    done = subprocess.run(
        cmd, capture_output=True, encoding="utf-8", errors="backslashreplace", timeout=timeout, env=env
    )
    if done.returncode != 0:
        raise RuntimeError(
            f"{Path(cmd[0]).name} exited with {done.returncode}: {' '.join(cmd)}\n{done.stderr[-3000:]}"
        )
    return done.stdout


def _load_png(path: Path) -> np.ndarray:
    with Image.open(path) as im:
        return np.asarray(im.convert("RGB"))


def run_python(
    artifact,
    req: Request,
    image: Path,
    work: Path,
    *,
    max_new_tokens=16,
    seed=0,
    threads=0,
    timeout=600.0,
    python=sys.executable,
) -> Run:
    """`visionllm-edge run ... --json` (and `--draw`, which also saves the generated images)."""
    out = work / f"py-{req.task}"
    out.mkdir(parents=True, exist_ok=True)
    cmd = [python, "-m", "visionllm_edge.cli", "run", str(artifact)]
    cmd += _common_args(req, image, max_new_tokens, seed, threads) + ["--json", str(out / "result.json")]
    if req.image_outputs:
        cmd += ["--draw", str(out / "draw.png")]
    stdout = _run(cmd, timeout)
    result = json.loads((out / "result.json").read_text())
    images = [_load_png(out / f"draw_gen{i}.png") for i in range(len(result["images"]))]
    return Run(stdout, result, images)


def run_cpp(
    binary,
    artifact,
    req: Request,
    image: Path,
    work: Path,
    *,
    max_new_tokens=16,
    seed=0,
    threads=0,
    timeout=600.0,
) -> Run:
    """`vle-run ... --json` (and `--save-images`)."""
    out = work / f"cpp-{req.task}"
    out.mkdir(parents=True, exist_ok=True)
    cmd = [str(binary), str(artifact)]
    cmd += _common_args(req, image, max_new_tokens, seed, threads) + ["--json", str(out / "result.json")]
    if req.image_outputs:
        cmd += ["--save-images", str(out / "images")]
    stdout = _run(cmd, timeout)
    result = json.loads((out / "result.json").read_text())
    images = [_load_png(out / "images" / f"image_{i}.png") for i in range(len(result["images"]))]
    return Run(stdout, result, images)


# --- comparing -------------------------------------------------------------------------------------------


def _close(a, b, tol: float) -> bool:
    a, b = np.asarray(a, dtype=float), np.asarray(b, dtype=float)
    if a.shape != b.shape:
        return False
    both_nan = np.isnan(a) & np.isnan(b)
    return bool(np.all(both_nan | (np.abs(a - b) <= tol) | (a == b)))


def _summary_lines(stdout: str) -> list[str]:
    """The printed result; the `wrote FILE` lines name each side's own output files."""
    return [line for line in stdout.splitlines() if not line.startswith("wrote ")]


def compare(py: Run, cpp: Run) -> list[str]:
    """What differs between the two runs (empty: they agree)."""
    problems: list[str] = []
    p, c = py.result, cpp.result
    for key in ("text", "token_ids", "stop_reason", "links"):
        if p[key] != c[key]:
            problems.append(f"{key}: python {p[key]!r} != vle-run {c[key]!r}")
    if len(p["detections"]) != len(c["detections"]):
        problems.append(f"detections: python {len(p['detections'])} != vle-run {len(c['detections'])}")
    for i, (a, b) in enumerate(zip(p["detections"], c["detections"])):
        for key in ("label", "kind", "query_index", "mask_area"):
            if a.get(key) != b.get(key):
                problems.append(f"detection {i} {key}: python {a.get(key)!r} != vle-run {b.get(key)!r}")
        if not _close(a["score"], b["score"], SCORE_TOL):
            problems.append(f"detection {i} score: python {a['score']} != vle-run {b['score']}")
        if not _close(a["box_xyxy"], b["box_xyxy"], BOX_TOL):
            problems.append(f"detection {i} box: python {a['box_xyxy']} != vle-run {b['box_xyxy']}")
    if p["segmentation"] != c["segmentation"]:
        problems.append(f"segmentation: python {p['segmentation']} != vle-run {c['segmentation']}")
    if len(p["poses"]) != len(c["poses"]):
        problems.append(f"poses: python {len(p['poses'])} != vle-run {len(c['poses'])}")
    for i, (a, b) in enumerate(zip(p["poses"], c["poses"])):
        for key in ("label", "keypoint_names"):
            if a[key] != b[key]:
                problems.append(f"pose {i} {key}: python {a[key]!r} != vle-run {b[key]!r}")
        if not _close(a["score"], b["score"], SCORE_TOL):
            problems.append(f"pose {i} score: python {a['score']} != vle-run {b['score']}")
        if not _close(a["box_xyxy"], b["box_xyxy"], BOX_TOL):
            problems.append(f"pose {i} box: python {a['box_xyxy']} != vle-run {b['box_xyxy']}")
        # The JSON rounds keypoints to 3 decimals: two values within 1e-3 may round 1e-3 apart.
        if not _close(a["keypoints"], b["keypoints"], BOX_TOL + 1e-9):
            problems.append(f"pose {i} keypoints differ by more than {BOX_TOL}")
    if p["images"] != c["images"]:
        problems.append(f"image shapes: python {p['images']} != vle-run {c['images']}")
    elif len(py.images) != len(cpp.images):
        problems.append(f"saved images: python {len(py.images)} != vle-run {len(cpp.images)}")
    for i, (a, b) in enumerate(zip(py.images, cpp.images)):
        if a.shape != b.shape:
            problems.append(f"image {i}: python {a.shape} != vle-run {b.shape}")
            continue
        diff = float(np.abs(a.astype(np.float64) - b.astype(np.float64)).max(initial=0.0)) / 255.0
        if diff > IMAGE_TOL:
            problems.append(f"image {i}: pixels differ by up to {diff:.4f} of full scale")
    if _summary_lines(py.stdout) != _summary_lines(cpp.stdout):
        diffs = [
            f"python {a!r} / vle-run {b!r}"
            for a, b in zip(_summary_lines(py.stdout) + [""] * 99, _summary_lines(cpp.stdout) + [""] * 99)
            if a != b
        ]
        problems.append("printed output differs: " + "; ".join(diffs[:3]))
    return problems


def libpython_in_ldd(binary) -> tuple[list[str], int]:
    """The `ldd` lines that name libpython, and how many libraries ldd listed."""
    out = subprocess.run(["ldd", str(binary)], capture_output=True, text=True, timeout=60, check=True).stdout
    lines = [line.strip() for line in out.splitlines() if line.strip()]
    return [line for line in lines if "libpython" in line], len(lines)


def describe(run: Run) -> str:
    """A short account of what one request produced (the line printed per task)."""
    r = run.result
    parts = [f"{len(r['token_ids'])} tokens ({r['stop_reason']})"]
    if r["links"]:
        parts.append("groups " + ",".join(lk["kind"] for lk in r["links"]))
    if r["detections"]:
        parts.append(f"{len(r['detections'])} detections")
    if r["segmentation"] is not None:
        parts.append("semantic map " + str(r["segmentation"]["pixels_per_label"]))
    if r["poses"]:
        parts.append(f"{len(r['poses'])} poses")
    if run.images:
        parts.append(f"{len(run.images)} image(s) {run.images[0].shape[1]}x{run.images[0].shape[0]}")
    text = r["text"] if len(r["text"]) <= 50 else r["text"][:47] + "..."
    return ", ".join(parts) + f", text {text!r}"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("artifact", help="artifact folder written by 'visionllm-edge export'")
    parser.add_argument("--vle-run", default=None, help=f"the binary (default $VLE_RUN or {DEFAULT_VLE_RUN})")
    parser.add_argument("--max-new-tokens", type=int, default=32)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=0, help="intra-op threads per graph, both sides")
    parser.add_argument("--timeout", type=float, default=600.0, help="seconds per command")
    parser.add_argument("--tasks", default=None, help="comma-separated subset of " + ",".join(TASKS))
    args = parser.parse_args(argv)

    binary = find_vle_run(args.vle_run)
    if not binary.is_file():
        print(f"vle-run not found at {binary}: build it with `{BUILD_COMMAND}` (or pass --vle-run)")
        return 2
    tasks = TASKS if args.tasks is None else [t.strip() for t in args.tasks.split(",") if t.strip()]
    unknown = sorted(set(tasks) - set(TASKS))
    if unknown:
        parser.error(f"unknown tasks {unknown}; choose from {TASKS}")

    failed = 0
    with tempfile.TemporaryDirectory(prefix="vle-run-parity-") as tmp:
        work = Path(tmp)
        image = write_scene(work / "scene.png")
        opts = dict(
            max_new_tokens=args.max_new_tokens, seed=args.seed, threads=args.threads, timeout=args.timeout
        )
        for req in REQUESTS:
            if req.task not in tasks:
                continue
            try:
                py = run_python(args.artifact, req, image, work, **opts)
                cpp = run_cpp(binary, args.artifact, req, image, work, **opts)
            except (RuntimeError, subprocess.TimeoutExpired) as e:
                failed += 1
                print(f"{req.task:<15} ERROR     {e}", flush=True)
                continue
            problems = compare(py, cpp)
            failed += bool(problems)
            verdict = "MISMATCH  " + "; ".join(problems) if problems else "same      " + describe(cpp)
            print(f"{req.task:<15} {verdict}", flush=True)
    found, listed = libpython_in_ldd(binary)
    failed += bool(found)
    ldd = f"LIBPYTHON {'; '.join(found)}" if found else f"no libpython among {listed} libraries"
    print(f"{'ldd vle-run':<15} {ldd}")
    print(f"{len(tasks) + 1 - failed} of {len(tasks) + 1} checks agree")
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
