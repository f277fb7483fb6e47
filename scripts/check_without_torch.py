"""Runs requests on an exported artifact in an environment without torch (CI's device-side check).

Usage: python scripts/check_without_torch.py ARTIFACT
"""

from __future__ import annotations

import importlib.util
import sys

import numpy as np


def main(artifact: str) -> int:
    if importlib.util.find_spec("torch") is not None:
        print(
            "error: torch is installed in this environment; this check needs one without it", file=sys.stderr
        )
        return 1
    from visionllm_edge.pipeline import Pipeline

    pipe = Pipeline.load(artifact)
    rng = np.random.default_rng(0)
    image = rng.integers(0, 256, (96, 128, 3), dtype=np.uint8)
    chat = pipe(image, "Describe the image.", max_new_tokens=8, repetition_penalty=1.3)
    det = pipe.detect(image, ["circle", "square"])
    seg = pipe.segment(image, ["sky", "grass"])
    gen = pipe.generate_image("a red circle")
    print(chat)
    print(
        f"detections: {len(det.detections)}  segmentation labels: {seg.segmentation.labels}  "
        f"generated images: {len(gen.images)}"
    )
    assert chat.token_ids and det.links and seg.segmentation is not None and gen.images
    assert "torch" not in sys.modules
    print("ok: requests ran without torch")
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1]))
