"""`visionllm-edge bench ARTIFACT`: per-stage latency, decode ms/token at set KV lengths, memory, and the
hardware floors measured in the same run (no torch).

Every time comes from the C++ loop's own clocks: `result.timings` per stage (preprocess, vision, region,
tokenize, prefill, decode, object_decoder, pose_decoder, gen_decoder / edit_decoder (the diffusion loop
with its mapper and VAE), postprocess, total) and `result.raw["stats"]` (decode_steps, decode_engine_ms,
reused_rows). Each repetition of a task uses a fresh picture, so the frame cache does not hide the vision
encoder; the system prompt's KV rows are reused as they are in use (`reused_rows` is reported).

Decode at a past of P rows: a text prompt of filler words is sized (two probe requests give the rows per
word) so that the prompt fills about P rows, then `--new-tokens` steps are decoded; ms/token is the decode
stage over the decode steps (the engine's share is reported too). The past reached is reported as
measured; it grows by up to `--new-tokens` rows over the steps.

Floors: DRAM read bandwidth is a numpy sum over a 256 MiB array split across the thread count (best of
several); the fp32 GEMM rate is a numpy matmul (numpy's BLAS threads, not set by this tool). The decode
floor at a past = (the LLM graph's bytes, external data included, + the KV bytes read at that past) ÷ the
bandwidth; a ratio below 1 means a wrong floor and is flagged.
"""

from __future__ import annotations

import concurrent.futures
import hashlib
import json
import os
import platform
import resource
import sys
import time
from pathlib import Path

import numpy as np

#: Task -> components it needs (contract.COMPONENT_GRAPHS keys).
TASKS: dict[str, tuple[str, ...]] = {
    "vqa": ("vision", "llm"),
    "caption": ("vision", "llm"),
    "detect": ("vision", "llm", "det"),
    "ground": ("vision", "llm", "det"),
    "segment": ("vision", "llm", "det"),
    "pose": ("vision", "llm", "pose"),
    "generate": ("llm", "gen"),
    "edit": ("vision", "llm", "edit"),
}
FILLER = "a "  # one or two tokens a word in any Llama-like vocabulary; the rows per word are measured


class BenchError(ValueError):
    """A bad bench option (unknown task, a past over the arena's capacity, a missing component, ...)."""


def summary(values) -> dict[str, float]:
    v = np.asarray(list(values), dtype=np.float64)
    return {
        "min": float(v.min()),
        "median": float(np.median(v)),
        "p90": float(np.percentile(v, 90)),
        "max": float(v.max()),
        "n": int(v.size),
    }


def _scene(seed: int, width: int = 224, height: int = 168) -> np.ndarray:
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:height, 0:width]
    img = np.stack([(xx * 255 // (width - 1)), (yy * 255 // (height - 1)), (xx + yy) % 256], -1)
    return (img * 0.6 + rng.uniform(0, 255, (height, width, 3)) * 0.4).astype(np.uint8)


def parse_tasks(text: str | None, components) -> tuple[list[str], list[str]]:
    """(tasks to run, tasks skipped for a missing component). Asked-for tasks must all be servable."""
    have = set(components)
    if text:
        asked = [t.strip() for t in text.split(",") if t.strip()]
        unknown = [t for t in asked if t not in TASKS]
        if unknown:
            raise BenchError(f"unknown task(s) {', '.join(unknown)}; known: {', '.join(TASKS)}")
        for t in asked:
            missing = [c for c in TASKS[t] if c not in have]
            if missing:
                raise BenchError(
                    f"task {t} needs component(s) {', '.join(missing)}, which the artifact lacks "
                    f"(it has {', '.join(components) or 'none'})"
                )
        return list(dict.fromkeys(asked)), []
    run = [t for t, need in TASKS.items() if all(c in have for c in need)]
    return run, [t for t in TASKS if t not in run]


def parse_past(text: str | None) -> list[int]:
    if not text:
        return []
    try:
        values = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise BenchError(f"--past takes comma-separated row counts, got {text!r}") from None
    bad = [v for v in values if v <= 0]
    if bad:
        raise BenchError(f"--past lengths must be positive, got {bad}")
    return values


# --- hardware floors --------------------------------------------------------------------------------------


def dram_bandwidth(threads: int, mib: int = 256, tries: int = 5) -> float:
    """Bytes/s of a summed read of a `mib` MiB float32 array split over `threads` threads; best of `tries`."""
    a = np.ones(mib * 2**20 // 4, dtype=np.float32)
    parts = np.array_split(a, max(threads, 1))
    best = 0.0
    with concurrent.futures.ThreadPoolExecutor(max(threads, 1)) as pool:
        for _ in range(tries):
            t0 = time.perf_counter()
            list(pool.map(np.sum, parts))
            best = max(best, a.nbytes / (time.perf_counter() - t0))
    return best


def gemm_rate(n: int = 1024, tries: int = 5) -> float:
    """fp32 FLOP/s of an n x n x n numpy matmul; best of `tries`."""
    rng = np.random.default_rng(0)
    a = rng.standard_normal((n, n), dtype=np.float32)
    b = rng.standard_normal((n, n), dtype=np.float32)
    a @ b
    best = 0.0
    for _ in range(tries):
        t0 = time.perf_counter()
        a @ b
        best = max(best, 2.0 * n**3 / (time.perf_counter() - t0))
    return best


# --- machine facts ----------------------------------------------------------------------------------------


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            return next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        return platform.processor() or "unknown"


def machine(threads: int, providers) -> dict:
    try:
        import onnxruntime as ort

        ort_version, available = ort.__version__, list(ort.get_available_providers())
    except ImportError:
        ort_version, available = None, []
    from visionllm_edge import __version__

    return {
        "cpu_model": _cpu_model(),
        "cores": os.cpu_count(),
        "threads": threads,
        "threads_note": "ONNX Runtime's default" if threads == 0 else "intra-op threads per graph",
        "platform": platform.platform(),
        "python": platform.python_version(),
        "numpy": np.__version__,
        "onnxruntime": ort_version,
        "providers_available": available,
        "providers_used": list(providers or ["CPUExecutionProvider"]),
        "visionllm_edge": __version__,
    }


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def llm_weight_bytes(manifest) -> int:
    g = manifest.graphs["llm"]
    return int(g.size_bytes) + sum(p.stat().st_size for p in g.external_data if p.exists())


# --- the measurements -------------------------------------------------------------------------------------


def _request(pipe, task: str, image, components, new_tokens: int):
    if task == "vqa":
        if "region" in components:
            h, w = image.shape[:2]
            box = (w * 0.2, h * 0.2, w * 0.7, h * 0.8)
            return pipe(image, "What is in <region>?", regions=[box], max_new_tokens=new_tokens)
        return pipe(image, "What is in the image?", max_new_tokens=new_tokens)
    if task == "caption":
        return pipe(image, "Describe the image briefly.", max_new_tokens=new_tokens)
    if task == "detect":
        return pipe.detect(image, ["circle", "square"])
    if task == "ground":
        return pipe.ground(image, "the red circle")
    if task == "segment":
        return pipe.segment(image, ["circle", "square"])
    if task == "pose":
        return pipe.pose(image, ["nose", "left eye", "right eye"])
    if task == "generate":
        return pipe.generate_image("a red circle on a blue square")
    if task == "edit":
        return pipe.edit_image(image, "make the circle blue")
    raise BenchError(f"unknown task {task}")


def _decode_at(pipe, past: int, new_tokens: int, image, reps: int, warmup: int, progress):
    """Decode figures with a prompt of about `past` rows."""

    def run(words: int, n: int, seed: int):
        kw = dict(max_new_tokens=n, repetition_penalty=1.3)
        prompt = f"{seed} " + FILLER * words
        try:
            return pipe(None, prompt, **kw)
        except ValueError as e:  # random weights can route to a perception decoder, which needs an image
            if "needs an image" not in str(e):
                raise
            return pipe(image, prompt, **kw)

    r0 = run(0, 1, 0)
    r1 = run(64, 1, 0)
    base, per_word = len(r0.raw["input_ids"]), (len(r1.raw["input_ids"]) - len(r0.raw["input_ids"])) / 64
    words = max(0, round((past - base) / max(per_word, 1e-9)))
    ms_tok, eng_tok, rows = [], [], []
    for i in range(warmup + reps):
        progress(f"decode past {past}: {i + 1}/{warmup + reps}")
        r = run(words, new_tokens, i + 1)
        steps = float(r.raw["stats"].get("decode_steps", 0))
        if i < warmup or steps <= 0:
            continue
        ms_tok.append(r.timings["decode"] / steps)
        eng_tok.append(float(r.raw["stats"]["decode_engine_ms"]) / steps)
        rows.append(len(r.raw["input_ids"]))
    if not ms_tok:
        raise BenchError(f"decode at past {past}: no request fed a decode step (every answer ended at once)")
    return {
        "past": past,
        "past_reached": summary(rows),
        "ms_per_token": summary(ms_tok),
        "engine_ms_per_token": summary(eng_tok),
    }


def run_bench(
    artifact,
    tasks: str | None = None,
    past: str | None = "128,512,2048",
    warmup: int = 1,
    repeat: int = 5,
    threads: int = 0,
    providers=None,
    new_tokens: int = 16,
    progress=None,
) -> dict:
    """Runs the benchmark; returns the JSON record. Bad options raise `BenchError` before any timing."""
    from visionllm_edge.manifest import load_manifest
    from visionllm_edge.pipeline import Pipeline

    if repeat < 1:
        raise BenchError(f"--repeat must be at least 1, got {repeat}")
    if warmup < 0:
        raise BenchError(f"--warmup must be 0 or more, got {warmup}")
    if new_tokens < 1:
        raise BenchError(f"--new-tokens must be at least 1, got {new_tokens}")
    if threads < 0:
        raise BenchError(f"--threads must be 0 (ONNX Runtime's default) or more, got {threads}")
    folder = Path(artifact)
    manifest = load_manifest(folder, verify_hashes=False)
    components = manifest.components
    task_list, skipped = parse_tasks(tasks, components)
    pasts = parse_past(past)
    if pasts and "llm" not in components:
        raise BenchError("--past needs the llm component, which the artifact lacks")
    say = progress or (lambda msg: None)

    pipe = Pipeline.load(folder, providers=providers, threads=threads, verify_hashes=False)
    cap = pipe.context_capacity
    over = [p for p in pasts if p + new_tokens > cap]
    if over:
        raise BenchError(
            f"--past {','.join(map(str, over))} (+ {new_tokens} new tokens) is over the KV arena's capacity "
            f"of {cap} rows"
        )

    record: dict = {
        "kind": "visionllm-edge bench",
        "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "artifact": {
            "path": str(folder.resolve()),
            "model": manifest.model.name,
            "manifest_sha256": _sha256(folder / "manifest.json"),
            "components": list(components),
        },
        "options": {
            "tasks": task_list,
            "skipped_tasks": skipped,
            "past": pasts,
            "warmup": warmup,
            "repeat": repeat,
            "threads": threads,
            "providers": list(providers or []),
            "new_tokens": new_tokens,
        },
        "machine": machine(threads, providers),
    }

    say("floors: DRAM bandwidth, fp32 GEMM")
    bw_threads = threads or os.cpu_count() or 1
    bandwidth = dram_bandwidth(bw_threads)
    gemm = gemm_rate()
    record["floors"] = {
        "dram_read_bytes_per_s": bandwidth,
        "dram_threads": bw_threads,
        "gemm_fp32_flops_per_s": gemm,
        "gemm_note": "numpy matmul 1024^3 at numpy's BLAS threads",
    }

    tasks_out: dict = {}
    for ti, task in enumerate(task_list):
        stages: dict[str, list[float]] = {}
        wall, reused = [], []
        for i in range(warmup + repeat):
            say(f"task {task} ({ti + 1}/{len(task_list)}): {i + 1}/{warmup + repeat}")
            image = _scene(1000 * ti + i)  # a fresh frame: vision runs every time
            t0 = time.perf_counter()
            r = _request(pipe, task, image, components, new_tokens)
            ms = (time.perf_counter() - t0) * 1e3
            if i < warmup:
                continue
            for stage, v in r.timings.items():
                stages.setdefault(stage, []).append(float(v))
            wall.append(ms)
            reused.append(float(r.raw["stats"].get("reused_rows", 0)))
        tasks_out[task] = {
            "stages_ms": {s: summary(v) for s, v in stages.items()},
            "end_to_end_ms": summary(wall),
            "reused_rows": summary(reused),
        }
    record["tasks"] = tasks_out

    weights = llm_weight_bytes(manifest) if "llm" in components else 0
    row_bytes = pipe.arena_bytes / cap
    decode = []
    for p in pasts:
        d = _decode_at(pipe, p, new_tokens, _scene(99), repeat, warmup, say)
        kv = row_bytes * d["past_reached"]["median"]
        floor_ms = (weights + kv) / bandwidth * 1e3
        d["floor_ms_per_token"] = floor_ms
        d["weight_bytes"] = weights
        d["kv_bytes_read"] = kv
        d["ratio_to_floor"] = d["ms_per_token"]["median"] / floor_ms
        d["ratio_below_1"] = d["ratio_to_floor"] < 1.0
        decode.append(d)
    record["decode"] = decode
    record["memory"] = {
        "peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
        "arena_bytes": pipe.arena_bytes,
        "context_capacity": cap,
    }
    record["flags"] = [
        f"decode at past {d['past']}: ratio {d['ratio_to_floor']:.2f} is below 1 (a wrong floor)"
        for d in decode
        if d["ratio_below_1"]
    ]
    record["not_measured"] = [
        "FLOP floors for prefill / vision / decoders (no FLOP counts from the graphs yet)",
        "super-link hand-off and each diffusion step (the loop times the whole decoder stage only)",
        "int8 GEMM rate; --compare reference; --plot",
    ]
    say("done")
    return record


# --- reports ----------------------------------------------------------------------------------------------


def _f(x: float) -> str:
    return f"{x:,.0f}" if x >= 1000 else f"{x:.1f}" if x >= 10 else f"{x:.2f}"


def _cells(s: dict) -> list[str]:
    return [_f(s["min"]), _f(s["median"]), _f(s["p90"]), _f(s["max"])]


def markdown(record: dict) -> str:
    m, a, o, fl = record["machine"], record["artifact"], record["options"], record["floors"]
    head = (
        f"**visionllm-edge bench** `{a['model']}` (manifest sha256 `{a['manifest_sha256'][:12]}`), "
        f"{record['date']}; {m['cpu_model']}, {m['cores']} cores, threads {m['threads']} "
        f"({m['threads_note']}); onnxruntime {m['onnxruntime']} {','.join(m['providers_used'])}; "
        f"visionllm-edge {m['visionllm_edge']}; {o['repeat']} repetitions after {o['warmup']} warm-up. "
        f"Floors: DRAM read {fl['dram_read_bytes_per_s'] / 1e9:.1f} GB/s ({fl['dram_threads']} threads), "
        f"fp32 GEMM {fl['gemm_fp32_flops_per_s'] / 1e9:.1f} GFLOP/s. Peak RSS "
        f"{record['memory']['peak_rss_bytes'] / 2**20:.0f} MiB, KV arena "
        f"{record['memory']['arena_bytes'] / 2**20:.1f} MiB "
        f"({record['memory']['context_capacity']} rows).\n\n"
    )
    lines = [
        "| task | stage | min ms | median | p90 | max | floor ms | ratio |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for task, t in record["tasks"].items():
        for stage, s in t["stages_ms"].items():
            lines.append(f"| {task} | {stage} | " + " | ".join(_cells(s)) + " | | |")
        lines.append(f"| {task} | end to end | " + " | ".join(_cells(t["end_to_end_ms"])) + " | | |")
    for d in record["decode"]:
        flag = " (below 1: wrong floor)" if d["ratio_below_1"] else ""
        lines.append(
            f"| decode | ms/token at past {d['past']} (reached {d['past_reached']['median']:.0f}) | "
            + " | ".join(_cells(d["ms_per_token"]))
            + f" | {_f(d['floor_ms_per_token'])} | {d['ratio_to_floor']:.2f}{flag} |"
        )
    tail = "\n\nNot measured: " + "; ".join(record["not_measured"]) + ".\n"
    if o["skipped_tasks"]:
        tail += f"Skipped (component missing): {', '.join(o['skipped_tasks'])}.\n"
    return head + "\n".join(lines) + tail


def main(args, providers: list[str] | None) -> int:
    """The `bench` subcommand; `providers` as the CLI parsed `--providers`."""
    tty = sys.stderr.isatty()

    def progress(msg: str) -> None:
        if tty:
            print(f"\r\033[K[bench] {msg}", end="" if msg != "done" else "\n", file=sys.stderr, flush=True)
        else:
            print(f"[bench] {msg}", file=sys.stderr, flush=True)

    record = run_bench(
        args.artifact,
        tasks=args.tasks,
        past=args.past,
        warmup=args.warmup,
        repeat=args.repeat,
        threads=args.threads,
        providers=providers,
        new_tokens=args.new_tokens,
        progress=progress,
    )
    text = markdown(record)
    print(text)
    if args.json:
        Path(args.json).write_text(json.dumps(record, indent=1) + "\n")
        print(f"wrote {args.json}")
    if args.md:
        Path(args.md).write_text(text)
        print(f"wrote {args.md}")
    return 0
