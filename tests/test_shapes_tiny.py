"""The bundled, trained shapes-tiny: exported with every graph validated, then scored through the runtime.

A fixed subset of the held-out evaluation (the first `SCENES` samples per task of seed 2024) must stay above
floors set from the full 200-scene run recorded in `benchmarks/results/shapes_tiny_eval.json`: each floor is
`FLOOR` times the full run's value (room for the subset's sampling noise: one sample is 1/32), so a change
that breaks a task — the export, the runtime loop, the super link, a decoder, post-processing — fails here.
"""

from __future__ import annotations

import json
from pathlib import Path

from visionllm_edge.shapes.evaluate import METRICS, RuntimeRunner, evaluate

ROOT = Path(__file__).resolve().parents[1]
FULL_RUN = ROOT / "benchmarks" / "results" / "shapes_tiny_eval.json"
SCENES = 32
#: Each metric's floor, as a fraction of the full run's value.
FLOOR = 0.5


def test_every_graph_of_the_bundled_model_is_validated_at_several_shapes(shapes_artifact):
    validation = json.loads((shapes_artifact / "validation.json").read_text())
    graphs = validation["graphs"]
    from visionllm_edge import contract

    assert set(graphs) == {g for names in contract.COMPONENT_GRAPHS.values() for g in names}
    for name, g in graphs.items():
        assert g["passed"] and len(g["shapes"]) >= 3, (name, g["shapes"])


def test_the_evaluation_subset_stays_above_the_floors(shapes_artifact):
    full = json.loads(FULL_RUN.read_text())
    report = evaluate(RuntimeRunner.load(shapes_artifact), seed=full["seed"], scenes=SCENES)
    low = {}
    for keys in METRICS.values():
        for key in keys:
            if full.get(key) is None:
                continue
            floor = FLOOR * full[key]
            assert floor > 0, f"{key}: the full run scored 0, a floor of 0 would test nothing"
            if report[key] < floor:
                low[key] = (round(report[key], 3), round(floor, 3))
    assert not low, f"metrics below their floors (got, floor): {low}"


def test_the_artifact_carries_the_diffusion_settings_the_model_was_tuned_for(shapes_artifact):
    from visionllm_edge.export.config import named_config
    from visionllm_edge.export.reference import PostProcessSettings

    extension = named_config("shapes-tiny").extension
    scale, steps = extension["guidance_scale"], extension["diffusion_steps"]
    default = PostProcessSettings()
    assert (scale, steps) != (default.guidance_scale, default.gen_steps)  # else this test proves nothing
    manifest = json.loads((shapes_artifact / "manifest.json").read_text())
    assert manifest["generation"]["guidance_scale"] == scale
    assert manifest["generation"]["diffusion_steps"] == steps
    tuned = PostProcessSettings.for_model(named_config("shapes-tiny"))
    assert (tuned.guidance_scale, tuned.gen_steps) == (scale, steps)
    assert PostProcessSettings.for_model(named_config("tiny-random")) == default
