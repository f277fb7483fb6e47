"""A standalone `tritonserver` on this host, from the binary the nvidia-pytriton wheel ships.

A fleet runs the model repository (`visionllm-edge triton-repo`) in NVIDIA's Triton container; the tests and
`benchmarks/serve_load.py` run the same repository here, with no container, on the `tritonserver` binary,
Python backend and backend stubs inside nvidia-pytriton's wheel (`pytriton/tritonserver/`, its libraries in
`nvidia_pytriton.libs/`). What that takes, found by running it on Debian 12 (docs/serving.md):

- a backend folder `backends/python/` holding `libtriton_python.so`, `triton_python_backend_utils.py` and the
  `triton_python_backend_stub` built for this Python's minor version (the wheel keeps one per version under
  `python_backend_stubs/`; PyTriton copies the same three files into its workspace);
- `LD_LIBRARY_PATH` with the wheel's libraries and this interpreter's `libpython` (the stub links
  `libpython3.X.so.1.0`; without it the loader takes the system's, a different patch release);
- the stub's Python is the first `python3` on `PATH` (its `pyvenv.cfg` gives the site-packages); `PYTHONPATH`
  does not reach it;
- numpy below 2 in that Python: the stub of nvidia-pytriton 0.7.0 (Triton 2.51) is built with pybind11 2.10,
  which misreads numpy 2 arrays (an FP32 input `[1, 2, 3]` arrives as `[1, 1, 1]`, outputs come back empty and
  a BYTES input kills the stub; fixed upstream by triton-inference-server/python_backend#384, after 2.51). In
  an environment with numpy 2, `stub_environment` makes a small venv that puts numpy 1.26 in front of this
  environment's packages.

Nothing here imports tritonclient or PyTriton: the server is a child process, its health a plain HTTP GET.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import sysconfig
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from importlib import metadata, util
from pathlib import Path

#: The distribution whose wheel carries the server.
DISTRIBUTION = "nvidia-pytriton"


@dataclass(frozen=True)
class TritonDistribution:
    """Where the wheel's server pieces are."""

    server: Path  #: the `tritonserver` executable
    libraries: Path  #: the shared libraries it and the stub link (`nvidia_pytriton.libs`)
    python_backend: Path  #: `libtriton_python.so` and `triton_python_backend_utils.py`
    stub: Path  #: `triton_python_backend_stub` for this Python's minor version
    version: str  #: nvidia-pytriton's version


def find_distribution() -> TritonDistribution:
    """The tritonserver of the installed nvidia-pytriton wheel.

    Raises:
        ModuleNotFoundError: nvidia-pytriton is not installed (the `serve` extra), or lacks a piece; the
            message names the missing path.
    """
    spec = util.find_spec("pytriton")
    if spec is None or not spec.submodule_search_locations:
        raise ModuleNotFoundError(
            f"a standalone tritonserver here needs the {DISTRIBUTION} wheel (pip install "
            "'visionllm-edge[serve]'): it ships the tritonserver binary and its Python backend"
        )
    package = Path(next(iter(spec.submodule_search_locations)))
    home = package / "tritonserver"
    version = f"{sys.version_info.major}.{sys.version_info.minor}"
    found = TritonDistribution(
        server=home / "bin" / "tritonserver",
        libraries=package.parent / "nvidia_pytriton.libs",
        python_backend=home / "backends" / "python",
        stub=home / "python_backend_stubs" / version / "triton_python_backend_stub",
        version=metadata.version(DISTRIBUTION),
    )
    for path in (found.server, found.libraries, found.python_backend / "libtriton_python.so", found.stub):
        if not path.exists():
            raise ModuleNotFoundError(
                f"{DISTRIBUTION} {found.version} at {package} has no {path.relative_to(package.parent)} "
                f"(a stub for Python {version} is needed); reinstall it"
            )
    return found


def _numpy_major(python: Path) -> int:
    out = subprocess.run(
        [str(python), "-c", "import numpy; print(numpy.__version__)"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    if out.returncode != 0:
        raise RuntimeError(f"{python} cannot import numpy: {out.stderr.strip()[-400:]}")
    return int(out.stdout.strip().split(".")[0])


def stub_environment(folder: str | os.PathLike) -> Path:
    """A Python environment the wheel's backend stub runs our model in: its prefix (put `bin/` on PATH).

    With numpy below 2 here, that is this environment itself. Otherwise `folder` becomes (once; reused while
    it still has numpy below 2) a venv of the same base interpreter whose own site-packages hold only numpy
    1.26 and a `.pth` that adds this environment's site-packages after it, so visionllm_edge, its `_core` and
    every other package come from here. Installing numpy there needs pip and the package index (18 MB).
    """
    if int(__import__("numpy").__version__.split(".")[0]) < 2:
        return Path(sys.prefix)
    folder = Path(folder).absolute()
    python = folder / "bin" / "python3"
    if python.exists() and _numpy_major(python) < 2:
        return folder
    if folder.exists():
        shutil.rmtree(folder)
    base = Path(getattr(sys, "_base_executable", sys.executable))
    subprocess.run([str(base), "-m", "venv", "--without-pip", str(folder)], check=True, timeout=120)
    site = folder / "lib" / f"python{sys.version_info.major}.{sys.version_info.minor}" / "site-packages"
    subprocess.run(
        [sys.executable, "-m", "pip", "install", "-q", "--target", str(site), "numpy>=1.24,<2"],
        check=True,
        timeout=600,
    )
    paths = sysconfig.get_paths()
    ours = dict.fromkeys((paths["purelib"], paths["platlib"]))
    lines = "".join(f"import site; site.addsitedir({p!r})\n" for p in ours)
    # Named to sort after numpy's own files; a .pth line that starts with `import` is executed by site.py.
    (site / "zz_visionllm_edge_parent.pth").write_text(lines)
    if _numpy_major(python) >= 2:
        raise RuntimeError(f"{folder}: numpy 2 is still first on the stub environment's path")
    return folder


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port free on `host` now (the kernel's pick; another process may take it before us)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return s.getsockname()[1]


class LocalTritonServer:
    """`tritonserver --model-repository REPO` as a child process in its own process group, on loopback.

    Use as a context manager, or `start()` then `stop()`. The Python backend's stubs (one process per model
    instance) are the server's children; `stop()` ends the whole group.

    Args:
        repository: a model repository (e.g. written by `visionllm-edge triton-repo`).
        workdir: folder for the backend copy and the server's log (`tritonserver.log`).
        python_env: prefix of the Python the stubs run (default: `stub_environment(workdir / "stub-env")`).
        host: address every endpoint binds (loopback unless told otherwise).
        http_port, grpc_port, metrics_port: ports (default: free ones).
        extra_args: more `tritonserver` flags.
    """

    def __init__(
        self,
        repository: str | os.PathLike,
        workdir: str | os.PathLike,
        python_env: str | os.PathLike | None = None,
        host: str = "127.0.0.1",
        http_port: int | None = None,
        grpc_port: int | None = None,
        metrics_port: int | None = None,
        extra_args: tuple[str, ...] = (),
    ):
        self.repository = Path(repository).absolute()
        self.workdir = Path(workdir).absolute()
        self.python_env = None if python_env is None else Path(python_env)
        self.host = host
        self.http_port = http_port or free_port(host)
        self.grpc_port = grpc_port or free_port(host)
        self.metrics_port = metrics_port or free_port(host)
        self.extra_args = tuple(extra_args)
        self.log_path = self.workdir / "tritonserver.log"
        self.process: subprocess.Popen | None = None
        self._log = None

    @property
    def http_url(self) -> str:
        return f"{self.host}:{self.http_port}"

    @property
    def grpc_url(self) -> str:
        return f"{self.host}:{self.grpc_port}"

    @property
    def metrics_url(self) -> str:
        return f"http://{self.host}:{self.metrics_port}/metrics"

    def _backends(self, dist: TritonDistribution) -> Path:
        backends = self.workdir / "backends"
        python = backends / "python"
        python.mkdir(parents=True, exist_ok=True)
        for name in ("libtriton_python.so", "triton_python_backend_utils.py"):
            shutil.copy2(dist.python_backend / name, python / name)
        shutil.copy2(dist.stub, python / "triton_python_backend_stub")
        return backends

    def _environment(self, dist: TritonDistribution, python_env: Path) -> dict[str, str]:
        env = dict(os.environ)
        env.pop("PYTHONHOME", None)
        libdirs = [str(dist.libraries)]
        libpython = sysconfig.get_config_var("LIBDIR")
        if libpython and list(Path(libpython).glob("libpython3*.so*")):
            libdirs.append(libpython)
        if env.get("LD_LIBRARY_PATH"):
            libdirs.append(env["LD_LIBRARY_PATH"])
        env["LD_LIBRARY_PATH"] = ":".join(libdirs)
        env["PATH"] = f"{python_env / 'bin'}:{env.get('PATH', '')}"
        return env

    def start(self, timeout: float = 120.0) -> LocalTritonServer:
        """Starts the server and waits until `/v2/health/ready` answers 200 (every model loaded).

        Raises:
            TimeoutError: not ready within `timeout` seconds (the server is stopped; the log tail is in the
                message).
            RuntimeError: the server exited while starting (its log tail in the message).
        """
        dist = find_distribution()
        self.workdir.mkdir(parents=True, exist_ok=True)
        python_env = self.python_env or stub_environment(self.workdir / "stub-env")
        command = [
            str(dist.server),
            f"--model-repository={self.repository}",
            f"--backend-directory={self._backends(dist)}",
            f"--http-address={self.host}",
            f"--grpc-address={self.host}",
            f"--metrics-address={self.host}",
            f"--http-port={self.http_port}",
            f"--grpc-port={self.grpc_port}",
            f"--metrics-port={self.metrics_port}",
            "--exit-timeout-secs=20",
            *self.extra_args,
        ]
        self._log = open(self.log_path, "ab")
        self.process = subprocess.Popen(
            command,
            env=self._environment(dist, python_env),
            stdin=subprocess.DEVNULL,
            stdout=self._log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        try:
            self.wait_ready(timeout)
        except BaseException:
            self.stop()
            raise
        return self

    def ready(self) -> bool:
        """Whether `/v2/health/ready` answers 200 now."""
        try:
            with urllib.request.urlopen(f"http://{self.http_url}/v2/health/ready", timeout=2) as r:
                return r.status == 200
        except (urllib.error.URLError, OSError):
            return False

    def wait_ready(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process is not None and self.process.poll() is not None:
                raise RuntimeError(
                    f"tritonserver exited with status {self.process.returncode} while starting on "
                    f"{self.repository}; its log ({self.log_path}) ends:\n{self.log_tail()}"
                )
            if self.ready():
                return
            time.sleep(0.25)
        raise TimeoutError(
            f"tritonserver on {self.repository} was not ready after {timeout:.0f} s; its log ends:\n"
            f"{self.log_tail()}"
        )

    def log_tail(self, lines: int = 40) -> str:
        try:
            text = self.log_path.read_text(errors="replace")
        except OSError:
            return ""
        # Triton's start-up tables are wide boxes of '+' and '|' lines; they say nothing about a failure.
        kept = [ln for ln in text.splitlines() if not ln.startswith(("+", "|"))]
        return "\n".join(kept[-lines:])

    def pids(self) -> list[int]:
        """The server's pid and its descendants' (the backend stubs), from /proc."""
        if self.process is None or self.process.poll() is not None:
            return []
        children: dict[int, list[int]] = {}
        for entry in Path("/proc").iterdir():
            if not entry.name.isdigit():
                continue
            try:
                stat = (entry / "stat").read_text()
            except OSError:
                continue
            # The command name (field 2) is in parentheses and may hold spaces; the parent pid follows it.
            ppid = int(stat.rsplit(")", 1)[1].split()[1])
            children.setdefault(ppid, []).append(int(entry.name))
        found, todo = [], [self.process.pid]
        while todo:
            pid = todo.pop()
            found.append(pid)
            todo.extend(children.get(pid, ()))
        return found

    def rss_bytes(self) -> dict[int, int]:
        """Resident memory of the server and each stub, {pid: bytes} (VmRSS from /proc)."""
        out = {}
        for pid in self.pids():
            try:
                for line in Path(f"/proc/{pid}/status").read_text().splitlines():
                    if line.startswith("VmRSS:"):
                        out[pid] = int(line.split()[1]) * 1024
            except OSError:
                continue
        return out

    def stop(self, timeout: float = 30.0) -> None:
        """SIGTERM to the server (it unloads the models, the stubs run `finalize`), then SIGKILL to its group
        after `timeout` seconds."""
        process, self.process = self.process, None
        if process is not None and process.poll() is None:
            process.send_signal(signal.SIGTERM)
            try:
                process.wait(timeout)
            except subprocess.TimeoutExpired:
                pass
        if process is not None:
            try:
                os.killpg(process.pid, signal.SIGKILL)  # the group is the server's own (start_new_session)
            except ProcessLookupError:
                pass
            process.wait()
        if self._log is not None:
            self._log.close()
            self._log = None

    def __enter__(self) -> LocalTritonServer:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()
