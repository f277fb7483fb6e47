"""A random-weight checkpoint of the released 7B in the official layout, for export and speed runs.

`save_random_official` (export/checkpoint.py) builds `visionllmv2-7b` with its parameters on the meta device
and draws each shard's float16 tensors only when that shard is written, so the 9.4 G parameters (19 GB on
disk) never sit in memory together: the peak is about one shard. Prints the wall time, this process's peak
RSS (`ru_maxrss`) and the folder's size; the weights are noise, good for speed and memory, not for answers.

    python3 benchmarks/make_random_7b.py /data/ckpt-7b                  # ~19 GB disk
    python3 benchmarks/make_random_7b.py /tmp/ckpt --config tiny-random # a smoke test
"""

from __future__ import annotations

import argparse
import resource
import shutil
import sys
import time
from pathlib import Path

import torch


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("out", type=Path, help="the checkpoint folder to create (must not exist)")
    parser.add_argument("--config", default="visionllmv2-7b", help="named configuration (default %(default)s)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--dtype", choices=("fp16", "bf16", "fp32"), default="fp16")
    parser.add_argument("--shard-gb", type=float, default=2.0, help="shard size in GiB (default %(default)s)")
    args = parser.parse_args(argv)

    from visionllm_edge.export.checkpoint import save_random_official

    dtype = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}[args.dtype]
    need = _bytes_needed(args.config, dtype)
    free = shutil.disk_usage(args.out.parent if args.out.parent.exists() else Path.cwd()).free
    if need > free:
        print(f"{args.out}: needs {need / 1e9:.1f} GB of disk, {free / 1e9:.1f} GB free", file=sys.stderr)
        return 1
    start = time.perf_counter()
    save_random_official(
        args.config, args.out, seed=args.seed, dtype=dtype, max_shard_bytes=int(args.shard_gb * (1 << 30))
    )
    seconds = time.perf_counter() - start
    files = sorted(p for p in args.out.iterdir() if p.is_file())
    size = sum(p.stat().st_size for p in files)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    print(
        f"{args.out}: {args.config} {args.dtype}, {len(files)} files, {size / 1e9:.2f} GB, "
        f"{seconds:.1f} s, peak RSS {peak / 1e9:.2f} GB"
    )
    return 0


def _bytes_needed(config: str, dtype: torch.dtype) -> int:
    """The checkpoint's size from the model built on meta (floating tensors in `dtype`)."""
    from visionllm_edge.export.config import named_config
    from visionllm_edge.export.model import build_model

    model = build_model(named_config(config), device="meta")
    itemsize = torch.empty(0, dtype=dtype).element_size()
    seen: dict[int, int] = {}
    for value in model.state_dict(keep_vars=True).values():
        seen[id(value)] = value.numel() * (itemsize if value.is_floating_point() else value.element_size())
    return sum(seen.values())


if __name__ == "__main__":
    sys.exit(main())
