"""Turns onnx-tensorrt's `docs/operators.md` into `tensorrt10_onnx_ops.json`, the table `trt_report` checks.

The table is data, not code: TensorRT's ONNX parser documents, per ONNX operator, whether it is supported,
for which data types, and with which restrictions. This script parses that markdown (a file path argument,
e.g. `git show release/10.1-GA:docs/operators.md` from github.com/onnx/onnx-tensorrt) and writes::

    {"source": {"repo", "path", "ref", "commit", "retrieved", "tensorrt_version", ...},
     "opset_range": [lo, hi], "data_types": [...], "notes": [...],
     "ops": {OpType: {"supported": bool, "dtypes": [...], "restrictions": "text"}}}

Nothing is added to the table that the document does not say; the only edits are the normalisations listed
in `source.normalised` (documented typos in type names, markdown escapes and `<br />` line breaks).

Usage::

    python export/data/make_tensorrt_ops_table.py operators.md --ref release/10.1-GA --commit <sha>
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import re
import sys
from pathlib import Path

DEFAULT_OUT = Path(__file__).with_name("tensorrt10_onnx_ops.json")

#: Type-name typos in the document, fixed so that the checker compares like with like. Each fix applied is
#: recorded in the output's `source.normalised`.
_TYPE_TYPOS = {"INF64": "INT64"}


def _clean_text(text: str) -> str:
    """Markdown cell text as plain text: `<br />` becomes a space-separated sentence break, escapes go."""
    text = re.sub(r"<br\s*/?>", " ", text)
    text = text.replace("\\.", ".").replace("\\_", "_")
    return re.sub(r"\s+", " ", text).strip()


def parse_operators_md(text: str) -> dict:
    """Parses the operator support document.

    Args:
        text: the markdown of `docs/operators.md`.

    Returns:
        `{"tensorrt_version", "opset_range", "data_types", "notes", "ops", "normalised"}`.

    Raises:
        ValueError: the document has no operator table (not the file this script expects).
    """
    version, opset_range = None, None
    header = re.search(
        r"TensorRT\s+([0-9.]+)\s+supports operators in the inclusive range of opset\s+(\d+)"
        r"\s+to opset\s+(\d+)",
        text,
        re.IGNORECASE,
    )
    if header:
        version, opset_range = header.group(1), [int(header.group(2)), int(header.group(3))]
    else:
        # Documents before TensorRT 9 say "supports operators up to Opset N".
        old = re.search(r"TensorRT\s+([0-9.]+)\s+supports operators up to Opset\s+(\d+)", text, re.IGNORECASE)
        if old:
            version, opset_range = old.group(1), [1, int(old.group(2))]
    types = re.search(r"supports the following ONNX data types:\s*([^\n]+)", text)
    data_types = []
    if types:
        data_types = [t.strip() for t in re.split(r",|\band\b", types.group(1).rstrip(". ")) if t.strip()]
    notes = [_clean_text(m.group(1)) for m in re.finditer(r"^>\s*Note:\s*(.+)$", text, re.MULTILINE)]

    ops: dict[str, dict] = {}
    normalised: set[str] = set()
    in_table = False
    for line in text.splitlines():
        stripped = line.strip()
        if stripped.lower().startswith("## operator support matrix"):
            in_table = True
            continue
        if not in_table:
            continue
        if stripped.startswith("#"):
            break  # the next section ends the table
        if not stripped.startswith("|"):
            continue
        # Rows do not always close with a pipe, and short rows leave out trailing cells.
        cells = [c.strip() for c in stripped.strip("|").split("|")]
        if not cells or cells[0] in ("Operator", "") or set(cells[0]) <= set("-: "):
            continue
        name = cells[0]
        flag = cells[1] if len(cells) > 1 else ""
        if not flag or flag[0] not in "YN":
            raise ValueError(f"operator {name!r}: cannot read the Supported column {flag!r}")
        dtypes = []
        for token in (cells[2] if len(cells) > 2 else "").split(","):
            token = token.strip()
            if not token:
                continue  # a trailing comma in the document ("FP32, FP16, BF16, ")
            if token in _TYPE_TYPOS:
                normalised.add(f"{name}: type {token} read as {_TYPE_TYPOS[token]}")
                token = _TYPE_TYPOS[token]
            dtypes.append(token)
        restriction = _clean_text(" ".join(cells[3:])) if len(cells) > 3 else ""
        entry = {"supported": flag.startswith("Y"), "dtypes": dtypes, "restrictions": restriction}
        if "EXPERIMENTAL" in flag.upper():
            entry["experimental"] = True
        ops[name] = entry
    if not ops:
        raise ValueError("no operator support matrix found (expected a '## Operator Support Matrix' table)")
    return {
        "tensorrt_version": version,
        "opset_range": opset_range,
        "data_types": data_types,
        "notes": notes,
        "ops": dict(sorted(ops.items())),
        "normalised": sorted(normalised),
    }


def build_table(text: str, repo: str, path: str, ref: str | None, commit: str | None, retrieved: str) -> dict:
    """The JSON document: the parsed table under a `source` that says where it came from."""
    parsed = parse_operators_md(text)
    source = {
        "repo": repo,
        "path": path,
        "ref": ref,
        "commit": commit,
        "retrieved": retrieved,
        "tensorrt_version": parsed["tensorrt_version"],
        "normalised": ["markdown escapes and <br /> line breaks in restriction text", *parsed["normalised"]],
    }
    return {
        "source": source,
        "opset_range": parsed["opset_range"],
        "data_types": parsed["data_types"],
        "notes": parsed["notes"],
        "ops": parsed["ops"],
    }


def dump_table(table: dict) -> str:
    """The table as JSON text with one line per operator, so that a re-generation diffs op by op."""
    head = {k: v for k, v in table.items() if k != "ops"}
    text = json.dumps(head, indent=1)[:-2]  # reopen the object to append "ops"
    rows = [f"  {json.dumps(name)}: {json.dumps(entry)}" for name, entry in table["ops"].items()]
    return text + ',\n "ops": {\n' + ",\n".join(rows) + "\n }\n}\n"


def main(argv: list[str] | None = None) -> int:
    """CLI entry: parse OPERATORS_MD, write the JSON table (default: beside this script)."""
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("operators_md", type=Path, help="path to onnx-tensorrt's docs/operators.md")
    ap.add_argument("--out", type=Path, default=DEFAULT_OUT)
    ap.add_argument("--repo", default="onnx/onnx-tensorrt")
    ap.add_argument("--path", default="docs/operators.md", help="the file's path inside the repository")
    ap.add_argument("--ref", default=None, help="branch or tag the file was read at (e.g. release/10.1-GA)")
    ap.add_argument("--commit", default=None, help="commit the file was read at")
    ap.add_argument("--retrieved", default=_dt.date.today().isoformat(), help="date read (YYYY-MM-DD)")
    args = ap.parse_args(argv)
    if not (args.ref or args.commit):
        ap.error("say where the file came from: --ref and/or --commit")
    table = build_table(
        args.operators_md.read_text(encoding="utf-8"),
        args.repo,
        args.path,
        args.ref,
        args.commit,
        args.retrieved,
    )
    args.out.write_text(dump_table(table), encoding="utf-8")
    ops = table["ops"]
    supported = sum(e["supported"] for e in ops.values())
    print(
        f"wrote {args.out}: {len(ops)} operators ({supported} supported), TensorRT "
        f"{table['source']['tensorrt_version']}, opsets {table['opset_range']}",
        file=sys.stderr,
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
