"""The artifact manifest: the strict parser (the C++ core's, through `_core`), the JSON Schema, and that
the two agree.

A small fake artifact (a few bytes per file; the parser never loads ONNX) is built with the same helpers
the exporter uses, then corrupted one fault at a time. Each fault must be refused by the C++ parser with a
message naming the file and the key path; structural faults must be refused by the schema too, and the
cross-field faults only the parser can see must pass the schema (so the split stays deliberate). The C++
contract table the parser checks against must equal `contract.py`.
"""

from __future__ import annotations

import copy
import json
import os
import re
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest
from jsonschema import Draft202012Validator
from visionllm_edge import __version__, _core, contract
from visionllm_edge import manifest as manifest_module
from visionllm_edge.manifest import (
    DTYPES,
    PRECISIONS,
    REQUIRED_TOKENS,
    SCHEMA_FILE,
    ManifestError,
    build_manifest,
    file_entry,
    file_sha256,
    graph_entry,
    load_manifest,
    load_schema,
    routing_entries,
    tokenizer_entry,
    validate_manifest_dict,
    write_manifest,
)

NUM_LAYERS = 2
VOCAB = 32026
QUERIES = {"det": 4, "grd": 4, "seg": 4, "pose": 4, "gen": 64, "edit": 64}


def _child(path: str, key: str | int) -> str:
    """The key-path format the parser's messages use: `a.b`, `a[0]`, `tokens["<unk>"]`."""
    if isinstance(key, int):
        return f"{path}[{key}]"
    if not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", key):
        return f"{path}[{json.dumps(key)}]"
    return f"{path}.{key}" if path else key


# --- the fake artifact --------------------------------------------------------------------------------------


def _tokens() -> dict[str, int]:
    tokens = {t: 32000 + i for i, t in enumerate(contract.ADDED_TOKENS)}
    tokens.update({"<unk>": 0, "<s>": 1, "</s>": 2})
    return tokens


def _io(names: list[str], symbol: str) -> list[tuple[str, str, list]]:
    return [(n, "int64" if "position" in n or "rows" in n else "float32", [symbol, 4, 8]) for n in names]


def _make_artifact(root: Path) -> dict:
    """Writes dummy files into `root` and returns a valid manifest dict for them."""
    root.mkdir(parents=True, exist_ok=True)
    graphs = {}
    for i, (name, names) in enumerate(contract.GRAPHS.items()):
        (root / names.file).write_bytes(f"dummy onnx {name}".encode() * (i + 1))
        if name == "llm":
            (root / "llm.onnx.data").write_bytes(b"\0" * 64)
        ins = [n for t in names.inputs for n in contract.layer_names(t, NUM_LAYERS)]
        outs = [n for t in names.outputs for n in contract.layer_names(t, NUM_LAYERS)]
        graphs[name] = graph_entry(
            root,
            name,
            inputs=_io(ins, "S"),
            outputs=_io(outs, "R"),
            opset=17,
            precision="fp32",
            facts={"buckets": [1, 2], "nested": {"anything": None}},
        )
    (root / contract.EMBEDDINGS_FILE).write_bytes(b"embeddings")
    (root / contract.TOKENIZER_FILE).write_bytes(b'{"model": {}}')
    (root / contract.SENTENCEPIECE_FILE).write_bytes(b"sentencepiece model")
    (root / "gen_uncond.safetensors").write_bytes(b"uncond")
    tokens = _tokens()
    return build_manifest(
        model={
            "name": "tiny-random",
            "hidden_size": 64,
            "num_layers": NUM_LAYERS,
            "num_heads": 4,
            "num_kv_heads": 2,
            "head_dim": 16,
            "vocab_size": VOCAB,
            "max_context": 512,
            "rope_theta": 10000.0,
            "rms_norm_eps": 1e-5,
        },
        graphs=graphs,
        tokens=tokens,
        routing=routing_entries(tokens, QUERIES),
        embeddings={
            **file_entry(root, contract.EMBEDDINGS_FILE),
            "token_table": "tok_embeddings",
            "query_tables": {t: f"emb_embeddings_{t}" for t in ("det", "pose", "gen", "edit")},
        },
        tokenizer=tokenizer_entry(root, legacy=False, add_prefix_space=False),
        preprocess={
            "clip": {
                "tile_size": 336,
                "max_tiles": 4,
                "patches_per_tile": 576,
                "mean": [0.48145466, 0.4578275, 0.40821073],
                "std": [0.26862954, 0.26130258, 0.27577711],
                "resample": "bicubic",
                "candidate_grids": [list(g) for g in contract.anyres_candidates(4)],
            },
            "detection": {
                "short_side": 800,
                "max_long_side": 1333,
                "size_divisibility": 32,
                "mean": [0.485, 0.456, 0.406],
                "std": [0.229, 0.224, 0.225],
                "resample": "bilinear",
            },
            "diffusion": {"gen_image_size": 512, "edit_image_size": 256},
        },
        postprocess={
            "det_top_k": 100,
            "det_score_threshold": 0.3,
            "nms_iou": 0.7,
            "mask_threshold": 0.5,
            "seg_score_threshold": 0.3,
            "pose_top_k": 20,
            "pose_score_threshold": 0.2,
        },
        generation={
            "max_new_tokens": 64,
            "bos_id": 1,
            "eos_id": 2,
            "diffusion_steps": 50,
            "guidance_scale": 7.5,
            "image_guidance_scale": 1.5,
        },
        extra_files={"gen_uncond": file_entry(root, "gen_uncond.safetensors")},
        producer_version="9.9.9",
    )


@pytest.fixture(scope="module")
def schema() -> Draft202012Validator:
    raw = load_schema()
    Draft202012Validator.check_schema(raw)
    return Draft202012Validator(raw)


@pytest.fixture
def artifact(tmp_path) -> tuple[Path, dict]:
    root = tmp_path / "artifact"
    return root, _make_artifact(root)


def _write_raw(root: Path, data) -> None:
    # Bypasses write_manifest, which would refuse the corrupted dicts these tests need on disk.
    (root / contract.MANIFEST_FILE).write_text(json.dumps(data, indent=2))


# --- the valid artifact -----------------------------------------------------------------------------------


def test_valid_manifest_round_trips_and_validates_with_the_schema(artifact, schema):
    root, data = artifact
    schema.validate(data)
    written = write_manifest(data, root)
    assert json.loads((root / contract.MANIFEST_FILE).read_text()) == data
    m = load_manifest(root)
    assert m == written
    assert m.schema_version == contract.MANIFEST_SCHEMA_VERSION
    assert m.artifact_dir == root.resolve()
    llm = m.graphs["llm"]
    assert llm.path.is_absolute() and llm.path == (root / "llm.onnx").resolve()
    assert llm.external_data == ((root / "llm.onnx.data").resolve(),)
    assert (
        llm.sha256 == file_sha256(root / "llm.onnx") and llm.size_bytes == (root / "llm.onnx").stat().st_size
    )
    assert "past_value.1" in llm.input_names and "present_key.0" in llm.output_names
    assert llm.facts == {"buckets": [1, 2], "nested": {"anything": None}}
    assert m.graphs["det"].external_data == ()
    assert m.components == tuple(contract.COMPONENT_GRAPHS)
    assert m.routing["seg"].decoder == "object" and m.routing["seg"].table == "det"
    assert m.routing["gen"].id == m.token_id("[GEN]") == 32016
    assert m.preprocess.clip.candidate_grids == tuple(contract.anyres_candidates(4))
    assert m.preprocess.detection.std == (0.229, 0.224, 0.225)
    assert m.postprocess.nms_iou == 0.7
    assert m.chat_template.input_markers == contract.INPUT_MARKERS
    assert m.extra_files["gen_uncond"].path == (root / "gen_uncond.safetensors").resolve()
    assert m.tokenizer.sentencepiece.path == (root / contract.SENTENCEPIECE_FILE).resolve()
    assert m.tokenizer.sentencepiece.sha256 == file_sha256(root / contract.SENTENCEPIECE_FILE)
    assert m.model.rope_theta == 10000.0 and m.generation.guidance_scale == 7.5
    # The manifest file itself may also be named.
    assert load_manifest(root / contract.MANIFEST_FILE) == m
    with pytest.raises(KeyError, match=r"'\[NOPE\]' is not in the manifest's token table"):
        m.token_id("[NOPE]")


def test_a_subset_of_graphs_routing_and_extra_files_is_valid(artifact, schema):
    root, data = artifact
    data["graphs"] = {"llm": data["graphs"]["llm"], "vision": data["graphs"]["vision"]}
    data["routing"] = {"det": data["routing"]["det"]}
    data["extra_files"] = {}
    data["postprocess"]["nms_iou"] = None
    data["generation"]["guidance_scale"] = 7  # an integral number is a number
    schema.validate(data)
    m = write_manifest(data, root)
    assert m.components == ("vision", "llm") and list(m.routing) == ["det"] and m.postprocess.nms_iou is None


def test_the_parser_is_stricter_than_json_schema_on_integral_floats(artifact, schema):
    # JSON Schema counts 64.0 as an integer; the parser does not, since an exporter that writes 64.0 for a
    # size has computed it in floating point and may be off elsewhere.
    root, data = artifact
    data["model"]["hidden_size"] = 64.0
    assert schema.is_valid(data)
    with pytest.raises(
        ManifestError, match=r"model\.hidden_size: expected an integer, got 64\.0 \(a number\)"
    ):
        validate_manifest_dict(data, root)


def test_validate_manifest_dict_matches_load_and_write_refuses_invalid(artifact):
    root, data = artifact
    assert validate_manifest_dict(data, root) == write_manifest(data, root)
    (root / contract.MANIFEST_FILE).unlink()
    bad = copy.deepcopy(data)
    bad["model"]["num_heads"] = 0
    with pytest.raises(ManifestError, match=r"manifest\.json: model\.num_heads: must be >= 1, got 0"):
        write_manifest(bad, root)
    assert not (root / contract.MANIFEST_FILE).exists() and not list(root.glob(".manifest*"))
    with pytest.raises(ManifestError, match=r"^built: model\.num_heads"):
        validate_manifest_dict(bad, root, source="built")


def test_hash_mismatch_is_skipped_only_when_asked(artifact):
    root, data = artifact
    write_manifest(data, root)
    (root / "llm.onnx").write_bytes(b"X" * (root / "llm.onnx").stat().st_size)  # same size, other bytes
    with pytest.raises(ManifestError, match=r"graphs\.llm\.sha256: llm\.onnx: sha256 mismatch"):
        load_manifest(root)
    assert load_manifest(root, verify_hashes=False).graphs["llm"].sha256 == data["graphs"]["llm"]["sha256"]


def test_graph_entry_finds_the_external_data_export_graph_writes(tmp_path):
    (tmp_path / "det.onnx").write_bytes(b"d")
    assert (
        graph_entry(tmp_path, "det", inputs=[], outputs=[], opset=17, precision="fp32")["external_data"] == []
    )
    (tmp_path / "det.onnx.data").write_bytes(b"w")
    entry = graph_entry(
        tmp_path,
        "det",
        inputs=[("pixel_values", "float32", [1, 3, "H", "W"])],
        outputs=[],
        opset=17,
        precision="fp16",
    )
    assert entry["external_data"] == ["det.onnx.data"] and entry["size_bytes"] == 1
    assert entry["inputs"] == [{"name": "pixel_values", "dtype": "float32", "shape": [1, 3, "H", "W"]}]


# --- corrupted variants: each fault, its message, and whether the schema sees it ----------------------------

Mutation = Callable[[Path, dict], None]


def _set(path: str | tuple, value) -> Mutation:
    """Sets a dotted key path (`[n]` for list items) to `value`."""

    def apply(root: Path, data: dict) -> None:
        *parents, last = _split(path)
        node = data
        for key in parents:
            node = node[key]
        node[last] = value

    return apply


def _delete(path: str | tuple) -> Mutation:
    def apply(root: Path, data: dict) -> None:
        *parents, last = _split(path)
        node = data
        for key in parents:
            node = node[key]
        del node[last]

    return apply


def _split(path: str | tuple) -> list:
    if isinstance(path, tuple):  # for keys with brackets in them, such as tokens
        return list(path)
    return [int(p) if p.isdigit() else p for p in re.findall(r"[^.\[\]]+", path)]


def _both(*mutations: Mutation) -> Mutation:
    def apply(root: Path, data: dict) -> None:
        for m in mutations:
            m(root, data)

    return apply


def _drop_llm_input(root: Path, data: dict) -> None:
    data["graphs"]["llm"]["inputs"] = [
        t for t in data["graphs"]["llm"]["inputs"] if t["name"] != "past_value.1"
    ]


def _rename_det_output(root: Path, data: dict) -> None:
    data["graphs"]["det"]["outputs"][2]["name"] = "pred_masks_all"


def _delete_file(name: str) -> Mutation:
    return lambda root, data: (root / name).unlink()


def _overwrite_same_size(name: str) -> Mutation:
    return lambda root, data: (root / name).write_bytes(b"Z" * (root / name).stat().st_size)


def _append_byte(root: Path, data: dict) -> None:
    with open(root / "vision.onnx", "ab") as f:
        f.write(b"!")


def _symlink_outside(root: Path, data: dict) -> None:
    outside = root.parent / "elsewhere.safetensors"
    outside.write_bytes(b"embeddings")
    (root / "linked.safetensors").symlink_to(outside)
    data["embeddings"]["file"] = "linked.safetensors"


def _duplicate_token_id(root: Path, data: dict) -> None:
    data["tokens"]["[GRD]"] = data["tokens"]["[DET]"]


# (id, mutation, message the parser must give after "manifest.json: ", schema rejects too?)
VARIANTS: list[tuple[str, Mutation, str, bool]] = [
    ("unknown-top-level-key", _set("colour", "red"), "colour: unknown key", True),
    (
        "unknown-nested-key",
        _set("graphs.llm.inputs[0].layout", "NCHW"),
        "graphs.llm.inputs[0].layout: unknown key",
        True,
    ),
    ("unknown-clip-key", _set("preprocess.clip.crop", True), "preprocess.clip.crop: unknown key", True),
    ("missing-top-level", _delete("generation"), "generation: missing required key", True),
    ("missing-nested", _delete("tokenizer.legacy"), "tokenizer.legacy: missing required key", True),
    ("missing-token", _delete(("tokens", "<unk>")), 'tokens["<unk>"]: missing required key', True),
    (
        "missing-sentencepiece",
        _delete("tokenizer.sentencepiece"),
        "tokenizer.sentencepiece: missing required key",
        True,
    ),
    (
        "bool-is-not-int",
        _set("model.num_layers", True),
        "model.num_layers: expected an integer, got true (a boolean)",
        True,
    ),
    (
        "string-for-int",
        _set("model.hidden_size", "64"),
        'model.hidden_size: expected an integer, got "64"',
        True,
    ),
    (
        "float-for-int",
        _set("graphs.det.opset", 17.5),
        "graphs.det.opset: expected an integer, got 17.5",
        True,
    ),
    ("string-for-float", _set("model.rope_theta", "1e4"), "model.rope_theta: expected a number", True),
    (
        "bool-for-float",
        _set("postprocess.det_score_threshold", False),
        "postprocess.det_score_threshold: expected a number, got false (a boolean)",
        True,
    ),
    (
        "int-for-bool",
        _set("tokenizer.add_prefix_space", 0),
        "tokenizer.add_prefix_space: expected a boolean",
        True,
    ),
    (
        "unknown-graph",
        _set("graphs.vae", {}),
        "graphs.vae: unknown graph 'vae'; contract.GRAPHS has: vision",
        True,
    ),
    (
        "bad-dtype",
        _set("graphs.vision.inputs[0].dtype", "uint8"),
        "graphs.vision.inputs[0].dtype: must be one of float32, float16, int64, bool, int32; got 'uint8'",
        True,
    ),
    (
        "bad-precision",
        _set("graphs.vision.precision", "bf16"),
        "graphs.vision.precision: must be one of",
        True,
    ),
    (
        "bad-dim",
        _set("graphs.vision.inputs[0].shape[1]", -1),
        "graphs.vision.inputs[0].shape[1]: must be >= 0, got -1",
        True,
    ),
    (
        "llm-input-missing-layer",
        _drop_llm_input,
        "graphs.llm.inputs: input names differ from contract.GRAPHS['llm']: missing ['past_value.1']",
        False,
    ),
    (
        "det-output-renamed",
        _rename_det_output,
        "graphs.det.outputs: output names differ from contract.GRAPHS['det']: missing ['pred_masks']; "
        "unexpected ['pred_masks_all']",
        False,
    ),
    (
        "duplicate-io-name",
        _set("graphs.region.inputs[1].name", "image"),
        "graphs.region.inputs[1].name: duplicate input name 'image'",
        False,
    ),
    ("graph-file-missing", _delete_file("det.onnx"), "graphs.det.file: 'det.onnx': file not found", False),
    (
        "external-data-missing",
        _delete_file("llm.onnx.data"),
        "graphs.llm.external_data[0]: 'llm.onnx.data': file not found",
        False,
    ),
    (
        "sha256-mismatch",
        _overwrite_same_size("llm.onnx"),
        "graphs.llm.sha256: llm.onnx: sha256 mismatch",
        False,
    ),
    (
        "tokenizer-sha256-mismatch",
        _overwrite_same_size("tokenizer.json"),
        "tokenizer.sha256: tokenizer.json: sha256 mismatch",
        False,
    ),
    (
        "sentencepiece-sha256-mismatch",
        _overwrite_same_size(contract.SENTENCEPIECE_FILE),
        "tokenizer.sentencepiece.sha256: tokenizer.model: sha256 mismatch",
        False,
    ),
    (
        "sentencepiece-missing-file",
        _delete_file(contract.SENTENCEPIECE_FILE),
        "tokenizer.sentencepiece.file: 'tokenizer.model': file not found",
        False,
    ),
    ("size-mismatch", _append_byte, "graphs.vision.size_bytes: vision.onnx is", False),
    (
        "sha256-not-hex",
        _set("embeddings.sha256", "ABC"),
        'embeddings.sha256: expected 64 lower-case hex digits, got "ABC"',
        True,
    ),
    (
        "absolute-path",
        _set("graphs.vision.file", "/etc/passwd"),
        "graphs.vision.file: '/etc/passwd' is not a relative '/'-separated path inside the artifact folder",
        True,
    ),
    (
        "dotdot-path",
        _set("tokenizer.file", "../tokenizer.json"),
        "tokenizer.file: '../tokenizer.json' leaves the artifact folder ('..')",
        True,
    ),
    (
        "dotdot-external-data",
        _set("graphs.llm.external_data[0]", "sub/../../llm.onnx.data"),
        "graphs.llm.external_data[0]: 'sub/../../llm.onnx.data' leaves the artifact folder",
        True,
    ),
    (
        "absolute-extra-file",
        _set("extra_files.gen_uncond.file", "/tmp/u.safetensors"),
        "extra_files.gen_uncond.file: '/tmp/u.safetensors' is not a relative",
        True,
    ),
    (
        "backslash-path",
        _set("embeddings.file", "sub\\embeddings.safetensors"),
        "embeddings.file: 'sub\\\\embeddings.safetensors' is not a relative '/'-separated path",
        True,
    ),
    (
        "symlink-outside",
        _symlink_outside,
        "embeddings.file: 'linked.safetensors' resolves outside the artifact folder",
        False,
    ),
    (
        "newer-schema",
        _both(_set("schema_version", 3), _set("brand_new_section", {})),
        "schema_version: the artifact was written by a newer visionllm-edge 9.9.9 (schema_version 3); "
        f"this visionllm-edge {__version__} reads schema_version 2: upgrade visionllm-edge",
        True,
    ),
    (
        "older-schema",
        _set("schema_version", 0),
        f"schema_version: schema_version 0 is older than this visionllm-edge {__version__} reads "
        "(schema_version 2)",
        True,
    ),
    (
        # Version 1 had no tokenizer.sentencepiece, which the C++ tokenizer needs: such an artifact is refused
        # with the fix named rather than with a missing key.
        "version-1-schema",
        _both(_set("schema_version", 1), _delete("tokenizer.sentencepiece")),
        f"schema_version: schema_version 1 is older than this visionllm-edge {__version__} reads "
        "(schema_version 2): re-export the artifact with this version",
        True,
    ),
    (
        "routing-id-mismatch",
        _set("routing.det.id", 32013),
        "routing.det.id: 32013 is not the id of '[DET]' in tokens (32012)",
        False,
    ),
    (
        "duplicate-token-id",
        _duplicate_token_id,
        "tokens[\"[GRD]\"]: id 32012 is also the id of '[DET]'",
        False,
    ),
    (
        "token-id-beyond-vocab",
        _set(("tokens", "[EMB8]"), VOCAB),
        'tokens["[EMB8]"]: id 32026 is not below model.vocab_size 32026',
        False,
    ),
    (
        "routing-wrong-token",
        _set("routing.seg.token", "[DET]"),
        "routing.seg.token: kind 'seg' is routed by '[SEG]', got '[DET]'",
        True,
    ),
    (
        "routing-wrong-decoder",
        _set("routing.grd.decoder", "pose"),
        "routing.grd.decoder: kind 'grd' goes to the 'object' decoder, got 'pose'",
        True,
    ),
    (
        "routing-wrong-table",
        _set("routing.seg.table", "pose"),
        "routing.seg.table: kind 'seg' reads query table 'det', got 'pose'",
        True,
    ),
    (
        "routing-unknown-kind",
        _set("routing.caption", {}),
        "routing.caption: unknown routing kind 'caption'",
        True,
    ),
    (
        "routing-shared-table-queries",
        _set("routing.grd.queries", 5),
        "routing.grd.queries: 5 differs from routing.det.queries 4, which reads the same query table 'det'",
        False,
    ),
    (
        "routing-too-many-perception-queries",
        _both(*(_set(f"routing.{k}.queries", 9) for k in ("det", "grd", "seg"))),
        "routing.det.queries: 9 exceeds the 8 placeholder tokens",
        True,
    ),
    (
        "eos-mismatch",
        _set("generation.eos_id", 3),
        "generation.eos_id: 3 is not the id of '</s>' in tokens (2)",
        False,
    ),
    (
        "max-new-tokens-beyond-context",
        _set("generation.max_new_tokens", 513),
        "generation.max_new_tokens: 513 exceeds model.max_context 512",
        False,
    ),
    (
        "tile-size-zero",
        _set("preprocess.clip.tile_size", 0),
        "preprocess.clip.tile_size: must be >= 1, got 0",
        True,
    ),
    (
        "mean-two-values",
        _set("preprocess.detection.mean", [0.5, 0.5]),
        "preprocess.detection.mean: expected 3 items, got 2",
        True,
    ),
    (
        "mean-not-numbers",
        _set("preprocess.clip.mean", ["a", "b", "c"]),
        "preprocess.clip.mean[0]: expected a number",
        True,
    ),
    ("std-zero", _set("preprocess.clip.std[1]", 0.0), "preprocess.clip.std[1]: must be > 0, got 0.0", True),
    (
        "wrong-resample",
        _set("preprocess.clip.resample", "bilinear"),
        "preprocess.clip.resample: must be one of bicubic; got 'bilinear'",
        True,
    ),
    (
        "grid-beyond-max-tiles",
        _set("preprocess.clip.candidate_grids[0]", [3, 2]),
        "preprocess.clip.candidate_grids[0]: grid 3x2 has more tiles than max_tiles 4",
        False,
    ),
    (
        "long-side-below-short",
        _set("preprocess.detection.max_long_side", 600),
        "preprocess.detection.max_long_side: 600 is below short_side 800",
        False,
    ),
    (
        "diffusion-size-not-multiple-of-8",
        _set("preprocess.diffusion.gen_image_size", 500),
        "preprocess.diffusion.gen_image_size: 500 is not a multiple of 8",
        True,
    ),
    (
        "threshold-above-one",
        _set("postprocess.mask_threshold", 1.5),
        "postprocess.mask_threshold: must be <= 1.0, got 1.5",
        True,
    ),
    ("nms-iou-zero", _set("postprocess.nms_iou", 0), "postprocess.nms_iou: must be > 0, got 0.0", True),
    (
        "image-token-unknown",
        _set("chat_template.image_token", "<picture>"),
        "chat_template.image_token: '<picture>' is not a token of the tokens table",
        False,
    ),
    (
        "roles-three",
        _set("chat_template.roles", ["USER", "ASSISTANT", "SYSTEM"]),
        "chat_template.roles: expected 2 items, got 3",
        True,
    ),
    (
        "kv-heads-do-not-divide",
        _set("model.num_kv_heads", 3),
        "model.num_kv_heads: 3 does not divide num_heads 4",
        False,
    ),
    (
        "foreign-producer",
        _set("producer.name", "other-tool"),
        "producer.name: must be one of visionllm-edge; got 'other-tool'",
        True,
    ),
    (
        "facts-not-object",
        _set("graphs.pose.facts", []),
        "graphs.pose.facts: expected an object, got an array",
        True,
    ),
    ("empty-object", lambda root, data: data.clear(), "schema_version: missing required key", True),
]


@pytest.mark.parametrize(
    ("mutate", "message", "schema_rejects"), [v[1:] for v in VARIANTS], ids=[v[0] for v in VARIANTS]
)
def test_corrupted_manifest_is_refused_with_the_key_path(artifact, schema, mutate, message, schema_rejects):
    root, data = artifact
    mutate(root, data)
    _write_raw(root, data)
    with pytest.raises(ManifestError) as info:
        load_manifest(root)
    text = str(info.value)
    assert text.startswith(f"{root / contract.MANIFEST_FILE}: "), text
    assert message in text, text
    # validate_manifest_dict runs the same parser.
    with pytest.raises(ManifestError, match=re.escape(message)):
        validate_manifest_dict(data, root)
    assert schema.is_valid(data) is not schema_rejects, list(schema.iter_errors(data))[:1]


@pytest.mark.parametrize(
    ("text", "message"),
    [
        (
            '{\n  "schema_version": 1,\n  "producer": {,}\n}',
            "invalid JSON at line 3, column 16: syntax error",
        ),
        ('{"schema_version": 1, "schema_version": 1}', "invalid JSON: key 'schema_version' appears twice"),
        ('{"model": {"a": [{"x": 1, "x": 2}]}}', "model.a[0]: invalid JSON: key 'x' appears twice"),
        ('{"schema_version": NaN}', "invalid JSON at line 1, column 20: NaN is not a JSON number"),
        ('{"schema_version": -Infinity}', "-Infinity is not a JSON number"),
        ("[1, 2]", "the manifest must be a JSON object, got an array"),
        ('{"schema_version": "1"}', 'schema_version: expected an integer, got "1" (a string)'),
    ],
    ids=["syntax", "duplicate-key", "nested-duplicate-key", "nan", "infinity", "array", "string-version"],
)
def test_unreadable_manifest_names_the_file_and_place(tmp_path, text, message):
    (tmp_path / contract.MANIFEST_FILE).write_text(text)
    with pytest.raises(
        ManifestError, match=f"^{re.escape(str(tmp_path / contract.MANIFEST_FILE))}: .*" + re.escape(message)
    ):
        load_manifest(tmp_path)


def test_missing_manifest_or_folder(tmp_path):
    with pytest.raises(ManifestError, match=r"manifest\.json: not found; is .* an exported artifact\?"):
        load_manifest(tmp_path)
    with pytest.raises(ManifestError, match=r"the artifact folder .*nowhere does not exist"):
        load_manifest(tmp_path / "nowhere")


# --- the schema and the parser agree on every key -----------------------------------------------------------

#: Objects keyed by name whose entries may be left out (a partial export) and whose keys are data.
_SUBSET_MAPS = {"graphs", "routing", "extra_files"}


def _walk(node, path=()):
    """Yields (path, value) for every node except the free-form contents of `facts`."""
    yield path, node
    if isinstance(node, dict) and (not path or path[-1] != "facts"):
        for k, v in node.items():
            yield from _walk(v, (*path, k))
    elif isinstance(node, list):
        for i, v in enumerate(node):
            yield from _walk(v, (*path, i))


def _wrong_values(path: tuple, value) -> list:
    if len(path) >= 2 and path[-2] == "shape":  # a dim is an int or a symbol: neither may stand for the other
        return [True, 1.5]
    if isinstance(value, bool):
        return [1, "true"]
    if isinstance(value, int):
        return [True, 1.5] if path[0] != "tokens" else [True]  # 29 alike ids: one wrong value is enough
    if isinstance(value, float):
        return [False, "x"]
    if isinstance(value, str):
        return [7, None]
    if isinstance(value, list):
        return [{}, "x"]
    if isinstance(value, dict):
        return [[], 3]
    return ["x", True]  # null (nms_iou)


def _key_path(path: tuple) -> str:
    at = ""
    for key in path:
        at = _child(at, key)
    return at


def _at(data, path: tuple):
    for key in path:
        data = data[key]
    return data


class _SchemaCheck:
    """Schema validation of one mutated manifest, cut to the section that changed.

    A full validation takes ~10 ms with `jsonschema`; the top-level schema is a plain conjunction of its
    sections (no constraint spans two), so validating the changed section against its own subschema decides
    the same question at a fraction of the cost.
    """

    def __init__(self, raw: dict):
        self.full = Draft202012Validator(raw)
        self.sections = {
            key: Draft202012Validator({"$defs": raw["$defs"], **sub})
            for key, sub in raw["properties"].items()
        }

    def is_valid(self, data: dict, path: tuple) -> bool:
        if len(path) == 1:
            return self.full.is_valid(data)
        return self.sections[path[0]].is_valid(data[path[0]])


def test_schema_and_parser_agree_on_every_key_and_type(artifact):
    """Every leaf given a wrong type, every key removed, every object given an unknown key: both refuse
    (or, for entries of `graphs`, `routing` and `extra_files`, both accept the removal)."""
    root, full = artifact
    data = copy.deepcopy(full)
    # One graph and two routes visit every kind of key; the others repeat them and would only add time.
    data["graphs"] = {"det": data["graphs"]["det"]}
    data["routing"] = {k: data["routing"][k] for k in ("det", "gen")}
    schema = _SchemaCheck(load_schema())
    assert schema.full.is_valid(data)

    def parser_refuses(bad: dict, at: str, message: str) -> None:
        with pytest.raises(ManifestError) as info:
            validate_manifest_dict(bad, root, verify_hashes=False)
        assert f"manifest.json: {at}" in str(info.value) and message in str(info.value), str(info.value)

    checked = 0
    for path, value in _walk(data):
        if not path:
            continue
        at = _key_path(path)
        for wrong in _wrong_values(path, value):
            bad = copy.deepcopy(data)
            _at(bad, path[:-1])[path[-1]] = wrong
            parser_refuses(bad, at, "expected")
            assert not schema.is_valid(bad, path), f"the schema accepts {at} = {wrong!r}"
            checked += 1
        if isinstance(path[-1], str):
            dropped = copy.deepcopy(data)
            del _at(dropped, path[:-1])[path[-1]]
            if len(path) == 2 and path[0] in _SUBSET_MAPS:
                validate_manifest_dict(dropped, root, verify_hashes=False)
                assert schema.full.is_valid(dropped), f"the schema requires {at}"
            else:
                parser_refuses(dropped, at, "missing required key")
                assert not schema.is_valid(dropped, path), f"the schema does not require {at}"
            checked += 1
        # extra_files' logical names are data (any name fitting the pattern); facts are free-form.
        if isinstance(value, dict) and path[-1] != "facts" and path != ("extra_files",):
            extra = copy.deepcopy(data)
            _at(extra, path)["zz_unknown"] = {}
            parser_refuses(extra, _child(at, "zz_unknown"), "unknown")
            assert not schema.is_valid(extra, path), f"the schema accepts an unknown key in {at}"
            checked += 1
    assert checked > 300


def test_schema_names_agree_with_the_contract():
    raw = load_schema()
    props = raw["properties"]
    assert raw["$schema"] == "https://json-schema.org/draft/2020-12/schema"
    assert props["schema_version"] == {"const": contract.MANIFEST_SCHEMA_VERSION}
    assert props["graphs"]["propertyNames"]["enum"] == list(contract.GRAPHS)
    assert props["tokens"]["required"] == list(REQUIRED_TOKENS) and len(REQUIRED_TOKENS) == 29
    assert list(props["routing"]["properties"]) == list(contract.ROUTING_KINDS)
    token_of = {kind: token for token, kind in contract.ROUTING_TOKENS.items()}
    for kind, entry in props["routing"]["properties"].items():
        assert entry["properties"]["token"]["const"] == token_of[kind]
        assert entry["properties"]["decoder"]["const"] == contract.DECODER_OF_KIND[kind]
        assert entry["properties"]["table"]["const"] == contract.QUERY_TABLE[kind]
    assert raw["$defs"]["tensor"]["properties"]["dtype"]["enum"] == list(DTYPES)
    assert raw["$defs"]["graph"]["properties"]["precision"]["enum"] == list(PRECISIONS)


def test_schema_ships_inside_the_package_and_the_module_is_torch_free():
    import visionllm_edge

    assert (Path(visionllm_edge.__file__).parent / "schemas" / SCHEMA_FILE).is_file()
    code = "import sys, visionllm_edge.manifest as m; m.load_schema(); print('torch' in sys.modules)"
    env = {**os.environ, "PYTHONWARNINGS": "error"}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, env=env)
    assert out.stdout.strip() == "False"


def test_validate_refuses_what_json_cannot_carry(artifact):
    root, data = artifact
    data["postprocess"]["mask_threshold"] = float("nan")
    with pytest.raises(ManifestError, match=r"manifest\.json: not JSON-serialisable: Out of range float"):
        validate_manifest_dict(data, root)


def test_one_parser_the_python_checks_are_gone():
    # Every check runs in C++: the module keeps the dataclasses and the builders, nothing that checks.
    assert not hasattr(manifest_module, "_Parser")
    assert manifest_module.load_manifest.__code__.co_names.count("_core") == 1


def test_cpp_contract_table_equals_contract_py():
    """The names the C++ parser and loop check against (csrc/artifact/contract.h) are contract.py's."""
    table = _core.artifact_contract()
    graphs = {name: (g.file, g.inputs, g.outputs) for name, g in contract.GRAPHS.items()}
    assert list(table["GRAPHS"].items()) == list(graphs.items())
    assert list(table.pop("GRAPHS")) == list(contract.GRAPHS)
    for name in ("ROUTING_TOKENS", "QUERY_TABLE", "DECODER_OF_KIND", "COMPONENT_GRAPHS"):
        assert list(table[name].items()) == list(getattr(contract, name).items()), name
    assert table.pop("VERSION") == __version__
    # The diffusion decoders' constant file and tensor (what export writes, what the C++ loop reads) included.
    assert {"UNCOND_FILE", "UNCOND_TENSOR"} <= set(table)
    for name, value in table.items():
        assert value == getattr(contract, name), name
    assert len(table) >= 37
