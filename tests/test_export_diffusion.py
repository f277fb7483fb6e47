"""The generation / editing exporters and the NumPy denoising loop, on tiny-random.

Graphs are exported once per module into a temporary folder, checked with `onnx.checker` and run with ONNX
Runtime (CPU) against the PyTorch reference. The NumPy loop (`visionllm_edge.diffusion`, what the runtime
runs) is checked against the reference `DDIMSchedule` and `denoise`, both with the torch UNet and with the
exported graphs end to end.
"""

from __future__ import annotations

import subprocess
import sys
import warnings

import numpy as np
import pytest
import torch
from visionllm_edge import contract
from visionllm_edge import diffusion as loop
from visionllm_edge.contract import compare
from visionllm_edge.export.models import diffusion as reference

onnx = pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")

from visionllm_edge.export.checkpoint import load_reference  # noqa: E402
from visionllm_edge.export.onnx.base import ExportSettings, export_graph, exporter_for  # noqa: E402
from visionllm_edge.export.onnx.diffusion import EditExporter, GenExporter  # noqa: E402

KINDS = ("gen", "edit")
ATTRIBUTE = {"gen": "sd", "edit": "ip2p"}
TOL = 1e-4


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
    schedule = loop.DDIMConfig.from_facts(facts["scheduler"])
    assert (schedule.train_timesteps, schedule.beta_start, schedule.beta_end, schedule.steps_offset) == (
        reference.TRAIN_STEPS,
        reference.BETA_START,
        reference.BETA_END,
        reference.STEPS_OFFSET,
    )
    assert schedule.timestep_spacing == "leading" and schedule.set_alpha_to_one is False
    assert facts["image_size"] == model.config.image_size_for(kind) == 32
    assert facts["latent_size"] == facts["image_size"] // decoder.vae_scale_factor
    assert facts["vae_scaling_factor"] == decoder.scaling_factor
    assert facts["latent_channels"] == 4 and facts["steps"] == 20 and facts["guidance_scale"] == 7.5
    assert facts["uncond_file"] == f"{kind}_uncond.safetensors" and facts["uncond_tensor"] == "uncond"
    assert ("image_guidance_scale" in facts) == (kind == "edit")
    if kind == "edit":
        assert facts["image_guidance_scale"] == 1.5


# --- the NumPy loop against the torch reference -------------------------------------------------------------


@pytest.mark.parametrize("steps", [1, 3, 20, 50, 999])
def test_schedule_matches_the_reference(steps):
    ours = loop.DDIMSchedule(steps)
    ref = reference.DDIMSchedule(steps)
    assert ours.timesteps.dtype == np.int64
    assert ours.timesteps.tolist() == ref.timesteps == reference.ddim_timesteps(steps)
    np.testing.assert_allclose(ours.alphas_cumprod, ref.alphas_cumprod.numpy(), rtol=1e-14, atol=0)
    assert ours.final_alpha_cumprod == pytest.approx(ref.final_alpha_cumprod, rel=1e-14)
    rng = np.random.default_rng(steps)
    x = rng.standard_normal((2, 4, 3, 3)).astype(np.float32)
    eps = rng.standard_normal((2, 4, 3, 3)).astype(np.float32)
    for t in ours.timesteps:
        assert ours.step_coefficients(t) == pytest.approx(ref.step_coefficients(int(t)), rel=1e-12)
        want = ref.step(torch.from_numpy(eps), int(t), torch.from_numpy(x)).numpy()
        got = ours.step(eps, t, x)
        assert got.dtype == np.float32
        np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-6)


def test_schedule_rejects_steps_past_the_end():
    # Leading spacing with offset 1: 1000 steps would start at t = 1000 (the reference fails at step one).
    with pytest.raises(ValueError, match=r"start at timestep 1000, outside \[0, 1000\)"):
        loop.DDIMSchedule(1000)
    with pytest.raises(ValueError, match="steps must be an int"):
        loop.DDIMSchedule(0)


def test_guidance_combines():
    rng = np.random.default_rng(0)
    eps = rng.standard_normal((6, 4, 2, 2)).astype(np.float32)
    u, c = eps[:3], eps[3:]
    np.testing.assert_allclose(loop.cfg_combine(eps, 7.5), u + 7.5 * (c - u), rtol=1e-6)
    ci, ui, u0 = eps[:2], eps[2:4], eps[4:]
    want = u0 + 7.5 * (ci - ui) + 1.5 * (ui - u0)
    np.testing.assert_allclose(loop.ip2p_combine(eps, 7.5, 1.5), want, rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="even size"):
        loop.cfg_combine(eps[:3], 7.5)
    with pytest.raises(ValueError, match="multiple of 3"):
        loop.ip2p_combine(eps[:4], 7.5, 1.5)


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
def test_numpy_loop_with_the_torch_unet_matches_reference_denoise(model, kind, guidance, image_guidance):
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
    got = loop.denoise(_torch_unet(decoder), cond, uncond, noise, 3, guidance, image, image_guidance)
    assert got.dtype == np.float32
    mismatch = compare(got, want, atol=TOL, rtol=TOL)
    assert mismatch is None, str(mismatch)


def test_numpy_loop_rejects_bad_inputs():
    cond = np.zeros((2, 77, 8), np.float32)
    noise = np.zeros((2, 4, 4, 4), np.float32)

    def unet(sample, timestep, context):
        return np.zeros((sample.shape[0], 4, 4, 4), np.float32)

    with pytest.raises(ValueError, match="uncond must have shape"):
        loop.denoise(unet, cond, np.zeros((3, 77, 8), np.float32), noise, 2, 7.5)
    with pytest.raises(ValueError, match="noise must have shape"):
        loop.denoise(unet, cond, cond[:1], noise[:1], 2, 7.5)
    with pytest.raises(ValueError, match="image_latents must have the shape"):
        loop.denoise(unet, cond, cond[:1], noise, 2, 7.5, image_latents=noise[:, :, :2])
    with pytest.raises(ValueError, match="steps must be"):
        loop.denoise(unet, cond, cond[:1], noise, 0, 7.5)
    with pytest.raises(ValueError, match=r"unet_fn returned shape \[4, 4, 2, 2\]"):
        loop.denoise(lambda s, t, c: np.zeros((4, 4, 2, 2), np.float32), cond, cond[:1], noise, 2, 7.5)


def test_scheduler_facts_are_parsed_strictly():
    facts = loop.DDIMConfig().to_facts()
    assert loop.DDIMConfig.from_facts(facts) == loop.DDIMConfig()
    with pytest.raises(ValueError, match=r"unknown key\(s\) \['eta2'\]"):
        loop.DDIMConfig.from_facts({**facts, "eta2": 0.0})
    with pytest.raises(ValueError, match=r"missing key\(s\) \['steps_offset'\]"):
        loop.DDIMConfig.from_facts({k: v for k, v in facts.items() if k != "steps_offset"})
    with pytest.raises(ValueError, match="'set_alpha_to_one' must be bool, got int"):
        loop.DDIMConfig.from_facts({**facts, "set_alpha_to_one": 0})
    with pytest.raises(ValueError, match="'train_timesteps' must be int, got float"):
        loop.DDIMConfig.from_facts({**facts, "train_timesteps": 1000.0})
    with pytest.raises(ValueError, match="timestep_spacing must be 'leading'"):
        loop.DDIMConfig.from_facts({**facts, "timestep_spacing": "trailing"})


def test_loop_module_is_torch_free():
    code = "import sys, visionllm_edge.diffusion; assert 'torch' not in sys.modules, 'torch imported'"
    subprocess.run([sys.executable, "-c", code], check=True)


# --- end to end: the runtime's loop over the exported graphs ------------------------------------------------


@pytest.mark.parametrize("kind", KINDS)
def test_numpy_loop_over_exported_graphs_matches_reference(model, exported, kind):
    """Link states -> mapper -> 3 DDIM steps with guidance -> VAE decode, all through ONNX Runtime and NumPy,
    against the reference `map_queries`, `denoise` and `decode_latents` with the same explicit noise."""
    from safetensors.numpy import load_file

    decoder = getattr(model, ATTRIBUTE[kind])
    graphs = {name.split("_", 1)[1]: _session(path) for name, path in exported[kind]["graphs"].items()}
    uncond = load_file(str(exported[kind]["extra"][f"{kind}_uncond"]))["uncond"]
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

    latents = loop.denoise(unet, cond, uncond, noise, 3, 7.5, image_latents, 1.5)
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
