"""The C++ diffusion loop (`_core.denoise`, `_core.DDIMSchedule`, `_core.DDIMConfig`) against the PyTorch
reference (`visionllm_edge.export.models.diffusion`), the runtime's only other implementation of it.

The UNet is a small NumPy function of every input (all sample channels, the timestep, the context), so a wrong
batch layout, a wrong image channel or a wrong timestep changes the result. The C++ loop and the reference's
own `denoise` call the same function on the same inputs and must agree to float32 rounding, over random
inputs, several step counts, generation and editing, guided and unguided, and other scheduler constants.
"""

from __future__ import annotations

import types

import numpy as np
import pytest
from visionllm_edge import _core
from visionllm_edge.contract import compare
from visionllm_edge.manifest import ManifestError

torch = pytest.importorskip("torch", reason="the reference loop needs torch")
reference = pytest.importorskip(
    "visionllm_edge.export.models.diffusion", reason="the reference needs diffusers"
)

STEP_COUNTS = [1, 2, 5, 20]
#: float32 agreement of the two loops (each rounds once per operation, in the same order).
TOL = 1e-5


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


def reference_decoder(kind: str) -> types.SimpleNamespace:
    """What the reference's `denoise` and input checks read of a decoder, around `fake_unet`."""

    def torch_unet(sample, timestep, encoder_hidden_states):
        out = fake_unet(sample.numpy(), timestep.numpy(), encoder_hidden_states.numpy())
        return types.SimpleNamespace(sample=torch.from_numpy(out))

    decoder = types.SimpleNamespace(
        kind=kind, sd_unet=torch_unet, num_queries=7, sd_hidden_size=6, latent_channels=4
    )
    checks = reference.DiffusionWithLLMEmb._check_denoise_inputs
    decoder._check_denoise_inputs = types.MethodType(checks, decoder)
    return decoder


def reference_denoise(kind, cond, uncond, noise, steps, guidance, image, image_guidance) -> np.ndarray:
    """The reference's own `DiffusionWithLLMEmb.denoise` (input checks included) around `fake_unet`."""
    return reference.DiffusionWithLLMEmb.denoise(
        reference_decoder(kind),
        torch.from_numpy(cond),
        noise=torch.from_numpy(noise),
        steps=steps,
        guidance_scale=guidance,
        image_latents=None if image is None else torch.from_numpy(image),
        image_guidance_scale=image_guidance,
        uncond=torch.from_numpy(uncond),
    ).numpy()


def reference_check(kind, cond, uncond, noise, image_latents) -> None:
    """The reference's own input checks of `denoise`."""
    reference.DiffusionWithLLMEmb._check_denoise_inputs(
        reference_decoder(kind),
        torch.from_numpy(cond),
        torch.from_numpy(noise),
        None if image_latents is None else torch.from_numpy(image_latents),
        torch.from_numpy(uncond),
    )


def config_fields(config) -> dict:
    return {key: getattr(config, key) for key in reference.scheduler_facts()}


# --- the schedule -------------------------------------------------------------------------------------------


@pytest.mark.parametrize("steps", [1, 3, 20, 50, 999])
def test_schedule_matches_the_reference_schedule(steps):
    ours, theirs = _core.DDIMSchedule(steps), reference.DDIMSchedule(steps)
    assert ours.steps == steps and ours.timesteps.dtype == np.int64
    assert ours.timesteps.tolist() == theirs.timesteps
    assert _core.ddim_timesteps(steps).tolist() == reference.ddim_timesteps(steps)
    # Both in float64 (torch's linspace and cumprod against C++'s loops): equal to the last bits or so.
    np.testing.assert_allclose(ours.alphas_cumprod, theirs.alphas_cumprod.numpy(), rtol=1e-14, atol=0)
    assert ours.final_alpha_cumprod == pytest.approx(theirs.final_alpha_cumprod, rel=1e-14)
    for t in theirs.timesteps:
        assert ours.alphas(t) == pytest.approx(theirs._alphas(t), rel=1e-14)


@pytest.mark.parametrize("set_alpha_to_one", [False, True])
def test_schedule_with_other_constants_matches_the_reference(set_alpha_to_one):
    constants = dict(train_timesteps=200, beta_start=0.001, beta_end=0.02, steps_offset=0)
    ours = _core.DDIMSchedule(7, _core.DDIMConfig(**constants, set_alpha_to_one=set_alpha_to_one))
    theirs = reference.DDIMSchedule(7, train_steps=200, beta_start=0.001, beta_end=0.02, steps_offset=0)
    assert ours.timesteps.tolist() == theirs.timesteps == [168, 140, 112, 84, 56, 28, 0]
    np.testing.assert_allclose(ours.alphas_cumprod, theirs.alphas_cumprod.numpy(), rtol=1e-14, atol=0)
    for t in theirs.timesteps[:-1]:
        assert ours.alphas(t) == pytest.approx(theirs._alphas(t), rel=1e-14)
    # The step after the last timestep: alphas_cumprod[0] as the reference (and SD-1.5) has it, or 1 with
    # set_alpha_to_one (diffusers' meaning of the flag, which the reference does not implement).
    last_alpha, final = ours.alphas(0)
    assert last_alpha == pytest.approx(float(theirs.alphas_cumprod[0]), rel=1e-14)
    if set_alpha_to_one:
        assert final == ours.final_alpha_cumprod == 1.0
    else:
        assert final == ours.final_alpha_cumprod == pytest.approx(theirs.final_alpha_cumprod, rel=1e-14)


def test_schedule_errors():
    for steps in (0, 1001):
        with pytest.raises(ValueError, match=rf"^steps must be an int in \[1, 1000\], got {steps}$"):
            _core.DDIMSchedule(steps)
        with pytest.raises(ValueError, match=r"steps must be in \[1, 1000\]"):
            reference.ddim_timesteps(steps)
    # The reference accepts 1000 steps but fails at its first one (t = 1000); C++ refuses them up front.
    with pytest.raises(
        ValueError, match=r"^1000 steps with steps_offset 1 start at timestep 1000, outside \[0, 1000\)$"
    ):
        _core.DDIMSchedule(1000)
    with pytest.raises(ValueError, match=r"timestep must be in \[0, 1000\), got 1000"):
        reference.DDIMSchedule(1000).step(torch.zeros(1), 1000, torch.zeros(1))


# The facts the exporter writes (the reference's scheduler) with one change each: what the C++ reader makes of
# it, either the constants it runs or its message.
FACT_VARIANTS = {
    "default": ({}, None),
    "other numbers": (
        {"train_timesteps": 500, "beta_end": 0.02, "steps_offset": 0, "init_noise_sigma": 1},
        None,
    ),
    "unknown key": ({"eta2": 0.0}, "scheduler facts: unknown key(s) ['eta2']"),
    "int as float": (
        {"train_timesteps": 1000.0},
        "scheduler facts: 'train_timesteps' must be int, got float",
    ),
    "flag as int": ({"set_alpha_to_one": 0}, "scheduler facts: 'set_alpha_to_one' must be bool, got int"),
    "count as flag": ({"steps_offset": True}, "scheduler facts: 'steps_offset' must be int, got bool"),
    "text as float": ({"beta_start": "0.1"}, "scheduler facts: 'beta_start' must be float, got str"),
    "other spacing": (
        {"timestep_spacing": "trailing"},
        "DDIM timestep_spacing must be 'leading' (the only one implemented), got 'trailing'",
    ),
    "eta": ({"eta": 0.5}, "DDIM eta must be 0.0 (the only one implemented), got 0.5"),
    "clipping": (
        {"clip_sample": True},
        "DDIM clip_sample must be False (the only one implemented), got True",
    ),
    "no timesteps": ({"train_timesteps": 0}, "DDIM train_timesteps must be >= 1, got 0"),
    "betas reversed": (
        {"beta_start": 0.02, "beta_end": 0.01},
        "DDIM betas must satisfy 0 < beta_start <= beta_end < 1, got 0.02, 0.01",
    ),
}


@pytest.mark.parametrize("variant", sorted(FACT_VARIANTS))
def test_scheduler_facts_are_read_strictly(variant):
    change, message = FACT_VARIANTS[variant]
    facts = {**reference.scheduler_facts(), **change}
    if message is not None:
        with pytest.raises(ManifestError) as got:
            _core.DDIMConfig.from_facts(facts)
        assert str(got.value) == message
        return
    got = config_fields(_core.DDIMConfig.from_facts(facts))
    assert got == facts
    # Floats come back as floats even when the JSON held an integer.
    assert all(isinstance(got[k], float) for k in ("beta_start", "beta_end", "eta", "init_noise_sigma"))


def test_scheduler_facts_missing_keys_are_named():
    facts = reference.scheduler_facts()
    del facts["steps_offset"], facts["eta"]
    with pytest.raises(ManifestError, match=r"scheduler facts: missing key\(s\) \['eta', 'steps_offset'\]"):
        _core.DDIMConfig.from_facts(facts)


# --- the loop against the torch reference -------------------------------------------------------------------

GUIDANCE = {
    "gen": [(7.5, 1.5), (1.0, 1.5), (1.2, 1.5)],
    "edit": [(7.5, 1.5), (7.5, 0.5), (1.0, 1.5), (2.0, 1.0)],
}
CASES = [(kind, g, g_img) for kind, pairs in GUIDANCE.items() for g, g_img in pairs]


@pytest.mark.parametrize("steps", STEP_COUNTS)
@pytest.mark.parametrize(("kind", "guidance", "image_guidance"), CASES)
def test_denoise_matches_the_torch_reference(kind, guidance, image_guidance, steps):
    for n, uncond_batch in ((1, 1), (3, 1), (2, 2)):
        cond, uncond, noise, image = make_inputs(steps * 10 + n, n, uncond_batch, kind == "edit")
        want = reference_denoise(kind, cond, uncond, noise, steps, guidance, image, image_guidance)
        got = _core.denoise(fake_unet, cond, uncond, noise, steps, guidance, image, image_guidance)
        assert got.dtype == np.float32 and got.shape == noise.shape
        mismatch = compare(got, want, atol=TOL, rtol=TOL)
        assert mismatch is None, f"n={n}, uncond batch {uncond_batch}: {mismatch}"
        # Not a degenerate case: the loop moved the latents away from the noise (one step, from t = 1 to
        # alphas_cumprod[0], moves them little).
        assert np.abs(got - noise).mean() > (0.1 if steps > 1 else 1e-3)


def test_denoise_sees_the_guidance_scales_and_the_image():
    """Each input changes the result, so the agreement above is evidence about each of them."""
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


@pytest.mark.parametrize("set_alpha_to_one", [False, True])
@pytest.mark.parametrize("kind", ["gen", "edit"])
def test_denoise_with_other_scheduler_constants_matches_the_reference(monkeypatch, kind, set_alpha_to_one):
    """The reference loop over the reference schedule at other constants (its `denoise` builds the schedule
    from its module's `DDIMSchedule`, replaced here); set_alpha_to_one as diffusers defines it: the step after
    the last timestep lands on alpha 1."""
    constants = dict(train_timesteps=300, beta_start=0.002, beta_end=0.03, steps_offset=2)

    class OtherSchedule(reference.DDIMSchedule):
        def __init__(self, steps):
            super().__init__(steps, train_steps=300, beta_start=0.002, beta_end=0.03, steps_offset=2)
            if set_alpha_to_one:
                self.final_alpha_cumprod = 1.0

    monkeypatch.setattr(reference, "DDIMSchedule", OtherSchedule)
    cond, uncond, noise, image = make_inputs(9, 2, 1, editing=kind == "edit")
    want = reference_denoise(kind, cond, uncond, noise, 6, 7.5, image, 1.5)
    config = _core.DDIMConfig(**constants, set_alpha_to_one=set_alpha_to_one)
    got = _core.denoise(fake_unet, cond, uncond, noise, 6, 7.5, image, 1.5, config)
    mismatch = compare(got, want, atol=TOL, rtol=TOL)
    assert mismatch is None, str(mismatch)
    # The constants matter: the default schedule gives another result.
    assert np.abs(_core.denoise(fake_unet, cond, uncond, noise, 6, 7.5, image, 1.5) - got).max() > 1e-3


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
    # Shapes: the message names the argument and both shapes; the reference refuses the same inputs, naming
    # the same argument.
    for name, bad, message in (
        ("uncond", np.zeros((3, 7, 6), np.float32), "uncond must have shape [1 or 2, 7, 6], got [3, 7, 6]"),
        ("noise", noise[:1], "noise must have shape [2, C, h, w] (n from cond), got [1, 4, 4, 4]"),
        (
            "image_latents",
            np.ascontiguousarray(image[:, :, :2]),
            "image_latents must have the shape of noise [2, 4, 4, 4], got [2, 4, 2, 4]",
        ),
    ):
        args = dict(cond=cond, uncond=uncond, noise=noise, image_latents=image)
        args[name] = bad
        with pytest.raises(ValueError) as ours:
            _core.denoise(fake_unet, steps=2, guidance=7.5, **args)
        assert str(ours.value) == message
        with pytest.raises(ValueError, match=f"^{name} must have"):
            reference_check("edit", **args)
    with pytest.raises(ValueError, match=r"^steps must be an int in \[1, 1000\], got 0$"):
        _core.denoise(fake_unet, cond, uncond, noise, 0, 7.5)


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
