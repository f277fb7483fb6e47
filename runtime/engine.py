"""Engines: one object per exported graph that runs it, in the C++ core. No torch, no onnxruntime import.

`make_engine` returns a `_core.Engine` (csrc/engines/): besides the plain `run(dict) -> dict`, it binds
inputs and outputs by pointer (`run_bound`): the LLM's past K/V are the KV arena's prefix views and its new
K/V rows are written straight into the arena's next slots, so no KV byte is concatenated or copied per step.
Outputs come back as numpy arrays over the engine's own buffers.

The core opens the `libonnxruntime.so.1*` of the installed `onnxruntime` package (found without importing
it, so the process holds one ONNX Runtime), or the library `$VLE_ONNXRUNTIME_LIBRARY` names.
"""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path

from visionllm_edge import _core

Engine = _core.Engine
"""One graph: `name`, `input_names`, `output_names`, `run(inputs, outputs=None)` and
`run_bound(inputs, outputs, fetch=())`. Inputs must be C-contiguous arrays of the graph's dtypes (a wrong
dtype is a TypeError, a non-contiguous array a ValueError, both naming the tensor)."""


class BackendUnavailableError(RuntimeError):
    """The backend asked for cannot run here; the message says why and what to use instead."""


def onnxruntime_library() -> str:
    """The libonnxruntime the engines open: `$VLE_ONNXRUNTIME_LIBRARY`, else the onnxruntime package's."""
    if os.environ.get("VLE_ONNXRUNTIME_LIBRARY"):
        return os.environ["VLE_ONNXRUNTIME_LIBRARY"]
    spec = importlib.util.find_spec("onnxruntime")
    if spec is None or not spec.submodule_search_locations:
        raise BackendUnavailableError(
            "the onnxruntime backend needs the onnxruntime package (pip install onnxruntime, or "
            "onnxruntime-gpu for CUDA), or VLE_ONNXRUNTIME_LIBRARY set to a libonnxruntime.so.1"
        )
    capi = Path(next(iter(spec.submodule_search_locations))) / "capi"
    found = sorted(capi.glob("libonnxruntime.so.1*"))
    if not found:
        raise BackendUnavailableError(
            f"the onnxruntime package at {capi.parent} ships no libonnxruntime.so.1* in {capi}; reinstall it "
            "or set VLE_ONNXRUNTIME_LIBRARY to a libonnxruntime.so.1"
        )
    return str(found[-1])


def available_providers() -> list[str]:
    """Execution providers of the ONNX Runtime the engines use."""
    return list(_core.available_providers(onnxruntime_library()))


def make_engine(
    path: Path,
    backend: str,
    providers: list[str] | None,
    threads: int,
    name: str,
    *,
    provider_options: dict[str, dict[str, str]] | None = None,
    spin: bool = False,
    device_id: int = 0,
    profile_prefix: str = "",
) -> Engine:
    """The engine for one graph on the chosen backend.

    Args:
        path: the `.onnx` file (external data beside it).
        backend: "onnxruntime", or "tensorrt" (the TensorRT provider; without a manifest no profiles, precision
            or cache are planned: `Pipeline.load(backend="tensorrt")` plans them).
        providers: execution providers in preference order; default CPU. Unavailable ones are a
            BackendUnavailableError naming what this ONNX Runtime build has.
        threads: intra-op threads (0: ONNX Runtime's default).
        name: the graph's name, used in every message.
        provider_options: options per provider, passed through as given.
        spin: let idle intra-op workers spin (lower latency for a lone session, worse for a pipeline).
        device_id: the CUDA device of the CUDA and TensorRT providers (device memory lives there).
        profile_prefix: non-empty: ONNX Runtime profiles the session into `<prefix>_<date>.json`, finished by
            `engine.end_profiling()`; `_core.profile_copies(file)` counts each run's Memcpy nodes.
    """
    return _core.make_engine(
        backend,
        str(path),
        name,
        list(providers or []),
        dict(provider_options or {}),
        threads,
        spin,
        onnxruntime_library(),
        device_id,
        profile_prefix,
    )
