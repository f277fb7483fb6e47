"""visionllm_edge.runtime: inference engines (ONNX Runtime, TensorRT). Never imports torch."""
