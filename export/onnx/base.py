"""The exporter interface every component implements, and the registry that finds them by name.

An exporter knows, for its component: the graphs it writes (names from `contract.GRAPHS`), how to build a
torch module whose forward is exactly the graph, the dynamic axes, sample inputs at several shapes for
validation, the reference outputs for those inputs (computed with the reference model, not with the
export module), and the tolerance. The orchestration (`visionllm_edge.export.exporter`) writes, validates
and records them; no `if component == ...` chains anywhere.
"""

from __future__ import annotations

import warnings
from abc import ABC, abstractmethod
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
    """

    name: str
    module: torch.nn.Module
    example_inputs: tuple[torch.Tensor, ...]
    input_names: list[str]
    output_names: list[str]
    dynamic_axes: dict[str, dict[int, str]]
    facts: dict = field(default_factory=dict)


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
    #: parity tolerance in fp32 (DESIGN.md §7: 1e-4); fp16 graphs use `fp16_tolerance`
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


def export_graph(
    graph: GraphExport, path: Path, opset: int = DEFAULT_OPSET, external_data: bool | None = None
) -> None:
    """Traces `graph.module` to `path` (TorchScript exporter; weights over 2 GB go to external data)."""
    import onnx

    path.parent.mkdir(parents=True, exist_ok=True)
    with torch.no_grad(), warnings.catch_warnings():
        # The TorchScript exporter warns about every F.pad it cannot constant-fold; the graph is correct, and
        # the warning would fail any caller that runs with warnings as errors.
        warnings.filterwarnings("ignore", message="Constant folding - Only steps=1", category=UserWarning)
        torch.onnx.export(
            graph.module.eval(),
            graph.example_inputs,
            str(path),
            input_names=graph.input_names,
            output_names=graph.output_names,
            dynamic_axes=graph.dynamic_axes,
            opset_version=opset,
            do_constant_folding=True,
            dynamo=False,
        )
    size = sum(p.numel() * p.element_size() for p in graph.module.parameters())
    if external_data or (external_data is None and size > (1 << 31) - (64 << 20)):
        model = onnx.load(str(path), load_external_data=True)
        onnx.save_model(
            model,
            str(path),
            save_as_external_data=True,
            all_tensors_to_one_file=True,
            location=path.name + ".data",
            size_threshold=1024,
        )


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
