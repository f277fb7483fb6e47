"""The Triton Python backend model of a `visionllm-edge triton-repo` repository.

Each repository model's `1/model.py` is one import of `TritonPythonModel` from here, so the code a server runs
is the installed package's, never a copy that drifts from it. Triton runs one backend stub process per model
instance; `initialize` loads one `Pipeline` there from the artifact the model's `parameters` name, so N
instances answer N requests at once. Requests are decoded and results encoded by `protocol` (the same code as
`visionllm-edge serve`); a request that fails gets an error response carrying our message, and the instance
goes on serving.

Importable only inside a backend stub (`triton_python_backend_utils` exists nowhere else).
"""

from __future__ import annotations

import json
from pathlib import Path

import triton_python_backend_utils as pb_utils

from visionllm_edge import contract
from visionllm_edge.manifest import load_manifest
from visionllm_edge.pipeline import Pipeline
from visionllm_edge.serving import protocol, repository


def _parameters(config: dict) -> dict[str, str]:
    return {k: v["string_value"] for k, v in config.get("parameters", {}).items()}


def _artifact_path(value: str, model_dir: str) -> Path:
    """The `artifact` parameter: absolute, or relative to the model repository (the model folder's parent)."""
    path = Path(value)
    return path if path.is_absolute() else Path(model_dir).parent / path


def _components(artifact: Path) -> list[str]:
    """The artifact's components (`contract.COMPONENT_GRAPHS`'s names) that have a graph in it."""
    graphs = load_manifest(artifact, verify_hashes=False).graphs
    return [c for c, names in contract.COMPONENT_GRAPHS.items() if any(n in graphs for n in names)]


class TritonPythonModel:
    """`visionllm` (a response per request) or `visionllm_stream` (decoupled: pieces, then the result)."""

    def initialize(self, args: dict) -> None:
        config = json.loads(args["model_config"])
        params = _parameters(config)
        missing = [k for k in repository.REQUIRED_PARAMETERS if k not in params]
        if missing:
            raise ValueError(
                f"{args['model_repository']}/config.pbtxt: parameters {missing} missing (write the "
                "repository with visionllm-edge triton-repo)"
            )
        providers = [p for p in params.get("providers", "").split(",") if p]
        artifact = _artifact_path(params["artifact"], args["model_repository"])
        # Every graph now rather than on first use: readiness then means every task is ready, no request pays
        # for making a session, and an instance's memory is what it stays at (with graphs made on first use,
        # instances that had not yet seen every task grew by up to 60 % under the load test).
        self.pipeline = Pipeline.load(
            artifact,
            providers=providers or None,
            threads=int(params["threads"]),
            components=_components(artifact),
        )
        self.decoupled = pb_utils.using_decoupled_model_transaction_policy(config)
        self.input_names = [spec.name for spec in protocol.INPUTS]

    def _inputs(self, request) -> dict:
        inputs = {}
        for name in self.input_names:
            tensor = pb_utils.get_input_tensor_by_name(request, name)
            if tensor is not None:
                inputs[name] = tensor.as_numpy()
        return inputs

    @staticmethod
    def _response(outputs: dict) -> pb_utils.InferenceResponse:
        return pb_utils.InferenceResponse([pb_utils.Tensor(name, value) for name, value in outputs.items()])

    @staticmethod
    def _error(e: Exception) -> pb_utils.InferenceResponse:
        return pb_utils.InferenceResponse(error=pb_utils.TritonError(protocol.error_message(e)))

    def execute(self, requests):
        if self.decoupled:
            for request in requests:
                self._stream(request)
            return None
        responses = []
        for request in requests:
            try:
                responses.append(self._response(protocol.run_request(self.pipeline, self._inputs(request))))
            except Exception as e:  # every failure is this request's, answered; the instance keeps serving
                responses.append(self._error(e))
        return responses

    def _stream(self, request) -> None:
        """Sends each piece as it is decoded; the last response (the one with the result) carries the FINAL
        flag, so a client sees exactly the stream `protocol.stream_request` yields and no empty tail."""
        sender = request.get_response_sender()
        final = pb_utils.TRITONSERVER_RESPONSE_COMPLETE_FINAL
        pending = None
        try:
            for outputs in protocol.stream_request(self.pipeline, self._inputs(request)):
                if pending is not None:
                    sender.send(self._response(pending))
                pending = outputs
        except Exception as e:
            if pending is not None:
                sender.send(self._response(pending))
            sender.send(self._error(e), flags=final)
            return
        if pending is None:
            sender.send(flags=final)
        else:
            sender.send(self._response(pending), flags=final)

    def finalize(self) -> None:
        self.pipeline = None
