"""Runs a command and reports its peak resident memory per phase, the phases read from its own log lines.

For a run too big to repeat phase by phase in processes of their own (the 7B export): the command's stderr
and stdout lines are passed through with the seconds since the start, and every `--every` seconds the RSS
of the command's whole process tree is read from `/proc/<pid>/status` (`VmRSS`, file pages mapped and
touched included, as `/usr/bin/time -v`'s maximum counts them). A phase starts at each line that matches
`--phase` (default: the exporter's `  [component] ...` progress lines) and is named by it; the summary gives
each phase's wall time and the highest sample within it. Sampling misses peaks shorter than `--every`; the
kernel's maximum for the whole command (`ru_maxrss` of the child) is printed too.

    python3 benchmarks/rss_phases.py -- visionllm-edge export CKPT OUT --precision fp16
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import threading
import time
from pathlib import Path


def tree_rss(root: int) -> int:
    """Bytes resident in `root` and its descendants (0 for a process gone meanwhile)."""
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        children.setdefault(int(fields[1]), []).append(int(entry.name))
    total, todo = 0, [root]
    while todo:
        pid = todo.pop()
        todo.extend(children.get(pid, []))
        try:
            for line in Path(f"/proc/{pid}/status").read_text().splitlines():
                if line.startswith("VmRSS:"):
                    total += int(line.split()[1]) * 1024
        except OSError:
            pass
    return total


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--every", type=float, default=1.0, help="seconds between samples (default 1)")
    parser.add_argument("--phase", default=r"^\s*\[[\w-]+\]", help="regex of a line that starts a phase")
    parser.add_argument("command", nargs=argparse.REMAINDER, help="the command, after --")
    args = parser.parse_args(argv)
    command = args.command[1:] if args.command[:1] == ["--"] else args.command
    if not command:
        parser.error("no command given (put it after --)")
    phase_re = re.compile(args.phase)

    start = time.perf_counter()
    proc = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, bufsize=1)
    phases: list[list] = [["(start)", 0.0, 0]]  # name, start second, peak bytes
    lock = threading.Lock()
    done = threading.Event()

    def sample() -> None:
        while not done.wait(args.every):
            rss = tree_rss(proc.pid)
            with lock:
                phases[-1][2] = max(phases[-1][2], rss)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    assert proc.stdout is not None
    for line in proc.stdout:
        now = time.perf_counter() - start
        sys.stdout.write(f"{now:8.1f}s  {line}")
        sys.stdout.flush()
        if phase_re.search(line):
            with lock:
                phases.append([line.strip(), now, tree_rss(proc.pid)])
    _, status, usage = os.wait4(proc.pid, 0)
    done.set()
    sampler.join()
    end = time.perf_counter() - start
    code = os.waitstatus_to_exitcode(status)
    print(f"\nexit {code}, {end:.1f} s, kernel peak RSS (ru_maxrss) {usage.ru_maxrss * 1024 / 1e9:.2f} GB")
    print(f"{'phase (from the line that starts it)':<70} {'start s':>8} {'wall s':>8} {'peak GB':>8}")
    for i, (name, at, peak) in enumerate(phases):
        until = phases[i + 1][1] if i + 1 < len(phases) else end
        print(f"{name[:70]:<70} {at:8.1f} {until - at:8.1f} {peak / 1e9:8.2f}")
    return code


if __name__ == "__main__":
    sys.exit(main())
