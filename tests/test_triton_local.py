"""`serving.local`: the nvidia-pytriton wheel's `tritonserver`, run standalone on loopback, on a model
repository this test writes (a Python backend model that echoes its tensors transformed).

What it proves is the set-up `LocalTritonServer` makes (backend folder, stub, libraries, the stub's Python):
FP32, UINT8 and BYTES tensors cross the server and the stub exactly. With numpy 2 in the stub's Python the
wheel's 2.51 stub read FP32 [1, 2, 3] as [1, 1, 1], answered empty outputs, and died on any BYTES input; the
stub environment (`stub_environment`) is what makes these exact here.
"""

from __future__ import annotations

import os
import subprocess
import urllib.request

import numpy as np
import pytest

pytest.importorskip("tritonclient.http", reason="the serve extra (tritonclient[http]) is not installed")
pytest.importorskip(
    "pytriton", reason="the serve extra (nvidia-pytriton: the tritonserver binary) is not installed"
)

import tritonclient.http as httpclient  # noqa: E402
from tritonclient.utils import InferenceServerException  # noqa: E402
from visionllm_edge.serving.local import LocalTritonServer, find_distribution, stub_environment  # noqa: E402

CONFIG = """
name: "echo"
backend: "python"
max_batch_size: 0
input [
  { name: "x" data_type: TYPE_FP32 dims: [ -1 ] },
  { name: "s" data_type: TYPE_STRING dims: [ 1 ] },
  { name: "u" data_type: TYPE_UINT8 dims: [ -1, -1, 3 ] }
]
output [
  { name: "y" data_type: TYPE_FP32 dims: [ -1 ] },
  { name: "t" data_type: TYPE_STRING dims: [ 1 ] },
  { name: "v" data_type: TYPE_UINT8 dims: [ -1, -1, 3 ] }
]
instance_group [ { count: 2 kind: KIND_CPU } ]
"""

MODEL = """
import numpy as np
import triton_python_backend_utils as pb_utils


class TritonPythonModel:
    def execute(self, requests):
        responses = []
        for request in requests:
            x = pb_utils.get_input_tensor_by_name(request, "x").as_numpy()
            s = pb_utils.get_input_tensor_by_name(request, "s").as_numpy()
            u = pb_utils.get_input_tensor_by_name(request, "u").as_numpy()
            if s[0] == b"fail":
                responses.append(pb_utils.InferenceResponse(error=pb_utils.TritonError("refused: s is fail")))
                continue
            text = (s[0].decode("utf-8")[::-1] + f" {np.__version__}").encode("utf-8")
            responses.append(
                pb_utils.InferenceResponse(
                    [
                        pb_utils.Tensor("y", (x * 2).astype(np.float32)),
                        pb_utils.Tensor("t", np.array([text], dtype=np.object_)),
                        pb_utils.Tensor("v", np.ascontiguousarray(u[::-1])),
                    ]
                )
            )
        return responses
"""


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    repo = tmp_path_factory.mktemp("echo-repo")
    (repo / "echo" / "1").mkdir(parents=True)
    (repo / "echo" / "config.pbtxt").write_text(CONFIG)
    (repo / "echo" / "1" / "model.py").write_text(MODEL)
    env = stub_environment(tmp_path_factory.getbasetemp() / "stub-env")
    with LocalTritonServer(repo, tmp_path_factory.mktemp("echo-server"), python_env=env) as running:
        yield running


def _infer(server, x, s: bytes, u):
    client = httpclient.InferenceServerClient(server.http_url, network_timeout=60)
    tensors = []
    for name, value, dtype in (
        ("x", x, "FP32"),
        ("s", np.array([s], dtype=np.object_), "BYTES"),
        ("u", u, "UINT8"),
    ):
        tensor = httpclient.InferInput(name, list(value.shape), dtype)
        tensor.set_data_from_numpy(value)
        tensors.append(tensor)
    response = client.infer("echo", tensors)
    return response.as_numpy("y"), response.as_numpy("t")[0].decode("utf-8"), response.as_numpy("v")


def test_fp32_uint8_and_bytes_tensors_cross_the_server_and_its_stub_exactly(server):
    x = np.array([1.0, 2.0, 3.0, -0.5], dtype=np.float32)
    u = np.random.default_rng(0).integers(0, 256, (5, 7, 3), dtype=np.uint8)
    y, t, v = _infer(server, x, "ünïcode".encode(), u)
    np.testing.assert_array_equal(y, x * 2)
    text, numpy_version = t.rsplit(" ", 1)
    assert text == "edocïnü"
    assert int(numpy_version.split(".")[0]) < 2  # the stub's numpy: what the 2.51 stub reads correctly
    np.testing.assert_array_equal(v, u[::-1])


def test_an_error_response_carries_the_models_message_and_the_next_request_answers(server):
    x, u = np.zeros(2, np.float32), np.zeros((1, 1, 3), np.uint8)
    with pytest.raises(InferenceServerException, match="refused: s is fail"):
        _infer(server, x, b"fail", u)
    assert _infer(server, x, b"ok", u)[1].startswith("ko ")


def test_the_server_and_its_two_stubs_are_children_of_one_group_and_report_memory(server):
    pids = server.pids()
    assert len(pids) == 3 and pids[0] == server.process.pid  # tritonserver, one stub per instance
    rss = server.rss_bytes()
    assert set(rss) == set(pids) and all(v > 10 * 2**20 for v in rss.values())
    with urllib.request.urlopen(f"http://{server.http_url}/v2/models/echo/ready", timeout=10) as r:
        assert r.status == 200


def test_stop_ends_the_server_and_its_stubs(tmp_path):
    repo = tmp_path / "repo"
    (repo / "echo" / "1").mkdir(parents=True)
    (repo / "echo" / "config.pbtxt").write_text(CONFIG)
    (repo / "echo" / "1" / "model.py").write_text(MODEL)
    env = stub_environment(tmp_path.parent / "stub-env-stop")
    server = LocalTritonServer(repo, tmp_path / "server", python_env=env).start()
    pids = server.pids()
    server.stop()
    for pid in pids:
        with pytest.raises(ProcessLookupError):
            os.kill(pid, 0)


def test_a_repository_that_fails_to_load_is_reported_with_the_servers_log(tmp_path):
    repo = tmp_path / "repo"
    (repo / "echo" / "1").mkdir(parents=True)
    (repo / "echo" / "config.pbtxt").write_text(CONFIG.replace("TYPE_FP32", "TYPE_NOT_A_TYPE", 1))
    (repo / "echo" / "1" / "model.py").write_text(MODEL)
    server = LocalTritonServer(repo, tmp_path / "server", python_env=tmp_path)  # never reaches a stub
    with pytest.raises(RuntimeError, match="(?s)tritonserver exited with status .*TYPE_NOT_A_TYPE"):
        server.start(timeout=60)
    assert server.process is None


def test_the_distribution_has_the_stub_of_this_python():
    dist = find_distribution()
    assert dist.server.name == "tritonserver" and dist.stub.parent.name.count(".") == 1
    # The binary runs with the wheel's libraries alone (nothing from the system's CUDA or Triton).
    out = subprocess.run(
        [str(dist.server), "--help"],
        capture_output=True,
        text=True,
        timeout=60,
        env={"LD_LIBRARY_PATH": str(dist.libraries)},
    )
    assert "--model-repository" in out.stdout + out.stderr
