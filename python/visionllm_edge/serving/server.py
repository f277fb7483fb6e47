"""`visionllm-edge serve ARTIFACT`: the artifact on Triton Inference Server through PyTriton.

PyTriton (nvidia-pytriton, the `serve` extra) starts the `tritonserver` its wheel ships and a Python backend
stub per model instance; each stub hands its requests over to a callable in this process. Every instance has
its own `Pipeline` loaded from the same artifact folder, so N instances answer N requests at once (the C++
loop releases the GIL); instance i of both models shares pipeline i (its calls wait for each other), so N
instances hold N pipelines, not 2N. Two models:

    visionllm          one response per request (`protocol.run_request`)
    visionllm_stream   decoupled: a response per decoded text piece, then one with the result
                       (`protocol.stream_request`)

A request that fails is answered with an error carrying our message (PyTriton puts the callable's traceback
around it), and the instance goes on serving. Every endpoint binds loopback unless `host` says otherwise.
SIGINT or SIGTERM stops the server, its stubs and the workspace.

Two facts of nvidia-pytriton 0.7.0 on our machines are worked around here (found by running it; the
standalone path in `local.py` meets the same):

- the stub links `libpython3.X.so.1.0` and the loader takes the system's unless this interpreter's library
  folder is on `LD_LIBRARY_PATH` (a different patch release fails on the standard library's Python code);
- the stub is built with pybind11 2.10, which misreads numpy 2 arrays, so where this environment has numpy 2
  the stubs run in `local.stub_environment` (numpy 1.26 in front of this environment's packages) instead
  of `sys.exec_prefix`, which PyTriton would pick.
"""

from __future__ import annotations

import logging
import os
import signal
import sys
import sysconfig
import time
from dataclasses import dataclass
from pathlib import Path

from visionllm_edge.serving import protocol

MODEL = "visionllm"
STREAM_MODEL = "visionllm_stream"

LOGGER = logging.getLogger("visionllm_edge.serving")


def _tensors(specs) -> list:
    from pytriton.model_config import Tensor

    return [Tensor(name=s.name, dtype=s.dtype, shape=s.shape, optional=s.optional) for s in specs]


def _cache_folder() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "visionllm-edge"


@dataclass(frozen=True)
class ServeOptions:
    """What `serve` binds and runs (the command's options)."""

    host: str = "127.0.0.1"
    http_port: int = 8000
    grpc_port: int = 8001
    metrics_port: int = 8002
    instances: int = 1
    threads: int = 0

    def check(self) -> None:
        if self.instances < 1:
            raise ValueError(f"--instances must be at least 1, got {self.instances}")
        if self.threads < 0:
            raise ValueError(f"--threads must be 0 (ONNX Runtime's default) or more, got {self.threads}")
        ports = {
            "--http-port": self.http_port,
            "--grpc-port": self.grpc_port,
            "--metrics-port": self.metrics_port,
        }
        for flag, port in ports.items():
            if not 0 < port < 65536:
                raise ValueError(f"{flag} must be a TCP port (1-65535), got {port}")
        if len(set(ports.values())) != len(ports):
            raise ValueError(
                f"--http-port, --grpc-port and --metrics-port must differ, got {list(ports.values())}"
            )


def _sendable(outputs: dict) -> dict:
    """The outputs PyTriton can send: its shared-memory tensor store cannot copy an array with a zero in its
    shape (`memoryview: cannot cast view with zeros in shape or strides`), so empty `masks` / `images` are
    left out; `protocol.decode_response` reads an absent one as empty."""
    return {name: value for name, value in outputs.items() if value.size}


def _infer(pipeline):
    """The `visionllm` callable of one instance: PyTriton passes the requests it got at once (one, with
    max_batch_size 0 and no dynamic batching) and takes one response dict per request."""

    def infer(requests):
        return [_sendable(protocol.run_request(pipeline, dict(request.data))) for request in requests]

    return infer


def _stream(pipeline):
    """The `visionllm_stream` callable of one instance: a generator of response lists (PyTriton's decoupled
    form)."""

    def stream(requests):
        # PyTriton takes one list per step with a response for each request; requests of a stream do not
        # advance together, so this model takes them one by one (what Triton's default scheduler gives).
        if len(requests) != 1:
            raise RuntimeError(f"{STREAM_MODEL}: expected one request per call, got {len(requests)}")
        for outputs in protocol.stream_request(pipeline, dict(requests[0].data)):
            yield [_sendable(outputs)]

    return stream


def _prepare_stub_environment() -> None:
    """Makes PyTriton's stubs start with this interpreter's libpython and numpy below 2 (module docstring)."""
    import pytriton.server.triton_server as triton_server

    from visionllm_edge.serving.local import stub_environment

    libdir = sysconfig.get_config_var("LIBDIR")
    if libdir and list(Path(libdir).glob("libpython3*.so*")):
        paths = [libdir, *[p for p in os.environ.get("LD_LIBRARY_PATH", "").split(":") if p]]
        os.environ["LD_LIBRARY_PATH"] = ":".join(dict.fromkeys(paths))
    version = f"{sys.version_info.major}.{sys.version_info.minor}"
    env = stub_environment(_cache_folder() / f"pytriton-stub-python{version}")
    triton_server.get_triton_python_backend_python_env = lambda: env


class Server:
    """The PyTriton server of one artifact: `start()` (returns when every model is ready), `stop()`;
    or a context manager. `serve()` starts, blocks until SIGINT or SIGTERM, and stops."""

    def __init__(self, artifact: str | os.PathLike, options: ServeOptions = ServeOptions()):
        options.check()
        self.artifact = Path(artifact)
        self.options = options
        self._triton = None

    @property
    def http_url(self) -> str:
        return f"{self.options.host}:{self.options.http_port}"

    @property
    def grpc_url(self) -> str:
        return f"{self.options.host}:{self.options.grpc_port}"

    @property
    def metrics_url(self) -> str:
        return f"http://{self.options.host}:{self.options.metrics_port}/metrics"

    def _config(self):
        from pytriton.triton import TritonConfig

        o = self.options
        return TritonConfig(
            http_address=o.host,
            http_port=o.http_port,
            grpc_address=o.host,
            grpc_port=o.grpc_port,
            metrics_address=o.host,
            metrics_port=o.metrics_port,
            exit_timeout_secs=10,
        )

    def start(self) -> Server:
        try:
            from pytriton.model_config import ModelConfig
            from pytriton.triton import Triton
        except ImportError as e:
            raise ModuleNotFoundError(
                "visionllm-edge serve needs nvidia-pytriton: pip install 'visionllm-edge[serve]' && "
                f"pip install --no-deps nvidia-pytriton==0.7.0 (docs/serving.md): {e}"
            ) from None

        from visionllm_edge.pipeline import Pipeline

        o = self.options
        # Loaded before the server starts, so a bad artifact is an error here, not a model that never loads.
        pipelines = [Pipeline.load(self.artifact, threads=o.threads) for _ in range(o.instances)]
        _prepare_stub_environment()
        triton = Triton(config=self._config())
        try:
            triton.bind(
                model_name=MODEL,
                infer_func=[_infer(p) for p in pipelines],
                inputs=_tensors(protocol.INPUTS),
                outputs=_tensors(protocol.OUTPUTS),
                config=ModelConfig(batching=False),
            )
            triton.bind(
                model_name=STREAM_MODEL,
                infer_func=[_stream(p) for p in pipelines],
                inputs=_tensors(protocol.INPUTS),
                outputs=_tensors(protocol.STREAM_OUTPUTS),
                config=ModelConfig(batching=False, decoupled=True),
            )
            triton.run()
        except BaseException:
            triton.stop()
            raise
        self._triton = triton
        return self

    def stop(self) -> None:
        triton, self._triton = self._triton, None
        if triton is not None:
            triton.stop()

    def serve(self) -> None:
        """Serves until SIGINT or SIGTERM (or the server dies), then stops."""

        def terminate(signum, frame):
            raise KeyboardInterrupt

        previous = signal.signal(signal.SIGTERM, terminate)
        try:
            self.start()
            o = self.options
            print(
                f"serving {self.artifact} as {MODEL} and {STREAM_MODEL} ({o.instances} instance(s) each): "
                f"HTTP {self.http_url}, gRPC {self.grpc_url}, metrics {self.metrics_url}",
                flush=True,
            )
            while self._triton.is_alive():
                time.sleep(1.0)
            LOGGER.error("the Triton server or a model's stub stopped; shutting down")
        except KeyboardInterrupt:
            pass
        finally:
            self.stop()
            signal.signal(signal.SIGTERM, previous)

    def __enter__(self) -> Server:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()
