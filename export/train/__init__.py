"""Training shapes-tiny: the bundled VisionLLM v2, trained from scratch on the shapes world (CPU, staged)."""
