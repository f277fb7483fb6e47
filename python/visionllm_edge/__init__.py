"""visionllm-edge: compiled, offline VisionLLM v2 for Jetson, discrete GPUs and CPUs.

`import visionllm_edge` never imports torch; only `visionllm_edge.export` needs the `[export]` extra.
"""

from visionllm_edge.contract import compare
from visionllm_edge.results import Detection, Link, Pose, Result, SemanticMap

__version__ = "0.1.0"

__all__ = ["Detection", "Link", "Pose", "Result", "SemanticMap", "compare", "__version__"]
