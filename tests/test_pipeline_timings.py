"""The loop's timing keys and counters that benchmarks read (README, "Timings"), on the tiny-random artifact
through the Pipeline: "link" (the super-link hand-off) is there exactly when the answer has links and runs
between the LLM and the first decoder; "denoise" lies inside the gen/edit decoder stage; the diffusion-step
stats count the scheduler's steps and bound each other and the loop. The statistic itself and the denoising
loop's per-step times are GoogleTests (csrc/tests/test_bench_stats.cpp).
"""

from __future__ import annotations

import pytest
from conftest import scene
from visionllm_edge.pipeline import Pipeline

STEP_STATS = ("diffusion_steps", "diffusion_step_ms_min", "diffusion_step_ms_median", "diffusion_step_ms_max")


@pytest.fixture(scope="module")
def pipe(tiny_artifact) -> Pipeline:
    return Pipeline.load(tiny_artifact)


def _stages(result) -> list[str]:
    return list(result.timings)


def test_no_links_no_link_stage(pipe):
    r = pipe(scene(1, 120, 90), "Describe the image.", answer="It is a picture.")
    assert r.links == []
    assert "link" not in r.timings and "denoise" not in r.timings
    assert not any(k in r.raw["stats"] for k in STEP_STATS)


@pytest.mark.parametrize(
    "prompt, answer_prefix, decoder",
    [
        ("Can you identify the circle, square present?", "circle[DET], square[DET]", "object_decoder"),
        ("Find the keypoints of the person.", "person[DET]. nose[POSE], left eye[POSE]", "pose_decoder"),
    ],
)
def test_link_stage_between_llm_and_decoders(pipe, prompt, answer_prefix, decoder):
    # Routed in the prefill (a forced answer) and in decoding (a prefix the decode loop continues from).
    for kw in (dict(answer=answer_prefix), dict(answer_prefix=answer_prefix, max_new_tokens=4)):
        r = pipe(scene(2, 120, 90), prompt, **kw)
        assert r.links, kw
        stages = _stages(r)
        assert "link" in stages and decoder in stages, stages
        assert r.timings["link"] >= 0
        llm_end = stages.index("decode") if "decode" in stages else stages.index("prefill")
        assert llm_end < stages.index("link") < stages.index(decoder), stages
        assert r.timings["link"] <= r.timings["total"]


@pytest.mark.parametrize("task", ["generate", "edit"])
def test_denoise_inside_its_decoder_with_one_step_per_scheduler_step(pipe, task):
    if task == "generate":
        r = pipe.generate_image("a large red circle")
    else:
        r = pipe.edit_image(scene(3, 80, 80), "make the circle blue")
    stage = "gen_decoder" if task == "generate" else "edit_decoder"
    assert "link" in r.timings and stage in r.timings
    assert 0 < r.timings["denoise"] <= r.timings[stage]
    stats = r.raw["stats"]
    steps = pipe.manifest.generation.diffusion_steps
    assert steps > 1
    assert stats["diffusion_steps"] == steps
    lo, mid, hi = (stats[k] for k in STEP_STATS[1:])
    assert 0 < lo <= mid <= hi
    # Every step is part of the loop, so the loop holds at least the slowest step and steps x the fastest.
    assert hi <= r.timings["denoise"]
    assert lo * steps <= r.timings["denoise"]


def test_no_denoise_when_images_are_not_decoded(pipe):
    r = pipe.generate_image("a large red circle", decode=False)
    assert "gen_decoder" in r.timings and "link" in r.timings
    assert "denoise" not in r.timings
    assert not any(k in r.raw["stats"] for k in STEP_STATS)
