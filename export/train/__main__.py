"""Train shapes-tiny, one stage per command (resumable; see `export/train/README.md`).

    python -m visionllm_edge.export.train STAGE [--out training-runs/shapes-tiny] [--minutes M] [--threads T]
    python -m visionllm_edge.export.train assemble [--out ...] DEST
    python -m visionllm_edge.export.train probe STAGE [--out ...]   # what a probed stage's tower tells apart
    python -m visionllm_edge.export.train rate STAGE [--steps N] [--from K] [--threads T]   # seconds per step

A stage's data, initial weights and schedule are fixed by its defaults below; `--minutes` only bounds one
invocation (run the command again to continue where it stopped).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch
from torch import nn

#: Per stage: planned steps, batch, peak learning rate, warm-up steps; `after`: the stage whose finished
#: weights it starts from (its data continue from that stage's last step). In assembly order.
DEFAULTS = {
    "object": {"steps": 3400, "batch": 8, "lr": 2e-4, "warmup": 300},
    "pose": {"steps": 2000, "batch": 8, "lr": 2e-4, "warmup": 150},
    "diffusion": {"steps": 6400, "batch": 8, "lr": 5e-4, "warmup": 100},
    "llm": {"steps": 3500, "batch": 12, "lr": 5e-4, "warmup": 200},
    "llm2": {"steps": 8000, "batch": 12, "lr": 3e-4, "warmup": 100, "after": "llm"},
    "diffusion2": {"steps": 15500, "batch": 8, "lr": 3e-4, "warmup": 100, "after": "diffusion"},
    "llm3": {"steps": 3500, "batch": 12, "lr": 2e-4, "warmup": 100, "after": "llm2"},
    "diffusion3": {"steps": 7000, "batch": 8, "lr": 2e-4, "warmup": 100, "after": "diffusion2"},
    "llm4": {"steps": 1200, "batch": 12, "lr": 1e-4, "warmup": 50, "after": "llm3"},
    "llm5": {"steps": 2800, "batch": 4, "lr": 5e-4, "warmup": 100, "after": "llm4"},
    "vae_decoder": {"steps": 580, "batch": 16, "lr": 2e-4, "warmup": 30, "after": "diffusion3"},
    "diffusion4": {"steps": 3000, "batch": 8, "lr": 1.5e-4, "warmup": 50, "after": "diffusion3"},
    "diffusion5": {"steps": 3300, "batch": 8, "lr": 1.5e-4, "warmup": 50, "after": "diffusion4"},
}
INIT_SEED = 0
DEFAULT_OUT = Path("training-runs/shapes-tiny")


def build():
    from visionllm_edge.export.config import named_config
    from visionllm_edge.export.model import build_model

    cfg = named_config("shapes-tiny")
    model = build_model(cfg, seed=INIT_SEED)
    return cfg, model


def _stage(name: str, threads: int, load_from: Path | None):
    """A stage on a fresh model: its trained modules, its step function and the step function's arguments.
    Seeds the initial weights, sets `threads` torch threads, and with `load_from` loads the finished
    weights of the chain it continues, oldest first (a phase that trains part of a decoder, such as
    `diffusion4`, leaves the rest, such as the autoencoder, to the stages before it)."""
    from visionllm_edge.export.train import stages

    torch.set_num_threads(threads)
    torch.manual_seed(INIT_SEED)
    cfg, model = build()
    settings = DEFAULTS[name]
    modules_fn, step_fn = stages.STAGES[name]
    step_args = {}
    if "after" in settings:
        before = settings["after"]
        if load_from is not None:
            for earlier in reversed(_chain(before)):
                state = _finished(load_from, earlier)
                nn.ModuleList(stages.STAGES[earlier][0](model)).load_state_dict(state["module"])
        step_args["offset"] = _data_end(before)
    return nn.ModuleList(modules_fn(model)), step_fn(model, cfg, settings["batch"], **step_args), step_args


def run_stage(name: str, out: Path, minutes: float, threads: int) -> None:
    from visionllm_edge.export.train.runner import StageRunner

    settings = DEFAULTS[name]
    trained, step, step_args = _stage(name, threads, load_from=out)
    runner = StageRunner(
        name, trained, out, steps=settings["steps"], minutes=minutes, lr=settings["lr"],
        warmup=settings["warmup"],
    )  # fmt: skip
    if runner.done:
        print(f"stage {name} is complete ({runner.step} steps); nothing to do")
        return
    runner.log({"event": "start", "argv": sys.argv[1:], **settings, **step_args})
    runner.run(step)


def _chain(name: str) -> list[str]:
    """`name` and the stages it continues, newest first."""
    return [name, *(_chain(DEFAULTS[name]["after"]) if "after" in DEFAULTS[name] else [])]


def _data_end(name: str) -> int:
    """The data step a finished stage stopped at: its steps, plus those of the chain it continues."""
    return sum(DEFAULTS[stage]["steps"] for stage in _chain(name))


def _finished(out: Path, name: str) -> dict:
    """The checkpoint of a stage that ran all its planned steps."""
    ckpt = out / name / "checkpoint.pt"
    if not ckpt.exists():
        raise FileNotFoundError(f"{ckpt}: stage {name!r} has not been run")
    state = torch.load(ckpt, map_location="cpu", weights_only=True)
    planned = DEFAULTS[name]["steps"]
    if int(state["step"]) < planned:
        step = int(state["step"])
        raise RuntimeError(
            f"{ckpt}: stage {name!r} stopped at step {step} of {planned}; run it to the end first"
        )
    return state


def assemble(out: Path, dest: Path) -> None:
    """Loads every finished stage into one model and saves it in the official layout (fp16 safetensors)."""
    from visionllm_edge.export.train import stages

    cfg, model = build()
    report = {}
    for name in DEFAULTS:  # a second phase loads after (over) the stage it continues
        state = _finished(out, name)
        nn.ModuleList(stages.STAGES[name][0](model)).load_state_dict(state["module"])
        report[name] = {"steps": int(state["step"]), "minutes": round(float(state["elapsed"]) / 60, 1)}
    _share_autoencoder(model)
    from visionllm_edge.export.train.ship import save_shipped

    save_shipped(model, dest, report)
    print(json.dumps(report))


def _share_autoencoder(model) -> None:
    """Gives the editing decoder the generation decoder's autoencoder. Both UNets learned the latents of one
    encoder (`diffusion` copies it across when its VAE phase ends, and nothing trains it after), and the
    stages after that train the generation copy's decoder alone (`vae_decoder`)."""
    gen_vae, edit_vae = model.sd.sd_vae.state_dict(), model.ip2p.sd_vae.state_dict()
    for key, value in gen_vae.items():
        if key.startswith(("encoder.", "quant_conv.")) and not torch.equal(value, edit_vae[key]):
            raise RuntimeError(f"the two decoders' VAE encoders differ at {key}; they must be one encoder")
    model.ip2p.sd_vae.load_state_dict(gen_vae)


PROBE_SEED, PROBE_SCENES = 555, 150  # the tuning split's seed (not the held-out one)


def probe(out: Path, name: str) -> dict:
    """Scores a finished stage's patch probe (`stages.probe_accuracy`) on VQA scenes of the tuning split."""
    from visionllm_edge.export.train import stages
    from visionllm_edge.shapes.instructions import make_sample

    if stages.STAGES[name][0] is not stages.llm2_modules:
        raise ValueError(f"stage {name!r} trains no patch probe")
    state = _finished(out, name)
    cfg, model = build()
    nn.ModuleList(stages.STAGES[name][0](model)).load_state_dict(state["module"])
    model.eval()
    scenes = [make_sample("vqa", PROBE_SEED, i).scene for i in range(PROBE_SCENES)]
    report = stages.probe_accuracy(model, stages.patch_probe(model), scenes, cfg.image_size, cfg.max_tiles)
    print(json.dumps({"stage": name, **{k: round(v, 3) for k, v in report.items()}}))
    return report


def rate(name: str, steps: int, start: int, threads: int) -> dict:
    """Seconds per step of a stage from its step `start` on, timed over `steps` steps of its own training
    loop (fresh weights, a scratch folder): what the stage costs on `threads` cores, whatever else shared
    the machine when its log was written."""
    import tempfile

    from visionllm_edge.export.train.runner import StageRunner

    trained, step, _ = _stage(name, threads, load_from=None)
    with tempfile.TemporaryDirectory() as scratch:
        runner = StageRunner(
            name, trained, Path(scratch), steps=steps, minutes=float("inf"), lr=DEFAULTS[name]["lr"],
            warmup=1,
        )  # fmt: skip
        runner.run(lambda i: step(start + i), log_every=steps)
    report = {"stage": name, "from": start, "steps": steps, "threads": threads}
    report["s_per_step"] = round(runner.elapsed / steps, 4)
    print(json.dumps(report))
    return report


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m visionllm_edge.export.train", description=__doc__.splitlines()[0]
    )
    parser.add_argument("stage", choices=[*DEFAULTS, "assemble", "probe", "rate"])
    parser.add_argument(
        "dest", nargs="?", help="assemble: the folder to write; probe, rate: the stage to score or time"
    )
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help="training folder (checkpoints, logs)")
    parser.add_argument("--minutes", type=float, default=90.0, help="wall-clock budget of this invocation")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    parser.add_argument("--steps", type=int, default=60, help="rate: steps to time")
    parser.add_argument("--from", dest="start", type=int, default=0, help="rate: the step to start at")
    args = parser.parse_args(argv)
    if args.stage == "assemble":
        if args.dest is None:
            parser.error("assemble needs DEST")
        assemble(args.out, Path(args.dest))
    elif args.stage == "probe":
        if args.dest not in DEFAULTS:
            parser.error(f"probe needs a stage, one of {', '.join(DEFAULTS)}")
        try:
            probe(args.out, args.dest)
        except (ValueError, FileNotFoundError, RuntimeError) as e:
            parser.error(str(e))
    elif args.stage == "rate":
        if args.dest not in DEFAULTS:
            parser.error(f"rate needs a stage, one of {', '.join(DEFAULTS)}")
        if args.steps < 1 or args.start < 0:
            parser.error(f"rate needs --steps >= 1 and --from >= 0, got {args.steps} and {args.start}")
        rate(args.dest, args.steps, args.start, args.threads)
    else:
        run_stage(args.stage, args.out, args.minutes, args.threads)


if __name__ == "__main__":
    main()
