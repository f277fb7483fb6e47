"""The whole VisionLLM v2 model, with the official attribute and parameter names.

`VisionLLMv2(config).state_dict()` has the keys of the official `VisionLLMv2Model` (plain LLM, no LoRA
wrapping): `vis_encoder.*`, `llm.*`, `region_encoder.*`, `vl_bridge.*`, `gdino.*`, `unipose.*`, `sd.*`,
`ip2p.*`, `emb_embeddings_{det,pose,gen,edit}.weight`. Components are reachable under their official names
and callable on their raw inputs, so parity can be checked component by component.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn
from visionllm_edge import contract
from visionllm_edge.export.config import ModelConfig
from visionllm_edge.export.models.llama import LlamaForCausalLM
from visionllm_edge.export.models.region import RegionEncoder

#: Components the official constructor builds in bfloat16 (`modeling_sd.py` / `modeling_instruct_pix2pix.py`).
OFFICIAL_BF16_SUBMODULES = ("sd_unet", "sd_vae", "sd_text_encoder")


@dataclass
class VisionFeatures:
    """What the vision tower gives one image.

    Attributes:
        projected: `[T, P, H_llm]` `vl_bridge` output, rows for the `<im_patch>` slots in tile order.
        selected: `[T, P, C]` the CLIP layer fed to the projector (`vis_output_layer`), CLS dropped.
        hidden_states: every CLIP hidden state `[T, 1 + P, C]` (embeddings, then each layer), CLS included.
    """

    projected: torch.Tensor
    selected: torch.Tensor
    hidden_states: tuple[torch.Tensor, ...]


def build_vision_tower(vision_cfg: dict) -> nn.Module:
    from transformers import CLIPVisionConfig, CLIPVisionModel

    keep = {k: v for k, v in vision_cfg.items() if not k.startswith("_") and k not in ("architectures",)}
    cfg = CLIPVisionConfig(**keep)
    # Eager attention: the reference should compute plainly what the exported graph computes.
    cfg._attn_implementation = "eager"
    return CLIPVisionModel(cfg)


class VisionLLMv2(nn.Module):
    """VisionLLM v2 at any size from one config.

    Args:
        config: a parsed `ModelConfig`.
        official_dtypes: build the SD / IP2P UNet, VAE and text encoder in bfloat16 as the official
            constructor does (for key/dtype checks); the reference otherwise runs everything in float32.
    """

    def __init__(self, config: ModelConfig, official_dtypes: bool = False):
        super().__init__()
        self.config = config
        llm = config.llm
        self.vis_encoder = build_vision_tower(config.vision)
        self.llm = LlamaForCausalLM(llm)
        vis_width = int(config.vision["hidden_size"])
        if config.uses("region_encoder"):
            self.region_encoder = RegionEncoder(
                hidden_dim=256,
                embed_dim=vis_width,
                out_dim=llm.hidden_size,
                patch_size=int(config.vision["patch_size"]),
            )
        self.vl_bridge = nn.Sequential(
            nn.Linear(vis_width, llm.hidden_size), nn.GELU(), nn.Linear(llm.hidden_size, llm.hidden_size)
        )
        if config.uses("gdino"):
            from visionllm_edge.export.models.gdino import GroundingDinoOV

            self.gdino = GroundingDinoOV(config.official["gdino_config"])
        if config.uses("unipose"):
            from visionllm_edge.export.models.unipose import UniPose

            self.unipose = UniPose(
                config.official["unipose_config"], swin=config.extension.get("unipose_swin")
            )
        for kind, attr in (("gen", "sd"), ("edit", "ip2p")):
            if config.uses(attr):
                setattr(self, attr, _build_diffusion(config, kind, attr))
                if official_dtypes:
                    for name in OFFICIAL_BF16_SUBMODULES:
                        getattr(self, attr).get_submodule(name).to(torch.bfloat16)
        self.emb_embeddings_det = nn.Embedding(config.num_embs, llm.hidden_size)
        self.emb_embeddings_pose = nn.Embedding(config.num_embs, llm.hidden_size)
        self.emb_embeddings_gen = nn.Embedding(config.num_embs_gen, llm.hidden_size)
        self.emb_embeddings_edit = nn.Embedding(config.num_embs_gen, llm.hidden_size)

    # --- pieces of a request ------------------------------------------------------------------------------

    def encode_image(self, tiles: torch.Tensor) -> VisionFeatures:
        """Runs CLIP on `[T, 3, S, S]` normalised tiles and projects the selected layer."""
        out = self.vis_encoder(pixel_values=tiles, output_hidden_states=True)
        selected = out.hidden_states[self.config.vis_output_layer][:, 1:]
        return VisionFeatures(self.vl_bridge(selected), selected, tuple(out.hidden_states))

    def encode_regions(
        self, thumbnail: torch.Tensor, masks: torch.Tensor, vision: VisionFeatures
    ) -> torch.Tensor:
        """Region embeddings `[R, H]` for masks `[R, S, S]` in the thumbnail frame (the last tile)."""
        if not hasattr(self, "region_encoder"):
            raise ValueError("this model has no region encoder (use_region_encoder is false)")
        r = masks.shape[0]
        images = thumbnail[None].expand(r, -1, -1, -1)
        levels = [h[-1, 1:][None].expand(r, -1, -1) for h in vision.hidden_states[-3:]]
        return self.region_encoder(images, masks[:, None].to(thumbnail.dtype), levels)

    def query_table(self, kind: str) -> torch.Tensor:
        """The super-link query embeddings `[N, H]` that follow a routing token of this kind."""
        return getattr(self, f"emb_embeddings_{contract.QUERY_TABLE[kind]}").weight

    def num_queries(self, kind: str) -> int:
        return self.config.num_embs_gen if kind in contract.GENERATION_KINDS else self.config.num_embs

    def embed_tokens(self, ids: torch.Tensor) -> torch.Tensor:
        return self.llm.model.embed_tokens(ids)

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.llm.lm_head(hidden)


def _build_diffusion(config: ModelConfig, kind: str, attr: str) -> nn.Module:
    from visionllm_edge.export.models.diffusion import DiffusionWithLLMEmb, build_diffusion

    components = (config.extension.get("diffusion_components") or {}).get(kind)
    sub = config.official[f"{attr}_config"]
    if components is not None:
        return DiffusionWithLLMEmb(
            sub, components["unet"], components["vae"], components["text_encoder"], kind=kind
        )
    return build_diffusion(kind, sub)


def build_model(
    config: ModelConfig,
    *,
    device: str | torch.device = "cpu",
    official_dtypes: bool = False,
    seed: int | None = None,
) -> VisionLLMv2:
    """Builds the model; on `device="meta"` no memory is used (key and shape checks of the 7B)."""
    if seed is not None:
        torch.manual_seed(seed)
    with torch.device(device):
        model = VisionLLMv2(config, official_dtypes=official_dtypes)
    return model.eval()
