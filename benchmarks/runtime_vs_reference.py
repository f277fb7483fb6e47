"""The runtime `Pipeline` (the C++ request loop on ONNX Runtime) against the eager `ReferencePipeline`, in one
process.

The runtime is used through its public Python API only. What happens inside a request is read from what the
C++ loop hands out with every result: `result.timings` (ms per stage: preprocess, vision, region, tokenize,
prefill, decode, object_decoder, pose_decoder, gen_decoder / edit_decoder, postprocess, total) and
`result.raw["stats"]` (`reused_rows`, `decode_steps`, `decode_engine_ms`, `decode_overhead_us_median`,
`decode_overhead_us_max`). Nothing here copies the loop; `benchmarks/decode_overhead.py` is the benchmark
for the loop's own work per decode step.

Both sides run the same requests on the same inputs (images, prompts, regions, diffusion noise) in
interleaved rounds, so that load from other jobs on the machine falls on both alike. Measured:

1. **Decode tokens/s**: free generation of 64 new tokens, greedy with repetition_penalty 1.3 (so that the
   random weights do not loop), runtime vs reference; the token ids must match. The runtime rows add the
   loop's own work per decode step and the engine call per step, from the loop's stats.
2. **End-to-end latency per task**: chat (free generation), detect, ground, segment, pose, region prompt,
   generate_image and edit_image (20 diffusion steps). The runtime uses its task shortcuts (one prefill of
   the official template's forced answer); the reference runs `ReferencePipeline.run` with the same template
   answer given as `answer_prefix` and `max_new_tokens=1` (prefill, one greedy token that is not fed back,
   decoders, post-processing). For the perception tasks, `forward_answer` (the official teacher-forced pass:
   decoders, no post-processing) is timed too. The runtime runs each request twice per round: on a fresh
   frame and again on the same frame (cache hit); a second runtime loaded with 1 ORT thread runs it on a
   fresh frame too. Detect is also run by free generation with an answer prefix, next to the shortcut.
   *Fresh frame*: the runtime keeps one frame (the last picture's vision outputs and KV rows); an untimed
   request on another input (no image, or for a request without an image a small other picture) replaces
   it, so the timed request recomputes vision and every row from the first image row on. The rows before it
   (the system prompt) do not depend on the picture and are reused across frames, as a camera stream gets
   them; the reference recomputes them. The script checks this from the stats (`reused_rows` no further than
   the first image row, and a `vision` stage, on the fresh rows).
3. **Stages**: every row split into the stages of each side's own `result.timings`.
4. **The decoder graphs alone** (object, keypoint): the C++ engine (`visionllm_edge.runtime.engine.
   make_engine`, as the pipeline makes its engines: spinning off) at `--threads` and 1 thread, and with
   spinning on, against the torch modules at `--threads` and 1 thread, on the same inputs: the runtime's
   detection input for the benchmark picture (`Pipeline.detection_input`) and seeded random query states.

What the earlier version of this script measured and this one does not: the split of one decode step into
its pieces (sampling, plan, embeddings, binding, ...). That came from a Python copy of the decode loop,
which no longer exists; the loop now reports its own work per step as one figure, measured in C++.

Threads: the runtime's intra-op threads and `torch.set_num_threads` are both `--threads` (2). Timings are
wall-clock medians, min and max over `--repeats` calls after `--warmup` rounds. Next to each row, `wait` is
the median share of the call's wall time that this process's threads spent runnable but waiting for a CPU
(`/proc/<pid>/task/*/schedstat`): other jobs on the machine, or this process's own surplus threads (one
intra-op pool per engine). `/proc/loadavg` is printed at the start and the end.

    python3 benchmarks/runtime_vs_reference.py [ARTIFACT_DIR] [--repeats 5] [--warmup 2] [--threads 2]

Without ARTIFACT_DIR, tiny-random is exported into a temporary folder first (~2-3 min on 2 cores). The
reference is `load_reference("tiny-random")`; an artifact of another model is refused. The tables are
printed and written to `benchmarks/results/runtime_vs_reference.md` (`--out`).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from visionllm_edge.contract import IMAGE_PATCH_TOKEN
from _common import date_line, fmt, loadavg, machine_line, markdown_table, scene, stats_row, timed_call

DEFAULT_OUT = Path(__file__).resolve().parent / "results" / "runtime_vs_reference.md"

STAGES = [
    "preprocess",
    "vision",
    "region",
    "tokenize",
    "prefill",
    "decode",
    "object_decoder",
    "pose_decoder",
    "gen_decoder",
    "edit_decoder",
    "postprocess",
]


@dataclass
class Samples:
    """Wall times (ms) of one row, with the wait share, the stage timings and the result of each call."""

    wall_ms: list[float] = field(default_factory=list)
    wait: list[float] = field(default_factory=list)
    stages: list[dict[str, float]] = field(default_factory=list)
    results: list = field(default_factory=list)

    def add(self, wall_ms: float, wait: float | None, stages: dict[str, float], result) -> None:
        self.wall_ms.append(wall_ms)
        if wait is not None:
            self.wait.append(wait)
        self.stages.append(dict(stages))
        self.results.append(result)

    @property
    def median(self) -> float:
        return statistics.median(self.wall_ms)

    def stage_medians(self) -> dict[str, float]:
        keys = {k for s in self.stages for k in s}
        return {k: statistics.median(s.get(k, 0.0) for s in self.stages) for k in keys}


# --- cases ------------------------------------------------------------------------------------------------


@dataclass
class Case:
    """One request, as callables per side; rows are timed in interleaved rounds."""

    task: str
    runtime: object  # (pipe) -> Result
    reference: object  # () -> Result
    forward: object | None = None  # () -> ForwardOutput
    note: str = ""
    tokens: bool = False  # free generation: compare token ids, report tokens/s
    prefixed: bool = False  # an answer prefix: the answer's tokens are not all new (no tokens/s row)
    has_image: bool = True
    patch_id: int = -1  # the image row token's id: KV reuse on a fresh frame must stop before the first one


def build_cases(pipe, ref, templates, args) -> list[Case]:
    image = scene(1, 160, 120)
    latent = (
        int(pipe.manifest.graphs["gen_unet"].facts["latent_size"])
        if "gen_unet" in pipe.manifest.graphs
        else 0
    )
    noise = np.random.default_rng(0).standard_normal((1, 4, latent, latent)).astype(np.float32)
    free = dict(max_new_tokens=args.new_tokens, repetition_penalty=1.3)
    forced = dict(max_new_tokens=1)
    classes = ["circle", "square"]
    keypoints = ["nose", "left eye"]
    chat_prompt = "Describe the image in detail."
    region_prompt = "What is in <reg>region1<region></reg>?"
    region = [(10.0, 10.0, 60.0, 50.0)]
    q_det, a_det = templates.detection(classes)
    q_grd, a_grd = templates.grounding("red circle")
    q_seg, a_seg = templates.segmentation(classes)
    h_pose, q_pose, a_pose = templates.pose(keypoints)
    q_gen, a_gen = templates.generation("a large red circle")
    q_edit, a_edit = templates.editing("make the square blue")
    det_prefix = a_det.removesuffix(" in the image.")
    det_free = dict(max_new_tokens=16, repetition_penalty=1.3)
    cases = [
        Case(
            "chat (free generation)",
            lambda p: p(image, chat_prompt, **free),
            lambda: ref.run(image, chat_prompt, **free),
            tokens=True,
            note=f"{args.new_tokens} new tokens, greedy, rep. penalty 1.3",
        ),
        Case(
            "detect (shortcut)",
            lambda p: p.detect(image, classes),
            lambda: ref.run(image, q_det, answer_prefix=a_det, **forced),
            lambda: ref.forward_answer(image, q_det, a_det),
            note="2 classes",
        ),
        Case(
            "detect (free generation, answer prefix)",
            lambda p: p(image, q_det, answer_prefix=det_prefix, **det_free),
            lambda: ref.run(image, q_det, answer_prefix=det_prefix, **det_free),
            tokens=True,
            prefixed=True,
            note="prefix up to the last [DET]; ≤ 16 new tokens",
        ),
        Case(
            "ground",
            lambda p: p.ground(image, "red circle"),
            lambda: ref.run(image, q_grd, answer_prefix=a_grd, **forced),
            lambda: ref.forward_answer(image, q_grd, a_grd),
        ),
        Case(
            "segment",
            lambda p: p.segment(image, classes),
            lambda: ref.run(image, q_seg, answer_prefix=a_seg, **forced),
            lambda: ref.forward_answer(image, q_seg, a_seg),
            note="2 classes",
        ),
        Case(
            "pose",
            lambda p: p.pose(image, keypoints),
            lambda: ref.run(image, q_pose, history=h_pose, answer_prefix=a_pose, **forced),
            lambda: ref.forward_answer(image, q_pose, a_pose, history=h_pose),
            note="person; 2 keypoints",
        ),
        Case(
            "region prompt (free generation)",
            lambda p: p(image, region_prompt, regions=region, **dict(free, max_new_tokens=32)),
            lambda: ref.run(image, region_prompt, regions=region, **dict(free, max_new_tokens=32)),
            tokens=True,
            note="1 box region; 32 new tokens",
        ),
        Case(
            "generate_image",
            lambda p: p.generate_image("a large red circle", noise=noise),
            lambda: ref.run(None, q_gen, answer_prefix=a_gen, noise=noise, **forced),
            note="no image; 20 DDIM steps, same noise",
            has_image=False,
        ),
        Case(
            "edit_image",
            lambda p: p.edit_image(image, "make the square blue", noise=noise),
            lambda: ref.run(image, q_edit, answer_prefix=a_edit, noise=noise, **forced),
            note="20 DDIM steps, same noise",
        ),
    ]
    wanted = set(args.tasks) if args.tasks else None
    patch_id = pipe.manifest.tokens[IMAGE_PATCH_TOKEN]
    for c in cases:
        c.patch_id = patch_id
    return [c for c in cases if wanted is None or any(w in c.task for w in wanted)]


_OTHER_PICTURE = scene(99, 32, 32)


def replace_frame(pipe, case: Case) -> None:
    """An untimed request on another input, so that the runtime's one cached frame is no longer the case's."""
    if case.has_image:
        pipe(None, "Hi.", max_new_tokens=1)
    else:
        pipe(_OTHER_PICTURE, "Hi.", max_new_tokens=1)


RT_FRESH = "runtime, fresh frame"
RT_SAME = "runtime, same frame"
RT_1T = "runtime, fresh frame, 1 thread"
REF_RUN = "reference `run`"
REF_FORWARD = "reference `forward_answer` (no post-proc.)"
ROW_ORDER = [RT_FRESH, RT_SAME, RT_1T, REF_RUN, REF_FORWARD]


def run_cases(cases: list[Case], pipe, pipe_1t, args, log) -> dict[str, dict[str, Samples]]:
    """Rounds over all cases; per case and round: fresh-frame runtime, then same-frame runtime (a cache hit
    needs the fresh call just before it), the 1-thread runtime on a fresh frame, and the reference (and
    forward_answer) before or after them, alternating, so that neither side always runs first."""
    out: dict[str, dict[str, Samples]] = {c.task: defaultdict(Samples) for c in cases}
    total_rounds = args.warmup + args.repeats
    for r in range(total_rounds):
        t_round = time.perf_counter()
        for case in cases:
            runtime = [(RT_FRESH, pipe, True), (RT_SAME, pipe, False)]
            if pipe_1t is not None:
                runtime.append((RT_1T, pipe_1t, True))
            reference = [(REF_RUN, None, False)]
            if case.forward is not None and not args.no_forward:
                reference.append((REF_FORWARD, None, False))
            order = runtime + reference if r % 2 == 0 else reference + runtime
            for name, p, fresh in order:
                if p is not None:
                    if fresh:
                        replace_frame(p, case)  # not timed
                    wall, wait, res = timed_call(lambda p=p, fn=case.runtime: fn(p))
                else:
                    wall, wait, res = timed_call(case.reference if name == REF_RUN else case.forward)
                if r >= args.warmup:
                    stages = getattr(res, "timings", None) or {}
                    out[case.task][name].add(wall, wait, stages, res)
        log(
            f"  round {r + 1}/{total_rounds} ({'warm-up' if r < args.warmup else 'timed'}) "
            f"{time.perf_counter() - t_round:.1f} s, loadavg {loadavg()}"
        )
    return out


def _first_index(ids, token: int) -> int:
    """The index of `token`'s first occurrence in `ids`, or len(ids) when absent."""
    ids = list(ids)
    return ids.index(token) if token in ids else len(ids)


def frame_check(case: Case, rows: dict[str, Samples]) -> list[str]:
    """Whether the fresh rows recomputed the frame and the same-frame rows hit the cache (from the stats)."""
    notes = []
    for name in (RT_FRESH, RT_1T):
        if name not in rows:
            continue
        results = rows[name].results
        reused = [r.raw["stats"].get("reused_rows", 0) for r in results]
        vision = [r.timings.get("vision", 0.0) > 0 for r in results]
        # Rows before the first image row (the system prompt) may be reused; none from it on.
        image_start = [_first_index(r.raw["input_ids"], case.patch_id) for r in results]
        if any(n > start for n, start in zip(reused, image_start)) or (case.has_image and not all(vision)):
            notes.append(f"**{name}: not fresh (reused rows {reused})**")
    if RT_SAME in rows:
        reused = rows[RT_SAME].results[-1].raw["stats"].get("reused_rows")
        if reused is not None:
            notes.append(f"same frame reuses {reused:.0f} rows")
    return notes


def check_case(case: Case, rows: dict[str, Samples]) -> str:
    """Agreement notes: same tokens (free generation) or same link kinds (forced answers), cache checks."""
    rt = rows[RT_FRESH].results[-1]
    rf = rows[REF_RUN].results[-1]
    notes = []
    if case.tokens and case.prefixed:
        # Sampled tokens: one per engine step, plus the last one (EOS or the limit), which is not fed.
        notes.append(
            f"{rt.raw['stats']['decode_steps'] + 1:.0f} new tokens after the prefix ({rt.stop_reason})"
        )
    elif case.tokens:
        notes.append(f"{len(rt.token_ids)} new tokens ({rt.stop_reason})")
    if case.tokens:
        notes.append("ids match" if rt.token_ids == rf.token_ids else "**ids differ**")
    rk = [lk.kind for lk in rt.links]
    fk = [lk.kind for lk in rf.links]
    if rk != fk:
        notes.append(f"**links differ: {rk} vs {fk}**")
    elif rk:
        notes.append(f"links {'/'.join(sorted(set(rk)))}×{len(rk)}")
    notes += frame_check(case, rows)
    return "; ".join(notes)


# --- 1. decode throughput ---------------------------------------------------------------------------------


def decode_section(cases, results, args) -> str:
    rows = []
    for case in cases:
        if not case.tokens or case.prefixed:
            continue
        for name in (RT_FRESH, RT_SAME, RT_1T, REF_RUN):
            if name not in results[case.task]:
                continue
            s = results[case.task][name]
            tps = [len(r.token_ids) / (r.timings["decode"] / 1e3) for r in s.results]
            ms_step = [r.timings["decode"] / max(len(r.token_ids), 1) for r in s.results]
            own = engine = "–"
            if name != REF_RUN:
                stats = [r.raw["stats"] for r in s.results if r.raw["stats"].get("decode_steps")]
                if stats:
                    own = fmt(statistics.median(st["decode_overhead_us_median"] for st in stats), 1)
                    engine = fmt(
                        statistics.median(st["decode_engine_ms"] * 1e3 / st["decode_steps"] for st in stats),
                        0,
                    )
            label = {
                RT_FRESH: "runtime, fresh frame",
                RT_SAME: "runtime, same frame",
                RT_1T: "runtime, 1 thread",
                REF_RUN: "reference",
            }[name]
            rows.append([case.task, label, *stats_row(tps), fmt(statistics.median(ms_step), 2), own, engine])
        rt = [len(r.token_ids) / r.timings["decode"] for r in results[case.task][RT_FRESH].results]
        rf = [len(r.token_ids) / r.timings["decode"] for r in results[case.task][REF_RUN].results]
        rows.append(
            [
                case.task,
                "**runtime ÷ reference**",
                f"**{statistics.median(rt) / statistics.median(rf):.1f}×**",
                *[""] * 5,
            ]
        )
    return (
        "### 1. Decode throughput (new tokens / decode-stage time; the stage includes sampling of every "
        "token)\n\n"
        "*own work / step*: the loop's work per fed decode step outside the engine call, median of each "
        "request's median step (the loop's `decode_overhead_us_median`); *engine / step*: "
        "`decode_engine_ms / decode_steps`. Both are measured by the C++ loop; see "
        "`benchmarks/decode_overhead.py` for the full table.\n\n"
        + markdown_table(
            [
                "request",
                "side",
                "tok/s median",
                "min",
                "max",
                "ms/token",
                "own work / step µs",
                "engine / step µs",
            ],
            rows,
        )
        + "\n"
    )


# --- 2./3. latency and stages -----------------------------------------------------------------------------


def latency_section(cases, results) -> str:
    rows = []
    for case in cases:
        rs = results[case.task]
        ref_med = rs[REF_RUN].median
        names = [n for n in ROW_ORDER if n in rs]
        for name in names:
            s = rs[name]
            wait = f"{statistics.median(s.wait) * 100:.0f} %" if s.wait else "n/a"
            speed = f"{ref_med / s.median:.1f}×" if name != REF_RUN else "1×"
            rows.append(
                [
                    f"**{case.task}**" if name == names[0] else "",
                    name,
                    *stats_row(s.wall_ms),
                    speed,
                    wait,
                    str(len(s.wall_ms)),
                ]
            )
        rows.append(["", f"*{case.note + '; ' if case.note else ''}{check_case(case, rs)}*", *[""] * 6])
    return (
        "### 2. End-to-end latency per request (ms, wall clock around the call)\n\n"
        "`speed-up` = reference `run` median ÷ row median. `wait` = runqueue wait of all this process's "
        "threads ÷ the call's wall time (median; above 100 % when several threads waited at once): CPUs "
        "held by other jobs *or* by this process's own surplus threads (one intra-op pool per engine).\n\n"
        + markdown_table(["task", "side", "median", "min", "max", "speed-up", "wait", "n"], rows)
        + "\n"
    )


def stage_section(cases, results) -> str:
    rows = []
    labels = {
        RT_FRESH: "runtime",
        RT_SAME: "runtime (same frame)",
        RT_1T: "runtime, 1 thread",
        REF_RUN: "reference",
    }
    for case in cases:
        for name, label in labels.items():
            if name not in results[case.task]:
                continue
            med = results[case.task][name].stage_medians()
            cells = [fmt(med[k], 1) if k in med else "–" for k in STAGES]
            total = fmt(med["total"], 1) if "total" in med else "–"
            rows.append([case.task if name == RT_FRESH else "", label, *cells, total])
    return (
        "### 3. Where the time goes: stage medians (ms, each side's own `result.timings`)\n\n"
        "A stage a request did not run is `–` (a cached frame has no vision stage; its preprocess is the "
        "hash of the picture that finds it).\n\n"
        + markdown_table(["task", "side", *STAGES, "total"], rows)
        + "\n"
    )


# --- 4. decoder graphs alone ------------------------------------------------------------------------------


def graphs_section(pipe, ref, args, log) -> str:
    """The object and keypoint decoders alone, same inputs: the C++ engine against torch, 2 and 1 threads.

    Separates the graphs' own speed from what surrounds them in a request (other engines' thread pools,
    post-processing). Query states are seeded random arrays of the shapes the manifest gives; the detection
    input is the runtime's own for the benchmark picture.
    """
    import torch
    from visionllm_edge.runtime.engine import make_engine

    image = scene(1, 160, 120)
    pixels, mask, _resized = pipe.detection_input(image)
    hidden = pipe.manifest.model.hidden_size
    n_det = pipe.manifest.routing["det"].queries
    n_pose = pipe.manifest.routing["pose"].queries
    rng = np.random.default_rng(0)
    num_queries = int(pipe.manifest.graphs["det"].facts["num_queries"])
    det_feeds = {
        "pixel_values": pixels,
        "pixel_mask": mask,
        "text_query": rng.standard_normal((1, 2, n_det, hidden)).astype(np.float32),
        "text_query_mask": np.ones((1, 2), bool),
        "mask_query_index": np.arange(num_queries, dtype=np.int64)[None],
    }
    obj = np.zeros((1, 100, n_pose, hidden), np.float32)
    kpt = np.zeros((1, 100, n_pose, hidden), np.float32)
    obj[0, :1] = rng.standard_normal((1, n_pose, hidden))
    kpt[0, :2] = rng.standard_normal((2, n_pose, hidden))
    om = np.zeros((1, 100), bool)
    om[0, :1] = True
    km = np.zeros((1, 100), bool)
    km[0, :2] = True
    pose_feeds = {
        "pixel_values": pixels,
        "pixel_mask": mask,
        "object_query": obj,
        "object_query_mask": om,
        "keypoint_query": kpt,
        "keypoint_query_mask": km,
    }
    t = {k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in {**det_feeds, **pose_feeds}.items()}

    def torch_call(fn, threads):
        def call():
            before = torch.get_num_threads()
            torch.set_num_threads(threads)
            try:
                with torch.no_grad():
                    return fn()
            finally:
                torch.set_num_threads(before)

        return call

    def gdino():
        return ref.model.gdino(t["pixel_values"], t["pixel_mask"], t["text_query"], t["text_query_mask"])

    def unipose():
        return ref.model.unipose(
            t["pixel_values"],
            ~t["pixel_mask"],
            t["object_query"],
            t["object_query_mask"],
            t["keypoint_query"],
            t["keypoint_query_mask"],
        )

    rows = []
    for graph, feeds, module in (("det", det_feeds, gdino), ("pose", pose_feeds, unipose)):
        path = pipe.manifest.graphs[graph].path

        def engine_call(threads, spin, feeds=feeds, path=path, graph=graph):
            engine = make_engine(path, "onnxruntime", None, threads, graph, spin=spin)
            return lambda: engine.run(feeds)

        variants = {
            f"C++ engine, {args.threads} threads, spinning off (as in the pipeline)": engine_call(
                args.threads, False
            ),
            f"C++ engine, {args.threads} threads, spinning on": engine_call(args.threads, True),
            "C++ engine, 1 thread": engine_call(1, False),
            f"torch eager, {args.threads} threads": torch_call(module, args.threads),
            "torch eager, 1 thread": torch_call(module, 1),
        }
        samples = {name: [] for name in variants}
        names = list(variants)
        for r in range(args.warmup + args.repeats):
            for name in names[r % len(names) :] + names[: r % len(names)]:
                wall, _wait, _ = timed_call(variants[name])
                if r >= args.warmup:
                    samples[name].append(wall)
        base = statistics.median(samples[f"torch eager, {args.threads} threads"])
        for k, (name, xs) in enumerate(samples.items()):
            rows.append(
                [
                    f"**{graph}**" if k == 0 else "",
                    name,
                    *stats_row(xs),
                    f"{base / statistics.median(xs):.1f}×",
                ]
            )
        log(f"  graphs alone: {graph} done")
    return (
        "### 4. The decoder graphs alone (ms per call, same inputs; seeded random query states)\n\n"
        f"`vs torch` = torch eager {args.threads}-thread median ÷ row median. Spinning: idle intra-op "
        "workers busy-wait for the next run; it helps a lone engine and hurts a pipeline whose engines share "
        "the cores, so the pipeline's engines have it off.\n\n"
        + markdown_table(["graph", "engine", "median", "min", "max", "vs torch"], rows)
        + "\n"
    )


# --- main ---------------------------------------------------------------------------------------------------


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("artifact", nargs="?", help="artifact folder of tiny-random (default: export one now)")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--tasks", nargs="*", help="substrings of task names to run (default: all)")
    ap.add_argument("--no-forward", action="store_true", help="skip the reference forward_answer rows")
    ap.add_argument("--no-graphs", action="store_true", help="skip section 4 (decoder graphs alone)")
    ap.add_argument("--no-1t", action="store_true", help="skip the 1-thread runtime rows")
    ap.add_argument("--out", type=Path, default=DEFAULT_OUT)
    args = ap.parse_args(argv)
    if args.repeats < 5:
        ap.error("--repeats must be at least 5")

    def log(msg: str) -> None:
        print(msg, file=sys.stderr, flush=True)

    load_start = loadavg()
    t_start = time.perf_counter()
    log(f"loadavg at start: {load_start}")
    import torch

    torch.set_num_threads(args.threads)
    from visionllm_edge import Pipeline, templates
    from visionllm_edge.contract import COMPONENT_GRAPHS
    from visionllm_edge.export import ReferencePipeline, load_reference
    from visionllm_edge.manifest import load_manifest

    model = load_reference("tiny-random")
    tmp = None
    artifact = args.artifact
    if artifact is None:
        from visionllm_edge.export.exporter import export

        tmp = tempfile.TemporaryDirectory(prefix="vle-bench-")
        artifact = Path(tmp.name) / "tiny-random"
        log(f"exporting tiny-random to {artifact} ...")
        t0 = time.perf_counter()
        export("tiny-random", artifact, model=model, progress=False)
        log(f"  exported in {time.perf_counter() - t0:.0f} s")
    try:
        manifest = load_manifest(artifact)
        if manifest.model.name != "tiny-random":
            raise SystemExit(
                f"{artifact}: the artifact is {manifest.model.name!r}, the reference here is tiny-random"
            )
        # Every component's graphs loaded now, not inside a timed call.
        every = [c for c, graphs in COMPONENT_GRAPHS.items() if set(graphs) & set(manifest.graphs)]
        pipe = Pipeline.load(artifact, threads=args.threads, components=every, verify_hashes=False)
        pipe_1t = None
        if not args.no_1t:
            pipe_1t = Pipeline.load(artifact, threads=1, components=every, verify_hashes=False)
        ref = ReferencePipeline(model)
        threads_line = (
            f"runtime engines: intra-op threads {args.threads} (and 1 for the 1-thread rows), spinning off; "
            f"torch.set_num_threads({args.threads}) -> get_num_threads()={torch.get_num_threads()}, "
            f"interop={torch.get_num_interop_threads()}"
        )
        log(threads_line)
        log("1./2. requests ...")
        cases = build_cases(pipe, ref, templates, args)
        results = run_cases(cases, pipe, pipe_1t, args, log)
        graphs_text = ""
        if not args.no_graphs and {"det", "pose"} <= set(pipe.manifest.graphs):
            log("4. decoder graphs alone ...")
            graphs_text = graphs_section(pipe, ref, args, log)
    finally:
        if tmp is not None:
            tmp.cleanup()
    load_end = loadavg()
    header = (
        "## Runtime vs reference (tiny-random)\n\n"
        f"- Date: {date_line()}; machine: {machine_line()}, torch {torch.__version__}\n"
        f"- Threads: {threads_line}\n"
        f"- Artifact: {'tiny-random exported by this run (fp32)' if tmp else artifact}; reference: "
        '`load_reference("tiny-random")` (fp32, eager, `torch.no_grad`)\n'
        f"- Warm-up rounds: {args.warmup}; timed calls per row: {args.repeats}; every graph loaded before "
        "timing\n"
        f"- **Load** (`/proc/loadavg`): start `{load_start}`, end `{load_end}`; run took "
        f"{time.perf_counter() - t_start:.0f} s\n"
        "- Command: `python3 benchmarks/runtime_vs_reference.py "
        + " ".join(argv if argv is not None else sys.argv[1:])
        + "`\n"
    )
    text = "\n".join(
        [
            header,
            decode_section(cases, results, args),
            latency_section(cases, results),
            stage_section(cases, results),
        ]
        + ([graphs_text] if graphs_text else [])
    )
    print(text)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(text)
    log(f"loadavg at end: {load_end}; written to {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
