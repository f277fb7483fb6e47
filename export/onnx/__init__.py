"""ONNX export: one declarative exporter per component, found by name in a registry."""
