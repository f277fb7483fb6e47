"""visionllm-edge: compiled, offline VisionLLM v2 for Jetson, discrete GPUs and CPUs.

`import visionllm_edge` never imports torch; only `visionllm_edge.export` needs the `[export]` extra.
"""

from visionllm_edge.contract import compare
from visionllm_edge.results import Detection, Link, Pose, Result, SemanticMap

__version__ = "0.1.0"

__all__ = ["Detection", "Link", "Pipeline", "Pose", "Result", "SemanticMap", "compare", "__version__"]


def __getattr__(name: str):
    # The runtime pulls in ONNX Runtime and the C++ core; load it only when asked for.
    if name == "Pipeline":
        from visionllm_edge.pipeline import Pipeline

        return Pipeline
    raise AttributeError(f"module 'visionllm_edge' has no attribute {name!r}")
