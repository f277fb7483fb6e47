"""Engines: one object per exported graph that runs it. No torch.

`OnnxRuntimeEngine` wraps one ONNX Runtime session. Besides the plain `run(dict) -> dict`, it binds inputs and
outputs by pointer (`run_bound`): the LLM's past K/V are the KV arena's prefix views and its new K/V rows are
written straight into the arena's next slots, so no KV byte is concatenated or copied per step
(DESIGN.md §4).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from pathlib import Path

import numpy as np

_ORT_TYPES = {
    "tensor(float)": np.float32,
    "tensor(float16)": np.float16,
    "tensor(int64)": np.int64,
    "tensor(int32)": np.int32,
    "tensor(bool)": np.bool_,
}


class BackendUnavailableError(RuntimeError):
    """The backend asked for cannot run here; the message says why and what to use instead."""


class Engine(ABC):
    """Runs one graph."""

    name: str
    input_names: list[str]
    output_names: list[str]

    @abstractmethod
    def run(self, inputs: dict[str, np.ndarray], outputs: list[str] | None = None) -> dict[str, np.ndarray]:
        """Runs the graph on numpy inputs; returns the asked outputs (all by default) by name."""


def available_providers() -> list[str]:
    import onnxruntime as ort

    return list(ort.get_available_providers())


class OnnxRuntimeEngine(Engine):
    """One ONNX Runtime session.

    Args:
        path: the `.onnx` file (external data beside it).
        providers: execution providers in preference order; default CPU. Unavailable ones are an error
            naming what this ONNX Runtime build has.
        threads: intra-op threads (0: ONNX Runtime's default).
        spin: let idle intra-op workers spin (lower latency for a lone session, worse for a pipeline).
    """

    def __init__(
        self,
        path: str | Path,
        providers: list[str] | None = None,
        threads: int = 0,
        name: str = "",
        spin: bool = False,
    ):
        import onnxruntime as ort

        self.path = Path(path)
        self.name = name or self.path.stem
        have = ort.get_available_providers()
        providers = list(providers or ["CPUExecutionProvider"])
        missing = [p for p in providers if p not in have]
        if missing:
            raise BackendUnavailableError(
                f"{self.name}: execution provider(s) {missing} are not in this onnxruntime build "
                f"(it has {have})"
            )
        opts = ort.SessionOptions()
        opts.log_severity_level = 3
        # A pipeline holds one session per graph and runs them one after another: a finished session's
        # spinning workers would compete with the next one for the CPUs (measured: the object decoder took
        # 88-97 ms with spinning, 24 ms without, on 2 cores). Spinning only pays with a core to spare.
        opts.add_session_config_entry("session.intra_op.allow_spinning", "1" if spin else "0")
        if threads:
            opts.intra_op_num_threads = threads
            opts.inter_op_num_threads = 1
        self.session = ort.InferenceSession(str(self.path), opts, providers=providers)
        self.input_names = [i.name for i in self.session.get_inputs()]
        self.output_names = [o.name for o in self.session.get_outputs()]
        self._input_types = {i.name: _ORT_TYPES.get(i.type) for i in self.session.get_inputs()}
        self._output_types = {o.name: _ORT_TYPES.get(o.type) for o in self.session.get_outputs()}

    def run(self, inputs: dict[str, np.ndarray], outputs: list[str] | None = None) -> dict[str, np.ndarray]:
        self._check_inputs(inputs)
        names = outputs or self.output_names
        return dict(zip(names, self.session.run(names, inputs)))

    def run_bound(
        self, inputs: dict[str, np.ndarray], outputs: dict[str, np.ndarray], fetch: list[str] = ()
    ) -> dict[str, np.ndarray]:
        """Runs with every input and the given outputs bound by pointer (CPU memory, no copies).

        Args:
            inputs: C-contiguous arrays of the graph's dtypes (views are fine: the arena's prefixes).
            outputs: preallocated C-contiguous arrays the graph writes into (the arena's next rows).
            fetch: further outputs to return as new arrays (e.g. logits).
        """
        self._check_inputs(inputs)
        binding = self.session.io_binding()
        for name, arr in inputs.items():
            if not arr.flags.c_contiguous:
                raise ValueError(f"{self.name}: input {name!r} must be C-contiguous to bind without a copy")
            binding.bind_input(name, "cpu", 0, arr.dtype, list(arr.shape), arr.ctypes.data)
        for name, arr in outputs.items():
            if name not in self._output_types:
                raise ValueError(f"{self.name}: no output named {name!r}; outputs are {self.output_names}")
            if not arr.flags.c_contiguous or not arr.flags.writeable:
                raise ValueError(f"{self.name}: output buffer {name!r} must be writable and C-contiguous")
            binding.bind_output(name, "cpu", 0, arr.dtype, list(arr.shape), arr.ctypes.data)
        for name in fetch:
            binding.bind_output(name, "cpu")
        self.session.run_with_iobinding(binding)
        if not fetch:
            return {}
        # Outputs come back in binding order: the preallocated ones first (already in place), then `fetch`.
        values = binding.copy_outputs_to_cpu()
        return dict(zip(fetch, values[len(outputs) :]))

    def _check_inputs(self, inputs: dict[str, np.ndarray]) -> None:
        missing = [n for n in self.input_names if n not in inputs]
        extra = [n for n in inputs if n not in self._input_types]
        if missing or extra:
            raise ValueError(
                f"{self.name}: inputs missing {missing}, unexpected {extra} (graph takes {self.input_names})"
            )
        for name, arr in inputs.items():
            want = self._input_types[name]
            if want is not None and arr.dtype != want:
                raise TypeError(
                    f"{self.name}: input {name!r} must be {np.dtype(want).name}, got {arr.dtype.name}"
                )


def make_engine(path: Path, backend: str, providers: list[str] | None, threads: int, name: str) -> Engine:
    """The engine for one graph on the chosen backend."""
    if backend == "onnxruntime":
        return OnnxRuntimeEngine(path, providers=providers, threads=threads, name=name)
    if backend == "tensorrt":
        raise BackendUnavailableError(
            "the TensorRT backend is not available yet: it has not been built and validated on hardware. "
            "Use backend='onnxruntime' (optionally with providers=['TensorrtExecutionProvider', ...] "
            "where your onnxruntime build has it)."
        )
    raise ValueError(f"unknown backend {backend!r}; known: 'onnxruntime', 'tensorrt'")
