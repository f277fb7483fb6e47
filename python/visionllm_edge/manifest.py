"""The artifact manifest (`manifest.json`, DESIGN.md §2): typed form, strict parser, and builders.

The manifest is the contract between the exporter (host, torch) and the runtime (device, no torch). It is
parsed strictly because a silently mis-read artifact fails far from its cause: an engine built from the
wrong file, a routing token that dispatches to the wrong decoder, a tile grid that disagrees with the
reference. Every error is a `ManifestError` whose message names the file and the key path, for example
`out/manifest.json: graphs.llm.sha256: llm.onnx: sha256 mismatch ...`.

The checks live in one place, `_Parser`. `load_manifest` reads `manifest.json` and runs it;
`validate_manifest_dict` runs it on a dict the exporter is about to write. The JSON Schema
(`schemas/manifest.v1.schema.json`, `load_schema()`) describes the same structure as data for outside
tools; the tests prove the two agree. The parser never needs the schema (nor `jsonschema`) at run time,
and never loads ONNX: files are checked for presence, size and sha256 only.

Format, version 1 (`contract.MANIFEST_SCHEMA_VERSION`)::

    schema_version, producer{name, version},
    model{name, hidden_size, num_layers, num_heads, num_kv_heads, head_dim, vocab_size, max_context,
          rope_theta, rms_norm_eps},
    graphs{<contract.GRAPHS name>: {file, sha256, size_bytes, external_data[], inputs[], outputs[], opset,
           precision, facts{}}},                                 # any subset of contract.GRAPHS
    tokens{<26 added tokens, <s>, </s>, <unk>>: id},
    routing{<kind>: {token, id, decoder, queries, table}},        # any subset of contract.ROUTING_KINDS
    embeddings{file, sha256, token_table, query_tables{det, pose, gen, edit}},
    tokenizer{file, sha256, legacy, add_prefix_space},
    preprocess{clip{...}, detection{...}, diffusion{...}}, postprocess{...}, generation{...},
    chat_template{system, roles, sep, sep2, image_token, input_markers},
    extra_files{<logical name>: {file, sha256}}                    # e.g. gen_uncond

`graphs.<name>.size_bytes` is the size of `file` alone; external data files are listed, checked for
presence and confinement, but not hashed (the format carries no hash for them).
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path, PurePosixPath, PureWindowsPath
from typing import Any, NoReturn

from visionllm_edge import contract

# --- constants of the format ------------------------------------------------------------------------------

#: The schema version this visionllm-edge writes and reads.
SCHEMA_VERSION = contract.MANIFEST_SCHEMA_VERSION
#: The oldest schema version this visionllm-edge still reads.
MIN_SCHEMA_VERSION = 1
SCHEMA_FILE = f"manifest.v{SCHEMA_VERSION}.schema.json"
PRODUCER_NAME = "visionllm-edge"

DTYPES: tuple[str, ...] = ("float32", "float16", "int64", "bool", "int32")
PRECISIONS: tuple[str, ...] = ("fp32", "fp16", "int8", "int4")
DECODERS: tuple[str, ...] = ("object", "pose", "gen", "edit")
QUERY_TABLES: tuple[str, ...] = ("det", "pose", "gen", "edit")
#: Every token the `tokens` section must give an id: the added tokens plus the three Llama already has.
REQUIRED_TOKENS: tuple[str, ...] = (*contract.ADDED_TOKENS, contract.BOS_TOKEN, contract.EOS_TOKEN, "<unk>")
#: VAE latents are 1/8 of the image side, so diffusion image sizes must be multiples of this.
VAE_SCALE = 8

_GRAPH_KEYS = (
    "file",
    "sha256",
    "size_bytes",
    "external_data",
    "inputs",
    "outputs",
    "opset",
    "precision",
    "facts",
)
_SHA256_RE = re.compile(r"[0-9a-f]{64}")
_IDENT_RE = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
_LOGICAL_NAME_RE = re.compile(r"[A-Za-z0-9_.-]+")
_HASH_CHUNK = 1 << 20


class ManifestError(ValueError):
    """An artifact manifest that cannot be used; the message names the file and the key path."""


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
    """`tokenizer.json` and the two flags that change how Llama's SentencePiece text is split."""

    file: str
    path: Path
    sha256: str
    legacy: bool
    add_prefix_space: bool


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


# --- key paths and value descriptions, for messages ---------------------------------------------------------


def _child(path: str, key: str | int) -> str:
    if isinstance(key, int):
        return f"{path}[{key}]"
    if not _IDENT_RE.fullmatch(key):
        return f"{path}[{json.dumps(key)}]"
    return f"{path}.{key}" if path else key


def _describe(value: Any) -> str:
    kind = {
        bool: "a boolean",
        int: "an integer",
        float: "a number",
        str: "a string",
        list: "an array",
        dict: "an object",
        type(None): "null",
    }.get(type(value), type(value).__name__)
    if isinstance(value, (dict, list)):
        return kind
    text = json.dumps(value)
    return kind if value is None else f"{text if len(text) <= 40 else text[:37] + '...'} ({kind})"


def _short(names: Sequence[str], limit: int = 6) -> str:
    shown = ", ".join(repr(n) for n in names[:limit])
    more = f", ... {len(names) - limit} more" if len(names) > limit else ""
    return f"[{shown}{more}]"


def _expanded(templates: Iterable[str], num_layers: int) -> list[str]:
    return [name for t in templates for name in contract.layer_names(t, num_layers)]


# --- the parser: every check, in one place ------------------------------------------------------------------


class _Parser:
    """Checks a manifest dict and builds the typed `Manifest`; the first fault raises."""

    def __init__(self, source: str, artifact_dir: Path, verify_hashes: bool):
        self.source = source
        self.root = artifact_dir.resolve()
        self.verify_hashes = verify_hashes

    def fail(self, path: str, message: str) -> NoReturn:
        where = f"{path}: " if path else ""
        raise ManifestError(f"{self.source}: {where}{message}")

    # -- typed readers ----------------------------------------------------------------------------------

    def obj(self, value: Any, path: str, required: Iterable[str]) -> dict:
        """An object with exactly these keys: unknown keys and missing keys are errors."""
        if not isinstance(value, dict):
            self.fail(path, f"expected an object, got {_describe(value)}")
        required = tuple(required)
        allowed = set(required)
        for key in value:
            if key not in allowed:
                self.fail(_child(path, key), f"unknown key (allowed here: {', '.join(sorted(allowed))})")
        for key in required:
            if key not in value:
                self.fail(_child(path, key), "missing required key")
        return value

    def integer(self, value: Any, path: str, minimum: int | None = None) -> int:
        # bool is a subclass of int in Python but never a valid count or id in the manifest.
        if type(value) is not int:
            self.fail(path, f"expected an integer, got {_describe(value)}")
        if minimum is not None and value < minimum:
            self.fail(path, f"must be >= {minimum}, got {value}")
        return value

    def number(
        self,
        value: Any,
        path: str,
        minimum: float | None = None,
        maximum: float | None = None,
        positive: bool = False,
    ) -> float:
        if type(value) not in (int, float):
            self.fail(path, f"expected a number, got {_describe(value)}")
        value = float(value)
        if not math.isfinite(value):
            self.fail(path, f"must be finite, got {value}")
        if positive and value <= 0:
            self.fail(path, f"must be > 0, got {value}")
        if minimum is not None and value < minimum:
            self.fail(path, f"must be >= {minimum}, got {value}")
        if maximum is not None and value > maximum:
            self.fail(path, f"must be <= {maximum}, got {value}")
        return value

    def string(
        self, value: Any, path: str, nonempty: bool = False, choices: Sequence[str] | None = None
    ) -> str:
        if not isinstance(value, str):
            self.fail(path, f"expected a string, got {_describe(value)}")
        if nonempty and not value:
            self.fail(path, "must not be empty")
        if choices is not None and value not in choices:
            self.fail(path, f"must be one of {', '.join(choices)}; got {value!r}")
        return value

    def boolean(self, value: Any, path: str) -> bool:
        if not isinstance(value, bool):
            self.fail(path, f"expected a boolean, got {_describe(value)}")
        return value

    def array(self, value: Any, path: str, length: int | None = None, min_length: int = 0) -> list:
        if not isinstance(value, list):
            self.fail(path, f"expected an array, got {_describe(value)}")
        if length is not None and len(value) != length:
            self.fail(path, f"expected {length} items, got {len(value)}")
        if len(value) < min_length:
            self.fail(path, f"expected at least {min_length} item(s), got {len(value)}")
        return value

    def sha256(self, value: Any, path: str) -> str:
        text = self.string(value, path)
        if not _SHA256_RE.fullmatch(text):
            self.fail(path, f"expected 64 lower-case hex digits, got {_describe(value)}")
        return text

    def triple(self, value: Any, path: str, positive: bool = False) -> tuple[float, float, float]:
        items = self.array(value, path, length=3)
        return tuple(self.number(v, _child(path, i), positive=positive) for i, v in enumerate(items))

    # -- files ------------------------------------------------------------------------------------------

    def file(self, value: Any, path: str) -> Path:
        """A relative path that stays inside the artifact folder and names an existing regular file."""
        text = self.string(value, path, nonempty=True)
        if text.startswith("/") or "\\" in text or PureWindowsPath(text).drive:
            self.fail(path, f"{text!r} is not a relative '/'-separated path inside the artifact folder")
        if ".." in PurePosixPath(text).parts:
            self.fail(path, f"{text!r} leaves the artifact folder ('..')")
        full = self.root / text
        resolved = full.resolve()
        # A symlink may point anywhere; the artifact must be self-contained so it can be copied whole.
        if not resolved.is_relative_to(self.root):
            self.fail(path, f"{text!r} resolves outside the artifact folder (to {resolved})")
        if not resolved.exists():
            self.fail(path, f"{text!r}: file not found (looked for {full})")
        if not resolved.is_file():
            self.fail(path, f"{text!r} is not a regular file")
        return resolved

    def hashed_file(self, node: dict, path: str) -> tuple[str, Path, str]:
        """Reads `file`, `sha256` (and `size_bytes` where present) of `node` and checks them against the file.

        The size is checked even without hashing, and before it: it is free and names the likely cause (a
        truncated copy) more precisely than a hash mismatch.
        """
        resolved = self.file(node["file"], _child(path, "file"))
        digest = self.sha256(node["sha256"], _child(path, "sha256"))
        if "size_bytes" in node:
            size = self.integer(node["size_bytes"], _child(path, "size_bytes"), minimum=0)
            actual_size = resolved.stat().st_size
            if actual_size != size:
                self.fail(
                    _child(path, "size_bytes"),
                    f"{node['file']} is {actual_size} bytes, the manifest says {size} "
                    "(truncated or replaced file)",
                )
        if self.verify_hashes:
            actual = file_sha256(resolved)
            if actual != digest:
                self.fail(
                    _child(path, "sha256"),
                    f"{node['file']}: sha256 mismatch: the manifest says {digest}, the file has {actual} "
                    "(the file changed after export, or the copy is incomplete)",
                )
        return node["file"], resolved, digest

    # -- sections ---------------------------------------------------------------------------------------

    def check_version(self, data: Any) -> int:
        # Checked before anything else: a newer manifest will also have keys this version does not know,
        # and "unknown key" would hide the real fix (upgrade visionllm-edge).
        if not isinstance(data, dict):
            self.fail("", f"the manifest must be a JSON object, got {_describe(data)}")
        if "schema_version" not in data:
            self.fail("schema_version", "missing required key")
        version = self.integer(data["schema_version"], "schema_version")
        if MIN_SCHEMA_VERSION <= version <= SCHEMA_VERSION:
            return version
        from visionllm_edge import __version__  # at call time: the package may import this module

        readable = (
            f"schema_version {SCHEMA_VERSION}"
            if MIN_SCHEMA_VERSION == SCHEMA_VERSION
            else f"schema_version {MIN_SCHEMA_VERSION} to {SCHEMA_VERSION}"
        )
        if version > SCHEMA_VERSION:
            producer = data.get("producer")
            by = ""
            if isinstance(producer, dict) and isinstance(producer.get("version"), str):
                by = f" {producer['version']}"
            self.fail(
                "schema_version",
                f"the artifact was written by a newer visionllm-edge{by} (schema_version {version}); this "
                f"visionllm-edge {__version__} reads {readable}: upgrade visionllm-edge, or re-export the "
                "artifact with this one",
            )
        self.fail(
            "schema_version",
            f"schema_version {version} is older than this visionllm-edge {__version__} reads ({readable}): "
            "re-export the artifact with this version",
        )

    def parse(self, data: Any) -> Manifest:
        version = self.check_version(data)
        self.obj(
            data,
            "",
            (
                "schema_version",
                "producer",
                "model",
                "graphs",
                "tokens",
                "routing",
                "embeddings",
                "tokenizer",
                "preprocess",
                "postprocess",
                "generation",
                "chat_template",
                "extra_files",
            ),
        )
        producer = self.producer(data["producer"], "producer")
        model = self.model(data["model"], "model")
        tokens = self.tokens(data["tokens"], "tokens", model)
        graphs = self.graphs(data["graphs"], "graphs", model)
        routing = self.routing(data["routing"], "routing", tokens)
        embeddings = self.embeddings(data["embeddings"], "embeddings")
        tokenizer = self.tokenizer(data["tokenizer"], "tokenizer")
        preprocess = self.preprocess(data["preprocess"], "preprocess")
        postprocess = self.postprocess(data["postprocess"], "postprocess")
        generation = self.generation(data["generation"], "generation", tokens, model)
        chat_template = self.chat_template(data["chat_template"], "chat_template", tokens)
        extra_files = self.extra_files(data["extra_files"], "extra_files")
        return Manifest(
            artifact_dir=self.root,
            schema_version=version,
            producer=producer,
            model=model,
            graphs=graphs,
            tokens=tokens,
            routing=routing,
            embeddings=embeddings,
            tokenizer=tokenizer,
            preprocess=preprocess,
            postprocess=postprocess,
            generation=generation,
            chat_template=chat_template,
            extra_files=extra_files,
            data=data,
        )

    def producer(self, node: Any, path: str) -> Producer:
        self.obj(node, path, ("name", "version"))
        name = self.string(node["name"], _child(path, "name"), choices=(PRODUCER_NAME,))
        return Producer(name, self.string(node["version"], _child(path, "version"), nonempty=True))

    def model(self, node: Any, path: str) -> ModelInfo:
        ints = (
            "hidden_size",
            "num_layers",
            "num_heads",
            "num_kv_heads",
            "head_dim",
            "vocab_size",
            "max_context",
        )
        floats = ("rope_theta", "rms_norm_eps")
        self.obj(node, path, ("name", *ints, *floats))
        values: dict[str, Any] = {"name": self.string(node["name"], _child(path, "name"), nonempty=True)}
        values.update({k: self.integer(node[k], _child(path, k), minimum=1) for k in ints})
        values.update({k: self.number(node[k], _child(path, k), positive=True) for k in floats})
        if values["num_heads"] % values["num_kv_heads"]:
            self.fail(
                _child(path, "num_kv_heads"),
                f"{values['num_kv_heads']} does not divide num_heads {values['num_heads']} (grouped-query "
                "attention shares each KV head among a whole number of query heads)",
            )
        return ModelInfo(**values)

    def tokens(self, node: Any, path: str, model: ModelInfo) -> dict[str, int]:
        self.obj(node, path, REQUIRED_TOKENS)
        owner: dict[int, str] = {}
        for token in REQUIRED_TOKENS:
            key = _child(path, token)
            tid = self.integer(node[token], key, minimum=0)
            if tid >= model.vocab_size:
                self.fail(key, f"id {tid} is not below model.vocab_size {model.vocab_size}")
            if tid in owner:
                self.fail(key, f"id {tid} is also the id of {owner[tid]!r}; special-token ids must be unique")
            owner[tid] = token
        return {token: node[token] for token in REQUIRED_TOKENS}

    def tensors(self, node: Any, path: str) -> tuple[TensorSpec, ...]:
        specs = []
        for i, item in enumerate(self.array(node, path)):
            at = _child(path, i)
            self.obj(item, at, ("name", "dtype", "shape"))
            name = self.string(item["name"], _child(at, "name"), nonempty=True)
            dtype = self.string(item["dtype"], _child(at, "dtype"), choices=DTYPES)
            shape = []
            for j, dim in enumerate(self.array(item["shape"], _child(at, "shape"))):
                dim_at = _child(_child(at, "shape"), j)
                if isinstance(dim, str):
                    shape.append(self.string(dim, dim_at, nonempty=True))
                elif type(dim) is int:
                    shape.append(self.integer(dim, dim_at, minimum=0))
                else:
                    self.fail(
                        dim_at,
                        f"expected an integer or a symbol (string) as a dimension, got {_describe(dim)}",
                    )
            specs.append(TensorSpec(name, dtype, tuple(shape)))
        return tuple(specs)

    def io_names(self, specs: tuple[TensorSpec, ...], path: str, expected: list[str], graph: str, what: str):
        names = [s.name for s in specs]
        seen: set[str] = set()
        for i, name in enumerate(names):
            if name in seen:
                self.fail(_child(_child(path, i), "name"), f"duplicate {what} name {name!r}")
            seen.add(name)
        # Compared as sets: the runtime binds graph I/O by name, so the order is the exporter's business.
        missing = [n for n in expected if n not in seen]
        unexpected = [n for n in names if n not in set(expected)]
        if missing or unexpected:
            parts = []
            if missing:
                parts.append(f"missing {_short(missing)}")
            if unexpected:
                parts.append(f"unexpected {_short(unexpected)}")
            self.fail(path, f"{what} names differ from contract.GRAPHS[{graph!r}]: {'; '.join(parts)}")

    def graphs(self, node: Any, path: str, model: ModelInfo) -> dict[str, GraphEntry]:
        if not isinstance(node, dict):
            self.fail(path, f"expected an object, got {_describe(node)}")
        out = {}
        for name, entry in node.items():
            at = _child(path, name)
            if name not in contract.GRAPHS:
                self.fail(at, f"unknown graph {name!r}; contract.GRAPHS has: {', '.join(contract.GRAPHS)}")
            self.obj(entry, at, _GRAPH_KEYS)
            file, resolved, digest = self.hashed_file(entry, at)
            size = entry["size_bytes"]
            ext_at = _child(at, "external_data")
            external = tuple(
                self.file(v, _child(ext_at, i))
                for i, v in enumerate(self.array(entry["external_data"], ext_at))
            )
            inputs = self.tensors(entry["inputs"], _child(at, "inputs"))
            outputs = self.tensors(entry["outputs"], _child(at, "outputs"))
            names = contract.GRAPHS[name]
            self.io_names(
                inputs, _child(at, "inputs"), _expanded(names.inputs, model.num_layers), name, "input"
            )
            self.io_names(
                outputs, _child(at, "outputs"), _expanded(names.outputs, model.num_layers), name, "output"
            )
            opset = self.integer(entry["opset"], _child(at, "opset"), minimum=1)
            precision = self.string(entry["precision"], _child(at, "precision"), choices=PRECISIONS)
            facts = entry["facts"]
            if not isinstance(facts, dict):
                self.fail(_child(at, "facts"), f"expected an object, got {_describe(facts)}")
            out[name] = GraphEntry(
                name, file, resolved, digest, size, external, inputs, outputs, opset, precision, facts
            )
        return out

    def routing(self, node: Any, path: str, tokens: dict[str, int]) -> dict[str, RoutingEntry]:
        if not isinstance(node, dict):
            self.fail(path, f"expected an object, got {_describe(node)}")
        token_of = {kind: token for token, kind in contract.ROUTING_TOKENS.items()}
        out: dict[str, RoutingEntry] = {}
        for kind, entry in node.items():
            at = _child(path, kind)
            if kind not in token_of:
                self.fail(at, f"unknown routing kind {kind!r}; known: {', '.join(contract.ROUTING_KINDS)}")
            self.obj(entry, at, ("token", "id", "decoder", "queries", "table"))
            token = self.string(entry["token"], _child(at, "token"))
            if token != token_of[kind]:
                self.fail(
                    _child(at, "token"), f"kind {kind!r} is routed by {token_of[kind]!r}, got {token!r}"
                )
            tid = self.integer(entry["id"], _child(at, "id"), minimum=0)
            if tid != tokens[token]:
                self.fail(_child(at, "id"), f"{tid} is not the id of {token!r} in tokens ({tokens[token]})")
            decoder = self.string(entry["decoder"], _child(at, "decoder"), choices=DECODERS)
            if decoder != contract.DECODER_OF_KIND[kind]:
                self.fail(
                    _child(at, "decoder"),
                    f"kind {kind!r} goes to the {contract.DECODER_OF_KIND[kind]!r} decoder, got {decoder!r}",
                )
            queries = self.integer(entry["queries"], _child(at, "queries"), minimum=1)
            # Perception groups use distinct placeholders [EMB], [EMB2], ...; only generation repeats one.
            if kind not in contract.GENERATION_KINDS and queries > len(contract.ALL_PLACEHOLDERS):
                self.fail(
                    _child(at, "queries"),
                    f"{queries} exceeds the {len(contract.ALL_PLACEHOLDERS)} "
                    "placeholder tokens a perception group can use",
                )
            table = self.string(entry["table"], _child(at, "table"), choices=QUERY_TABLES)
            if table != contract.QUERY_TABLE[kind]:
                self.fail(
                    _child(at, "table"),
                    f"kind {kind!r} reads query table {contract.QUERY_TABLE[kind]!r}, got {table!r}",
                )
            out[kind] = RoutingEntry(kind, token, tid, decoder, queries, table)
        # Kinds that share a query table ([DET], [GRD], [SEG]) read the same rows, so the same count.
        first_of_table: dict[str, RoutingEntry] = {}
        for kind, entry in out.items():
            other = first_of_table.setdefault(entry.table, entry)
            if other.queries != entry.queries:
                self.fail(
                    _child(_child(path, kind), "queries"),
                    f"{entry.queries} differs from routing.{other.kind}.queries {other.queries}, which "
                    f"reads the same query table {entry.table!r}",
                )
        return out

    def embeddings(self, node: Any, path: str) -> Embeddings:
        self.obj(node, path, ("file", "sha256", "token_table", "query_tables"))
        file, resolved, digest = self.hashed_file(node, path)
        token_table = self.string(node["token_table"], _child(path, "token_table"), nonempty=True)
        tables_at = _child(path, "query_tables")
        self.obj(node["query_tables"], tables_at, QUERY_TABLES)
        tables = {
            t: self.string(node["query_tables"][t], _child(tables_at, t), nonempty=True) for t in QUERY_TABLES
        }
        return Embeddings(file, resolved, digest, token_table, tables)

    def tokenizer(self, node: Any, path: str) -> TokenizerInfo:
        self.obj(node, path, ("file", "sha256", "legacy", "add_prefix_space"))
        file, resolved, digest = self.hashed_file(node, path)
        legacy = self.boolean(node["legacy"], _child(path, "legacy"))
        prefix = self.boolean(node["add_prefix_space"], _child(path, "add_prefix_space"))
        return TokenizerInfo(file, resolved, digest, legacy, prefix)

    def preprocess(self, node: Any, path: str) -> Preprocess:
        self.obj(node, path, ("clip", "detection", "diffusion"))

        at = _child(path, "clip")
        clip = self.obj(
            node["clip"],
            at,
            ("tile_size", "max_tiles", "patches_per_tile", "mean", "std", "resample", "candidate_grids"),
        )
        max_tiles = self.integer(clip["max_tiles"], _child(at, "max_tiles"), minimum=1)
        grids_at = _child(at, "candidate_grids")
        grids: list[tuple[int, int]] = []
        for i, grid in enumerate(self.array(clip["candidate_grids"], grids_at, min_length=1)):
            g_at = _child(grids_at, i)
            cols, rows = (
                self.integer(v, _child(g_at, j), minimum=1)
                for j, v in enumerate(self.array(grid, g_at, length=2))
            )
            if cols * rows > max_tiles:
                self.fail(g_at, f"grid {cols}x{rows} has more tiles than max_tiles {max_tiles}")
            if (cols, rows) in grids:
                self.fail(g_at, f"grid {cols}x{rows} is listed twice")
            grids.append((cols, rows))
        clip_pre = ClipPreprocess(
            tile_size=self.integer(clip["tile_size"], _child(at, "tile_size"), minimum=1),
            max_tiles=max_tiles,
            patches_per_tile=self.integer(
                clip["patches_per_tile"], _child(at, "patches_per_tile"), minimum=1
            ),
            mean=self.triple(clip["mean"], _child(at, "mean")),
            std=self.triple(clip["std"], _child(at, "std"), positive=True),
            resample=self.string(clip["resample"], _child(at, "resample"), choices=("bicubic",)),
            candidate_grids=tuple(grids),
        )

        at = _child(path, "detection")
        det = self.obj(
            node["detection"],
            at,
            ("short_side", "max_long_side", "size_divisibility", "mean", "std", "resample"),
        )
        short = self.integer(det["short_side"], _child(at, "short_side"), minimum=1)
        long = self.integer(det["max_long_side"], _child(at, "max_long_side"), minimum=1)
        if long < short:
            self.fail(_child(at, "max_long_side"), f"{long} is below short_side {short}")
        det_pre = DetectionPreprocess(
            short_side=short,
            max_long_side=long,
            size_divisibility=self.integer(
                det["size_divisibility"], _child(at, "size_divisibility"), minimum=1
            ),
            mean=self.triple(det["mean"], _child(at, "mean")),
            std=self.triple(det["std"], _child(at, "std"), positive=True),
            resample=self.string(det["resample"], _child(at, "resample"), choices=("bilinear",)),
        )

        at = _child(path, "diffusion")
        diff = self.obj(node["diffusion"], at, ("gen_image_size", "edit_image_size"))
        sizes = {}
        for key in ("gen_image_size", "edit_image_size"):
            sizes[key] = self.integer(diff[key], _child(at, key), minimum=1)
            if sizes[key] % VAE_SCALE:
                self.fail(_child(at, key), f"{sizes[key]} is not a multiple of {VAE_SCALE} (the VAE's scale)")
        return Preprocess(clip_pre, det_pre, DiffusionPreprocess(**sizes))

    def postprocess(self, node: Any, path: str) -> Postprocess:
        self.obj(
            node,
            path,
            (
                "det_top_k",
                "det_score_threshold",
                "nms_iou",
                "mask_threshold",
                "seg_score_threshold",
                "pose_top_k",
                "pose_score_threshold",
            ),
        )

        def unit(key: str) -> float:
            return self.number(node[key], _child(path, key), minimum=0.0, maximum=1.0)

        nms = node["nms_iou"]
        if nms is not None:
            nms = self.number(nms, _child(path, "nms_iou"), positive=True, maximum=1.0)
        return Postprocess(
            det_top_k=self.integer(node["det_top_k"], _child(path, "det_top_k"), minimum=1),
            det_score_threshold=unit("det_score_threshold"),
            nms_iou=nms,
            mask_threshold=unit("mask_threshold"),
            seg_score_threshold=unit("seg_score_threshold"),
            pose_top_k=self.integer(node["pose_top_k"], _child(path, "pose_top_k"), minimum=1),
            pose_score_threshold=unit("pose_score_threshold"),
        )

    def generation(self, node: Any, path: str, tokens: dict[str, int], model: ModelInfo) -> Generation:
        self.obj(
            node,
            path,
            (
                "max_new_tokens",
                "bos_id",
                "eos_id",
                "diffusion_steps",
                "guidance_scale",
                "image_guidance_scale",
            ),
        )
        max_new = self.integer(node["max_new_tokens"], _child(path, "max_new_tokens"), minimum=1)
        if max_new > model.max_context:
            self.fail(
                _child(path, "max_new_tokens"), f"{max_new} exceeds model.max_context {model.max_context}"
            )
        ids = {}
        for key, token in (("bos_id", contract.BOS_TOKEN), ("eos_id", contract.EOS_TOKEN)):
            ids[key] = self.integer(node[key], _child(path, key), minimum=0)
            if ids[key] != tokens[token]:
                self.fail(
                    _child(path, key), f"{ids[key]} is not the id of {token!r} in tokens ({tokens[token]})"
                )
        return Generation(
            max_new_tokens=max_new,
            diffusion_steps=self.integer(node["diffusion_steps"], _child(path, "diffusion_steps"), minimum=1),
            guidance_scale=self.number(node["guidance_scale"], _child(path, "guidance_scale"), minimum=0.0),
            image_guidance_scale=self.number(
                node["image_guidance_scale"], _child(path, "image_guidance_scale"), minimum=0.0
            ),
            **ids,
        )

    def chat_template(self, node: Any, path: str, tokens: dict[str, int]) -> ChatTemplate:
        self.obj(node, path, ("system", "roles", "sep", "sep2", "image_token", "input_markers"))
        roles_at = _child(path, "roles")
        roles = tuple(
            self.string(r, _child(roles_at, i), nonempty=True)
            for i, r in enumerate(self.array(node["roles"], roles_at, length=2))
        )
        image_token = self.string(node["image_token"], _child(path, "image_token"), nonempty=True)
        if image_token not in tokens:
            self.fail(_child(path, "image_token"), f"{image_token!r} is not a token of the tokens table")
        markers_at = _child(path, "input_markers")
        markers: list[str] = []
        for i, marker in enumerate(self.array(node["input_markers"], markers_at)):
            marker = self.string(marker, _child(markers_at, i), nonempty=True)
            if marker not in tokens:
                self.fail(_child(markers_at, i), f"{marker!r} is not a token of the tokens table")
            if marker in markers:
                self.fail(_child(markers_at, i), f"{marker!r} is listed twice")
            markers.append(marker)
        if image_token not in markers:
            self.fail(markers_at, f"must include image_token {image_token!r}")
        return ChatTemplate(
            system=self.string(node["system"], _child(path, "system")),
            roles=roles,
            sep=self.string(node["sep"], _child(path, "sep")),
            sep2=self.string(node["sep2"], _child(path, "sep2")),
            image_token=image_token,
            input_markers=tuple(markers),
        )

    def extra_files(self, node: Any, path: str) -> dict[str, FileRef]:
        if not isinstance(node, dict):
            self.fail(path, f"expected an object, got {_describe(node)}")
        out = {}
        for name, entry in node.items():
            at = _child(path, name)
            if not _LOGICAL_NAME_RE.fullmatch(name):
                self.fail(at, f"logical name {name!r} must match {_LOGICAL_NAME_RE.pattern}")
            self.obj(entry, at, ("file", "sha256"))
            out[name] = FileRef(*self.hashed_file(entry, at))
        return out


# --- reading -----------------------------------------------------------------------------------------------


def _reject_duplicates(pairs: list[tuple[str, Any]]) -> dict:
    out: dict[str, Any] = {}
    for key, value in pairs:
        if key in out:
            # Python's json keeps the last value silently; a repeated key is almost always a merge mistake.
            raise _DuplicateKey(key)
        out[key] = value
    return out


class _DuplicateKey(Exception):
    pass


def _reject_constant(name: str) -> Any:
    raise _NonFinite(name)


class _NonFinite(Exception):
    pass


def _resolve_artifact(artifact_dir: str | os.PathLike) -> tuple[Path, Path]:
    path = Path(artifact_dir)
    if path.is_file() and path.name == contract.MANIFEST_FILE:
        path = path.parent
    return path, path / contract.MANIFEST_FILE


def load_manifest(artifact_dir: str | os.PathLike, verify_hashes: bool = True) -> Manifest:
    """Reads and checks an artifact's `manifest.json`.

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
    directory, manifest_path = _resolve_artifact(artifact_dir)
    source = str(manifest_path)
    if not directory.is_dir():
        raise ManifestError(f"{source}: the artifact folder {directory} does not exist")
    try:
        text = manifest_path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ManifestError(f"{source}: not found; is {directory} an exported artifact?") from None
    except UnicodeDecodeError as e:
        raise ManifestError(f"{source}: not UTF-8 text ({e.reason} at byte {e.start})") from None
    except OSError as e:
        raise ManifestError(f"{source}: cannot read ({type(e).__name__}: {e})") from None
    try:
        data = json.loads(text, object_pairs_hook=_reject_duplicates, parse_constant=_reject_constant)
    except json.JSONDecodeError as e:
        raise ManifestError(f"{source}: invalid JSON at line {e.lineno}, column {e.colno}: {e.msg}") from None
    except _DuplicateKey as e:
        raise ManifestError(
            f"{source}: invalid JSON: key {e.args[0]!r} appears twice in one object"
        ) from None
    except _NonFinite as e:
        raise ManifestError(f"{source}: invalid JSON: {e.args[0]} is not a JSON number") from None
    return _Parser(source, directory, verify_hashes).parse(data)


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
    # A JSON round trip so that what is checked is exactly what will be written (tuples become lists,
    # NaN is refused as it would be on reading).
    try:
        data = json.loads(json.dumps(manifest, allow_nan=False))
    except (TypeError, ValueError) as e:
        raise ManifestError(f"{source}: not JSON-serialisable: {e}") from None
    return _Parser(source, directory, verify_hashes).parse(data)


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
            `routing_entries` build the fiddly ones).
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
