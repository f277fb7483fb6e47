"""The denoising loop of the `[GEN]` / `[EDIT]` decoders in NumPy: DDIM schedule, guidance, the loop itself.

Torch-free, so the runtime runs exactly this loop around its UNet session (ONNX Runtime, TensorRT or anything
else behind a callable). It mirrors the PyTorch reference (`visionllm_edge.export.models.diffusion`) step for
step, in float32 with the same operation order, so the two agree to float32 rounding:

* DDIM with eta 0 over SD-1.5's training schedule: scaled-linear betas, "leading" timestep spacing with an
  offset, `set_alpha_to_one=False` (the step after the last timestep uses `alphas_cumprod[0]`), epsilon
  prediction, no clipping of x0.
* Generation guidance (`StableDiffusionPipeline`): UNet batch `[uncond, cond]`,
  `eps = eps_u + g * (eps_c - eps_u)`, skipped when `g <= 1`.
* Editing guidance (`StableDiffusionInstructPix2PixPipeline`): UNet batch `[cond, uncond, uncond]` with the
  image latents `[image, image, zeros]` concatenated on channels,
  `eps = eps_u0 + g * (eps_ci - eps_ui) + g_img * (eps_ui - eps_u0)`, skipped unless `g > 1 and g_img >= 1`.

The schedule constants travel in the manifest as `DDIMConfig.to_facts()`; `DDIMConfig.from_facts` reads them
back strictly.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import asdict, dataclass, fields

import numpy as np

#: The unconditional (empty-prompt) context of each decoder: `<kind>_uncond.safetensors`, one tensor.
UNCOND_FILE = "{kind}_uncond.safetensors"
UNCOND_TENSOR = "uncond"

#: Signature of the UNet the loop calls: `(sample [B,C,h,w] float32, timestep [B] int64,
#: encoder_hidden_states [B,77,D] float32) -> noise_pred [B,latent_channels,h,w]`, the I/O of
#: `gen_unet.onnx` / `edit_unet.onnx` in input order.
UNetFn = Callable[[np.ndarray, np.ndarray, np.ndarray], np.ndarray]


@dataclass(frozen=True)
class DDIMConfig:
    """The scheduler constants: diffusers' `DDIMScheduler` settings that SD-1.5 and InstructPix2Pix ship with.

    Only what this loop implements is accepted: scaled-linear betas, "leading" spacing, eta 0, epsilon
    prediction, no sample clipping. Anything else is a `ValueError` rather than a silently different loop.
    """

    train_timesteps: int = 1000
    beta_start: float = 0.00085
    beta_end: float = 0.012
    beta_schedule: str = "scaled_linear"
    timestep_spacing: str = "leading"
    steps_offset: int = 1
    set_alpha_to_one: bool = False
    prediction_type: str = "epsilon"
    clip_sample: bool = False
    eta: float = 0.0
    init_noise_sigma: float = 1.0

    def __post_init__(self):
        fixed = {
            "beta_schedule": "scaled_linear",
            "timestep_spacing": "leading",
            "prediction_type": "epsilon",
            "clip_sample": False,
            "eta": 0.0,
            "init_noise_sigma": 1.0,
        }
        for key, want in fixed.items():
            if getattr(self, key) != want:
                raise ValueError(
                    f"DDIM {key} must be {want!r} (the only one implemented), got {getattr(self, key)!r}"
                )
        if self.train_timesteps < 1:
            raise ValueError(f"DDIM train_timesteps must be >= 1, got {self.train_timesteps}")
        if not 0.0 < self.beta_start <= self.beta_end < 1.0:
            raise ValueError(
                f"DDIM betas must satisfy 0 < beta_start <= beta_end < 1, got "
                f"{self.beta_start}, {self.beta_end}"
            )

    def to_facts(self) -> dict:
        """The constants as a JSON-able dict (the manifest's `scheduler` facts)."""
        return asdict(self)

    @classmethod
    def from_facts(cls, facts: dict) -> DDIMConfig:
        """Reads `to_facts()` back; an unknown or missing key or a wrong type is a `ValueError` naming it."""
        if not isinstance(facts, dict):
            raise ValueError(f"scheduler facts must be an object, got {type(facts).__name__}")
        known = {f.name: f.type for f in fields(cls)}
        unknown = sorted(set(facts) - set(known))
        if unknown:
            raise ValueError(f"scheduler facts: unknown key(s) {unknown}")
        missing = sorted(set(known) - set(facts))
        if missing:
            raise ValueError(f"scheduler facts: missing key(s) {missing}")
        types = {"int": int, "float": (int, float), "str": str, "bool": bool}
        for key, type_name in known.items():
            value = facts[key]
            # bool is an int subclass: a flag must not pass as a count, nor a count as a flag.
            if isinstance(value, bool) != (type_name == "bool") or not isinstance(value, types[type_name]):
                raise ValueError(f"scheduler facts: {key!r} must be {type_name}, got {type(value).__name__}")
        return cls(**{k: (float(v) if known[k] == "float" else v) for k, v in facts.items()})


def ddim_timesteps(steps: int, train_timesteps: int = 1000, steps_offset: int = 1) -> np.ndarray:
    """The DDIM timesteps for `steps` inference steps, highest first ("leading" spacing).

    `ratio = train_timesteps // steps`; timesteps are `i * ratio + steps_offset` for i = steps-1 .. 0
    (for 50 steps: 981, 961, ..., 1).

    Returns:
        `[steps]` int64.

    Raises:
        ValueError: when `steps` is not in [1, train_timesteps].
    """
    if (
        isinstance(steps, bool)
        or not isinstance(steps, (int, np.integer))
        or not 1 <= steps <= train_timesteps
    ):
        raise ValueError(f"steps must be an int in [1, {train_timesteps}], got {steps!r}")
    ratio = train_timesteps // int(steps)
    return (np.arange(steps - 1, -1, -1, dtype=np.int64) * ratio + steps_offset).astype(np.int64)


def alphas_cumprod(config: DDIMConfig | None = None) -> np.ndarray:
    """Cumulative products of `1 - beta` over the training schedule, float64 `[train_timesteps]`.

    Scaled-linear betas are linear in sqrt(beta), the schedule the SD-1.x UNets were trained with. Float64
    keeps the coefficients independent of accumulation order (the torch reference does the same).

    Args:
        config: the scheduler constants; SD-1.5's by default.
    """
    config = config or DDIMConfig()
    roots = np.linspace(
        config.beta_start**0.5, config.beta_end**0.5, config.train_timesteps, dtype=np.float64
    )
    betas = roots**2
    return np.cumprod(1.0 - betas)


class DDIMSchedule:
    """Deterministic DDIM (eta 0) for one number of steps.

    Args:
        steps: number of inference steps.
        config: the scheduler constants (from the manifest); SD-1.5's by default.

    Raises:
        ValueError: when `steps` is out of range or its first timestep falls outside the schedule.

    Attributes:
        timesteps: `[steps]` int64, highest first.
        alphas_cumprod: float64 `[train_timesteps]`.
        final_alpha_cumprod: what the step after the last timestep uses (`alphas_cumprod[0]`, or 1 with
            `set_alpha_to_one`).
    """

    def __init__(self, steps: int, config: DDIMConfig | None = None):
        config = config or DDIMConfig()
        self.config = config
        self.steps = int(steps)
        self.timesteps = ddim_timesteps(steps, config.train_timesteps, config.steps_offset)
        if self.timesteps[0] >= config.train_timesteps:
            # e.g. 1000 steps with offset 1 would start at t = 1000, past the schedule's end.
            raise ValueError(
                f"{steps} steps with steps_offset {config.steps_offset} start at timestep "
                f"{int(self.timesteps[0])}, outside [0, {config.train_timesteps})"
            )
        self.alphas_cumprod = alphas_cumprod(config)
        self.final_alpha_cumprod = 1.0 if config.set_alpha_to_one else float(self.alphas_cumprod[0])
        self.init_noise_sigma = config.init_noise_sigma

    def alphas(self, timestep: int) -> tuple[float, float]:
        """`(alpha_cumprod[t], alpha_cumprod[t_prev])` for a step from `timestep`.

        Raises:
            ValueError: when `timestep` is outside the training schedule.
        """
        t = int(timestep)
        if not 0 <= t < self.config.train_timesteps:
            raise ValueError(f"timestep must be in [0, {self.config.train_timesteps}), got {t}")
        prev = t - self.config.train_timesteps // self.steps
        alpha_prev = float(self.alphas_cumprod[prev]) if prev >= 0 else self.final_alpha_cumprod
        return float(self.alphas_cumprod[t]), alpha_prev

    def step_coefficients(self, timestep: int) -> tuple[float, float]:
        """The update as two scalars, `x_prev = a * x_t + b * eps`, for runtimes that precompute them.

        Returns:
            `(a, b)` with a = sqrt(a_prev / a_t) and b = sqrt(1 - a_prev) - sqrt(a_prev (1 - a_t) / a_t).
        """
        alpha, alpha_prev = self.alphas(timestep)
        return (
            math.sqrt(alpha_prev / alpha),
            math.sqrt(1.0 - alpha_prev) - math.sqrt(alpha_prev * (1.0 - alpha) / alpha),
        )

    def step(self, eps: np.ndarray, timestep: int, sample: np.ndarray) -> np.ndarray:
        """One DDIM update from `timestep` to the previous one, in the dtype of `sample`.

        Computed as x0 = (x_t - sqrt(1 - a_t) eps) / sqrt(a_t), then sqrt(a_prev) x0 + sqrt(1 - a_prev) eps:
        the reference's operation order, so float32 rounding matches it too.
        """
        alpha, alpha_prev = self.alphas(timestep)
        dtype = sample.dtype
        x0 = (sample - dtype.type(math.sqrt(1.0 - alpha)) * eps) / dtype.type(math.sqrt(alpha))
        return dtype.type(math.sqrt(alpha_prev)) * x0 + dtype.type(math.sqrt(1.0 - alpha_prev)) * eps


def cfg_combine(eps: np.ndarray, guidance: float) -> np.ndarray:
    """Generation guidance on a UNet output over the batch `[uncond (n), cond (n)]`.

    Returns:
        `eps_u + guidance * (eps_c - eps_u)`, `[n, ...]`.

    Raises:
        ValueError: when the batch is not even.
    """
    if eps.shape[0] % 2:
        raise ValueError(f"cfg_combine needs a [uncond, cond] batch of even size, got {eps.shape[0]}")
    eps_u, eps_c = np.split(eps, 2)
    return eps_u + eps.dtype.type(guidance) * (eps_c - eps_u)


def ip2p_combine(eps: np.ndarray, guidance: float, image_guidance: float) -> np.ndarray:
    """Editing guidance on a UNet output over the batch `[cond+image, uncond+image, uncond+zeros]` (n each).

    Returns:
        `eps_u0 + guidance * (eps_ci - eps_ui) + image_guidance * (eps_ui - eps_u0)`, `[n, ...]`.

    Raises:
        ValueError: when the batch is not a multiple of 3.
    """
    if eps.shape[0] % 3:
        raise ValueError(f"ip2p_combine needs a three-way batch (size multiple of 3), got {eps.shape[0]}")
    eps_ci, eps_ui, eps_u0 = np.split(eps, 3)
    t = eps.dtype.type
    return eps_u0 + t(guidance) * (eps_ci - eps_ui) + t(image_guidance) * (eps_ui - eps_u0)


def _check_shapes(cond, uncond, noise, image_latents) -> None:
    if cond.ndim != 3:
        raise ValueError(f"cond must have shape [n, L, D], got {list(cond.shape)}")
    n, length, width = cond.shape
    if uncond.ndim != 3 or uncond.shape[1:] != (length, width) or uncond.shape[0] not in (1, n):
        raise ValueError(f"uncond must have shape [1 or {n}, {length}, {width}], got {list(uncond.shape)}")
    if noise.ndim != 4 or noise.shape[0] != n:
        raise ValueError(f"noise must have shape [{n}, C, h, w] (n from cond), got {list(noise.shape)}")
    if image_latents is not None and image_latents.shape != noise.shape:
        raise ValueError(
            f"image_latents must have the shape of noise {list(noise.shape)}, got {list(image_latents.shape)}"
        )


def denoise(
    unet_fn: UNetFn,
    cond: np.ndarray,
    uncond: np.ndarray,
    noise: np.ndarray,
    steps: int,
    guidance: float,
    image_latents: np.ndarray | None = None,
    image_guidance: float = 1.5,
    config: DDIMConfig | None = None,
) -> np.ndarray:
    """Runs the DDIM loop with guidance and returns the final latents (VAE-decode them next).

    Generation when `image_latents` is None, editing (InstructPix2Pix) otherwise; see the module docstring for
    the batches and formulas. One UNet call per step, on the whole guidance batch.

    Args:
        unet_fn: the UNet, `(sample, timestep [B] int64, encoder_hidden_states) -> noise_pred`.
        cond: the mapper's output `[n, 77, D]`.
        uncond: the unconditional context `[1 or n, 77, D]` (`<kind>_uncond.safetensors`).
        noise: the initial noise `[n, C, h, w]` (e.g. seeded standard normal).
        steps: number of DDIM steps.
        guidance: text guidance scale.
        image_latents: editing only: the source image's unscaled latent mode (`edit_vae_encoder.onnx`),
            shaped like `noise`.
        image_guidance: editing only: image guidance scale.
        config: the scheduler constants; SD-1.5's by default.

    Returns:
        float32 latents shaped like `noise`.

    Raises:
        ValueError: on badly shaped inputs (naming the argument) or a UNet output of the wrong shape.
    """
    cond = np.asarray(cond, dtype=np.float32)
    uncond = np.asarray(uncond, dtype=np.float32)
    noise = np.asarray(noise, dtype=np.float32)
    if image_latents is not None:
        image_latents = np.asarray(image_latents, dtype=np.float32)
    _check_shapes(cond, uncond, noise, image_latents)
    n = cond.shape[0]
    uncond = np.broadcast_to(uncond, cond.shape)
    schedule = DDIMSchedule(steps, config)

    if image_latents is None:
        guided = guidance > 1.0
        context = np.concatenate([uncond, cond]) if guided else cond
        image_input = None
    else:
        guided = guidance > 1.0 and image_guidance >= 1.0
        if guided:
            context = np.concatenate([cond, uncond, uncond])
            image_input = np.concatenate([image_latents, image_latents, np.zeros_like(image_latents)])
        else:
            context, image_input = cond, image_latents
    context = np.ascontiguousarray(context)
    copies = context.shape[0] // n

    latents = noise * np.float32(schedule.init_noise_sigma)
    for t in schedule.timesteps:
        # DDIM's scale_model_input is the identity: the latents go to the UNet as they are.
        sample = np.concatenate([latents] * copies) if copies > 1 else latents
        if image_input is not None:
            sample = np.concatenate([sample, image_input], axis=1)
        timestep = np.full(context.shape[0], t, dtype=np.int64)
        eps = np.asarray(unet_fn(np.ascontiguousarray(sample, dtype=np.float32), timestep, context))
        if eps.shape != (context.shape[0], *noise.shape[1:]):
            raise ValueError(
                f"unet_fn returned shape {list(eps.shape)}, expected {[context.shape[0], *noise.shape[1:]]}"
            )
        eps = eps.astype(np.float32, copy=False)
        if guided and image_input is None:
            eps = cfg_combine(eps, guidance)
        elif guided:
            eps = ip2p_combine(eps, guidance, image_guidance)
        latents = schedule.step(eps, int(t), latents)
    return latents
