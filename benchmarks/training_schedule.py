"""What training shapes-tiny from scratch costs on the 2-core machine: its stages as two single-thread
chains side by side, one per core, each stage starting when the one before it in its chain has finished (a
stage that continues another must come after it in the same chain).

    python3 benchmarks/training_schedule.py [--rates benchmarks/results/shapes_tiny_stage_rates.json]

A stage's minutes are its logged training time (`export/train/logs/STAGE.jsonl`), except for the stages whose
logs were written with more processes than cores or on more threads than the schedule gives them
(`PRICED_FROM_RATES`): those are their planned steps times their seconds per step as measured by
`python -m visionllm_edge.export.train rate` (the slowest measurement of each phase).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from visionllm_edge.export.train import stages
from visionllm_edge.export.train.__main__ import DEFAULTS

ROOT = Path(__file__).resolve().parents[1]
CHAINS = {
    "core 1": ["object", "diffusion", "diffusion2", "diffusion3", "vae_decoder", "diffusion4", "diffusion5"],
    "core 2": ["llm", "llm2", "llm3", "llm4", "llm5", "pose"],
}
#: Stage -> the steps where its step changes cost (a phase starts): priced from `rate`, not from its log.
#: The first four ran as four processes on two cores; vae_decoder ran alone on two threads; llm2 and
#: diffusion2 shared the machine with export benchmarks and tests, diffusion4 with an experiment (`llm6`, not
#: kept) and diffusion5 with the checks of the same session. llm5 ran beside one other single-thread run.
PRICED_FROM_RATES = {
    "object": [0], "pose": [0], "diffusion": [0, stages.VAE_STEPS], "llm": [0, stages.LLM_LATE_STEP],
    "vae_decoder": [0], "llm2": [0], "diffusion2": [0], "diffusion4": [0], "diffusion5": [0],
}  # fmt: skip
BUDGET_MIN = 240
RATES = ROOT / "benchmarks" / "results" / "shapes_tiny_stage_rates.json"


def logged_minutes(stage: str) -> float:
    lines = (ROOT / "export" / "train" / "logs" / f"{stage}.jsonl").read_text().splitlines()
    done = [r for r in map(json.loads, lines) if r.get("event") == "stopped" and r.get("done")]
    if not done:
        raise ValueError(f"export/train/logs/{stage}.jsonl: the stage never finished")
    return done[-1]["time"] / 60


def rated_minutes(stage: str, rates: list[dict]) -> float:
    bounds = [*PRICED_FROM_RATES[stage], DEFAULTS[stage]["steps"]]
    total = 0.0
    for start, end in zip(bounds, bounds[1:]):
        phase = [r["s_per_step"] for r in rates if r["stage"] == stage and start <= r["from"] < end]
        if not phase:
            raise ValueError(f"no rate measured for {stage} steps {start}..{end}")
        total += (end - start) * max(phase)
    return total / 60


def schedule(rates: list[dict]) -> dict[str, list[tuple[str, float, float, str]]]:
    """Per core: (stage, start, end, how priced) in minutes."""
    rows: dict[str, list] = {}
    for core, chain in CHAINS.items():
        rows[core], clock = [], 0.0
        for i, stage in enumerate(chain):
            after = DEFAULTS[stage].get("after")
            if after is not None and after not in chain[:i]:
                raise ValueError(f"{stage} continues {after}, which is not before it on {core}")
            if stage in PRICED_FROM_RATES:
                minutes, how = rated_minutes(stage, rates), "rate"
            else:
                minutes, how = logged_minutes(stage), "log"
            rows[core].append((stage, clock, clock + minutes, how))
            clock += minutes
    missing = set(DEFAULTS) - {stage for chain in CHAINS.values() for stage in chain}
    if missing:
        raise ValueError(f"stages in no chain: {sorted(missing)}")
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rates", type=Path, default=RATES)
    args = parser.parse_args()
    rows = schedule(json.loads(args.rates.read_text())["rates"])
    print("| core | stage | from (min) | to (min) | minutes | priced from |\n|---|---|---|---|---|---|")
    for core, stages_ in rows.items():
        for stage, start, end, how in stages_:
            print(f"| {core} | {stage} | {start:.1f} | {end:.1f} | {end - start:.1f} | {how} |")
    wall = max(end for r in rows.values() for _s, _a, end, _h in r)
    over = [s for r in rows.values() for s, a, e, _h in r if e - a > 90]
    print(
        f"\nwall clock {wall:.1f} min ({int(wall // 60)} h {wall % 60:.1f} min) of the {BUDGET_MIN} budgeted;"
        f" stages over 90 min: {', '.join(over) or 'none'}"
    )


if __name__ == "__main__":
    main()
