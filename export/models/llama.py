"""The language model: Llama (Vicuna-7B-v1.5 shape) with an explicit, caller-owned KV cache.

Parameter names are those of `transformers.LlamaForCausalLM` (`model.embed_tokens`, `model.layers.N.*`,
`model.norm`, `lm_head`), so the official `llm.*` keys load unchanged. We write the forward ourselves rather
than use transformers' so that the super-link step (1 + N rows at consecutive positions on top of a cache)
is plain to read and identical to what the exported graph computes; its numbers match the official
`LlamaForCausalLM` (checked against the golden data).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn


@dataclass(frozen=True)
class LlamaSettings:
    """The fields of the official `llm_config` that the forward uses."""

    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    rms_norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    max_position_embeddings: int = 4096

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads

    @classmethod
    def from_official(cls, cfg: dict) -> LlamaSettings:
        if cfg.get("hidden_act", "silu") != "silu":
            raise ValueError(f"llm_config.hidden_act: only 'silu' is supported, got {cfg['hidden_act']!r}")
        if cfg.get("rope_scaling") not in (None, {}):
            raise ValueError(f"llm_config.rope_scaling: not supported, got {cfg['rope_scaling']!r}")
        if cfg.get("tie_word_embeddings", False):
            raise ValueError("llm_config.tie_word_embeddings: the released model has an untied lm_head")
        heads = int(cfg["num_attention_heads"])
        return cls(
            vocab_size=int(cfg["vocab_size"]),
            hidden_size=int(cfg["hidden_size"]),
            intermediate_size=int(cfg["intermediate_size"]),
            num_hidden_layers=int(cfg["num_hidden_layers"]),
            num_attention_heads=heads,
            num_key_value_heads=int(cfg.get("num_key_value_heads") or heads),
            rms_norm_eps=float(cfg.get("rms_norm_eps", 1e-6)),
            rope_theta=float(cfg.get("rope_theta", 10000.0)),
            max_position_embeddings=int(cfg.get("max_position_embeddings", 4096)),
        )


class RMSNorm(nn.Module):
    def __init__(self, size: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(size))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = x.dtype
        x = x.float()
        x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x.to(dtype)


def rotary_cos_sin(positions: torch.Tensor, head_dim: int, theta: float, dtype: torch.dtype):
    """cos/sin tables `[S, head_dim]` for the given positions (HF `rotate_half` layout)."""
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.int64).float() / head_dim))
    freqs = positions.float()[:, None] * inv_freq[None, :].to(positions.device)
    emb = torch.cat([freqs, freqs], dim=-1)
    return emb.cos().to(dtype), emb.sin().to(dtype)


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x `[B, heads, S, D]`."""
    half = x.shape[-1] // 2
    rotated = torch.cat([-x[..., half:], x[..., :half]], dim=-1)
    return x * cos + rotated * sin


class LlamaAttention(nn.Module):
    def __init__(self, s: LlamaSettings):
        super().__init__()
        self.s = s
        d = s.head_dim
        self.q_proj = nn.Linear(s.hidden_size, s.num_attention_heads * d, bias=False)
        self.k_proj = nn.Linear(s.hidden_size, s.num_key_value_heads * d, bias=False)
        self.v_proj = nn.Linear(s.hidden_size, s.num_key_value_heads * d, bias=False)
        self.o_proj = nn.Linear(s.num_attention_heads * d, s.hidden_size, bias=False)

    def forward(self, x, cos, sin, past: tuple[torch.Tensor, torch.Tensor] | None):
        """x `[B, S, H]`; past K/V `[B, kv_heads, P, D]`. Returns output and the step's new K/V."""
        b, s, _ = x.shape
        d = self.s.head_dim
        q = self.q_proj(x).view(b, s, self.s.num_attention_heads, d).transpose(1, 2)
        k = self.k_proj(x).view(b, s, self.s.num_key_value_heads, d).transpose(1, 2)
        v = self.v_proj(x).view(b, s, self.s.num_key_value_heads, d).transpose(1, 2)
        q = apply_rotary(q, cos, sin)
        k = apply_rotary(k, cos, sin)
        new_kv = (k, v)
        if past is not None:
            k = torch.cat([past[0], k], dim=2)
            v = torch.cat([past[1], v], dim=2)
        groups = self.s.num_attention_heads // self.s.num_key_value_heads
        if groups > 1:
            k = k.repeat_interleave(groups, dim=1)
            v = v.repeat_interleave(groups, dim=1)
        total = k.shape[2]
        past_len = total - s
        # Causal over the whole sequence: row i of the step sits at position past_len + i.
        allowed = (
            torch.arange(total, device=x.device)[None, :]
            <= (past_len + torch.arange(s, device=x.device))[:, None]
        )
        scores = (q @ k.transpose(-1, -2)) / math.sqrt(d)
        scores = scores.masked_fill(~allowed, torch.finfo(scores.dtype).min)
        probs = F.softmax(scores.float(), dim=-1).to(q.dtype)
        out = (probs @ v).transpose(1, 2).reshape(b, s, -1)
        return self.o_proj(out), new_kv


class LlamaMLP(nn.Module):
    def __init__(self, s: LlamaSettings):
        super().__init__()
        self.gate_proj = nn.Linear(s.hidden_size, s.intermediate_size, bias=False)
        self.up_proj = nn.Linear(s.hidden_size, s.intermediate_size, bias=False)
        self.down_proj = nn.Linear(s.intermediate_size, s.hidden_size, bias=False)

    def forward(self, x):
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class LlamaDecoderLayer(nn.Module):
    def __init__(self, s: LlamaSettings):
        super().__init__()
        self.self_attn = LlamaAttention(s)
        self.mlp = LlamaMLP(s)
        self.input_layernorm = RMSNorm(s.hidden_size, s.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(s.hidden_size, s.rms_norm_eps)

    def forward(self, x, cos, sin, past):
        attn, new_kv = self.self_attn(self.input_layernorm(x), cos, sin, past)
        x = x + attn
        x = x + self.mlp(self.post_attention_layernorm(x))
        return x, new_kv


class LlamaModel(nn.Module):
    def __init__(self, s: LlamaSettings):
        super().__init__()
        self.embed_tokens = nn.Embedding(s.vocab_size, s.hidden_size)
        self.layers = nn.ModuleList(LlamaDecoderLayer(s) for _ in range(s.num_hidden_layers))
        self.norm = RMSNorm(s.hidden_size, s.rms_norm_eps)


@dataclass
class LlamaOutput:
    """`hidden` is post-final-norm `[B, S, H]`; `new_kv` holds the step's K/V per layer;
    `layer_states` (when asked) holds the input embeddings and each layer's output, pre-norm for all but the
    last, which is post-norm (the transformers `hidden_states` convention)."""

    hidden: torch.Tensor
    new_kv: list[tuple[torch.Tensor, torch.Tensor]]
    layer_states: list[torch.Tensor] | None = None


class LlamaForCausalLM(nn.Module):
    """Llama with an explicit cache: `forward(inputs_embeds, positions, past)`."""

    def __init__(self, s: LlamaSettings):
        super().__init__()
        self.settings = s
        self.model = LlamaModel(s)
        self.lm_head = nn.Linear(s.hidden_size, s.vocab_size, bias=False)

    def forward(
        self,
        inputs_embeds: torch.Tensor,
        positions: torch.Tensor,
        past: list[tuple[torch.Tensor, torch.Tensor]] | None = None,
        keep_layer_states: bool = False,
    ) -> LlamaOutput:
        """Runs one step.

        Args:
            inputs_embeds: `[B, S, H]`.
            positions: `[S]` int64 RoPE positions; the rows must continue the cache (`past_len + i`).
            past: per layer `(K, V)` `[B, kv_heads, P, D]`, or None.
        """
        s = self.settings
        if inputs_embeds.shape[-1] != s.hidden_size:
            raise ValueError(
                f"inputs_embeds: expected width {s.hidden_size}, got {tuple(inputs_embeds.shape)}"
            )
        if positions.shape != (inputs_embeds.shape[1],):
            raise ValueError(
                f"positions: expected shape ({inputs_embeds.shape[1]},), got {tuple(positions.shape)}"
            )
        cos, sin = rotary_cos_sin(positions, s.head_dim, s.rope_theta, inputs_embeds.dtype)
        x = inputs_embeds
        states = [x] if keep_layer_states else None
        new_kv = []
        for i, layer in enumerate(self.model.layers):
            x, kv = layer(x, cos, sin, None if past is None else past[i])
            new_kv.append(kv)
            if keep_layer_states and i < len(self.model.layers) - 1:
                states.append(x)
        x = self.model.norm(x)
        if keep_layer_states:
            states.append(x)
        return LlamaOutput(hidden=x, new_kv=new_kv, layer_states=states)
