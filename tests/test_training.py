"""shapes-tiny training: link targets, matched losses, each stage's step, and resuming a stage."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from visionllm_edge.export.config import named_config
from visionllm_edge.export.model import build_model
from visionllm_edge.export.train import losses as L
from visionllm_edge.export.train import stages
from visionllm_edge.export.train.runner import StageRunner
from visionllm_edge.export.train.targets import phrase_rows


def test_link_targets_are_fixed_compositional_and_unit_rms():
    a = phrase_rows("red circle", "object", 4, 32)
    assert np.array_equal(a, phrase_rows("the circle red", "object", 4, 32))  # stop words, order
    assert not np.allclose(a, phrase_rows("red square", "object", 4, 32))
    assert not np.allclose(a, phrase_rows("red circle", "pose", 4, 32))
    assert np.allclose(np.sqrt((a**2).mean(-1)), 1.0, atol=1e-5)
    with pytest.raises(ValueError, match="no content words"):
        phrase_rows("the a", "object", 4, 32)


def test_set_loss_is_zero_for_a_perfect_prediction_and_positive_otherwise():
    boxes = torch.tensor([[0.3, 0.3, 0.2, 0.2], [0.7, 0.6, 0.3, 0.1]])
    target = L.Target(torch.tensor([1, 0]), boxes)
    pred = torch.cat([boxes.flip(0), torch.tensor([[0.5, 0.5, 0.1, 0.1]])])[None]  # matched out of order
    logits = torch.full((1, 3, 2), -12.0)
    logits[0, 0, 0] = logits[0, 1, 1] = 12.0
    out = L.set_loss(logits, pred, [target], torch.tensor([2]))
    assert out["l1"].item() < 1e-6 and out["giou"].item() < 1e-6 and out["class"].item() < 1e-3
    worse = L.set_loss(logits, pred + 0.05, [target], torch.tensor([2]))
    assert worse["l1"].item() > 0.1 and worse["giou"].item() > 0.01


@pytest.fixture(scope="module")
def shapes_model():
    torch.manual_seed(0)
    cfg = named_config("shapes-tiny")
    return cfg, build_model(cfg, seed=0)


@pytest.mark.parametrize("stage", ["object", "pose", "llm", "diffusion"])
def test_every_stage_takes_a_finite_step_with_gradients(shapes_model, stage):
    cfg, model = shapes_model
    modules_fn, step_fn = stages.STAGES[stage]
    module = torch.nn.ModuleList(modules_fn(model)).train()
    module.zero_grad()
    step = step_fn(model, cfg, 2)
    out = step(stages.VAE_STEPS if stage == "diffusion" else 0)
    assert torch.isfinite(out["loss"])
    out["loss"].backward()
    grads = [p.grad for p in module.parameters() if p.grad is not None]
    assert grads and all(torch.isfinite(g).all() for g in grads)
    module.eval()


def test_the_llm_stage_regresses_every_routing_group(shapes_model):
    cfg, model = shapes_model
    enc = stages.ConversationEncoder(model, cfg)
    from visionllm_edge.shapes.instructions import make_sample

    s = make_sample("pose", 1, 0)
    coded = enc.encode(s)
    assert len(coded["links"]) == len(s.phrases) == 1 + 7
    assert [k for _p, k in coded["links"]] == ["det"] + ["pose"] * 7
    ids = coded["ids"]
    for pos, kind in coded["links"]:
        assert all(t in enc.ref.placeholder_ids for t in ids[pos : pos + model.num_queries(kind)])


def test_a_stage_resumes_where_it_stopped(tmp_path):
    torch.manual_seed(0)
    module = torch.nn.Linear(3, 1)
    data = torch.randn(64, 3)

    def step(i):
        x = data[i % 64 : i % 64 + 1]
        return {"loss": (module(x) - x.sum()).pow(2).mean()}

    runner = StageRunner("toy", module, tmp_path, steps=30, minutes=10, lr=1e-2, warmup=2)
    runner.steps = 10  # stop early, as a time budget would
    runner.run(step, log_every=5)
    assert runner.step == 10
    again = StageRunner("toy", torch.nn.Linear(3, 1), tmp_path, steps=30, minutes=10, lr=1e-2, warmup=2)
    assert again.step == 10
    assert torch.equal(again.module.weight, module.weight)
    again.run(step, log_every=5)
    assert again.done and again.step == 30
    events = [json.loads(line) for line in (tmp_path / "toy" / "log.jsonl").read_text().splitlines()]
    assert any(e.get("event") == "resumed" and e["step"] == 10 for e in events)
