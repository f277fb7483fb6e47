"""The C++ diffusion loop (`_core.denoise`, `_core.DDIMSchedule`, `_core.DDIMConfig`) against the Python loop
(`visionllm_edge.diffusion`) and the PyTorch reference (`visionllm_edge.export.models.diffusion`).

The UNet is a small NumPy function of every input (all sample channels, the timestep, the context), so a wrong
batch layout, a wrong image channel or a wrong timestep changes the result. Both loops call the same function
on the same inputs; the C++ one must agree with the Python one to float32 rounding (in practice bit for bit)
and with the torch reference to the tolerance the reference's own NumPy parity uses.
"""

from __future__ import annotations

import types

import numpy as np
import pytest
from visionllm_edge import _core
from visionllm_edge import diffusion as py_loop
from visionllm_edge.manifest import ManifestError

STEP_COUNTS = [1, 2, 5, 20]


def fake_unet(sample: np.ndarray, timestep: np.ndarray, context: np.ndarray) -> np.ndarray:
    """A float32 stand-in for the UNet: noise_pred [B, 4, h, w] from every input."""
    b, channels = sample.shape[:2]
    latent = sample[:, :4]
    image = sample[:, 4:].sum(axis=1, keepdims=True) if channels > 4 else np.float32(0)
    weights = np.linspace(-1.0, 1.0, context.shape[-1], dtype=np.float32)
    text = (context * weights).mean(axis=1).sum(axis=1).reshape(b, 1, 1, 1)
    t = np.broadcast_to(timestep, (b,)).astype(np.float32).reshape(b, 1, 1, 1) / np.float32(1000)
    out = np.tanh(latent * np.float32(0.8) + image * np.float32(0.3) + text + t) + np.float32(0.1) * latent
    return out.astype(np.float32)


def make_inputs(seed: int, n: int, uncond_batch: int, editing: bool, side: int = 5):
    rng = np.random.default_rng(seed)
    cond = rng.standard_normal((n, 7, 6)).astype(np.float32)
    uncond = rng.standard_normal((uncond_batch, 7, 6)).astype(np.float32)
    noise = rng.standard_normal((n, 4, side, side)).astype(np.float32)
    image = rng.standard_normal((n, 4, side, side)).astype(np.float32) if editing else None
    return cond, uncond, noise, image


# --- the schedule -------------------------------------------------------------------------------------------


@pytest.mark.parametrize("steps", [1, 3, 20, 50, 999])
def test_schedule_equals_the_python_schedule(steps):
    ours, theirs = _core.DDIMSchedule(steps), py_loop.DDIMSchedule(steps)
    assert ours.timesteps.dtype == np.int64
    np.testing.assert_array_equal(ours.timesteps, theirs.timesteps)
    np.testing.assert_array_equal(_core.ddim_timesteps(steps), py_loop.ddim_timesteps(steps))
    # The same float64 operations in the same order: equal, not just close.
    np.testing.assert_array_equal(ours.alphas_cumprod, theirs.alphas_cumprod)
    assert ours.final_alpha_cumprod == theirs.final_alpha_cumprod
    for t in ours.timesteps:
        assert ours.alphas(int(t)) == theirs.alphas(int(t))


def test_schedule_with_other_constants_equals_the_python_schedule():
    kwargs = dict(train_timesteps=200, beta_start=0.001, beta_end=0.02, steps_offset=0, set_alpha_to_one=True)
    ours = _core.DDIMSchedule(7, _core.DDIMConfig(**kwargs))
    theirs = py_loop.DDIMSchedule(7, py_loop.DDIMConfig(**kwargs))
    np.testing.assert_array_equal(ours.timesteps, theirs.timesteps)
    np.testing.assert_array_equal(ours.alphas_cumprod, theirs.alphas_cumprod)
    assert (
        ours.alphas(int(ours.timesteps[-1]))
        == theirs.alphas(int(theirs.timesteps[-1]))
        == (
            theirs.alphas_cumprod[0],
            1.0,
        )
    )


def test_schedule_errors_read_as_the_python_ones():
    for steps in (0, 1000, 1001):
        with pytest.raises(ValueError) as theirs:
            py_loop.DDIMSchedule(steps)
        with pytest.raises(ValueError, match="steps") as ours:
            _core.DDIMSchedule(steps)
        assert str(ours.value) == str(theirs.value).replace(repr(steps), str(steps))


FACT_VARIANTS = {
    "default": {},
    "other numbers": {"train_timesteps": 500, "beta_end": 0.02, "steps_offset": 0, "init_noise_sigma": 1},
    "unknown key": {"eta2": 0.0},
    "int as float": {"train_timesteps": 1000.0},
    "flag as int": {"set_alpha_to_one": 0},
    "count as flag": {"steps_offset": True},
    "text as float": {"beta_start": "0.1"},
    "other spacing": {"timestep_spacing": "trailing"},
    "eta": {"eta": 0.5},
    "clipping": {"clip_sample": True},
    "no timesteps": {"train_timesteps": 0},
    "betas reversed": {"beta_start": 0.02, "beta_end": 0.01},
}


@pytest.mark.parametrize("variant", sorted(FACT_VARIANTS))
def test_scheduler_facts_read_as_the_python_parser_reads_them(variant):
    facts = {**py_loop.DDIMConfig().to_facts(), **FACT_VARIANTS[variant]}
    try:
        want = py_loop.DDIMConfig.from_facts(facts)
    except ValueError as error:
        with pytest.raises(ManifestError) as got:
            _core.DDIMConfig.from_facts(facts)
        assert str(got.value) == str(error)
        return
    got = _core.DDIMConfig.from_facts(facts)
    assert {key: getattr(got, key) for key in want.to_facts()} == want.to_facts()


def test_scheduler_facts_missing_keys_are_named():
    facts = py_loop.DDIMConfig().to_facts()
    del facts["steps_offset"], facts["eta"]
    with pytest.raises(ManifestError, match=r"scheduler facts: missing key\(s\) \['eta', 'steps_offset'\]"):
        _core.DDIMConfig.from_facts(facts)


# --- the loop against the Python loop -----------------------------------------------------------------------

GUIDANCE = {
    "gen": [(7.5, 1.5), (1.0, 1.5), (1.2, 1.5)],
    "edit": [(7.5, 1.5), (7.5, 0.5), (1.0, 1.5), (2.0, 1.0)],
}
CASES = [(kind, g, g_img) for kind, pairs in GUIDANCE.items() for g, g_img in pairs]


@pytest.mark.parametrize("steps", STEP_COUNTS)
@pytest.mark.parametrize(("kind", "guidance", "image_guidance"), CASES)
def test_denoise_equals_the_python_loop(kind, guidance, image_guidance, steps):
    for n, uncond_batch in ((1, 1), (3, 1), (2, 2)):
        cond, uncond, noise, image = make_inputs(steps * 10 + n, n, uncond_batch, kind == "edit")
        want = py_loop.denoise(fake_unet, cond, uncond, noise, steps, guidance, image, image_guidance)
        got = _core.denoise(fake_unet, cond, uncond, noise, steps, guidance, image, image_guidance)
        assert got.dtype == np.float32 and got.shape == noise.shape
        np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-7)
        # Not a degenerate case: the loop moved the latents away from the noise (one step, from t = 1 to
        # alphas_cumprod[0], moves them little).
        assert np.abs(got - noise).mean() > (0.1 if steps > 1 else 1e-3)


def test_denoise_sees_the_guidance_scales_and_the_image():
    """Each input changes the result, so the equality above is evidence about each of them."""
    cond, uncond, noise, image = make_inputs(5, 2, 1, editing=True)
    base = _core.denoise(fake_unet, cond, uncond, noise, 5, 7.5, image, 1.5)
    for other in (
        _core.denoise(fake_unet, cond, uncond, noise, 5, 5.0, image, 1.5),
        _core.denoise(fake_unet, cond, uncond, noise, 5, 7.5, image, 2.0),
        _core.denoise(fake_unet, cond, uncond, noise, 5, 7.5, image * np.float32(2), 1.5),
        _core.denoise(fake_unet, cond, uncond * np.float32(2), noise, 5, 7.5, image, 1.5),
        _core.denoise(fake_unet, cond, uncond, noise, 5, 7.5),
    ):
        assert np.abs(other - base).max() > 1e-3


def test_denoise_with_other_scheduler_constants_equals_the_python_loop():
    kwargs = dict(train_timesteps=300, beta_start=0.002, beta_end=0.03, steps_offset=2, set_alpha_to_one=True)
    cond, uncond, noise, image = make_inputs(9, 2, 1, editing=True)
    want = py_loop.denoise(fake_unet, cond, uncond, noise, 6, 7.5, image, 1.5, py_loop.DDIMConfig(**kwargs))
    got = _core.denoise(fake_unet, cond, uncond, noise, 6, 7.5, image, 1.5, _core.DDIMConfig(**kwargs))
    np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-7)


# --- the loop against the torch reference -------------------------------------------------------------------


@pytest.mark.parametrize("steps", [1, 4, 20])
@pytest.mark.parametrize(("kind", "guidance", "image_guidance"), [("gen", 7.5, 1.5), ("edit", 7.5, 1.5)])
def test_denoise_matches_the_torch_reference(kind, guidance, image_guidance, steps):
    """The reference's own `denoise` (export/models/diffusion.py) around the same fake UNet; the loop that
    remains the oracle once the Python loop goes."""
    torch = pytest.importorskip("torch", reason="the reference loop needs torch")
    from visionllm_edge.contract import compare
    from visionllm_edge.export.models.diffusion import DiffusionWithLLMEmb

    def torch_unet(sample, timestep, encoder_hidden_states):
        out = fake_unet(sample.numpy(), timestep.numpy(), encoder_hidden_states.numpy())
        return types.SimpleNamespace(sample=torch.from_numpy(out))

    decoder = types.SimpleNamespace(kind=kind, sd_unet=torch_unet, _check_denoise_inputs=lambda *a: None)
    cond, uncond, noise, image = make_inputs(steps, 2, 1, kind == "edit")
    want = DiffusionWithLLMEmb.denoise(
        decoder,
        torch.from_numpy(cond),
        noise=torch.from_numpy(noise),
        steps=steps,
        guidance_scale=guidance,
        image_latents=None if image is None else torch.from_numpy(image),
        image_guidance_scale=image_guidance,
        uncond=torch.from_numpy(uncond),
    ).numpy()
    got = _core.denoise(fake_unet, cond, uncond, noise, steps, guidance, image, image_guidance)
    mismatch = compare(got, want, atol=1e-5, rtol=1e-5)
    assert mismatch is None, str(mismatch)


# --- what the binding refuses -------------------------------------------------------------------------------


def test_denoise_refuses_bad_inputs_naming_them():
    cond, uncond, noise, image = make_inputs(0, 2, 1, editing=True, side=4)
    with pytest.raises(TypeError, match="cond must be float32, got float64"):
        _core.denoise(fake_unet, cond.astype(np.float64), uncond, noise, 2, 7.5)
    with pytest.raises(TypeError, match="noise must be a numpy float32 array, got list"):
        _core.denoise(fake_unet, cond, uncond, noise.tolist(), 2, 7.5)
    with pytest.raises(TypeError, match="image_latents must be C-contiguous"):
        _core.denoise(fake_unet, cond, uncond, noise, 2, 7.5, np.asfortranarray(image))
    with pytest.raises(TypeError, match="unet_fn must be callable, got int"):
        _core.denoise(3, cond, uncond, noise, 2, 7.5)
    # The shape errors read as the Python loop's.
    for bad in (
        dict(uncond=np.zeros((3, 7, 6), np.float32)),
        dict(noise=noise[:1]),
        dict(image_latents=np.ascontiguousarray(image[:, :, :2])),
        dict(steps=0),
    ):
        args = dict(cond=cond, uncond=uncond, noise=noise, steps=2, guidance=7.5, image_latents=None)
        args.update(bad)
        with pytest.raises(ValueError) as theirs:
            py_loop.denoise(fake_unet, **args)
        with pytest.raises(ValueError) as ours:
            _core.denoise(fake_unet, **args)
        assert str(ours.value) == str(theirs.value), bad.keys()


def test_unet_results_are_checked_and_its_errors_pass_through():
    cond, uncond, noise, _ = make_inputs(0, 2, 1, editing=False, side=4)
    with pytest.raises(ValueError, match=r"unet_fn returned shape \[4, 4, 2, 2\], expected \[4, 4, 4, 4\]"):
        _core.denoise(lambda s, t, c: np.zeros((4, 4, 2, 2), np.float32), cond, uncond, noise, 2, 7.5)
    with pytest.raises(TypeError, match="unet_fn must return float32, got float64"):
        _core.denoise(lambda s, t, c: np.zeros((4, 4, 4, 4)), cond, uncond, noise, 2, 7.5)

    class UNetDown(Exception):
        pass

    calls = []

    def failing(sample, timestep, context):
        calls.append(int(timestep[0]))
        if len(calls) == 2:
            raise UNetDown("second step")
        return fake_unet(sample, timestep, context)

    with pytest.raises(UNetDown, match="second step"):
        _core.denoise(failing, cond, uncond, noise, 5, 7.5)
    assert calls == [801, 601]


def test_the_unet_gets_its_own_arrays():
    """The loop reuses its buffers between steps; the arrays a UNet keeps must not change under it."""
    cond, uncond, noise, _ = make_inputs(1, 1, 1, editing=False)
    kept = []

    def keeping(sample, timestep, context):
        kept.append((sample, sample.copy(), timestep, timestep.copy()))
        return fake_unet(sample, timestep, context)

    _core.denoise(keeping, cond, uncond, noise, 3, 7.5)
    assert [int(t[0]) for _, _, t, _ in kept] == [667, 334, 1]
    for sample, copy, timestep, t_copy in kept:
        np.testing.assert_array_equal(sample, copy)
        np.testing.assert_array_equal(timestep, t_copy)
