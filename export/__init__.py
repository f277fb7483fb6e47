"""visionllm_edge.export: the host side (needs the `[export]` extra and torch).

PyTorch reference model with the official parameter names, official-format checkpoint loading and
saving, the reference request loop, and (later) ONNX export and validation.
"""
