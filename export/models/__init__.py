"""PyTorch reference implementations of every VisionLLM v2 component, with the official parameter names."""
