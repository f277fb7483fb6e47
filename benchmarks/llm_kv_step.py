"""One decode step at Vicuna-7B widths: two-block attention vs concat, ORT CPU vs torch eager.

Builds a 2-layer Llama at the real 7B widths (hidden 4096, 32 heads, FFN 11008, vocab 32026; seeded random
weights), exports it twice through the same `llm.onnx` code path, once with the two-block attention that the
SDK ships and once with the naive `concat(past, new)` attention (same inputs and outputs), and times one
decode step (S=1, R=1) at a short and a long past (with `--quantized`, also int8 / int4 forms of the
two-block graph):

- ORT CPU, `intra_op_num_threads` threads, the past handed as contiguous views of a KV arena (as the runtime
  does), for both graphs;
- the reference `LlamaForCausalLM.forward` eager step (head-major past, concat inside) + the lm_head row.

The fp32 forms are checked to agree before timing. Medians of `--repeats` undisturbed calls after `--warmup`
calls. The bandwidth floor is measured in the same rounds: the DRAM read rate of numpy's matrix-vector
product (OpenBLAS sgemv, its own threads) over a 512 MiB matrix of random floats, the fastest reader found
on this machine (benchmarks/results/floor_gaps.md: a threaded `np.sum` reads slower than ONNX Runtime's
own MatMuls, and a matrix of equal values reads faster than DRAM allows). Needs ~9 GB of RAM and a few
minutes on 2 cores (graphs are written with external data to keep memory down; `--workdir DIR --reuse`
keeps them for the next run).

    python3 benchmarks/llm_kv_step.py [--pasts 64 2048] [--repeats 7] [--threads 2] [--quantized]
"""

from __future__ import annotations

import argparse
import gc
import os
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from torch import nn
from visionllm_edge.export.models.llama import LlamaForCausalLM, LlamaSettings
from visionllm_edge.export.onnx.base import ExportSettings, export_graph
from visionllm_edge.export.onnx.llm import build_graph, io_names

#: Vicuna-7B widths, as in `visionllmv2-7b.config.json` (vocab with the 26 added tokens).
WIDTHS = dict(
    vocab_size=32026,
    hidden_size=4096,
    intermediate_size=11008,
    num_attention_heads=32,
    num_key_value_heads=32,
    max_position_embeddings=4096,
)
#: Bytes of the matrix the read floor streams: well past the 32 MiB L3.
FLOOR_BYTES = 512 << 20


def build_model(layers: int, seed: int, widths: dict = WIDTHS) -> LlamaForCausalLM:
    """Random weights without paying for nn.Linear's init: built on meta, then filled from one generator.
    `widths` are LlamaSettings keywords (default: Vicuna-7B's; gpu_check.py's smoke run passes small ones)."""
    with torch.device("meta"):
        llm = LlamaForCausalLM(LlamaSettings(num_hidden_layers=layers, **widths))
    # The step never looks up tokens (it takes embeddings): a 1-row table saves 0.5 GB.
    llm.model.embed_tokens = nn.Embedding(1, widths["hidden_size"], device="meta")
    llm = llm.to_empty(device="cpu")
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in llm.parameters():
            if p.dim() >= 2:
                p.normal_(0.0, 1.0 / p.shape[1] ** 0.5, generator=g)
            else:  # RMSNorm weights
                p.normal_(1.0, 0.1, generator=g)
    return llm.eval().requires_grad_(False)


def _cpu_stall_us() -> int | None:
    """Microseconds that some task waited for a CPU (`/proc/pressure/cpu`), or None where PSI is absent."""
    try:
        with open("/proc/pressure/cpu") as f:
            return int(f.readline().split("total=")[1])
    except (OSError, IndexError, ValueError):
        return None


def time_interleaved(fns: dict, warmup: int, repeats: int, max_stall: float = 0.05) -> dict:
    """Times several step functions in rounds, one call of each per round, so that they share the load.

    Other jobs share this 2-core machine now and then: a call during which tasks waited for a CPU for more
    than `max_stall` of its wall time is set aside (our own threads never exceed the cores we ask for, so a
    clean call stalls ~0). Rounds go on until every function has `repeats` clean calls, or 6x `repeats`.

    Returns:
        name -> (times in ms, clean): the clean calls' times, or all calls' times with `clean=False` when
        too few were clean.
    """
    names = list(fns)
    for _ in range(warmup):
        for name in names:
            fns[name]()
    clean = {name: [] for name in names}
    every = {name: [] for name in names}
    for r in range(6 * repeats):
        if all(len(clean[name]) >= repeats for name in names):
            break
        for name in names[r % len(names) :] + names[: r % len(names)]:  # rotate: no fixed order bias
            if len(clean[name]) >= repeats:
                continue
            stall0 = _cpu_stall_us()
            t0 = time.perf_counter()
            fns[name]()
            wall = time.perf_counter() - t0
            stall1 = _cpu_stall_us()
            every[name].append(wall * 1e3)
            if stall0 is None or (stall1 - stall0) * 1e-6 <= max_stall * wall:
                clean[name].append(wall * 1e3)
    return {
        name: (clean[name], True) if len(clean[name]) >= repeats else (every[name], False) for name in names
    }


def read_floor(nbytes: int = FLOOR_BYTES, seed: int = 0):
    """A call that streams `nbytes` of random float32 from DRAM once (an sgemv): its rate is the floor."""
    matrix = np.random.default_rng(seed).standard_normal((nbytes // 4 // 4096, 4096), dtype=np.float32)
    vector = np.ones(4096, dtype=np.float32)
    return lambda: matrix @ vector


def ort_session(path: Path, threads: int):
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads
    opts.inter_op_num_threads = 1
    opts.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    opts.log_severity_level = 3
    return ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--pasts", type=int, nargs="+", default=[64, 2048])
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument(
        "--workdir", type=Path, default=None, help="keep the exported graphs here (default: temp)"
    )
    ap.add_argument("--reuse", action="store_true", help="reuse graphs already exported in --workdir")
    ap.add_argument(
        "--quantized", action="store_true", help="also time int8 / int4 forms of the two-block graph"
    )
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)

    t0 = time.perf_counter()
    llm = build_model(args.layers, args.seed)
    s = llm.settings
    n = s.num_hidden_layers
    weight_bytes = sum(p.numel() * 4 for name, p in llm.named_parameters() if "embed_tokens" not in name)
    print(
        f"model: {n} layers at 7B widths, {weight_bytes / 1e9:.2f} GB of step weights "
        f"(built in {time.perf_counter() - t0:.1f} s)"
    )

    tmp = tempfile.TemporaryDirectory(prefix="llm_kv_step.") if args.workdir is None else None
    work = Path(tmp.name) if tmp else args.workdir
    paths = {}
    for attention in ("two_block", "concat"):
        t0 = time.perf_counter()
        path = work / attention / "llm.onnx"
        if args.reuse and path.is_file():
            paths[attention] = path
            continue
        export_graph(build_graph(llm, ExportSettings(), attention=attention), path, external_data=True)
        paths[attention] = path
        gc.collect()
        print(f"exported {attention} in {time.perf_counter() - t0:.1f} s")
    sizes = {}
    if args.quantized:
        from visionllm_edge.export.onnx.quantize import graph_bytes, quantize_int4, quantize_int8

        sizes["fp32"] = graph_bytes(paths["two_block"])
        for kind, quantize in (("int8", quantize_int8), ("int4", quantize_int4)):
            t0 = time.perf_counter()
            path = work / f"two_block_{kind}" / "llm.onnx"
            if not (args.reuse and path.is_file()):
                quantize(paths["two_block"], path)
                gc.collect()
                print(f"quantized {kind} in {time.perf_counter() - t0:.1f} s")
            paths[kind] = path
            sizes[kind] = graph_bytes(path)

    rng = np.random.default_rng(args.seed)
    capacity = max(args.pasts) + 1
    shape = (capacity, s.num_key_value_heads, s.head_dim)
    # One arena per layer and kind, as the runtime keeps them; each step gets the prefix views.
    arena = {name: rng.standard_normal(shape, dtype=np.float32) for name in io_names(n)[0][3:]}
    x = rng.standard_normal((1, 1, s.hidden_size), dtype=np.float32)

    def feeds(past: int) -> dict[str, np.ndarray]:
        f = {
            "inputs_embeds": x,
            "position_ids": np.array([past], dtype=np.int64),
            "output_rows": np.array([0], dtype=np.int64),
        }
        f.update({name: a[:past] for name, a in arena.items()})
        return f

    floor_read = read_floor()
    results: dict[tuple[str, int], tuple[list[float], bool]] = {}
    outputs: dict[tuple[str, int], np.ndarray] = {}
    sessions = {name: ort_session(path, args.threads) for name, path in paths.items()}
    for past in args.pasts:
        # Eager reference: its own head-major layout, prepared outside the timing; concat happens inside.
        ref_past = [
            tuple(
                torch.from_numpy(arena[f"{kind}.{i}"][:past]).permute(1, 0, 2).contiguous()[None]
                for kind in ("past_key", "past_value")
            )
            for i in range(n)
        ]
        xt = torch.from_numpy(x)
        pos = torch.tensor([past])

        def eager(xt=xt, pos=pos, ref_past=ref_past):
            with torch.inference_mode():
                out = llm(xt, pos, ref_past)
                return llm.lm_head(out.hidden[:, -1]).numpy()

        f = feeds(past)
        fns = {"eager": eager, "floor": floor_read}
        fns.update(
            {name: (lambda sess=sess, f=f: sess.run(["logits"], f)[0]) for name, sess in sessions.items()}
        )
        for name, fn in fns.items():
            if name != "floor":
                outputs[(name, past)] = fn()
        for name, timed in time_interleaved(fns, args.warmup, args.repeats).items():
            results[(name, past)] = timed
        del ref_past, fns
        gc.collect()

    del sessions
    for past in args.pasts:
        ref = outputs[("eager", past)]
        for attention in ("two_block", "concat"):
            diff = float(np.abs(outputs[(attention, past)] - ref).max())
            print(f"past {past}: max |logits {attention} - eager| = {diff:.2e}")
            if diff > 1e-3 * max(1.0, float(np.abs(ref).max())):
                raise SystemExit(f"{attention} disagrees with the eager reference at past {past}")

    def med(key):
        return statistics.median(results[key][0])

    kv_row_bytes = 2 * n * s.num_key_value_heads * s.head_dim * 4
    print()
    print(
        f"One decode step (S=1, R=1), {n} layers at 7B widths, fp32, {args.threads} threads; median ms of "
        f"{args.repeats} undisturbed calls after {args.warmup} warm-up, backends interleaved (min-max; "
        f"* = too few undisturbed calls: median of all); load average at the end {os.getloadavg()[0]:.2f}. "
        "Floor: (step weights + past K/V) / the read rate of the same rounds."
    )
    print()
    print(
        "| past | read GB/s | floor | eager torch | ORT concat | ORT two-block | two-block / floor "
        "| concat - two-block | eager / two-block |"
    )
    print("|---|---|---|---|---|---|---|---|---|")
    for past in args.pasts:
        rate = FLOOR_BYTES / (med(("floor", past)) * 1e-3)
        floor = (weight_bytes + past * kv_row_bytes) / rate * 1e3
        cells = []
        for key in ("eager", "two_block", "concat"):
            t, clean = results[(key, past)]
            mark = "" if clean else "*"
            cells.append(f"{med((key, past)):.1f} ({min(t):.1f}-{max(t):.1f}){mark}")
        eager_c, two_c, concat_c = cells
        saved = med(("concat", past)) - med(("two_block", past))
        ratio = med(("eager", past)) / med(("two_block", past))
        print(
            f"| {past} | {rate / 1e9:.1f} | {floor:.1f} | {eager_c} | {concat_c} | {two_c} | "
            f"{med(('two_block', past)) / floor:.2f} | {saved:+.1f} | {ratio:.2f} |"
        )
    if args.quantized:
        print()
        print(
            "Quantized two-block graphs (ORT CPU), same step; relative error = ||logits - eager|| / ||eager||"
        )
        print("on random weights (says nothing about a trained model). Bytes: graph + external data.")
        print()
        print("| past | fp32 | int8 | int4 (b32, acc 4) | int8 rel. err | int4 rel. err |")
        print("|---|---|---|---|---|---|")
        for past in args.pasts:
            ref = outputs[("eager", past)]
            err = {
                k: np.linalg.norm(outputs[(k, past)] - ref) / np.linalg.norm(ref) for k in ("int8", "int4")
            }
            cells = []
            for key in ("two_block", "int8", "int4"):
                t, clean = results[(key, past)]
                cells.append(f"{med((key, past)):.1f} ({min(t):.1f}-{max(t):.1f}){'' if clean else '*'}")
            print(f"| {past} | {' | '.join(cells)} | {err['int8']:.3f} | {err['int4']:.3f} |")
        print(
            f"\nsizes: fp32 {sizes['fp32'] / 1e6:.1f} MB, int8 {sizes['int8'] / 1e6:.1f} MB, "
            f"int4 {sizes['int4'] / 1e6:.1f} MB"
        )
    if tmp:
        tmp.cleanup()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
