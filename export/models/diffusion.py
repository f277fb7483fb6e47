"""The image generation and editing decoders: Stable Diffusion 1.5 (`[GEN]`) and InstructPix2Pix (`[EDIT]`).

Both official classes (`StableDiffusionWithLLMEmb`, `InstructPix2PixWithLLMEmb`) share one design: the 64 link
rows that follow the routing token go through `emb_proj` (Linear, GELU, Linear) and a one-layer
encoder/decoder `nn.Transformer` whose decoder input is 77 learned queries. The resulting "mapping feature"
[n, 77, 768] replaces the CLIP text encoder's output as the UNet's cross-attention context. The CLIP text
encoder is kept only to embed the empty prompt for classifier-free guidance.

The official code hands the mapping feature to a diffusers pipeline. This module writes the denoising loop out
instead, so that the loop the C++ runtime runs (UNet per step, guidance, DDIM update, VAE decode) has a plain
PyTorch reference with no hidden defaults:

* DDIM with eta 0 over SD-1.5's training schedule (scaled-linear betas 0.00085 -> 0.012, 1000 steps,
  "leading" spacing with offset 1, the final step lands on alphas_cumprod[0], no clipping of x0).
* Generation guidance as `StableDiffusionPipeline`; editing guidance (three-way, text and image scales) as
  `StableDiffusionInstructPix2PixPipeline`.

Parameter names equal the official ones without the `sd.` / `ip2p.` prefix, so a checkpoint slice loads with
`load_state_dict(strict=True)` after casting the bf16 UNet/VAE/text-encoder tensors to float32.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import torch
from diffusers import AutoencoderKL, UNet2DConditionModel
from torch import nn
from transformers import CLIPTextConfig, CLIPTextModel

KINDS = ("gen", "edit")

_DATA_DIR = Path(__file__).resolve().parent.parent / "data"
# Public SD-1.5 / InstructPix2Pix component configs. IP2P reuses SD-1.5's VAE and text encoder unchanged; its
# UNet differs only in `in_channels` (noisy latent + source-image latent).
_PACKAGE_COMPONENT_CONFIGS = {
    "gen": {"unet": "sd15_unet.json", "vae": "sd15_vae.json", "text_encoder": "sd15_text_encoder.json"},
    "edit": {"unet": "ip2p_unet.json", "vae": "sd15_vae.json", "text_encoder": "sd15_text_encoder.json"},
}

# Defaults of the official config class, used only for keys a hand-written config leaves out.
_CONFIG_DEFAULTS = {
    "llm_hidden_size": 4096,
    "sd_hidden_size": 768,
    "num_queries": 77,
    "num_encoder_layers": 1,
    "num_decoder_layers": 1,
    "num_embed_tokens": 64,
}

# nn.Transformer's default head count; the official constructor does not pass one.
MAPPER_HEADS = 8

# SD-1.5's training noise schedule (its scheduler_config.json).
TRAIN_STEPS = 1000
BETA_START = 0.00085
BETA_END = 0.012
STEPS_OFFSET = 1


def scheduler_facts() -> dict:
    """The scheduler this module implements, as the manifest's `scheduler` facts of each decoder.

    The keys are diffusers' `DDIMScheduler` settings; the C++ loop reads them back strictly
    (`DDIMConfig::from_facts` in csrc/loop/diffusion.h) and refuses any value it does not implement. Written
    from this module's own constants, so what the export declares is the loop this reference runs.
    """
    return {
        "train_timesteps": TRAIN_STEPS,
        "beta_start": BETA_START,
        "beta_end": BETA_END,
        "beta_schedule": "scaled_linear",
        "timestep_spacing": "leading",
        "steps_offset": STEPS_OFFSET,
        "set_alpha_to_one": False,
        "prediction_type": "epsilon",
        "clip_sample": False,
        "eta": 0.0,
        "init_noise_sigma": DDIMSchedule.init_noise_sigma,
    }


def ddim_timesteps(steps: int, train_steps: int = TRAIN_STEPS, steps_offset: int = STEPS_OFFSET) -> list[int]:
    """The DDIM timesteps for `steps` inference steps, highest first ("leading" spacing).

    `step_ratio = train_steps // steps`; timesteps are `i * step_ratio + steps_offset` for i = steps-1 .. 0.
    For 50 steps: 981, 961, ..., 1.

    Raises:
        ValueError: when `steps` is not in [1, train_steps].
    """
    if not 1 <= steps <= train_steps:
        raise ValueError(f"steps must be in [1, {train_steps}], got {steps}")
    ratio = train_steps // steps
    return [i * ratio + steps_offset for i in reversed(range(steps))]


class DDIMSchedule:
    """Deterministic DDIM (eta 0) over SD-1.5's scaled-linear schedule, as diffusers' `DDIMScheduler` does it.

    Matches `DDIMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012,
    num_train_timesteps=1000, steps_offset=1, set_alpha_to_one=False, timestep_spacing="leading",
    clip_sample=False, prediction_type="epsilon")`. The cumulative products are computed in float64 (diffusers
    uses float32; the two agree to ~1e-6 relative).

    Args:
        steps: number of inference steps.
        train_steps: length of the training schedule.
        beta_start: first beta.
        beta_end: last beta.
        steps_offset: added to every timestep.
    """

    #: DDIM starts from unit-variance noise: the initial latents are `noise * init_noise_sigma`.
    init_noise_sigma = 1.0

    def __init__(
        self,
        steps: int,
        train_steps: int = TRAIN_STEPS,
        beta_start: float = BETA_START,
        beta_end: float = BETA_END,
        steps_offset: int = STEPS_OFFSET,
    ):
        self.steps = steps
        self.train_steps = train_steps
        self.timesteps = ddim_timesteps(steps, train_steps, steps_offset)
        # "scaled_linear": linear in sqrt(beta), the schedule the SD-1.x UNets were trained with.
        betas = torch.linspace(beta_start**0.5, beta_end**0.5, train_steps, dtype=torch.float64) ** 2
        self.alphas_cumprod = torch.cumprod(1.0 - betas, dim=0)
        # set_alpha_to_one=False: the step after the last timestep uses alphas_cumprod[0], not 1.
        self.final_alpha_cumprod = float(self.alphas_cumprod[0])

    def _alphas(self, timestep: int) -> tuple[float, float]:
        if not 0 <= timestep < self.train_steps:
            raise ValueError(f"timestep must be in [0, {self.train_steps}), got {timestep}")
        prev = timestep - self.train_steps // self.steps
        alpha = float(self.alphas_cumprod[timestep])
        alpha_prev = float(self.alphas_cumprod[prev]) if prev >= 0 else self.final_alpha_cumprod
        return alpha, alpha_prev

    def step(self, eps: torch.Tensor, timestep: int, sample: torch.Tensor) -> torch.Tensor:
        """One DDIM update from `timestep` to the previous one.

        Args:
            eps: the (guided) noise prediction at `timestep`, shaped like `sample`.
            timestep: the current timestep, one of `self.timesteps`.
            sample: the current latents x_t.

        Returns:
            x_{t_prev} = sqrt(a_prev) * x0 + sqrt(1 - a_prev) * eps, with
            x0 = (x_t - sqrt(1 - a_t) * eps) / sqrt(a_t).
        """
        alpha, alpha_prev = self._alphas(int(timestep))
        x0 = (sample - math.sqrt(1.0 - alpha) * eps) / math.sqrt(alpha)
        return math.sqrt(alpha_prev) * x0 + math.sqrt(1.0 - alpha_prev) * eps

    def step_coefficients(self, timestep: int) -> tuple[float, float]:
        """The same update as two scalars, for runtimes that precompute them: x_prev = a * x_t + b * eps.

        Returns:
            `(a, b)` with a = sqrt(a_prev / a_t) and b = sqrt(1 - a_prev) - sqrt(a_prev (1 - a_t) / a_t).
        """
        alpha, alpha_prev = self._alphas(int(timestep))
        return (
            math.sqrt(alpha_prev / alpha),
            math.sqrt(1.0 - alpha_prev) - math.sqrt(alpha_prev * (1.0 - alpha) / alpha),
        )


def _shape(t: torch.Tensor) -> list[int]:
    return list(t.shape)


class DiffusionWithLLMEmb(nn.Module):
    """The generation (`kind="gen"`, SD-1.5, 4-channel UNet) or editing (`kind="edit"`, InstructPix2Pix,
    8-channel UNet) decoder, conditioned on LLM link states.

    Args:
        config: the official `sd_config` / `ip2p_config` dict (`llm_hidden_size`, `sd_hidden_size`,
            `num_queries`, `num_encoder_layers`, `num_decoder_layers`, `num_embed_tokens`; other keys are
            ignored).
        unet_config: diffusers `UNet2DConditionModel` config dict.
        vae_config: diffusers `AutoencoderKL` config dict.
        text_encoder_config: transformers `CLIPTextConfig` dict.
        kind: `"gen"` or `"edit"`.

    Raises:
        ValueError: on an unknown kind, or component configs that do not fit together (UNet input channels
            vs. the VAE's latent channels for this kind; cross-attention width vs. `sd_hidden_size`).
    """

    def __init__(
        self, config: dict, unet_config: dict, vae_config: dict, text_encoder_config: dict, kind: str
    ):
        super().__init__()
        if kind not in KINDS:
            raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")
        self.kind = kind
        cfg = {key: config.get(key, default) for key, default in _CONFIG_DEFAULTS.items()}
        self.llm_hidden_size = int(cfg["llm_hidden_size"])
        self.sd_hidden_size = int(cfg["sd_hidden_size"])
        self.num_queries = int(cfg["num_queries"])
        self.num_embed_tokens = int(cfg["num_embed_tokens"])
        sd = self.sd_hidden_size

        # Registration order follows the official constructor so that state_dict() lists keys in its order.
        self.emb_proj = nn.Sequential(nn.Linear(self.llm_hidden_size, sd), nn.GELU(), nn.Linear(sd, sd))
        self.llm2sd_mapper_queries = nn.Parameter(torch.randn(1, self.num_queries, sd))
        encoder_layer = nn.TransformerEncoderLayer(
            sd, MAPPER_HEADS, sd * 4, dropout=0.0, batch_first=True, norm_first=True
        )
        # Built by hand only to turn off nested tensors: the default encoder warns that norm_first disables
        # them anyway. Module names and maths are those of nn.Transformer's own encoder.
        encoder = nn.TransformerEncoder(
            encoder_layer, int(cfg["num_encoder_layers"]), nn.LayerNorm(sd), enable_nested_tensor=False
        )
        self.llm2sd_mapper = nn.Transformer(
            d_model=sd,
            nhead=MAPPER_HEADS,
            num_decoder_layers=int(cfg["num_decoder_layers"]),
            dim_feedforward=sd * 4,
            dropout=0.0,
            batch_first=True,
            norm_first=True,
            custom_encoder=encoder,
        )

        self.sd_text_encoder = CLIPTextModel(CLIPTextConfig.from_dict(dict(text_encoder_config)))
        self.sd_vae = AutoencoderKL.from_config(dict(vae_config))
        self.sd_unet = UNet2DConditionModel.from_config(dict(unet_config))

        latent = self.sd_vae.config.latent_channels
        want_in = latent if kind == "gen" else 2 * latent
        if self.sd_unet.config.in_channels != want_in or self.sd_unet.config.out_channels != latent:
            raise ValueError(
                f"kind {kind!r} needs a UNet with in_channels {want_in} and out_channels {latent} (VAE "
                f"latent_channels {latent}), got in_channels {self.sd_unet.config.in_channels} and "
                f"out_channels {self.sd_unet.config.out_channels}"
            )
        if self.sd_unet.config.cross_attention_dim != sd or self.sd_text_encoder.config.hidden_size != sd:
            raise ValueError(
                f"sd_hidden_size {sd} must equal the UNet cross_attention_dim "
                f"({self.sd_unet.config.cross_attention_dim}) and the text encoder hidden_size "
                f"({self.sd_text_encoder.config.hidden_size})"
            )
        self.latent_channels = latent
        # Each VAE block after the first halves the resolution.
        self.vae_scale_factor = 2 ** (len(self.sd_vae.config.block_out_channels) - 1)
        self.scaling_factor = float(self.sd_vae.config.scaling_factor)

        # The official modules are frozen inference components here.
        self.eval()

    # ---- conditioning --------------------------------------------------------------------------------------

    def map_queries(self, link_states: torch.Tensor) -> torch.Tensor:
        """Maps the link rows after `[GEN]` / `[EDIT]` to the UNet's cross-attention context.

        Args:
            link_states: `[n, num_embed_tokens, llm_hidden_size]`, the LLM's last-layer (post-norm) hidden
                states at the query positions.

        Returns:
            The mapping feature `[n, num_queries, sd_hidden_size]` (official `extract_features`).

        Raises:
            ValueError: when `link_states` has the wrong rank, row count or width.
        """
        want = ["n", self.num_embed_tokens, self.llm_hidden_size]
        if (
            link_states.dim() != 3
            or link_states.shape[1] != self.num_embed_tokens
            or link_states.shape[2] != self.llm_hidden_size
        ):
            raise ValueError(f"link_states must have shape {want}, got {_shape(link_states)}")
        src = self.emb_proj(link_states)
        tgt = self.llm2sd_mapper_queries.expand(src.shape[0], -1, -1)
        return self.llm2sd_mapper(src=src, tgt=tgt)

    def unconditional_ids(self) -> torch.Tensor:
        """CLIP token ids of the empty prompt, as the SD tokenizer writes them: `<|startoftext|>`,
        `<|endoftext|>`, then `<|endoftext|>` padding to the context length (77).

        CLIP's BPE vocabulary ends with these two tokens, so they are `vocab_size - 2` and `vocab_size - 1`:
        49406 and 49407 for the released text encoder. (Its config's `bos_token_id` / `eos_token_id`, 0 and 2,
        are stale values and not what the tokenizer emits.)

        Returns:
            `[1, max_position_embeddings]` int64.
        """
        cfg = self.sd_text_encoder.config
        bos, eos = cfg.vocab_size - 2, cfg.vocab_size - 1
        ids = [bos] + [eos] * (cfg.max_position_embeddings - 1)
        return torch.tensor([ids], dtype=torch.long)

    @torch.no_grad()
    def unconditional_embedding(self) -> torch.Tensor:
        """The text encoder's last hidden state for the empty prompt: the guidance's negative context.

        A constant of the weights; a runtime can store it instead of the text encoder.

        Returns:
            `[1, 77, sd_hidden_size]`.
        """
        device = self.sd_text_encoder.text_model.embeddings.token_embedding.weight.device
        ids = self.unconditional_ids().to(device)
        # Explicit positions: the encoder's own position_ids buffer is not in the state dict, so a model built
        # on the meta device and then filled from a checkpoint would not have it.
        positions = torch.arange(ids.shape[1], device=device).unsqueeze(0)
        return self.sd_text_encoder(input_ids=ids, position_ids=positions).last_hidden_state

    # ---- images <-> latents --------------------------------------------------------------------------------

    @torch.no_grad()
    def encode_image(self, image: torch.Tensor) -> torch.Tensor:
        """VAE-encodes the source image of an edit: the mode (mean) of the latent distribution, unscaled.

        InstructPix2Pix conditions on this unscaled mode (unlike the denoised latents, which carry the
        scaling factor), both in training and in diffusers' pipeline.

        Args:
            image: `[n, 3, H, W]` RGB in [0, 1]; H and W multiples of the VAE's downsampling factor.

        Returns:
            `[n, latent_channels, H / f, W / f]`.

        Raises:
            ValueError: for a generation decoder, or a badly shaped image.
        """
        if self.kind != "edit":
            raise ValueError(
                "encode_image is only defined for kind 'edit' (the generation decoder has no source image)"
            )
        f = self.vae_scale_factor
        if image.dim() != 4 or image.shape[1] != 3 or image.shape[2] % f or image.shape[3] % f:
            raise ValueError(
                f"image must have shape [n, 3, H, W] with H, W multiples of {f}, got {_shape(image)}"
            )
        # The pipeline's image processor maps [0, 1] to the VAE's [-1, 1] range.
        return self.sd_vae.encode(image * 2.0 - 1.0).latent_dist.mode()

    @torch.no_grad()
    def decode_latents(self, latents: torch.Tensor) -> torch.Tensor:
        """Decodes final latents to images.

        Args:
            latents: `[n, latent_channels, h, w]`, in the UNet's (scaled) latent space.

        Returns:
            `[n, 3, h * f, w * f]` RGB in [0, 1].

        Raises:
            ValueError: when `latents` is badly shaped.
        """
        if latents.dim() != 4 or latents.shape[1] != self.latent_channels:
            raise ValueError(
                f"latents must have shape [n, {self.latent_channels}, h, w], got {_shape(latents)}"
            )
        image = self.sd_vae.decode(latents / self.scaling_factor).sample
        return (image / 2.0 + 0.5).clamp(0.0, 1.0)

    # ---- denoising -----------------------------------------------------------------------------------------

    def _check_denoise_inputs(
        self,
        cond: torch.Tensor,
        noise: torch.Tensor,
        image_latents: torch.Tensor | None,
        uncond: torch.Tensor,
    ) -> None:
        context = [self.num_queries, self.sd_hidden_size]
        if cond.dim() != 3 or _shape(cond)[1:] != context:
            raise ValueError(f"cond must have shape [n, {context[0]}, {context[1]}], got {_shape(cond)}")
        n = cond.shape[0]
        if noise.dim() != 4 or noise.shape[0] != n or noise.shape[1] != self.latent_channels:
            raise ValueError(
                f"noise must have shape [{n}, {self.latent_channels}, h, w] (n from cond), "
                f"got {_shape(noise)}"
            )
        if uncond.dim() != 3 or _shape(uncond)[1:] != context or uncond.shape[0] not in (1, n):
            raise ValueError(
                f"uncond must have shape [1 or {n}, {context[0]}, {context[1]}], got {_shape(uncond)}"
            )
        if self.kind == "gen":
            if image_latents is not None:
                raise ValueError("image_latents is only used by kind 'edit'; pass None for generation")
        elif image_latents is None:
            raise ValueError("kind 'edit' needs image_latents (from encode_image)")
        elif _shape(image_latents) != _shape(noise):
            raise ValueError(
                f"image_latents must have the shape of noise {_shape(noise)}, got {_shape(image_latents)}"
            )

    @torch.no_grad()
    def denoise(
        self,
        cond: torch.Tensor,
        *,
        noise: torch.Tensor,
        steps: int = 20,
        guidance_scale: float = 7.5,
        image_latents: torch.Tensor | None = None,
        image_guidance_scale: float = 1.5,
        uncond: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Runs the DDIM loop with classifier-free guidance and returns the final latents.

        Generation (as `StableDiffusionPipeline`): the UNet sees the batch `[uncond, cond]` and
        `eps = eps_u + guidance_scale * (eps_c - eps_u)`; guidance is skipped when `guidance_scale <= 1`.

        Editing (as `StableDiffusionInstructPix2PixPipeline`): the UNet input is the latents concatenated on
        channels with `[image, image, zeros]`, contexts `[cond, uncond, uncond]`, and
        `eps = eps_u0 + guidance_scale * (eps_ci - eps_ui) + image_guidance_scale * (eps_ui - eps_u0)`;
        guidance is skipped unless `guidance_scale > 1` and `image_guidance_scale >= 1`.

        Args:
            cond: the mapping feature `[n, 77, sd_hidden_size]` from `map_queries`.
            noise: the initial noise `[n, latent_channels, h, w]` (h, w = image size / VAE factor), e.g.
                from a seeded `torch.randn`; scaled by the schedule's `init_noise_sigma` (1 for DDIM).
            steps: number of DDIM steps.
            guidance_scale: text guidance scale.
            image_latents: editing only: the source image's latents from `encode_image`, shaped like `noise`.
            image_guidance_scale: editing only: image guidance scale.
            uncond: the negative context, `[1 or n, 77, sd_hidden_size]`; defaults to
                `unconditional_embedding()`.

        Returns:
            The denoised latents, shaped like `noise`; `decode_latents` turns them into images.

        Raises:
            ValueError: on badly shaped inputs, naming the argument.
        """
        if uncond is None:
            uncond = self.unconditional_embedding()
        self._check_denoise_inputs(cond, noise, image_latents, uncond)
        n = cond.shape[0]
        uncond = uncond.to(cond).expand(n, -1, -1)
        schedule = DDIMSchedule(steps)

        if self.kind == "gen":
            guided = guidance_scale > 1.0
            context = torch.cat([uncond, cond]) if guided else cond
            image_input = None
        else:
            guided = guidance_scale > 1.0 and image_guidance_scale >= 1.0
            if guided:
                context = torch.cat([cond, uncond, uncond])
                image_input = torch.cat([image_latents, image_latents, torch.zeros_like(image_latents)])
            else:
                context, image_input = cond, image_latents
        copies = context.shape[0] // n

        latents = noise * schedule.init_noise_sigma
        for t in schedule.timesteps:
            # DDIM's scale_model_input is the identity, so the latents go to the UNet as they are.
            unet_input = torch.cat([latents] * copies)
            if image_input is not None:
                unet_input = torch.cat([unet_input, image_input], dim=1)
            timestep = torch.tensor(t, dtype=torch.long, device=latents.device)
            eps = self.sd_unet(unet_input, timestep, encoder_hidden_states=context).sample
            if guided and self.kind == "gen":
                eps_u, eps_c = eps.chunk(2)
                eps = eps_u + guidance_scale * (eps_c - eps_u)
            elif guided:
                eps_ci, eps_ui, eps_u0 = eps.chunk(3)
                eps = eps_u0 + guidance_scale * (eps_ci - eps_ui) + image_guidance_scale * (eps_ui - eps_u0)
            latents = schedule.step(eps, t, latents)
        return latents


def _read_json(path: Path) -> dict:
    with open(path, encoding="utf-8") as f:
        return json.load(f)


def build_diffusion(kind: str, config: dict, component_dir: str | Path | None = None) -> DiffusionWithLLMEmb:
    """Builds the generation or editing decoder (random weights; load a checkpoint slice afterwards).

    Works under `with torch.device("meta"):` to get the structure without allocating memory.

    Args:
        kind: `"gen"` (SD-1.5) or `"edit"` (InstructPix2Pix).
        config: the official `sd_config` (gen) or `ip2p_config` (edit) dict.
        component_dir: a diffusers pipeline folder (the official `sd_model_id` layout) whose
            `unet/`, `vae/` and `text_encoder/` hold `config.json`; by default the public SD-1.5 / IP2P
            configs shipped with this package.

    Returns:
        The module, in eval mode, in the default dtype (float32 unless changed).

    Raises:
        ValueError: on an unknown kind.
        FileNotFoundError: when `component_dir` lacks a component config.
    """
    if kind not in KINDS:
        raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")
    if component_dir is not None:
        root = Path(component_dir)
        paths = {name: root / name / "config.json" for name in ("unet", "vae", "text_encoder")}
    else:
        paths = {name: _DATA_DIR / file for name, file in _PACKAGE_COMPONENT_CONFIGS[kind].items()}
    for name, path in paths.items():
        if not path.is_file():
            raise FileNotFoundError(f"{name} config not found: {path}")
    return DiffusionWithLLMEmb(
        config,
        unet_config=_read_json(paths["unet"]),
        vae_config=_read_json(paths["vae"]),
        text_encoder_config=_read_json(paths["text_encoder"]),
        kind=kind,
    )
