"""End-to-end shapes-tiny latency per task, old code against new code: `visionllm-edge eval` of each,
interleaved.

Each side is a `visionllm-edge` command (its own install: a venv with the code base's own `_core`) and an
artifact exported by that code base (the manifest schema differs between code bases). Round by round the
two evaluations run one after the other, the order swapped each round, so that load from other jobs falls
on both alike; nothing else runs in between. From each run's JSON report (`--json`) the table takes the
latency of every task (mean, p90, max over the task's requests, after the evaluation's own warm-up request)
and the task's score, so that the two sides are seen to do the same work.

    python3 benchmarks/latency_old_vs_new.py --old-cli /tmp/old-venv/bin/visionllm-edge --old-artifact A1 \\
        --new-cli .venv/bin/visionllm-edge --new-artifact A2 [--scenes 40] [--threads 1] [--rounds 2]

The diffusion tasks (generate, edit) take most of the time; they run in the first `--diffusion-rounds` (1)
rounds only. Writes benchmarks/results/latency_old_vs_new.md (`--out`) and prints it.
"""

from __future__ import annotations

import argparse
import json
import shlex
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from _common import date_line, loadavg, machine_line, markdown_table

DEFAULT_OUT = Path(__file__).resolve().parent / "results" / "latency_old_vs_new.md"
TASKS = ["detect", "segment", "pose", "ground", "vqa", "region_caption", "caption", "generate", "edit"]
DIFFUSION = {"generate", "edit"}
#: The score each task reports (key of the eval report).
SCORES = {
    "detect": "bbox_ap",
    "segment": "segm_ap",
    "pose": "keypoint_ap",
    "ground": "rec_acc50",
    "vqa": "vqa_acc",
    "region_caption": "region_caption_acc",
    "caption": "caption_word_f1",
    "generate": "generation_acc",
    "edit": "edit_acc",
}


def run_eval(cli: str, artifact: Path, tasks: list[str], args, log) -> tuple[dict, list[str], str, str]:
    """(report, command, loadavg before, loadavg after) of one `visionllm-edge eval` run."""
    with tempfile.TemporaryDirectory(prefix="vle-lat-") as tmp:
        out = Path(tmp) / "report.json"
        command = [
            *shlex.split(cli),
            "eval",
            str(artifact),
            "--tasks",
            ",".join(tasks),
            "--scenes",
            str(args.scenes),
            "--threads",
            str(args.threads),
            "--json",
            str(out),
        ]
        before = loadavg()
        t0 = time.perf_counter()
        done = subprocess.run(command, capture_output=True, text=True)
        if done.returncode != 0:
            raise SystemExit(f"{shlex.join(command)} failed ({done.returncode}):\n{done.stderr[-3000:]}")
        log(f"    {time.perf_counter() - t0:.0f} s: {shlex.join(command[:3])} ...")
        return json.loads(out.read_text()), command, before, loadavg()


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--old-cli", required=True, help="the old code's `visionllm-edge` command")
    ap.add_argument("--old-artifact", type=Path, required=True, help="shapes-tiny exported by the old code")
    ap.add_argument("--new-cli", required=True, help="the new code's `visionllm-edge` command")
    ap.add_argument("--new-artifact", type=Path, required=True, help="shapes-tiny exported by the new code")
    ap.add_argument("--old-label", default="old")
    ap.add_argument("--new-label", default="new")
    ap.add_argument("--note", action="append", default=[], help="a line for the report (what each side is)")
    ap.add_argument("--tasks", default=",".join(TASKS))
    ap.add_argument("--scenes", type=int, default=40)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--diffusion-rounds", type=int, default=1)
    ap.add_argument("--out", type=Path, default=DEFAULT_OUT)
    args = ap.parse_args(argv)
    tasks = [t for t in args.tasks.split(",") if t]

    def log(msg: str) -> None:
        print(msg, file=sys.stderr, flush=True)

    sides = {
        args.old_label: (args.old_cli, args.old_artifact),
        args.new_label: (args.new_cli, args.new_artifact),
    }
    names = list(sides)
    reports: dict[str, list[dict]] = {n: [] for n in names}
    runs = []  # (round, side, command, load before, load after)
    load_start = loadavg()
    t_start = time.perf_counter()
    for r in range(args.rounds):
        these = [t for t in tasks if t not in DIFFUSION or r < args.diffusion_rounds]
        order = names if r % 2 == 0 else names[::-1]
        log(f"round {r + 1}/{args.rounds}: {', '.join(these)}; order {' then '.join(order)}")
        for name in order:
            cli, artifact = sides[name]
            report, command, before, after = run_eval(cli, artifact, these, args, log)
            reports[name].append(report)
            runs.append((r + 1, name, command, before, after))
    load_end = loadavg()

    def per_task(name: str, task: str, key: str) -> list[float]:
        return [rep["latency_ms"][task][key] for rep in reports[name] if task in rep.get("latency_ms", {})]

    def score(name: str, task: str) -> str:
        values = {rep.get(SCORES[task]) for rep in reports[name] if task in rep.get("latency_ms", {})}
        values.discard(None)
        return ", ".join(f"{v:.3f}" for v in sorted(values)) if values else "–"

    old, new = names
    rows = []
    for task in tasks:
        o_mean, n_mean = per_task(old, task, "mean"), per_task(new, task, "mean")
        if not o_mean or not n_mean:
            continue
        om, nm = statistics.median(o_mean), statistics.median(n_mean)
        rows.append(
            [
                task,
                str(len(o_mean)),
                " / ".join(f"{v:.1f}" for v in o_mean),
                " / ".join(f"{v:.1f}" for v in n_mean),
                f"**{nm / om:.2f}**",
                f"{statistics.median(per_task(old, task, 'p90')):.1f}",
                f"{statistics.median(per_task(new, task, 'p90')):.1f}",
                f"{statistics.median(per_task(old, task, 'max')):.1f}",
                f"{statistics.median(per_task(new, task, 'max')):.1f}",
                score(old, task),
                score(new, task),
            ]
        )
    run_rows = [
        [str(r), name, f"`{shlex.join(command[:-1])} REPORT.json`", f"`{before}`", f"`{after}`"]
        for r, name, command, before, after in runs
    ]
    command = "python3 benchmarks/latency_old_vs_new.py " + shlex.join(
        argv if argv is not None else sys.argv[1:]
    )
    text = (
        f"## shapes-tiny latency per task: {old} vs {new} (`visionllm-edge eval`)\n\n"
        f"- Date: {date_line()}; machine: {machine_line()}\n"
        f"- **Load** (`/proc/loadavg`): start `{load_start}`, end `{load_end}`; run took "
        f"{time.perf_counter() - t_start:.0f} s\n"
        f"- Command: `{command}`\n"
        + "".join(f"- {line}\n" for line in args.note)
        + f"- {args.scenes} scenes per task, {args.threads} intra-op thread(s) per graph; "
        f"{args.rounds} rounds, "
        f"the order of the two sides swapped each round; generate and edit in the first "
        f"{args.diffusion_rounds} round(s) only. Latency: the eval's wall time per request, mean over the "
        "task's requests (one untimed warm-up request first), one value per round; *new ÷ old* is the "
        "ratio of the medians over rounds (below 1: the new code is faster). p90 and max: medians over "
        "rounds. Score: the task's metric in the eval report (both sides should do the same work).\n\n"
        + markdown_table(
            [
                "task",
                "rounds",
                f"{old} mean ms (per round)",
                f"{new} mean ms (per round)",
                f"{new} ÷ {old}",
                f"{old} p90",
                f"{new} p90",
                f"{old} max",
                f"{new} max",
                f"{old} score",
                f"{new} score",
            ],
            rows,
        )
        + "\n\nRuns, in order:\n\n"
        + markdown_table(["round", "side", "command", "load before", "load after"], run_rows)
        + "\n"
    )
    print(text)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(text)
    log(f"written to {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
