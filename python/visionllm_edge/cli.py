"""`visionllm-edge`: the command line. Subcommands that need torch import it only when they run.

`run`, `chat` and `info` are the runtime's (no torch): they read an artifact folder written by `export`.
"""

from __future__ import annotations

import argparse
import json
import re
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


# --- runtime commands (torch-free) -------------------------------------------------------------------------

#: Detections and poses listed per request; the rest are counted (all of them are in --json).
_LIST_LIMIT = 25


def _providers(text: str | None) -> list[str] | None:
    if not text:
        return None
    names = [p.strip() for p in text.split(",") if p.strip()]
    return names or None


def _load_pipeline(args):
    from visionllm_edge.pipeline import Pipeline

    return Pipeline.load(
        args.artifact,
        backend=args.backend,
        providers=_providers(args.providers),
        max_context=args.max_context,
        threads=args.threads,
        fp16=args.fp16,
        engine_cache=args.engine_cache,
        device_id=args.device_id,
    )


def _generation_kwargs(args) -> dict:
    return dict(
        max_new_tokens=args.max_new_tokens,
        do_sample=args.sample,
        temperature=args.temperature,
        top_k=args.top_k,
        top_p=args.top_p,
        repetition_penalty=args.repetition_penalty,
        seed=args.seed,
    )


def _print_summary(result, indent: str = "") -> None:
    """The routed groups and what the decoders found; the answer text is printed by the caller."""
    if result.links:
        groups = ", ".join(f"{lk.kind} {lk.label!r}" for lk in result.links)
        print(f"{indent}groups: {groups}")
    if result.detections:
        print(f"{indent}detections: {len(result.detections)}")
        for d in result.detections[:_LIST_LIMIT]:
            x0, y0, x1, y1 = d.box_xyxy
            mask = "" if d.mask is None else f"  mask {int(d.mask.sum())} px"
            print(
                f"{indent}  {d.kind} {d.label!r} {d.score:.3f} [{x0:.1f}, {y0:.1f}, {x1:.1f}, {y1:.1f}]{mask}"
            )
        if len(result.detections) > _LIST_LIMIT:
            print(f"{indent}  ... {len(result.detections) - _LIST_LIMIT} more")
    if result.segmentation is not None:
        counts = result.segmentation.to_dict()["pixels_per_label"]
        print(f"{indent}segmentation: " + ", ".join(f"{lab!r} {n} px" for lab, n in counts.items()))
    if result.poses:
        print(f"{indent}poses: {len(result.poses)}")
        for p in result.poses[:_LIST_LIMIT]:
            x0, y0, x1, y1 = p.box_xyxy
            print(
                f"{indent}  {p.label!r} {p.score:.3f} [{x0:.1f}, {y0:.1f}, {x1:.1f}, {y1:.1f}]"
                f"  {len(p.keypoint_names)} keypoints"
            )
        if len(result.poses) > _LIST_LIMIT:
            print(f"{indent}  ... {len(result.poses) - _LIST_LIMIT} more")
    for i, im in enumerate(result.images):
        print(f"{indent}image {i}: {im.shape[1]}x{im.shape[0]}")


def _print_timings(result, indent: str = "") -> None:
    print(f"{indent}timings (ms):")
    for stage, ms in result.timings.items():
        print(f"{indent}  {stage:<16} {ms:10.1f}")


def _cmd_run(args) -> int:
    from visionllm_edge.images import load_image

    # The image is read (and rejected) before any graph is loaded, and once: the pipeline and --draw share it.
    image = load_image(args.image)
    pipe = _load_pipeline(args)
    result = pipe(
        image,
        args.prompt,
        regions=args.region or None,
        answer_prefix=args.answer_prefix,
        **_generation_kwargs(args),
    )
    print(result.text)
    print(f"stop: {result.stop_reason}, {len(result.token_ids)} tokens")
    _print_summary(result)
    if args.timings:
        _print_timings(result)
    if args.json:
        Path(args.json).write_text(result.to_json())
        print(f"wrote {args.json}")
    if args.draw:
        from PIL import Image

        out = Path(args.draw)
        Image.fromarray(result.draw(image)).save(out)
        print(f"wrote {out}")
        for i, im in enumerate(result.images):
            gen = out.with_name(f"{out.stem}_gen{i}{out.suffix or '.png'}")
            Image.fromarray(im).save(gen)
            print(f"wrote {gen}")
    return 0


def _read_prompts(stream, interactive: bool):
    """Lines from `stream` until EOF or `exit`/`quit`; blank lines are skipped."""
    while True:
        if interactive:
            print("> ", end="", flush=True)
        line = stream.readline()
        if not line:
            if interactive:
                print()
            return
        text = line.strip()
        if text.lower() in ("exit", "quit"):
            return
        if text:
            yield text


def _cmd_chat(args) -> int:
    from visionllm_edge.images import load_image

    image = load_image(args.image) if args.image else None
    pipe = _load_pipeline(args)
    history: list[tuple[str, str]] = []
    stdin = sys.stdin  # looked up per call so that a replaced sys.stdin (tests, wrappers) is honoured
    interactive = stdin.isatty()
    if interactive:
        print("visionllm-edge chat: type a prompt; 'exit' or end of input (Ctrl-D) ends the chat.")
    for prompt in _read_prompts(stdin, interactive):
        if not interactive:
            print(f"> {prompt}")  # piped prompts are not on the screen; echo them so the transcript reads
        result = None
        try:
            for piece in pipe.stream(
                image,
                prompt,
                regions=args.region or None,
                history=tuple(history),
                **_generation_kwargs(args),
            ):
                if isinstance(piece, str):
                    print(piece, end="", flush=True)
                else:
                    result = piece
        except ValueError as e:
            # A bad turn (e.g. a <region> count that does not match) ends that turn, not the conversation.
            print(f"\nvisionllm-edge: error: {e}", file=sys.stderr)
            continue
        print()
        _print_summary(result, indent="  ")
        if args.timings:
            _print_timings(result, indent="  ")
        history.append((prompt, result.text))
    return 0


def _size(n: int) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1024 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n} B"


def _spec_lines(specs) -> list[str]:
    """One line per tensor; per-layer tensors of one shape (`past_key.0..31`) collapse into one line."""
    groups: dict[tuple, list[int]] = {}
    order: list[tuple] = []
    for t in specs:
        m = re.fullmatch(r"(.*?)(\d+)", t.name)
        key = (
            (m.group(1), t.dtype, t.shape)
            if m and m.group(1).endswith((".", "_"))
            else (t.name, t.dtype, t.shape)
        )
        if key not in groups:
            groups[key] = []
            order.append(key)
        if m and key[0] == m.group(1):
            groups[key].append(int(m.group(2)))
    lines = []
    for key in order:
        name, dtype, shape = key
        layers = groups[key]
        if layers and len(layers) > 1:
            name = f"{name}{{{min(layers)}..{max(layers)}}}"
        elif layers:
            name = f"{name}{layers[0]}"
        dims = ", ".join(str(d) for d in shape)
        lines.append(f"{name} {dtype} [{dims}]")
    return lines


def _cmd_info(args) -> int:
    from visionllm_edge import contract
    from visionllm_edge.manifest import load_manifest

    m = load_manifest(args.artifact, verify_hashes=args.verify)
    print(f"artifact: {m.artifact_dir}")
    print(f"schema version {m.schema_version}; producer {m.producer.name} {m.producer.version}")
    if args.verify:
        print("file hashes: verified")
    mi = m.model
    print(
        f"model: {mi.name}: hidden {mi.hidden_size}, {mi.num_layers} layers, {mi.num_heads} heads "
        f"({mi.num_kv_heads} KV), head dim {mi.head_dim}, vocab {mi.vocab_size}, "
        f"max context {mi.max_context}, rope theta {mi.rope_theta:g}, RMS eps {mi.rms_norm_eps:g}"
    )
    sizes = {}
    for name, g in m.graphs.items():
        sizes[name] = g.size_bytes + sum(p.stat().st_size for p in g.external_data if p.exists())
    print(f"graphs: {len(m.graphs)}, {_size(sum(sizes.values()))} in all")
    for name, g in m.graphs.items():
        ext = f" (+{len(g.external_data)} external data)" if g.external_data else ""
        print(f"  {name}: {g.file}{ext}  {_size(sizes[name])}  {g.precision}  opset {g.opset}")
        for line in _spec_lines(g.inputs):
            print(f"    in  {line}")
        for line in _spec_lines(g.outputs):
            print(f"    out {line}")
    print("components: " + (", ".join(m.components) or "none"))
    decoders: dict[str, list[str]] = {}
    for kind, r in m.routing.items():
        decoders.setdefault(r.decoder, []).append(kind)
    if decoders:
        have = []
        for dec, kinds in decoders.items():
            graphs = contract.COMPONENT_GRAPHS.get("det" if dec == "object" else dec, ())
            missing = [g for g in graphs if g not in m.graphs]
            note = f" (missing {', '.join(missing)})" if missing else ""
            have.append(f"{dec} [{', '.join(kinds)}]{note}")
        print("decoders: " + "; ".join(have))
    else:
        print("decoders: none (text only)")
    print("special tokens: " + ", ".join(f"{t}={i}" for t, i in m.tokens.items()))
    print("routing:")
    for r in m.routing.values():
        print(f"  {r.token} (id {r.id}) -> {r.decoder} decoder, {r.queries} queries, table {r.table!r}")
    vpath = m.artifact_dir / contract.VALIDATION_FILE
    if not vpath.is_file():
        print(f"validation: none ({contract.VALIDATION_FILE} not found; exported with --no-validate?)")
        return 0
    try:
        report = json.loads(vpath.read_text())
        graphs = report.get("graphs", {})
        passed = report.get("passed")
    except (json.JSONDecodeError, AttributeError) as e:
        raise ValueError(f"{vpath}: not a validation report ({e})") from None
    print(f"validation: {'passed' if passed else 'FAILED'}")
    for name, g in graphs.items():
        outputs = g.get("outputs", {}) or {}
        worst = max(outputs.items(), key=lambda kv: kv[1].get("max_abs", 0.0), default=None)
        err = ""
        if worst is not None:
            max_rel = max(o.get("max_rel", 0.0) for o in outputs.values())
            err = f"  max abs {worst[1].get('max_abs', 0.0):.3g} ({worst[0]}), max rel {max_rel:.3g}"
        shapes = g.get("shapes") or []
        where = f"  on {', '.join(str(s) for s in shapes)}" if shapes else ""
        print(f"  {name}: {'passed' if g.get('passed') else 'FAILED'}{err}{where}")
    return 0


def _cmd_eval(args) -> int:
    from visionllm_edge.shapes.evaluate import run_evaluation

    run_evaluation(
        args.artifact,
        backend=args.backend,
        seed=args.seed,
        scenes=args.scenes,
        tasks=args.tasks,
        json_path=args.json,
        threads=args.threads,
    )
    return 0


def _cmd_export(args) -> int:
    from visionllm_edge.export.exporter import main_export

    return main_export(args)


def _cmd_bench(args) -> int:
    from visionllm_edge import bench

    return bench.main(args, _providers(args.providers))


def _cmd_demo(args) -> int:
    from visionllm_edge import demo

    if args.reference:
        demo.run_reference_demo(Path(args.out))
    else:
        demo.run_demo(args.out, artifact=args.artifact, seed=args.seed)
    return 0


def _cmd_triton_repo(args) -> int:
    from visionllm_edge.serving import repository

    out = repository.write_repository(
        args.artifact,
        args.out,
        instances=args.instances,
        threads=args.threads,
        providers=tuple(_providers(args.providers) or ()),
        copy_artifact=args.copy_artifact,
    )
    where = "copied into it" if args.copy_artifact else f"referenced at {Path(args.artifact).absolute()}"
    print(
        f"wrote {out}: models {repository.MODEL} and {repository.STREAM_MODEL}, {args.instances} instance(s) "
        f"each, the artifact {where}"
    )
    print(f"serve it with: tritonserver --model-repository {out}  (docs/serving.md)")
    return 0


def _cmd_serve(args) -> int:
    from visionllm_edge.serving.server import ServeOptions, Server

    options = ServeOptions(
        host=args.host,
        http_port=args.http_port,
        grpc_port=args.grpc_port,
        metrics_port=args.metrics_port,
        instances=args.instances,
        threads=args.threads,
    )
    Server(args.artifact, options).serve()
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
    exp.add_argument(
        "source",
        help="checkpoint folder (official layout), a configuration name (tiny-random, ...) or shapes-tiny "
        "(the bundled trained model)",
    )
    exp.add_argument("out_dir", help="artifact folder to create")
    exp.add_argument("--config", default=None, help="build this named configuration (seeded random weights)")
    exp.add_argument(
        "--components", default=None, help="comma-separated subset of vision,region,llm,det,pose,gen,edit"
    )
    exp.add_argument("--precision", choices=("fp32", "fp16"), default="fp32")
    exp.add_argument("--quantize", choices=("int8", "int4"), default=None)
    exp.add_argument("--max-context", type=int, default=None, help="cap on the LLM context (KV arena size)")
    exp.add_argument("--no-validate", action="store_true", help="skip the parity validation against PyTorch")
    exp.add_argument("--overwrite", action="store_true", help="replace an existing artifact folder")
    exp.set_defaults(func=_cmd_export)

    def runtime_options(p: argparse.ArgumentParser) -> None:
        p.add_argument("artifact", help="artifact folder written by 'visionllm-edge export'")
        p.add_argument(
            "--region",
            action="append",
            type=_parse_region,
            help="visual prompt: x,y or x0,y0,x1,y1 (repeatable)",
        )
        p.add_argument("--max-new-tokens", type=int, default=64)
        p.add_argument("--timings", action="store_true", help="print per-stage times in milliseconds")
        p.add_argument("--backend", choices=("onnxruntime", "tensorrt"), default="onnxruntime")
        p.add_argument(
            "--providers", default=None, help="ONNX Runtime providers, e.g. CUDAExecutionProvider,CPU..."
        )
        p.add_argument(
            "--threads", type=int, default=0, help="intra-op threads per graph (0: ONNX Runtime's)"
        )
        p.add_argument("--max-context", type=int, default=None, help="cap on the KV arena (tokens)")
        p.add_argument(
            "--fp16",
            action="store_true",
            help="--backend tensorrt: fp16 kernels (TensorRT 10's builder flag; TensorRT 11 needs an fp16 export)",
        )
        p.add_argument(
            "--engine-cache",
            default=None,
            metavar="DIR",
            help="--backend tensorrt: folder of the stamped engines (default: the artifact's engines/)",
        )
        p.add_argument("--device-id", type=int, default=0, help="CUDA device of the CUDA / TensorRT providers")
        p.add_argument("--seed", type=int, default=0)
        p.add_argument("--sample", action="store_true", help="sample instead of greedy decoding")
        p.add_argument("--temperature", type=float, default=1.0)
        p.add_argument("--top-k", type=int, default=0)
        p.add_argument("--top-p", type=float, default=1.0)
        p.add_argument("--repetition-penalty", type=float, default=1.0)

    run = sub.add_parser("run", help="run one request on an exported artifact (ONNX Runtime, no torch)")
    runtime_options(run)
    run.add_argument("--image", required=True, help="image file")
    run.add_argument("--prompt", required=True)
    run.add_argument("--answer-prefix", default=None, help="forced start of the answer, e.g. 'person[DET]'")
    run.add_argument("--json", default=None, help="write the result as JSON here")
    run.add_argument("--draw", default=None, help="write the image with the result drawn on it here (PNG)")
    run.set_defaults(func=_cmd_run)

    chat = sub.add_parser(
        "chat", help="multi-turn chat about one image; prompts from stdin, answers streamed"
    )
    runtime_options(chat)
    chat.add_argument("--image", default=None, help="image file (without one the chat is text only)")
    chat.set_defaults(func=_cmd_chat)

    info = sub.add_parser("info", help="what an artifact holds: graphs, model, tokens, routing, validation")
    info.add_argument("artifact", help="artifact folder written by 'visionllm-edge export'")
    info.add_argument(
        "--verify", action="store_true", help="also check every file's sha256 (slow on big models)"
    )
    info.set_defaults(func=_cmd_info)

    ev = sub.add_parser(
        "eval", help="score a shapes-world model on a held-out split (COCO AP, mIoU, REC, VQA, generation)"
    )
    ev.add_argument(
        "artifact",
        help="artifact folder; with --backend reference a checkpoint folder or 'shapes-tiny' (bundled)",
    )
    ev.add_argument("--seed", type=int, default=2024, help="seed of the split (default: held out)")
    ev.add_argument("--scenes", type=int, default=200, help="samples per task")
    ev.add_argument("--json", default=None, help="write the report as JSON here")
    ev.add_argument("--backend", choices=("onnxruntime", "reference"), default="onnxruntime")
    ev.add_argument(
        "--tasks",
        default=None,
        help="comma-separated subset of detect,segment,pose,ground,vqa,region_caption,caption,generate,edit",
    )
    ev.add_argument("--threads", type=int, default=0, help="intra-op threads per graph (0: ONNX Runtime's)")
    ev.set_defaults(func=_cmd_eval)

    bench = sub.add_parser(
        "bench",
        help="per-stage latency (min/median/p90/max), decode ms/token at KV lengths, memory and the "
        "measured hardware floors of an artifact",
    )
    bench.add_argument("artifact", help="artifact folder written by 'visionllm-edge export'")
    bench.add_argument(
        "--tasks",
        default=None,
        help="comma-separated subset of vqa,caption,detect,ground,segment,pose,generate,edit "
        "(default: all the artifact serves)",
    )
    bench.add_argument(
        "--past", default="128,512,2048", help="KV lengths to time decode at (comma-separated; '' for none)"
    )
    bench.add_argument("--warmup", type=int, default=1, help="untimed repetitions first (default 1)")
    bench.add_argument("--repeat", type=int, default=5, help="timed repetitions (default 5)")
    bench.add_argument(
        "--threads", type=int, default=0, help="intra-op threads per graph (0: ONNX Runtime's)"
    )
    bench.add_argument("--providers", default=None, help="ONNX Runtime providers, e.g. CPUExecutionProvider")
    bench.add_argument("--new-tokens", type=int, default=16, help="decode steps per request (default 16)")
    bench.add_argument(
        "--compare",
        choices=("reference",),
        default=None,
        help="also run the PyTorch reference on the same requests, interleaved (torch: the [export] extra)",
    )
    bench.add_argument(
        "--reference-source",
        default=None,
        help="the reference's weights: a checkpoint folder or a model name (default: the artifact's model)",
    )
    bench.add_argument(
        "--no-flops",
        dest="flops",
        action="store_false",
        help="skip the profiled FLOP pass (no compute floors for prefill, vision and the decoders)",
    )
    bench.add_argument("--json", default=None, help="write the run's record as JSON here")
    bench.add_argument("--md", default=None, help="write the markdown table here")
    bench.add_argument("--plot", default=None, help="draw each stage's ratio to its floor into this PNG")
    bench.add_argument("--quiet", action="store_true", help="no progress on stderr")
    bench.set_defaults(func=_cmd_bench)

    demo = sub.add_parser(
        "demo",
        help="the bundled shapes-tiny model through the runtime: one request of every kind on generated "
        "scenes (exported into the user's cache folder on the first run)",
    )
    demo.add_argument("--out", default="visionllm-edge-demo", help="folder for the pictures")
    demo.add_argument(
        "--artifact", default=None, help="use this exported artifact folder instead of the bundled model"
    )
    demo.add_argument("--seed", type=int, default=7, help="seed of the generated scenes (default 7)")
    demo.add_argument(
        "--reference",
        action="store_true",
        help="run the PyTorch reference on tiny-random instead (random weights: the loop, not the answers)",
    )
    demo.set_defaults(func=_cmd_demo)

    repo = sub.add_parser(
        "triton-repo",
        help="write a Triton model repository serving an artifact (Python backend; docs/serving.md)",
    )
    repo.add_argument("artifact", help="artifact folder written by 'visionllm-edge export'")
    repo.add_argument("out", help="repository folder to create (it must not exist, or be empty)")
    repo.add_argument(
        "--instances", type=int, default=1, help="model instances, each its own Pipeline (default 1)"
    )
    repo.add_argument(
        "--threads", type=int, default=0, help="intra-op threads per graph of each instance (0: all cores)"
    )
    repo.add_argument(
        "--providers", default=None, help="ONNX Runtime providers, e.g. CUDAExecutionProvider,CPU..."
    )
    where = repo.add_mutually_exclusive_group()
    where.add_argument(
        "--copy-artifact", action="store_true", help="copy the artifact into the repository (self-contained)"
    )
    where.add_argument(
        "--reference",
        dest="copy_artifact",
        action="store_false",
        help="name the artifact by its absolute path, which every server must see (the default)",
    )
    repo.set_defaults(func=_cmd_triton_repo)

    srv = sub.add_parser(
        "serve",
        help="serve an artifact on Triton Inference Server through PyTriton (HTTP, gRPC; docs/serving.md)",
    )
    srv.add_argument("artifact", help="artifact folder written by 'visionllm-edge export'")
    srv.add_argument("--host", default="127.0.0.1", help="address every endpoint binds (default loopback)")
    srv.add_argument("--http-port", type=int, default=8000, help="HTTP port (default 8000)")
    srv.add_argument("--grpc-port", type=int, default=8001, help="gRPC port (default 8001)")
    srv.add_argument("--metrics-port", type=int, default=8002, help="Prometheus metrics port (default 8002)")
    srv.add_argument(
        "--instances", type=int, default=1, help="model instances, each its own Pipeline (default 1)"
    )
    srv.add_argument(
        "--threads", type=int, default=0, help="intra-op threads per graph of each instance (0: all cores)"
    )
    srv.set_defaults(func=_cmd_serve)
    return parser


def _is_user_error(e: BaseException) -> bool:
    """Errors that a user's input caused (and whose message says what to fix): no traceback for these."""
    if isinstance(e, (ValueError, OSError)):  # ManifestError is a ValueError; FileNotFoundError an OSError
        return True
    # The engine module is imported only by runtime commands, and is then in sys.modules if it raised.
    engine = sys.modules.get("visionllm_edge.runtime.engine")
    return engine is not None and isinstance(e, engine.BackendUnavailableError)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except KeyboardInterrupt:
        print(file=sys.stderr)
        return 130
    except Exception as e:
        if not _is_user_error(e):
            raise
        print(f"visionllm-edge: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    raise SystemExit(main())
