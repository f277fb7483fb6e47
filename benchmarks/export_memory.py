"""Peak memory of exporting the LLM and vision components from a checkpoint folder, component by component.

Saves a checkpoint of a buildable configuration (default `visionllmv2-7b-2layer`: the release's widths, its
real CLIP-L/14-336, 2 LLM layers, about 3.5 GB in float32) in the official layout to a temporary folder, then
exports each component at each precision in a process of its own and reads that process's peak resident set
size from `os.wait4` (the kernel's `ru_maxrss`, what `/usr/bin/time -v` prints as "Maximum resident set
size"; it counts mapped file pages too, such as a memory-mapped checkpoint shard or ONNX Runtime's mapping of
the graph's external data). Inside the process the high-water mark is also read at the end of each phase
(`VmHWM`): the load of the component's weights, tracing and writing each graph, the reference outputs, and
each graph's ONNX Runtime validation, so the phase that sets the peak can be seen.

Each phase's own peak is read (the high-water mark is reset when a phase starts, Linux `clear_refs`), so
the extrapolation to the 7B's 32 LLM layers (`--target-layers`) goes phase by phase. Loading (only the token
tables: the LLM's layers are read from the checkpoint by the trace) and tracing (`llm.onnx` is traced in
pieces of one layer at these widths, `export/onnx/llm.py` `PIECE_BYTES`, and joined without its weights
loaded) do not grow with the layers; the reference outputs and the ONNX Runtime validation do: peak(32) =
peak(L) + (32 - L) x layer bytes for them, where layer bytes = (the parameters of one decoder layer + the
validation's past K and V of one layer, 2 x max_context x kv_heads x head_dim, held by the long-context case)
x the bytes of one value in the export precision (4 in fp32, 2 in fp16). It assumes what the exporter is
built for: validation maps the graph's external data once, with the reference reading one float32 layer at
a time; counting the validation inputs in both phases makes it an upper bound. The vision tower is measured
at its real size and not extrapolated.

    python3 benchmarks/export_memory.py                            # 7B widths, 2 layers: ~10 GB RAM, ~30 min
    python3 benchmarks/export_memory.py --config tiny-random       # smoke test: a minute or two
    python3 benchmarks/export_memory.py --components llm --precisions fp16 --workdir /data/mem --keep
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

GB = 1e9


# --- the measured processes --------------------------------------------------------------------------------


def _reset_peak() -> bool:
    """Resets this process's `VmHWM` to its current RSS (Linux `clear_refs` 5), so that the next reading is
    the peak of what ran in between; False where that is not possible."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def _status(field: str) -> int | None:
    """A `/proc/self/status` size in bytes (`VmRSS`, `VmHWM`), or None off Linux."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def _child_save(config: str, directory: str) -> dict:
    from visionllm_edge.export.checkpoint import load_reference, save_official

    model = load_reference(config)
    save_official(model, directory)
    size = sum(p.stat().st_size for p in Path(directory).iterdir() if p.is_file())
    return {"bytes": size}


def _child_export(checkpoint: str, out: str, component: str, precision: str, validate: bool) -> dict:
    """Exports one component, recording the RSS around each phase and the high-water mark after it."""
    import visionllm_edge.export.exporter as ex
    from visionllm_edge.export.onnx.base import exporter_for

    phases: list[dict] = []

    def phase(label, fn):
        def run(*args, **kwargs):
            start = _status("VmRSS")
            own = _reset_peak()
            try:
                return fn(*args, **kwargs)
            finally:
                phases.append(
                    {
                        "phase": label(args),
                        "rss_start": start,
                        "rss_end": _status("VmRSS"),
                        "hwm": _status("VmHWM"),
                        "own_peak": own,
                    }
                )

        return run

    ex._load_part = phase(lambda a: f"load {a[1]}", ex._load_part)
    ex.export_graph = phase(lambda a: f"trace+write {a[0].name}", ex.export_graph)
    ex._validate_graph = phase(lambda a: f"validate {Path(a[0]).stem} (ORT)", ex._validate_graph)
    cls = type(exporter_for(component))
    cls.validation_cases = phase(lambda a: "reference outputs", cls.validation_cases)
    start = time.perf_counter()
    report = ex.export(
        checkpoint, out, components=[component], precision=precision, validate=validate, progress=False
    )
    return {
        "phases": phases,
        "sizes": report.sizes,
        "passed": bool(report.validation["passed"]) if validate else None,
        "seconds": time.perf_counter() - start,
    }


def _child(argv: list[str]) -> None:
    kind, *rest = argv
    if kind == "save":
        result = _child_save(*rest)
    else:
        checkpoint, out, component, precision, validate = rest
        result = _child_export(checkpoint, out, component, precision, validate == "1")
    print(json.dumps(result))


# --- the driver --------------------------------------------------------------------------------------------


def _run(argv: list[str]) -> tuple[dict, int]:
    """Runs this script's child mode in a new process; its JSON result and its peak RSS in bytes."""
    proc = subprocess.Popen([sys.executable, __file__, "_child", *argv], stdout=subprocess.PIPE, text=True)
    out = proc.stdout.read()
    _, status, usage = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)
    if proc.returncode != 0:
        raise SystemExit(f"child {' '.join(argv)} failed with exit status {proc.returncode}")
    peak = usage.ru_maxrss * (1 if sys.platform == "darwin" else 1024)  # bytes on macOS, KiB on Linux
    return json.loads(out.strip().splitlines()[-1]), peak


def _layer_values(config: str) -> tuple[int, int, int]:
    """(LLM layers, parameters of one decoder layer, validation past values of one layer) of a named
    configuration; the parameters are counted on the meta device, the past is the long-context case's
    K and V at the model's full context (the exporter's default `max_context`)."""
    from visionllm_edge.export.config import named_config
    from visionllm_edge.export.model import build_model

    config = named_config(config)
    layers = build_model(config, device="meta").llm.model.layers
    s = config.llm
    past = 2 * s.max_position_embeddings * s.num_key_value_heads * s.head_dim
    return len(layers), sum(p.numel() for p in layers[0].parameters()), past


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--config", default="visionllmv2-7b-2layer", help="a buildable configuration name")
    ap.add_argument("--components", default="llm,vision")
    ap.add_argument("--precisions", default="fp32,fp16")
    ap.add_argument("--target-layers", type=int, default=32, help="LLM layers to extrapolate to (the 7B's)")
    ap.add_argument("--workdir", help="folder for the checkpoint and artifacts (default: a temporary one)")
    ap.add_argument("--keep", action="store_true", help="keep the checkpoint and the artifacts")
    ap.add_argument("--no-validate", action="store_true", help="export without validation")
    args = ap.parse_args(argv)

    work = Path(args.workdir) if args.workdir else Path(tempfile.mkdtemp(prefix="export-memory-"))
    work.mkdir(parents=True, exist_ok=True)
    checkpoint = work / f"ckpt-{args.config}"
    try:
        print(
            f"config {args.config}, work folder {work}, load {os.getloadavg()[0]:.1f}, {os.cpu_count()} CPUs"
        )
        if not checkpoint.exists():
            saved, peak = _run(["save", args.config, str(checkpoint)])
            size = saved["bytes"] / GB
            print(f"saved the checkpoint: {size:.2f} GB on disk (saving peaked at {peak / GB:.2f} GB)")
        layers, layer_params, layer_past = _layer_values(args.config)
        rows = []
        for component in args.components.split(","):
            for precision in args.precisions.split(","):
                out = work / f"{component}-{precision}"
                shutil.rmtree(out, ignore_errors=True)
                validate = "0" if args.no_validate else "1"
                result, peak = _run(["export", str(checkpoint), str(out), component, precision, validate])
                # Resetting the high-water mark per phase also resets what the kernel reports as the
                # process's peak, so the peak is the highest of the phases' (and of that report).
                peak = max([peak] + [p["hwm"] for p in result["phases"] if p["hwm"] is not None])
                rows.append((component, precision, result, peak))
                _print_run(component, precision, result, peak)
                if not args.keep:
                    shutil.rmtree(out, ignore_errors=True)
        _print_extrapolation(rows, layers, layer_params, layer_past, args.target_layers)
    finally:
        if not args.keep and not args.workdir:
            shutil.rmtree(work, ignore_errors=True)
    return 0


def _gb(value: int | None) -> str:
    return "   n/a" if value is None else f"{value / GB:6.2f}"


def _print_run(component: str, precision: str, result: dict, peak: int) -> None:
    verdict = {True: "validated", False: "VALIDATION FAILED", None: "not validated"}[result["passed"]]
    print(f"\n{component} {precision}: peak RSS {peak / GB:.2f} GB, {verdict}, {result['seconds']:.0f} s")
    graphs = ", ".join(f"{name} {size / 1e6:.1f} MB" for name, size in sorted(result["sizes"].items()))
    print(f"  files: {graphs}")
    own = all(p.get("own_peak") for p in result["phases"])
    print(
        f"  {'phase':<28} {'RSS start':>9} {'RSS end':>9} {'phase peak' if own else 'peak so far':>11}  (GB)"
    )
    for p in result["phases"]:
        print(f"  {p['phase']:<28} {_gb(p['rss_start']):>9} {_gb(p['rss_end']):>9} {_gb(p['hwm']):>11}")


#: What grows with the LLM's layers, per phase: the reference holds the cases' past K/V of every layer (and
#: one float32 layer's weights at a time); validation maps the whole graph's weights and holds that past too.
#: Loading (the token tables) and tracing (one piece, one layer at the 7B's widths, at a time; `PIECE_BYTES`)
#: do not grow.
_GROWING = {"reference outputs": ("past",), "validate": ("weights", "past")}


def _print_extrapolation(rows, layers: int, layer_params: int, layer_past: int, target: int) -> None:
    llm_rows = [r for r in rows if r[0] == "llm"]
    if not llm_rows:
        return
    print(
        f"\nextrapolation to {target} LLM layers, phase by phase, per added layer: the reference holds its "
        f"{layer_past:,} past K/V values of the long-context validation case more, validation its "
        f"{layer_params:,} parameters (mapped) and those values; loading and tracing stay flat"
    )
    for _, precision, result, peak in llm_rows:
        value_bytes = 2 if precision == "fp16" else 4
        per_layer = {"past": layer_past * value_bytes, "weights": layer_params * value_bytes}
        phases = [p for p in result["phases"] if p["hwm"] is not None]
        if not phases or not all(p["own_peak"] for p in phases):
            print(f"  llm {precision}: no per-phase peaks on this system; not extrapolated")
            continue
        estimates = []
        for p in phases:
            grows = next((what for name, what in _GROWING.items() if p["phase"].startswith(name)), ())
            added = sum(per_layer[what] for what in grows)
            estimate = p["hwm"] + (target - layers) * added
            estimates.append(estimate)
            how = f"+ {target - layers} x {added / GB:.3f} GB" if grows else "(flat)"
            line = f"{p['phase']:<24} {p['hwm'] / GB:6.2f} GB {how:>22} -> {estimate / GB:6.2f} GB"
            print(f"  llm {precision} {line}")
        at_target = max(estimates) / GB
        measured = f"measured peak {peak / GB:.2f} GB at {layers} layers"
        print(f"  llm {precision}: {measured}; at {target}: {at_target:.2f} GB")


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "_child":
        _child(sys.argv[2:])
    else:
        sys.exit(main())
