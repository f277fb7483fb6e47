"""Load test of serving (issue 20, item 4): 8 concurrent clients, 400 requests mixed over every task, through
a real `tritonserver` on loopback, for 1, 2 and 4 model instances; none lost, none wrong.

The server is the production path: the model repository `visionllm-edge triton-repo ARTIFACT OUT` writes,
served by a standalone `tritonserver --model-repository OUT` (the binary of the nvidia-pytriton wheel, started
by `visionllm_edge.serving.local.LocalTritonServer`), with one backend stub process and one `Pipeline` per
model instance. The clients are `visionllm_edge.serving.Client` over gRPC, one per client thread.

Requests: 9 tasks (vqa, caption, region caption from a box, detection, grounding, semantic segmentation, pose,
generation, editing) on `--scenes` shapes-world scenes each; the 400 requests cycle through a seeded
permutation of these distinct requests. Before any server starts, each distinct request is answered once by a
`Pipeline` in this process (same artifact, same threads per graph); every served answer is compared with it
(`differences`): text and token ids identical, labels identical, boxes and scores within 1e-5, masks, semantic
maps and images equal. A pipeline's boxes move in their last float32 bits with the request before it (the KV
rows it reuses, docs/architecture.md §3), and a served request lands on an instance with any history, so
`history_spread` measures that movement on the direct pipeline in the same run; a box or score counts as
wrong beyond twice it (or 1e-5, the larger), and the answers off by more than 1e-5 are counted apart. A
request that raises, times out or never answers is lost.

Per configuration (instances x threads per instance): p50 / p90 / p99 latency (each request from send to its
answer, client side), throughput (requests over the wall time from the first send to the last answer), and
the server's resident memory (tritonserver and each backend stub, VmRSS) once the first 20 answers are in and
after all of them. Configurations run in `--rounds` rounds, in reversed order every other round, so load from
other jobs on this shared machine falls on all alike; figures are per round and their medians.

    python3 benchmarks/serve_load.py [--artifact DIR] [--configs 1x1,2x1,4x1,1x2] [--rounds 2]

Writes benchmarks/results/serve_load.json and serve_load.md (`--out` prefix), each with the command, date,
machine and load.
"""

from __future__ import annotations

import argparse
import json
import queue
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
from _common import date_line, loadavg, machine_line, markdown_table

RESULTS = Path(__file__).resolve().parent / "results"
#: The shapes-world seed the scenes come from (the training seeds are 0..; the held-out split is 2024).
SEED = 2024
#: Tolerance on boxes, scores and keypoints.
ATOL = 1e-5
#: The answers after which the first memory sample is taken.
EARLY = 20


def distinct_requests(scenes: int) -> list[tuple[str, str, tuple, dict]]:
    """(name, method, args, keywords): one of each task per scene. The method is `Client`'s; `Pipeline` has
    the same ones, with `run` as its call."""
    from visionllm_edge.shapes.instructions import make_sample
    from visionllm_edge.shapes.world import CATEGORIES, KEYPOINTS

    out = []
    for i in range(scenes):
        vqa = make_sample("vqa", SEED, i, canonical=True)
        image = np.asarray(vqa.scene.image)
        out.append((f"vqa {i}", "run", (image, vqa.question), {"max_new_tokens": 16}))
        caption = make_sample("caption", SEED, i, canonical=True)
        out.append(
            (
                f"caption {i}",
                "run",
                (np.asarray(caption.scene.image), caption.question),
                {"max_new_tokens": 48},
            )
        )
        region = make_sample("region_caption", SEED, i, canonical=True)
        box = tuple(float(v) for v in region.scene.objects[region.targets[0][0]].box)
        out.append(
            (
                f"region_caption {i}",
                "run",
                (np.asarray(region.scene.image), region.question),
                {"regions": [box], "max_new_tokens": 16},
            )
        )
        out.append((f"detect {i}", "detect", (image, list(CATEGORIES)), {}))
        ground = make_sample("ground", SEED, i, canonical=True)
        out.append((f"ground {i}", "ground", (np.asarray(ground.scene.image), ground.phrases[0]), {}))
        out.append((f"segment {i}", "segment", (image, list(CATEGORIES)), {}))
        pose = make_sample("pose", SEED, i, canonical=True)
        out.append((f"pose {i}", "pose", (np.asarray(pose.scene.image), list(KEYPOINTS)), {}))
        generate = make_sample("generate", SEED, i, canonical=True)
        out.append((f"generate {i}", "generate_image", (generate.instruction,), {"seed": i}))
        edit = make_sample("edit", SEED, i, canonical=True)
        out.append((f"edit {i}", "edit_image", (np.asarray(edit.scene.image), edit.instruction), {"seed": i}))
    return out


def differences(got, want, atol: float, deviation: list[float]) -> list[str]:
    """What differs between a served `Result` and the direct one, by field (empty: the same answer), boxes
    and scores within `atol`. `deviation[0]` is raised to the largest difference of a box or score seen."""
    found = []
    if got.text != want.text:
        found.append("text")
    if list(got.token_ids) != list(want.token_ids):
        found.append("token_ids")

    def close(a, b) -> bool:
        a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
        if a.shape != b.shape:
            return False
        if a.size:
            deviation[0] = max(deviation[0], float(np.abs(a - b).max()))
        return bool(np.allclose(a, b, rtol=0, atol=atol))

    if [d.label for d in got.detections] != [d.label for d in want.detections]:
        found.append("detection labels")
    else:
        if not close([d.box_xyxy for d in got.detections], [d.box_xyxy for d in want.detections]):
            found.append("detection boxes")
        if not close([d.score for d in got.detections], [d.score for d in want.detections]):
            found.append("detection scores")
        for g, w in zip(got.detections, want.detections):
            if (g.mask is None) != (w.mask is None) or (
                g.mask is not None and not np.array_equal(g.mask, w.mask)
            ):
                found.append("detection masks")
                break
    if (got.segmentation is None) != (want.segmentation is None) or (
        want.segmentation is not None
        and (
            got.segmentation.labels != want.segmentation.labels
            or not np.array_equal(got.segmentation.label_map, want.segmentation.label_map)
        )
    ):
        found.append("semantic map")
    if [p.label for p in got.poses] != [p.label for p in want.poses]:
        found.append("pose labels")
    elif not close([p.box_xyxy for p in got.poses], [p.box_xyxy for p in want.poses]):
        found.append("pose boxes")
    if len(got.images) != len(want.images) or any(
        not np.array_equal(g, w) for g, w in zip(got.images, want.images)
    ):
        found.append("images")
    return found


def _call(pipe, request):
    _, method, call_args, kw = request
    return (pipe if method == "run" else getattr(pipe, method))(*call_args, **kw)


def history_spread(pipe, requests) -> dict:
    """How much one direct pipeline's answer to a request moves with the request before it.

    A pipeline reuses the KV rows of its previous request on the same frame (docs/architecture.md §3), and
    rows computed in another grouping differ in their last float32 bits. A served request lands on an
    instance whose previous request is any of the mix, so its boxes may differ from the direct answer by this
    much without anything being wrong. Every detection, grounding, segmentation and pose request is answered
    after each request of the mix but generation and editing (their answers have no boxes).
    """
    perception = [r for r in requests if r[1] in ("detect", "ground", "segment", "pose")]
    before = [r for r in requests if r[1] not in ("generate_image", "edit_image")]
    worst, other = [0.0], set()
    for request in perception:
        answers = []
        for previous in before:
            _call(pipe, previous)
            answers.append(_call(pipe, request))
        for answer in answers[1:]:
            other.update(d for d in differences(answer, answers[0], 1e9, worst))
    return {
        "max_deviation": worst[0],
        "other_differences": sorted(other),
        "pairs": len(perception) * len(before),
    }


def percentile(values: list[float], q: float) -> float:
    return float(np.percentile(np.asarray(values), q))


def run_config(artifact: Path, instances: int, threads: int, plan, expected, args, workdir: Path) -> dict:
    """One server with `instances` x `threads`; `plan` is the list of request indices to send, in order."""
    from visionllm_edge.serving.client import Client
    from visionllm_edge.serving.local import LocalTritonServer
    from visionllm_edge.serving.repository import write_repository

    workdir = Path(tempfile.mkdtemp(prefix=f"{instances}x{threads}-", dir=workdir))
    repo = write_repository(artifact, workdir / "repo", instances=instances, threads=threads)
    server = LocalTritonServer(repo, workdir / "server", python_env=args.stub_env)
    load_before = loadavg()
    server.start(timeout=args.start_timeout)
    try:
        todo: queue.Queue = queue.Queue()
        for n, index in enumerate(plan):
            todo.put((n, index))
        latencies = [None] * len(plan)
        outcome: list[str | None] = [None] * len(plan)  # None: lost; "" right; else what differed
        lock = threading.Lock()
        answered = [0]
        rss_early: dict = {}
        t_first = time.perf_counter()

        def client_loop():
            client = Client(server.grpc_url, protocol="grpc")
            while True:
                try:
                    n, index = todo.get_nowait()
                except queue.Empty:
                    return
                _, method, call_args, kw = requests[index]
                t0 = time.perf_counter()
                try:
                    result = getattr(client, method)(*call_args, **kw)
                except Exception as e:  # a lost request: counted and reported, never retried
                    with lock:
                        outcome[n] = None
                        errors.append(f"{requests[index][0]}: {type(e).__name__}: {e}"[:300])
                    continue
                latencies[n] = time.perf_counter() - t0
                strict = differences(result, expected[index], ATOL, deviation)
                diff = differences(result, expected[index], args.tolerance, [0.0]) if strict else []
                with lock:
                    beyond_atol[0] += bool(strict)
                    outcome[n] = ", ".join(diff)
                    answered[0] += 1
                    if answered[0] == EARLY:
                        rss_early.update(server.rss_bytes())

        requests = args.requests_list
        errors: list[str] = []
        deviation = [0.0]
        beyond_atol = [0]
        workers = [threading.Thread(target=client_loop) for _ in range(args.clients)]
        for w in workers:
            w.start()
        for w in workers:
            w.join()
        wall = time.perf_counter() - t_first
        rss_late = server.rss_bytes()
        names = {pid: Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0") for pid in rss_late}
    finally:
        server.stop()
    done = [lat for lat in latencies if lat is not None]
    wrong = [(requests[plan[n]][0], o) for n, o in enumerate(outcome) if o]
    lost = sum(1 for n, o in enumerate(outcome) if o is None and latencies[n] is None)

    def role(pid: int) -> str:
        argv = names.get(pid, [b""])
        if argv[0].endswith(b"tritonserver"):
            return "tritonserver"
        # A stub's argv: stub, model.py, shm region, sizes, parent pid, backend dir, ..., instance name.
        instance = next((a.decode() for a in argv if a.startswith((b"visionllm_", b"visionllm"))), "?")
        return f"stub {instance}"

    early_total, late_total = sum(rss_early.values()), sum(rss_late.values())
    return {
        "instances": instances,
        "threads": threads,
        "requests": len(plan),
        "answered": len(done),
        "lost": lost,
        "wrong": len(wrong),
        "wrong_examples": wrong[:10],
        "errors": errors[:10],
        "max_box_or_score_deviation": deviation[0],
        f"differing_beyond_{ATOL:g}": beyond_atol[0],
        "tolerance": args.tolerance,
        "wall_s": wall,
        "throughput_rps": len(done) / wall,
        "latency_ms": {
            "p50": percentile(done, 50) * 1e3,
            "p90": percentile(done, 90) * 1e3,
            "p99": percentile(done, 99) * 1e3,
            "max": max(done) * 1e3,
        }
        if done
        else {},
        "rss_mb_after_first": {role(p): v / 2**20 for p, v in sorted(rss_early.items())},
        "rss_mb_after_all": {role(p): v / 2**20 for p, v in sorted(rss_late.items())},
        "rss_total_mb_after_first": early_total / 2**20,
        "rss_total_mb_after_all": late_total / 2**20,
        "rss_growth": (late_total - early_total) / early_total if early_total else None,
        "load_before": load_before,
        "load_after": loadavg(),
    }


def summarize(runs: list[dict]) -> list[dict]:
    """Per configuration, the median over rounds."""
    by = {}
    for r in runs:
        by.setdefault((r["instances"], r["threads"]), []).append(r)
    out = []
    for (instances, threads), rs in by.items():
        out.append(
            {
                "instances": instances,
                "threads": threads,
                "rounds": len(rs),
                "lost": sum(r["lost"] for r in rs),
                "wrong": sum(r["wrong"] for r in rs),
                "throughput_rps": statistics.median(r["throughput_rps"] for r in rs),
                "p50_ms": statistics.median(r["latency_ms"]["p50"] for r in rs if r["latency_ms"]),
                "p90_ms": statistics.median(r["latency_ms"]["p90"] for r in rs if r["latency_ms"]),
                "p99_ms": statistics.median(r["latency_ms"]["p99"] for r in rs if r["latency_ms"]),
                "rss_growth_max": max(r["rss_growth"] for r in rs),
            }
        )
    return out


def markdown(record: dict) -> str:
    lines = [
        "# Serving load test (issue 20, item 4)",
        "",
        f"Command: `{record['command']}`  ",
        f"Date: {record['date']}; machine: {record['machine']}  ",
        f"Load (1/5/15 min, /proc/loadavg) at the start: {record['load_start']}; "
        f"at the end: {record['load_end']}",
        "",
        f"Server: {record['server']}. Artifact: `{record['artifact']}`. {record['clients']} concurrent gRPC "
        f"clients, {record['requests']} requests per configuration over {record['distinct']} distinct "
        "requests "
        f"({record['tasks']}); each answer compared with a direct Pipeline answer.",
        "",
        "## Medians over rounds",
        "",
    ]
    rows = [
        [
            f"{s['instances']} x {s['threads']}",
            str(s["rounds"]),
            str(s["lost"]),
            str(s["wrong"]),
            f"{s['throughput_rps']:.2f}",
            f"{s['p50_ms']:.0f}",
            f"{s['p90_ms']:.0f}",
            f"{s['p99_ms']:.0f}",
            f"{100 * s['rss_growth_max']:+.1f} %",
        ]
        for s in record["summary"]
    ]
    header = [
        "instances x threads",
        "rounds",
        "lost",
        "wrong",
        "requests/s",
        "p50 ms",
        "p90 ms",
        "p99 ms",
        f"RSS after all vs after {EARLY} (worst round)",
    ]
    lines += [markdown_table(header, rows), "", "## Every round", ""]
    rows = [
        [
            str(i + 1),
            f"{r['instances']} x {r['threads']}",
            f"{r['answered']}/{r['requests']}",
            str(r["lost"]),
            str(r["wrong"]),
            f"{r['throughput_rps']:.2f}",
            " / ".join(f"{r['latency_ms'].get(q, float('nan')):.0f}" for q in ("p50", "p90", "p99")),
            f"{r['rss_total_mb_after_first']:.0f} -> {r['rss_total_mb_after_all']:.0f}",
            r["load_before"].split()[0] + " -> " + r["load_after"].split()[0],
        ]
        for i, r in enumerate(record["runs"])
    ]
    header = [
        "run",
        "instances x threads",
        "answered",
        "lost",
        "wrong",
        "requests/s",
        "p50 / p90 / p99 ms",
        f"server RSS MB after {EARLY} -> after all",
        "load 1 min",
    ]
    lines += [markdown_table(header, rows), ""]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--artifact", default=None, help="artifact folder (default: the bundled shapes-tiny)")
    parser.add_argument(
        "--configs",
        default="1x1,2x1,4x1,1x2",
        help="instances x threads per instance, comma-separated (default 1x1,2x1,4x1,1x2)",
    )
    parser.add_argument("--rounds", type=int, default=2, help="rounds over the configurations (default 2)")
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--requests", type=int, default=400)
    parser.add_argument("--scenes", type=int, default=3, help="scenes per task (distinct requests: 9 each)")
    parser.add_argument("--workdir", default=None, help="folder for repositories, logs, the stub environment")
    parser.add_argument("--start-timeout", type=float, default=300.0)
    parser.add_argument("--out", default=str(RESULTS / "serve_load"), help="prefix of the .json and .md")
    args = parser.parse_args(argv)

    from visionllm_edge.pipeline import Pipeline
    from visionllm_edge.serving.local import stub_environment

    if args.artifact is None:
        from visionllm_edge.demo import ensure_artifact

        artifact, _ = ensure_artifact()
    else:
        artifact = Path(args.artifact)
    configs = []
    for text in args.configs.split(","):
        instances, threads = (int(v) for v in text.lower().split("x"))
        configs.append((instances, threads))
    workdir = Path(args.workdir or tempfile.mkdtemp(prefix="serve_load-"))
    workdir.mkdir(parents=True, exist_ok=True)
    args.stub_env = stub_environment(workdir / "stub-env")
    load_start = loadavg()

    args.requests_list = distinct_requests(args.scenes)
    # The first scene's nine tasks open the plan, so every graph is loaded (ONNX Runtime sessions are made on
    # first use) before the first memory sample; then a seeded permutation of all, repeated.
    rng = np.random.default_rng(0)
    order = rng.permutation(len(args.requests_list))
    first = list(range(9))
    plan = (first + [int(order[n % len(order)]) for n in range(args.requests)])[: args.requests]
    # Every thread count a configuration runs has its own direct answers: ONNX Runtime's reductions may
    # split differently over a different number of threads.
    expected_by_threads, spread = {}, {}
    for threads in sorted({t for _, t in configs}):
        pipe = Pipeline.load(artifact, threads=threads)
        expected_by_threads[threads] = [_call(pipe, r) for r in args.requests_list]
        spread[threads] = history_spread(pipe, args.requests_list)
        print(f"direct answers, {threads} thread(s); history: {spread[threads]}", file=sys.stderr, flush=True)
        del pipe
    # A served box counts as wrong beyond the larger of the bar and twice what history alone moves it by.
    args.tolerance = max([ATOL, *(2 * s["max_deviation"] for s in spread.values())])

    runs = []
    for round_index in range(args.rounds):
        ordered = configs if round_index % 2 == 0 else configs[::-1]
        for instances, threads in ordered:
            print(f"round {round_index + 1}: {instances} x {threads} ...", file=sys.stderr, flush=True)
            run = run_config(
                artifact,
                instances,
                threads,
                plan,
                expected_by_threads[threads],
                args,
                workdir,
            )
            run["round"] = round_index + 1
            runs.append(run)
            print(
                f"  {run['answered']}/{run['requests']} answered, {run['lost']} lost, {run['wrong']} wrong, "
                f"{run['throughput_rps']:.2f} req/s, p50 {run['latency_ms'].get('p50', 0):.0f} ms, "
                f"RSS {run['rss_total_mb_after_first']:.0f} -> {run['rss_total_mb_after_all']:.0f} MB; "
                f"wrong {run['wrong_examples']}, errors {run['errors']}",
                file=sys.stderr,
                flush=True,
            )
    record = {
        "command": "python3 " + " ".join([sys.argv[0], *(argv if argv is not None else sys.argv[1:])]),
        "date": date_line(),
        "machine": machine_line(),
        "load_start": load_start,
        "load_end": loadavg(),
        "server": "standalone tritonserver (nvidia-pytriton wheel) on the repository of "
        "visionllm-edge triton-repo",
        "artifact": str(artifact),
        "clients": args.clients,
        "requests": args.requests,
        "distinct": len(args.requests_list),
        "tasks": "vqa, caption, region_caption, detect, ground, segment, pose, generate, edit",
        "history_spread": {str(k): v for k, v in spread.items()},
        "tolerance": args.tolerance,
        "runs": runs,
        "summary": summarize(runs),
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(record, indent=2) + "\n")
    out.with_suffix(".md").write_text(markdown(record))
    print(markdown(record))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
