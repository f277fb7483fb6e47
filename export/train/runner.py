"""The stage runner: a time- and step-bounded training loop that checkpoints, resumes and logs.

Each stage trains some submodules of the model; the runner owns the optimiser, the learning-rate schedule
(linear warm-up, cosine decay over the planned steps), gradient clipping, a checkpoint every few minutes
(written to a temporary file and renamed) and a JSON-lines log. Killing a stage loses at most the steps
since its last checkpoint; running the same command again resumes.
"""

from __future__ import annotations

import json
import math
import os
import signal
import time
from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn


class StageRunner:
    """Runs `step_fn(step) -> dict of scalar losses (the key "loss" is optimised)`.

    Args:
        name: the stage's name (its folder under `out`).
        module: what is trained (its state is checkpointed).
        out: the training folder.
        steps: planned steps (the schedule's length).
        minutes: wall-clock budget of this invocation; the stage stops (checkpointed) when it is spent.
        lr: peak learning rate.
        warmup: warm-up steps.
        clip: gradient-norm clip.
        params: the parameters to optimise (default: all of `module`'s that require grad).
    """

    def __init__(
        self,
        name: str,
        module: nn.Module,
        out: Path,
        steps: int,
        minutes: float,
        lr: float,
        warmup: int = 200,
        clip: float = 1.0,
        weight_decay: float = 1e-4,
        params=None,
    ):
        self.name, self.module, self.steps, self.minutes = name, module, steps, minutes
        self.lr, self.warmup, self.clip = lr, warmup, clip
        self.dir = Path(out) / name
        self.dir.mkdir(parents=True, exist_ok=True)
        params = [p for p in (params or module.parameters()) if p.requires_grad]
        self.opt = torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)
        self.params = params
        self.step = 0
        self.elapsed = 0.0
        self._resume()

    @property
    def checkpoint_path(self) -> Path:
        return self.dir / "checkpoint.pt"

    @property
    def done(self) -> bool:
        return self.step >= self.steps

    def _resume(self) -> None:
        if not self.checkpoint_path.exists():
            return
        state = torch.load(self.checkpoint_path, map_location="cpu", weights_only=True)
        self.module.load_state_dict(state["module"])
        self.opt.load_state_dict(state["optimizer"])
        self.step = int(state["step"])
        self.elapsed = float(state["elapsed"])
        self.log({"event": "resumed", "step": self.step})

    def save(self) -> None:
        tmp = self.checkpoint_path.with_suffix(".tmp")
        torch.save(
            {
                "module": self.module.state_dict(),
                "optimizer": self.opt.state_dict(),
                "step": self.step,
                "elapsed": self.elapsed,
            },
            tmp,
        )
        os.replace(tmp, self.checkpoint_path)

    def log(self, record: dict) -> None:
        record = {"stage": self.name, "time": round(self.elapsed, 1), **record}
        line = json.dumps(record)
        print(line, flush=True)
        with open(self.dir / "log.jsonl", "a") as f:
            f.write(line + "\n")

    def lr_at(self, step: int) -> float:
        if step < self.warmup:
            return self.lr * (step + 1) / self.warmup
        progress = (step - self.warmup) / max(1, self.steps - self.warmup)
        return self.lr * (0.05 + 0.95 * 0.5 * (1 + math.cos(math.pi * min(progress, 1.0))))

    def run(self, step_fn: Callable[[int], dict], log_every: int = 50, save_every_s: float = 300.0) -> None:
        self.module.train()
        # Background jobs start with SIGINT ignored; make Ctrl-C and `kill` (SIGTERM) stop with a checkpoint.
        signal.signal(signal.SIGINT, signal.default_int_handler)
        signal.signal(signal.SIGTERM, signal.default_int_handler)
        start = time.time()
        base_elapsed = self.elapsed
        last_save = start
        try:
            self._loop(step_fn, log_every, save_every_s, start, base_elapsed, last_save)
        except KeyboardInterrupt:  # Ctrl-C, SIGINT or SIGTERM: keep what was done
            self.log({"event": "interrupted", "step": self.step})
        self.save()
        self.log({"event": "stopped", "step": self.step, "done": self.done})
        self.module.eval()

    def _loop(self, step_fn, log_every, save_every_s, start, base_elapsed, last_save) -> None:
        sums: dict[str, float] = {}
        count = 0
        while not self.done and (time.time() - start) < self.minutes * 60:
            for g in self.opt.param_groups:
                g["lr"] = self.lr_at(self.step)
            losses = step_fn(self.step)
            loss = losses["loss"]
            if not torch.isfinite(loss):
                raise FloatingPointError(f"{self.name}: loss is {loss.item()} at step {self.step}")
            self.opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(self.params, self.clip)
            self.opt.step()
            self.step += 1
            for k, v in losses.items():
                sums[k] = sums.get(k, 0.0) + float(v.detach() if torch.is_tensor(v) else v)
            count += 1
            self.elapsed = base_elapsed + time.time() - start
            if self.step % log_every == 0 or self.done:
                self.log(
                    {
                        "step": self.step,
                        "lr": self.lr_at(self.step),
                        **{k: round(v / count, 4) for k, v in sums.items()},
                    }
                )
                sums, count = {}, 0
            if time.time() - last_save > save_every_s:
                self.save()
                last_save = time.time()
