"""The TensorRT compatibility report: the operator table, hand-built graphs (milliseconds), tiny-random."""

from __future__ import annotations

import importlib.util
import json
import os
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper
from visionllm_edge import contract
from visionllm_edge.export import trt_report as tr

DATA = Path(tr.__file__).parent / "data"


def _model(nodes, inputs, outputs, initializers=(), opset=17, extra_opsets=()) -> onnx.ModelProto:
    graph = helper.make_graph(nodes, "g", inputs, outputs, initializer=list(initializers))
    opsets = [helper.make_opsetid("", opset), *(helper.make_opsetid(d, v) for d, v in extra_opsets)]
    return helper.make_model(graph, opset_imports=opsets)


def _value(name, elem=TensorProto.FLOAT, shape=(1, 3, 8, 8)):
    return helper.make_tensor_value_info(name, elem, list(shape))


def _kinds(report, severity=None):
    return {f["kind"] for f in report["findings"] if severity is None or f["severity"] == severity}


# --- the table ----------------------------------------------------------------------------------------------


def test_table_loads_and_has_a_source():
    table = tr.load_ops_table()
    src = table["source"]
    assert src["repo"] == "onnx/onnx-tensorrt" and src["path"] == "docs/operators.md"
    assert src["ref"] or src["commit"]
    assert src["retrieved"] and src["tensorrt_version"].startswith("10")
    ops = table["ops"]
    assert len(ops) > 150
    assert ops["Conv"]["supported"] and "FP32" in ops["Conv"]["dtypes"]
    assert not ops["Unique"]["supported"]
    assert "linear" in ops["Resize"]["restrictions"]
    assert {"FLOAT32", "INT64", "BOOL"} <= set(table["data_types"])


def test_table_script_parses_an_operator_document(tmp_path):
    spec = importlib.util.spec_from_file_location("make_table", DATA / "make_tensorrt_ops_table.py")
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    # The shapes of the real document: rows without a closing pipe, short rows, a trailing comma, a typo.
    doc = "\n".join([
        "# Supported ONNX Operators",
        "TensorRT 10.9 supports operators in the inclusive range of opset 9 to opset 22. More below.",
        "TensorRT supports the following ONNX data types: FLOAT32, INT64, and BOOL",
        "> Note: a note.",
        "## Operator Support Matrix",
        "| Operator | Supported | Supported Types | Restrictions |",
        "|----------|-----------|-----------------|--------------|",
        "| Foo      | Y         | FP32, FP16, |",
        "| Bar      | N         |",
        "| Baz      | Y         | INF64 | `axes` must be an initializer<br />Second\\. sentence",
        "| Qux      | Y [EXPERIMENTAL] | FP32 | odd |",
        "## Next section",
        "| Ignored | Y | FP32 |",
    ])  # fmt: skip
    (tmp_path / "operators.md").write_text(doc)
    out = tmp_path / "table.json"
    assert script.main([str(tmp_path / "operators.md"), "--out", str(out), "--ref", "release/10.9"]) == 0
    table = json.loads(out.read_text())
    assert table["source"]["ref"] == "release/10.9" and table["source"]["tensorrt_version"] == "10.9"
    assert table["opset_range"] == [9, 22] and table["data_types"] == ["FLOAT32", "INT64", "BOOL"]
    assert table["notes"] == ["a note."]
    assert table["ops"]["Foo"] == {"supported": True, "dtypes": ["FP32", "FP16"], "restrictions": ""}
    assert table["ops"]["Bar"] == {"supported": False, "dtypes": [], "restrictions": ""}
    assert table["ops"]["Baz"]["dtypes"] == ["INT64"]
    assert table["ops"]["Baz"]["restrictions"] == "`axes` must be an initializer Second. sentence"
    assert table["ops"]["Qux"]["experimental"] and "Ignored" not in table["ops"]
    with pytest.raises(SystemExit):
        script.main([str(tmp_path / "operators.md"), "--out", str(out)])  # no --ref/--commit: no provenance


# --- hand-built graphs --------------------------------------------------------------------------------------


def test_supported_op_is_ok():
    model = _model([helper.make_node("Relu", ["x"], ["y"])], [_value("x")], [_value("y")])
    report = tr.trt_report(model)
    assert report["verdict"] == "ok", report["findings"]
    assert report["op_histogram"] == {"Relu": 1}
    assert report["unsupported"] == [] and report["restricted"] == []
    assert report["profiles"]["profiles"] == []  # static shapes need no optimization profile


def test_unsupported_op_needs_work():
    model = _model(
        [helper.make_node("Unique", ["x"], ["y"]), helper.make_node("Relu", ["y"], ["z"])],
        [_value("x", shape=[6])],
        [_value("z", shape=["n"])],
    )
    report = tr.trt_report(model)
    assert report["verdict"] == "needs-work"
    assert [u["op"] for u in report["unsupported"]] == ["Unique"]
    assert report["notable"]["Unique"] == ["Unique"]  # data-dependent output shape is listed too
    assert "unsupported-op" in _kinds(report, "error")


def test_gridsample_is_flagged():
    model = _model(
        [helper.make_node("GridSample", ["x", "grid"], ["y"], mode="bilinear", align_corners=0)],
        [_value("x"), _value("grid", shape=(1, 4, 4, 2))],
        [_value("y", shape=(1, 3, 4, 4))],
    )
    report = tr.trt_report(model)
    # TensorRT parses GridSample, but the project's graphs must not hold one (gather-based MSDA).
    assert report["unsupported"] == []
    assert report["verdict"] == "needs-work"
    assert "gridsample" in _kinds(report, "error")
    assert report["notable"]["GridSample"] == ["GridSample"]


def test_com_microsoft_op_is_ort_only():
    node = helper.make_node(
        "MatMulNBits", ["a", "b", "scales"], ["y"], domain="com.microsoft", K=16, N=8, bits=4, block_size=16
    )
    model = _model(
        [node],
        [_value("a", shape=(2, 16)), _value("b", TensorProto.UINT8, (8, 1, 8)), _value("scales", shape=[8])],
        [_value("y", shape=(2, 8))],
        extra_opsets=[("com.microsoft", 1)],
    )
    report = tr.trt_report(model)
    assert report["verdict"] == "needs-work"
    assert report["op_histogram"] == {"com.microsoft:MatMulNBits": 1}
    (custom,) = report["custom_domains"]
    assert custom["domain"] == "com.microsoft" and custom["ops"] == {"MatMulNBits": 1}
    assert "ORT-only" in custom["note"]
    assert report["unsupported"] == []  # reported as a custom domain, not as a missing standard op
    # uint8 graph I/O is allowed, but only at the network boundary.
    assert any(f["dtype"] == "uint8" and f["severity"] == "note" for f in report["dtypes"]["flags"])


def _resize_model(**attrs):
    sizes = numpy_helper.from_array(np.array([1, 3, 16, 16], np.int64), "sizes")
    node = helper.make_node("Resize", ["x", "", "", "sizes"], ["y"], name="up", **attrs)
    return _model([node], [_value("x")], [_value("y", shape=(1, 3, 16, 16))], [sizes])


def test_resize_attributes_are_checked_against_the_table():
    report = tr.trt_report(_resize_model(mode="linear", coordinate_transformation_mode="align_corners"))
    assert report["verdict"] == "ok", report["findings"]
    (entry,) = report["restricted"]
    assert entry["op"] == "Resize" and entry["status"] == "satisfied"
    assert "nearest" in entry["restriction"]
    assert entry["nodes"][0]["attributes"] == {
        "mode": "linear",
        "coordinate_transformation_mode": "align_corners",
    }

    report = tr.trt_report(_resize_model(mode="cubic", coordinate_transformation_mode="half_pixel"))
    assert report["verdict"] == "needs-work"
    (entry,) = report["restricted"]
    assert entry["status"] == "violated"
    (violation,) = entry["violations"]
    assert violation["node"] == "up" and any("`mode`='cubic'" in p for p in violation["problems"])

    # nearest_mode matters only for mode=nearest; `tf_crop_and_resize` is not a supported transformation.
    report = tr.trt_report(_resize_model(mode="nearest", nearest_mode="round_prefer_ceil"))
    assert report["verdict"] == "ok", report["findings"]
    report = tr.trt_report(_resize_model(mode="linear", coordinate_transformation_mode="tf_crop_and_resize"))
    assert report["restricted"][0]["status"] == "violated"


def test_initializer_restriction_and_types():
    # Slice with run-time `axes` (the table wants an initializer), a float64 tensor, an Equal on bool.
    nodes = [
        helper.make_node("Slice", ["x", "starts", "ends", "axes"], ["y"], name="slice"),
        helper.make_node("Cast", ["x"], ["x64"], to=TensorProto.DOUBLE),
        helper.make_node("Equal", ["b", "b"], ["e"]),
    ]
    inits = [numpy_helper.from_array(np.array([0], np.int64), n) for n in ("starts", "ends")]
    model = _model(
        nodes,
        [
            _value("x", shape=(4, 4)),
            _value("axes", TensorProto.INT64, [1]),
            _value("b", TensorProto.BOOL, [3]),
        ],
        [
            _value("y", shape=(4, 4)),
            _value("x64", TensorProto.DOUBLE, (4, 4)),
            _value("e", TensorProto.BOOL, [3]),
        ],
        inits,
    )
    report = tr.trt_report(model)
    assert report["verdict"] == "needs-work"
    slice_entry = next(e for e in report["restricted"] if e["op"] == "Slice")
    assert slice_entry["status"] == "violated" and "axes" in slice_entry["violations"][0]["problems"][0]
    flags = {f["dtype"]: f["severity"] for f in report["dtypes"]["flags"]}
    assert flags["float64"] == "note" and flags["int64"] == "info" and flags["bool"] == "info"
    assert [(m["op"], m["dtype"]) for m in report["dtypes"]["op_mismatches"]] == [("Equal", "bool")]


def test_profiles_from_facts_and_unresolved_dims():
    model = _model(
        [helper.make_node("Relu", ["pixel_values"], ["image_embeds"])],
        [_value("pixel_values", shape=("tiles", 3, 8, 8))],
        [_value("image_embeds", shape=("tiles", 3, 8, 8))],
    )
    report = tr.trt_report(model, {"max_tiles": 4}, graph="vision")
    assert report["verdict"] == "ok", report["findings"]
    (profile,) = report["profiles"]["profiles"]
    assert profile["inputs"]["pixel_values"] == {
        "min": [1, 3, 8, 8],
        "opt": [5, 3, 8, 8],
        "max": [5, 3, 8, 8],
    }
    # Without facts the dim is listed, unresolved, and the report says so.
    report = tr.trt_report(model)
    assert report["profiles"]["unresolved"] == ["tiles"]
    assert report["verdict"] == "ok-with-notes" and "profile" in _kinds(report, "note")


def test_llm_profiles_cover_decode_and_prefill():
    inputs = [{"name": "inputs_embeds", "dtype": "float32", "shape": [1, "S", 8]},
              {"name": "past_key.0", "dtype": "float32", "shape": ["P", 2, 4]},
              {"name": "output_rows", "dtype": "int64", "shape": ["R"]}]  # fmt: skip
    facts = {"max_context": 256, "max_link_queries": 8, "max_tiles": 2, "patches_per_tile": 4}
    out = tr.profile_shapes("llm", inputs, facts)
    decode, prefill = out["profiles"]
    assert decode["name"] == "decode" and prefill["name"] == "prefill"
    assert decode["inputs"]["inputs_embeds"] == {"min": [1, 1, 8], "opt": [1, 1, 8], "max": [1, 9, 8]}
    assert prefill["inputs"]["inputs_embeds"]["max"] == [1, 256, 8]
    assert prefill["inputs"]["inputs_embeds"]["opt"] == [1, 3 * 4 + 64, 8]
    assert decode["inputs"]["past_key.0"]["min"] == [0, 2, 4]
    assert decode["inputs"]["past_key.0"]["max"] == [255, 2, 4]
    assert out["dims"]["decode"]["R"]["max"] == 8 and out["unresolved"] == []


def test_write_report_and_cli(tmp_path, capsys):
    model = _model([helper.make_node("Relu", ["x"], ["y"])], [_value("x", shape=("regions", 4))],
                   [_value("y", shape=("regions", 4))])  # fmt: skip
    onnx.save(model, str(tmp_path / "region.onnx"))
    written = tr.write_trt_report(tmp_path, graphs={"region": {"file": "region.onnx", "facts": {}}})
    on_disk = json.loads((tmp_path / tr.REPORT_FILE).read_text())
    assert on_disk == json.loads(json.dumps(written))
    assert on_disk["verdicts"] == {"region": "ok"} and on_disk["table"]["repo"] == "onnx/onnx-tensorrt"
    regions = on_disk["graphs"]["region"]["profiles"]["dims"]["default"]["regions"]
    assert (regions["min"], regions["max"]) == (1, tr.DEFAULT_MAX_REGIONS) and "default" in regions["why"]

    assert tr.main([str(tmp_path / "region.onnx")]) == 0
    out = capsys.readouterr().out
    assert "region" in out and "ok" in out and "regions=1/1/" in out


# --- the tiny-random artifact -------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny_report(tiny_artifact):
    return tr.artifact_trt_report(tiny_artifact)


def test_every_graph_gets_a_verdict(tiny_artifact, tiny_report):
    manifest = json.loads((tiny_artifact / contract.MANIFEST_FILE).read_text())
    assert set(tiny_report["verdicts"]) == set(manifest["graphs"])
    assert set(tiny_report["verdicts"].values()) <= set(tr.VERDICTS)
    for name, report in tiny_report["graphs"].items():
        assert report["unsupported"] == [], (name, report["unsupported"])
        assert report["custom_domains"] == [], name
        assert report["profiles"]["unresolved"] == [], (name, report["profiles"]["unresolved"])


def test_no_gridsample_anywhere(tiny_report):
    for name, report in tiny_report["graphs"].items():
        assert "GridSample" not in report["op_histogram"], name
        assert "gridsample" not in _kinds(report), name


def test_llm_profiles_start_the_past_at_zero(tiny_artifact, tiny_report):
    manifest = json.loads((tiny_artifact / contract.MANIFEST_FILE).read_text())
    cap = manifest["model"]["max_context"]
    profiles = {p["name"]: p["inputs"] for p in tiny_report["graphs"]["llm"]["profiles"]["profiles"]}
    assert set(profiles) == {"decode", "prefill"}
    for inputs in profiles.values():
        assert inputs["past_key.0"]["min"][0] == 0 and inputs["past_value.0"]["min"][0] == 0
        assert inputs["past_key.0"]["max"][0] == cap - 1
    assert profiles["decode"]["inputs_embeds"]["opt"][1] == 1
    assert profiles["prefill"]["inputs_embeds"]["max"][1] == cap


def test_export_writes_the_report(tiny_artifact, tiny_report):
    path = tiny_artifact / tr.REPORT_FILE
    if not path.exists() and os.environ.get("VLE_TINY_ARTIFACT"):
        pytest.skip("the given artifact predates the report")
    written = json.loads(path.read_text())
    # The export reads its facts from the model, the CLI from the manifest: the verdicts and profiles agree.
    assert written["verdicts"] == tiny_report["verdicts"]
    for name, report in written["graphs"].items():
        assert report["profiles"] == json.loads(json.dumps(tiny_report["graphs"][name]["profiles"])), name


def test_cli_prints_the_artifact_table(tiny_artifact, capsys):
    assert tr.main([str(tiny_artifact), "--brief"]) == 0
    out = capsys.readouterr().out
    assert "onnx/onnx-tensorrt" in out
    for name in json.loads((tiny_artifact / contract.MANIFEST_FILE).read_text())["graphs"]:
        assert name in out
