"""`visionllm-edge triton-repo ARTIFACT OUT`: a Triton model repository that serves an artifact.

The production path of serving (docs/serving.md): any current `tritonserver --model-repository OUT`, in
NVIDIA's container on a GPU host or on a Jetson, serves what `visionllm-edge serve` serves, with the same
inputs and outputs (`protocol`). The repository holds two models:

    OUT/visionllm/config.pbtxt          one response per request; N instances, each its own Pipeline
    OUT/visionllm/1/model.py            `from visionllm_edge.serving.triton_model import TritonPythonModel`
    OUT/visionllm_stream/config.pbtxt   the decoupled twin: text pieces as they are decoded, then the result
    OUT/visionllm_stream/1/model.py
    OUT/visionllm/artifact/             with --copy-artifact only (Triton reads only numbered folders as
                                        versions, so the copy beside them is not a model version)

Both configs name the artifact in their `parameters` (an absolute path, or with --copy-artifact one relative
to the repository), the intra-op threads per graph and the ONNX Runtime providers. The server's Python needs
visionllm-edge installed: the models run the installed package's code. The folder is written under a hidden
temporary name beside OUT and renamed when complete; an existing non-empty OUT is refused.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

import numpy as np

from visionllm_edge.manifest import load_manifest
from visionllm_edge.serving import protocol

MODEL = "visionllm"
STREAM_MODEL = "visionllm_stream"
#: The folder, inside `MODEL`'s, that --copy-artifact fills.
COPIED_ARTIFACT = "artifact"
#: Parameters every model's config carries; the model refuses to load without them.
REQUIRED_PARAMETERS = ("artifact", "threads")

#: numpy dtype of the protocol -> Triton's config type (BYTES tensors are numpy object arrays).
_TRITON_TYPES = {
    np.dtype(np.uint8): "TYPE_UINT8",
    np.dtype(np.float32): "TYPE_FP32",
    np.dtype(np.object_): "TYPE_STRING",
    np.dtype(np.bytes_): "TYPE_STRING",
}

_MODEL_PY = '''"""{name}: VisionLLM v2 on Triton's Python backend (written by `visionllm-edge triton-repo`).

The code is the installed visionllm-edge's (visionllm_edge/serving/triton_model.py); this file only names it.
"""

from visionllm_edge.serving.triton_model import TritonPythonModel  # noqa: F401
'''


def triton_type(dtype) -> str:
    """Triton's config type of a protocol tensor's numpy dtype."""
    try:
        return _TRITON_TYPES[np.dtype(dtype)]
    except KeyError:
        raise ValueError(f"no Triton type for the protocol dtype {np.dtype(dtype)}") from None


def _tensor(spec, with_optional: bool) -> str:
    dims = ", ".join(str(int(d)) for d in spec.shape)
    lines = [
        "  {",
        f'    name: "{spec.name}"',
        f"    data_type: {triton_type(spec.dtype)}",
        f"    dims: [ {dims} ]",
    ]
    if with_optional and spec.optional:
        lines.append("    optional: true")
    lines.append("  }")
    return "\n".join(lines)


def _quote(value: str) -> str:
    return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'


def config_pbtxt(
    name: str,
    artifact: str,
    instances: int = 1,
    threads: int = 0,
    providers: tuple[str, ...] = (),
    decoupled: bool = False,
) -> str:
    """The `config.pbtxt` of one model (protobuf text of Triton's `ModelConfig`).

    Args:
        name: the model's name (its folder's).
        artifact: the artifact folder as the server sees it: absolute, or relative to the model repository.
        instances: model instances (backend stubs, each with its own Pipeline).
        threads: intra-op threads per graph in each instance (0: ONNX Runtime's default, all cores).
        providers: ONNX Runtime execution providers, in order (empty: the CPU provider).
        decoupled: the streaming twin (`model_transaction_policy { decoupled: true }`).
    """
    if instances < 1:
        raise ValueError(f"--instances must be at least 1, got {instances}")
    if threads < 0:
        raise ValueError(f"--threads must be 0 (ONNX Runtime's default) or more, got {threads}")
    outputs = protocol.STREAM_OUTPUTS if decoupled else protocol.OUTPUTS
    parameters = {"artifact": artifact, "threads": str(threads), "providers": ",".join(providers)}
    text = [
        f"# {name}: written by visionllm-edge triton-repo; tensors of visionllm_edge.serving.protocol.",
        f'name: "{name}"',
        'backend: "python"',
        "# One request per inference: concurrency comes from instances, each running one request at a time.",
        "max_batch_size: 0",
        "input [",
        ",\n".join(_tensor(spec, with_optional=True) for spec in protocol.INPUTS),
        "]",
        "output [",
        ",\n".join(_tensor(spec, with_optional=False) for spec in outputs),
        "]",
        "instance_group [",
        "  {",
        f"    count: {instances}",
        "    kind: KIND_CPU",
        "  }",
        "]",
    ]
    for key, value in parameters.items():
        text.append(f"parameters: {{ key: {_quote(key)} value: {{ string_value: {_quote(value)} }} }}")
    if decoupled:
        text.append("model_transaction_policy { decoupled: true }")
    return "\n".join(text) + "\n"


def write_repository(
    artifact: str | os.PathLike,
    out: str | os.PathLike,
    instances: int = 1,
    threads: int = 0,
    providers: tuple[str, ...] = (),
    copy_artifact: bool = False,
) -> Path:
    """Writes the model repository `out` for `artifact` (see the module docstring).

    Args:
        artifact: an artifact folder written by `visionllm-edge export` (its manifest is checked here, hashes
            included, so a broken artifact fails now rather than in every server that loads it).
        out: the repository folder to create; it must not exist, or be empty.
        instances, threads, providers: as for `config_pbtxt`, for both models.
        copy_artifact: copy the artifact into the repository (a self-contained folder to ship); otherwise the
            configs name the artifact's absolute path, which every server must see at that path.

    Returns:
        The repository folder.

    Raises:
        FileExistsError: `out` exists and is not an empty folder.
        ManifestError: `artifact` is not a valid artifact (the message names the file and key).
    """
    source = Path(artifact).absolute()
    load_manifest(source, verify_hashes=True)
    out = Path(out).absolute()
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise FileExistsError(
            f"{out} exists and is not an empty folder: triton-repo writes a new repository (remove it or "
            "choose another OUT)"
        )
    out.parent.mkdir(parents=True, exist_ok=True)
    partial = Path(tempfile.mkdtemp(prefix=f".{out.name}.partial-", dir=out.parent))
    try:
        if copy_artifact:
            shutil.copytree(source, partial / MODEL / COPIED_ARTIFACT)
            artifact_param = f"{MODEL}/{COPIED_ARTIFACT}"
        else:
            artifact_param = str(source)
        for name, decoupled in ((MODEL, False), (STREAM_MODEL, True)):
            version = partial / name / "1"
            version.mkdir(parents=True)
            (partial / name / "config.pbtxt").write_text(
                config_pbtxt(name, artifact_param, instances, threads, tuple(providers), decoupled)
            )
            (version / "model.py").write_text(_MODEL_PY.format(name=name))
        partial.chmod(0o755)  # mkdtemp makes it 0700; a server in a container may run as another user
        if out.exists():
            out.rmdir()  # empty (checked above); rename(2) would replace it, but only where it stayed empty
        partial.rename(out)
    except BaseException:
        shutil.rmtree(partial, ignore_errors=True)
        raise
    return out
