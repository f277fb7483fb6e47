"""Small helpers the benchmark scripts share: machine and load lines, formatting, markdown tables, inputs."""

from __future__ import annotations

import os
import platform
import statistics
import time
from pathlib import Path

import numpy as np


def loadavg() -> str:
    try:
        return Path("/proc/loadavg").read_text().strip()
    except OSError:
        return "n/a"


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            return next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        return platform.processor() or "?"


def machine_line() -> str:
    """CPUs, CPU model, Python, numpy and onnxruntime versions (onnxruntime only if installed)."""
    parts = [
        f"{os.cpu_count()} CPUs ({cpu_model()})",
        f"Python {platform.python_version()}",
        f"numpy {np.__version__}",
    ]
    try:
        import onnxruntime as ort

        parts.append(f"onnxruntime {ort.__version__}")
    except ImportError:
        pass
    return ", ".join(parts)


def date_line() -> str:
    return time.strftime("%Y-%m-%d %H:%M %Z")


def runqueue_wait_ns() -> int | None:
    """Nanoseconds all threads of this process have spent runnable but not running (schedstat field 2)."""
    total = 0
    try:
        for task in os.scandir("/proc/self/task"):
            try:
                with open(f"{task.path}/schedstat") as f:
                    total += int(f.read().split()[1])
            except (OSError, IndexError, ValueError):
                continue
    except OSError:
        return None
    return total


def timed_call(fn) -> tuple[float, float | None, object]:
    """(wall ms, runqueue wait as a share of the wall time or None, what fn returned)."""
    w0 = runqueue_wait_ns()
    t0 = time.perf_counter()
    out = fn()
    wall = time.perf_counter() - t0
    w1 = runqueue_wait_ns()
    wait = None if w0 is None or w1 is None else (w1 - w0) * 1e-9 / wall
    return wall * 1e3, wait, out


def fmt(x: float, digits: int = 1) -> str:
    if x >= 1000:
        return f"{x:,.0f}"
    if x >= 100:
        return f"{x:.0f}"
    return f"{x:.{digits}f}"


def stats_row(values: list[float], digits: int = 1) -> list[str]:
    """median, min, max."""
    return [fmt(statistics.median(values), digits), fmt(min(values), digits), fmt(max(values), digits)]


def markdown_table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    return "\n".join(lines)


def scene(seed: int, width: int, height: int) -> np.ndarray:
    """A deterministic test image: gradients plus noise (as in tests/test_runtime.py)."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:height, 0:width]
    img = np.stack([(xx * 255 // max(width - 1, 1)), (yy * 255 // max(height - 1, 1)), (xx + yy) % 256], -1)
    img = img.astype(np.float64) * 0.6 + rng.uniform(0, 255, (height, width, 3)) * 0.4
    return img.astype(np.uint8)
