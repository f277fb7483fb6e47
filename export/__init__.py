"""visionllm_edge.export: the host side (needs the `[export]` extra and torch).

PyTorch reference model with the official parameter names, official-format checkpoint loading and
saving, the reference request loop, and (later) ONNX export and validation.
"""

from visionllm_edge.export.checkpoint import CheckpointError, load_reference, save_official
from visionllm_edge.export.config import ConfigError, ModelConfig, named_config
from visionllm_edge.export.model import VisionLLMv2, build_model
from visionllm_edge.export.reference import ForwardOutput, PostProcessSettings, ReferencePipeline
from visionllm_edge.export.tokenizer import ChatTokenizer


def load_component(name: str, directory):
    """Builds one decoder alone from an official sub-config and a state dict in official key names.

    `load_component("unipose", folder)` reads `unipose_config.json` and `unipose_state_dict.pt` (the layout
    of the golden UniPose set).
    """
    if name == "unipose":
        from visionllm_edge.export.models.unipose import load_unipose_component

        return load_unipose_component(directory)
    raise ValueError(f"unknown component {name!r}; known: 'unipose'")


__all__ = [
    "ChatTokenizer",
    "CheckpointError",
    "ConfigError",
    "ForwardOutput",
    "ModelConfig",
    "PostProcessSettings",
    "ReferencePipeline",
    "VisionLLMv2",
    "build_model",
    "load_component",
    "load_reference",
    "named_config",
    "save_official",
]
