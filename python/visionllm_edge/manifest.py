"""The artifact manifest (`manifest.json`): typed form, loading through the C++ parser, and builders.

The manifest is the contract between the exporter (host, torch) and the runtime (device, no torch). It is
parsed strictly because a silently mis-read artifact fails far from its cause: an engine built from the
wrong file, a routing token that dispatches to the wrong decoder, a tile grid that disagrees with the
reference. Every error is a `ManifestError` whose message names the file and the key path, for example
`out/manifest.json: graphs.llm.sha256: llm.onnx: sha256 mismatch ...`.

There is one parser, the C++ core's (`csrc/artifact/manifest.cpp`, reached through `_core`): every check
runs there, for the C++ pipeline and for this module alike. `load_manifest` reads `manifest.json` with it;
`validate_manifest_dict` runs it on a dict the exporter is about to write. The dataclasses below are then
built from the validated document and the resolved paths the parser returns, without checking again. The
JSON Schema (`schemas/manifest.v2.schema.json`, `load_schema()`) describes the same structure as data for
outside tools; the tests prove the two agree. ONNX files are never loaded: files are checked for
presence, size, confinement to the folder and sha256 only.

Format, version 2 (`contract.MANIFEST_SCHEMA_VERSION`)::

    schema_version, producer{name, version},
    model{name, hidden_size, num_layers, num_heads, num_kv_heads, head_dim, vocab_size, max_context,
          rope_theta, rms_norm_eps},
    graphs{<contract.GRAPHS name>: {file, sha256, size_bytes, external_data[], inputs[], outputs[], opset,
           precision, facts{}}},                                 # any subset of contract.GRAPHS
    tokens{<26 added tokens, <s>, </s>, <unk>>: id},
    routing{<kind>: {token, id, decoder, queries, table}},        # any subset of contract.ROUTING_KINDS
    embeddings{file, sha256, token_table, query_tables{det, pose, gen, edit}},
    tokenizer{file, sha256, legacy, add_prefix_space, sentencepiece{file, sha256}},
    preprocess{clip{...}, detection{...}, diffusion{...}}, postprocess{...}, generation{...},
    chat_template{system, roles, sep, sep2, image_token, input_markers},
    extra_files{<logical name>: {file, sha256}}                    # e.g. gen_uncond

`graphs.<name>.size_bytes` is the size of `file` alone; external data files are listed, checked for
presence and confinement, but not hashed (the format carries no hash for them).
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

from visionllm_edge import _core, contract

# --- constants of the format ------------------------------------------------------------------------------

#: The schema version this visionllm-edge writes and reads.
SCHEMA_VERSION = contract.MANIFEST_SCHEMA_VERSION
#: The oldest schema version this visionllm-edge still reads.
MIN_SCHEMA_VERSION = contract.MANIFEST_MIN_SCHEMA_VERSION
SCHEMA_FILE = f"manifest.v{SCHEMA_VERSION}.schema.json"
PRODUCER_NAME = contract.PRODUCER_NAME

DTYPES = contract.DTYPES
PRECISIONS = contract.PRECISIONS
DECODERS = contract.DECODERS
QUERY_TABLES = contract.QUERY_TABLES
REQUIRED_TOKENS = contract.REQUIRED_TOKENS
VAE_SCALE = contract.VAE_SCALE

_HASH_CHUNK = 1 << 20


class ManifestError(ValueError):
    """An artifact manifest that cannot be used; the message names the file and the key path.

    The C++ parser's `vle::ArtifactError` arrives as this class (the core's one exception translator).
    """


# --- the typed manifest -------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Producer:
    """Who wrote the artifact."""

    name: str
    version: str


@dataclass(frozen=True)
class ModelInfo:
    """LLM facts the runtime sizes its buffers and checks graphs by."""

    name: str
    hidden_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    vocab_size: int
    max_context: int
    rope_theta: float
    rms_norm_eps: float


@dataclass(frozen=True)
class TensorSpec:
    """One graph input or output. String dims are symbolic (dynamic) axes."""

    name: str
    dtype: str
    shape: tuple[int | str, ...]


@dataclass(frozen=True)
class GraphEntry:
    """One exported ONNX graph.

    Attributes:
        name: graph name, a key of `contract.GRAPHS`.
        file: the path as written in the manifest, relative to the artifact folder.
        path: `file` resolved to an absolute path inside the artifact folder.
        external_data: absolute paths of the external-data files next to the graph.
        facts: free-form exporter facts (static sizes, buckets, ...); treat as read-only.
    """

    name: str
    file: str
    path: Path
    sha256: str
    size_bytes: int
    external_data: tuple[Path, ...]
    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]
    opset: int
    precision: str
    facts: dict[str, Any]

    @property
    def input_names(self) -> tuple[str, ...]:
        return tuple(t.name for t in self.inputs)

    @property
    def output_names(self) -> tuple[str, ...]:
        return tuple(t.name for t in self.outputs)


@dataclass(frozen=True)
class RoutingEntry:
    """One super-link routing token: which decoder its groups go to and how many query states it carries."""

    kind: str
    token: str
    id: int
    decoder: str
    queries: int
    table: str


@dataclass(frozen=True)
class FileRef:
    """A file of the artifact with its hash (`path` is absolute)."""

    file: str
    path: Path
    sha256: str


@dataclass(frozen=True)
class Embeddings:
    """`embeddings.safetensors`: the token table and the super-link query tables, by tensor name."""

    file: str
    path: Path
    sha256: str
    token_table: str
    query_tables: dict[str, str]


@dataclass(frozen=True)
class TokenizerInfo:
    """`tokenizer.json`, the two flags that change how Llama's SentencePiece text is split, and
    `sentencepiece`: the SentencePiece model (`tokenizer.model`) the C++ tokenizer reads."""

    file: str
    path: Path
    sha256: str
    legacy: bool
    add_prefix_space: bool
    sentencepiece: FileRef


@dataclass(frozen=True)
class ClipPreprocess:
    """Anyres tiling for the vision encoder; `candidate_grids` are (cols, rows) in tie-breaking order."""

    tile_size: int
    max_tiles: int
    patches_per_tile: int
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    resample: str
    candidate_grids: tuple[tuple[int, int], ...]


@dataclass(frozen=True)
class DetectionPreprocess:
    """The decoders' image: resized by short side with a cap on the long side, padded to a multiple."""

    short_side: int
    max_long_side: int
    size_divisibility: int
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    resample: str


@dataclass(frozen=True)
class DiffusionPreprocess:
    gen_image_size: int
    edit_image_size: int


@dataclass(frozen=True)
class Preprocess:
    clip: ClipPreprocess
    detection: DetectionPreprocess
    diffusion: DiffusionPreprocess


@dataclass(frozen=True)
class Postprocess:
    """Decoder post-processing defaults; `nms_iou` None means no NMS."""

    det_top_k: int
    det_score_threshold: float
    nms_iou: float | None
    mask_threshold: float
    seg_score_threshold: float
    pose_top_k: int
    pose_score_threshold: float


@dataclass(frozen=True)
class Generation:
    max_new_tokens: int
    bos_id: int
    eos_id: int
    diffusion_steps: int
    guidance_scale: float
    image_guidance_scale: float


@dataclass(frozen=True)
class ChatTemplate:
    system: str
    roles: tuple[str, str]
    sep: str
    sep2: str
    image_token: str
    input_markers: tuple[str, ...]


@dataclass(frozen=True)
class Manifest:
    """A parsed, checked `manifest.json`.

    Attributes:
        artifact_dir: the artifact folder, resolved absolute.
        graphs: by graph name; only the graphs the artifact holds.
        tokens: special token -> id.
        routing: by routing kind; only the kinds the artifact holds.
        extra_files: by logical name (e.g. `gen_uncond`).
        data: the validated JSON object as read; treat as read-only.
    """

    artifact_dir: Path
    schema_version: int
    producer: Producer
    model: ModelInfo
    graphs: dict[str, GraphEntry]
    tokens: dict[str, int]
    routing: dict[str, RoutingEntry]
    embeddings: Embeddings
    tokenizer: TokenizerInfo
    preprocess: Preprocess
    postprocess: Postprocess
    generation: Generation
    chat_template: ChatTemplate
    extra_files: dict[str, FileRef]
    data: dict[str, Any] = field(repr=False, compare=False)

    @property
    def components(self) -> tuple[str, ...]:
        """Components (`contract.COMPONENT_GRAPHS` keys) whose graphs are all present, in contract order."""
        return tuple(c for c, gs in contract.COMPONENT_GRAPHS.items() if all(g in self.graphs for g in gs))

    def token_id(self, token: str) -> int:
        """The id of a special token; a `KeyError` naming the token when it has none."""
        try:
            return self.tokens[token]
        except KeyError:
            raise KeyError(f"special token {token!r} is not in the manifest's token table") from None


# --- the typed manifest from the parser's result ----------------------------------------------------------


def _floats(values: Sequence[float]) -> tuple[float, ...]:
    return tuple(float(v) for v in values)


def _from_core(result: Mapping[str, Any]) -> Manifest:
    """The dataclasses from what the C++ parser returns: the validated document and resolved paths."""
    data, paths = result["data"], result["paths"]

    def tensors(items: list) -> tuple[TensorSpec, ...]:
        return tuple(TensorSpec(t["name"], t["dtype"], tuple(t["shape"])) for t in items)

    def graph(name: str, g: dict) -> GraphEntry:
        where = paths["graphs"][name]
        return GraphEntry(
            name=name,
            file=g["file"],
            path=Path(where["path"]),
            sha256=g["sha256"],
            size_bytes=g["size_bytes"],
            external_data=tuple(Path(p) for p in where["external_data"]),
            inputs=tensors(g["inputs"]),
            outputs=tensors(g["outputs"]),
            opset=g["opset"],
            precision=g["precision"],
            facts=g["facts"],
        )

    model = data["model"]
    emb, tok = data["embeddings"], data["tokenizer"]
    clip, det = data["preprocess"]["clip"], data["preprocess"]["detection"]
    post, gen, chat = data["postprocess"], data["generation"], data["chat_template"]
    floats = ("rope_theta", "rms_norm_eps")
    return Manifest(
        artifact_dir=Path(result["artifact_dir"]),
        schema_version=data["schema_version"],
        producer=Producer(data["producer"]["name"], data["producer"]["version"]),
        model=ModelInfo(**{k: float(v) if k in floats else v for k, v in model.items()}),
        graphs={name: graph(name, g) for name, g in data["graphs"].items()},
        tokens={t: data["tokens"][t] for t in REQUIRED_TOKENS},
        routing={kind: RoutingEntry(kind=kind, **entry) for kind, entry in data["routing"].items()},
        embeddings=Embeddings(
            file=emb["file"],
            path=Path(paths["embeddings"]),
            sha256=emb["sha256"],
            token_table=emb["token_table"],
            query_tables={t: emb["query_tables"][t] for t in QUERY_TABLES},
        ),
        tokenizer=TokenizerInfo(
            file=tok["file"],
            path=Path(paths["tokenizer"]),
            sha256=tok["sha256"],
            legacy=tok["legacy"],
            add_prefix_space=tok["add_prefix_space"],
            sentencepiece=FileRef(
                tok["sentencepiece"]["file"], Path(paths["sentencepiece"]), tok["sentencepiece"]["sha256"]
            ),
        ),
        preprocess=Preprocess(
            clip=ClipPreprocess(
                tile_size=clip["tile_size"],
                max_tiles=clip["max_tiles"],
                patches_per_tile=clip["patches_per_tile"],
                mean=_floats(clip["mean"]),
                std=_floats(clip["std"]),
                resample=clip["resample"],
                candidate_grids=tuple(tuple(g) for g in clip["candidate_grids"]),
            ),
            detection=DetectionPreprocess(
                short_side=det["short_side"],
                max_long_side=det["max_long_side"],
                size_divisibility=det["size_divisibility"],
                mean=_floats(det["mean"]),
                std=_floats(det["std"]),
                resample=det["resample"],
            ),
            diffusion=DiffusionPreprocess(**data["preprocess"]["diffusion"]),
        ),
        postprocess=Postprocess(
            det_top_k=post["det_top_k"],
            det_score_threshold=float(post["det_score_threshold"]),
            nms_iou=None if post["nms_iou"] is None else float(post["nms_iou"]),
            mask_threshold=float(post["mask_threshold"]),
            seg_score_threshold=float(post["seg_score_threshold"]),
            pose_top_k=post["pose_top_k"],
            pose_score_threshold=float(post["pose_score_threshold"]),
        ),
        generation=Generation(
            max_new_tokens=gen["max_new_tokens"],
            bos_id=gen["bos_id"],
            eos_id=gen["eos_id"],
            diffusion_steps=gen["diffusion_steps"],
            guidance_scale=float(gen["guidance_scale"]),
            image_guidance_scale=float(gen["image_guidance_scale"]),
        ),
        chat_template=ChatTemplate(
            system=chat["system"],
            roles=tuple(chat["roles"]),
            sep=chat["sep"],
            sep2=chat["sep2"],
            image_token=chat["image_token"],
            input_markers=tuple(chat["input_markers"]),
        ),
        extra_files={
            name: FileRef(entry["file"], Path(paths["extra_files"][name]), entry["sha256"])
            for name, entry in data["extra_files"].items()
        },
        data=data,
    )


# --- reading -----------------------------------------------------------------------------------------------


def load_manifest(artifact_dir: str | os.PathLike, verify_hashes: bool = True) -> Manifest:
    """Reads and checks an artifact's `manifest.json` (with the C++ parser).

    Args:
        artifact_dir: the artifact folder (or its `manifest.json`).
        verify_hashes: hash every referenced file against its `sha256`. Sizes and presence are always checked;
            turn hashing off only where the artifact was verified before (hashing a 7B `llm.onnx` takes
            seconds).

    Returns:
        The typed manifest; file paths in it are absolute.

    Raises:
        ManifestError: the file is missing, not JSON, or breaks the format; the message names the file and
            the key path.
    """
    return _from_core(_core.load_manifest(str(Path(artifact_dir)), verify_hashes))


def validate_manifest_dict(
    manifest: Mapping[str, Any],
    artifact_dir: str | os.PathLike,
    verify_hashes: bool = True,
    source: str | None = None,
) -> Manifest:
    """Runs the parser's checks on a manifest dict, e.g. one the exporter is about to write.

    Args:
        manifest: the manifest as a JSON-compatible dict.
        artifact_dir: the folder its relative paths are resolved against.
        verify_hashes: as for `load_manifest`.
        source: the name used in messages; defaults to `<artifact_dir>/manifest.json`.

    Returns:
        The typed manifest, as `load_manifest` would return once the dict is written.

    Raises:
        ManifestError: the first fault, naming the key path.
    """
    directory = Path(artifact_dir)
    source = source or str(directory / contract.MANIFEST_FILE)
    # The parser reads the JSON text that will be written, so what is checked is exactly what a reader sees
    # (tuples become lists; NaN is refused here as it would be on reading).
    try:
        text = json.dumps(manifest, allow_nan=False)
    except (TypeError, ValueError) as e:
        raise ManifestError(f"{source}: not JSON-serialisable: {e}") from None
    return _from_core(_core.parse_manifest(text, str(directory), source, verify_hashes))


def load_schema() -> dict:
    """The JSON Schema (draft 2020-12) of this manifest version, shipped as package data."""
    text = resources.files("visionllm_edge").joinpath("schemas", SCHEMA_FILE).read_text(encoding="utf-8")
    return json.loads(text)


# --- building and writing (for the exporter) --------------------------------------------------------------


def file_sha256(path: str | os.PathLike) -> str:
    """The sha256 of a file as 64 lower-case hex digits, read in 1 MiB chunks (graphs can be many GB)."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(_HASH_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def file_entry(artifact_dir: str | os.PathLike, file: str) -> dict[str, str]:
    """`{"file", "sha256"}` for a file already written into the artifact folder (relative `file`)."""
    return {"file": file, "sha256": file_sha256(Path(artifact_dir) / file)}


def tensor_spec(name: str, dtype: str, shape: Sequence[int | str]) -> dict[str, Any]:
    """One `inputs`/`outputs` item."""
    return {"name": name, "dtype": dtype, "shape": list(shape)}


def graph_entry(
    artifact_dir: str | os.PathLike,
    name: str,
    *,
    inputs: Sequence[Mapping[str, Any] | tuple[str, str, Sequence[int | str]]],
    outputs: Sequence[Mapping[str, Any] | tuple[str, str, Sequence[int | str]]],
    opset: int,
    precision: str,
    facts: Mapping[str, Any] | None = None,
    file: str | None = None,
    external_data: Sequence[str] | None = None,
) -> dict[str, Any]:
    """The manifest entry of a graph already written into the artifact folder.

    Args:
        artifact_dir: the artifact folder.
        name: graph name, a key of `contract.GRAPHS`.
        inputs / outputs: tensor specs, as dicts or `(name, dtype, shape)` tuples, names expanded per layer.
        opset / precision / facts: as the manifest records them.
        file: the graph file relative to the folder; defaults to `contract.GRAPHS[name].file`.
        external_data: external-data files relative to the folder; by default `<file>.data` when it exists
            (the name `export_graph` gives it), else none.

    Returns:
        The entry with `sha256` and `size_bytes` computed from the file.
    """
    root = Path(artifact_dir)
    file = file or contract.GRAPHS[name].file
    if external_data is None:
        external_data = [file + ".data"] if (root / (file + ".data")).is_file() else []

    def spec(t):
        return dict(t) if isinstance(t, Mapping) else tensor_spec(*t)

    return {
        "file": file,
        "sha256": file_sha256(root / file),
        "size_bytes": (root / file).stat().st_size,
        "external_data": list(external_data),
        "inputs": [spec(t) for t in inputs],
        "outputs": [spec(t) for t in outputs],
        "opset": opset,
        "precision": precision,
        "facts": dict(facts or {}),
    }


def routing_entries(tokens: Mapping[str, int], queries: Mapping[str, int]) -> dict[str, dict[str, Any]]:
    """The `routing` section from the contract for the kinds in `queries` (kind -> number of query states)."""
    token_of = {kind: token for token, kind in contract.ROUTING_TOKENS.items()}
    return {
        kind: {
            "token": token_of[kind],
            "id": tokens[token_of[kind]],
            "decoder": contract.DECODER_OF_KIND[kind],
            "queries": queries[kind],
            "table": contract.QUERY_TABLE[kind],
        }
        for kind in contract.ROUTING_KINDS
        if kind in queries
    }


def chat_template_entry() -> dict[str, Any]:
    """The `chat_template` section from the contract's `vicuna_v1` constants."""
    return {
        "system": contract.SYSTEM_PROMPT,
        "roles": list(contract.ROLES),
        "sep": contract.SEP,
        "sep2": contract.SEP2,
        "image_token": contract.IMAGE_TOKEN,
        "input_markers": list(contract.INPUT_MARKERS),
    }


def tokenizer_entry(
    artifact_dir: str | os.PathLike,
    *,
    legacy: bool,
    add_prefix_space: bool,
    file: str = contract.TOKENIZER_FILE,
    sentencepiece: str = contract.SENTENCEPIECE_FILE,
) -> dict[str, Any]:
    """The `tokenizer` section for `tokenizer.json` and `tokenizer.model` already written into the folder."""
    return {
        **file_entry(artifact_dir, file),
        "legacy": legacy,
        "add_prefix_space": add_prefix_space,
        "sentencepiece": file_entry(artifact_dir, sentencepiece),
    }


def build_manifest(
    *,
    model: Mapping[str, Any],
    graphs: Mapping[str, Mapping[str, Any]],
    tokens: Mapping[str, int],
    routing: Mapping[str, Mapping[str, Any]],
    embeddings: Mapping[str, Any],
    tokenizer: Mapping[str, Any],
    preprocess: Mapping[str, Any],
    postprocess: Mapping[str, Any],
    generation: Mapping[str, Any],
    chat_template: Mapping[str, Any] | None = None,
    extra_files: Mapping[str, Mapping[str, str]] | None = None,
    producer_version: str | None = None,
) -> dict[str, Any]:
    """Assembles a manifest dict in the canonical key order; checks nothing (see `write_manifest`).

    Args:
        model ... generation: the sections, as the format describes them (`graph_entry`, `file_entry`,
            `tokenizer_entry`, `routing_entries` build the fiddly ones).
        chat_template: defaults to `chat_template_entry()`.
        extra_files: logical name -> `file_entry(...)`; default none.
        producer_version: defaults to this package's version.
    """
    if producer_version is None:
        from visionllm_edge import __version__ as producer_version
    return {
        "schema_version": SCHEMA_VERSION,
        "producer": {"name": PRODUCER_NAME, "version": producer_version},
        "model": dict(model),
        "graphs": {name: dict(entry) for name, entry in graphs.items()},
        "tokens": dict(tokens),
        "routing": {kind: dict(entry) for kind, entry in routing.items()},
        "embeddings": dict(embeddings),
        "tokenizer": dict(tokenizer),
        "preprocess": dict(preprocess),
        "postprocess": dict(postprocess),
        "generation": dict(generation),
        "chat_template": dict(chat_template) if chat_template is not None else chat_template_entry(),
        "extra_files": {name: dict(entry) for name, entry in (extra_files or {}).items()},
    }


def write_manifest(
    manifest: Mapping[str, Any], artifact_dir: str | os.PathLike, verify_hashes: bool = True
) -> Manifest:
    """Validates a manifest dict against the files in `artifact_dir`, then writes `manifest.json` atomically.

    Nothing is written when a check fails, so a folder never holds a manifest the runtime would refuse.

    Returns:
        The typed manifest.

    Raises:
        ManifestError: the dict breaks the format.
    """
    directory = Path(artifact_dir)
    parsed = validate_manifest_dict(manifest, directory, verify_hashes=verify_hashes)
    text = json.dumps(manifest, indent=2, ensure_ascii=False, allow_nan=False) + "\n"
    # Written beside the target and renamed, so a reader never sees half a manifest. A plain open() (not
    # mkstemp, which creates 0600 files) keeps the usual permissions for a file others must read.
    tmp = directory / f".{contract.MANIFEST_FILE}.tmp"
    try:
        tmp.write_text(text, encoding="utf-8")
        os.replace(tmp, directory / contract.MANIFEST_FILE)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return parsed
