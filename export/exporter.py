"""`visionllm-edge export`: the reference model to one artifact folder (docs/architecture.md §2).

Everything is written into a hidden partial folder beside the target (`.NAME.partial-XXXX`) and renamed into
place only when complete and valid; `manifest.json` is the last file written, so an interrupted export never
leaves a folder that looks like an artifact. Each component is exported by its registered exporter, checked
with `onnx.checker` and validated against the PyTorch reference on fresh random inputs at several shapes
(results in `validation.json`); the manifest is built here and checked with the runtime's own strict parser
before the rename.
"""

from __future__ import annotations

import gc
import json
import os
import shutil
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from visionllm_edge import __version__, contract
from visionllm_edge.export.checkpoint import BUNDLED_MODEL, load_reference, load_reference_parts
from visionllm_edge.export.model import VisionLLMv2
from visionllm_edge.export.onnx.base import (
    ExportSettings,
    export_graph,
    exporter_for,
    merge_external_data,
    validation_session,
)
from visionllm_edge.export.reference import PostProcessSettings
from visionllm_edge.export.tokenizer import ChatTokenizer

DEFAULT_COMPONENTS = tuple(contract.COMPONENT_GRAPHS)


class ExportValidationError(RuntimeError):
    """An exported graph disagrees with the reference; the message holds the per-output differences."""


@dataclass
class ExportReport:
    """What an export did: the folder, per-graph validation, sizes and timings (seconds)."""

    path: Path
    validation: dict
    sizes: dict[str, int]
    seconds: dict[str, float]


def _progress(label: str, enabled: bool):
    start = time.perf_counter()

    def done(detail: str = "") -> float:
        elapsed = time.perf_counter() - start
        if enabled:
            print(f"  [{label}] done in {elapsed:.1f} s {detail}".rstrip(), file=sys.stderr, flush=True)
        return elapsed

    if enabled:
        print(f"  [{label}] exporting ...", file=sys.stderr, flush=True)
    return done


def export(
    source: str | Path,
    out_dir: str | Path,
    *,
    components: tuple[str, ...] | list[str] | None = None,
    precision: str = "fp32",
    quantize: str | None = None,
    max_context: int | None = None,
    validate: bool | str = True,
    overwrite: bool = False,
    progress: bool = True,
    seed: int = 0,
    model: VisionLLMv2 | None = None,
    by_component: bool | None = None,
) -> ExportReport:
    """Exports a checkpoint folder or a named configuration to an artifact folder.

    Args:
        source: checkpoint folder (official layout), a configuration name (`tiny-random`, ...), or
            `shapes-tiny`: the bundled trained model (`resolve_source`).
        out_dir: the artifact folder to create.
        components: subset of `vision region llm det pose gen edit` (default: all the model has).
        precision: `fp32` or `fp16` (norms, softmax and deformable sampling stay fp32).
        quantize: None, `int8` (dynamic MatMul quantization of vision and LLM) or `int4` (LLM weights,
            MatMulNBits).
        max_context: cap on the LLM context (manifest; the runtime sizes its KV arena from it).
        validate: check every graph against the reference at every validation shape (True, the default),
            at its first shape only (`"quick"`: the demo's first-run export), or not at all (False).
        overwrite: replace an existing artifact folder (atomically, after the new one is complete).
        model: an already loaded reference model (skips loading `source`).
        by_component: load a checkpoint folder one component at a time (`load_reference_parts`: only the
            shards and weights that component needs, released before the next one), so that peak memory
            follows the largest component rather than the whole model. Default: on for a checkpoint folder
            when no `model` is given; a named configuration or a given `model` is exported from one model.
    """
    if precision not in ("fp32", "fp16"):
        raise ValueError(f"precision must be 'fp32' or 'fp16', got {precision!r}")
    if quantize not in (None, "int8", "int4"):
        raise ValueError(f"quantize must be None, 'int8' or 'int4', got {quantize!r}")
    out_dir = Path(out_dir)
    if out_dir.exists() and not overwrite:
        raise FileExistsError(f"{out_dir}: already exists (pass overwrite=True / --overwrite to replace it)")
    wanted = list(components or DEFAULT_COMPONENTS)
    for name in wanted:
        if name not in contract.COMPONENT_GRAPHS:
            raise ValueError(f"unknown component {name!r}; known: {', '.join(contract.COMPONENT_GRAPHS)}")
    if validate not in (True, False, "quick"):
        raise ValueError(f"validate must be True, False or 'quick', got {validate!r}")
    settings = ExportSettings(
        precision=precision,
        quantize=quantize,
        max_context=max_context,
        validate=bool(validate),
        seed=seed,
        validation_shapes=1 if validate == "quick" else None,
    )
    seconds: dict[str, float] = {}
    t0 = time.perf_counter()
    if model is None:
        source = resolve_source(source)
    if by_component is None:
        by_component = model is None and Path(source).exists()
    if by_component and model is not None:
        raise ValueError("by_component loads the checkpoint folder part by part; it cannot use a given model")
    if by_component:
        # Config, structure and tokenizer folder only (weights on the meta device): what the manifest, the
        # TensorRT report and the availability checks read. Each component loads its own weights below.
        model = load_reference_parts(source, [])
    elif model is None:
        model = load_reference(source)
    seconds["load"] = time.perf_counter() - t0
    tokenizer = ChatTokenizer.from_directory(model.tokenizer_dir)

    out_dir.parent.mkdir(parents=True, exist_ok=True)
    partial = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.partial-", dir=out_dir.parent))
    try:
        graphs_meta: dict[str, dict] = {}
        validation: dict = {"passed": True, "graphs": {}}
        extra_files: dict[str, dict] = {}
        component_facts: dict[str, dict] = {}
        embeddings_written = False
        for name in wanted:
            exporter = exporter_for(name)
            if not exporter.available(model):
                if components:
                    raise ValueError(f"component {name!r} was asked for but this model has none")
                continue
            done = _progress(name, progress)
            part = (
                _load_part(source, name, exporter.load_parts(), progress, exporter.load_dtype(settings))
                if by_component
                else model
            )
            _export_component(
                exporter,
                part,
                partial,
                settings,
                graphs_meta,
                extra_files,
                component_facts,
                validation,
            )
            if by_component:
                if name == "llm":  # the LLM's weights hold the token table: write the embeddings now
                    _write_embeddings(part, partial, precision)
                    embeddings_written = True
                del part
                _release_memory()
            seconds[name] = done()
        if not embeddings_written:
            if by_component:
                part = _load_part(source, "embeddings", progress=progress)
                _write_embeddings(part, partial, precision)
                del part
                _release_memory()
            else:
                _write_embeddings(model, partial, precision)
        _write_tokenizer(model, partial)
        (partial / contract.VALIDATION_FILE).write_text(json.dumps(validation, indent=2) + "\n")
        if validate and not validation["passed"]:
            raise ExportValidationError(_validation_summary(validation))
        from visionllm_edge.export.trt_report import write_trt_report

        write_trt_report(partial, graphs=graphs_meta, component_facts=component_facts, model=model)
        manifest = build_manifest_dict(
            model, tokenizer, graphs_meta, extra_files, component_facts, settings, partial
        )
        from visionllm_edge.manifest import validate_manifest_dict

        validate_manifest_dict(manifest, partial)
        (partial / contract.MANIFEST_FILE).write_text(json.dumps(manifest, indent=2) + "\n")
        _publishable_permissions(partial)
        if out_dir.exists():
            old = out_dir.with_name(f".{out_dir.name}.old-{os.getpid()}")
            os.replace(out_dir, old)
            os.replace(partial, out_dir)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(partial, out_dir)
    except BaseException:
        shutil.rmtree(partial, ignore_errors=True)
        raise
    sizes = {p.name: p.stat().st_size for p in out_dir.iterdir() if p.is_file()}
    seconds["total"] = time.perf_counter() - t0
    return ExportReport(out_dir, validation, sizes, seconds)


# --- pieces ------------------------------------------------------------------------------------------------


def resolve_source(source: str | Path) -> str | Path:
    """What `export` reads for SOURCE: `shapes-tiny` is the bundled checkpoint folder, the rest as given.

    The bundled model is exported as the checkpoint folder it is (component by component), from where
    `visionllm_edge.export.train.ship.bundled_path()` says (`$VLE_SHAPES_TINY` can point it elsewhere); a
    missing one raises `CheckpointError` saying so. A folder of that name in the working directory wins, as
    in `load_reference`.
    """
    if isinstance(source, str) and source == BUNDLED_MODEL and not Path(source).exists():
        from visionllm_edge.export.train.ship import require_bundled

        return require_bundled()
    return source


def _load_part(source, name: str, parts=None, progress: bool = False, dtype=None) -> VisionLLMv2:
    """The weights component `name` needs up front (`parts`, default `checkpoint.COMPONENT_PARTS[name]`;
    an exporter's `load_parts`), the rest of the model on meta.

    `dtype` is the exporter's `load_dtype` (float32 unless its graph uses the weights as they are).
    """
    import torch

    part = load_reference_parts(source, list(parts or [name]), dtype=dtype or torch.float32)
    if progress:
        modes = ", ".join(f"{shard} ({mode})" for shard, mode in part.shard_modes.items())
        print(
            f"  [{name}] loaded {', '.join(part.loaded_parts)} from {modes or 'no shard'}",
            file=sys.stderr,
            flush=True,
        )
    return part


def _release_memory() -> None:
    """Collects garbage and hands freed heap memory back to the system (glibc `malloc_trim`).

    Without the trim, the buffers of a finished ONNX serialisation or validation session stay in the
    process's heap (glibc keeps freed chunks below its 32 MB mmap threshold), and the next component's
    weights come on top of them.
    """
    gc.collect()
    if sys.platform.startswith("linux"):
        try:
            import ctypes

            ctypes.CDLL("libc.so.6").malloc_trim(0)
        except (OSError, AttributeError):  # not glibc (musl, ...): nothing to trim
            pass


def _export_component(
    exporter,
    model: VisionLLMv2,
    partial: Path,
    settings: ExportSettings,
    graphs_meta: dict,
    extra_files: dict,
    component_facts: dict,
    validation: dict,
) -> None:
    """Writes, records and (when asked) validates one component's graphs and extra files."""
    graphs = list(exporter.graphs(model, settings))
    while graphs:
        # One traced module alive at a time (an fp16 export holds a converted copy of the weights in it).
        graph = graphs.pop(0)
        path = partial / contract.GRAPHS[graph.name].file
        export_graph(graph, path, opset=settings.opset)
        if settings.quantize is not None:
            _quantize(graph.name, path, settings.quantize)
        graphs_meta[graph.name] = _graph_meta(graph, path, settings)
        del graph
        _release_memory()
    for logical, file in exporter.extra_files(model, partial).items():
        extra_files[logical] = {"file": Path(file).name, "sha256": _sha256(Path(file))}
    component_facts[exporter.name] = exporter.manifest_facts(model, settings)
    if settings.validate:
        rng = np.random.default_rng(settings.seed)
        cases = exporter.validation_cases(model, settings, rng)
        for graph_name, graph_cases in cases.items():
            if graph_name not in graphs_meta:
                continue
            result = _validate_graph(
                partial / graphs_meta[graph_name]["file"],
                graph_cases[: settings.validation_shapes],
                exporter,
                settings,
                graphs_meta[graph_name]["precision"],
            )
            validation["graphs"][graph_name] = result
            validation["passed"] = validation["passed"] and result["passed"]
        del cases
        _release_memory()


def _publishable_permissions(folder: Path) -> None:
    """mkdtemp makes a private (0700) folder; an artifact is meant to be read by other users and services."""
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(folder, 0o777 & ~umask)
    for path in folder.iterdir():
        if path.is_file():
            os.chmod(path, 0o666 & ~umask)


def _sha256(path: Path) -> str:
    from visionllm_edge.manifest import file_sha256

    return file_sha256(path)


def _quantize(graph_name: str, path: Path, mode: str) -> None:
    from visionllm_edge.export.onnx import quantize as q

    targets = {"int8": ("vision", "llm"), "int4": ("llm",)}[mode]
    if graph_name not in targets:
        return
    tmp = path.with_name(path.stem + f".{mode}.onnx")
    (q.quantize_int8 if mode == "int8" else q.quantize_int4)(path, tmp)
    data = path.with_name(path.name + ".data")
    if data.exists():
        data.unlink()
    tmp_data = tmp.with_name(tmp.name + ".data")
    if not tmp_data.exists():
        os.replace(tmp, path)
        return
    # A quantized 7B LLM is still over 2 GB and keeps external data, which the graph references by file
    # name: rewrite it under the artifact's names (streamed: the weights never enter memory whole) rather
    # than renaming the data file under the graph.
    merge_external_data(tmp, path)
    tmp.unlink()


_DTYPES = {1: "float32", 10: "float16", 7: "int64", 9: "bool", 6: "int32"}


def _graph_meta(graph, path: Path, settings: ExportSettings) -> dict:
    import onnx

    model = onnx.load(str(path), load_external_data=False)

    def io(values):
        out = []
        for v in values:
            t = v.type.tensor_type
            shape = [d.dim_param if d.dim_param else int(d.dim_value) for d in t.shape.dim]
            out.append({"name": v.name, "dtype": _DTYPES.get(t.elem_type, str(t.elem_type)), "shape": shape})
        return out

    external = sorted(
        {e.value for init in model.graph.initializer for e in init.external_data if e.key == "location"}
    )
    # The graph says what it holds: exporters that keep a graph in fp32 under --precision fp16 (decoders whose
    # sampling breaks in fp16) are labelled fp32, and validated at the fp32 tolerance.
    has_fp16 = any(init.data_type == onnx.TensorProto.FLOAT16 for init in model.graph.initializer)
    precision = "fp16" if has_fp16 else "fp32"
    if settings.quantize and graph.name in _quantized_graphs(settings):
        precision = settings.quantize
    return {
        "file": path.name,
        "sha256": _sha256(path),
        "size_bytes": path.stat().st_size,  # the .onnx file alone; external data is listed beside it
        "external_data": external,
        "inputs": io(model.graph.input),
        "outputs": io(model.graph.output),
        "opset": int(next(o.version for o in model.opset_import if o.domain in ("", "ai.onnx"))),
        "precision": precision,
        "facts": graph.facts,
    }


def _quantized_graphs(settings: ExportSettings) -> tuple[str, ...]:
    return {"int8": ("vision", "llm"), "int4": ("llm",)}.get(settings.quantize or "", ())


def _validate_graph(path: Path, cases, exporter, settings: ExportSettings, precision: str) -> dict:
    import onnx

    onnx.checker.check_model(str(path), full_check=True)
    quantized = precision in ("int8", "int4")
    fp16 = precision == "fp16"
    atol = rtol = exporter.fp16_tolerance if fp16 else exporter.atol
    if not fp16:
        rtol = exporter.rtol
    result = {"passed": True, "shapes": [], "outputs": {}}
    # One session for all the cases, holding the weights about once (a 7B graph is mapped, not copied).
    session = validation_session(path)
    names = [o.name for o in session.get_outputs()]
    for case in cases:
        got = dict(zip(names, session.run(names, case.inputs)))
        result["shapes"].append(case.label)
        for name, want in case.expected.items():
            if name not in got:
                raise ExportValidationError(f"{path.name}: output {name!r} missing from the exported graph")
            g = got[name].astype(np.float64) if got[name].dtype.kind == "f" else got[name]
            m = contract.compare(g, want, atol=atol, rtol=rtol)
            finite = np.isfinite(want) if want.dtype.kind == "f" else np.ones(want.shape, bool)
            diff = (
                np.abs(g[finite].astype(np.float64) - want[finite].astype(np.float64))
                if finite.any()
                else np.zeros(1)
            )
            rel = diff / np.maximum(np.abs(want[finite].astype(np.float64)), 1e-6) if finite.any() else diff
            entry = result["outputs"].setdefault(name, {"max_abs": 0.0, "max_rel": 0.0})
            entry["max_abs"] = max(entry["max_abs"], float(diff.max()) if diff.size else 0.0)
            entry["max_rel"] = max(entry["max_rel"], float(rel.max()) if rel.size else 0.0)
            if m is not None and not quantized:
                result["passed"] = False
                entry["failure"] = f"{case.label}: {m}"
    if quantized:
        # Quantized graphs are measured, not held to the fp32 tolerance; their error is reported.
        result["quantized"] = settings.quantize
    return result


def _validation_summary(validation: dict) -> str:
    lines = ["exported graphs disagree with the PyTorch reference:"]
    for name, g in validation["graphs"].items():
        for out, e in g["outputs"].items():
            if "failure" in e:
                lines.append(f"  {name}.{out}: {e['failure']}")
    return "\n".join(lines)


def _write_embeddings(model: VisionLLMv2, out: Path, precision: str) -> None:
    from safetensors.numpy import save_file

    dtype = np.float16 if precision == "fp16" else np.float32
    tensors = {"token_embeddings": model.llm.model.embed_tokens.weight.detach().float().numpy().astype(dtype)}
    for table in ("det", "pose", "gen", "edit"):
        weight = getattr(model, f"emb_embeddings_{table}").weight
        tensors[f"queries.{table}"] = weight.detach().float().numpy().astype(dtype)
    save_file(tensors, str(out / contract.EMBEDDINGS_FILE))


def _write_tokenizer(model: VisionLLMv2, out: Path) -> None:
    """`tokenizer.json` (added tokens, settings) and `tokenizer.model` (the slow tokenizer's SentencePiece
    model, its settings baked in), each through a temporary file and a rename, checked before renaming."""
    from visionllm_edge.export.tokenizer_convert import convert_tokenizer

    convert_tokenizer(
        model.tokenizer_dir,
        out / contract.TOKENIZER_FILE,
        sentencepiece_path=out / contract.SENTENCEPIECE_FILE,
    )


def build_manifest_dict(
    model: VisionLLMv2,
    tokenizer: ChatTokenizer,
    graphs: dict,
    extra_files: dict,
    component_facts: dict,
    settings: ExportSettings,
    folder: Path,
) -> dict:
    """The manifest of docs/architecture.md §2 for what was written into `folder`."""
    from visionllm_edge.export import preprocess as pp
    from visionllm_edge.manifest import file_entry

    cfg = model.config
    llm = cfg.llm
    tokens = {t: tokenizer.token_id(t) for t in (*contract.ADDED_TOKENS, "<s>", "</s>", "<unk>")}
    routing = {}
    for token, kind in contract.ROUTING_TOKENS.items():
        routing[kind] = {
            "token": token,
            "id": tokens[token],
            "decoder": contract.DECODER_OF_KIND[kind],
            "queries": model.num_queries(kind),
            "table": contract.QUERY_TABLE[kind],
        }
    post = PostProcessSettings.for_model(model.config)
    for name, facts in component_facts.items():
        for graph_name in contract.COMPONENT_GRAPHS[name]:
            if graph_name in graphs:
                graphs[graph_name]["facts"] = {**facts, **graphs[graph_name]["facts"]}
    return {
        "schema_version": contract.MANIFEST_SCHEMA_VERSION,
        "producer": {"name": "visionllm-edge", "version": __version__},
        "model": {
            "name": str(cfg.official.get("_name_or_path") or cfg.source),
            "hidden_size": llm.hidden_size,
            "num_layers": llm.num_hidden_layers,
            "num_heads": llm.num_attention_heads,
            "num_kv_heads": llm.num_key_value_heads,
            "head_dim": llm.head_dim,
            "vocab_size": llm.vocab_size,
            "max_context": int(settings.max_context or llm.max_position_embeddings),
            "rope_theta": float(llm.rope_theta),
            "rms_norm_eps": float(llm.rms_norm_eps),
        },
        "graphs": graphs,
        "tokens": tokens,
        "routing": routing,
        "embeddings": {
            "file": contract.EMBEDDINGS_FILE,
            "sha256": _sha256(folder / contract.EMBEDDINGS_FILE),
            "token_table": "token_embeddings",
            "query_tables": {t: f"queries.{t}" for t in ("det", "pose", "gen", "edit")},
        },
        "tokenizer": {
            "file": contract.TOKENIZER_FILE,
            "sha256": _sha256(folder / contract.TOKENIZER_FILE),
            "sentencepiece": file_entry(folder, contract.SENTENCEPIECE_FILE),
            "legacy": tokenizer.legacy,
            "add_prefix_space": tokenizer.add_prefix_space,
        },
        "preprocess": {
            "clip": {
                "tile_size": cfg.image_size,
                "max_tiles": cfg.max_tiles,
                "patches_per_tile": cfg.patches_per_tile,
                "mean": list(pp.CLIP_MEAN),
                "std": list(pp.CLIP_STD),
                "resample": "bicubic",
                "candidate_grids": [list(g) for g in contract.anyres_candidates(cfg.max_tiles)],
            },
            "detection": {
                "short_side": cfg.det_short_side,
                "max_long_side": cfg.det_max_long_side,
                "size_divisibility": 32,
                "mean": list(pp.IMAGENET_MEAN),
                "std": list(pp.IMAGENET_STD),
                "resample": "bilinear",
            },
            "diffusion": {
                "gen_image_size": cfg.image_size_for("gen"),
                "edit_image_size": cfg.image_size_for("edit"),
            },
        },
        "postprocess": {
            "det_top_k": post.det_top_k,
            "det_score_threshold": post.det_score_threshold,
            "nms_iou": post.nms_iou,
            "mask_threshold": post.mask_threshold,
            "seg_score_threshold": post.seg_score_threshold,
            "pose_top_k": post.pose_top_k,
            "pose_score_threshold": post.pose_score_threshold,
        },
        "generation": {
            "max_new_tokens": 64,
            "bos_id": tokenizer.bos_id,
            "eos_id": tokenizer.eos_id,
            "diffusion_steps": post.gen_steps,
            "guidance_scale": post.guidance_scale,
            "image_guidance_scale": post.image_guidance_scale,
        },
        "chat_template": {
            "system": contract.SYSTEM_PROMPT,
            "roles": list(contract.ROLES),
            "sep": contract.SEP,
            "sep2": contract.SEP2,
            "image_token": contract.IMAGE_TOKEN,
            "input_markers": list(contract.INPUT_MARKERS),
        },
        "extra_files": extra_files,
    }


def main_export(args) -> int:
    """CLI entry (`visionllm-edge export`)."""
    components = tuple(c.strip() for c in args.components.split(",")) if args.components else None
    report = export(
        args.config or args.source,
        args.out_dir,
        components=components,
        precision=args.precision,
        quantize=args.quantize,
        max_context=args.max_context,
        validate=not args.no_validate,
        overwrite=args.overwrite,
    )
    print(f"wrote {report.path}")
    for name, size in sorted(report.sizes.items()):
        print(f"  {name:<28} {size / 1e6:10.2f} MB")
    if report.validation["graphs"]:
        print("validation (max abs error per output):")
        for graph, g in report.validation["graphs"].items():
            worst = max((e["max_abs"] for e in g["outputs"].values()), default=0.0)
            verdict = "passed" if g["passed"] else "FAILED"
            print(f"  {graph:<18} {verdict}  shapes={len(g['shapes'])}  max_abs={worst:.2e}")
    print(f"total {report.seconds['total']:.1f} s")
    return 0
