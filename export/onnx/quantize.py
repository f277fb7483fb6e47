"""Weight quantization of exported graphs for ONNX Runtime: int8 (weights and activations) and int4 weights.

Only MatMuls whose B input is a constant 2-D weight are touched, whatever their layout (fused QKV or gate/up
weights are just wider B). The attention MatMuls (queries against the past K/V) stay float: quantizing them
would quantize the KV arena on every step, which costs a full read and write of the past and breaks the
in-place read of the sequence-major past (docs/architecture.md §4). `keep` leaves named weight MatMuls in
float32 as well.

Both precisions rewrite the graph node by node (`_rewrite`), reading one float weight at a time from the
source's external data, and write the result in one file when it fits a 2 GB protobuf (a 2-layer 7B-width
LLM does: 0.54 GB int8, 0.34 GB int4), else with its external data in `<dst name>.data` beside it (the
32-layer 7B: about 6.6 GB int8, 4 GB int4). The nodes are ONNX Runtime contrib ops, fully specified by its
contrib-op documentation: `DynamicQuantizeMatMul` for int8, `MatMulNBits` for int4, the latter packed by
ONNX Runtime's own block quantization kernel (the one its `MatMulNBitsQuantizer` calls; that module imports
`onnx_ir`, which is not among our dependencies, and configures the root logger at import time).

`benchmarks/results/quantization.md` has what each precision keeps of the shapes-tiny metrics and what it
gains at 7B widths.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, external_data_helper, numpy_helper

#: What `quantize` takes.
PRECISIONS = ("int8", "int4")
#: The block sizes ONNX Runtime's block quantization kernel supports.
_BLOCK_SIZES = (16, 32, 64, 128, 256)
#: Protobuf's hard limit, less a margin for the graph itself.
_PROTO_LIMIT = (1 << 31) - (64 << 20)


@dataclass(frozen=True)
class QuantizeResult:
    """What a quantization wrote.

    Attributes:
        path: the quantized graph.
        src_bytes / dst_bytes: bytes on disk of the source and the result (graph file + external data).
        quantized: names of the MatMul nodes whose weights were quantized.
        kept: names of the weight MatMul nodes left in float32 (`keep`).
    """

    path: Path
    src_bytes: int
    dst_bytes: int
    quantized: tuple[str, ...]
    kept: tuple[str, ...] = ()


def graph_bytes(path: str | Path) -> int:
    """Bytes on disk of a graph: its file plus every external data file it names."""
    path = Path(path)
    model = onnx.load(str(path), load_external_data=False)
    files = {path}
    for tensor in model.graph.initializer:
        if external_data_helper.uses_external_data(tensor):
            info = external_data_helper.ExternalDataInfo(tensor)
            files.add(path.parent / info.location)
    return sum(f.stat().st_size for f in files)


def weight_matmuls(model: onnx.ModelProto) -> list[onnx.NodeProto]:
    """MatMul nodes of the main graph whose B input is a 2-D float32 initializer."""
    inits = {t.name: t for t in model.graph.initializer}
    out = []
    for node in model.graph.node:
        if node.op_type != "MatMul" or node.input[1] not in inits:
            continue
        b = inits[node.input[1]]
        if len(b.dims) == 2 and b.data_type == TensorProto.FLOAT:
            out.append(node)
    return out


def _tensor_bytes(tensor: TensorProto) -> int:
    """Bytes of an initializer's values, inline or external, from its header alone."""
    if external_data_helper.uses_external_data(tensor):
        length = external_data_helper.ExternalDataInfo(tensor).length
        if length:
            return int(length)
    if tensor.raw_data:
        return len(tensor.raw_data)
    itemsize = np.dtype(onnx.helper.tensor_dtype_to_np_dtype(tensor.data_type)).itemsize
    return int(np.prod(tensor.dims, dtype=np.int64)) * itemsize


def _named(model: onnx.ModelProto) -> onnx.ModelProto:
    """Gives every unnamed node a unique name: the quantizers select nodes by name."""
    taken = {n.name for n in model.graph.node if n.name}
    for i, node in enumerate(model.graph.node):
        if not node.name:
            name = f"{node.op_type}_{i}"
            while name in taken:
                name += "_"
            node.name = name
            taken.add(name)
    return model


def _check_fp32_weights(model: onnx.ModelProto, src: Path) -> list[onnx.NodeProto]:
    nodes = weight_matmuls(model)
    if not nodes:
        raise ValueError(f"{src}: no MatMul with a float32 weight to quantize (quantize an fp32 export)")
    return nodes


def _remove_data_file(dst: Path) -> Path:
    """Removes a stale external data file of `dst`: onnx appends to an existing one, never replaces it."""
    data_file = dst.parent / (dst.name + ".data")
    data_file.unlink(missing_ok=True)
    return data_file


def _load_tensor(tensor: TensorProto, base: Path) -> np.ndarray:
    """One initializer's values, reading its external data alone (never the whole model's)."""
    if external_data_helper.uses_external_data(tensor):
        external_data_helper.load_external_data_for_tensor(tensor, str(base))
        tensor.data_location = TensorProto.DEFAULT
        del tensor.external_data[:]
    return numpy_helper.to_array(tensor)


def _block_quantize(weight: np.ndarray, bits: int, block_size: int, symmetric: bool):
    """`[K, N]` float32 -> MatMulNBits B `[N, k_blocks, block_size * bits / 8]` uint8, scales, zero points.

    Blocks run along K within one output column, as MatMulNBits reads them; K is zero-padded to whole blocks.
    """
    from onnxruntime.capi._pybind_state import quantize_matmul_4bits, quantize_matmul_8bits

    rows, cols = weight.shape
    per_byte = 8 // bits
    k_blocks = (rows + block_size - 1) // block_size
    pad = k_blocks * block_size - rows
    if pad:
        weight = np.pad(weight, ((0, pad), (0, 0)))
    weight = np.ascontiguousarray(weight, dtype=np.float32)
    packed = np.zeros((cols, k_blocks, block_size // per_byte), dtype=np.uint8)
    scales = np.zeros((cols, k_blocks), dtype=np.float32)
    zero_points = np.zeros((cols, (k_blocks + per_byte - 1) // per_byte), dtype=np.uint8)
    kernel = quantize_matmul_8bits if bits == 8 else quantize_matmul_4bits
    # ORT's kernel takes the unpadded K: the padded tail of the last block is ignored, as in its quantizer.
    kernel(packed, weight, scales, zero_points, block_size, cols, rows, symmetric)
    return packed, scales, zero_points


def quantize(
    src_path: str | Path,
    dst_path: str | Path,
    precision: str,
    keep: Iterable[str] = (),
    external_data: bool | None = None,
) -> QuantizeResult:
    """`quantize_int8` or `quantize_int4` (with its defaults) by name."""
    if precision == "int8":
        return quantize_int8(src_path, dst_path, keep=keep, external_data=external_data)
    if precision == "int4":
        return quantize_int4(src_path, dst_path, keep=keep, external_data=external_data)
    raise ValueError(f"precision: expected one of {PRECISIONS}, got {precision!r}")


def quantize_int8(
    src_path: str | Path,
    dst_path: str | Path,
    keep: Iterable[str] = (),
    external_data: bool | None = None,
) -> QuantizeResult:
    """Per-channel int8 weights, activations quantized per call: `com.microsoft.DynamicQuantizeMatMul`.

    Each weight column n gets the symmetric scale `max_k |W[k, n]| / 127`; ONNX Runtime quantizes A per
    tensor to uint8 on every call (the range of A and 0, in 255 steps) and runs an integer GEMM. This is the
    node ONNX Runtime's graph optimizer fuses `quantize_dynamic`'s output into; writing it directly reads one
    weight at a time (`quantize_dynamic` holds the whole graph several times: 6.9 GB for the 2.1 GB 2-layer
    7B-width LLM), so the 32-layer 7B quantizes in about its int8 size.

    Args:
        src_path: an fp32 graph (external data allowed).
        dst_path: where to write; its external data, if any, goes to `dst_path.name + ".data"` beside it.
        keep: names of weight MatMul nodes to leave in float32.
        external_data: write external data (True), one file (False), or external only over 2 GB (None).

    Returns:
        Sizes, the quantized and the kept node names.
    """

    def build(node: onnx.NodeProto, weight: np.ndarray):
        peak = np.abs(weight).max(axis=0)
        # An all-zero column quantizes to zeros under any scale; 1 keeps the division finite.
        scale = np.where(peak > 0, peak / 127.0, 1.0).astype(np.float32)
        values = np.clip(np.rint(weight / scale), -127, 127).astype(np.int8)
        names = [node.input[0], f"{node.name}.q8.B", f"{node.name}.q8.scale"]
        q = onnx.helper.make_node(
            "DynamicQuantizeMatMul", names, list(node.output), name=f"{node.name}_Q8", domain="com.microsoft"
        )
        return q, [numpy_helper.from_array(values, names[1]), numpy_helper.from_array(scale, names[2])]

    return _rewrite(Path(src_path), Path(dst_path), build, set(keep), external_data)


def quantize_int4(
    src_path: str | Path,
    dst_path: str | Path,
    block_size: int = 32,
    accuracy_level: int = 4,
    symmetric: bool = False,
    keep: Iterable[str] = (),
    external_data: bool | None = None,
) -> QuantizeResult:
    """Weight-only 4-bit quantization: each weight MatMul becomes `com.microsoft.MatMulNBits`.

    Args:
        src_path: an fp32 graph (external data allowed).
        dst_path: where to write.
        block_size: weights per scale along K (a power of two, 16 to 256: ORT's kernel's sizes).
        accuracy_level: MatMulNBits' minimum compute precision of A (4: int8, the fast path on CPU).
        symmetric: without zero points (asymmetric, the default, is what ORT's quantizer writes by default).
        keep, external_data: as for `quantize_int8`.

    Returns:
        Sizes, the quantized and the kept node names.
    """
    return _quantize_nbits(src_path, dst_path, 4, block_size, accuracy_level, symmetric, keep, external_data)


def _quantize_nbits(src_path, dst_path, bits, block_size, accuracy_level, symmetric, keep, external_data):
    if block_size not in _BLOCK_SIZES:
        raise ValueError(f"block_size: expected one of {_BLOCK_SIZES}, got {block_size}")

    def build(node: onnx.NodeProto, weight: np.ndarray):
        k, n = weight.shape
        packed, scales, zero_points = _block_quantize(weight, bits, block_size, symmetric)
        prefix = f"{node.name}.q{bits}"
        inputs = [node.input[0], f"{prefix}.B", f"{prefix}.scales"]
        tensors = [numpy_helper.from_array(packed, inputs[1]), numpy_helper.from_array(scales, inputs[2])]
        if not symmetric:
            inputs.append(f"{prefix}.zero_points")
            tensors.append(numpy_helper.from_array(zero_points, inputs[3]))
        q = onnx.helper.make_node(
            "MatMulNBits",
            inputs,
            list(node.output),
            name=f"{node.name}_Q{bits}",
            domain="com.microsoft",
            K=k,
            N=n,
            bits=bits,
            block_size=block_size,
            accuracy_level=accuracy_level,
        )
        return q, tensors

    return _rewrite(Path(src_path), Path(dst_path), build, set(keep), external_data)


def _rewrite(src: Path, dst: Path, build, keep: set[str], external_data: bool | None) -> QuantizeResult:
    """Replaces each weight MatMul of `src` not in `keep` by `build(node, weight) -> (node, initializers)`,
    and writes `dst`. Weights are read one at a time, so a graph with external data never enters memory whole.
    """
    model = _named(onnx.load(str(src), load_external_data=False))
    nodes = _check_fp32_weights(model, src)
    unknown = keep - {n.name for n in nodes}
    if unknown:
        raise ValueError(
            f"keep: {sorted(unknown)} are not weight MatMuls of {src} "
            f"(it has {len(nodes)}, e.g. {nodes[0].name!r})"
        )
    kept_nodes = tuple(n.name for n in nodes if n.name in keep)
    nodes = [n for n in nodes if n.name not in keep]
    dst.parent.mkdir(parents=True, exist_ok=True)
    graph = model.graph
    inits = {t.name: t for t in graph.initializer}
    consumers: dict[str, int] = {}
    for node in graph.node:
        for name in node.input:
            consumers[name] = consumers.get(name, 0) + 1
    replaced: dict[int, onnx.NodeProto] = {}
    new_inits: list[TensorProto] = []
    dropped: set[str] = set()
    done = []
    for node in nodes:
        # Read beside the proto, not into it: the float weight leaves memory once quantized.
        weight = numpy_helper.to_array(inits[node.input[1]], str(src.parent))
        q, tensors = build(node, weight)
        del weight
        new_inits += tensors
        replaced[id(node)] = q
        done.append(node.name)
        consumers[node.input[1]] -= 1
        if consumers[node.input[1]] == 0:
            dropped.add(node.input[1])
    new_nodes = [replaced.get(id(node), node) for node in graph.node]
    del graph.node[:]
    graph.node.extend(new_nodes)
    kept = [t for t in graph.initializer if t.name not in dropped]
    for t in kept:  # bring the rest into memory so that the result is self-contained or re-externalised
        _load_tensor(t, src.parent)
    del graph.initializer[:]
    graph.initializer.extend(kept + new_inits)
    if not any(op.domain == "com.microsoft" for op in model.opset_import):
        model.opset_import.append(onnx.helper.make_opsetid("com.microsoft", 1))
    size = sum(_tensor_bytes(t) for t in graph.initializer)
    data_file = _remove_data_file(dst)
    if external_data or (external_data is None and size > _PROTO_LIMIT):
        onnx.save_model(
            model,
            str(dst),
            save_as_external_data=True,
            all_tensors_to_one_file=True,
            location=data_file.name,
            size_threshold=1024,
        )
    else:
        onnx.save_model(model, str(dst))
    return QuantizeResult(dst, graph_bytes(src), graph_bytes(dst), tuple(done), kept_nodes)
