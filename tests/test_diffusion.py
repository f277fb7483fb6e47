"""The generation / editing decoders against the official golden data, the 7B key list and diffusers."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from visionllm_edge.contract import compare
from visionllm_edge.export.models.diffusion import (
    DDIMSchedule,
    DiffusionWithLLMEmb,
    build_diffusion,
    ddim_timesteps,
    scheduler_facts,
)

GOLDEN = Path(__file__).parent / "fixtures" / "golden_dev"
TINY_CKPT = GOLDEN / "tiny_official"
TINY_SD = GOLDEN / "checkpoints" / "stable-diffusion-v1-5"
CONFIG_7B = Path(__file__).parents[1] / "export" / "data" / "visionllmv2-7b.config.json"
# The official 7B key list lives in the workspace's shared data, next to the repository, not inside it.
KEYS_7B = Path(__file__).parents[2] / "shared" / "data" / "visionllmv2-7b.keys.json"


def _json(path: Path) -> dict:
    with open(path, encoding="utf-8") as f:
        return json.load(f)


def _sd_state_dict() -> dict[str, torch.Tensor]:
    """The `sd.*` slice of the tiny official checkpoint, prefix stripped, bf16 components cast to float32."""
    state = {}
    for shard in sorted(TINY_CKPT.glob("pytorch_model-*.bin")):
        tensors = torch.load(shard, map_location="cpu", weights_only=True)
        state.update({k[len("sd.") :]: v.float() for k, v in tensors.items() if k.startswith("sd.")})
    return state


@pytest.fixture(scope="module")
def gen_model() -> DiffusionWithLLMEmb:
    model = build_diffusion("gen", _json(TINY_CKPT / "config.json")["sd_config"], TINY_SD)
    state = _sd_state_dict()
    # strict: no missing or unexpected keys; the key order also follows the official module.
    model.load_state_dict(state, strict=True)
    assert list(model.state_dict()) == list(state)
    return model


@pytest.fixture(scope="module")
def edit_model() -> DiffusionWithLLMEmb:
    """A tiny InstructPix2Pix: the tiny SD components with an 8-channel UNet, seeded random weights."""
    torch.manual_seed(1234)
    unet = _json(TINY_SD / "unet" / "config.json") | {"in_channels": 8}
    return DiffusionWithLLMEmb(
        _json(TINY_CKPT / "config.json")["sd_config"],
        unet_config=unet,
        vae_config=_json(TINY_SD / "vae" / "config.json"),
        text_encoder_config=_json(TINY_SD / "text_encoder" / "config.json"),
        kind="edit",
    )


def _diffusers_ddim():
    from diffusers import DDIMScheduler

    # SD-1.5's own scheduler_config (written for PNDM); it has no clip_sample key and DDIMScheduler's default
    # would clip x0 to [-1, 1], which SD-1.5's released config turns off.
    return DDIMScheduler.from_config(
        _json(TINY_SD / "scheduler" / "scheduler_config.json"), clip_sample=False
    )


# ---- mapper ------------------------------------------------------------------------------------------------


def test_mapper_matches_official_golden(gen_model):
    golden = np.load(GOLDEN / "golden_sd_mapper.npz")
    hidden = torch.from_numpy(golden["gen_queries_hidden"])
    with torch.no_grad():
        assert compare(gen_model.emb_proj(hidden).numpy(), golden["emb_proj_out"]) is None
        assert compare(gen_model.llm2sd_mapper_queries.numpy(), golden["mapper_queries"]) is None
        assert compare(gen_model.map_queries(hidden).numpy(), golden["mapping_feature"]) is None


def test_unconditional_ids_match_the_sd_tokenizer(gen_model):
    from transformers import CLIPTokenizer

    tokenizer = CLIPTokenizer.from_pretrained(TINY_SD / "tokenizer")
    want = tokenizer([""], padding="max_length", max_length=77, return_tensors="pt").input_ids
    assert torch.equal(gen_model.unconditional_ids(), want)
    uncond = gen_model.unconditional_embedding()
    assert uncond.shape == (1, 77, 40)
    with torch.no_grad():
        assert torch.equal(uncond, gen_model.sd_text_encoder(want).last_hidden_state)


# ---- 7B structure ------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("kind", "prefix", "config_key"), [("gen", "sd.", "sd_config"), ("edit", "ip2p.", "ip2p_config")]
)
def test_7b_keys_and_shapes_on_meta(kind, prefix, config_key):
    if not KEYS_7B.is_file():
        pytest.skip(f"7B key list not found at {KEYS_7B}")
    want = {
        k[len(prefix) :]: v["shape"] for k, v in _json(KEYS_7B)["tensors"].items() if k.startswith(prefix)
    }
    with torch.device("meta"):
        model = build_diffusion(kind, _json(CONFIG_7B)[config_key])
    state = model.state_dict()
    assert len(want) == 1169
    assert list(state) == list(want)
    assert {k: list(v.shape) for k, v in state.items()} == want
    assert all(t.is_meta for t in state.values())
    assert model.sd_unet.config.in_channels == (4 if kind == "gen" else 8)


# ---- DDIM --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("steps", [1, 2, 3, 7, 20, 50, 100])
def test_ddim_timesteps_match_diffusers(steps):
    scheduler = _diffusers_ddim()
    scheduler.set_timesteps(steps)
    assert ddim_timesteps(steps) == scheduler.timesteps.tolist()
    assert DDIMSchedule(steps).timesteps == scheduler.timesteps.tolist()


def test_scheduler_facts_are_the_diffusers_scheduler():
    """What export writes as the `scheduler` facts is the DDIMScheduler this reference matches, setting by
    setting (the C++ loop refuses any other value of the fixed ones)."""
    scheduler = _diffusers_ddim()
    facts = scheduler_facts()
    names = {"train_timesteps": "num_train_timesteps"}
    for key in facts.keys() - {"eta", "init_noise_sigma"}:
        assert facts[key] == scheduler.config[names.get(key, key)], key
        assert type(facts[key]) is type(scheduler.config[names.get(key, key)]), key
    # eta is an argument of DDIMScheduler.step, 0 by default; init_noise_sigma an attribute.
    assert facts["eta"] == 0.0 and facts["init_noise_sigma"] == scheduler.init_noise_sigma == 1.0
    assert facts["set_alpha_to_one"] is False and facts["clip_sample"] is False
    # set_alpha_to_one False: the last step lands on alphas_cumprod[0] (diffusers in float32).
    final = DDIMSchedule(20).final_alpha_cumprod
    assert float(scheduler.final_alpha_cumprod) == pytest.approx(final, rel=1e-6)


def test_ddim_timesteps_examples():
    assert ddim_timesteps(50)[:3] == [981, 961, 941] and ddim_timesteps(50)[-1] == 1
    assert ddim_timesteps(20)[:2] == [951, 901]
    with pytest.raises(ValueError, match="steps"):
        ddim_timesteps(0)


@pytest.mark.parametrize("steps", [3, 20])
def test_ddim_step_matches_diffusers(steps):
    scheduler = _diffusers_ddim()
    scheduler.set_timesteps(steps)
    ours = DDIMSchedule(steps)
    gen = torch.Generator().manual_seed(7)
    sample = torch.randn(2, 4, 8, 8, generator=gen)
    # The first, a middle and the last step (whose previous alpha is alphas_cumprod[0]).
    for t in (ours.timesteps[0], ours.timesteps[len(ours.timesteps) // 2], ours.timesteps[-1]):
        eps = torch.randn(2, 4, 8, 8, generator=gen)
        want = scheduler.step(eps, t, sample).prev_sample
        got = ours.step(eps, t, sample)
        assert compare(got.numpy(), want.numpy(), atol=1e-5, rtol=1e-5) is None
        a, b = ours.step_coefficients(t)
        assert compare((a * sample + b * eps).numpy(), got.numpy(), atol=1e-5, rtol=1e-5) is None
    assert ours.init_noise_sigma == scheduler.init_noise_sigma
    assert (
        compare(ours.alphas_cumprod.numpy(), scheduler.alphas_cumprod.numpy(), atol=1e-6, rtol=1e-5) is None
    )


# ---- generation --------------------------------------------------------------------------------------------


def _cond(model: DiffusionWithLLMEmb, n: int, seed: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        return model.map_queries(torch.randn(n, model.num_embed_tokens, model.llm_hidden_size, generator=gen))


def test_generation_end_to_end(gen_model):
    cond = _cond(gen_model, 1, 0)
    noise = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(1))
    latents = gen_model.denoise(cond, noise=noise, steps=3)
    assert latents.shape == noise.shape
    images = gen_model.decode_latents(latents)
    assert images.shape == (1, 3, 16, 16)
    assert torch.isfinite(images).all() and images.std() > 1e-3
    assert 0.0 <= images.min() and images.max() <= 1.0


def test_generation_guidance_equals_hand_written_loop(gen_model):
    cond = _cond(gen_model, 2, 2)
    noise = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(3))
    scale = 5.0
    got = gen_model.denoise(cond, noise=noise, steps=2, guidance_scale=scale)

    uncond = gen_model.unconditional_embedding().expand(2, -1, -1)
    scheduler = _diffusers_ddim()
    scheduler.set_timesteps(2)
    latents = noise
    with torch.no_grad():
        for t in scheduler.timesteps:
            eps_u = gen_model.sd_unet(latents, t, encoder_hidden_states=uncond).sample
            eps_c = gen_model.sd_unet(latents, t, encoder_hidden_states=cond).sample
            latents = scheduler.step(eps_u + scale * (eps_c - eps_u), t, latents).prev_sample
    assert compare(got.numpy(), latents.numpy()) is None
    assert not torch.allclose(got, gen_model.denoise(cond, noise=noise, steps=2, guidance_scale=1.0))


# ---- editing -----------------------------------------------------------------------------------------------


def test_edit_shapes_and_guidance(edit_model):
    gen = torch.Generator().manual_seed(4)
    image = torch.rand(1, 3, 16, 16, generator=gen)
    image_latents = edit_model.encode_image(image)
    assert image_latents.shape == (1, 4, 8, 8)
    # The mode of the posterior, unscaled: the VAE's mean, computed by hand here.
    with torch.no_grad():
        moments = edit_model.sd_vae.quant_conv(edit_model.sd_vae.encoder(image * 2 - 1))
    assert compare(image_latents.numpy(), moments[:, :4].numpy()) is None

    cond = _cond(edit_model, 1, 5)
    noise = torch.randn(1, 4, 8, 8, generator=gen)
    g, ig = 7.5, 1.5
    got = edit_model.denoise(
        cond, noise=noise, steps=2, guidance_scale=g, image_latents=image_latents, image_guidance_scale=ig
    )
    assert got.shape == noise.shape and torch.isfinite(got).all()

    uncond = edit_model.unconditional_embedding()
    scheduler = _diffusers_ddim()
    scheduler.set_timesteps(2)
    latents = noise
    zeros = torch.zeros_like(image_latents)
    with torch.no_grad():
        for t in scheduler.timesteps:
            unet = edit_model.sd_unet
            eps_ci = unet(torch.cat([latents, image_latents], 1), t, encoder_hidden_states=cond).sample
            eps_ui = unet(torch.cat([latents, image_latents], 1), t, encoder_hidden_states=uncond).sample
            eps_u0 = unet(torch.cat([latents, zeros], 1), t, encoder_hidden_states=uncond).sample
            eps = eps_u0 + g * (eps_ci - eps_ui) + ig * (eps_ui - eps_u0)
            latents = scheduler.step(eps, t, latents).prev_sample
    assert compare(got.numpy(), latents.numpy()) is None

    images = edit_model.decode_latents(got)
    assert images.shape == (1, 3, 16, 16) and torch.isfinite(images).all()


# ---- bad inputs --------------------------------------------------------------------------------------------


def test_bad_inputs_name_the_argument(gen_model, edit_model):
    with pytest.raises(ValueError, match=r"link_states must have shape \['n', 8, 96\], got \[1, 8, 95\]"):
        gen_model.map_queries(torch.zeros(1, 8, 95))
    with pytest.raises(ValueError, match=r"link_states .*got \[8, 96\]"):
        gen_model.map_queries(torch.zeros(8, 96))
    cond = torch.zeros(1, 77, 40)
    with pytest.raises(ValueError, match=r"noise must have shape \[1, 4, h, w\].*got \[1, 3, 8, 8\]"):
        gen_model.denoise(cond, noise=torch.zeros(1, 3, 8, 8), steps=1)
    with pytest.raises(ValueError, match=r"noise .*got \[2, 4, 8, 8\]"):
        gen_model.denoise(cond, noise=torch.zeros(2, 4, 8, 8), steps=1)
    with pytest.raises(ValueError, match=r"cond must have shape \[n, 77, 40\], got \[1, 77, 41\]"):
        gen_model.denoise(torch.zeros(1, 77, 41), noise=torch.zeros(1, 4, 8, 8), steps=1)
    with pytest.raises(ValueError, match="image_latents is only used by kind 'edit'"):
        gen_model.denoise(cond, noise=torch.zeros(1, 4, 8, 8), image_latents=torch.zeros(1, 4, 8, 8))
    with pytest.raises(ValueError, match="needs image_latents"):
        edit_model.denoise(cond, noise=torch.zeros(1, 4, 8, 8))
    with pytest.raises(ValueError, match=r"image_latents must have the shape of noise \[1, 4, 8, 8\], got"):
        edit_model.denoise(cond, noise=torch.zeros(1, 4, 8, 8), image_latents=torch.zeros(1, 4, 4, 4))
    with pytest.raises(ValueError, match="only defined for kind 'edit'"):
        gen_model.encode_image(torch.zeros(1, 3, 16, 16))
    with pytest.raises(ValueError, match=r"image must have shape .*got \[1, 3, 15, 16\]"):
        edit_model.encode_image(torch.zeros(1, 3, 15, 16))
    with pytest.raises(ValueError, match="kind must be one of"):
        build_diffusion("inpaint", {})


def test_unet_channels_must_fit_the_kind():
    unet = _json(TINY_SD / "unet" / "config.json")
    with pytest.raises(ValueError, match="kind 'edit' needs a UNet with in_channels 8"):
        DiffusionWithLLMEmb(
            _json(TINY_CKPT / "config.json")["sd_config"],
            unet_config=unet,
            vae_config=_json(TINY_SD / "vae" / "config.json"),
            text_encoder_config=_json(TINY_SD / "text_encoder" / "config.json"),
            kind="edit",
        )
