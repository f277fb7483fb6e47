"""The contract between export and runtime, defined once and free of torch.

Token names and roles, routing kinds, chat-template constants and the `compare()` used by every parity
check live here. The export side writes these names into the artifact; the runtime reads them back and
checks they agree (docs/architecture.md, sections 2 and 9).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

# --- special tokens --------------------------------------------------------------------------------

#: The 26 tokens the official `train.py` adds, in the official order (`constant.DEFAULT_TOKENS` minus the
#: three that a Llama vocabulary already has: `<s>`, `</s>`, `<unk>`). Their ids are consecutive from the
#: base vocabulary size: 32000..32025 for the released model.
ADDED_TOKENS: tuple[str, ...] = (
    "[PAD]",
    "<image>",
    "<im_patch>",
    "<region>",
    "<img>",
    "</img>",
    "<reg>",
    "</reg>",
    "<det>",
    "</det>",
    "<grd>",
    "</grd>",
    "[DET]",
    "[GRD]",
    "[SEG]",
    "[POSE]",
    "[GEN]",
    "[EDIT]",
    "[EMB]",
    "[EMB2]",
    "[EMB3]",
    "[EMB4]",
    "[EMB5]",
    "[EMB6]",
    "[EMB7]",
    "[EMB8]",
)

IMAGE_TOKEN = "<image>"
IMAGE_PATCH_TOKEN = "<im_patch>"
REGION_TOKEN = "<region>"
REGION_OPEN = "<reg>"
REGION_CLOSE = "</reg>"
EOS_TOKEN = "</s>"
BOS_TOKEN = "<s>"
UNK_TOKEN = "<unk>"

#: The only markers that act as tokens in a user's prompt; every other special token is escaped.
INPUT_MARKERS: tuple[str, ...] = (IMAGE_TOKEN, REGION_TOKEN, REGION_OPEN, REGION_CLOSE)

#: Routing token -> routing kind (the lower-case name used in links and results).
ROUTING_TOKENS: dict[str, str] = {
    "[DET]": "det",
    "[GRD]": "grd",
    "[SEG]": "seg",
    "[POSE]": "pose",
    "[GEN]": "gen",
    "[EDIT]": "edit",
}
ROUTING_KINDS: tuple[str, ...] = tuple(ROUTING_TOKENS.values())

#: Routing kind -> super-link query table (`emb_embeddings_<table>`): `[DET]`, `[GRD]` and `[SEG]` share one.
QUERY_TABLE: dict[str, str] = {
    "det": "det",
    "grd": "det",
    "seg": "det",
    "pose": "pose",
    "gen": "gen",
    "edit": "edit",
}

#: Routing kind -> the decoder its groups are dispatched to (docs/architecture.md, section 3).
DECODER_OF_KIND: dict[str, str] = {
    "det": "object",
    "grd": "object",
    "seg": "object",
    "pose": "pose",
    "gen": "gen",
    "edit": "edit",
}
OBJECT_KINDS: tuple[str, ...] = ("det", "grd", "seg")
GENERATION_KINDS: tuple[str, ...] = ("gen", "edit")

#: Placeholder tokens that follow a perception routing token (N = 4), in order.
PERCEPTION_PLACEHOLDERS: tuple[str, ...] = ("[EMB]", "[EMB2]", "[EMB3]", "[EMB4]")
#: The one placeholder repeated N (64 for the release) times after `[GEN]` / `[EDIT]`.
GENERATION_PLACEHOLDER = "[EMB]"
ALL_PLACEHOLDERS: tuple[str, ...] = (
    "[EMB]",
    "[EMB2]",
    "[EMB3]",
    "[EMB4]",
    "[EMB5]",
    "[EMB6]",
    "[EMB7]",
    "[EMB8]",
)

# --- chat template (official `vicuna_v1`) -------------------------------------------------------------

SYSTEM_PROMPT = (
    "A chat between a curious user and an artificial intelligence assistant. "
    "The assistant gives helpful, detailed, and polite answers to the user's questions."
)
ROLES: tuple[str, str] = ("USER", "ASSISTANT")
SEP = " "
SEP2 = "</s>"

#: Label delimiters (docs/architecture.md, section 9): a `[DET]`/`[SEG]`/`[POSE]` label is the text between
#: the nearest of these (or the answer's start, or the end of the previous group) and the routing token.
LABEL_DELIMITERS: tuple[str, ...] = (", ", ". ", ": ", " for ", " and ", " of ")

# --- anyres tiling ------------------------------------------------------------------------------------


def anyres_candidates(max_tiles: int, min_tiles: int = 1) -> list[tuple[int, int]]:
    """Candidate (cols, rows) grids in the order the official `dynamic_preprocess` visits them.

    The order decides ties in the grid choice, so it is computed once here exactly as the official code
    does (a set sorted by tile count; Python's hash order of small int tuples is fixed) and stored in the
    manifest for the C++ core.
    """
    grids = {
        (i, j)
        for n in range(min_tiles, max_tiles + 1)
        for i in range(1, n + 1)
        for j in range(1, n + 1)
        if min_tiles <= i * j <= max_tiles
    }
    return sorted(grids, key=lambda g: g[0] * g[1])


# --- comparison -----------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Mismatch:
    """Why two arrays differ: enough to act on without re-running."""

    reason: str
    max_abs: float = float("nan")
    max_rel: float = float("nan")

    def __str__(self) -> str:
        return f"{self.reason} (max_abs={self.max_abs:.3g}, max_rel={self.max_rel:.3g})"


def compare(got, want, atol: float = 1e-4, rtol: float = 1e-4) -> Mismatch | None:
    """Compares two arrays the way every parity check in the project does.

    Same shape; the same pattern of non-finite values (e.g. the object decoder's -inf class slots, with
    equal signs); `allclose(atol, rtol)` on the finite rest. Integer and boolean arrays must be equal.

    Returns:
        None when they agree, else a `Mismatch` naming the problem and the largest errors.
    """
    got = np.asarray(got)
    want = np.asarray(want)
    if got.shape != want.shape:
        return Mismatch(f"shape {got.shape} != expected {want.shape}")
    if want.dtype.kind in "biu" or got.dtype.kind in "biu":
        if not np.array_equal(got, want):
            n = int(np.sum(got != want))
            return Mismatch(f"{n} of {want.size} integer/bool entries differ")
        return None
    got64 = got.astype(np.float64)
    want64 = want.astype(np.float64)
    fin_g, fin_w = np.isfinite(got64), np.isfinite(want64)
    if not np.array_equal(fin_g, fin_w):
        n = int(np.sum(fin_g != fin_w))
        return Mismatch(f"non-finite pattern differs at {n} entries")
    nonfin = ~fin_w
    if nonfin.any() and not np.array_equal(got64[nonfin], want64[nonfin], equal_nan=True):
        return Mismatch("non-finite values differ in sign or kind")
    if not fin_w.any():
        return None
    diff = np.abs(got64[fin_w] - want64[fin_w])
    ref = np.abs(want64[fin_w])
    max_abs = float(diff.max())
    max_rel = float((diff / np.maximum(ref, 1e-12)).max())
    if np.any(diff > atol + rtol * ref):
        return Mismatch(f"values differ beyond atol={atol}, rtol={rtol}", max_abs, max_rel)
    return None


def assert_close(got, want, name: str = "tensor", atol: float = 1e-4, rtol: float = 1e-4) -> None:
    """Raises AssertionError with a diff summary when `compare()` finds a mismatch."""
    m = compare(got, want, atol=atol, rtol=rtol)
    if m is not None:
        raise AssertionError(f"{name}: {m}")


# --- the artifact: graph files and their input/output names (docs/architecture.md, section 2) -----------

MANIFEST_FILE = "manifest.json"
#: The manifest schema version this visionllm-edge writes and reads, and the oldest it still reads (version 2
#: added `tokenizer.sentencepiece`; older artifacts must be re-exported).
MANIFEST_SCHEMA_VERSION = 2
MANIFEST_MIN_SCHEMA_VERSION = 2
VALIDATION_FILE = "validation.json"
TOKENIZER_FILE = "tokenizer.json"
#: Llama's SentencePiece model, beside `tokenizer.json`, for the C++ tokenizer.
SENTENCEPIECE_FILE = "tokenizer.model"
EMBEDDINGS_FILE = "embeddings.safetensors"
#: The unconditional (empty-prompt) context of each diffusion decoder: one float32 tensor `[1, 77, D]` in
#: `<kind>_uncond.safetensors` (kind gen or edit).
UNCOND_FILE = "{kind}_uncond.safetensors"
UNCOND_TENSOR = "uncond"
PRODUCER_NAME = "visionllm-edge"

#: Values the manifest allows, in the order its messages list them.
DTYPES: tuple[str, ...] = ("float32", "float16", "int64", "bool", "int32")
PRECISIONS: tuple[str, ...] = ("fp32", "fp16", "int8", "int4")
DECODERS: tuple[str, ...] = ("object", "pose", "gen", "edit")
QUERY_TABLES: tuple[str, ...] = ("det", "pose", "gen", "edit")
#: Every token the manifest's `tokens` section must give an id: the added tokens plus the three Llama has.
REQUIRED_TOKENS: tuple[str, ...] = (*ADDED_TOKENS, BOS_TOKEN, EOS_TOKEN, UNK_TOKEN)
#: VAE latents are 1/8 of the image side, so diffusion image sizes must be multiples of this.
VAE_SCALE = 8


@dataclass(frozen=True)
class GraphNames:
    """File and I/O names of one exported graph. `{i}` in a name stands for the LLM layer index."""

    file: str
    inputs: tuple[str, ...]
    outputs: tuple[str, ...]


#: Every graph an artifact may hold, by graph name. Exporters take names from here; the manifest repeats
#: them and the runtime checks the two agree.
GRAPHS: dict[str, GraphNames] = {
    # tiles [T,3,S,S] -> projected embeddings [T,P,H]; the last tile's (thumbnail's) last three CLIP
    # layers without CLS [3,P,C] feed the region encoder.
    "vision": GraphNames("vision.onnx", ("pixel_values",), ("image_embeds", "region_levels")),
    # thumbnail [1,3,S,S], masks [R,S,S] (float 0/1, thumbnail frame), levels [3,P,C] -> [R,H]
    "region": GraphNames("region.onnx", ("image", "masks", "region_levels"), ("region_embeds",)),
    # inputs_embeds [1,S,H], position_ids [S], past K/V per layer [P,kv,D] (sequence-major), output_rows [R]
    # -> logits [R,V], hidden [R,H] (post final norm), the step's new K/V rows per layer [S,kv,D]
    "llm": GraphNames(
        "llm.onnx",
        ("inputs_embeds", "position_ids", "output_rows", "past_key.{i}", "past_value.{i}"),
        ("logits", "hidden", "present_key.{i}", "present_value.{i}"),
    ),
    # object decoder: pixels [1,3,H,W], valid-pixel mask [1,H,W], link states [1,K,N,Hl], group mask [1,K],
    # queries whose masks are wanted [1,k] -> logits [1,Q,max_text_len], boxes [1,Q,4], masks [1,k,H/4,W/4]
    "det": GraphNames(
        "det.onnx",
        ("pixel_values", "pixel_mask", "text_query", "text_query_mask", "mask_query_index"),
        ("logits", "pred_boxes", "pred_masks"),
    ),
    # keypoint decoder: pixels, valid-pixel mask, object and keypoint link states [1,100,N,Hl] + masks [1,100]
    "pose": GraphNames(
        "pose.onnx",
        (
            "pixel_values",
            "pixel_mask",
            "object_query",
            "object_query_mask",
            "keypoint_query",
            "keypoint_query_mask",
        ),
        ("pred_logits", "pred_boxes", "pred_keypoints"),
    ),
    "gen_mapper": GraphNames("gen_mapper.onnx", ("link_states",), ("conditioning",)),
    "gen_unet": GraphNames("gen_unet.onnx", ("sample", "timestep", "encoder_hidden_states"), ("noise_pred",)),
    "gen_vae_decoder": GraphNames("gen_vae_decoder.onnx", ("latents",), ("images",)),
    "edit_mapper": GraphNames("edit_mapper.onnx", ("link_states",), ("conditioning",)),
    "edit_unet": GraphNames(
        "edit_unet.onnx", ("sample", "timestep", "encoder_hidden_states"), ("noise_pred",)
    ),
    "edit_vae_decoder": GraphNames("edit_vae_decoder.onnx", ("latents",), ("images",)),
    "edit_vae_encoder": GraphNames("edit_vae_encoder.onnx", ("images",), ("latents",)),
}

#: Component (what `--components` names) -> its graphs.
COMPONENT_GRAPHS: dict[str, tuple[str, ...]] = {
    "vision": ("vision",),
    "region": ("region",),
    "llm": ("llm",),
    "det": ("det",),
    "pose": ("pose",),
    "gen": ("gen_mapper", "gen_unet", "gen_vae_decoder"),
    "edit": ("edit_mapper", "edit_unet", "edit_vae_decoder", "edit_vae_encoder"),
}


def layer_names(template: str, num_layers: int) -> list[str]:
    """Expands a per-layer name such as `past_key.{i}`."""
    return [template.format(i=i) for i in range(num_layers)] if "{i}" in template else [template]
