"""Export memory: external data merged by streaming, weights loaded once in the graph's precision, the LLM
reference computed layer by layer from the checkpoint, and the validation session.

`merge_external_data` turns the one-file-per-weight layout `torch.onnx.export` writes over 2 GB into one
aligned data file without loading the weights into a `ModelProto`; the graphs here are tiny, so that layout is
made with onnx's own writer (and, for one tensor, with torch's bare `location`, no offset or length).
"""

from __future__ import annotations

import json
import os

import numpy as np
import pytest

torch = pytest.importorskip("torch")
onnx = pytest.importorskip("onnx")
pytest.importorskip("onnxruntime")

from onnx import TensorProto, external_data_helper, helper, numpy_helper  # noqa: E402
from visionllm_edge.export.checkpoint import (  # noqa: E402
    load_reference,
    load_reference_parts,
    read_parts,
    release_parts,
    save_official,
)
from visionllm_edge.export.onnx.base import (  # noqa: E402
    EXTERNAL_DATA_ALIGNMENT,
    ExportSettings,
    export_graph,
    merge_external_data,
    run_onnx,
    validation_session,
)
from visionllm_edge.export.onnx.llm import (  # noqa: E402
    build_graph,
    random_inputs,
    reference_outputs,
    streamed_reference_outputs,
)


@pytest.fixture(scope="module")
def model():
    return load_reference("tiny-random")


@pytest.fixture(scope="module")
def checkpoint(model, tmp_path_factory):
    # Small shards, so that the LLM's layers lie in several of them.
    return save_official(model, tmp_path_factory.mktemp("mem") / "ckpt", max_shard_bytes=6 << 20)


def _mlp_graph() -> onnx.ModelProto:
    """x [1, 64] -> MatMul w1 [64, 96] -> Add b (96 floats) -> MatMul w2 [96, 8] -> Mul by one float."""
    rng = np.random.default_rng(0)
    inits = [
        numpy_helper.from_array(rng.standard_normal((64, 96)).astype(np.float32), "w1"),
        numpy_helper.from_array(rng.standard_normal(96).astype(np.float32), "b"),
        numpy_helper.from_array(rng.standard_normal((96, 8)).astype(np.float32), "w2"),
        numpy_helper.from_array(np.array([1.5], np.float32), "scale"),  # 4 bytes: always inline
    ]
    nodes = [
        helper.make_node("MatMul", ["x", "w1"], ["h"]),
        helper.make_node("Add", ["h", "b"], ["hb"]),
        helper.make_node("MatMul", ["hb", "w2"], ["o"]),
        helper.make_node("Mul", ["o", "scale"], ["y"]),
    ]
    graph = helper.make_graph(
        nodes,
        "mlp",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 64])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 8])],
        inits,
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def _per_tensor_layout(folder) -> onnx.ModelProto:
    """`folder/g.onnx` with every tensor over 64 bytes in its own file, as torch writes a graph over 2 GB."""
    model = _mlp_graph()
    external_data_helper.convert_model_to_external_data(
        model, all_tensors_to_one_file=False, size_threshold=64
    )
    onnx.save_model(model, str(folder / "g.onnx"))
    saved = onnx.load(str(folder / "g.onnx"), load_external_data=False)
    # torch names the file only (the whole file is the tensor): drop offset and length from one of them.
    w2 = next(t for t in saved.graph.initializer if t.name == "w2")
    location = next(e.value for e in w2.external_data if e.key == "location")
    del w2.external_data[:]
    w2.external_data.add(key="location", value=location)
    (folder / "g.onnx").write_bytes(saved.SerializeToString())
    return saved


def test_merge_streams_per_tensor_files_into_one_aligned_file(tmp_path):
    x = {"x": np.random.default_rng(1).standard_normal((1, 64)).astype(np.float32)}
    onnx.save_model(_mlp_graph(), str(tmp_path / "inline.onnx"))
    want = run_onnx(tmp_path / "inline.onnx", x)["y"]
    src_dir = tmp_path / "src"
    src_dir.mkdir()
    saved = _per_tensor_layout(src_dir)
    per_tensor = {e.value for t in saved.graph.initializer for e in t.external_data if e.key == "location"}
    assert len(per_tensor) == 3

    out = tmp_path / "out"
    out.mkdir()
    data = merge_external_data(src_dir / "g.onnx", out / "g.onnx", threshold=64)
    assert data == out / "g.onnx.data"
    # The per-tensor files are gone, only the source graph (the caller's) is left; nothing else was written.
    assert sorted(p.name for p in src_dir.iterdir()) == ["g.onnx"]
    assert sorted(p.name for p in out.iterdir()) == ["g.onnx", "g.onnx.data"]
    merged = onnx.load(str(out / "g.onnx"), load_external_data=False)
    placed = {}
    for tensor in merged.graph.initializer:
        fields = {e.key: e.value for e in tensor.external_data}
        if tensor.name == "scale":  # under the threshold: inline, as it was
            assert tensor.data_location == TensorProto.DEFAULT and not fields
            continue
        assert fields["location"] == "g.onnx.data"
        placed[tensor.name] = (int(fields["offset"]), int(fields["length"]))
    assert set(placed) == {"w1", "b", "w2"}
    assert all(offset % EXTERNAL_DATA_ALIGNMENT == 0 for offset, _ in placed.values()), placed
    assert placed["w1"][1] == 64 * 96 * 4 and placed["w2"][1] == 96 * 8 * 4
    onnx.checker.check_model(str(out / "g.onnx"))
    np.testing.assert_array_equal(run_onnx(out / "g.onnx", x)["y"], want)
    # Small external tensors come back inline with threshold above their size.
    again = tmp_path / "again"
    again.mkdir()
    merge_external_data(out / "g.onnx", again / "g.onnx", threshold=96 * 4 + 1)
    b = next(
        t
        for t in onnx.load(str(again / "g.onnx"), load_external_data=False).graph.initializer
        if t.name == "b"
    )
    assert b.data_location == TensorProto.DEFAULT and len(b.raw_data) == 96 * 4
    assert not (out / "g.onnx.data").exists()  # its last tensor was copied: the source data file went
    np.testing.assert_array_equal(run_onnx(again / "g.onnx", x)["y"], want)


def test_merge_in_place_and_from_inline(tmp_path):
    x = {"x": np.ones((1, 64), np.float32)}
    onnx.save_model(_mlp_graph(), str(tmp_path / "g.onnx"))
    want = run_onnx(tmp_path / "g.onnx", x)["y"]
    merge_external_data(tmp_path / "g.onnx", tmp_path / "g.onnx")  # inline weights out to the data file
    assert (tmp_path / "g.onnx.data").is_file()
    merge_external_data(tmp_path / "g.onnx", tmp_path / "g.onnx")  # its own data file in, and back
    assert sorted(p.name for p in tmp_path.iterdir()) == ["g.onnx", "g.onnx.data"]
    np.testing.assert_array_equal(run_onnx(tmp_path / "g.onnx", x)["y"], want)


def test_merge_names_a_missing_or_short_external_file(tmp_path):
    _per_tensor_layout(tmp_path)
    saved = onnx.load(str(tmp_path / "g.onnx"), load_external_data=False)
    w1_file = tmp_path / next(
        e.value
        for t in saved.graph.initializer
        if t.name == "w1"
        for e in t.external_data
        if e.key == "location"
    )
    content = w1_file.read_bytes()
    w1_file.unlink()
    with pytest.raises(
        ValueError, match=rf"tensor 'w1' needs external file '.*{w1_file.name}', which is missing"
    ):
        merge_external_data(tmp_path / "g.onnx", tmp_path / "out.onnx")
    w1_file.write_bytes(content[:100])
    with pytest.raises(
        ValueError, match=r"tensor 'w1' \[64, 96\] needs bytes \[0, 24576\) of .*holds 100 bytes"
    ):
        merge_external_data(tmp_path / "g.onnx", tmp_path / "out.onnx")
    # Nothing half-written is left behind, and the sources are untouched.
    assert not list(tmp_path.glob("out.onnx*")) and not list(tmp_path.glob(".*tmp*"))
    w1_file.write_bytes(content)
    w2 = next(t for t in saved.graph.initializer if t.name == "w2")
    w2.external_data[0].value = "../elsewhere"
    (tmp_path / "bad.onnx").write_bytes(saved.SerializeToString())
    with pytest.raises(
        ValueError, match="tensor 'w2' names external file '../elsewhere', which is not a file"
    ):
        merge_external_data(tmp_path / "bad.onnx", tmp_path / "out.onnx")


def test_export_graph_with_external_data_leaves_only_the_graph_and_its_data(model, tmp_path):
    graph = build_graph(model.llm, ExportSettings())
    export_graph(graph, tmp_path / "inline" / "llm.onnx")
    export_graph(graph, tmp_path / "ext" / "llm.onnx", external_data=True)
    assert sorted(p.name for p in (tmp_path / "inline").iterdir()) == ["llm.onnx"]
    assert sorted(p.name for p in (tmp_path / "ext").iterdir()) == ["llm.onnx", "llm.onnx.data"]
    inputs = random_inputs(model.llm, 3, 4, [0, 2], np.random.default_rng(5))
    want = run_onnx(tmp_path / "inline" / "llm.onnx", inputs)
    got = run_onnx(tmp_path / "ext" / "llm.onnx", inputs)
    for name in want:
        np.testing.assert_array_equal(got[name], want[name], err_msg=name)
    # The validation session (basic optimizations, no pre-packing) computes the same graph.
    session = validation_session(tmp_path / "ext" / "llm.onnx")
    names = [o.name for o in session.get_outputs()]
    for name, value in zip(names, session.run(names, inputs)):
        np.testing.assert_allclose(value, want[name], rtol=1e-5, atol=1e-5, err_msg=name)


def test_streamed_reference_is_bit_identical(model):
    rng = np.random.default_rng(3)
    cases = [random_inputs(model.llm, s, p, rows, rng) for s, p, rows in ((4, 0, [3]), (2, 5, [1, 0]))]
    want = [reference_outputs(model.llm, case) for case in cases]

    def weights(path):
        return {k: v.clone() for k, v in model.llm.get_submodule(path).state_dict().items()}

    got = streamed_reference_outputs(model.llm, cases, weights)
    for w, g in zip(want, got):
        assert w.keys() == g.keys()
        for name in w:
            np.testing.assert_array_equal(g[name], w[name], err_msg=name)


def test_parts_are_read_again_and_released(model, checkpoint):
    part = load_reference_parts(checkpoint, ["llm"], dtype=torch.float16)
    layer = part.llm.model.layers[1].mlp.up_proj.weight
    assert layer.dtype == torch.float16
    assert torch.equal(layer, model.llm.model.layers[1].mlp.up_proj.weight.half())
    state = read_parts(part, ["llm.model.layers.1"])
    full = model.state_dict()
    assert state and all(k.startswith("llm.model.layers.1.") for k in state)
    for key, value in state.items():
        assert value.dtype == torch.float32 and torch.equal(value, full[key]), key
    assert part.llm.model.layers[1].mlp.up_proj.weight is layer  # the model is not changed
    release_parts(part, ["llm.model.layers", "llm.lm_head"])
    assert all(p.device.type == "meta" for p in part.llm.model.layers.parameters())
    assert part.llm.lm_head.weight.device.type == "meta"
    assert part.llm.model.embed_tokens.weight.device.type == "cpu"  # not asked for: kept
    assert torch.equal(read_parts(part, ["llm.lm_head"])["llm.lm_head.weight"], full["llm.lm_head.weight"])


@pytest.mark.parametrize("precision", ["fp32", "fp16"])
def test_llm_from_a_checkpoint_validates_against_the_streamed_reference(
    model, checkpoint, precision, tmp_path, monkeypatch
):
    """Component by component, the LLM is loaded in the graph's precision, released after the export and
    validated against float32 weights read again layer by layer: the same numbers as from the whole model."""
    from visionllm_edge.export.exporter import export
    from visionllm_edge.export.onnx import llm as llm_module

    seen = []

    def spy(llm, cases, weights):
        seen.append(
            {p.dtype for p in llm.parameters()} | {p.device.type for p in llm.model.layers.parameters()}
        )
        return streamed_reference_outputs(llm, cases, weights)

    monkeypatch.setattr(llm_module, "streamed_reference_outputs", spy)
    by_part = export(checkpoint, tmp_path / "parts", components=["llm"], precision=precision, progress=False)
    # Loaded in the graph's dtype (the token table too), the layers released to meta before validation.
    assert seen == [{torch.float32 if precision == "fp32" else torch.float16, "meta"}]
    whole = export(
        "tiny-random",
        tmp_path / "whole",
        components=["llm"],
        precision=precision,
        model=model,
        progress=False,
    )
    assert by_part.validation["passed"], json.dumps(by_part.validation, indent=1)
    got, want = by_part.validation["graphs"]["llm"], whole.validation["graphs"]["llm"]
    assert got["shapes"] == want["shapes"]
    for name, entry in want["outputs"].items():
        assert got["outputs"][name]["max_abs"] == pytest.approx(entry["max_abs"], rel=1e-6, abs=1e-9), name
    assert sorted(os.listdir(tmp_path / "parts")) == sorted(os.listdir(tmp_path / "whole"))


# --- the LLM traced in pieces ---------------------------------------------------------------------------


@pytest.mark.parametrize("precision", ["fp32", "fp16"])
def test_llm_traced_in_pieces_is_the_whole_graph(model, precision, tmp_path, monkeypatch):
    """One layer per piece, joined: the same contract graph, computing bit-identical outputs."""
    from visionllm_edge.export.onnx import llm as llm_module
    from visionllm_edge.export.onnx.base import exporter_for
    from visionllm_edge.export.onnx.llm import io_names

    settings = ExportSettings(precision=precision)
    (single,) = exporter_for("llm").graphs(model, settings)
    assert len(single.pieces) == 1  # a small model is one piece: the whole graph
    export_graph(build_graph(model.llm, settings), tmp_path / "whole" / "llm.onnx")
    monkeypatch.setattr(llm_module, "PIECE_BYTES", 1)
    (pieced,) = exporter_for("llm").graphs(model, settings)
    n = model.llm.settings.num_hidden_layers
    assert len(pieced.pieces) == n
    path = tmp_path / "pieces" / "llm.onnx"
    export_graph(pieced, path)
    assert sorted(os.listdir(path.parent)) == ["llm.onnx", "llm.onnx.data"]  # no scratch left
    onnx.checker.check_model(str(path), full_check=True)
    graph = onnx.load(str(path), load_external_data=False).graph
    inputs, outputs = io_names(n)
    assert [v.name for v in graph.input] == inputs and [v.name for v in graph.output] == outputs
    assert {node.name.split("/")[0] for node in graph.node} == {f"piece{j}" for j in range(n)}
    rng = np.random.default_rng(11)
    for s, p, rows in ((5, 0, [4]), (1, 6, [0]), (3, 9, [2, 0, 1])):
        case = random_inputs(model.llm, s, p, rows, rng, np.float16 if precision == "fp16" else np.float32)
        want, got = run_onnx(tmp_path / "whole" / "llm.onnx", case), run_onnx(path, case)
        assert want.keys() == got.keys()
        for name in want:
            np.testing.assert_array_equal(got[name], want[name], err_msg=f"S={s},P={p} {name}")


def test_llm_pieces_from_a_checkpoint_hold_one_piece_at_a_time(model, checkpoint, tmp_path, monkeypatch):
    """Component by component, the LLM's layers are read from the checkpoint for their piece's trace only."""
    from visionllm_edge.export.exporter import export
    from visionllm_edge.export.onnx import llm as llm_module

    monkeypatch.setattr(llm_module, "PIECE_BYTES", 1)
    seen = []
    build = llm_module.build_graph

    def spy(llm, settings, attention="two_block", layers=None):
        loaded = [
            i for i, layer in enumerate(llm.model.layers) if layer.mlp.up_proj.weight.device.type != "meta"
        ]
        seen.append((layers, loaded, llm.lm_head.weight.device.type))
        return build(llm, settings, attention, layers)

    monkeypatch.setattr(llm_module, "build_graph", spy)
    result = export(checkpoint, tmp_path / "out", components=["llm"], precision="fp16", progress=False)
    n = model.llm.settings.num_hidden_layers
    assert seen == [(range(i, i + 1), [i], "cpu" if i == n - 1 else "meta") for i in range(n)]
    assert result.validation["passed"], json.dumps(result.validation, indent=1)


def test_piece_spans_are_greedy_consecutive_and_bounded(model):
    from visionllm_edge.export.onnx.llm import piece_spans

    llm = model.llm
    n = llm.settings.num_hidden_layers
    layer = sum(p.numel() for p in llm.model.layers[0].parameters()) * 4
    head = sum(p.numel() for m in (llm.model.norm, llm.lm_head) for p in m.parameters()) * 4
    assert piece_spans(llm, torch.float32, 1) == [range(i, i + 1) for i in range(n)]
    assert piece_spans(llm, torch.float32, n * layer + head) == [range(n)]
    assert piece_spans(llm, torch.float16, (n * layer + head) // 2) == [range(n)]  # half the bytes
    for limit in (2 * layer, 2 * layer + head, 3 * layer - 1):
        spans = piece_spans(llm, torch.float32, limit)
        assert [i for s in spans for i in s] == list(range(n))

        def cost(span):
            return len(span) * layer + (head if span.stop == n else 0)

        assert all(cost(s) <= limit or len(s) == 1 for s in spans), (limit, spans)
        assert all(cost(range(a.start, b.start + 1)) > limit for a, b in zip(spans, spans[1:])), (
            limit,
            spans,
        )


def _piece_graph(inputs, outputs, op, folder, name, constant=2.0):
    """A one-node piece `outputs[0] = op(inputs[0], c)` over `[2]` floats, with its constant in an external
    file beside it (as a traced piece keeps its weights)."""
    c = numpy_helper.from_array(np.full(2, constant, np.float32), "c")
    graph = helper.make_graph(
        [helper.make_node(op, [inputs[0], "c"], [outputs[0]], name="n")],
        "piece",
        [helper.make_tensor_value_info(i, TensorProto.FLOAT, [2]) for i in inputs],
        [helper.make_tensor_value_info(o, TensorProto.FLOAT, [2]) for o in outputs],
        [c],
    )
    m = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    external_data_helper.convert_model_to_external_data(m, location=f"{name}.data", size_threshold=0)
    onnx.save_model(m, str(folder / f"{name}.onnx"))
    return folder / f"{name}.onnx"


def test_join_pieces_links_them_and_names_what_is_missing(tmp_path):
    from visionllm_edge.export.onnx.base import PIECE_IN, PIECE_OUT, join_pieces

    a = _piece_graph(["x"], [PIECE_OUT], "Mul", tmp_path, "a", 3.0)
    b = _piece_graph([PIECE_IN], ["y"], "Add", tmp_path, "b", 1.0)
    join_pieces([a, b], tmp_path / "joined.onnx", ["x"], ["y"])
    merge_external_data(tmp_path / "joined.onnx", tmp_path / "final.onnx", threshold=0)
    got = run_onnx(tmp_path / "final.onnx", {"x": np.array([1.0, -2.0], np.float32)})
    np.testing.assert_array_equal(got["y"], [4.0, -5.0])  # (x * 3) + 1: piece a, then piece b
    c = _piece_graph(["x"], ["y"], "Add", tmp_path, "c")
    with pytest.raises(ValueError, match=r"c\.onnx: piece 1 of 2 must take 'piece_in'"):
        join_pieces([a, c], tmp_path / "bad.onnx", ["x"], ["y"])
    b = _piece_graph([PIECE_IN], ["y"], "Add", tmp_path, "b")
    with pytest.raises(ValueError, match=r"no piece has the graph output\(s\) \['z'\]"):
        join_pieces([a, b], tmp_path / "bad.onnx", ["x"], ["y", "z"])
    assert not (tmp_path / "bad.onnx").exists()


def test_a_piece_names_weights_it_cannot_read(checkpoint):
    from visionllm_edge.export.onnx.base import exporter_for

    part = load_reference_parts(checkpoint, ["embeddings"])  # the LLM's layers stay on meta
    part.checkpoint_dir = None
    (graph,) = exporter_for("llm").graphs(part, ExportSettings())
    with pytest.raises(
        ValueError, match=r"llm\.model\.layers\.0: its weights are not loaded, and the model has no"
    ):
        with graph.pieces[0]():
            pass
