"""`llm.onnx`: parity with the reference Llama step, two-block attention structure, fp16 (quantized graphs:
tests/test_quantize.py)."""

from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch")
onnx = pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")

from visionllm_edge import contract  # noqa: E402
from visionllm_edge.export import load_reference  # noqa: E402
from visionllm_edge.export.onnx.base import ExportSettings, export_graph, exporter_for, run_onnx  # noqa: E402
from visionllm_edge.export.onnx.llm import build_graph, io_names, random_inputs  # noqa: E402

# Only the module scope pays for building the model and exporting it (each a second or more on 2 cores).


@pytest.fixture(scope="module")
def model():
    return load_reference("tiny-random")


@pytest.fixture(scope="module")
def exporter():
    return exporter_for("llm")


def _export(model, exporter, folder, **settings):
    st = ExportSettings(**settings)
    (graph,) = exporter.graphs(model, st)
    path = folder / "llm.onnx"
    export_graph(graph, path)
    return path, graph, st


@pytest.fixture(scope="module")
def fp32(model, exporter, tmp_path_factory):
    return _export(model, exporter, tmp_path_factory.mktemp("llm_fp32"))


@pytest.fixture(scope="module")
def fp32_cases(model, exporter, fp32):
    return exporter.validation_cases(model, fp32[2], np.random.default_rng(1234))["llm"]


def _check_cases(path, cases, tol):
    failures = []
    for case in cases:
        got = run_onnx(path, case.inputs)
        assert set(got) == set(case.expected), case.label
        for name, want in case.expected.items():
            mismatch = contract.compare(got[name], want, atol=tol, rtol=tol)
            if mismatch is not None:
                failures.append(f"{case.label} {name}: {mismatch}")
    assert not failures, "\n".join(failures)


def test_graph_is_valid_onnx_with_contract_names_and_dynamic_axes(model, fp32):
    path, graph, _ = fp32
    onnx.checker.check_model(str(path), full_check=True)
    m = onnx.load(str(path))
    n = model.llm.settings.num_hidden_layers
    inputs, outputs = io_names(n)
    assert [i.name for i in m.graph.input] == inputs
    assert [o.name for o in m.graph.output] == outputs
    assert inputs[:3] == ["inputs_embeds", "position_ids", "output_rows"]
    assert inputs[3] == "past_key.0" and inputs[3 + n] == "past_value.0"

    def dims(value):
        return [d.dim_param or d.dim_value for d in value.type.tensor_type.shape.dim]

    by_name = {v.name: v for v in list(m.graph.input) + list(m.graph.output)}
    s = model.llm.settings
    assert dims(by_name["inputs_embeds"]) == [1, "S", s.hidden_size]
    assert dims(by_name["position_ids"]) == ["S"]
    assert dims(by_name["output_rows"]) == ["R"]
    assert dims(by_name["past_key.1"]) == ["P", s.num_key_value_heads, s.head_dim]
    assert dims(by_name["present_value.2"]) == ["S", s.num_key_value_heads, s.head_dim]
    assert dims(by_name["logits"]) == ["R", s.vocab_size]
    assert dims(by_name["hidden"]) == ["R", s.hidden_size]
    # The fp32 graph is plain ONNX (TensorRT parses it): no contrib-domain op.
    assert {node.domain for node in m.graph.node} <= {"", "ai.onnx"}


def test_validation_cases_cover_the_step_kinds(fp32_cases):
    labels = [c.label for c in fp32_cases]
    assert len(fp32_cases) >= 5
    assert "S=7,P=0,R=1" in labels and "S=7,P=0,R=3" in labels
    assert any(lbl.startswith("S=1,P=") and not lbl.startswith("S=1,P=0") for lbl in labels)
    assert any(lbl.startswith("S=5,P=40") for lbl in labels)
    long_past = max(c.inputs["past_key.0"].shape[0] for c in fp32_cases)
    assert long_past + 3 == 4096  # ends at the model's max_position_embeddings
    rows = [c.inputs["output_rows"] for c in fp32_cases if len(c.inputs["output_rows"]) > 1]
    assert any(r[-1] != c_len - 1 for r, c_len in zip(rows, (7, 5, 3)))  # not only the last row


def test_every_validation_case_matches_the_reference_in_ort(fp32, fp32_cases):
    _check_cases(fp32[0], fp32_cases, tol=1e-4)


def test_empty_past_gives_the_step_rows_only(model, fp32):
    s = model.llm.settings
    inputs = random_inputs(model.llm, 4, 0, [3, 1], np.random.default_rng(7))
    assert inputs["past_key.0"].shape == (0, s.num_key_value_heads, s.head_dim)
    got = run_onnx(fp32[0], inputs)
    assert got["logits"].shape == (2, s.vocab_size)
    assert got["present_key.0"].shape == (4, s.num_key_value_heads, s.head_dim)
    assert np.isfinite(got["logits"]).all()
    # Decoding one row on top of the prefill's own K/V equals prefilling the longer sequence.
    longer = random_inputs(model.llm, 5, 0, [4], np.random.default_rng(8))
    longer["inputs_embeds"][:, :4] = inputs["inputs_embeds"]
    full = run_onnx(fp32[0], longer)
    step = {
        "inputs_embeds": longer["inputs_embeds"][:, 4:],
        "position_ids": np.array([4], dtype=np.int64),
        "output_rows": np.array([0], dtype=np.int64),
    }
    for name in io_names(s.num_hidden_layers)[0][3:]:
        step[name] = got[name.replace("past_", "present_")]
    decoded = run_onnx(fp32[0], step)
    contract.assert_close(decoded["logits"], full["logits"], "logits (decode after prefill)")
    contract.assert_close(decoded["present_value.2"], full["present_value.2"][4:], "present_value.2")


def _past_consumers(m):
    return [
        (node.op_type, name)
        for node in m.graph.node
        for name in node.input
        if name.startswith(("past_key.", "past_value."))
    ]


def test_no_concat_touches_the_past_kv(fp32, model, tmp_path):
    m = onnx.load(str(fp32[0]))
    consumers = _past_consumers(m)
    assert consumers, "the past K/V inputs are not used"
    assert not [c for c in consumers if c[0] == "Concat"]
    # Stronger: the past is only ever transposed into a MatMul or asked its length.
    produced_by = {o: node for node in m.graph.node for o in node.output}
    uses = {}
    for node in m.graph.node:
        for name in node.input:
            uses.setdefault(name, []).append(node)
    for op, name in consumers:
        assert op in ("Transpose", "Shape"), (op, name)
    for node in m.graph.node:
        if node.op_type == "Transpose" and node.input[0].startswith(("past_key.", "past_value.")):
            assert [u.op_type for u in uses[node.output[0]]] == ["MatMul"]
    assert produced_by  # sanity: the graph has nodes

    # The check is not vacuous: the naive concat form of the same module fails it.
    graph = build_graph(model.llm, ExportSettings(), attention="concat")
    export_graph(graph, tmp_path / "concat.onnx")
    naive = onnx.load(str(tmp_path / "concat.onnx"))
    assert [c for c in _past_consumers(naive) if c[0] == "Concat"]


def test_ort_reads_the_sequence_major_past_in_place(fp32, tmp_path):
    # ORT folds the past's Transpose into FusedMatMul (transBatchB), so no copy of the past is made per step.
    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    opts.optimized_model_filepath = str(tmp_path / "optimized.onnx")
    ort.InferenceSession(str(fp32[0]), opts, providers=["CPUExecutionProvider"])
    consumers = _past_consumers(onnx.load(opts.optimized_model_filepath))
    assert {op for op, _ in consumers} == {"FusedMatMul", "Shape"}, consumers


def test_manifest_facts(model, exporter):
    s = model.llm.settings
    facts = exporter.manifest_facts(model, ExportSettings())
    assert facts == {
        "num_layers": s.num_hidden_layers,
        "kv_heads": s.num_key_value_heads,
        "head_dim": s.head_dim,
        "hidden_size": s.hidden_size,
        "vocab_size": s.vocab_size,
        "max_context": s.max_position_embeddings,
        "rope_theta": s.rope_theta,
        "rms_norm_eps": s.rms_norm_eps,
    }
    assert exporter.manifest_facts(model, ExportSettings(max_context=256))["max_context"] == 256
    with pytest.raises(ValueError, match="max_context"):
        exporter.manifest_facts(model, ExportSettings(max_context=s.max_position_embeddings + 1))


def test_long_past_case_follows_a_max_context_cap(model, exporter):
    cases = exporter.validation_cases(model, ExportSettings(max_context=64), np.random.default_rng(3))["llm"]
    ends = [c.inputs["position_ids"][-1] for c in cases]
    assert max(ends) == 63


def test_fp16_export_validates_at_1e_2(model, exporter, tmp_path):
    path, graph, st = _export(model, exporter, tmp_path, precision="fp16")
    assert graph.facts["fp32_nodes"] and any("Softmax" in d for d in graph.facts["fp32_nodes"])
    m = onnx.load(str(path))
    elem = {v.name: v.type.tensor_type.elem_type for v in list(m.graph.input) + list(m.graph.output)}
    f16, f32 = onnx.TensorProto.FLOAT16, onnx.TensorProto.FLOAT
    assert elem["inputs_embeds"] == elem["past_key.0"] == elem["present_value.0"] == f16
    assert elem["logits"] == elem["hidden"] == f32
    softmax_inputs = {n.input[0] for n in m.graph.node if n.op_type == "Softmax"}
    # Softmax runs in float32: its input is a Concat of Cast-to-float32 score blocks.
    producers = {o: n for n in m.graph.node for o in n.output}
    assert all(producers[name].op_type == "Concat" for name in softmax_inputs)
    cases = exporter.validation_cases(model, st, np.random.default_rng(5))["llm"]
    assert cases[0].inputs["inputs_embeds"].dtype == np.float16
    _check_cases(path, cases, tol=exporter.fp16_tolerance)


def test_bad_settings_are_named(model):
    with pytest.raises(ValueError, match="precision"):
        build_graph(model.llm, ExportSettings(precision="bf16"))
    with pytest.raises(ValueError, match="attention"):
        build_graph(model.llm, ExportSettings(), attention="flash")
    n = model.llm.settings.num_hidden_layers
    for layers in (range(1, n + 1), range(2, 2), range(0, n, 2)):
        with pytest.raises(
            ValueError, match=rf"layers: expected a non-empty range of consecutive layers of \[0, {n}\)"
        ):
            build_graph(model.llm, ExportSettings(), layers=layers)
