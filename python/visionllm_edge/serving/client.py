"""`Client`: requests to a served artifact (`visionllm-edge serve`, or a `triton-repo` repository) through
tritonclient, answered with the `Result` objects `Pipeline` returns.

    client = Client("127.0.0.1:8001", protocol="grpc")   # or Client("127.0.0.1:8000") over HTTP
    client.detect(frame, ["person", "car"]).detections
    for piece in client.stream(frame, "Describe the scene."):
        print(piece)   # text pieces, then the Result (gRPC only)

The request and the result are `protocol`'s (`encode_request`, `decode_response`), so a served answer
compares with a direct `Pipeline` call: same text, token ids, boxes and scores (float32, exact), masks and
images; links come without their hidden states and keypoints to 3 decimals, as `Result.to_json` writes them.
"""

from __future__ import annotations

import queue
import re
from collections.abc import Iterator

import numpy as np

from visionllm_edge.results import Result
from visionllm_edge.serving import protocol

MODEL = "visionllm"
STREAM_MODEL = "visionllm_stream"


class ServerError(RuntimeError):
    """The server refused or failed a request; the message is the server's (ours for a malformed one)."""


def _server_message(text: str) -> str:
    """The error an answer carries, without the traceback PyTriton wraps around it: its last
    `SomeError: message` line (ours for a malformed request); the whole text when there is none."""
    for line in reversed(text.splitlines()):
        m = re.match(r"^\s*(?:[\w.]+\.)?(\w+(?:Error|Exception)): (.+)$", line)
        if m and m.group(1) != "TritonModelException":
            return f"{m.group(1)}: {m.group(2)}"
    return text


def _tritonclient(protocol_name: str):
    try:
        if protocol_name == "http":
            import tritonclient.http as module
        else:
            import tritonclient.grpc as module
    except ImportError as e:
        raise ModuleNotFoundError(
            f"Client(protocol={protocol_name!r}) needs tritonclient[{protocol_name}] (pip install "
            f"'visionllm-edge[serve]'): {e}"
        ) from None
    return module


class Client:
    """Requests to the `visionllm` / `visionllm_stream` models of one Triton server.

    Args:
        url: `host:port` of the server's HTTP (default port 8000) or gRPC (8001) endpoint.
        protocol: "http" or "grpc".
        timeout: seconds one request may take before it fails.
    """

    def __init__(self, url: str, protocol: str = "http", timeout: float = 300.0):
        if protocol not in ("http", "grpc"):
            raise ValueError(f"protocol must be 'http' or 'grpc', got {protocol!r}")
        if timeout <= 0:
            raise ValueError(f"timeout must be positive, got {timeout}")
        self.url = url
        self.protocol = protocol
        self.timeout = float(timeout)
        self._module = _tritonclient(protocol)
        from tritonclient.utils import InferenceServerException

        self._exception = InferenceServerException
        if protocol == "http":
            self._client = self._module.InferenceServerClient(
                url, connection_timeout=self.timeout, network_timeout=self.timeout
            )
        else:
            self._client = self._module.InferenceServerClient(url)

    def close(self) -> None:
        self._client.close()

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def is_ready(self) -> bool:
        """Whether the server and both models are ready."""
        try:
            return bool(
                self._client.is_server_ready()
                and self._client.is_model_ready(MODEL)
                and self._client.is_model_ready(STREAM_MODEL)
            )
        except (self._exception, OSError, ConnectionError):
            return False

    # --- requests -----------------------------------------------------------------------------------------

    def _inputs(self, inputs: dict[str, np.ndarray]) -> list:
        from tritonclient.utils import np_to_triton_dtype

        tensors = []
        for name, value in inputs.items():
            tensor = self._module.InferInput(name, list(value.shape), np_to_triton_dtype(value.dtype))
            tensor.set_data_from_numpy(value)
            tensors.append(tensor)
        return tensors

    def infer(self, inputs: dict[str, np.ndarray]) -> Result:
        """Sends protocol inputs as they are (`protocol.encode_request` makes them) and decodes the answer."""
        outputs = [self._module.InferRequestedOutput(s.name) for s in protocol.OUTPUTS]
        try:
            if self.protocol == "http":
                response = self._client.infer(MODEL, self._inputs(inputs), outputs=outputs)
            else:
                response = self._client.infer(
                    MODEL, self._inputs(inputs), outputs=outputs, client_timeout=self.timeout
                )
        except self._exception as e:
            raise ServerError(_server_message(e.message())) from None
        return protocol.decode_response({s.name: response.as_numpy(s.name) for s in protocol.OUTPUTS})

    def run(self, image, prompt: str, regions=None, **options) -> Result:
        """One free request (the image and prompt of `Pipeline.__call__`; `protocol.OPTION_TYPES` options:
        max_new_tokens, do_sample, temperature, top_k, top_p, repetition_penalty, seed, instruction)."""
        return self.infer(protocol.encode_request(image, prompt, regions, **options))

    def __call__(self, image, prompt: str, regions=None, **options) -> Result:
        """`run`, called as a `Pipeline` is."""
        return self.run(image, prompt, regions, **options)

    def detect(self, image, classes, **options) -> Result:
        return self.infer(protocol.encode_request(image, "", task="detect", classes=list(classes), **options))

    def ground(self, image, phrase: str, **options) -> Result:
        return self.infer(protocol.encode_request(image, "", task="ground", phrase=phrase, **options))

    def segment(self, image, classes, **options) -> Result:
        return self.infer(
            protocol.encode_request(image, "", task="segment", classes=list(classes), **options)
        )

    def pose(self, image, keypoint_names, objects=None, **options) -> Result:
        objects = None if objects is None else list(objects)
        inputs = protocol.encode_request(
            image, "", task="pose", keypoints=list(keypoint_names), objects=objects, **options
        )
        return self.infer(inputs)

    def generate_image(self, prompt: str, **options) -> Result:
        return self.infer(protocol.encode_request(None, prompt, task="generate", **options))

    def edit_image(self, image, instruction: str, **options) -> Result:
        return self.infer(protocol.encode_request(image, instruction, task="edit", **options))

    def stream(self, image, prompt: str, regions=None, **options) -> Iterator[str | Result]:
        """Yields the answer's text pieces as the server decodes them, then the `Result` (gRPC only:
        tritonclient's HTTP client has no streaming)."""
        return self.stream_inputs(protocol.encode_request(image, prompt, regions, **options))

    def stream_inputs(self, inputs: dict[str, np.ndarray]) -> Iterator[str | Result]:
        """`stream` of protocol inputs as they are."""
        if self.protocol != "grpc":
            raise ValueError(
                "stream needs Client(url, protocol='grpc'): tritonclient's HTTP client cannot read a "
                "decoupled model's responses"
            )
        tensors = self._inputs(inputs)
        responses: queue.Queue = queue.Queue()
        # A stream of its own per call: tritonclient allows one open stream per client.
        client = self._module.InferenceServerClient(self.url)
        client.start_stream(callback=lambda result, error: responses.put((result, error)))
        try:
            client.async_stream_infer(STREAM_MODEL, tensors, enable_empty_final_response=True)
            while True:
                try:
                    result, error = responses.get(timeout=self.timeout)
                except queue.Empty:
                    raise TimeoutError(f"{STREAM_MODEL}: no response within {self.timeout:.0f} s") from None
                if error is not None:
                    raise ServerError(_server_message(error.message()))
                response = result.get_response()
                names = {o.name for o in response.outputs}
                if "text" in names:
                    yield result.as_numpy("text")[0].decode("utf-8")
                if "result" in names:
                    yield protocol.decode_response(
                        {s.name: result.as_numpy(s.name) for s in protocol.OUTPUTS}
                    )
                if response.parameters["triton_final_response"].bool_param:
                    return
        finally:
            client.stop_stream()
            client.close()
