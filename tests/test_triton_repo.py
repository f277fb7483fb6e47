"""`visionllm-edge triton-repo`: the model repository, parsed back as Triton's own `ModelConfig`, and served
by a standalone `tritonserver` (the nvidia-pytriton wheel's binary, `serving.local`) on loopback.

The served repository is tiny-random's with the artifact copied in (the relative path a shipped repository
uses), one instance of each model with one thread per graph. Every answer is compared with a direct
`Pipeline` call on the same input in this process: identical text and token ids, boxes and scores within
1e-5, masks, semantic maps and images equal, keypoints to the 3 decimals the JSON carries. The direct
pipelines run the same requests in the same order as the served ones (`direct` mirrors `visionllm`'s
instance, `direct_stream` the stream's): a pipeline reuses the KV rows of its previous request on the same
frame, which moves the last bits of a box (1.3e-5 px seen with two instances, whose histories differ), so
only pipelines with the same history can be held to 1e-5. The server starts once for the module, is waited
for with a bound, and is always stopped.
"""

from __future__ import annotations

import io
import urllib.request

import numpy as np
import pytest
from conftest import scene
from PIL import Image

pytest.importorskip("tritonclient.grpc", reason="the serve extra (tritonclient[grpc]) is not installed")
pytest.importorskip("tritonclient.http", reason="the serve extra (tritonclient[http]) is not installed")
pytest.importorskip(
    "pytriton", reason="the serve extra (nvidia-pytriton: the tritonserver binary) is not installed"
)

import tritonclient.grpc as grpcclient  # noqa: E402
import tritonclient.http as httpclient  # noqa: E402
from google.protobuf import text_format  # noqa: E402
from tritonclient.grpc import model_config_pb2  # noqa: E402
from tritonclient.utils import InferenceServerException, np_to_triton_dtype  # noqa: E402
from visionllm_edge.cli import main as cli_main  # noqa: E402
from visionllm_edge.manifest import ManifestError  # noqa: E402
from visionllm_edge.pipeline import Pipeline  # noqa: E402
from visionllm_edge.serving import protocol, repository  # noqa: E402
from visionllm_edge.serving.local import LocalTritonServer, stub_environment  # noqa: E402

ATOL = 1e-5
#: Seconds a request may take on the loaded 2-core machine before the test fails rather than waits.
REQUEST_TIMEOUT = 120


def _parse(path) -> model_config_pb2.ModelConfig:
    return text_format.Parse(path.read_text(), model_config_pb2.ModelConfig())


# --- the repository ---------------------------------------------------------------------------------------


def test_each_config_parses_as_tritons_model_config_with_the_protocols_tensors(tiny_artifact, tmp_path):
    out = repository.write_repository(tiny_artifact, tmp_path / "repo", instances=3, threads=2)
    assert sorted(p.name for p in out.iterdir()) == [repository.MODEL, repository.STREAM_MODEL]
    types = {v: k for k, v in model_config_pb2.DataType.items()}
    for name, decoupled, outputs in (
        (repository.MODEL, False, protocol.OUTPUTS),
        (repository.STREAM_MODEL, True, protocol.STREAM_OUTPUTS),
    ):
        config = _parse(out / name / "config.pbtxt")
        assert config.name == name and config.backend == "python" and config.max_batch_size == 0
        got = [(t.name, types[t.data_type], list(t.dims), t.optional) for t in config.input]
        want = [(s.name, repository.triton_type(s.dtype), list(s.shape), s.optional) for s in protocol.INPUTS]
        assert got == want
        got = [(t.name, types[t.data_type], list(t.dims)) for t in config.output]
        assert got == [(s.name, repository.triton_type(s.dtype), list(s.shape)) for s in outputs]
        assert [(g.count, g.kind) for g in config.instance_group] == [
            (3, model_config_pb2.ModelInstanceGroup.KIND_CPU)
        ]
        params = {k: v.string_value for k, v in config.parameters.items()}
        assert params == {"artifact": str(tiny_artifact.absolute()), "threads": "2", "providers": ""}
        assert config.model_transaction_policy.decoupled is decoupled
        # The round trip: protobuf's own text of the parsed config parses to the same message.
        again = text_format.Parse(text_format.MessageToString(config), model_config_pb2.ModelConfig())
        assert again == config
        assert (out / name / "1" / "model.py").read_text().count("import TritonPythonModel") == 1


def test_the_protocol_dtypes_map_to_tritons_types():
    assert repository.triton_type(np.uint8) == "TYPE_UINT8"
    assert repository.triton_type(np.float32) == "TYPE_FP32"
    assert repository.triton_type(np.object_) == "TYPE_STRING"
    with pytest.raises(ValueError, match="no Triton type for the protocol dtype float64"):
        repository.triton_type(np.float64)


def test_copy_artifact_makes_a_self_contained_repository(tiny_artifact, tmp_path):
    out = repository.write_repository(tiny_artifact, tmp_path / "repo", copy_artifact=True)
    copied = out / repository.MODEL / repository.COPIED_ARTIFACT
    assert sorted(p.name for p in copied.iterdir()) == sorted(p.name for p in tiny_artifact.iterdir())
    for name in (repository.MODEL, repository.STREAM_MODEL):
        params = _parse(out / name / "config.pbtxt").parameters
        assert params["artifact"].string_value == f"{repository.MODEL}/{repository.COPIED_ARTIFACT}"


def test_an_existing_non_empty_out_is_refused_by_name_and_nothing_is_left_beside_it(tiny_artifact, tmp_path):
    out = tmp_path / "repo"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    with pytest.raises(FileExistsError, match=f"{out} exists and is not an empty folder"):
        repository.write_repository(tiny_artifact, out)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["repo"]
    assert (out / "keep.txt").read_text() == "mine"
    empty = tmp_path / "empty"
    empty.mkdir()
    assert (repository.write_repository(tiny_artifact, empty) / repository.MODEL / "config.pbtxt").is_file()


def test_a_folder_that_is_not_an_artifact_is_refused_naming_its_manifest(tmp_path):
    (tmp_path / "nothing").mkdir()
    with pytest.raises(ManifestError, match="manifest.json"):
        repository.write_repository(tmp_path / "nothing", tmp_path / "repo")
    assert not (tmp_path / "repo").exists()


def test_bad_instances_and_threads_are_refused_by_option():
    with pytest.raises(ValueError, match="--instances must be at least 1, got 0"):
        repository.config_pbtxt("m", "/a", instances=0)
    with pytest.raises(ValueError, match="--threads must be 0 .* got -1"):
        repository.config_pbtxt("m", "/a", threads=-1)


def test_the_command_writes_the_repository_and_names_an_existing_out(tiny_artifact, tmp_path, capsys):
    out = tmp_path / "repo"
    assert cli_main(["triton-repo", str(tiny_artifact), str(out), "--instances", "2", "--threads", "1"]) == 0
    assert "tritonserver --model-repository" in capsys.readouterr().out
    assert _parse(out / repository.MODEL / "config.pbtxt").instance_group[0].count == 2
    assert cli_main(["triton-repo", str(tiny_artifact), str(out)]) == 2
    assert f"{out} exists and is not an empty folder" in capsys.readouterr().err


# --- served by a standalone tritonserver ------------------------------------------------------------------


@pytest.fixture(scope="module")
def server(tiny_artifact, tmp_path_factory):
    work = tmp_path_factory.mktemp("triton")
    repo = repository.write_repository(
        tiny_artifact, work / "repo", instances=1, threads=1, copy_artifact=True
    )
    env = stub_environment(tmp_path_factory.getbasetemp() / "stub-env")
    with LocalTritonServer(repo, work / "server", python_env=env) as running:
        yield running


@pytest.fixture(scope="module")
def direct(tiny_artifact):
    """The twin of the `visionllm` instance: every test sends its request to the server, then here."""
    return Pipeline.load(tiny_artifact, threads=1)


@pytest.fixture(scope="module")
def direct_stream(tiny_artifact):
    """The twin of the `visionllm_stream` instance."""
    return Pipeline.load(tiny_artifact, threads=1)


def _infer_http(server, inputs: dict) -> dict:
    client = httpclient.InferenceServerClient(server.http_url, network_timeout=REQUEST_TIMEOUT)
    tensors = []
    for name, value in inputs.items():
        tensor = httpclient.InferInput(name, list(value.shape), np_to_triton_dtype(value.dtype))
        tensor.set_data_from_numpy(value)
        tensors.append(tensor)
    wanted = [httpclient.InferRequestedOutput(s.name) for s in protocol.OUTPUTS]
    response = client.infer(repository.MODEL, tensors, outputs=wanted)
    return {s.name: response.as_numpy(s.name) for s in protocol.OUTPUTS}


def _grpc_inputs(inputs: dict) -> list:
    tensors = []
    for name, value in inputs.items():
        tensor = grpcclient.InferInput(name, list(value.shape), np_to_triton_dtype(value.dtype))
        tensor.set_data_from_numpy(value)
        tensors.append(tensor)
    return tensors


def _infer_grpc(server, inputs: dict) -> dict:
    client = grpcclient.InferenceServerClient(server.grpc_url)
    response = client.infer(repository.MODEL, _grpc_inputs(inputs), client_timeout=REQUEST_TIMEOUT)
    return {s.name: response.as_numpy(s.name) for s in protocol.OUTPUTS}


def _same(got, want) -> None:
    assert got.text == want.text
    assert list(got.token_ids) == list(want.token_ids)
    assert [d.label for d in got.detections] == [d.label for d in want.detections]
    np.testing.assert_allclose(
        np.reshape([d.box_xyxy for d in got.detections], (-1, 4)),
        np.reshape([d.box_xyxy for d in want.detections], (-1, 4)),
        rtol=0,
        atol=ATOL,
    )
    np.testing.assert_allclose(
        [d.score for d in got.detections], [d.score for d in want.detections], rtol=0, atol=ATOL
    )
    for g, w in zip(got.detections, want.detections):
        assert (g.mask is None) == (w.mask is None)
        if w.mask is not None:
            np.testing.assert_array_equal(g.mask, w.mask)
    assert [p.label for p in got.poses] == [p.label for p in want.poses]
    np.testing.assert_allclose(
        np.reshape([p.box_xyxy for p in got.poses], (-1, 4)),
        np.reshape([p.box_xyxy for p in want.poses], (-1, 4)),
        rtol=0,
        atol=ATOL,
    )
    np.testing.assert_allclose(
        np.reshape([p.keypoints for p in got.poses], (-1, 3)),
        np.reshape([np.round(p.keypoints, 3) for p in want.poses], (-1, 3)),
        rtol=0,
        atol=1e-4,  # float32 of the JSON's 3 decimals against the float32 rounded here
    )
    assert (got.segmentation is None) == (want.segmentation is None)
    if want.segmentation is not None:
        assert got.segmentation.labels == want.segmentation.labels
        np.testing.assert_array_equal(got.segmentation.label_map, want.segmentation.label_map)
    assert len(got.images) == len(want.images)
    for g, w in zip(got.images, want.images):
        np.testing.assert_array_equal(g, w)


def _png(image: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(image).save(buffer, format="PNG")
    return buffer.getvalue()


IMAGE = scene(3, 120, 90)

#: name -> (request keywords for protocol.encode_request, the direct Pipeline call on the same input)
TASKS = {
    "vqa": (
        dict(image=IMAGE, prompt="What is in the image?", max_new_tokens=8, repetition_penalty=1.3),
        lambda p: p(IMAGE, "What is in the image?", max_new_tokens=8, repetition_penalty=1.3),
    ),
    "region": (
        dict(
            image=IMAGE, prompt="What is in <region>?", regions=[(10.0, 10.0, 60.0, 50.0)], max_new_tokens=6
        ),
        lambda p: p(IMAGE, "What is in <region>?", regions=[(10.0, 10.0, 60.0, 50.0)], max_new_tokens=6),
    ),
    "detect": (
        dict(image=IMAGE, prompt="", task="detect", classes=["circle", "square"]),
        lambda p: p.detect(IMAGE, ["circle", "square"]),
    ),
    "ground": (
        dict(image=IMAGE, prompt="", task="ground", phrase="the red circle"),
        lambda p: p.ground(IMAGE, "the red circle"),
    ),
    "segment": (
        dict(image=IMAGE, prompt="", task="segment", classes=["sky", "grass"]),
        lambda p: p.segment(IMAGE, ["sky", "grass"]),
    ),
    "pose": (
        dict(image=IMAGE, prompt="", task="pose", keypoints=["nose", "left eye"]),
        lambda p: p.pose(IMAGE, ["nose", "left eye"]),
    ),
    "generate": (
        dict(prompt="a large red circle", task="generate", seed=3),
        lambda p: p.generate_image("a large red circle", seed=3),
    ),
    "edit": (
        dict(image=IMAGE, prompt="make the square blue", task="edit", seed=3),
        lambda p: p.edit_image(IMAGE, "make the square blue", seed=3),
    ),
}


def test_the_health_readiness_and_model_endpoints_answer(server):
    for path in (
        "/v2/health/live",
        "/v2/health/ready",
        "/v2/models/visionllm/ready",
        "/v2/models/visionllm_stream/ready",
    ):
        with urllib.request.urlopen(f"http://{server.http_url}{path}", timeout=10) as r:
            assert r.status == 200, path
    client = grpcclient.InferenceServerClient(server.grpc_url)
    assert client.is_server_ready() and client.is_model_ready(repository.MODEL)
    metadata = client.get_model_metadata(repository.MODEL, as_json=True)
    assert [t["name"] for t in metadata["inputs"]] == [s.name for s in protocol.INPUTS]
    assert [t["name"] for t in metadata["outputs"]] == [s.name for s in protocol.OUTPUTS]


@pytest.mark.parametrize("transport", ["http", "grpc"])
@pytest.mark.parametrize("task", list(TASKS))
def test_every_task_answers_as_a_direct_pipeline_call(server, direct, transport, task):
    request, call = TASKS[task]
    infer = _infer_http if transport == "http" else _infer_grpc
    got = protocol.decode_response(infer(server, protocol.encode_request(**request)))
    _same(got, call(direct))


def test_an_encoded_png_answers_as_the_raw_array(server, direct):
    inputs = protocol.encode_request(image=None, prompt="", task="detect", classes=["circle"])
    inputs["image"] = np.frombuffer(_png(IMAGE), dtype=np.uint8)
    _same(protocol.decode_response(_infer_grpc(server, inputs)), direct.detect(IMAGE, ["circle"]))


def test_the_stream_joins_to_the_direct_text_in_more_than_one_piece(server, direct_stream):
    import queue

    responses: queue.Queue = queue.Queue()
    client = grpcclient.InferenceServerClient(server.grpc_url)
    client.start_stream(callback=lambda result, error: responses.put((result, error)))
    try:
        inputs = protocol.encode_request(
            image=IMAGE, prompt="Describe the image.", max_new_tokens=12, repetition_penalty=1.3
        )
        client.async_stream_infer(
            repository.STREAM_MODEL, _grpc_inputs(inputs), enable_empty_final_response=True
        )
        pieces, final = [], None
        while final is None:
            result, error = responses.get(timeout=REQUEST_TIMEOUT)
            assert error is None, error
            params = result.get_response().parameters
            outputs = {o.name for o in result.get_response().outputs}
            if "text" in outputs:
                pieces.append(result.as_numpy("text")[0].decode("utf-8"))
            if params["triton_final_response"].bool_param:
                final = result
    finally:
        client.stop_stream()
    want = direct_stream(IMAGE, "Describe the image.", max_new_tokens=12, repetition_penalty=1.3)
    assert len(pieces) > 1
    assert "".join(pieces) == want.text
    got = protocol.decode_response({s.name: final.as_numpy(s.name) for s in protocol.OUTPUTS})
    _same(got, want)


@pytest.mark.parametrize(
    "inputs, message",
    [
        (
            {
                "image": np.frombuffer(b"not a picture", dtype=np.uint8),
                "prompt": np.array([b"hi"], dtype=object),
            },
            "image",
        ),
        (
            {
                "prompt": np.array([b"hi"], dtype=object),
                "options": np.array([b'{"colour": 1}'], dtype=object),
            },
            "colour",
        ),
    ],
    ids=["undecodable image", "unknown option"],
)
def test_a_malformed_request_gets_our_message_and_the_next_good_one_answers(server, direct, inputs, message):
    with pytest.raises(InferenceServerException, match=message):
        _infer_grpc(server, inputs)
    request, call = TASKS["detect"]
    _same(protocol.decode_response(_infer_http(server, protocol.encode_request(**request))), call(direct))


def test_the_metrics_endpoint_counts_our_requests_and_their_latency(server, direct):
    def counters() -> dict:
        with urllib.request.urlopen(server.metrics_url, timeout=10) as r:
            text = r.read().decode()
        found = {}
        for line in text.splitlines():
            if line.startswith(("nv_inference_request_success", "nv_inference_request_duration_us")) and (
                'model="visionllm"' in line
            ):
                name, value = line.rsplit(" ", 1)
                found[name.split("{")[0]] = float(value)
        return found

    before = counters()
    request, call = TASKS["vqa"]
    for _ in range(2):
        _same(protocol.decode_response(_infer_grpc(server, protocol.encode_request(**request))), call(direct))
    after = counters()
    assert after["nv_inference_request_success"] == before.get("nv_inference_request_success", 0) + 2
    assert after["nv_inference_request_duration_us"] > before.get("nv_inference_request_duration_us", 0)
