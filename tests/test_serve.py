"""`visionllm-edge serve` on the trained shapes-tiny, for real: the CLI starts PyTriton's `tritonserver` on
loopback (free ports) as a child process, `Client` sends requests over HTTP and gRPC, and every answer is
compared with a direct `Pipeline` call on the same input in this process.

The served model has one instance (one `Pipeline`, one thread per graph) and the direct pipeline gets the very
requests the server got, in the same order (the malformed ones too), so both have the same history: the
frame cache and the reused KV rows, which move the last bits of a result, are the same on both sides. So text
and token ids are identical, boxes and scores within 1e-5, masks, the semantic map and images equal. The
server starts once for the module, is waited for with a bound, and is always stopped (SIGTERM, then the
process group is killed if it lingers); a second test module would start its own.
"""

from __future__ import annotations

import io
import os
import re
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

pytest.importorskip("tritonclient.grpc", reason="the serve extra (tritonclient[grpc]) is not installed")
pytest.importorskip("tritonclient.http", reason="the serve extra (tritonclient[http]) is not installed")
pytest.importorskip(
    "pytriton", reason="the serve extra (nvidia-pytriton: PyTriton and tritonserver) is not installed"
)

from visionllm_edge.pipeline import Pipeline  # noqa: E402
from visionllm_edge.serving import protocol  # noqa: E402
from visionllm_edge.serving.client import Client, ServerError  # noqa: E402
from visionllm_edge.serving.local import free_port  # noqa: E402
from visionllm_edge.shapes.instructions import make_sample  # noqa: E402

ATOL = 1e-5
#: Seconds the server may take to load and report ready on the loaded 2-core machine (a first run also makes
#: the stubs' numpy-1 environment: one pip install).
START_TIMEOUT = 600
STOP_TIMEOUT = 60


def _get(url: str) -> int:
    try:
        with urllib.request.urlopen(url, timeout=5) as r:
            return r.status
    except urllib.error.HTTPError as e:
        return e.code
    except (urllib.error.URLError, OSError):
        return 0


class _Served:
    def __init__(self, process: subprocess.Popen, host: str, ports: dict[str, int], log: Path):
        self.process, self.host, self.ports, self.log = process, host, ports, log

    @property
    def http_url(self) -> str:
        return f"{self.host}:{self.ports['http']}"

    @property
    def grpc_url(self) -> str:
        return f"{self.host}:{self.ports['grpc']}"

    @property
    def metrics_url(self) -> str:
        return f"http://{self.host}:{self.ports['metrics']}/metrics"

    def ready(self) -> bool:
        models = ("visionllm", "visionllm_stream")
        paths = ["/v2/health/ready", *(f"/v2/models/{m}/ready" for m in models)]
        return all(_get(f"http://{self.http_url}{p}") == 200 for p in paths)

    def log_tail(self) -> str:
        text = self.log.read_text(errors="replace") if self.log.exists() else ""
        return "\n".join(ln for ln in text.splitlines() if not ln.startswith(("+", "|")))[-4000:]


def _start(artifact: Path, folder: Path, instances: int = 1) -> _Served:
    host = "127.0.0.1"
    ports = {"http": free_port(host), "grpc": free_port(host), "metrics": free_port(host)}
    log = folder / "serve.log"
    command = [
        sys.executable,
        "-m",
        "visionllm_edge.cli",
        "serve",
        str(artifact),
        f"--http-port={ports['http']}",
        f"--grpc-port={ports['grpc']}",
        f"--metrics-port={ports['metrics']}",
        f"--instances={instances}",
        "--threads=1",
    ]
    with open(log, "wb") as out:
        process = subprocess.Popen(
            command, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True
        )
    served = _Served(process, host, ports, log)
    deadline = time.monotonic() + START_TIMEOUT
    while not served.ready():
        if process.poll() is not None or time.monotonic() > deadline:
            _stop(served)
            pytest.fail(f"visionllm-edge serve did not become ready; its log ends:\n{served.log_tail()}")
        time.sleep(0.5)
    return served


def _group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    return True


def _stop(served: _Served) -> tuple[int | None, bool]:
    """SIGTERM (what a service manager sends), then SIGKILL to the group if it lingers. Returns the exit
    status (None: it did not exit in time) and whether any process of its group (tritonserver, the stubs)
    outlived it by more than a few seconds."""
    process = served.process
    if process.poll() is None:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(STOP_TIMEOUT)
        except subprocess.TimeoutExpired:
            pass
    status = process.poll()
    deadline = time.monotonic() + 10
    while _group_alive(process.pid) and time.monotonic() < deadline:
        time.sleep(0.2)
    leftover = _group_alive(process.pid)
    if leftover or status is None:
        os.killpg(process.pid, signal.SIGKILL)
    process.wait()
    return status, leftover


@pytest.fixture(scope="module")
def server(shapes_artifact, tmp_path_factory):
    served = _start(shapes_artifact, tmp_path_factory.mktemp("serve"))
    try:
        yield served
    finally:
        _stop(served)


@pytest.fixture(scope="module")
def direct(shapes_artifact):
    return Pipeline.load(shapes_artifact, threads=1)


@pytest.fixture(scope="module")
def clients(server):
    made = {"http": Client(server.http_url, "http"), "grpc": Client(server.grpc_url, "grpc")}
    yield made
    for c in made.values():
        c.close()


def _same(got, want) -> None:
    assert got.text == want.text
    assert list(got.token_ids) == list(want.token_ids)
    assert got.stop_reason == want.stop_reason
    assert [(lk.kind, lk.label, lk.position) for lk in got.links] == [
        (lk.kind, lk.label, lk.position) for lk in want.links
    ]
    assert [(d.label, d.kind) for d in got.detections] == [(d.label, d.kind) for d in want.detections]
    boxes = [np.reshape([d.box_xyxy for d in r.detections], (-1, 4)) for r in (got, want)]
    np.testing.assert_allclose(*boxes, rtol=0, atol=ATOL)
    np.testing.assert_allclose(
        [d.score for d in got.detections], [d.score for d in want.detections], rtol=0, atol=ATOL
    )
    for g, w in zip(got.detections, want.detections):
        assert (g.mask is None) == (w.mask is None)
        if w.mask is not None:
            np.testing.assert_array_equal(g.mask, w.mask)
    assert (got.segmentation is None) == (want.segmentation is None)
    if want.segmentation is not None:
        assert got.segmentation.labels == want.segmentation.labels
        np.testing.assert_array_equal(got.segmentation.label_map, want.segmentation.label_map)
    assert [(p.label, p.keypoint_names) for p in got.poses] == [
        (p.label, p.keypoint_names) for p in want.poses
    ]
    for g, w in zip(got.poses, want.poses):
        np.testing.assert_allclose(g.box_xyxy, w.box_xyxy, rtol=0, atol=ATOL)
        np.testing.assert_allclose(g.keypoints, w.keypoints, rtol=0, atol=5e-4)  # to_json's 3 decimals
    assert len(got.images) == len(want.images)
    for g, w in zip(got.images, want.images):
        np.testing.assert_array_equal(g, w)


def _scene(task: str, index: int) -> np.ndarray:
    return np.asarray(make_sample(task, 2024, index, canonical=True).scene.image.convert("RGB"))


def _png(image: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(image).save(buffer, format="PNG")
    return buffer.getvalue()


def _json(value) -> np.ndarray:
    import json

    return np.array([json.dumps(value).encode()], dtype=object)


def _bytes(text: str) -> np.ndarray:
    return np.array([text.encode()], dtype=object)


#: name -> call(target, image): the same call on a Client and on a Pipeline. Each transport gets its own scene
#: (index 0 for HTTP, 1 for gRPC), so neither request finds the other's frame cached.
TASKS = {
    "vqa": ("vqa", lambda t, im: t(im, "How many circles are there?", max_new_tokens=8)),
    "caption": ("caption", lambda t, im: t(im, "Describe the image briefly.", max_new_tokens=32)),
    "region": (
        "region_caption",
        lambda t, im: t(im, "What is in <region>?", regions=[(20.0, 20.0, 80.0, 70.0)], max_new_tokens=8),
    ),
    "sampled": (
        "vqa",
        lambda t, im: t(im, "What colour is the circle?", do_sample=True, top_k=5, seed=7, max_new_tokens=8),
    ),
    "detect": ("detect", lambda t, im: t.detect(im, ["circle", "square", "triangle", "cross"])),
    "ground": ("ground", lambda t, im: t.ground(im, "the red circle")),
    "segment": ("segment", lambda t, im: t.segment(im, ["circle", "square"])),
    "pose": ("pose", lambda t, im: t.pose(im, ["head", "left hand", "right hand"])),
    "generate": ("vqa", lambda t, im: t.generate_image("a large red circle", seed=3)),
    "edit": ("edit", lambda t, im: t.edit_image(im, "make the square blue", seed=3)),
}


@pytest.mark.parametrize("transport", ["http", "grpc"])
@pytest.mark.parametrize("task", list(TASKS))
def test_every_task_answers_as_a_direct_pipeline_call(clients, direct, transport, task):
    scene_task, call = TASKS[task]  # generate ignores its scene
    image = _scene(scene_task, 0 if transport == "http" else 1)
    got = call(clients[transport], image)
    want = call(direct, image)
    _same(got, want)
    if task == "detect":
        assert got.detections and all(d.mask is not None for d in got.detections)
    if task in ("generate", "edit"):
        assert len(got.images) == 1


def test_an_encoded_png_answers_as_the_raw_array(clients, direct):
    image = _scene("detect", 2)
    got = clients["grpc"].detect(_png(image), ["circle", "square"])
    _same(got, direct.detect(image, ["circle", "square"]))
    assert got.detections


def test_a_refused_stream_is_an_error_and_the_next_stream_answers(clients, direct):
    with pytest.raises(ServerError, match=r"options: unknown key\(s\) \['colour'\]"):
        list(clients["grpc"].stream_inputs({"prompt": _bytes("hi"), "options": _json({"colour": 1})}))
    image = _scene("vqa", 8)
    *_, result = clients["grpc"].stream(image, "How many circles are there?", max_new_tokens=8)
    _same(result, direct(image, "How many circles are there?", max_new_tokens=8))


def test_the_stream_joins_to_the_direct_text_in_more_than_one_piece(clients, direct):
    image = _scene("caption", 3)
    items = list(clients["grpc"].stream(image, "Describe the image briefly.", max_new_tokens=32))
    *pieces, result = items
    want = direct(image, "Describe the image briefly.", max_new_tokens=32)
    assert all(isinstance(p, str) for p in pieces)
    assert len(pieces) > 1
    assert "".join(pieces) == want.text == result.text
    _same(result, want)


#: The ten malformed requests of issue 20: raw inputs (sent as they are, not through encode_request, which
#: refuses some of them itself), and a pattern the error must match: the input or option, and the problem.
MALFORMED = {
    "missing prompt": ({"image_raw": _scene("vqa", 4)}, r"prompt: missing"),
    "undecodable image bytes": (
        {"image": np.frombuffer(b"\x89PNG\r\n\x1a\n not a picture", dtype=np.uint8), "prompt": _bytes("hi")},
        r"image: cannot decode the 22 bytes as PNG or JPEG",
    ),
    "image_raw with 4 channels": (
        {"image_raw": np.zeros((8, 8, 4), np.uint8), "prompt": _bytes("hi")},
        r"image_raw.*\[8, ?8, ?4\]",
    ),
    "regions of shape [2, 3]": (
        {
            "image_raw": _scene("vqa", 4),
            "prompt": _bytes("<region> <region>"),
            "regions": np.zeros((2, 3), np.float32),
        },
        r"regions.*\[2, ?3\]",
    ),
    "options not JSON": (
        {"prompt": _bytes("hi"), "options": _bytes("{max_new_tokens: 4")},
        r"options: not JSON",
    ),
    "unknown option key": (
        {"prompt": _bytes("hi"), "options": _json({"max_new_tokens": 4, "colour": "red"})},
        r"options: unknown key\(s\) \['colour'\]",
    ),
    "max_new_tokens 0": (
        {"prompt": _bytes("hi"), "options": _json({"max_new_tokens": 0})},
        r"max_new_tokens must be positive, got 0",
    ),
    "prompt over the context": (
        {"prompt": _bytes("circle " * 5000)},
        r"the prompt is \d+ tokens; the context holds \d+",
    ),
    "task needing classes without them": (
        {"image_raw": _scene("vqa", 4), "prompt": _bytes(""), "options": _json({"task": "detect"})},
        r"options.classes: task 'detect' needs it",
    ),
    "wrong dtype for image": (
        {"image": np.zeros(16, np.float32), "prompt": _bytes("hi")},
        r"image\b.*UINT8",
    ),
}


@pytest.mark.parametrize("transport", ["http", "grpc"])
@pytest.mark.parametrize("case", list(MALFORMED))
def test_a_malformed_request_gets_an_error_naming_it_and_the_next_good_one_answers(
    clients, direct, transport, case
):
    inputs, pattern = MALFORMED[case]
    with pytest.raises(ServerError, match=pattern):
        clients[transport].infer(inputs)
    # The same refusal in this process (and the direct pipeline's history stays the server's).
    with pytest.raises(ValueError, match=pattern):
        protocol.run_request(direct, inputs)
    image = _scene("vqa", 5)
    got = clients[transport].run(image, "How many squares are there?", max_new_tokens=8)
    _same(got, direct(image, "How many squares are there?", max_new_tokens=8))


def _counters(server) -> dict[str, float]:
    with urllib.request.urlopen(server.metrics_url, timeout=10) as r:
        text = r.read().decode()
    found = {}
    for line in text.splitlines():
        m = re.match(r'^(nv_inference_\w+)\{[^}]*model="visionllm"[^}]*\} (\S+)$', line)
        if m:
            found[m.group(1)] = found.get(m.group(1), 0.0) + float(m.group(2))
    return found


def test_the_metrics_endpoint_counts_our_requests_and_their_latency(server, clients, direct):
    before = _counters(server)
    image = _scene("vqa", 6)
    for transport in ("http", "grpc"):
        _same(
            clients[transport].run(image, "How many circles are there?", max_new_tokens=4),
            direct(image, "How many circles are there?", max_new_tokens=4),
        )
    after = _counters(server)
    assert after["nv_inference_request_success"] == before.get("nv_inference_request_success", 0) + 2
    assert after["nv_inference_count"] == before.get("nv_inference_count", 0) + 2
    assert after["nv_inference_request_duration_us"] > before.get("nv_inference_request_duration_us", 0)
    assert after["nv_inference_compute_infer_duration_us"] > before.get(
        "nv_inference_compute_infer_duration_us", 0
    )


def _listening(port: int) -> set[str]:
    """The local addresses that listen on TCP `port` (IPv4 and IPv6), from /proc/net/tcp{,6}."""
    found = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            lines = Path(table).read_text().splitlines()[1:]
        except OSError:
            continue
        for line in lines:
            local, state = line.split()[1], line.split()[3]
            address, hex_port = local.split(":")
            if state == "0A" and int(hex_port, 16) == port:  # 0A: LISTEN
                found.add(address)
    return found


def test_every_endpoint_listens_on_loopback_only(server):
    if not Path("/proc/net/tcp").exists():
        pytest.skip("no /proc/net/tcp on this system to read the listening sockets from")
    # 127.0.0.1 as the kernel writes it (little-endian hex), and as an IPv4-mapped IPv6 address (gRPC's).
    loopback = {"0100007F", "0000000000000000FFFF00000100007F"}
    for name, port in server.ports.items():
        listening = _listening(port)
        assert listening and listening <= loopback, f"{name} port {port} listens on {listening}"


def test_sigterm_stops_the_server_and_its_children(shapes_artifact, tmp_path):
    """A server of its own (the module's keeps serving): two instances answer two requests at once, then
    SIGTERM ends it with status 0 and no process of its group is left."""
    served = _start(shapes_artifact, tmp_path, instances=2)
    try:
        from concurrent.futures import ThreadPoolExecutor

        image = _scene("vqa", 7)

        def ask(_):
            with Client(served.grpc_url, "grpc") as client:
                return client.run(image, "How many circles are there?", max_new_tokens=8)

        with ThreadPoolExecutor(2) as pool:
            answers = list(pool.map(ask, range(2)))
        want = Pipeline.load(shapes_artifact, threads=1)(
            image, "How many circles are there?", max_new_tokens=8
        )
        assert [a.text for a in answers] == [want.text, want.text]
    finally:
        status, leftover = _stop(served)
    assert status == 0, served.log_tail()
    assert not leftover, "processes of the server's group outlived it"
