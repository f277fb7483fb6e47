"""shapes-tiny training: link targets, matched losses, each stage's step, and resuming a stage."""

from __future__ import annotations

import dataclasses
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


@pytest.mark.parametrize("stage", list(stages.STAGES))
def test_every_stage_takes_a_finite_step_with_gradients(shapes_model, stage):
    cfg, model = shapes_model
    modules_fn, step_fn = stages.STAGES[stage]
    module = torch.nn.ModuleList(modules_fn(model)).train()
    module.zero_grad()
    # The second phases read their data from where the first stopped (diffusion2: past the VAE steps).
    offset = {
        "llm2": {"offset": 5000}, "llm3": {"offset": 11500}, "llm4": {"offset": 15000},
        "llm5": {"offset": 16200}, "diffusion2": {"offset": stages.VAE_STEPS},
        "diffusion3": {"offset": stages.VAE_STEPS + 1}, "vae_decoder": {"offset": 28900},
        "diffusion4": {"offset": 28901}, "diffusion5": {"offset": 31900},
    }.get(stage, {})  # fmt: skip
    step = step_fn(model, cfg, 2, **offset)
    out = step(stages.VAE_STEPS if stage == "diffusion" else 0)
    assert torch.isfinite(out["loss"])
    out["loss"].backward()
    grads = [p.grad for p in module.parameters() if p.grad is not None]
    assert grads and all(torch.isfinite(g).all() for g in grads)
    if stage in ("llm2", "llm3", "llm4", "llm5"):  # the patch probe trains the vision tower
        assert out["probe"] > 0
        assert stages.patch_probe(model).weight.grad.abs().sum() > 0
        assert model.vis_encoder.vision_model.embeddings.patch_embedding.weight.grad.abs().sum() > 0
    if stage == "diffusion3":  # generation only, on every step (an odd step was editing's in diffusion2)
        assert set(out) >= {"gen_mse"} and "edit_mse" not in out
        assert model.sd.sd_unet.conv_in.weight.grad.abs().sum() > 0
    if stage in ("diffusion4", "diffusion5"):  # the generation UNet, its mapper (queries too), its probe
        assert out["mapper_probe"] > 0
        assert model.sd.llm2sd_mapper_queries.grad.abs().sum() > 0
        assert stages.mapper_probe(model).weight.grad.abs().sum() > 0
        assert not {id(p) for p in module.parameters()} & {id(p) for p in model.sd.sd_vae.parameters()}
    if stage == "vae_decoder":  # the decoder alone: the latents both UNets learned stay as they are
        assert model.sd.sd_vae.decoder.conv_out.weight.grad.abs().sum() > 0
        assert all(p.grad is None for p in model.sd.sd_vae.encoder.parameters())
    module.eval()


def test_the_mapper_probe_reads_kind_colour_and_size():
    from visionllm_edge.shapes import world
    from visionllm_edge.shapes.instructions import make_sample

    model = build_model(named_config("shapes-tiny"), seed=0)
    probe = stages.mapper_probe(model)
    samples = [make_sample("generate", 1, i) for i in range(4)]
    cond = torch.randn(4, model.sd.num_queries, model.sd.sd_hidden_size)
    with torch.no_grad():
        probe.weight.zero_()
        probe.bias.zero_()  # uniform readings: log 4 + log 5 + log 2
    expected = float(np.log(4) + np.log(5) + np.log(2))
    assert stages.mapper_probe_loss(probe, cond, samples).item() == pytest.approx(expected, rel=1e-5)
    with torch.no_grad():  # a probe that reads every prompt right from its bias alone costs nothing
        for s in samples[:1]:
            for names, key, start in ((world.KINDS, "kind", 0), (tuple(world.COLORS), "color", 4),
                                      (world.SIZES, "size", 9)):  # fmt: skip
                probe.bias[start + names.index(s.meta[key])] = 50.0
    assert stages.mapper_probe_loss(probe, cond[:1], samples[:1]).item() < 1e-6


def test_kind_contrast_asks_one_picture_what_only_the_kind_word_tells_apart():
    from visionllm_edge.shapes import world
    from visionllm_edge.shapes.instructions import _plural

    answers = {"yes": 0, "no": 0}
    types = set()
    for index in range(40):
        group = stages.kind_contrast(index)
        scene = group[0].scene
        assert all(s.scene is scene and s.task == "vqa" for s in group)
        types |= {s.meta["type"] for s in group}
        counts = [s for s in group if s.meta["type"] == "count"]
        assert [(s.question, s.answer) for s in counts] == [
            (f"How many {_plural(k)} are there?", str(scene.count(k))) for k in world.KINDS
        ]
        checks = [s for s in group if s.meta["type"] == "yesno"]
        for s in checks:
            color, kind = s.question.removesuffix("?").split()[-2:]
            present = any(o.color == color and o.category == kind for o in scene.shapes)
            assert s.answer == ("yes" if present else "no"), s.question
            answers[s.answer] += 1
        if len(checks) == 2:  # one colour, two kinds: only the kind word tells yes from no
            assert [s.answer for s in checks] == ["yes", "no"]
            assert checks[0].question.split()[-2] == checks[1].question.split()[-2]
        for s in group:
            if s.meta["type"] == "color":  # the kind named is held once, in the colour answered
                kind = s.question.removesuffix("?").split()[-1]
                assert [o.color for o in scene.shapes if o.category == kind] == [s.answer]
            if s.meta["type"] == "shape":
                color = s.question.split()[-2]
                assert [o.category for o in scene.shapes if o.color == color] == [s.answer]
            if s.meta["type"] == "position":
                (o,) = [o for o in scene.shapes if f"the {o.short_name} on" in s.question]
                assert s.answer == ("left" if o.center[0] < scene.image.width / 2 else "right")
    assert types == {"count", "yesno", "color", "shape", "position"}
    assert min(answers.values()) >= 35


def test_an_llm_step_runs_the_vision_tower_once_per_picture(shapes_model, monkeypatch):
    import copy

    cfg, model = shapes_model
    model.eval()  # no dropout: the two steps below must agree exactly
    tiles = []
    encode = model.encode_image
    monkeypatch.setattr(model, "encode_image", lambda t: tiles.append(len(t)) or encode(t))
    shared = stages.kind_contrast(3)
    monkeypatch.setattr(stages, "kind_contrast", lambda index: shared)
    step = stages.llm_step(model, cfg, 0, probe=stages.patch_probe(model), mixture={"vqa": 1.0}, contrast=1)
    with torch.no_grad():
        once = step(0)
        # The same questions on copies of the picture: the tower runs for each, as it did before sharing.
        monkeypatch.setattr(stages, "kind_contrast", lambda index: [
            dataclasses.replace(s, scene=copy.copy(s.scene)) for s in shared
        ])  # fmt: skip
        each = step(0)
    assert tiles == [1, len(shared)]
    for key in ("ce", "probe", "token_acc"):
        assert torch.allclose(once[key], each[key], atol=1e-6), key


def test_assembly_gives_the_editing_decoder_the_generation_autoencoder():
    from visionllm_edge.export.train import __main__ as train

    _, model = train.build()
    model.ip2p.sd_vae.load_state_dict(model.sd.sd_vae.state_dict())  # as `diffusion` does after its VAE phase
    with torch.no_grad():
        model.sd.sd_vae.decoder.conv_out.weight.add_(1.0)  # as `vae_decoder` trains it
    train._share_autoencoder(model)
    gen, edit = model.sd.sd_vae.state_dict(), model.ip2p.sd_vae.state_dict()
    assert all(torch.equal(gen[k], edit[k]) for k in gen)
    with torch.no_grad():
        model.ip2p.sd_vae.encoder.conv_in.bias.add_(1.0)
    with pytest.raises(RuntimeError, match=r"VAE encoders differ at encoder\.conv_in\.bias"):
        train._share_autoencoder(model)


def test_patch_targets_mark_each_object_where_it_is():
    from visionllm_edge.shapes import world

    scene = world.make_scene(5, 3, 128, 2, 4, people=(1, 1))
    grid = 8
    t = stages.patch_targets(scene, grid).reshape(grid, grid, -1)
    colors, kinds = list(world.COLORS), world.KINDS
    n_cover = len(colors) * len(kinds) + 1
    assert t.shape[-1] == n_cover + 2 * (n_cover - 1) + 1
    centres = t[..., n_cover:].sum()
    assert centres == len({(o.name, int(o.center[0] // 16), int(o.center[1] // 16)) for o in scene.objects})
    for o in scene.objects:
        cx, cy = o.center
        row, col = int(cy // 16), int(cx // 16)
        if o.color is None:
            assert t[row, col, -1] == 1
            continue
        joint = colors.index(o.color) * len(kinds) + kinds.index(o.category)
        assert t[row, col, n_cover + world.SIZES.index(o.size) * (n_cover - 1) + joint] == 1
        # Covered patches: every patch holding a tenth of the shape's pixels, and only patches it touches.
        covered = o.mask.reshape(grid, 16, grid, 16).mean((1, 3))
        assert (t[..., joint][covered >= 0.1] == 1).all()
        others = [p for p in scene.objects if p is not o and p.short_name == o.short_name]
        if not others:
            assert (t[..., joint][covered == 0] == 0).all()
    blank = world.Scene(scene.image.copy())
    assert stages.patch_targets(blank, grid).sum() == 0


def test_probe_accuracy_scores_the_reading_at_each_centre_patch():
    from types import SimpleNamespace

    from visionllm_edge.shapes import world

    scenes = [world.make_scene(9, i, 128, 2, 4, people=(1, 1)) for i in range(3)]
    truth = [torch.from_numpy(stages.patch_targets(s, 8))[None] for s in scenes]

    class Tower:  # "projects" each scene onto its own targets, so an identity probe reads them exactly
        def __init__(self, rows):
            self.rows = list(rows)

        def encode_image(self, tiles):
            assert tiles.shape[-2:] == (128, 128)
            return SimpleNamespace(projected=self.rows.pop(0))

    exact = stages.probe_accuracy(Tower(truth), torch.nn.Identity(), scenes, 128, 1)
    shapes = sum(len(s.shapes) for s in scenes)
    assert [exact[k] for k in ("size", "color", "kind", "joint")] == [1.0] * 4
    assert 0 < exact["centres"] <= shapes
    # A probe that reads every shape as a person is wrong on every count.
    person = torch.zeros(1, 64, stages.PATCH_CHANNELS)
    person[..., -1] = 1.0
    wrong = stages.probe_accuracy(Tower([person] * 3), torch.nn.Identity(), scenes, 128, 1)
    assert wrong["joint"] == wrong["kind"] == wrong["color"] == wrong["size"] == 0.0
    # One that swaps each shape's kind for the next keeps size and colour and loses kind.
    kinds = len(world.KINDS)
    swapped = []
    for t in truth:
        centres = t[..., stages.PATCH_COVER : -1].reshape(1, 64, -1, kinds).roll(1, dims=-1)
        swapped.append(torch.cat([t[..., : stages.PATCH_COVER], centres.flatten(-2), t[..., -1:]], -1))
    moved = stages.probe_accuracy(Tower(swapped), torch.nn.Identity(), scenes, 128, 1)
    assert moved["size"] == moved["color"] == 1.0 and moved["kind"] == moved["joint"] == 0.0


def test_probe_command_names_what_it_cannot_score(tmp_path, capsys):
    from visionllm_edge.export.train import __main__ as train

    for argv, message in [
        (["probe", "object"], "stage 'object' trains no patch probe"),
        (["probe", "nonsense"], "probe needs a stage, one of object, pose"),
        (
            ["probe", "llm3", "--out", str(tmp_path)],
            f"{tmp_path}/llm3/checkpoint.pt: stage 'llm3' has not been run",
        ),
    ]:
        with pytest.raises(SystemExit):
            train.main(argv)
        assert message in capsys.readouterr().err


def test_rate_times_a_stage_in_its_own_loop_and_leaves_nothing_behind(tmp_path, capsys, monkeypatch):
    from visionllm_edge.export.train import __main__ as train

    monkeypatch.chdir(tmp_path)
    train.main(["rate", "pose", "--steps", "2", "--from", "3"])
    report = json.loads(capsys.readouterr().out.splitlines()[-1])
    assert report["stage"] == "pose" and report["steps"] == 2 and report["from"] == 3
    assert 0 < report["s_per_step"] < 60
    assert list(tmp_path.iterdir()) == []  # the checkpoint went to a scratch folder
    for argv, message in [
        (["rate", "nonsense"], "rate needs a stage, one of object, pose"),
        (["rate", "pose", "--steps", "0"], "rate needs --steps >= 1 and --from >= 0, got 0 and 0"),
    ]:
        with pytest.raises(SystemExit):
            train.main(argv)
        assert message in capsys.readouterr().err


def test_a_second_phase_starts_from_the_finished_first(tmp_path, monkeypatch):
    from visionllm_edge.export.train import __main__ as train

    monkeypatch.setattr(train, "DEFAULTS", {
        "llm": {"steps": 2, "batch": 1, "lr": 1e-4, "warmup": 1},
        "llm2": {"steps": 3, "batch": 1, "lr": 1e-4, "warmup": 1, "after": "llm"},
    })  # fmt: skip
    train.DEFAULTS["llm"]["steps"] = 1
    train.run_stage("llm", tmp_path, minutes=5, threads=1)
    train.DEFAULTS["llm"]["steps"] = 2  # the first stage now stops short of its plan
    with pytest.raises(RuntimeError, match=r"stage 'llm' stopped at step 1 of 2; run it to the end first"):
        train.run_stage("llm2", tmp_path, minutes=5, threads=1)
    train.run_stage("llm", tmp_path, minutes=5, threads=1)
    train.run_stage("llm2", tmp_path, minutes=0, threads=1)  # no step: saves its starting point
    first = torch.load(tmp_path / "llm" / "checkpoint.pt", weights_only=True)["module"]
    second = torch.load(tmp_path / "llm2" / "checkpoint.pt", weights_only=True)["module"]
    probe = len(stages.llm_modules(build_model(named_config("shapes-tiny"))))  # its index in the module list
    assert set(second) - set(first) == {f"{probe}.weight", f"{probe}.bias"}
    assert all(torch.equal(first[k], second[k]) for k in first)
    start = [json.loads(line) for line in (tmp_path / "llm2" / "log.jsonl").read_text().splitlines()][0]
    assert start["event"] == "start" and start["offset"] == 2
    with pytest.raises(RuntimeError, match=r"stage 'llm2' stopped at step 0 of 3"):
        train.assemble(tmp_path, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_a_third_phase_reads_its_data_from_where_the_whole_chain_stopped(monkeypatch):
    from visionllm_edge.export.train import __main__ as train

    monkeypatch.setattr(train, "DEFAULTS", {
        "llm": {"steps": 5, "batch": 1, "lr": 1e-4, "warmup": 1},
        "llm2": {"steps": 7, "batch": 1, "lr": 1e-4, "warmup": 1, "after": "llm"},
        "llm3": {"steps": 2, "batch": 1, "lr": 1e-4, "warmup": 1, "after": "llm2"},
    })  # fmt: skip
    assert [train._data_end(n) for n in ("llm", "llm2", "llm3")] == [5, 12, 14]
    assert train._chain("llm3") == ["llm3", "llm2", "llm"]  # what llm3 loads before it trains, newest first


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


def _schedule_script():
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "benchmarks" / "training_schedule.py"
    spec = importlib.util.spec_from_file_location("training_schedule", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_the_two_core_schedule_prices_every_stage_after_the_one_it_continues(monkeypatch):
    from visionllm_edge.export.train.__main__ import DEFAULTS

    sched = _schedule_script()
    rates = json.loads(sched.RATES.read_text())["rates"]
    rows = sched.schedule(rates)
    ends = {stage: (start, end) for chain in rows.values() for stage, start, end, _how in chain}
    assert set(ends) == set(DEFAULTS)
    for stage, settings in DEFAULTS.items():
        if "after" in settings:
            assert ends[stage][0] >= ends[settings["after"]][1] - 1e-9, stage
    # A priced stage costs each phase's steps at the slowest rate measured in that phase.
    late = stages.LLM_LATE_STEP
    early = max(r["s_per_step"] for r in rates if r["stage"] == "llm" and r["from"] < late)
    later = max(r["s_per_step"] for r in rates if r["stage"] == "llm" and r["from"] >= late)
    start, end = ends["llm"]
    assert end - start == pytest.approx((late * early + (DEFAULTS["llm"]["steps"] - late) * later) / 60)
    with pytest.raises(ValueError, match=r"no rate measured for pose steps 0\.\.2000"):
        sched.schedule([r for r in rates if r["stage"] != "pose"])
    rest = [name for name in DEFAULTS if name not in ("llm", "llm2")]
    monkeypatch.setattr(sched, "CHAINS", {"core 1": ["llm2", "llm"], "core 2": rest})
    with pytest.raises(ValueError, match="llm2 continues llm, which is not before it on core 1"):
        sched.schedule(rates)
