"""The exporter interface every component implements, and the registry that finds them by name.

An exporter knows, for its component: the graphs it writes (names from `contract.GRAPHS`), how to build a
torch module whose forward is exactly the graph, the dynamic axes, sample inputs at several shapes for
validation, the reference outputs for those inputs (computed with the reference model, not with the
export module), and the tolerance. The orchestration (`visionllm_edge.export.exporter`) writes, validates
and records them; no `if component == ...` chains anywhere.
"""

from __future__ import annotations

import os
import shutil
import tempfile
import warnings
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from visionllm_edge import contract

DEFAULT_OPSET = 17


@dataclass
class ExportSettings:
    """What the user asked for. `max_context` caps the LLM's position range (and the runtime's KV arena)."""

    precision: str = "fp32"  # fp32 | fp16
    quantize: str | None = None  # None | int8 | int4
    max_context: int | None = None
    opset: int = DEFAULT_OPSET
    validate: bool = True
    seed: int = 0
    #: Validate each graph at its first shape only (the demo's first-run export); None: every shape.
    validation_shapes: int | None = None


@dataclass
class GraphExport:
    """One graph to write: the module to trace and how.

    Attributes:
        name: graph name (a key of `contract.GRAPHS`).
        module: `torch.nn.Module` whose `forward(*inputs)` takes the graph inputs in `input_names` order.
        example_inputs: tensors used for tracing, in `input_names` order.
        input_names / output_names: expanded names (per-layer templates already expanded).
        dynamic_axes: `{name: {axis: symbol}}` as `torch.onnx.export` takes it.
        facts: extra manifest facts for this graph (static sizes, buckets, ...).
        pieces: instead of `module`, a graph traced in consecutive pieces and joined (`export_graph`): each
            item is called for a context manager that gives the piece's own `GraphExport` (its weights need
            live only inside it). A piece hands its running state to the next through an output named
            `PIECE_OUT` and an input named `PIECE_IN`; every other name a piece shares with the graph's
            `input_names` / `output_names` is that input or output. `module` and `example_inputs` are then
            unused.
    """

    name: str
    module: torch.nn.Module | None
    example_inputs: tuple[torch.Tensor, ...]
    input_names: list[str]
    output_names: list[str]
    dynamic_axes: dict[str, dict[int, str]]
    facts: dict = field(default_factory=dict)
    pieces: list[Callable[[], AbstractContextManager[GraphExport]]] | None = None


#: The names of the link between two consecutive pieces of a graph traced in pieces (`GraphExport.pieces`).
PIECE_OUT = "piece_out"
PIECE_IN = "piece_in"


@dataclass
class ValidationCase:
    """Inputs for one validated shape and the reference outputs they must give."""

    label: str  # e.g. "T=3" or "S=5,P=0"
    inputs: dict[str, np.ndarray]
    expected: dict[str, np.ndarray]


class ComponentExporter(ABC):
    """One exported component (`vision`, `region`, `llm`, `det`, `pose`, `gen`, `edit`)."""

    #: component name, as `--components` spells it
    name: str = ""
    #: parity tolerance in fp32 (docs/architecture.md §7: 1e-4); fp16 graphs use `fp16_tolerance`
    atol: float = 1e-4
    rtol: float = 1e-4
    fp16_tolerance: float = 1e-2

    def available(self, model) -> bool:
        """Whether the model has this component (e.g. a checkpoint without UniPose has no `pose`)."""
        return True

    @abstractmethod
    def graphs(self, model, settings: ExportSettings) -> list[GraphExport]:
        """The graphs to write, with modules ready to trace."""

    @abstractmethod
    def validation_cases(
        self, model, settings: ExportSettings, rng: np.random.Generator
    ) -> dict[str, list[ValidationCase]]:
        """Per graph name, fresh random inputs at >= 3 shapes and the reference outputs for them."""

    def manifest_facts(self, model, settings: ExportSettings) -> dict:
        """Component-level facts for the manifest (beyond the per-graph ones)."""
        return {}

    def extra_files(self, model, out_dir: Path) -> dict[str, Path]:
        """Files besides the graphs (e.g. a precomputed unconditional embedding), by logical name."""
        return {}

    def load_parts(self) -> tuple[str, ...]:
        """What a component-by-component export loads for this component before `graphs` (parts or module
        paths as `checkpoint.load_reference_parts` takes them): by default the component's own part."""
        return (self.name,)

    def load_dtype(self, settings: ExportSettings) -> torch.dtype:
        """The dtype this component's weights are loaded in when it is exported from a checkpoint folder part
        by part. float32 (the reference's) by default; an exporter whose graph uses the weights as they are
        in its own precision can ask for that, so that no converted copy sits beside them."""
        return torch.float32


_REGISTRY: dict[str, type[ComponentExporter]] = {}


def register(cls: type[ComponentExporter]) -> type[ComponentExporter]:
    """Class decorator: makes an exporter findable by its `name`."""
    if not cls.name or cls.name not in contract.COMPONENT_GRAPHS:
        raise ValueError(f"exporter {cls.__name__} has unknown component name {cls.name!r}")
    if cls.name in _REGISTRY:
        raise ValueError(f"two exporters for component {cls.name!r}")
    _REGISTRY[cls.name] = cls
    return cls


def exporter_for(name: str) -> ComponentExporter:
    """The registered exporter of a component, imported on first use."""
    import importlib

    if name not in contract.COMPONENT_GRAPHS:
        raise ValueError(f"unknown component {name!r}; known: {', '.join(contract.COMPONENT_GRAPHS)}")
    if name not in _REGISTRY:
        module = {
            "gen": "diffusion",
            "edit": "diffusion",
            "det": "decoders",
            "pose": "decoders",
            "vision": "vision",
            "region": "vision",
            "llm": "llm",
        }[name]
        importlib.import_module(f"visionllm_edge.export.onnx.{module}")
    return _REGISTRY[name]()


#: Parameter bytes above which `export_graph` writes external data by default: protobuf's 2 GB limit on one
#: file, less a margin for the graph itself.
EXTERNAL_DATA_PARAM_BYTES = (1 << 31) - (64 << 20)
#: Tensors smaller than this stay inside the `.onnx` file of a graph written with external data (the
#: `size_threshold` of `onnx.save_model`).
EXTERNAL_DATA_THRESHOLD = 1024
#: Each tensor of an external data file starts at a multiple of this (a page: ONNX Runtime maps the file
#: and reads a page-aligned tensor in place).
EXTERNAL_DATA_ALIGNMENT = 4096
#: Bytes moved per read while merging external data: memory stays at one chunk whatever the weights weigh.
_COPY_CHUNK = 16 << 20


def export_graph(
    graph: GraphExport, path: Path, opset: int = DEFAULT_OPSET, external_data: bool | None = None
) -> None:
    """Traces `graph.module` to `path` (TorchScript exporter).

    A graph whose weights weigh over `EXTERNAL_DATA_PARAM_BYTES` (or any graph, with `external_data=True`)
    keeps them in one external data file, `path.name + ".data"`, beside it; a smaller one is one `.onnx` file
    as torch wrote it (`external_data=False` insists on that). Over 2 GB, `torch.onnx.export` writes one file
    per weight, named after the initializer: the export runs in a private scratch folder beside `path`, so
    those files can never overwrite other files of the folder, and `merge_external_data` streams them into
    the one data file (the weights never enter a `ModelProto`). Nothing of the scratch folder is left.

    A graph given in pieces (`GraphExport.pieces`) is traced one piece at a time into the scratch folder,
    each with its weights in its own data file, the pieces are joined (`join_pieces`) and their weights
    streamed into the one data file; a single piece is written as the whole graph would be.
    """
    if graph.pieces is not None:
        _export_pieces(graph, path, opset, external_data)
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    scratch = Path(tempfile.mkdtemp(prefix=f".{path.name}.export-", dir=path.parent))
    try:
        traced = scratch / path.name
        with torch.no_grad(), warnings.catch_warnings():
            # The TorchScript exporter warns about every F.pad it cannot constant-fold; the graph is correct,
            # and the warning would fail any caller that runs with warnings as errors.
            warnings.filterwarnings("ignore", message="Constant folding - Only steps=1", category=UserWarning)
            torch.onnx.export(
                graph.module.eval(),
                graph.example_inputs,
                str(traced),
                input_names=graph.input_names,
                output_names=graph.output_names,
                dynamic_axes=graph.dynamic_axes,
                opset_version=opset,
                do_constant_folding=True,
                dynamo=False,
            )
        # torch writes per-weight files only when the graph is over protobuf's limit.
        torch_external = any(p.name != traced.name for p in scratch.iterdir())
        if external_data is None:
            size = sum(p.numel() * p.element_size() for p in graph.module.parameters())
            external_data = torch_external or size > EXTERNAL_DATA_PARAM_BYTES
        if external_data:
            merge_external_data(traced, path)
        elif torch_external:
            raise ValueError(
                f"{path.name}: graph {graph.name!r} is over protobuf's 2 GB limit and cannot be written as "
                "one file (external_data=False)"
            )
        else:
            os.replace(traced, path)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


def _export_pieces(graph: GraphExport, path: Path, opset: int, external_data: bool | None) -> None:
    if len(graph.pieces) == 1:
        with graph.pieces[0]() as piece:
            export_graph(piece, path, opset=opset, external_data=external_data)
        return
    if external_data is False:
        raise ValueError(f"{path.name}: graph {graph.name!r} is traced in pieces and keeps external data")
    path.parent.mkdir(parents=True, exist_ok=True)
    scratch = Path(tempfile.mkdtemp(prefix=f".{path.name}.pieces-", dir=path.parent))
    try:
        files = []
        for j, make in enumerate(graph.pieces):
            files.append(scratch / f"piece{j}.onnx")
            with make() as piece:
                export_graph(piece, files[-1], opset=opset, external_data=True)
            del piece
        joined = scratch / path.name
        join_pieces(files, joined, graph.input_names, graph.output_names)
        merge_external_data(joined, path)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


def join_pieces(pieces: list[Path], out: Path, input_names: list[str], output_names: list[str]) -> None:
    """Joins graphs traced in pieces into one graph (`GraphExport.pieces`), without loading their weights.

    Piece j's nodes, initializers and intermediate values are renamed under `piece{j}/`, except the graph's
    inputs and outputs (`input_names` / `output_names`, shared by the pieces that use them) and the link:
    piece j's `PIECE_OUT` becomes piece j+1's `PIECE_IN`. External tensors keep pointing at the pieces' data
    files (all beside `out`); `merge_external_data` gathers them next.

    Raises:
        ValueError: a piece with a subgraph, a link without both ends, or a graph input / output that no
            piece has (the message names it).
    """
    import onnx

    public = set(input_names) | set(output_names)
    models = [onnx.load(str(p), load_external_data=False) for p in pieces]
    joined = onnx.GraphProto(name=models[0].graph.name)
    ends: dict[str, object] = {}
    last = len(models) - 1
    for j, model in enumerate(models):
        g = model.graph
        names = {v.name for v in (*g.input, *g.output)}
        if (PIECE_IN in names) != (j > 0) or (PIECE_OUT in names) != (j < last):
            raise ValueError(
                f"{pieces[j].name}: piece {j} of {last + 1} must take {PIECE_IN!r} exactly when it is not "
                f"the first and give {PIECE_OUT!r} exactly when it is not the last (it has: {sorted(names)})"
            )

        def rename(name: str, j: int = j) -> str:
            if not name or name in public:
                return name
            if name == PIECE_IN:
                return f"piece{j - 1}/{PIECE_OUT}"
            return f"piece{j}/{name}"

        for node in g.node:
            if any(a.HasField("g") or len(a.graphs) for a in node.attribute):
                raise ValueError(
                    f"{pieces[j].name}: node '{node.name}' has a subgraph, which join_pieces does not rename"
                )
            node.input[:] = [rename(n) for n in node.input]
            node.output[:] = [rename(n) for n in node.output]
            node.name = f"piece{j}/{node.name}"
        for tensor in g.initializer:
            tensor.name = rename(tensor.name)
        for value in (*g.value_info, *g.input, *g.output):
            value.name = rename(value.name)
            if value.name in public:
                ends.setdefault(value.name, value)
        joined.node.extend(g.node)
        joined.initializer.extend(g.initializer)
        joined.value_info.extend(g.value_info)
        joined.value_info.extend(v for v in g.output if v.name not in public)
    for kind, wanted, field_ in (
        ("input", input_names, joined.input),
        ("output", output_names, joined.output),
    ):
        missing = [name for name in wanted if name not in ends]
        if missing:
            raise ValueError(f"{out.name}: no piece has the graph {kind}(s) {missing}")
        field_.extend(ends[name] for name in wanted)
    first = models[0]
    merged = onnx.helper.make_model(
        joined,
        opset_imports=first.opset_import,
        producer_name=first.producer_name,
        ir_version=first.ir_version,
    )
    merged.producer_version = first.producer_version
    tmp = out.with_name(f".{out.name}.tmp-{os.getpid()}")
    tmp.write_bytes(merged.SerializeToString())
    os.replace(tmp, out)


def _graph_tensors(graph) -> Iterator[tuple[object, bool]]:
    """Every tensor of a graph and its subgraphs, with whether it is an initializer (else an attribute)."""
    for tensor in graph.initializer:
        yield tensor, True
    for node in graph.node:
        for attr in node.attribute:
            if attr.HasField("t"):
                yield attr.t, False
            for tensor in attr.tensors:
                yield tensor, False
            if attr.HasField("g"):
                yield from _graph_tensors(attr.g)
            for sub in attr.graphs:
                yield from _graph_tensors(sub)


def merge_external_data(
    src: Path,
    dst: Path,
    *,
    threshold: int = EXTERNAL_DATA_THRESHOLD,
    alignment: int = EXTERNAL_DATA_ALIGNMENT,
) -> Path:
    """Writes graph `src` as `dst` plus one external data file `dst.name + ".data"`, by streaming copy.

    `src` is read without its external data (`onnx.load(load_external_data=False)`). Each initializer of at
    least `threshold` bytes is copied, in chunks, from wherever `src` keeps it (an external file beside it,
    whole or at an offset, as `torch.onnx.export` and `onnx.save_model` write them, or inline) into the data
    file at an offset that is a multiple of `alignment`, and its `location` / `offset` / `length` entries are
    rewritten; smaller external tensors come back inline, as `onnx.save_model(size_threshold=...)` keeps them.
    Attribute tensors stay where they are, except external ones, which are merged too. Memory stays at one
    chunk plus the graph without its weights.

    The external files `src` names are deleted as soon as their last tensor is copied (disk then holds about
    one copy of the weights at a time; after an error, `src` may have lost some); `src` itself is left to the
    caller. `dst` may replace `src`: both
    files are written under temporary names and renamed into place at the end.

    Returns:
        The data file's path.

    Raises:
        ValueError: an external file that is missing, too short for a tensor, or outside `src`'s folder (the
            message names the graph, the tensor and the file).
    """
    import onnx
    from onnx import TensorProto

    src, dst = Path(src), Path(dst)
    if alignment < 1 or threshold < 0:
        raise ValueError(f"alignment must be >= 1 and threshold >= 0, got {alignment} and {threshold}")
    model = onnx.load(str(src), load_external_data=False)
    base = src.parent.resolve()
    tensors = list(_graph_tensors(model.graph))
    plan = []  # (tensor, source file or None for inline, offset, length, goes to the data file)
    uses: dict[Path, int] = {}
    for tensor, is_initializer in tensors:
        if tensor.data_location == TensorProto.EXTERNAL:
            entries = {e.key: e.value for e in tensor.external_data}
            location = entries.get("location", "")
            file = (base / location).resolve()
            if not location or Path(location).is_absolute() or base not in file.parents:
                raise ValueError(
                    f"{src}: tensor '{tensor.name}' names external file {location!r}, which is not a file "
                    f"inside {base}"
                )
            if not file.is_file():
                raise ValueError(
                    f"{src}: tensor '{tensor.name}' needs external file '{file}', which is missing"
                )
            offset = int(entries.get("offset", 0))
            size = file.stat().st_size
            length = int(entries["length"]) if "length" in entries else size - offset
            if offset < 0 or length < 0 or offset + length > size:
                raise ValueError(
                    f"{src}: tensor '{tensor.name}' {list(tensor.dims)} needs bytes "
                    f"[{offset}, {offset + length}) of '{file}', which holds {size} bytes"
                )
            plan.append((tensor, file, offset, length, length >= threshold))
            uses[file] = uses.get(file, 0) + 1
        elif is_initializer and tensor.HasField("raw_data") and len(tensor.raw_data) >= threshold:
            plan.append((tensor, None, 0, len(tensor.raw_data), True))

    data_path = dst.with_name(dst.name + ".data")
    tmp_data = dst.with_name(f".{data_path.name}.tmp-{os.getpid()}")
    tmp_graph = dst.with_name(f".{dst.name}.tmp-{os.getpid()}")
    buffer = bytearray(min(_COPY_CHUNK, max((length for *_, length, _ in plan), default=0)) or 1)
    try:
        with open(tmp_data, "wb") as out:
            for tensor, file, offset, length, external in plan:
                if file is None:
                    data = memoryview(tensor.raw_data)
                    position = _align(out, alignment)
                    for start in range(0, length, len(buffer)):
                        out.write(data[start : start + len(buffer)])
                    tensor.ClearField("raw_data")
                else:
                    with open(file, "rb") as f:
                        f.seek(offset)
                        if external:
                            position = _align(out, alignment)
                            _copy(f, out, length, buffer, file)
                        else:
                            tensor.raw_data = f.read(length)
                    uses[file] -= 1
                    if uses[file] == 0:
                        file.unlink()
                del tensor.external_data[:]
                if external:
                    tensor.data_location = TensorProto.EXTERNAL
                    fields = {"location": data_path.name, "offset": position, "length": length}
                    for key, value in fields.items():
                        entry = tensor.external_data.add()
                        entry.key, entry.value = key, str(value)
                else:
                    tensor.data_location = TensorProto.DEFAULT
        tmp_graph.write_bytes(model.SerializeToString())
        os.replace(tmp_data, data_path)
        os.replace(tmp_graph, dst)
    finally:
        tmp_data.unlink(missing_ok=True)
        tmp_graph.unlink(missing_ok=True)
    return data_path


def _align(out, alignment: int) -> int:
    """Pads `out` with zeros to the next multiple of `alignment`; returns the new position."""
    position = out.tell()
    pad = -position % alignment
    if pad:
        out.write(bytes(pad))
    return position + pad


def _copy(f, out, length: int, buffer: bytearray, file: Path) -> None:
    """Copies `length` bytes from `f` to `out` through `buffer`."""
    view = memoryview(buffer)
    left = length
    while left:
        n = f.readinto(view[: min(left, len(view))])
        if not n:
            raise ValueError(f"{file}: ended {left} bytes early while copying external data")
        out.write(view[:n])
        left -= n


def validation_session(path: Path, providers=("CPUExecutionProvider",)):
    """An ONNX Runtime session that holds a graph's weights about once, for validating large graphs.

    ONNX Runtime maps a graph's external data; with its default options a CPU session then adds copies: the
    float32 Casts it inserts before float16 MatMuls (no float16 MatMul on x86) are constant-folded into
    float32 copies of every weight, and MatMul weights are pre-packed into another. Here: basic
    optimizations only (no Cast folding), no pre-packing, no CPU arena (freed buffers go back to the
    system), and the priority-based node order, which runs each inserted Cast just before its consumer
    rather than all of them first. A 7B float16 graph then costs its mapped weights plus one weight in
    float32, instead of twice its float32 size. The results are the graph's own; only speed differs.
    """
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_BASIC
    opts.execution_order = ort.ExecutionOrder.PRIORITY_BASED
    opts.enable_cpu_mem_arena = False
    opts.add_session_config_entry("session.disable_prepacking", "1")
    return ort.InferenceSession(str(path), opts, providers=list(providers))


def run_onnx(
    path: Path, inputs: dict[str, np.ndarray], providers=("CPUExecutionProvider",)
) -> dict[str, np.ndarray]:
    """Runs a graph with ONNX Runtime on numpy inputs; outputs by name."""
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    sess = ort.InferenceSession(str(path), opts, providers=list(providers))
    names = [o.name for o in sess.get_outputs()]
    return dict(zip(names, sess.run(names, inputs)))
