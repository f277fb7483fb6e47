"""Per-component parameter counts of our 7B model next to the official ones.

Builds `visionllmv2-7b` on the meta device (no memory, a few seconds), counts per top-level key prefix
(keys, unique tensors, elements with aliases counted once, elements per dtype) and prints them beside
`meta.per_prefix` of the official key list (`shared/data/visionllmv2-7b.keys.json`, made from the official
`VisionLLMv2Model`). Exit status 1 when any count differs.

    python3 benchmarks/param_counts.py [--keys PATH]
"""

from __future__ import annotations

import argparse
import json
import sys
from collections import defaultdict
from pathlib import Path

import torch

SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
KEYS_FILE = SHARED_DATA / "visionllmv2-7b.keys.json"
FIELDS = ("keys", "unique_tensors", "unique_numel", "numel_over_keys")


def per_prefix_counts(state: dict[str, torch.Tensor]) -> dict[str, dict]:
    """Counts per top-level prefix in the format of the key list's `meta.per_prefix`.

    `state` must come from `state_dict(keep_vars=True)` so that an alias is the same object as its first key
    (on meta there is no storage to compare).
    """
    out: dict[str, dict] = {}
    seen: set[int] = set()
    for key, value in state.items():
        prefix = key.split(".", 1)[0]
        row = out.setdefault(
            prefix, {"keys": 0, "numel_over_keys": 0, "unique_numel": 0, "unique_tensors": 0, "dtypes": {}}
        )
        row["keys"] += 1
        row["numel_over_keys"] += value.numel()
        if id(value) in seen:
            continue
        seen.add(id(value))
        row["unique_tensors"] += 1
        row["unique_numel"] += value.numel()
        dtype = str(value.dtype).removeprefix("torch.")
        row["dtypes"][dtype] = row["dtypes"].get(dtype, 0) + value.numel()
    return out


def model_counts() -> dict[str, dict]:
    from visionllm_edge.export.config import config_7b
    from visionllm_edge.export.model import build_model

    model = build_model(config_7b(), device="meta", official_dtypes=True)
    return per_prefix_counts(model.state_dict(keep_vars=True))


def _fmt_dtypes(d: dict[str, int]) -> str:
    return " + ".join(f"{k} {v:,}" for k, v in sorted(d.items()))


def compare(ours: dict[str, dict], ref: dict[str, dict]) -> list[str]:
    """Every difference, as readable lines (empty when the counts agree)."""
    diffs = []
    for prefix in sorted(set(ours) | set(ref)):
        if prefix not in ours or prefix not in ref:
            diffs.append(f"{prefix}: only in {'ours' if prefix in ours else 'the official list'}")
            continue
        for field in (*FIELDS, "dtypes"):
            if ours[prefix][field] != ref[prefix][field]:
                diffs.append(f"{prefix}.{field}: ours {ours[prefix][field]}, official {ref[prefix][field]}")
    return diffs


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--keys", type=Path, default=KEYS_FILE, help="official key list (keys.json)")
    args = parser.parse_args(argv)
    if not args.keys.is_file():
        print(
            f"{args.keys}: not found (the shared data folder {SHARED_DATA} beside the repo)", file=sys.stderr
        )
        return 2
    ref = json.loads(args.keys.read_text())["meta"]["per_prefix"]
    ours = model_counts()
    head = f"{'prefix':<20} {'keys':>11} {'unique':>11} {'elements (unique)':>31}  {'dtypes (ours)':<45} ok"
    print(head)
    print("-" * len(head))
    totals: dict[str, list[int]] = defaultdict(lambda: [0, 0])
    for prefix in [*ref, *[p for p in ours if p not in ref]]:
        o, r = ours.get(prefix), ref.get(prefix)
        cells = []
        for field in ("keys", "unique_tensors", "unique_numel"):
            a = o[field] if o else None
            b = r[field] if r else None
            totals[field][0] += a or 0
            totals[field][1] += b or 0
            cells.append(f"{a:,}/{b:,}" if a == b else f"{a}!={b}")
        ok = o is not None and r is not None and not compare({prefix: o}, {prefix: r})
        dtypes = _fmt_dtypes(o["dtypes"]) if o else "-"
        mark = "yes" if ok else "NO"
        print(f"{prefix:<20} {cells[0]:>11} {cells[1]:>11} {cells[2]:>31}  {dtypes:<45} {mark}")
    print("-" * len(head))
    tot = [f"{a:,}/{b:,}" for a, b in (totals[f] for f in ("keys", "unique_tensors", "unique_numel"))]
    print(f"{'total':<20} {tot[0]:>11} {tot[1]:>11} {tot[2]:>31}   (ours/official)")
    diffs = compare(ours, ref)
    for line in diffs:
        print("DIFF", line)
    return 1 if diffs else 0


if __name__ == "__main__":
    sys.exit(main())
