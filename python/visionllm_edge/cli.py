"""`visionllm-edge`: the command line. Subcommands that need torch import it only when they run."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path


def _parse_region(text: str):
    values = [float(v) for v in text.split(",")]
    if len(values) not in (2, 4):
        raise argparse.ArgumentTypeError(f"--region takes x,y or x0,y0,x1,y1 in pixels, got {text!r}")
    return tuple(values)


def _cmd_reference(args) -> int:
    from visionllm_edge.export import ReferencePipeline, load_reference

    pipe = ReferencePipeline(load_reference(args.source))
    result = pipe.run(
        args.image,
        args.prompt,
        regions=args.region or None,
        answer_prefix=args.answer_prefix,
        max_new_tokens=args.max_new_tokens,
        seed=args.seed,
    )
    print(result)
    if args.json:
        Path(args.json).write_text(result.to_json())
        print(f"wrote {args.json}")
    return 0


def _cmd_export(args) -> int:
    from visionllm_edge.export.exporter import main_export

    return main_export(args)


def _cmd_demo(args) -> int:
    from visionllm_edge.demo import run_reference_demo

    run_reference_demo(Path(args.out))
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="visionllm-edge", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    ref = sub.add_parser("reference", help="run one request through the PyTorch reference pipeline")
    ref.add_argument(
        "source", help="checkpoint folder (official layout) or a configuration name: tiny-random"
    )
    ref.add_argument("--image", required=True, help="image file")
    ref.add_argument("--prompt", required=True)
    ref.add_argument("--answer-prefix", default=None, help="forced start of the answer, e.g. 'person[DET]'")
    ref.add_argument(
        "--region", action="append", type=_parse_region, help="visual prompt: x,y or x0,y0,x1,y1"
    )
    ref.add_argument("--max-new-tokens", type=int, default=64)
    ref.add_argument("--seed", type=int, default=0)
    ref.add_argument("--json", default=None, help="write the result as JSON here")
    ref.set_defaults(func=_cmd_reference)

    exp = sub.add_parser("export", help="export a checkpoint to an artifact folder (ONNX graphs + manifest)")
    exp.add_argument("source", help="checkpoint folder (official layout) or a configuration name")
    exp.add_argument("out_dir", help="artifact folder to create")
    exp.add_argument("--config", default=None, help="build this named configuration (seeded random weights)")
    exp.add_argument("--components", default=None, help="comma-separated subset of vision,region,llm,det,pose,gen,edit")
    exp.add_argument("--precision", choices=("fp32", "fp16"), default="fp32")
    exp.add_argument("--quantize", choices=("int8", "int4"), default=None)
    exp.add_argument("--max-context", type=int, default=None, help="cap on the LLM context (KV arena size)")
    exp.add_argument("--no-validate", action="store_true", help="skip the parity validation against PyTorch")
    exp.add_argument("--overwrite", action="store_true", help="replace an existing artifact folder")
    exp.set_defaults(func=_cmd_export)

    demo = sub.add_parser("demo", help="one request of every kind on generated scenes")
    demo.add_argument("--out", default="visionllm-edge-demo", help="folder for the pictures")
    demo.set_defaults(func=_cmd_demo)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except (ValueError, FileNotFoundError) as e:
        print(f"visionllm-edge: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    raise SystemExit(main())
