"""The LLM step graph (`llm.onnx`): one prefill, decode or super-link step on top of a caller-owned KV arena.

The runtime keeps one arena per layer, sequence-major (`[capacity, kv_heads, head_dim]`; docs/architecture.md
§4), and hands the graph the prefix `[0:past]` without a copy. The graph returns only the step's new K/V rows,
which the runtime writes at `[past:past+S]`, and the logits / post-norm hidden states of the rows it asks
for.

Attention is computed in two blocks so that `concat(past, new)` never exists: scores against the past block
and against the new block (causal inside it), one softmax over both, then `P_past·V_past + P_new·V_new`. Only
the small score blocks are joined for the softmax. Everything is plain ONNX that TensorRT parses; the
sequence-major past is read through a Transpose that ONNX Runtime folds into its MatMul (`FusedMatMul` with
`transBatchB`), so the past is read in place.

The export module wraps the reference model's own weights; validation computes the expected outputs with the
reference `LlamaForCausalLM.forward` (concat-based), so parity proves the rewrite.

Memory: the graph is traced in pieces of at most `PIECE_BYTES` of weights (one layer at the 7B's widths)
and joined into the one `llm.onnx` (`base.join_pieces`), because the TorchScript exporter holds about 3.5x
the weights it traces. Exported from a checkpoint folder, the LLM's layers are not loaded up front
(`load_parts`): each piece reads its layers from the checkpoint in the graph's precision for its trace and
releases them after (`_piece`), so tracing holds one layer; the float32 reference is then computed layer
by layer with each layer's weights read again (`streamed_reference_outputs`), so validation holds the
graph's mapped weights plus one float32 layer. A small model (one piece) is traced whole, as before.
"""

from __future__ import annotations

import copy
import functools
import math
from collections.abc import Callable, Iterator
from contextlib import contextmanager

import numpy as np
import torch
from torch import nn
from visionllm_edge import contract
from visionllm_edge.export.checkpoint import read_parts, release_parts
from visionllm_edge.export.models.llama import LlamaForCausalLM, rotary_cos_sin
from visionllm_edge.export.onnx.base import (
    PIECE_IN,
    PIECE_OUT,
    ComponentExporter,
    ExportSettings,
    GraphExport,
    ValidationCase,
    register,
)

#: How attention meets the past: `two_block` (the export form) or `concat` (the naive form, kept only so
#: that benchmarks can measure what the two-block form saves).
ATTENTION_MODES = ("two_block", "concat")

_DTYPES = {"fp32": torch.float32, "fp16": torch.float16}

#: Weight bytes of one traced piece of `llm.onnx` (at least one layer): the TorchScript exporter holds
#: several copies of what it traces (about 3.5x its weights at real widths), so a 7B model is traced a layer
#: at a time and the pieces are joined (`base.export_graph`), instead of the whole 13.5 GB at once.
PIECE_BYTES = 512 << 20

#: The LLM's modules (paths under `llm`) whose weights only the step graph and its reference use; the token
#: table is not among them (it goes to the artifact's embeddings file, written after the graph).
GRAPH_MODULES = ("model.layers", "model.norm", "lm_head")


def llm_of(model) -> LlamaForCausalLM:
    """The language model of a `VisionLLMv2` (its `llm`), or the argument itself if it is one already."""
    llm = getattr(model, "llm", model)
    if not isinstance(llm, LlamaForCausalLM):
        raise TypeError(f"expected a VisionLLMv2 or a LlamaForCausalLM, got {type(model).__name__}")
    return llm


def io_names(num_layers: int) -> tuple[list[str], list[str]]:
    """Input and output names of `llm.onnx` with the per-layer templates expanded, in contract order."""
    g = contract.GRAPHS["llm"]
    inputs = [n for t in g.inputs for n in contract.layer_names(t, num_layers)]
    outputs = [n for t in g.outputs for n in contract.layer_names(t, num_layers)]
    return inputs, outputs


def max_context_of(llm: LlamaForCausalLM, settings: ExportSettings) -> int:
    """The position cap: the user's `max_context`, else the model's `max_position_embeddings`."""
    cap = settings.max_context or llm.settings.max_position_embeddings
    if cap > llm.settings.max_position_embeddings:
        raise ValueError(
            f"max_context: {cap} exceeds the model's max_position_embeddings "
            f"({llm.settings.max_position_embeddings})"
        )
    return int(cap)


def _in_dtype(module: nn.Module, dtype: torch.dtype) -> nn.Module:
    """The module itself when its weights already have `dtype` (no copy), else a converted copy."""
    if all(p.dtype == dtype for p in module.parameters()):
        return module
    return copy.deepcopy(module).to(dtype)


class LlmStep(nn.Module):
    """One LLM step with a sequence-major past, as `llm.onnx` computes it, or a piece of it.

    `forward(inputs_embeds, position_ids, output_rows, *past_keys, *past_values)` returns
    `(logits [R,V], hidden [R,H], *present_keys, *present_values)`; the presents are only the step's new rows
    `[S, kv_heads, head_dim]`.

    With `layers` a sub-range of the layers, the module is one piece of that graph (traced alone, then
    joined, so that a large model is traced a few layers at a time): a piece that does not start at layer 0
    takes the running hidden states `[S, H]` instead of `inputs_embeds`, one that does not end at the last
    layer returns them first instead of the logits and hidden (and takes no `output_rows`), and each takes
    and returns only its own layers' K/V.

    Args:
        llm: the reference model whose layers, final norm and lm_head are used as they are (converted copies
            only when `dtype` differs from theirs).
        dtype: weight and activation dtype. RMSNorm (the reference's own module) and the softmax run in
            float32 whatever it is; logits and hidden are returned in float32.
        attention: `two_block` or `concat` (see `ATTENTION_MODES`).
        layers: the layers this module runs (default: all).
    """

    def __init__(
        self,
        llm: LlamaForCausalLM,
        dtype: torch.dtype = torch.float32,
        attention: str = "two_block",
        layers: range | None = None,
    ):
        super().__init__()
        if attention not in ATTENTION_MODES:
            raise ValueError(f"attention: expected one of {ATTENTION_MODES}, got {attention!r}")
        s = llm.settings
        if s.num_attention_heads % s.num_key_value_heads:
            raise ValueError(
                f"num_attention_heads ({s.num_attention_heads}) is not a multiple of num_key_value_heads "
                f"({s.num_key_value_heads})"
            )
        n = s.num_hidden_layers
        span = range(n) if layers is None else layers
        if span.step != 1 or not 0 <= span.start < span.stop <= n:
            raise ValueError(
                f"layers: expected a non-empty range of consecutive layers of [0, {n}), got {span}"
            )
        self.settings = s
        self.dtype = dtype
        self.attention = attention
        self.span = span
        self.first, self.last = span.start == 0, span.stop == n
        if len(span) == n:
            self.layers = _in_dtype(llm.model.layers, dtype)
        else:
            self.layers = nn.ModuleList(_in_dtype(llm.model.layers[i], dtype) for i in span)
        if self.last:
            self.norm = _in_dtype(llm.model.norm, dtype)
            self.lm_head = _in_dtype(llm.lm_head, dtype)
        d = s.head_dim
        # The reference's inverse frequencies, bit for bit (float32 whatever `dtype` is).
        inv_freq = 1.0 / (s.rope_theta ** (torch.arange(0, d, 2, dtype=torch.int64).float() / d))
        self.register_buffer("inv_freq", inv_freq, persistent=False)

    def forward(self, x, position_ids, *rest):
        output_rows, past = (rest[0], rest[1:]) if self.last else (None, rest)
        n = len(self.layers)
        if len(past) != 2 * n:
            raise ValueError(f"expected {2 * n} past tensors (keys then values), got {len(past)}")
        if self.first:
            x = x[0]  # [S, H]: batch is always 1, and 2-D rows keep every Reshape simple
        freqs = position_ids.float()[:, None] * self.inv_freq[None, :]
        emb = torch.cat([freqs, freqs], dim=-1)
        # [S, 1, D]: broadcasts over heads of the sequence-major [S, heads, D] projections.
        cos = _to(emb.cos(), self.dtype)[:, None, :]
        sin = _to(emb.sin(), self.dtype)[:, None, :]
        # Causal mask of the new block, built once: row i sees new rows 0..i (and the whole past). Row r of
        # the grouped queries below is step row r % S, hence the repeat.
        step = torch.arange(x.shape[0], device=x.device)
        causal = step[None, :] <= step[:, None]  # [S, S]
        groups = self.settings.num_attention_heads // self.settings.num_key_value_heads
        if groups > 1:
            causal = causal.repeat(groups, 1)
        keys, values = [], []
        for i, layer in enumerate(self.layers):
            h = layer.input_layernorm(x)
            attn, k, v = self._attention(layer.self_attn, h, cos, sin, causal, past[i], past[n + i])
            keys.append(k)
            values.append(v)
            x = x + attn
            x = x + layer.mlp(layer.post_attention_layernorm(x))
        if not self.last:
            return (x, *keys, *values)
        # Only the asked rows go through the final norm and lm_head: [S, V] logits at prefill would be
        # S x 32026 floats for nothing.
        hidden = self.norm(x.index_select(0, output_rows))
        logits = self.lm_head(hidden)
        return (_to(logits, torch.float32), _to(hidden, torch.float32), *keys, *values)

    def _attention(self, attn, h, cos, sin, causal, past_k, past_v):
        s = self.settings
        heads, kv, d = s.num_attention_heads, s.num_key_value_heads, s.head_dim
        f32 = torch.float32
        low = torch.finfo(f32).min
        # Reshapes name the traced row count rather than -1: the TorchScript exporter then knows the static
        # head dims, and the present outputs are declared [S, kv_heads, head_dim] instead of all-unknown.
        n_new = h.shape[0]
        q = _rotate(attn.q_proj(h).reshape(n_new, heads, d), cos, sin, d // 2)  # [S, heads, D]
        k = _rotate(attn.k_proj(h).reshape(n_new, kv, d), cos, sin, d // 2)  # [S, kv, D]: also the presents
        v = attn.v_proj(h).reshape(n_new, kv, d)
        # Head-major queries grouped by their KV head ([kv, groups*S, D], row = group*S + step row), so a
        # grouped-query model never repeats K/V. The scale goes on the S query rows, not on the P scores.
        qh = (q * (1.0 / math.sqrt(d))).transpose(0, 1).reshape(kv, (heads // kv) * n_new, d)
        if self.attention == "concat":
            keys = torch.cat([past_k, k], dim=0)
            values = torch.cat([past_v, v], dim=0)
            scores = _to(qh @ keys.permute(1, 2, 0), f32)  # [kv, gS, P+S]
            allowed = torch.cat([torch.ones_like(causal[:, :1]).expand(-1, past_k.shape[0]), causal], dim=1)
            scores = torch.where(allowed, scores, low)
            probs = _to(torch.softmax(scores, dim=-1), self.dtype)
            out = probs @ values.permute(1, 0, 2)
        else:
            # Permutes of the sequence-major past are what ORT's MatMulTransposeFusion folds into FusedMatMul
            # (transB + transBatchB for K, transBatchB for V): the past is read in place, never copied.
            scores_past = _to(qh @ past_k.permute(1, 2, 0), f32)  # [kv, gS, P]
            scores_new = torch.where(causal, _to(qh @ k.permute(1, 2, 0), f32), low)  # [kv, gS, S]
            # One softmax over both blocks: only the scores are joined (gS x (P+S) per head, no K/V rows).
            probs = _to(torch.softmax(torch.cat([scores_past, scores_new], dim=-1), dim=-1), self.dtype)
            n_past = past_k.shape[0]
            out = probs[..., :n_past] @ past_v.permute(1, 0, 2) + probs[..., n_past:] @ v.permute(1, 0, 2)
        out = out.reshape(heads, n_new, d).transpose(0, 1).reshape(n_new, heads * d)
        return attn.o_proj(out), k, v


def _to(x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Casts only when needed: the tracer would otherwise write a no-op Cast node for every `.float()`."""
    return x if x.dtype == dtype else x.to(dtype)


def _rotate(x, cos, sin, half: int):
    """RoPE in the HF `rotate_half` layout on `[S, heads, D]` (`half` static: no shape arithmetic traced)."""
    return x * cos + torch.cat([-x[..., half:], x[..., :half]], dim=-1) * sin


def fp32_node_descriptions(num_layers: int) -> list[str]:
    """What stays float32 inside an fp16 `llm.onnx` (the casts are explicit in the graph)."""
    out = ["rotary cos/sin: positions -> angles -> Cos/Sin in float32, then cast to float16"]
    for i in range(num_layers):
        out += [
            f"layers.{i}.input_layernorm: RMSNorm (Pow, ReduceMean, Add eps, Sqrt, Div) in float32",
            f"layers.{i}.self_attn: causal mask, score Concat and Softmax in float32 (MatMuls in float16)",
            f"layers.{i}.post_attention_layernorm: RMSNorm in float32",
        ]
    out += [
        "norm: final RMSNorm in float32",
        "outputs logits and hidden: cast to float32 after the float16 lm_head / final norm weight",
    ]
    return out


@register
class LlmExporter(ComponentExporter):
    """`llm.onnx`: one step of the language model over a sequence-major KV arena (docs/architecture.md §4)."""

    name = "llm"

    def graphs(self, model, settings: ExportSettings) -> list[GraphExport]:
        # Traced piece by piece (each piece's weights alive only during its trace), then joined; a small model
        # is one piece, traced as the whole graph.
        llm = llm_of(model)
        spans = piece_spans(llm, self.load_dtype(settings))
        inputs, outputs = io_names(llm.settings.num_hidden_layers)
        return [
            GraphExport(
                name="llm",
                module=None,
                example_inputs=(),
                input_names=inputs,
                output_names=outputs,
                dynamic_axes={},
                facts=_graph_facts(settings, "two_block", llm.settings.num_hidden_layers),
                pieces=[functools.partial(_piece, model, settings, "two_block", span) for span in spans],
            )
        ]

    def load_parts(self) -> tuple[str, ...]:
        # The token and query tables only (the artifact's embeddings file): the graph's weights are read
        # from the checkpoint piece by piece while it is traced (`_piece`).
        return ("embeddings",)

    def load_dtype(self, settings: ExportSettings) -> torch.dtype:
        # `LlmStep` uses weights already in the graph's dtype as they are: an fp16 export loaded in fp16 holds
        # one copy of the weights, not a float32 one plus a converted one.
        return _DTYPES.get(settings.precision, torch.float32)

    def validation_cases(
        self, model, settings: ExportSettings, rng: np.random.Generator
    ) -> dict[str, list[ValidationCase]]:
        """Five step kinds at fresh random inputs, with the float32 reference's outputs.

        The reference runs on the model's own LLM when its weights are there in float32 (or the model has no
        checkpoint to read them from: then in whatever dtype they are); otherwise (loaded in float16, or not
        loaded: a component-by-component export reads them per piece) layer by layer on float32 weights read
        again from the checkpoint folder (`streamed_reference_outputs`), with the same values.
        """
        llm = llm_of(model)
        cap = max_context_of(llm, settings)
        np_dtype = np.float16 if settings.precision == "fp16" else np.float32
        # (label, S, P, rows): prefill last row and arbitrary rows, decode, the 1+N super-link step (rows of
        # its N query rows, shuffled), and a long past that ends at the position cap.
        s_long = min(3, cap)
        shapes = [
            (7, 0, [6]),
            (7, 0, list(rng.choice(7, size=3, replace=False))),
            (1, max(0, min(9, cap - 1)), [0]),
            (5, max(0, min(40, cap - 5)), list(rng.permutation([1, 2, 3, 4]))),
            (s_long, cap - s_long, list(rng.choice(s_long, size=2, replace=True))),
        ]
        labels = [f"S={s},P={p},R={len(rows)}" for s, p, rows in shapes]
        inputs = [random_inputs(llm, s, p, rows, rng, np_dtype) for s, p, rows in shapes]
        if _checkpoint_backed(model) and not _resident(llm, torch.float32):
            expected = streamed_reference_outputs(llm, inputs, _checkpoint_weights(model))
        else:
            expected = [reference_outputs(llm, case) for case in inputs]
        return {"llm": [ValidationCase(*case) for case in zip(labels, inputs, expected)]}

    def manifest_facts(self, model, settings: ExportSettings) -> dict:
        llm = llm_of(model)
        s = llm.settings
        return {
            "num_layers": s.num_hidden_layers,
            "kv_heads": s.num_key_value_heads,
            "head_dim": s.head_dim,
            "hidden_size": s.hidden_size,
            "vocab_size": s.vocab_size,
            "max_context": max_context_of(llm, settings),
            "rope_theta": s.rope_theta,
            "rms_norm_eps": s.rms_norm_eps,
        }


def build_graph(
    llm: LlamaForCausalLM, settings: ExportSettings, attention: str = "two_block", layers: range | None = None
) -> GraphExport:
    """The `llm` graph to trace, with example inputs that make every axis dynamic (S=3, P=2, R=2); with
    `layers`, the piece of it that runs those layers (`LlmStep`; `PIECE_IN` / `PIECE_OUT` carry the hidden
    states between pieces)."""
    if settings.precision not in _DTYPES:
        raise ValueError(f"precision: expected one of {tuple(_DTYPES)}, got {settings.precision!r}")
    dtype = _DTYPES[settings.precision]
    s = llm.settings
    n = s.num_hidden_layers
    module = LlmStep(llm, dtype=dtype, attention=attention, layers=layers).eval()
    span, first, last = module.span, module.first, module.last
    g = contract.GRAPHS["llm"]
    per_layer_in = [name for t in g.inputs if "{i}" in t for name in (t.format(i=i) for i in span)]
    per_layer_out = [name for t in g.outputs if "{i}" in t for name in (t.format(i=i) for i in span)]
    inputs = ["inputs_embeds" if first else PIECE_IN, "position_ids", *(["output_rows"] if last else [])]
    outputs = ["logits", "hidden"] if last else [PIECE_OUT]
    # Distinct sizes for S, P and R so that the tracer cannot confuse one axis with another.
    gen = torch.Generator().manual_seed(settings.seed)
    rows = torch.randn(1, 3, s.hidden_size, generator=gen).to(dtype)
    example = (
        rows if first else rows[0],
        torch.arange(2, 5, dtype=torch.int64),
        *([torch.tensor([2, 0], dtype=torch.int64)] if last else []),
        *(torch.randn(2, s.num_key_value_heads, s.head_dim, generator=gen).to(dtype) for _ in per_layer_in),
    )
    dynamic = {"inputs_embeds": {1: "S"}, PIECE_IN: {0: "S"}, PIECE_OUT: {0: "S"}, "position_ids": {0: "S"}}
    dynamic.update({"output_rows": {0: "R"}, "logits": {0: "R"}, "hidden": {0: "R"}})
    dynamic.update({name: {0: "P"} for name in per_layer_in})
    dynamic.update({name: {0: "S"} for name in per_layer_out})
    inputs, outputs = inputs + per_layer_in, outputs + per_layer_out
    return GraphExport(
        name="llm",
        module=module,
        example_inputs=example,
        input_names=inputs,
        output_names=outputs,
        dynamic_axes={k: v for k, v in dynamic.items() if k in inputs or k in outputs},
        facts=_graph_facts(settings, attention, n),
    )


def _graph_facts(settings: ExportSettings, attention: str, num_layers: int) -> dict:
    facts = {
        "precision": settings.precision,
        "attention": attention,
        "kv_layout": "sequence-major [P, kv_heads, head_dim]; presents are the step's new rows [S, ...]",
        "kv_dtype": settings.precision,
    }
    if settings.precision == "fp16":
        facts["fp32_nodes"] = fp32_node_descriptions(num_layers)
    return facts


def piece_spans(llm: LlamaForCausalLM, dtype: torch.dtype, piece_bytes: int | None = None) -> list[range]:
    """The layer ranges `llm.onnx` is traced in: consecutive layers whose weights (in `dtype`) add up to at
    most `piece_bytes` (default `PIECE_BYTES`), at least one layer each; the last also holds the final norm
    and lm_head. One range when the whole graph fits."""
    limit = PIECE_BYTES if piece_bytes is None else piece_bytes
    size = torch.empty((), dtype=dtype).element_size()

    def weight_bytes(module: nn.Module) -> int:
        return sum(p.numel() for p in module.parameters()) * size

    layers = llm.model.layers
    cost = [weight_bytes(layer) for layer in layers]
    cost[-1] += weight_bytes(llm.model.norm) + weight_bytes(llm.lm_head)
    spans, start, held = [], 0, 0
    for i, c in enumerate(cost):
        if i > start and held + c > limit:
            spans.append(range(start, i))
            start, held = i, 0
        held += c
    spans.append(range(start, len(cost)))
    return spans


@contextmanager
def _piece(model, settings: ExportSettings, attention: str, span: range) -> Iterator[GraphExport]:
    """`build_graph` of one piece, with its weights read from the checkpoint for the time of the trace when
    they are not in memory (a component-by-component export loads none of them up front)."""
    llm = llm_of(model)
    paths = [f"model.layers.{i}" for i in span]
    if span.stop == llm.settings.num_hidden_layers:
        paths += ["model.norm", "lm_head"]
    absent = [
        f"llm.{path}"
        for path in paths
        if any(p.device.type == "meta" for p in llm.get_submodule(path).parameters())
    ]
    if absent and not _checkpoint_backed(model):
        raise ValueError(
            f"{absent[0]}: its weights are not loaded, and the model has no checkpoint folder to read them "
            "from"
        )
    if absent:
        state = read_parts(model, absent, _DTYPES[settings.precision])
        model.load_state_dict(state, strict=False, assign=True)  # read_parts checked every key
        del state
    try:
        yield build_graph(llm, settings, attention, layers=span)
    finally:
        if absent:
            release_parts(model, absent)


def random_inputs(
    llm: LlamaForCausalLM, s: int, p: int, rows, rng: np.random.Generator, dtype=np.float32
) -> dict[str, np.ndarray]:
    """Fresh random graph inputs for a step of S rows on a past of P rows, asking for `rows`."""
    st = llm.settings
    n = st.num_hidden_layers
    inputs = {
        "inputs_embeds": rng.standard_normal((1, s, st.hidden_size)).astype(dtype),
        "position_ids": np.arange(p, p + s, dtype=np.int64),
        "output_rows": np.asarray(rows, dtype=np.int64),
    }
    names, _ = io_names(n)
    for name in names[3:]:
        inputs[name] = rng.standard_normal((p, st.num_key_value_heads, st.head_dim)).astype(dtype)
    return inputs


@torch.no_grad()
def reference_outputs(llm: LlamaForCausalLM, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """The graph's outputs for `inputs`, computed by the reference `LlamaForCausalLM.forward`.

    The reference takes a head-major past `[1, kv, P, D]` and concatenates; its new K/V come back head-major
    and are turned to the graph's sequence-major rows here. It runs in its own dtype (float32 for parity).
    """
    n = llm.settings.num_hidden_layers
    dtype = next(llm.parameters()).dtype
    x = torch.from_numpy(inputs["inputs_embeds"]).to(dtype)
    positions = torch.from_numpy(inputs["position_ids"])
    rows = torch.from_numpy(inputs["output_rows"])
    out = llm(x, positions, _head_major_past(inputs, n, dtype))
    hidden = out.hidden[0].index_select(0, rows)
    return _expected(hidden, llm.lm_head(hidden), out.new_kv)


@torch.no_grad()
def streamed_reference_outputs(
    llm: LlamaForCausalLM,
    cases: list[dict[str, np.ndarray]],
    weights: Callable[[str], dict[str, torch.Tensor]],
) -> list[dict[str, np.ndarray]]:
    """`reference_outputs` of several inputs in float32, holding one module's float32 weights at a time.

    The reference's own modules run in the order `LlamaForCausalLM.forward` runs them (each
    `LlamaDecoderLayer` on the head-major past, the final norm, then `lm_head` on the asked rows, as
    `reference_outputs` does), layer-major over all the inputs. Each module runs through
    `torch.func.functional_call` with the state `weights(path)` returns for it (`path` under the LLM:
    `model.layers.3`, `model.norm`, `lm_head`; keys relative to the module), so its own parameters are never
    read: they may be float16 or released to meta. With the float32 checkpoint values this is bit-identical to
    `reference_outputs` on the float32 model. Each layer's past is turned into float32 when that layer runs,
    so a float16 long-context case never has its whole past in float32 at once.
    """
    from torch.func import functional_call

    s = llm.settings
    f32 = torch.float32
    states = []
    for inputs in cases:
        x = torch.from_numpy(inputs["inputs_embeds"]).to(f32)
        cos, sin = rotary_cos_sin(torch.from_numpy(inputs["position_ids"]), s.head_dim, s.rope_theta, f32)
        states.append({"x": x, "cos": cos, "sin": sin, "kv": []})
    for i, layer in enumerate(llm.model.layers):
        state = weights(f"model.layers.{i}")
        for inputs, st in zip(cases, states):
            past = _layer_past(inputs, i, f32)
            st["x"], kv = functional_call(layer, state, (st["x"], st["cos"], st["sin"], past), strict=True)
            st["kv"].append(kv)
        del state
    norm, head = weights("model.norm"), weights("lm_head")
    out = []
    for inputs, st in zip(cases, states):
        rows = torch.from_numpy(inputs["output_rows"])
        hidden = functional_call(llm.model.norm, norm, (st["x"],), strict=True)[0].index_select(0, rows)
        out.append(_expected(hidden, functional_call(llm.lm_head, head, (hidden,), strict=True), st["kv"]))
    return out


def _head_major_past(inputs: dict[str, np.ndarray], n: int, dtype: torch.dtype):
    """The graph's sequence-major past as the reference takes it (per layer `(K, V)` `[1, kv, P, D]`), or
    None for an empty past (P = 0 takes the reference's own no-cache path)."""
    if inputs["past_key.0"].shape[0] == 0:
        return None
    return [_layer_past(inputs, i, dtype) for i in range(n)]


def _layer_past(inputs: dict[str, np.ndarray], i: int, dtype: torch.dtype):
    """Layer `i`'s `(K, V)` of `_head_major_past`, or None for an empty past."""
    if inputs[f"past_key.{i}"].shape[0] == 0:
        return None
    return tuple(
        torch.from_numpy(inputs[f"{kind}.{i}"]).to(dtype).permute(1, 0, 2)[None]
        for kind in ("past_key", "past_value")
    )


def _expected(hidden: torch.Tensor, logits: torch.Tensor, new_kv) -> dict[str, np.ndarray]:
    """The graph's outputs from the reference's: float32, new K/V turned sequence-major."""
    expected = {"logits": logits.float().numpy(), "hidden": hidden.float().numpy()}
    for i, (k, v) in enumerate(new_kv):
        expected[f"present_key.{i}"] = k[0].permute(1, 0, 2).float().numpy()
        expected[f"present_value.{i}"] = v[0].permute(1, 0, 2).float().numpy()
    return expected


def _checkpoint_backed(model) -> bool:
    """Whether `model` came from `load_reference_parts`, and can read its weights again (`read_parts`)."""
    return getattr(model, "checkpoint_dir", None) is not None


def _resident(llm: LlamaForCausalLM, dtype: torch.dtype) -> bool:
    """Whether every weight the step graph uses is in memory in `dtype`."""
    modules = (llm.get_submodule(path) for path in GRAPH_MODULES)
    return all(p.device.type != "meta" and p.dtype == dtype for m in modules for p in m.parameters())


def _checkpoint_weights(model) -> Callable[[str], dict[str, torch.Tensor]]:
    """`path under the LLM -> its float32 state, read from the checkpoint` (`streamed_reference_outputs`)."""

    def weights(path: str) -> dict[str, torch.Tensor]:
        prefix = f"llm.{path}"
        return {key[len(prefix) + 1 :]: value for key, value in read_parts(model, [prefix]).items()}

    return weights
