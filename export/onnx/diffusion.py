"""ONNX export of the generation (`[GEN]`, SD-1.5) and editing (`[EDIT]`, InstructPix2Pix) decoders.

Each decoder becomes the graphs the runtime's C++ denoising loop (`denoise` in csrc/loop/diffusion.h) drives,
plus one constant file:

* `<kind>_mapper.onnx`: link states `[n, N, Hl]` -> UNet context `[n, 77, D]` (`map_queries`).
* `<kind>_unet.onnx`: one UNet call. `sample [b, C, h, w]`, `timestep [b]` int64, `encoder_hidden_states
  [b, 77, D]` -> `noise_pred [b, 4, h, w]`. The timestep is a per-row int64 vector, not a scalar: it is what
  the UNet consumes after broadcasting anyway, it keeps every input a ranked tensor with the batch axis (no
  0-d shape inputs for TensorRT profiles), and int64 holds the training-schedule index exactly. b, h and w are
  dynamic; h and w must be multiples of `latent_multiple` (the traced graph has no path for the UNet's
  "forward upsample size" branch, so other sizes fail loudly in a Concat instead of running a wrong graph).
* `<kind>_vae_decoder.onnx`: scaled latents `[n, 4, h, w]` -> RGB `[n, 3, f h, f w]` in [0, 1]
  (`decode_latents`: the 1 / scaling_factor, the decode and the clamp are all in the graph).
* `edit_vae_encoder.onnx`: RGB `[n, 3, H, W]` in [0, 1] -> the unscaled latent mode `[n, 4, H / f, W / f]`
  (`encode_image`).
* `<kind>_uncond.safetensors`: tensor `uncond` `[1, 77, D]`, the text encoder's output for the empty prompt
  (`unconditional_embedding`); a constant of the weights, so the CLIP text encoder is not exported. Written
  by `extra_files()`, which the orchestrator calls next to `graphs()`.

Every graph calls the reference method itself, so the export and the reference cannot drift apart. Scheduler
constants (the reference's own, `scheduler_facts`) and defaults go into the manifest facts (`manifest_facts`).
"""

from __future__ import annotations

import contextlib
import warnings
from pathlib import Path

import numpy as np
import torch
from torch import nn
from visionllm_edge import contract
from visionllm_edge.export.models import diffusion as reference
from visionllm_edge.export.onnx.base import (
    ComponentExporter,
    ExportSettings,
    GraphExport,
    ValidationCase,
    register,
)
from visionllm_edge.export.reference import PostProcessSettings


@contextlib.contextmanager
def _traceable():
    """Export-time patches for tracing the reference modules, undone afterwards.

    * The mapper's `nn.Transformer` takes PyTorch's fused "fast path" (`aten::_transformer_encoder_layer_fwd`,
      `_native_multi_head_attention`) in eval mode; those ops have no ONNX form, so the fast path is switched
      off and the traced graph is the plain, numerically equivalent composition.
    * Tracing warns (`TracerWarning`) on every Python branch over a shape. Those in these modules were checked
      one by one: shape assertions (reference argument checks, `nn.functional` MHA checks, diffusers'
      channel asserts), `.contiguous()` heuristics, and the UNet's upsample-size branch, which is constant
      for latents that are multiples of `latent_multiple` (recorded in the facts, validated at two sizes).
      They are silenced here so that a project running with warnings-as-errors can export.
    """
    fastpath = torch.backends.mha.get_fastpath_enabled()
    torch.backends.mha.set_fastpath_enabled(False)
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", category=torch.jit.TracerWarning)
            yield
    finally:
        torch.backends.mha.set_fastpath_enabled(fastpath)


class MapperGraph(nn.Module):
    """`link_states [n, N, Hl]` -> `conditioning [n, 77, D]`: the reference `map_queries`."""

    def __init__(self, decoder: reference.DiffusionWithLLMEmb):
        super().__init__()
        self.decoder = decoder

    def forward(self, link_states: torch.Tensor) -> torch.Tensor:
        with _traceable():
            return self.decoder.map_queries(link_states)


class UNetGraph(nn.Module):
    """`(sample, timestep [b] int64, encoder_hidden_states)` -> `noise_pred`: one UNet evaluation."""

    def __init__(self, decoder: reference.DiffusionWithLLMEmb):
        super().__init__()
        self.unet = decoder.sd_unet

    def forward(
        self, sample: torch.Tensor, timestep: torch.Tensor, encoder_hidden_states: torch.Tensor
    ) -> torch.Tensor:
        with _traceable():
            return self.unet(sample, timestep, encoder_hidden_states=encoder_hidden_states).sample


class VaeDecoderGraph(nn.Module):
    """`latents` (scaled) -> `images` in [0, 1]: the reference `decode_latents`."""

    def __init__(self, decoder: reference.DiffusionWithLLMEmb):
        super().__init__()
        self.decoder = decoder

    def forward(self, latents: torch.Tensor) -> torch.Tensor:
        with _traceable():
            return self.decoder.decode_latents(latents)


class VaeEncoderGraph(nn.Module):
    """`images` in [0, 1] -> unscaled latent mode: the reference `encode_image`."""

    def __init__(self, decoder: reference.DiffusionWithLLMEmb):
        super().__init__()
        self.decoder = decoder

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        with _traceable():
            return self.decoder.encode_image(images)


def _names(graph: str) -> tuple[list[str], list[str]]:
    names = contract.GRAPHS[graph]
    return list(names.inputs), list(names.outputs)


class _DiffusionExporter(ComponentExporter):
    """The shared exporter of both decoders; subclasses name the kind and the model attribute."""

    #: `"gen"` or `"edit"`
    kind: str = ""
    #: the decoder's attribute on the reference model (`sd` / `ip2p`, the official names)
    attribute: str = ""

    # --- the model's sizes ---------------------------------------------------------------------------------

    def decoder(self, model) -> reference.DiffusionWithLLMEmb:
        """The reference decoder of this kind.

        Raises:
            ValueError: when the model has none.
        """
        decoder = getattr(model, self.attribute, None)
        if decoder is None:
            raise ValueError(f"this model has no {self.kind!r} decoder (model.{self.attribute} is missing)")
        return decoder

    def available(self, model) -> bool:
        return getattr(model, self.attribute, None) is not None

    @staticmethod
    def latent_multiple(decoder: reference.DiffusionWithLLMEmb) -> int:
        """What latent heights and widths must be multiples of for the exported UNet (2 ** upsamplers)."""
        return 2 ** int(decoder.sd_unet.num_upsamplers)

    def latent_size(self, model) -> int:
        """The latent side the reference denoises at: the configured image size over the VAE factor.

        Raises:
            ValueError: when the exported UNet could not run at that size (see `latent_multiple`).
        """
        decoder = self.decoder(model)
        image_size = model.config.image_size_for(self.kind)
        latent = image_size // decoder.vae_scale_factor
        multiple = self.latent_multiple(decoder)
        if latent % multiple or image_size % decoder.vae_scale_factor:
            raise ValueError(
                f"{self.kind}_image_size {image_size} must be a multiple of "
                f"{multiple * decoder.vae_scale_factor} (VAE factor {decoder.vae_scale_factor} x UNet latent "
                f"multiple {multiple})"
            )
        return latent

    def _unet_batch(self) -> int:
        # The guidance batch of one request: [uncond, cond] for generation, three-way for editing.
        return 2 if self.kind == "gen" else 3

    # --- graphs --------------------------------------------------------------------------------------------

    def graphs(self, model, settings: ExportSettings) -> list[GraphExport]:
        decoder = self.decoder(model)
        latent = self.latent_size(model)
        channels = decoder.sd_unet.config.in_channels
        size = latent * decoder.vae_scale_factor
        k = self.kind
        batch = self._unet_batch()
        latent_axes = {0: "batch", 2: "latent_height", 3: "latent_width"}
        image_axes = {0: "batch", 2: "height", 3: "width"}

        inputs, outputs = _names(f"{k}_mapper")
        mapper = GraphExport(
            name=f"{k}_mapper",
            module=MapperGraph(decoder),
            example_inputs=(torch.randn(2, decoder.num_embed_tokens, decoder.llm_hidden_size),),
            input_names=inputs,
            output_names=outputs,
            dynamic_axes={inputs[0]: {0: "groups"}, outputs[0]: {0: "groups"}},
            facts={
                "num_embed_tokens": decoder.num_embed_tokens,
                "llm_hidden_size": decoder.llm_hidden_size,
                "context_length": decoder.num_queries,
                "context_dim": decoder.sd_hidden_size,
            },
        )

        inputs, outputs = _names(f"{k}_unet")
        sample, timestep, context = inputs
        unet = GraphExport(
            name=f"{k}_unet",
            module=UNetGraph(decoder),
            example_inputs=(
                torch.randn(batch, channels, latent, latent),
                torch.full((batch,), 981, dtype=torch.long),
                torch.randn(batch, decoder.num_queries, decoder.sd_hidden_size),
            ),
            input_names=inputs,
            output_names=outputs,
            dynamic_axes={
                sample: latent_axes,
                timestep: {0: "batch"},
                context: {0: "batch"},
                outputs[0]: latent_axes,
            },
            facts={
                "in_channels": channels,
                "timestep_dtype": "int64",
                "timestep_shape": "[batch]",
                "dynamic_latent_size": True,
                "latent_multiple": self.latent_multiple(decoder),
                "guidance_batch": self._guidance_batch(),
            },
        )

        inputs, outputs = _names(f"{k}_vae_decoder")
        vae_decoder = GraphExport(
            name=f"{k}_vae_decoder",
            module=VaeDecoderGraph(decoder),
            example_inputs=(torch.randn(1, decoder.latent_channels, latent, latent),),
            input_names=inputs,
            output_names=outputs,
            dynamic_axes={inputs[0]: latent_axes, outputs[0]: image_axes},
            facts={"input": "scaled latents (the UNet's space)", "output_range": [0.0, 1.0]},
        )
        graphs = [mapper, unet, vae_decoder]

        if k == "edit":
            inputs, outputs = _names("edit_vae_encoder")
            graphs.append(
                GraphExport(
                    name="edit_vae_encoder",
                    module=VaeEncoderGraph(decoder),
                    example_inputs=(torch.rand(1, 3, size, size),),
                    input_names=inputs,
                    output_names=outputs,
                    dynamic_axes={inputs[0]: image_axes, outputs[0]: latent_axes},
                    facts={
                        "input_range": [0.0, 1.0],
                        "output": "latent distribution mode, unscaled",
                        "size_multiple": decoder.vae_scale_factor,
                    },
                )
            )
        return graphs

    def _guidance_batch(self) -> dict:
        if self.kind == "gen":
            return {"encoder_hidden_states": ["uncond", "cond"]}
        return {
            "encoder_hidden_states": ["cond", "uncond", "uncond"],
            "image_latents": ["image", "image", "zeros"],
        }

    # --- the constant file ---------------------------------------------------------------------------------

    def extra_files(self, model, out_dir: str | Path) -> dict[str, Path]:
        """Writes `<kind>_uncond.safetensors` (tensor `uncond`, float32 `[1, 77, D]`) into `out_dir`.

        The orchestrator calls this hook after `graphs()` and records each file in the manifest.

        Returns:
            `{"<kind>_uncond": path}`.
        """
        from safetensors.numpy import save_file

        path = Path(out_dir) / contract.UNCOND_FILE.format(kind=self.kind)
        uncond = self.decoder(model).unconditional_embedding().detach().float().cpu().numpy()
        save_file(
            {contract.UNCOND_TENSOR: np.ascontiguousarray(uncond)},
            str(path),
            metadata={"content": "CLIP text encoder last_hidden_state of the empty prompt"},
        )
        return {f"{self.kind}_uncond": path}

    # --- facts ---------------------------------------------------------------------------------------------

    def manifest_facts(self, model, settings: ExportSettings) -> dict:
        decoder = self.decoder(model)
        post = PostProcessSettings.for_model(model.config)
        facts = {
            "scheduler": reference.scheduler_facts(),
            "steps": post.gen_steps,
            "guidance_scale": post.guidance_scale,
            "image_size": model.config.image_size_for(self.kind),
            "latent_size": self.latent_size(model),
            "latent_channels": decoder.latent_channels,
            "vae_scale_factor": decoder.vae_scale_factor,
            "vae_scaling_factor": decoder.scaling_factor,
            "uncond_file": contract.UNCOND_FILE.format(kind=self.kind),
            "uncond_tensor": contract.UNCOND_TENSOR,
        }
        if self.kind == "edit":
            facts["image_guidance_scale"] = post.image_guidance_scale
        return facts

    # --- validation ----------------------------------------------------------------------------------------

    def validation_cases(
        self, model, settings: ExportSettings, rng: np.random.Generator
    ) -> dict[str, list[ValidationCase]]:
        decoder = self.decoder(model)
        k = self.kind
        latent = self.latent_size(model)
        # A second latent side proves the dynamic h, w (the next size the UNet accepts).
        other = latent + self.latent_multiple(decoder)
        f = decoder.vae_scale_factor
        steps = reference.ddim_timesteps(PostProcessSettings().gen_steps)
        early, middle, last = int(steps[0]), int(steps[len(steps) // 2]), int(steps[-1])

        def normal(*shape) -> np.ndarray:
            return rng.standard_normal(shape).astype(np.float32)

        cases: dict[str, list[ValidationCase]] = {}
        with torch.no_grad():
            mapper = []
            for n in (1, 2, 3):
                links = normal(n, decoder.num_embed_tokens, decoder.llm_hidden_size)
                want = decoder.map_queries(torch.from_numpy(links))
                mapper.append(
                    ValidationCase(f"n={n}", {"link_states": links}, {"conditioning": want.numpy()})
                )
            cases[f"{k}_mapper"] = mapper

            unet = []
            channels = decoder.sd_unet.config.in_channels
            # (batch, latent side, per-row timesteps): the CFG and IP2P batches at the early, middle and last
            # timesteps of the default schedule, and one batch with mixed timesteps at another latent size.
            shapes = [
                (2, latent, [early] * 2),
                (3, latent, [middle] * 3),
                (self._unet_batch(), latent, [last] * self._unet_batch()),
                (2, other, [early, last]),
            ]
            for b, side, ts in shapes:
                x = normal(b, channels, side, side)
                t = np.asarray(ts, dtype=np.int64)
                context = normal(b, decoder.num_queries, decoder.sd_hidden_size)
                want = decoder.sd_unet(
                    torch.from_numpy(x), torch.from_numpy(t), encoder_hidden_states=torch.from_numpy(context)
                ).sample
                unet.append(
                    ValidationCase(
                        f"b={b},h=w={side},t={ts}",
                        {"sample": x, "timestep": t, "encoder_hidden_states": context},
                        {"noise_pred": want.numpy()},
                    )
                )
            cases[f"{k}_unet"] = unet

            vae_decoder = []
            for n, side in ((1, latent), (2, latent), (1, other)):
                z = normal(n, decoder.latent_channels, side, side)
                want = decoder.decode_latents(torch.from_numpy(z))
                vae_decoder.append(
                    ValidationCase(f"n={n},h=w={side}", {"latents": z}, {"images": want.numpy()})
                )
            cases[f"{k}_vae_decoder"] = vae_decoder

            if k == "edit":
                vae_encoder = []
                for n, side in ((1, latent), (2, latent), (1, other)):
                    image = rng.random((n, 3, side * f, side * f), dtype=np.float32)
                    want = decoder.encode_image(torch.from_numpy(image))
                    vae_encoder.append(
                        ValidationCase(f"n={n},H=W={side * f}", {"images": image}, {"latents": want.numpy()})
                    )
                cases["edit_vae_encoder"] = vae_encoder
        return cases


@register
class GenExporter(_DiffusionExporter):
    """`[GEN]`: Stable Diffusion 1.5 with the LLM-embedding mapper (`model.sd`)."""

    name = "gen"
    kind = "gen"
    attribute = "sd"


@register
class EditExporter(_DiffusionExporter):
    """`[EDIT]`: InstructPix2Pix with the LLM-embedding mapper (`model.ip2p`)."""

    name = "edit"
    kind = "edit"
    attribute = "ip2p"
