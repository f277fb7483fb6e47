"""`visionllm-edge demo`: one request of every kind on a generated scene.

Until the trained `shapes-tiny` model ships (it needs the runtime), the demo runs the PyTorch reference on
`tiny-random`: the architecture of the release at test sizes with seeded random weights. Its answers are
meaningless; what it shows is the whole request loop working end to end — free generation, the super-link
step on routing tokens forced with an answer prefix, every decoder, post-processing and timings.
"""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

#: (title, prompt, answer prefix, regions) — routing is forced with the prefix, as random weights never route.
DEMO_REQUESTS = [
    ("chat", "Describe the image.", None, None),
    (
        "detection",
        "Can you analyze the image and identify the circle, square present?",
        "Yes, here are the results for circle[DET], square[DET]",
        None,
    ),
    ("grounding", "Where can we locate the red circle in the image?", "It is [GRD]", None),
    ("segmentation", "Please segment the sky and the grass.", "sky[SEG], grass[SEG]", None),
    (
        "pose",
        "Please find the keypoints of the person.",
        "person[DET]. nose[POSE], left hand[POSE], right hand[POSE]",
        None,
    ),
    ("region", "What is in <reg>region1<region></reg>?", None, [(20.0, 20.0, 70.0, 70.0)]),
    ("generation", "Draw a large red circle.", "Sure, here it is [GEN]", None),
    ("editing", "Make the square blue.", "Here it is [EDIT]", None),
]


def demo_scene(width: int = 160, height: int = 120) -> Image.Image:
    """A small deterministic scene: sky, grass, a red circle, a green square and a stick figure."""
    im = Image.new("RGB", (width, height), (135, 180, 235))
    d = ImageDraw.Draw(im)
    d.rectangle((0, height * 2 // 3, width, height), fill=(70, 150, 60))
    d.ellipse((20, 20, 70, 70), fill=(220, 40, 40))
    d.rectangle((95, 30, 135, 70), fill=(40, 200, 90))
    cx = 120
    d.ellipse((cx - 5, 78, cx + 5, 88), outline=(0, 0, 0), width=2)
    d.line((cx, 88, cx, 104), fill=(0, 0, 0), width=2)
    d.line((cx - 10, 94, cx + 10, 94), fill=(0, 0, 0), width=2)
    d.line((cx, 104, cx - 7, 116), fill=(0, 0, 0), width=2)
    d.line((cx, 104, cx + 7, 116), fill=(0, 0, 0), width=2)
    return im


def run_reference_demo(out_dir: Path) -> None:
    from visionllm_edge.export import ReferencePipeline, load_reference

    out_dir.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    pipe = ReferencePipeline(load_reference("tiny-random"))
    print(f"loaded tiny-random (seeded random weights) in {(time.perf_counter() - start) * 1000:.0f} ms")
    image = demo_scene()
    image.save(out_dir / "scene.png")
    for title, prompt, prefix, regions in DEMO_REQUESTS:
        t0 = time.perf_counter()
        result = pipe.run(image, prompt, regions=regions, answer_prefix=prefix, max_new_tokens=12)
        total = (time.perf_counter() - t0) * 1000
        print(f"\n== {title}: {prompt!r}" + (f" (answer prefix {prefix!r})" if prefix else ""))
        print(result)
        print(f"  total {total:.0f} ms")
        if result.detections or result.segmentation is not None or result.poses:
            path = out_dir / f"{title}.png"
            Image.fromarray(result.draw(np.asarray(image))).save(path)
            print(f"  wrote {path}")
        for i, im in enumerate(result.images):
            path = out_dir / f"{title}_{i}.png"
            Image.fromarray(np.ascontiguousarray(im)).save(path)
            print(f"  wrote {path}")
    print(f"\npictures in {out_dir.resolve()}")
