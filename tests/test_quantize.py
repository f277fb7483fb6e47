"""`export/onnx/quantize.py`: the quantized graphs compute what their quantization step says, within bounds
derived from that step, on fresh random inputs.

Single-MatMul graphs are checked element by element against a hard bound: a value rounded to a grid of step
d is off by at most d/2, so `|x̂ ŵ - x w| <= sum_k |x_k| |δw_k| + |δx_k| |ŵ_k|` with each |δ| at most half
its step. Whole LLM graphs are checked against the same computation spelled in standard float ONNX ops (the
dequantized weights, and for int8 the activations through DynamicQuantizeLinear -> DequantizeLinear), which
they must equal to float32 rounding: this checks the rewrite (wiring, fused layouts, shared weights), not
the model's sensitivity to quantization, which the shapes-tiny evaluation measures
(benchmarks/results/quantization.md).
"""

from __future__ import annotations

import numpy as np
import pytest

onnx = pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")
pytest.importorskip("torch")

from onnx import TensorProto, helper, numpy_helper  # noqa: E402
from visionllm_edge.export import load_reference  # noqa: E402
from visionllm_edge.export.onnx.base import ExportSettings, export_graph, exporter_for, run_onnx  # noqa: E402
from visionllm_edge.export.onnx.llm import build_graph, random_inputs  # noqa: E402
from visionllm_edge.export.onnx.quantize import (  # noqa: E402
    PRECISIONS,
    graph_bytes,
    quantize,
    quantize_int4,
    quantize_int8,
    weight_matmuls,
)

#: float32 accumulation over K <= a few hundred terms, relative to the sum of |terms|.
_FLOAT_SLACK = 1e-5


def _matmul_graph(path, weight, k, dynamic_b=False):
    """y = A @ W (W a constant); with `dynamic_b`, also z = A @ Bin with Bin a graph input."""
    n = weight.shape[1]
    nodes = [helper.make_node("MatMul", ["A", "W"], ["Y"], name="weight_mm")]
    inputs = [helper.make_tensor_value_info("A", TensorProto.FLOAT, ["M", k])]
    outputs = [helper.make_tensor_value_info("Y", TensorProto.FLOAT, ["M", n])]
    if dynamic_b:
        nodes.append(helper.make_node("MatMul", ["A", "Bin"], ["Z"], name="dynamic_mm"))
        inputs.append(helper.make_tensor_value_info("Bin", TensorProto.FLOAT, [k, 3]))
        outputs.append(helper.make_tensor_value_info("Z", TensorProto.FLOAT, ["M", 3]))
    graph = helper.make_graph(nodes, "g", inputs, outputs, [numpy_helper.from_array(weight, "W")])
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), str(path))
    return path


def _weights_and_inputs(rng, k, n, m):
    # Columns of different magnitudes (per-channel scales matter) and an input with an offset (the
    # activation range is not symmetric around 0).
    weight = (rng.standard_normal((k, n)) * rng.uniform(0.05, 2.0, n)).astype(np.float32)
    x = (rng.standard_normal((m, k)) + 0.7).astype(np.float32)
    return weight, x


def _initializers(path):
    m = onnx.load(str(path))
    return m, {t.name: numpy_helper.to_array(t) for t in m.graph.initializer}


def _dynamic_quantize(x):
    """DynamicQuantizeLinear's uint8 grid as the ONNX operator defines it: x's range and 0 in 255 steps."""
    lo, hi = min(float(x.min()), 0.0), max(float(x.max()), 0.0)
    step = np.float32((hi - lo) / 255.0)
    zero = np.clip(np.rint(-lo / step), 0, 255)
    q = np.clip(np.rint(x / step) + zero, 0, 255)
    return q, zero, step


def test_int8_matmul_is_the_integer_product_and_within_half_steps(tmp_path):
    rng = np.random.default_rng(11)
    k, n = 200, 24
    weight, x = _weights_and_inputs(rng, k, n, 5)
    src = _matmul_graph(tmp_path / "mm.onnx", weight, k, dynamic_b=True)
    result = quantize_int8(src, tmp_path / "mm_int8.onnx")
    assert result.quantized == ("weight_mm",)
    m, inits = _initializers(result.path)
    ops = {node.name: node.op_type for node in m.graph.node}
    assert ops == {"weight_mm_Q8": "DynamicQuantizeMatMul", "dynamic_mm": "MatMul"}
    bin_ = rng.standard_normal((k, 3)).astype(np.float32)
    got = run_onnx(result.path, {"A": x, "Bin": bin_})
    np.testing.assert_array_equal(got["Z"], x @ bin_)  # the MatMul over a graph input is untouched

    # The weights: per column, symmetric, 127 steps each side of 0.
    w_step = np.abs(weight).max(axis=0) / 127.0
    qw = inits["weight_mm.q8.B"].astype(np.int64)
    np.testing.assert_allclose(inits["weight_mm.q8.scale"], w_step, rtol=1e-6)
    np.testing.assert_array_equal(qw, np.rint(weight / inits["weight_mm.q8.scale"]))
    # The product: integers, then the two scales.
    qa, zero, a_step = _dynamic_quantize(x)
    exact = ((qa - zero).astype(np.int64) @ qw) * (a_step * inits["weight_mm.q8.scale"].astype(np.float64))
    np.testing.assert_allclose(got["Y"], exact, rtol=_FLOAT_SLACK, atol=_FLOAT_SLACK * np.abs(exact).max())
    # Against the float product: each operand within half its step.
    bound = np.abs(x) @ np.broadcast_to(w_step / 2, weight.shape) + (a_step / 2) * (
        np.abs(weight) + w_step / 2
    ).sum(axis=0)
    err = np.abs(got["Y"] - x @ weight)
    assert (err <= bound * (1 + _FLOAT_SLACK)).all(), float((err / bound).max())


def _dequantize_nbits(inits, prefix, k, n, block_size, symmetric):
    """MatMulNBits' B, scales and zero points back to the `[K, N]` weight they stand for (4 bits)."""
    packed = inits[f"{prefix}.B"]
    blocks = packed.shape[1]
    assert packed.shape == (n, blocks, block_size // 2)
    q = np.stack([packed & 0x0F, packed >> 4], axis=-1).reshape(n, blocks, block_size).astype(np.float64)
    if symmetric:
        zero = np.full((n, blocks), 8.0)
    else:
        zp = inits[f"{prefix}.zero_points"]
        zero = np.stack([zp & 0x0F, zp >> 4], axis=-1).reshape(n, -1)[:, :blocks].astype(np.float64)
    scales = inits[f"{prefix}.scales"].astype(np.float64)
    w = (q - zero[..., None]) * scales[..., None]
    return w.reshape(n, blocks * block_size)[:, :k].T, scales


@pytest.mark.parametrize("symmetric", [False, True])
def test_int4_weights_within_half_a_step_and_the_product_within_the_activation_steps(tmp_path, symmetric):
    rng = np.random.default_rng(12)
    k, n, block = 200, 24, 32  # K is not a whole number of blocks: the last block is padded
    weight, x = _weights_and_inputs(rng, k, n, 5)
    src = _matmul_graph(tmp_path / "mm.onnx", weight, k)
    outs = {}
    for level in (1, 4):
        result = quantize_int4(
            src,
            tmp_path / f"mm_int4_{level}.onnx",
            block_size=block,
            accuracy_level=level,
            symmetric=symmetric,
        )
        m, inits = _initializers(result.path)
        (node,) = m.graph.node
        assert node.op_type == "MatMulNBits" and node.domain == "com.microsoft"
        attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
        assert attrs == {"K": k, "N": n, "bits": 4, "block_size": block, "accuracy_level": level}
        outs[level] = run_onnx(result.path, {"A": x})["Y"]
    w_hat, scales = _dequantize_nbits(inits, "weight_mm.q4", k, n, block, symmetric)
    # Each weight within half a step of its block (the step is the block's scale). The symmetric grid is
    # [-8, 7] steps with the block's largest magnitude at -8: a value on the other side clips at 7 steps.
    step = np.abs(np.repeat(scales.T, block, axis=0)[:k])
    bound = np.maximum(step / 2, np.abs(weight) - 7 * step) if symmetric else step / 2
    assert (np.abs(w_hat - weight) <= bound * (1 + 1e-6)).all()
    # accuracy_level 1 computes in float32 with the dequantized weights.
    want = x.astype(np.float64) @ w_hat
    np.testing.assert_allclose(outs[1], want, rtol=_FLOAT_SLACK, atol=_FLOAT_SLACK * np.abs(want).max())
    # accuracy_level 4 also quantizes A, per block of K, symmetric int8: each value within half of
    # max|block| / 127.
    padded = np.pad(np.abs(x), ((0, 0), (0, -k % block)))
    a_step = np.repeat(padded.reshape(len(x), -1, block).max(axis=2) / 127.0, block, axis=1)[:, :k]
    bound = (a_step / 2) @ np.abs(w_hat)
    err = np.abs(outs[4] - want)
    assert (err <= bound * (1 + _FLOAT_SLACK) + _FLOAT_SLACK * np.abs(want).max()).all(), float(
        (err / bound).max()
    )


# Whole LLM graphs (tiny-random), against their quantization spelled in float ONNX.


@pytest.fixture(scope="module")
def llm_fp32(tmp_path_factory):
    model = load_reference("tiny-random")
    (graph,) = exporter_for("llm").graphs(model, ExportSettings())
    path = tmp_path_factory.mktemp("llm_fp32") / "llm.onnx"
    export_graph(graph, path)
    return model, path


def _emulation(fp32_path, quantized_path, dst, kind):
    """The fp32 graph with each quantized MatMul's weight replaced by its dequantized value, and for int8
    its input passed through DynamicQuantizeLinear -> DequantizeLinear: what the quantized graph computes."""
    m = onnx.load(str(fp32_path))
    _, q_inits = _initializers(quantized_path)
    inits = {t.name: t for t in m.graph.initializer}
    new_nodes = []
    for node in m.graph.node:
        prefix = f"{node.name}.q8" if kind == "int8" else f"{node.name}.q4"
        if node.op_type != "MatMul" or f"{prefix}.B" not in q_inits:
            new_nodes.append(node)
            continue
        k, n = inits[node.input[1]].dims
        if kind == "int8":
            w_hat = q_inits[f"{prefix}.B"].astype(np.float32) * q_inits[f"{prefix}.scale"]
            a = [f"{node.name}.qa", f"{node.name}.qa_scale", f"{node.name}.qa_zero"]
            new_nodes.append(helper.make_node("DynamicQuantizeLinear", [node.input[0]], a))
            new_nodes.append(helper.make_node("DequantizeLinear", a, [f"{node.name}.a_hat"]))
            x = f"{node.name}.a_hat"
        else:
            w_hat = _dequantize_nbits(q_inits, prefix, k, n, 32, symmetric=False)[0].astype(np.float32)
            x = node.input[0]
        name = f"{node.name}.w_hat"
        m.graph.initializer.append(numpy_helper.from_array(w_hat, name))
        new_nodes.append(helper.make_node("MatMul", [x, name], list(node.output), name=node.name))
    del m.graph.node[:]
    m.graph.node.extend(new_nodes)
    onnx.save(m, str(dst))
    return dst


def _relative_error(got, want):
    return float(np.linalg.norm(got - want) / np.linalg.norm(want))


@pytest.mark.parametrize("kind", ["int8", "int4"])
def test_quantized_llm_equals_its_quantization_in_float_onnx(llm_fp32, kind, tmp_path):
    model, fp32 = llm_fp32
    weights = [n.name for n in weight_matmuls(onnx.load(str(fp32)))]
    if kind == "int8":
        result = quantize_int8(fp32, tmp_path / "llm_int8.onnx")
    else:  # weight-only: accuracy level 1 keeps A in float32, as the emulation does
        result = quantize_int4(fp32, tmp_path / "llm_int4.onnx", accuracy_level=1)
    assert set(result.quantized) == set(weights) and result.kept == ()
    assert result.dst_bytes < result.src_bytes
    m = onnx.load(str(result.path))
    ops = [node.op_type for node in m.graph.node]
    assert ops.count("DynamicQuantizeMatMul" if kind == "int8" else "MatMulNBits") == len(weights)
    # The attention products (over the past and the step's own K/V) stay float MatMuls.
    assert ops.count("MatMul") == 2 * 2 * model.llm.settings.num_hidden_layers
    emulated = _emulation(fp32, result.path, tmp_path / "emulated.onnx", kind)
    rng = np.random.default_rng(21)
    for s, p, rows in ((5, 40, [0, 4]), (1, 9, [0])):
        inputs = random_inputs(model.llm, s, p, rows, rng)
        got, want, ref = run_onnx(result.path, inputs), run_onnx(emulated, inputs), run_onnx(fp32, inputs)
        for name in ("logits", "hidden", "present_key.0", "present_value.2"):
            scale = np.abs(want[name]).max()
            np.testing.assert_allclose(got[name], want[name], rtol=1e-4, atol=1e-4 * scale, err_msg=name)
        print(
            f"{kind} S={s} P={p}: relative error of the logits against fp32 "
            f"{_relative_error(got['logits'], ref['logits']):.4f}"
        )


def test_kept_layers_stay_float32(llm_fp32, tmp_path):
    _, fp32 = llm_fp32
    src = onnx.load(str(fp32))
    src_inits = {t.name: numpy_helper.to_array(t) for t in src.graph.initializer}
    weights = weight_matmuls(src)
    head = next(n for n in weights if "lm_head" in n.name)
    first = weights[0]
    for kind in PRECISIONS:
        result = quantize(fp32, tmp_path / f"keep_{kind}.onnx", kind, keep=[head.name, first.name])
        assert set(result.kept) == {head.name, first.name}
        assert set(result.quantized) == {n.name for n in weights} - {head.name, first.name}
        m, inits = _initializers(result.path)
        by_name = {n.name: n for n in m.graph.node}
        for kept in (head, first):
            node = by_name[kept.name]
            assert node.op_type == "MatMul"
            b = next(t for t in m.graph.initializer if t.name == node.input[1])
            assert b.data_type == TensorProto.FLOAT
            np.testing.assert_array_equal(inits[node.input[1]], src_inits[kept.input[1]])


def test_bad_inputs_are_named(tmp_path):
    rng = np.random.default_rng(3)
    # Only a MatMul over two graph inputs (an attention product): nothing to quantize.
    a, b = (helper.make_tensor_value_info(x, TensorProto.FLOAT, [4, 4]) for x in "AB")
    y = helper.make_tensor_value_info("Y", TensorProto.FLOAT, [4, 4])
    graph = helper.make_graph([helper.make_node("MatMul", ["A", "B"], ["Y"])], "g", [a, b], [y])
    no_weights = tmp_path / "dyn.onnx"
    onnx.save(helper.make_model(graph), str(no_weights))
    for kind in PRECISIONS:
        with pytest.raises(ValueError, match=r"dyn\.onnx: no MatMul with a float32 weight"):
            quantize(no_weights, tmp_path / "out.onnx", kind)
    src = _matmul_graph(tmp_path / "mm.onnx", rng.standard_normal((64, 8)).astype(np.float32), 64)
    with pytest.raises(ValueError, match=r"precision: expected one of \('int8', 'int4'\), got 'int3'"):
        quantize(src, tmp_path / "out.onnx", "int3")
    with pytest.raises(ValueError, match=r"keep: \['lm_head'\] are not weight MatMuls of .*mm\.onnx"):
        quantize_int8(src, tmp_path / "out.onnx", keep=["lm_head"])
    with pytest.raises(ValueError, match=r"block_size: expected one of \(16, 32, 64, 128, 256\), got 48"):
        quantize_int4(src, tmp_path / "out.onnx", block_size=48)
    assert not (tmp_path / "out.onnx").exists()


def test_quantization_reads_and_writes_external_data(llm_fp32, tmp_path):
    model, _ = llm_fp32
    export_graph(build_graph(model.llm, ExportSettings()), tmp_path / "llm.onnx", external_data=True)
    assert (tmp_path / "llm.onnx.data").is_file()
    inputs = random_inputs(model.llm, 2, 3, [1], np.random.default_rng(9))
    for kind in PRECISIONS:
        # Small enough for one file by default; external data on request (what a 7B result needs).
        one_file = quantize(tmp_path / "llm.onnx", tmp_path / f"q_{kind}.onnx", kind)
        split = quantize(tmp_path / "llm.onnx", tmp_path / f"q_{kind}_ext.onnx", kind, external_data=True)
        assert not (tmp_path / f"q_{kind}.onnx.data").exists()
        assert (tmp_path / f"q_{kind}_ext.onnx.data").is_file()
        assert split.dst_bytes == graph_bytes(split.path)
        a, b = run_onnx(one_file.path, inputs), run_onnx(split.path, inputs)
        np.testing.assert_array_equal(a["logits"], b["logits"])
