"""The generation / editing exporters and the runtime's denoising loop, on tiny-random.

Graphs are exported once per module into a temporary folder, checked with `onnx.checker` and run with ONNX
Runtime (CPU) against the PyTorch reference. The C++ loop (`_core.denoise`, `_core.DDIMSchedule`,
`_core.DDIMConfig`: what the runtime runs) is checked against the reference `DDIMSchedule` and `denoise`,
both with the torch UNet and with the exported graphs end to end, and the scheduler facts the exporter
writes are read back by the C++ reader.
"""

from __future__ import annotations

import json
import subprocess
import sys
import warnings

import numpy as np
import pytest
import torch
from visionllm_edge import _core, contract
from visionllm_edge.contract import compare
from visionllm_edge.export.models import diffusion as reference
from visionllm_edge.manifest import ManifestError

onnx = pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")

from visionllm_edge.export.checkpoint import load_reference  # noqa: E402
from visionllm_edge.export.onnx.base import ExportSettings, export_graph, exporter_for  # noqa: E402
from visionllm_edge.export.onnx.diffusion import EditExporter, GenExporter  # noqa: E402

KINDS = ("gen", "edit")
ATTRIBUTE = {"gen": "sd", "edit": "ip2p"}
TOL = 1e-4
#: The keys of the manifest's `scheduler` facts (diffusers' `DDIMScheduler` settings), in the order written.
SCHEDULER_KEYS = (
    "train_timesteps",
    "beta_start",
    "beta_end",
    "beta_schedule",
    "timestep_spacing",
    "steps_offset",
    "set_alpha_to_one",
    "prediction_type",
    "clip_sample",
    "eta",
    "init_noise_sigma",
)


def _config_fields(config) -> dict:
    """A `_core.DDIMConfig` as the facts dict it reads."""
    return {key: getattr(config, key) for key in SCHEDULER_KEYS}


@pytest.fixture(scope="module")
def model():
    return load_reference("tiny-random")


@pytest.fixture(scope="module")
def exported(model, tmp_path_factory):
    """Both components exported once: `{kind: {"dir", "graphs": {name: path}, "extra": {name: path}}}`."""
    out = tmp_path_factory.mktemp("diffusion")
    settings = ExportSettings()
    result = {}
    for kind in KINDS:
        exporter = exporter_for(kind)
        graphs = {}
        for graph in exporter.graphs(model, settings):
            path = out / contract.GRAPHS[graph.name].file
            # The TorchScript exporter warns that it cannot constant-fold the reversed Slice it emits for
            # every F.pad (the VAE encoder's asymmetric downsampling pad); the graph is correct regardless.
            with warnings.catch_warnings():
                warnings.filterwarnings(
                    "ignore", message="Constant folding - Only steps=1", category=UserWarning
                )
                export_graph(graph, path, opset=settings.opset)
            graphs[graph.name] = path
        result[kind] = {"graphs": graphs, "extra": exporter.extra_files(model, out)}
    return result


def _session(path):
    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    return ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])


# --- the exporters ------------------------------------------------------------------------------------------


def test_exporters_are_registered_with_the_contract_graphs(model):
    assert isinstance(exporter_for("gen"), GenExporter)
    assert isinstance(exporter_for("edit"), EditExporter)
    settings = ExportSettings()
    for kind in KINDS:
        exporter = exporter_for(kind)
        assert exporter.available(model)
        graphs = exporter.graphs(model, settings)
        assert tuple(g.name for g in graphs) == contract.COMPONENT_GRAPHS[kind]
        for g in graphs:
            names = contract.GRAPHS[g.name]
            assert tuple(g.input_names) == names.inputs and tuple(g.output_names) == names.outputs


def test_unavailable_without_the_decoder(model):
    class NoDecoders:
        config = model.config

    for kind in KINDS:
        exporter = exporter_for(kind)
        assert not exporter.available(NoDecoders())
        with pytest.raises(ValueError, match=f"no '{kind}' decoder .*model.{ATTRIBUTE[kind]}"):
            exporter.graphs(NoDecoders(), ExportSettings())


def test_rejects_an_image_size_the_unet_cannot_run(model):
    class OddSize:
        sd = model.sd
        config = type("Config", (), {"image_size_for": staticmethod(lambda kind: 34)})()

    # tiny-random: VAE factor 2, one UNet upsampler -> image sides must be multiples of 4.
    with pytest.raises(ValueError, match="gen_image_size 34 must be a multiple of 4"):
        exporter_for("gen").graphs(OddSize(), ExportSettings())


@pytest.mark.parametrize("kind", KINDS)
def test_graphs_pass_the_checker_with_contract_io(exported, kind):
    for name, path in exported[kind]["graphs"].items():
        graph = onnx.load(str(path))
        onnx.checker.check_model(graph, full_check=True)
        inputs = {i.name: i.type.tensor_type for i in graph.graph.input}
        outputs = {o.name: o.type.tensor_type for o in graph.graph.output}
        assert tuple(inputs) == contract.GRAPHS[name].inputs
        assert tuple(outputs) == contract.GRAPHS[name].outputs
        # The batch axis is symbolic everywhere; latent / image sides are too (the UNet within multiples).
        for tensor in (*inputs.values(), *outputs.values()):
            assert tensor.shape.dim[0].dim_param, f"{name}: batch axis is static"
        if name.endswith("_unet"):
            assert inputs["timestep"].elem_type == onnx.TensorProto.INT64
            assert len(inputs["timestep"].shape.dim) == 1
            assert all(d.dim_param for d in list(inputs["sample"].shape.dim)[2:])


@pytest.mark.parametrize("kind", KINDS)
def test_validation_cases_match_the_reference_in_onnxruntime(model, exported, kind):
    exporter = exporter_for(kind)
    cases = exporter.validation_cases(model, ExportSettings(), np.random.default_rng(0))
    assert set(cases) == set(contract.COMPONENT_GRAPHS[kind])
    for name, graph_cases in cases.items():
        assert len(graph_cases) >= 3, name
        session = _session(exported[kind]["graphs"][name])
        for case in graph_cases:
            got = dict(zip(contract.GRAPHS[name].outputs, session.run(None, case.inputs)))
            for output, want in case.expected.items():
                mismatch = compare(got[output], want, atol=TOL, rtol=TOL)
                assert mismatch is None, f"{name} [{case.label}] {output}: {mismatch}"
    unet_cases = cases[f"{kind}_unet"]
    assert {case.inputs["sample"].shape[0] for case in unet_cases} >= {2, 3}
    assert len({int(case.inputs["timestep"][0]) for case in unet_cases}) >= 3
    assert [c.inputs["link_states"].shape[0] for c in cases[f"{kind}_mapper"]] == [1, 2, 3]


@pytest.mark.parametrize("kind", KINDS)
def test_uncond_file_is_the_reference_embedding(model, exported, kind):
    from safetensors.numpy import load_file

    extra = exported[kind]["extra"]
    assert list(extra) == [f"{kind}_uncond"]
    assert extra[f"{kind}_uncond"].name == f"{kind}_uncond.safetensors"
    tensors = load_file(str(extra[f"{kind}_uncond"]))
    assert list(tensors) == ["uncond"]
    want = getattr(model, ATTRIBUTE[kind]).unconditional_embedding().numpy()
    assert tensors["uncond"].dtype == np.float32 and tensors["uncond"].shape == (1, 77, want.shape[-1])
    np.testing.assert_array_equal(tensors["uncond"], want)


@pytest.mark.parametrize("kind", KINDS)
def test_manifest_facts(model, kind):
    decoder = getattr(model, ATTRIBUTE[kind])
    facts = exporter_for(kind).manifest_facts(model, ExportSettings())
    # What the exporter writes is what the C++ reader reads, key for key and value for value (through JSON,
    # as the manifest carries it), and it is the scheduler of the reference the graphs are checked with.
    assert tuple(facts["scheduler"]) == SCHEDULER_KEYS
    schedule = _core.DDIMConfig.from_facts(json.loads(json.dumps(facts["scheduler"])))
    assert _config_fields(schedule) == facts["scheduler"] == reference.scheduler_facts()
    assert (schedule.train_timesteps, schedule.beta_start, schedule.beta_end, schedule.steps_offset) == (
        reference.TRAIN_STEPS,
        reference.BETA_START,
        reference.BETA_END,
        reference.STEPS_OFFSET,
    )
    assert schedule.timestep_spacing == "leading" and schedule.set_alpha_to_one is False
    # SD-1.5's constants are also the C++ loop's defaults (what `_core.denoise` runs without a config).
    assert _config_fields(_core.DDIMConfig()) == facts["scheduler"]
    assert facts["image_size"] == model.config.image_size_for(kind) == 32
    assert facts["latent_size"] == facts["image_size"] // decoder.vae_scale_factor
    assert facts["vae_scaling_factor"] == decoder.scaling_factor
    assert facts["latent_channels"] == 4 and facts["steps"] == 20 and facts["guidance_scale"] == 7.5
    assert facts["uncond_file"] == f"{kind}_uncond.safetensors" and facts["uncond_tensor"] == "uncond"
    assert facts["uncond_file"] == contract.UNCOND_FILE.format(kind=kind)
    assert facts["uncond_tensor"] == contract.UNCOND_TENSOR
    assert ("image_guidance_scale" in facts) == (kind == "edit")
    if kind == "edit":
        assert facts["image_guidance_scale"] == 1.5


# --- the C++ loop against the torch reference ---------------------------------------------------------------


@pytest.mark.parametrize("steps", [1, 3, 20, 50, 999])
def test_schedule_matches_the_reference(steps):
    ours = _core.DDIMSchedule(steps)
    ref = reference.DDIMSchedule(steps)
    assert ours.timesteps.dtype == np.int64
    assert ours.timesteps.tolist() == ref.timesteps == reference.ddim_timesteps(steps)
    assert _core.ddim_timesteps(steps).tolist() == ref.timesteps
    np.testing.assert_allclose(ours.alphas_cumprod, ref.alphas_cumprod.numpy(), rtol=1e-14, atol=0)
    assert ours.final_alpha_cumprod == pytest.approx(ref.final_alpha_cumprod, rel=1e-14)
    for t in ref.timesteps:
        assert ours.alphas(t) == pytest.approx(ref._alphas(t), rel=1e-14)


@pytest.mark.parametrize("steps", [1, 3, 20, 50, 999])
def test_every_step_matches_the_reference_step(steps):
    """The C++ loop unguided (one UNet row per request) around a UNet that returns fixed noise per timestep:
    the latents it hands the UNet at each step, and the final ones, are the reference `DDIMSchedule.step`
    applied in turn."""
    rng = np.random.default_rng(steps)
    ref = reference.DDIMSchedule(steps)
    noise = rng.standard_normal((2, 4, 3, 3)).astype(np.float32)
    cond = rng.standard_normal((2, 5, 6)).astype(np.float32)
    eps = {t: rng.standard_normal((2, 4, 3, 3)).astype(np.float32) for t in ref.timesteps}
    seen = []

    def unet(sample, timestep, context):
        seen.append((timestep.copy(), sample.copy()))
        return eps[int(timestep[0])]

    got = _core.denoise(unet, cond, cond[:1], noise, steps, 1.0)
    assert [t.tolist() for t, _ in seen] == [[t, t] for t in ref.timesteps]
    want = torch.from_numpy(noise) * ref.init_noise_sigma
    for (_, sample), t in zip(seen, ref.timesteps):
        np.testing.assert_allclose(sample, want.numpy(), rtol=1e-5, atol=1e-5)
        want = ref.step(torch.from_numpy(eps[t]), t, want)
    assert got.dtype == np.float32
    np.testing.assert_allclose(got, want.numpy(), rtol=1e-5, atol=1e-5)


def test_schedule_rejects_steps_past_the_end():
    # Leading spacing with offset 1: 1000 steps would start at t = 1000; the C++ schedule refuses it up front,
    # the reference fails at its first step.
    with pytest.raises(ValueError, match=r"start at timestep 1000, outside \[0, 1000\)"):
        _core.DDIMSchedule(1000)
    with pytest.raises(ValueError, match=r"timestep must be in \[0, 1000\), got 1000"):
        reference.DDIMSchedule(1000).step(torch.zeros(1), 1000, torch.zeros(1))
    with pytest.raises(ValueError, match="steps must be an int"):
        _core.DDIMSchedule(0)


@pytest.mark.parametrize("kind", KINDS)
def test_guidance_batch_and_combination(model, kind):
    """Two guided steps around a UNet that returns one fixed noise batch: the C++ loop builds the UNet batch
    the exporter's `guidance_batch` facts declare, and combines its rows with the pipelines' formulas."""
    graphs = exporter_for(kind).graphs(model, ExportSettings())
    (unet_graph,) = [g for g in graphs if g.name == f"{kind}_unet"]
    layout = unet_graph.facts["guidance_batch"]
    rng = np.random.default_rng(3)
    n = 2
    cond = rng.standard_normal((n, 5, 6)).astype(np.float32)
    uncond = rng.standard_normal((1, 5, 6)).astype(np.float32)
    noise = rng.standard_normal((n, 4, 3, 3)).astype(np.float32)
    image = rng.standard_normal((n, 4, 3, 3)).astype(np.float32) if kind == "edit" else None
    rows = len(layout["encoder_hidden_states"])
    eps = rng.standard_normal((rows * n, 4, 3, 3)).astype(np.float32)
    seen = []

    def unet(sample, timestep, context):
        seen.append((sample.copy(), context.copy()))
        return eps

    got = _core.denoise(unet, cond, uncond, noise, 2, 7.5, image, 1.5)
    sample, context = seen[0]
    contexts = {"cond": cond, "uncond": np.broadcast_to(uncond, cond.shape)}
    np.testing.assert_array_equal(
        context, np.concatenate([contexts[row] for row in layout["encoder_hidden_states"]])
    )
    np.testing.assert_array_equal(sample[:, :4], np.concatenate([noise] * rows))
    if kind == "gen":
        assert sample.shape[1] == 4
        u, c = eps[:n], eps[n:]
        guided = u + 7.5 * (c - u)
    else:
        images = {"image": image, "zeros": np.zeros_like(image)}
        np.testing.assert_array_equal(
            sample[:, 4:], np.concatenate([images[row] for row in layout["image_latents"]])
        )
        ci, ui, u0 = eps[:n], eps[n : 2 * n], eps[2 * n :]
        guided = u0 + 7.5 * (ci - ui) + 1.5 * (ui - u0)
    ref = reference.DDIMSchedule(2)
    want = torch.from_numpy(noise)
    for t in ref.timesteps:
        want = ref.step(torch.from_numpy(guided), t, want)
    np.testing.assert_allclose(got, want.numpy(), rtol=1e-5, atol=1e-5)


def _torch_unet(decoder):
    def unet(sample, timestep, context):
        with torch.no_grad():
            out = decoder.sd_unet(
                torch.from_numpy(sample),
                torch.from_numpy(timestep),
                encoder_hidden_states=torch.from_numpy(context),
            )
        return out.sample.numpy()

    return unet


# The guided paths run end to end over the exported graphs below; the unguided ones (guidance <= 1; for
# editing also image guidance < 1) run here with the torch UNet, which also isolates the loop from the export.
@pytest.mark.parametrize("kind,guidance,image_guidance", [("gen", 1.0, 1.5), ("edit", 7.5, 0.5)])
def test_cpp_loop_with_the_torch_unet_matches_reference_denoise(model, kind, guidance, image_guidance):
    decoder = getattr(model, ATTRIBUTE[kind])
    rng = np.random.default_rng(1)
    cond = rng.standard_normal((2, 77, decoder.sd_hidden_size)).astype(np.float32)
    noise = rng.standard_normal((2, 4, 8, 8)).astype(np.float32)
    image = rng.standard_normal((2, 4, 8, 8)).astype(np.float32) if kind == "edit" else None
    uncond = decoder.unconditional_embedding().numpy()
    with torch.no_grad():
        want = decoder.denoise(
            torch.from_numpy(cond),
            noise=torch.from_numpy(noise),
            steps=3,
            guidance_scale=guidance,
            image_latents=None if image is None else torch.from_numpy(image),
            image_guidance_scale=image_guidance,
        ).numpy()
    got = _core.denoise(_torch_unet(decoder), cond, uncond, noise, 3, guidance, image, image_guidance)
    assert got.dtype == np.float32
    mismatch = compare(got, want, atol=TOL, rtol=TOL)
    assert mismatch is None, str(mismatch)


def test_cpp_loop_rejects_bad_inputs():
    cond = np.zeros((2, 77, 8), np.float32)
    noise = np.zeros((2, 4, 4, 4), np.float32)

    def unet(sample, timestep, context):
        return np.zeros((sample.shape[0], 4, 4, 4), np.float32)

    with pytest.raises(ValueError, match="uncond must have shape"):
        _core.denoise(unet, cond, np.zeros((3, 77, 8), np.float32), noise, 2, 7.5)
    with pytest.raises(ValueError, match="noise must have shape"):
        _core.denoise(unet, cond, cond[:1], noise[:1], 2, 7.5)
    with pytest.raises(ValueError, match="image_latents must have the shape"):
        image = np.ascontiguousarray(noise[:, :, :2])
        _core.denoise(unet, cond, cond[:1], noise, 2, 7.5, image_latents=image)
    with pytest.raises(ValueError, match="steps must be"):
        _core.denoise(unet, cond, cond[:1], noise, 0, 7.5)
    with pytest.raises(ValueError, match=r"unet_fn returned shape \[4, 4, 2, 2\]"):
        _core.denoise(lambda s, t, c: np.zeros((4, 4, 2, 2), np.float32), cond, cond[:1], noise, 2, 7.5)


def test_scheduler_facts_are_parsed_strictly():
    facts = reference.scheduler_facts()
    assert _config_fields(_core.DDIMConfig.from_facts(facts)) == facts
    with pytest.raises(ManifestError, match=r"unknown key\(s\) \['eta2'\]"):
        _core.DDIMConfig.from_facts({**facts, "eta2": 0.0})
    with pytest.raises(ManifestError, match=r"missing key\(s\) \['steps_offset'\]"):
        _core.DDIMConfig.from_facts({k: v for k, v in facts.items() if k != "steps_offset"})
    with pytest.raises(ManifestError, match="'set_alpha_to_one' must be bool, got int"):
        _core.DDIMConfig.from_facts({**facts, "set_alpha_to_one": 0})
    with pytest.raises(ManifestError, match="'train_timesteps' must be int, got float"):
        _core.DDIMConfig.from_facts({**facts, "train_timesteps": 1000.0})
    with pytest.raises(ManifestError, match="timestep_spacing must be 'leading'"):
        _core.DDIMConfig.from_facts({**facts, "timestep_spacing": "trailing"})


def test_runtime_loop_is_torch_free():
    # The runtime's side of this module (the contract's names, the facts reader, the loop) runs without torch.
    code = (
        "import sys\n"
        "import numpy as np\n"
        "from visionllm_edge import _core, contract\n"
        "import json\n"
        "config = _core.DDIMConfig.from_facts(json.loads(sys.argv[1]))\n"
        "x = np.ones((1, 4, 2, 2), np.float32)\n"
        "c = np.ones((1, 3, 2), np.float32)\n"
        "unet = lambda s, t, e: np.full((s.shape[0], 4, 2, 2), 0.5, np.float32)\n"
        "out = _core.denoise(unet, c, c, x, 2, 7.5, config=config)\n"
        "assert out.shape == x.shape and contract.UNCOND_TENSOR == 'uncond'\n"
        "assert 'torch' not in sys.modules, 'torch imported'\n"
    )
    subprocess.run([sys.executable, "-c", code, json.dumps(reference.scheduler_facts())], check=True)


# --- end to end: the runtime's loop over the exported graphs ------------------------------------------------


@pytest.mark.parametrize("kind", KINDS)
def test_cpp_loop_over_exported_graphs_matches_reference(model, exported, kind):
    """Link states -> mapper -> 3 DDIM steps with guidance -> VAE decode, through ONNX Runtime and the C++
    loop, against the reference `map_queries`, `denoise` and `decode_latents` with the same explicit noise."""
    from safetensors.numpy import load_file

    decoder = getattr(model, ATTRIBUTE[kind])
    graphs = {name.split("_", 1)[1]: _session(path) for name, path in exported[kind]["graphs"].items()}
    uncond = load_file(str(exported[kind]["extra"][f"{kind}_uncond"]))[contract.UNCOND_TENSOR]
    rng = np.random.default_rng(7)
    n = 2
    latent = model.config.image_size_for(kind) // decoder.vae_scale_factor
    links = rng.standard_normal((n, decoder.num_embed_tokens, decoder.llm_hidden_size)).astype(np.float32)
    noise = rng.standard_normal((n, 4, latent, latent)).astype(np.float32)

    (cond,) = graphs["mapper"].run(None, {"link_states": links})
    image_latents = ref_image_latents = None
    if kind == "edit":
        image = rng.random((n, 3, latent * decoder.vae_scale_factor) + (latent * decoder.vae_scale_factor,))
        image = image.astype(np.float32)
        (image_latents,) = graphs["vae_encoder"].run(None, {"images": image})
        ref_image_latents = decoder.encode_image(torch.from_numpy(image))

    def unet(sample, timestep, context):
        (out,) = graphs["unet"].run(
            None, {"sample": sample, "timestep": timestep, "encoder_hidden_states": context}
        )
        return out

    latents = _core.denoise(unet, cond, uncond, noise, 3, 7.5, image_latents, 1.5)
    (images,) = graphs["vae_decoder"].run(None, {"latents": latents})

    with torch.no_grad():
        ref_cond = decoder.map_queries(torch.from_numpy(links))
        ref_latents = decoder.denoise(
            ref_cond,
            noise=torch.from_numpy(noise),
            steps=3,
            guidance_scale=7.5,
            image_latents=ref_image_latents,
            image_guidance_scale=1.5,
        )
        ref_images = decoder.decode_latents(ref_latents)
    for name, got, want in (("latents", latents, ref_latents), ("images", images, ref_images)):
        mismatch = compare(got, want.numpy(), atol=TOL, rtol=TOL)
        assert mismatch is None, f"{kind} {name}: {mismatch}"
