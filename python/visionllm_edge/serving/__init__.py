"""Serving on NVIDIA Triton Inference Server (docs/serving.md).

`protocol` (the tensors and their conversions, no Triton import), `server` (`visionllm-edge serve`, on
PyTriton), `client` (`Client`, on tritonclient), `repository` (`visionllm-edge triton-repo`, a model
repository for a standalone tritonserver). Only `protocol` is importable without the `serve` extra.
"""

# tritonclient is imported when a Client is made, so this import needs no serving package.
from visionllm_edge.serving.client import Client, ServerError

__all__ = ["Client", "ServerError"]
