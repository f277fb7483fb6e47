"""Weight quantization of exported graphs for ONNX Runtime: int8 dynamic and int4 weight-only.

Only MatMuls whose B input is a constant weight are touched. The attention MatMuls (queries against the past
K/V) stay float: quantizing them would quantize the KV arena on every step, which costs a full read and write
of the past and breaks the in-place read of the sequence-major past (docs/architecture.md §4).

Both functions read graphs that keep their weights in external data, and write the result in one file when
it fits a 2 GB protobuf (a 2-layer 7B-width LLM does: 0.54 GB int8, 0.34 GB int4), else with its external
data in `<dst name>.data` beside it (the 32-layer 7B: about 6.6 GB int8, 4 GB int4).

`quantize_int4` builds the `com.microsoft.MatMulNBits` nodes itself, with ONNX Runtime's own block
quantization kernel (the one `MatMulNBitsQuantizer` calls). ORT 1.32's `matmul_nbits_quantizer` module
imports `onnx_ir`, which is not among our dependencies, and configures the root logger at import time; the
node it writes for the default algorithm is fully specified by the contrib-op documentation, so we write it
here.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, external_data_helper, numpy_helper

#: Protobuf's hard limit, less a margin for the graph itself.
_PROTO_LIMIT = (1 << 31) - (64 << 20)


@dataclass(frozen=True)
class QuantizeResult:
    """What a quantization wrote.

    Attributes:
        path: the quantized graph.
        src_bytes / dst_bytes: bytes on disk of the source and the result (graph file + external data).
        quantized: names of the MatMul nodes whose weights were quantized.
    """

    path: Path
    src_bytes: int
    dst_bytes: int
    quantized: tuple[str, ...]


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


def quantize_int8(
    src_path: str | Path, dst_path: str | Path, external_data: bool | None = None
) -> QuantizeResult:
    """ONNX Runtime dynamic quantization of MatMul weights: per-channel QInt8, activations quantized per call.

    Args:
        src_path: an fp32 graph (external data allowed).
        dst_path: where to write; its external data, if any, goes to `dst_path.name + ".data"` beside it.
        external_data: write external data (True), one file (False), or external only over 2 GB (None).

    Returns:
        Sizes and the quantized node names.
    """
    from onnxruntime.quantization import QuantType, quantize_dynamic

    src, dst = Path(src_path), Path(dst_path)
    dst.parent.mkdir(parents=True, exist_ok=True)
    header = onnx.load(str(src), load_external_data=False)
    unnamed = any(not n.name for n in header.graph.node)
    weights = _check_fp32_weights(header, src)
    nodes = [n.name for n in weights]
    # int8 keeps a quarter of each quantized weight; everything else stays as it is.
    inits = {t.name: t for t in header.graph.initializer}
    total = sum(_tensor_bytes(t) for t in header.graph.initializer)
    quantized = sum(_tensor_bytes(inits[n.input[1]]) for n in weights)
    external = external_data
    if external is None:
        external = total - quantized * 3 // 4 > _PROTO_LIMIT
    if unnamed:
        # Rare (our exporter names every node); naming needs the weights in memory to write a copy.
        model = _named(onnx.load(str(src)))
        nodes = [n.name for n in weight_matmuls(model)]
    else:
        model = src  # by path: the quantizer loads it, external data included
    _remove_data_file(dst)
    quantize_dynamic(
        model,
        dst,
        op_types_to_quantize=["MatMul"],
        per_channel=True,
        reduce_range=False,
        weight_type=QuantType.QInt8,
        nodes_to_quantize=nodes,
        use_external_data_format=external,
        # Only constant-B MatMuls: never quantize the attention products over the KV arena.
        extra_options={"MatMulConstBOnly": True},
    )
    return QuantizeResult(dst, graph_bytes(src), graph_bytes(dst), tuple(nodes))


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


def _block_quantize_int4(weight: np.ndarray, block_size: int, symmetric: bool):
    """`[K, N]` float32 -> MatMulNBits B `[N, k_blocks, block_size/2]` uint8, scales, zero points.

    Blocks run along K within one output column, as MatMulNBits reads them; K is zero-padded to whole blocks.
    """
    from onnxruntime.capi._pybind_state import quantize_matmul_4bits

    rows, cols = weight.shape
    k_blocks = (rows + block_size - 1) // block_size
    pad = k_blocks * block_size - rows
    if pad:
        weight = np.pad(weight, ((0, pad), (0, 0)))
    weight = np.ascontiguousarray(weight, dtype=np.float32)
    packed = np.zeros((cols, k_blocks, block_size // 2), dtype=np.uint8)
    scales = np.zeros((cols, k_blocks), dtype=np.float32)
    zero_points = np.zeros((cols, (k_blocks + 1) // 2), dtype=np.uint8)
    # ORT's kernel takes the unpadded K: the padded tail of the last block is ignored, as in its quantizer.
    quantize_matmul_4bits(packed, weight, scales, zero_points, block_size, cols, rows, symmetric)
    return packed, scales, zero_points


def quantize_int4(
    src_path: str | Path,
    dst_path: str | Path,
    block_size: int = 32,
    accuracy_level: int = 4,
    symmetric: bool = False,
    external_data: bool | None = None,
) -> QuantizeResult:
    """Weight-only 4-bit quantization: each weight MatMul becomes `com.microsoft.MatMulNBits`.

    Args:
        src_path: an fp32 graph (external data allowed; weights are read one at a time).
        dst_path: where to write.
        block_size: weights per scale along K (a power of two, >= 16).
        accuracy_level: MatMulNBits' minimum compute precision of A (4: int8, the fast path on CPU).
        symmetric: without zero points (asymmetric, the default, is what ORT's quantizer writes by default).
        external_data: as for `quantize_int8`.

    Returns:
        Sizes and the quantized node names.
    """
    if block_size < 16 or block_size & (block_size - 1):
        raise ValueError(f"block_size: expected a power of two >= 16, got {block_size}")
    src, dst = Path(src_path), Path(dst_path)
    dst.parent.mkdir(parents=True, exist_ok=True)
    model = _named(onnx.load(str(src), load_external_data=False))
    nodes = _check_fp32_weights(model, src)
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
        b = inits[node.input[1]]
        weight = _load_tensor(b, src.parent)
        k, n = weight.shape
        packed, scales, zero_points = _block_quantize_int4(weight, block_size, symmetric)
        del weight
        prefix = f"{node.name}.q4"
        inputs = [node.input[0], f"{prefix}.B", f"{prefix}.scales"]
        new_inits += [numpy_helper.from_array(packed, inputs[1]), numpy_helper.from_array(scales, inputs[2])]
        if not symmetric:
            inputs.append(f"{prefix}.zero_points")
            new_inits.append(numpy_helper.from_array(zero_points, inputs[3]))
        q = onnx.helper.make_node(
            "MatMulNBits",
            inputs,
            list(node.output),
            name=f"{node.name}_Q4",
            domain="com.microsoft",
            K=k,
            N=n,
            bits=4,
            block_size=block_size,
            accuracy_level=accuracy_level,
        )
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
    return QuantizeResult(dst, graph_bytes(src), graph_bytes(dst), tuple(done))
