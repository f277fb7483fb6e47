"""The soak (issue 19, item 5): many mixed requests in one process, watching for leaks.

One `Pipeline` on an artifact (shapes-tiny by default) answers `--requests` requests drawn from a seeded mix
of every task the artifact serves: questions and captions (greedy free generation), region questions (a box
or a point for `<region>`), the interactive "segment <region>" dialogue (routing tokens in a generated
answer), detection, segmentation, grounding, pose, text-to-image and editing (the diffusion loop), streamed
answers (`Pipeline.stream`, a thread per request), chat sessions (opened, asked 2-4 turns, dropped), and a
few bad requests that must raise a named error. Frames are fresh (a new scene, at one of several sizes, so
the decoders' input and the LLM's sequence lengths vary) or repeated (the previous request's picture: the
pipeline's frame cache and KV prefix reuse are hit); a bad request is followed by a probe whose answer must
equal the one it got at the start (no state left over from the failed request).

Every `--sample-every` (500) requests it records the process's RSS (`VmRSS` of /proc/self/status), the
Python heap's allocated blocks (`sys.getallocatedblocks`) and the KV arena's bytes; fds (/proc/self/fd) and
threads (/proc/self/task) are counted after loading, after the start probes (every engine made) and at the
end. A fixed set of probe requests (one per task, greedy, seeded diffusion) runs at the start and at the end
and must give identical answers.

Bars (issue 19): RSS after all requests within 5 % of RSS after the first 500; fds and threads at the end
equal to those after the start probes; every probe identical; every bad request refused with its error.

    python3 benchmarks/soak.py [--artifact shapes-tiny|DIR] [--requests 10000] [--seed 0]
        [--json benchmarks/results/soak.json] [--md benchmarks/results/soak.md] [--threads 0]
        [--tracemalloc] [--max-rss-mib 2000]

`--tracemalloc` traces Python allocations (slower) and reports the largest growth between the first sample
and the end, to find a Python-side leak. The exit status is 1 when a bar is missed.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import sys
import time
import tracemalloc
from array import array
from collections import defaultdict
from pathlib import Path

import numpy as np
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import date_line, loadavg, machine_line, markdown_table  # noqa: E402
from visionllm_edge import Pipeline  # noqa: E402
from visionllm_edge.shapes import world  # noqa: E402
from visionllm_edge.shapes.instructions import CAPTION_QUESTION, REGION_QUESTION, make_sample  # noqa: E402

#: Request kinds and their weights in the mix (a chat session counts one request per turn). The diffusion
#: tasks cost ~10-30x a perception request on 2 cores, so they are a small share, but present.
MIX = {
    "vqa": 12,
    "caption": 6,
    "region": 8,
    "interactive": 5,
    "detect": 12,
    "segment": 9,
    "ground": 9,
    "pose": 8,
    "stream": 8,
    "chat": 10,
    "generate": 1.5,
    "edit": 1.5,
    "bad": 2,
}
#: Sizes (w, h) of fresh frames: the scenes are 128x128; the others change the decoders' input shape (short
#: side 128, long side up to 224 on shapes-tiny) and so every det/pose run's shapes.
FRAME_SIZES = ((128, 128), (160, 96), (96, 160), (224, 128), (64, 64), (200, 150))
REPEAT_SHARE = 0.5
ANSWER_TOKENS = 16
CAPTION_TOKENS = 32

#: Bad requests: (name, call, error type, the message's pattern). Each is followed by a probe.
BAD = [
    (
        "max_new_tokens=0",
        lambda p, img: p(img, "hi", max_new_tokens=0),
        ValueError,
        r"max_new_tokens must be positive, got 0",
    ),
    (
        "temperature<0",
        lambda p, img: p(img, "hi", do_sample=True, temperature=-1.0),
        ValueError,
        r"temperature must be positive when sampling, got -1",
    ),
    (
        "top_p>1",
        lambda p, img: p(img, "hi", do_sample=True, top_p=1.5),
        ValueError,
        r"top_p must be in \(0, 1\]",
    ),
    ("unknown keyword", lambda p, img: p(img, "hi", max_tokens=5), TypeError, r"unknown request keyword"),
    (
        "classes as a str",
        lambda p, img: p.detect(img, "circle"),
        TypeError,
        r"classes must be a list of names",
    ),
    (
        "routing token in a class",
        lambda p, img: p.detect(img, ["circle[DET]"]),
        ValueError,
        r"contains the special token '\[DET\]'",
    ),
    (
        "more <region> than regions",
        lambda p, img: p(img, "What is <region> and <region>?", regions=[(1, 1, 9, 9)]),
        ValueError,
        r"region",
    ),
    (
        "region outside the frame",
        lambda p, img: p(img, REGION_QUESTION, regions=[(500, 500, 600, 600)]),
        ValueError,
        r"region 0",
    ),
    (
        "prompt over the context",
        lambda p, img: p(img, "circle " * (p.context_capacity + 1)),
        ValueError,
        r"the prompt is \d+ tokens; the context holds",
    ),
    (
        "noise of the wrong shape",
        lambda p, img: p.generate_image("a red circle", noise=np.zeros((1, 2, 3), np.float32)),
        ValueError,
        r"noise: expected float32 of shape",
    ),
]


# --- the process's resources --------------------------------------------------------------------------------


def rss_kib() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    raise RuntimeError("/proc/self/status has no VmRSS line")


def thread_count(expected: int | None = None) -> int:
    """Threads in /proc/self/task. A streamed request's thread has been joined when its result is out, but
    the kernel may list it for a moment longer while it exits, so a count other than `expected` is read
    again for up to 0.5 s; a leaked thread stays."""
    count = len(os.listdir("/proc/self/task"))
    for _ in range(10):
        if expected is None or count == expected:
            break
        time.sleep(0.05)
        count = len(os.listdir("/proc/self/task"))
    return count


def resources(pipe: Pipeline, threads: int | None = None) -> dict:
    return {
        "rss_kib": rss_kib(),
        "python_blocks": sys.getallocatedblocks(),
        "arena_bytes": pipe.arena_bytes,
        "fds": len(os.listdir("/proc/self/fd")),
        "threads": thread_count(threads),
    }


# --- answers compared ---------------------------------------------------------------------------------------


#: How far a repeated greedy answer's decoder outputs may move. The text and the token ids must repeat
#: exactly; the numbers may not: the KV rows before the image, which every request reuses, are recomputed
#: now and then within a longer prefill (on shapes-tiny a text-only prompt shares 32 of the 33 rows an image
#: prompt has before its first patch), and ONNX Runtime's GEMM blocks over the rows, so such a row changes in
#: its last bits (detection scores measured 5e-7 apart).
NUMBER_TOL = 1e-3  # scores, boxes and keypoints (pixels): absolute
PIXEL_SHARE_TOL = 1e-3  # masks and the semantic map: share of pixels that may flip at the threshold
IMAGE_TOL = 2  # generated and edited images: uint8 levels


def signature(result) -> dict:
    """What a repeated greedy answer must repeat: text, ids and labels exactly; the decoders' to tolerance."""
    numbers = [d.score for d in result.detections] + [v for d in result.detections for v in d.box_xyxy]
    numbers += [p.score for p in result.poses] + [v for p in result.poses for v in p.box_xyxy]
    numbers += [float(v) for p in result.poses for v in np.asarray(p.keypoints, np.float64).ravel()]
    masks = [np.asarray(d.mask, bool) for d in result.detections if d.mask is not None]
    if result.segmentation is not None:
        masks.append(np.asarray(result.segmentation.label_map))
    return {
        "text": result.text,
        "token_ids": list(result.token_ids),
        "labels": (
            [(d.label, d.kind) for d in result.detections],
            [p.label for p in result.poses],
            None if result.segmentation is None else list(result.segmentation.labels),
        ),
        "numbers": np.asarray(numbers, np.float64),
        "masks": masks,
        "images": [np.asarray(im) for im in result.images],
    }


def deltas(a: dict, b: dict) -> dict:
    """How far b is from a: per field, 0 when equal, the largest deviation, or inf when the shapes differ."""
    out = {key: 0.0 if a[key] == b[key] else float("inf") for key in ("text", "token_ids", "labels")}
    na, nb = a["numbers"], b["numbers"]
    out["numbers"] = float("inf") if na.shape != nb.shape else float(np.max(np.abs(na - nb), initial=0.0))
    out["masks"] = max(
        [float("inf") if len(a["masks"]) != len(b["masks"]) else 0.0]
        + [
            float("inf") if x.shape != y.shape else float(np.mean(x != y))
            for x, y in zip(a["masks"], b["masks"])
        ]
    )
    out["images"] = max(
        [float("inf") if len(a["images"]) != len(b["images"]) else 0.0]
        + [
            float("inf")
            if x.shape != y.shape
            else float(np.max(np.abs(x.astype(np.int16) - y.astype(np.int16))))
            for x, y in zip(a["images"], b["images"])
        ]
    )
    return out


def differences(a: dict, b: dict) -> list[str]:
    """The fields of b outside their tolerance of a (docstring of NUMBER_TOL)."""
    tol = {
        "text": 0.0,
        "token_ids": 0.0,
        "labels": 0.0,
        "numbers": NUMBER_TOL,
        "masks": PIXEL_SHARE_TOL,
        "images": IMAGE_TOL,
    }
    return [key for key, value in deltas(a, b).items() if value > tol[key]]


# --- requests -----------------------------------------------------------------------------------------------


class Soak:
    """The request mix on one pipeline: draws each request's kind, picture and prompt from `seed`."""

    def __init__(self, pipe: Pipeline, seed: int):
        self.pipe = pipe
        self.seed = seed
        self.rng = np.random.default_rng(seed)
        self.index = 0  # scenes drawn so far
        self.image = None  # the previous request's picture
        self.fresh = 0
        self.repeated = 0
        self.kinds = list(MIX)
        weights = np.array([MIX[k] for k in self.kinds], np.float64)
        self.weights = weights / weights.sum()
        self.probes = self.make_probes()
        self.baseline: dict[str, dict] = {}
        self.refused: dict[str, int] = defaultdict(int)
        self.wrong: list[str] = []  # wrong answers: a check failed, or a probe after a bad request differed

    # Probes: fixed pictures and prompts, one per task.
    def make_probes(self) -> dict:
        s = {
            t: make_sample(t, 9_999_999, 0, canonical=True)
            for t in (
                "vqa",
                "region_caption",
                "interactive",
                "detect",
                "segment",
                "ground",
                "pose",
                "generate",
                "edit",
            )
        }
        p = self.pipe
        return {
            "vqa": lambda: p(s["vqa"].scene.image, s["vqa"].question, max_new_tokens=ANSWER_TOKENS),
            "caption": lambda: p(s["vqa"].scene.image, CAPTION_QUESTION, max_new_tokens=CAPTION_TOKENS),
            "region": lambda: p(
                s["region_caption"].scene.image,
                REGION_QUESTION,
                regions=s["region_caption"].regions,
                max_new_tokens=ANSWER_TOKENS,
            ),
            "interactive": lambda: p(
                s["interactive"].scene.image,
                s["interactive"].question,
                regions=s["interactive"].regions,
                max_new_tokens=ANSWER_TOKENS,
            ),
            "detect": lambda: p.detect(s["detect"].scene.image, s["detect"].phrases),
            "segment": lambda: p.segment(s["segment"].scene.image, s["segment"].phrases),
            "ground": lambda: p.ground(s["ground"].scene.image, s["ground"].phrases[0]),
            "pose": lambda: p.pose(s["pose"].scene.image, list(world.KEYPOINTS)),
            "generate": lambda: p.generate_image(s["generate"].instruction, seed=7),
            "edit": lambda: p.edit_image(s["edit"].scene.image, s["edit"].instruction, seed=7),
        }

    def run_probes(self) -> dict[str, dict]:
        return {name: signature(probe()) for name, probe in self.probes.items()}

    def frame(self, sample) -> np.ndarray:
        """The request's picture: the previous one again, or the sample's scene at one of FRAME_SIZES."""
        if self.image is not None and self.rng.random() < REPEAT_SHARE:
            self.repeated += 1
            return self.image
        self.fresh += 1
        w, h = FRAME_SIZES[int(self.rng.integers(len(FRAME_SIZES)))]
        image = sample.scene.image
        if image.size != (w, h):
            image = image.resize((w, h), Image.BILINEAR)
        self.image = np.asarray(image.convert("RGB"))
        return self.image

    def sample(self, task: str):
        self.index += 1
        return make_sample(task, self.seed, self.index)

    def scaled_regions(self, sample, image: np.ndarray) -> list:
        """The sample's regions in the frame's pixels (the frame may be resized or another scene's)."""
        sx, sy = image.shape[1] / world_size(sample), image.shape[0] / world_size(sample)
        out = []
        for r in sample.regions:
            out.append(tuple(v * (sx if i % 2 == 0 else sy) for i, v in enumerate(r)))
        return out

    def request(self, kind: str) -> tuple[int, list[tuple[str, float]]]:
        """Runs one request of `kind` (a chat: its turns). Returns (requests made, [(task, ms)])."""
        p = self.pipe
        t0 = time.perf_counter()
        ms = lambda: (time.perf_counter() - t0) * 1e3  # noqa: E731
        if kind in ("vqa", "caption", "stream"):
            s = self.sample("vqa")
            img = self.frame(s)
            prompt = s.question if kind == "vqa" else CAPTION_QUESTION
            tokens = ANSWER_TOKENS if kind == "vqa" else CAPTION_TOKENS
            if kind != "stream":
                check_answer(p(img, prompt, max_new_tokens=tokens), kind)
                return 1, [(kind, ms())]
            pieces = list(p.stream(img, prompt, max_new_tokens=tokens))
            result = pieces[-1]
            check_answer(result, kind)
            if "".join(pieces[:-1]).strip() != result.text.strip():
                raise SoakError(
                    f"stream: the pieces {''.join(pieces[:-1])!r} do not make the text {result.text!r}"
                )
            return 1, [(kind, ms())]
        if kind in ("region", "interactive"):
            s = self.sample("region_caption" if kind == "region" else "interactive")
            img = self.frame(s)
            check_answer(
                p(img, s.question, regions=self.scaled_regions(s, img), max_new_tokens=ANSWER_TOKENS), kind
            )
            return 1, [(kind, ms())]
        if kind in ("detect", "segment"):
            s = self.sample(kind)
            r = getattr(p, kind)(self.frame(s), s.phrases)
            if len(r.links) != len(s.phrases):
                raise SoakError(f"{kind}: {len(r.links)} links for {len(s.phrases)} classes")
            return 1, [(kind, ms())]
        if kind == "ground":
            s = self.sample("ground")
            p.ground(self.frame(s), s.phrases[0])
            return 1, [("ground", ms())]
        if kind == "pose":
            s = self.sample("pose")
            p.pose(self.frame(s), list(world.KEYPOINTS))
            return 1, [("pose", ms())]
        if kind == "generate":
            s = self.sample("generate")
            r = p.generate_image(s.instruction, seed=int(self.rng.integers(2**31)))
            if not r.images:
                raise SoakError("generate: no image")
            return 1, [("generate", ms())]
        if kind == "edit":
            s = self.sample("edit")
            r = p.edit_image(self.frame(s), s.instruction, seed=int(self.rng.integers(2**31)))
            if not r.images:
                raise SoakError("edit: no image")
            return 1, [("edit", ms())]
        if kind == "chat":
            return self.chat()
        if kind == "bad":
            return self.bad()
        raise ValueError(f"unknown request kind {kind!r}")

    def chat(self) -> tuple[int, list[tuple[str, float]]]:
        """A session: 2-4 turns on one picture, then dropped (the object goes out of scope)."""
        s = self.sample("vqa")
        session = self.pipe.chat(self.frame(s), max_new_tokens=ANSWER_TOKENS)
        turns = int(self.rng.integers(2, 5))
        times = []
        for k in range(turns):
            t0 = time.perf_counter()
            question = s.question if k == 0 else self.sample("vqa").question
            check_answer(session.ask(question), "chat")
            times.append(("chat turn", (time.perf_counter() - t0) * 1e3))
        if len(session.history) != turns:
            raise SoakError(f"chat: {len(session.history)} turns in the history after {turns} asks")
        del session
        return turns, times

    def bad(self) -> tuple[int, list[tuple[str, float]]]:
        """A bad request (refused with its named error), then a probe that must answer as at the start."""
        name, call, error, pattern = BAD[int(self.rng.integers(len(BAD)))]
        img = self.frame(self.sample("vqa"))
        t0 = time.perf_counter()
        try:
            call(self.pipe, img)
        except error as e:
            if not re.search(pattern, str(e)):
                raise SoakError(
                    f"bad request {name!r}: {type(e).__name__}({e}) does not match {pattern!r}"
                ) from e
        else:
            raise SoakError(
                f"bad request {name!r} was answered, expected {error.__name__} matching {pattern!r}"
            )
        refused_ms = (time.perf_counter() - t0) * 1e3
        self.refused[name] += 1
        probe = ("vqa", "region", "detect", "pose")[int(self.rng.integers(4))]
        t0 = time.perf_counter()
        got = signature(self.probes[probe]())
        if differences(self.baseline[probe], got):
            self.wrong.append(
                f"after the bad request {name!r}, probe {probe!r} differs from the start: "
                f"{deltas(self.baseline[probe], got)}"
            )
        return 2, [("bad (refused)", refused_ms), ("probe after bad", (time.perf_counter() - t0) * 1e3)]


class SoakError(AssertionError):
    """A request answered wrongly (not a resource bar: those are reported, not raised)."""


def world_size(sample) -> int:
    return sample.scene.image.size[0]


def check_answer(result, task: str) -> None:
    if result.stop_reason not in ("eos", "length"):
        raise SoakError(f"{task}: stop reason {result.stop_reason!r}")
    if not result.token_ids:
        raise SoakError(f"{task}: an empty answer")


# --- the run ------------------------------------------------------------------------------------------------


def soak(
    artifact: Path,
    requests: int,
    seed: int,
    threads: int,
    sample_every: int,
    trace: bool,
    max_rss_mib: int = 2000,
    progress=print,
) -> dict:
    started = time.time()
    load0 = loadavg()
    if trace:
        tracemalloc.start(10)
    before_load = {"fds": len(os.listdir("/proc/self/fd")), "threads": len(os.listdir("/proc/self/task"))}
    pipe = Pipeline.load(artifact, threads=threads)
    after_load = resources(pipe)
    s = Soak(pipe, seed)
    t0 = time.perf_counter()
    # Twice, and the second is the baseline. The first made the lazily loaded engines, and its first request
    # computed the system prompt's KV rows, which every later request on any frame reuses (they precede the
    # image); a request that computes them within a longer prefill gets them different in the last bits
    # (ONNX Runtime's GEMM blocks over the rows), so the first run's first probe is not what a warm
    # pipeline answers. Its differences are recorded, not judged.
    cold = s.run_probes()
    s.baseline = s.run_probes()
    warm_diffs = {
        k: deltas(cold[k], s.baseline[k]) for k in cold if any(deltas(cold[k], s.baseline[k]).values())
    }
    probes_ms = (time.perf_counter() - t0) * 1e3
    after_probes = resources(pipe)
    progress(f"loaded, probes in {probes_ms:.0f} ms; {after_probes}")

    samples = [{"requests": 0, **after_probes, "elapsed_s": 0.0}]
    # array('d'), not lists of floats: the record's own growth would show in the Python heap's blocks.
    latencies: dict[str, array] = defaultdict(lambda: array("d"))
    counts: dict[str, int] = defaultdict(int)
    snapshot0 = None
    done = 0
    next_sample = sample_every
    loop0 = time.perf_counter()
    while done < requests:
        kind = s.kinds[int(s.rng.choice(len(s.kinds), p=s.weights))]
        try:
            n, times = s.request(kind)
        except SoakError as e:  # a wrong answer is recorded and the soak goes on; it misses a bar
            s.wrong.append(f"request {done + 1}: {e}")
            n, times = 1, []
        done += n
        for task, ms in times:
            latencies[task].append(ms)
            counts[task] += 1
        if done >= next_sample or done >= requests:
            rec = {
                "requests": done,
                **resources(pipe, after_probes["threads"]),
                "elapsed_s": round(time.perf_counter() - loop0, 1),
                "load": loadavg(),
            }
            samples.append(rec)
            progress(
                f"{done:6d} requests  rss {rec['rss_kib'] / 1024:.1f} MiB  blocks {rec['python_blocks']}  "
                f"fds {rec['fds']}  threads {rec['threads']}  {rec['elapsed_s']:.0f} s  load {rec['load']}"
            )
            if rec["rss_kib"] > max_rss_mib * 1024:
                raise SoakError(
                    f"RSS {rec['rss_kib'] / 1024:.0f} MiB after {done} requests is over --max-rss-mib "
                    f"{max_rss_mib}: stopped before the machine runs out of memory"
                )
            if trace and snapshot0 is None:
                snapshot0 = tracemalloc.take_snapshot()
            while next_sample <= done:
                next_sample += sample_every
    loop_s = time.perf_counter() - loop0
    end_probes = s.run_probes()
    probe_diffs = {k: differences(s.baseline[k], end_probes[k]) for k in s.baseline}
    probe_deltas = {k: deltas(s.baseline[k], end_probes[k]) for k in s.baseline}
    end = resources(pipe, after_probes["threads"])
    growth = []
    if trace and snapshot0 is not None:
        top = tracemalloc.take_snapshot().compare_to(snapshot0, "lineno")[:15]
        growth = [str(stat) for stat in top]

    first = next((r for r in samples if r["requests"] >= min(sample_every, requests)), samples[-1])
    last = samples[-1]
    rss_ratio = last["rss_kib"] / first["rss_kib"]
    bars = {
        "rss_within_5pct_of_first_sample": abs(rss_ratio - 1) <= 0.05,
        "fds_unchanged": end["fds"] == after_probes["fds"],
        "threads_unchanged": end["threads"] == after_probes["threads"],
        "probes_identical": not any(probe_diffs.values()),
        "no_wrong_answers": not s.wrong,
    }
    return {
        "command": "python3 " + " ".join(sys.argv),
        "date": date_line(),
        "machine": machine_line(),
        "load_start": load0,
        "load_end": loadavg(),
        "artifact": str(artifact),
        "model": pipe.manifest.model.name if hasattr(pipe.manifest, "model") else None,
        "diffusion_steps": json.loads((Path(artifact) / "manifest.json").read_text())["generation"][
            "diffusion_steps"
        ],
        "seed": seed,
        "threads_option": threads,
        "requests": done,
        "wall_s": round(time.time() - started, 1),
        "loop_s": round(loop_s, 1),
        "frames": {"fresh": s.fresh, "repeated": s.repeated},
        "before_load": before_load,
        "after_load": after_load,
        "after_start_probes": after_probes,
        "end": end,
        "samples": samples,
        "rss_first_sample_kib": first["rss_kib"],
        "rss_last_sample_kib": last["rss_kib"],
        "rss_ratio": round(rss_ratio, 4),
        "counts": dict(counts),
        "latency_ms_median": {k: round(statistics.median(v), 2) for k, v in latencies.items()},
        "latency_ms_max": {k: round(max(v), 2) for k, v in latencies.items()},
        "refused": dict(s.refused),
        "probes": sorted(s.baseline),
        "probe_differences_warm": warm_diffs,
        "probe_differences_end": {k: v for k, v in probe_diffs.items() if v},
        "probe_deltas_end": probe_deltas,
        "wrong_answers": s.wrong,
        "tracemalloc_top_growth": growth,
        "bars": bars,
    }


def markdown(rec: dict) -> str:
    lines = [
        "# Soak: mixed requests in one process (issue 19, item 5)",
        "",
        f"{rec['date']}; {rec['machine']}; load at start {rec['load_start']}, at end {rec['load_end']}.",
        "",
        f"Command: `{rec['command']}`",
        "",
        f"Artifact `{rec['artifact']}` (diffusion steps {rec['diffusion_steps']}); "
        f"{rec['requests']} requests in {rec['loop_s']:.0f} s; frames: {rec['frames']['fresh']} fresh, "
        f"{rec['frames']['repeated']} repeated; "
        f"KV arena {rec['end']['arena_bytes']:,} bytes.",
        "",
        "## Bars",
        "",
        markdown_table(
            ["bar", "met", "figures"],
            [
                [
                    "RSS after all requests within 5 % of RSS after the first sample",
                    yes(rec["bars"]["rss_within_5pct_of_first_sample"]),
                    f"{rec['rss_first_sample_kib'] / 1024:.1f} MiB → "
                    f"{rec['rss_last_sample_kib'] / 1024:.1f} MiB "
                    f"(×{rec['rss_ratio']:.4f})",
                ],
                [
                    "fds unchanged",
                    yes(rec["bars"]["fds_unchanged"]),
                    f"after load {rec['after_load']['fds']}, "
                    f"after the start probes {rec['after_start_probes']['fds']}, "
                    f"end {rec['end']['fds']}",
                ],
                [
                    "threads unchanged",
                    yes(rec["bars"]["threads_unchanged"]),
                    f"after load {rec['after_load']['threads']}, after the start probes "
                    f"{rec['after_start_probes']['threads']}, end {rec['end']['threads']}",
                ],
                [
                    "probes identical at start and end",
                    yes(rec["bars"]["probes_identical"]),
                    f"{len(rec['probes'])} probes; "
                    f"outside tolerance: {rec['probe_differences_end'] or 'none'}",
                ],
                [
                    "no wrong answer (each request's checks; each bad request's next probe as at the start)",
                    yes(rec["bars"]["no_wrong_answers"]),
                    f"{sum(rec['refused'].values())} bad requests refused; "
                    f"wrong answers: {len(rec['wrong_answers'])}",
                ],
            ],
        ),
        "",
        "Probes, end against start: text and token ids exactly; the largest deviation of the decoders' "
        f"numbers (scores, boxes, keypoints; tolerance {NUMBER_TOL}), the share of mask pixels that differ "
        f"(tolerance {PIXEL_SHARE_TOL}) and the largest image difference in uint8 levels "
        f"(tolerance {IMAGE_TOL}):",
        "",
        markdown_table(
            ["probe", "text", "token ids", "labels", "numbers", "mask pixels", "image levels"],
            [
                [k, *(f"{d[f]:.3g}" for f in ("text", "token_ids", "labels", "numbers", "masks", "images"))]
                for k, d in rec["probe_deltas_end"].items()
            ],
        ),
        "",
        "## RSS, Python heap, fds and threads",
        "",
        markdown_table(
            [
                "requests",
                "RSS MiB",
                "vs first sample",
                "Python blocks",
                "arena bytes",
                "fds",
                "threads",
                "s",
                "load",
            ],
            [
                [
                    str(r["requests"]),
                    f"{r['rss_kib'] / 1024:.1f}",
                    f"{r['rss_kib'] / rec['rss_first_sample_kib'] - 1:+.2%}",
                    str(r["python_blocks"]),
                    f"{r['arena_bytes']:,}",
                    str(r["fds"]),
                    str(r["threads"]),
                    f"{r['elapsed_s']:.0f}",
                    r.get("load", ""),
                ]
                for r in rec["samples"]
            ],
        ),
        "",
        "## Requests per task",
        "",
        markdown_table(
            ["task", "count", "median ms", "max ms"],
            [
                [
                    k,
                    str(rec["counts"][k]),
                    f"{rec['latency_ms_median'][k]:.1f}",
                    f"{rec['latency_ms_max'][k]:.1f}",
                ]
                for k in sorted(rec["counts"])
            ],
        ),
        "",
        f"Bad requests refused with their named error: {rec['refused']}.",
    ]
    if rec["wrong_answers"]:
        lines += ["", "## Wrong answers", "", *(f"- {w}" for w in rec["wrong_answers"])]
    if rec["tracemalloc_top_growth"]:
        lines += [
            "",
            "## tracemalloc: largest growth since the first sample",
            "",
            "```",
            *rec["tracemalloc_top_growth"],
            "```",
        ]
    return "\n".join(lines) + "\n"


def yes(ok: bool) -> str:
    return "yes" if ok else "**NO**"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument(
        "--artifact",
        default="shapes-tiny",
        help="an artifact folder, or shapes-tiny: the bundled model's cached export (made first if absent)",
    )
    ap.add_argument("--requests", type=int, default=10_000)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=0, help="intra-op threads per engine (0: ONNX Runtime's)")
    ap.add_argument("--sample-every", type=int, default=500)
    ap.add_argument("--tracemalloc", action="store_true")
    ap.add_argument("--max-rss-mib", type=int, default=2000, help="stop when RSS passes this (a leak)")
    ap.add_argument("--json", type=Path, default=None, help="write the record here")
    ap.add_argument("--md", type=Path, default=None, help="write the markdown report here")
    args = ap.parse_args(argv)
    if args.requests <= 0:
        ap.error(f"--requests must be positive, got {args.requests}")
    if args.sample_every <= 0:
        ap.error(f"--sample-every must be positive, got {args.sample_every}")
    artifact = Path(args.artifact)
    if args.artifact == "shapes-tiny" and not artifact.exists():
        from visionllm_edge.demo import ensure_artifact

        artifact, _ = ensure_artifact()
    rec = soak(
        artifact,
        args.requests,
        args.seed,
        args.threads,
        args.sample_every,
        args.tracemalloc,
        args.max_rss_mib,
        progress=lambda m: print(m, flush=True),
    )
    text = markdown(rec)
    print(text)
    if args.json:
        args.json.write_text(json.dumps(rec, indent=1) + "\n")
    if args.md:
        args.md.write_text(text)
    return 0 if all(rec["bars"].values()) else 1


if __name__ == "__main__":
    sys.exit(main())
