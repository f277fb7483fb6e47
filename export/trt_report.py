"""TensorRT 10 compatibility report of exported graphs (what a TensorRT build of each graph will meet).

For one ONNX graph `trt_report()` says, without TensorRT (which is not installable on the export host):

* the op histogram, and each op checked against TensorRT 10's documented ONNX operator support
  (`data/tensorrt10_onnx_ops.json`, parsed from onnx-tensorrt's `docs/operators.md` by
  `data/make_tensorrt_ops_table.py`; its `source` says which revision): unsupported ops, and for ops the
  table restricts, the restriction text, the nodes' attributes and whatever part of the restriction can be
  checked statically (Resize modes, `axes` inputs that must be initializers, TopK's `sorted`, ...);
* project rules the table cannot know: no GridSample anywhere (the decoders' deformable attention is
  gather-based because TensorRT miscompiled GridSample-decomposed MSDA, NVIDIA/TensorRT#4813), and ops of
  custom domains (the `com.microsoft` ops of `--quantize int8/int4`) are ONNX Runtime only;
* control flow and data-dependent shapes (Loop, If, Scan, NonZero, Unique, NonMaxSuppression), Einsum
  equations;
* the element types of every tensor (float64, int64, bool, strings flagged) and, per node, types outside
  the ones the table documents for that op;
* the graph's dynamic input dimensions and the min/opt/max shapes the optimization profiles need, from the
  manifest facts (`max_context`, `max_tiles`, the decoders' image range, ...) with a stated default where no
  fact bounds a dimension.

Each finding has a severity: `error` (the graph will not build as it is), `note` (it may, check it on a
TensorRT machine) or `info`. The verdict is `needs-work` with any error, `ok-with-notes` with any note, else
`ok`. `write_trt_report()` writes the report of every graph of an artifact to `trt_report.json`; the export
writes it too. `python -m visionllm_edge.export.trt_report ARTIFACT` prints it as a table.
"""

from __future__ import annotations

import argparse
import functools
import json
import math
import re
import sys
from collections import Counter
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, numpy_helper
from visionllm_edge import _core, contract

TABLE_PATH = Path(__file__).parent / "data" / "tensorrt10_onnx_ops.json"
REPORT_FILE = "trt_report.json"
REPORT_SCHEMA_VERSION = 1
VERDICTS = ("ok", "ok-with-notes", "needs-work")

#: Defaults for dimensions no manifest fact bounds (the planner's, in C++); each profile entry says when one
#: was used.
DEFAULT_MAX_REGIONS = _core.TRT_DEFAULT_MAX_REGIONS  # regions referred to in one request
DEFAULT_MAX_LINK_GROUPS = _core.TRT_DEFAULT_MAX_LINK_GROUPS  # [GEN]/[EDIT] groups one answer sends to a mapper
DEFAULT_PREFILL_OPT = _core.TRT_DEFAULT_PREFILL_OPT  # prompt rows for prefill when the image size is unknown

#: Ops whose output shapes depend on the data (TensorRT needs an output allocator) or that carry subgraphs.
_DATA_DEPENDENT = ("NonZero", "NonMaxSuppression", "Unique", "Compress")
_CONTROL_FLOW = ("Loop", "If", "Scan")

#: Standard ops that ONNX Runtime's dynamic/static integer quantization writes (`--quantize int8`).
_ORT_INTEGER_OPS = ("DynamicQuantizeLinear", "MatMulInteger", "ConvInteger", "QLinearMatMul", "QLinearConv")

#: Standard-domain spellings.
_STANDARD_DOMAINS = ("", "ai.onnx")

#: ONNX element type -> the type names of the table's `dtypes` columns.
_TABLE_TYPE = {
    TensorProto.FLOAT: "FP32",
    TensorProto.FLOAT16: "FP16",
    TensorProto.BFLOAT16: "BF16",
    TensorProto.INT32: "INT32",
    TensorProto.INT64: "INT64",
    TensorProto.INT8: "INT8",
    TensorProto.UINT8: "UINT8",
    TensorProto.BOOL: "BOOL",
    TensorProto.DOUBLE: "DOUBLE",
    TensorProto.FLOAT8E4M3FN: "FP8",
    TensorProto.INT4: "INT4",
}
#: The table's header spells some types differently from its columns.
_HEADER_TYPE = {"FLOAT32": "FP32", "FLOAT16": "FP16", "BFLOAT16": "BF16"}


# --- the table ----------------------------------------------------------------------------------------------


@functools.lru_cache(maxsize=4)
def _load_table(path: str) -> dict:
    table = json.loads(Path(path).read_text(encoding="utf-8"))
    if "source" not in table or "ops" not in table:
        raise ValueError(f"{path}: not a TensorRT operator table (no 'source' / 'ops')")
    return table


def load_ops_table(path: str | Path | None = None) -> dict:
    """The TensorRT ONNX operator table (`{"source", "opset_range", "data_types", "notes", "ops"}`).

    Args:
        path: another table written by `make_tensorrt_ops_table.py` (default: the committed TensorRT 10 one).
    """
    return _load_table(str(path or TABLE_PATH))


def _dtype_name(elem_type: int) -> str:
    """`float32`, `int64`, `bool`, ... (numpy-style names; `float64` for DOUBLE)."""
    name = TensorProto.DataType.Name(elem_type).lower()
    return {"float": "float32", "double": "float64"}.get(name, name)


# --- graph traversal ----------------------------------------------------------------------------------------


def _walk(graph: onnx.GraphProto, where: str = ""):
    """Every node of a graph and of its subgraphs (Loop/If/Scan bodies), with the subgraph path."""
    for node in graph.node:
        yield node, where
        for attr in node.attribute:
            if attr.type == onnx.AttributeProto.GRAPH:
                yield from _walk(attr.g, f"{where}{node.name or node.op_type}/{attr.name}/")
            elif attr.type == onnx.AttributeProto.GRAPHS:
                for i, g in enumerate(attr.graphs):
                    yield from _walk(g, f"{where}{node.name or node.op_type}/{attr.name}[{i}]/")


def _graphs(graph: onnx.GraphProto):
    yield graph
    for node in graph.node:
        for attr in node.attribute:
            if attr.type == onnx.AttributeProto.GRAPH:
                yield from _graphs(attr.g)
            elif attr.type == onnx.AttributeProto.GRAPHS:
                for g in attr.graphs:
                    yield from _graphs(g)


def _strip_large_initializers(model: onnx.ModelProto, keep_elements: int = 4096) -> None:
    """Drops the data of large initializers in place: the report reads types and small constants only, and
    shape inference serialises the model (a multi-GB inline graph would double in memory for nothing)."""
    for graph in _graphs(model.graph):
        for init in graph.initializer:
            if init.data_location == TensorProto.EXTERNAL or math.prod(init.dims) <= keep_elements:
                continue
            for field in ("raw_data", "float_data", "int32_data", "int64_data", "double_data", "uint64_data"):
                init.ClearField(field)


def _attr_value(attr: onnx.AttributeProto):
    """A node attribute as JSON-able data (graphs and tensors summarised, bytes decoded)."""
    if attr.type == onnx.AttributeProto.GRAPH:
        return f"<graph {attr.g.name or '?'}: {len(attr.g.node)} nodes>"
    if attr.type == onnx.AttributeProto.GRAPHS:
        return f"<{len(attr.graphs)} graphs>"
    if attr.type == onnx.AttributeProto.TENSOR:
        t = attr.t
        return f"<tensor {_dtype_name(t.data_type)} {list(t.dims)}>"
    value = onnx.helper.get_attribute_value(attr)
    if isinstance(value, bytes):
        return value.decode("utf-8", "replace")
    if isinstance(value, list):
        return [v.decode("utf-8", "replace") if isinstance(v, bytes) else v for v in value]
    if isinstance(value, float):
        return round(value, 6)
    return value


class _Graph:
    """One model, read once: types, constants, shapes and op schemas the checks look up."""

    def __init__(self, model: onnx.ModelProto):
        self.model = model
        self.opset = next((o.version for o in model.opset_import if o.domain in _STANDARD_DOMAINS), 0)
        self.domains = {(o.domain or "ai.onnx"): int(o.version) for o in model.opset_import}
        try:
            self.inferred = onnx.shape_inference.infer_shapes(model, check_type=False, strict_mode=False)
            self.inference_error = None
        except Exception as exc:  # a graph inference rejects is still reported, on its declared types only
            self.inferred = model
            self.inference_error = f"{type(exc).__name__}: {exc}"
        self.types: dict[str, int] = {}
        self.shapes: dict[str, list | None] = {}
        self.constants: dict[str, TensorProto] = {}
        self.initializers: set[str] = set()
        for graph in _graphs(self.inferred.graph):
            for value in (*graph.input, *graph.output, *graph.value_info):
                t = value.type.tensor_type
                if value.type.HasField("tensor_type") and t.elem_type:
                    self.types[value.name] = t.elem_type
                    self.shapes[value.name] = (
                        [
                            d.dim_value if d.HasField("dim_value") else (d.dim_param or None)
                            for d in t.shape.dim
                        ]
                        if t.HasField("shape")
                        else None
                    )
            for init in graph.initializer:
                self.types[init.name] = init.data_type
                self.shapes[init.name] = list(init.dims)
                self.constants[init.name] = init
                self.initializers.add(init.name)
            for node in graph.node:
                if node.op_type == "Constant" and node.domain in _STANDARD_DOMAINS and node.output:
                    for attr in node.attribute:
                        if attr.name == "value":
                            self.constants[node.output[0]] = attr.t
                            self.types.setdefault(node.output[0], attr.t.data_type)

    def schema(self, node: onnx.NodeProto):
        try:
            return onnx.defs.get_schema(node.op_type, self.opset, node.domain or "")
        except Exception:  # an op this onnx version does not know: checks that need its schema are skipped
            return None

    def input_index(self, node: onnx.NodeProto, name: str) -> int | None:
        schema = self.schema(node)
        if schema is None:
            return None
        names = [p.name for p in schema.inputs]
        return names.index(name) if name in names else None

    def later_input(self, node: onnx.NodeProto, name: str) -> bool:
        """Whether `name` is an input of the op's newest schema but not of the graph's opset."""
        try:
            latest = onnx.defs.get_schema(node.op_type, node.domain or "")
        except Exception:  # unknown op
            return False
        return any(p.name == name for p in latest.inputs) and self.input_index(node, name) is None

    def output_index(self, node: onnx.NodeProto, name: str) -> int | None:
        schema = self.schema(node)
        if schema is None:
            return None
        names = [p.name for p in schema.outputs]
        return names.index(name) if name in names else None

    def attribute(self, node: onnx.NodeProto, name: str):
        """The node's attribute value, else the schema's default, else None."""
        for attr in node.attribute:
            if attr.name == name:
                return _attr_value(attr)
        schema = self.schema(node)
        if schema is not None and name in schema.attributes:
            default = schema.attributes[name].default_value
            if default.type:
                return _attr_value(default)
        return None

    def has_attribute_name(self, node: onnx.NodeProto, name: str) -> bool:
        schema = self.schema(node)
        return any(a.name == name for a in node.attribute) or (
            schema is not None and name in schema.attributes
        )

    def constant_value(self, name: str) -> np.ndarray | None:
        tensor = self.constants.get(name)
        if tensor is None:
            return None
        try:
            return numpy_helper.to_array(tensor)
        except Exception:  # data stripped (large) or external: the value is unknown here
            return None


# --- restriction checks -------------------------------------------------------------------------------------
#
# The table's restriction column is prose. It is split into sentences; a sentence that one of the patterns
# below recognises is checked on each node, the others are reported as "unchecked" (a note). A check returns
# (checked, problems): `checked` False when the node lacks what the check needs (a shape, a constant value).


def _sentences(text: str) -> list[str]:
    return [s.strip() for s in re.split(r"(?<=\.)\s+(?=[A-Z`])", text) if s.strip()]


def _backticked(text: str) -> list[str]:
    return re.findall(r"`([^`]+?)\s*`", text)


def _check_constant_input(g: _Graph, node, m: re.Match):
    name = m.group(1)
    index = g.input_index(node, name)
    if index is None:
        # An attribute is a constant by construction, and an input the op gained in a later opset (Pad's
        # `axes`, opset 18) cannot be used at this one; any other name cannot be checked here.
        return g.has_attribute_name(node, name) or g.later_input(node, name), []
    if index >= len(node.input) or not node.input[index]:
        return True, []
    if node.input[index] in g.constants:
        return True, []
    return True, [f"input `{name}` ({node.input[index]}) is computed at run time, not an initializer"]


def _check_equals(g: _Graph, node, m: re.Match):
    name, want = m.group(1), 0 if m.group(2) == "zero" else int(m.group(2))
    index = g.input_index(node, name)
    if index is not None:
        if index >= len(node.input) or not node.input[index]:
            return True, []
        if node.input[index] not in g.constants:
            return True, [f"input `{name}` is computed at run time; it must be the constant {want}"]
        value = g.constant_value(node.input[index])
        if value is None:
            return False, []
        return True, (
            [] if np.all(value == want) else [f"input `{name}` is {value.tolist()}, must be {want}"]
        )
    if not g.has_attribute_name(node, name):
        return False, []
    value = g.attribute(node, name)
    return True, ([] if value is None or value == want else [f"attribute `{name}`={value!r}, must be {want}"])


def _check_less_than(g: _Graph, node, m: re.Match):
    name, bound = m.group(1), int(m.group(2))
    index = g.input_index(node, name)
    if index is None or index >= len(node.input):
        return False, []
    value = g.constant_value(node.input[index])
    if value is None:
        return False, []
    return True, ([] if np.all(value < bound) else [f"input `{name}` is {value.tolist()}, must be < {bound}"])


def _check_all_ones(g: _Graph, node, m: re.Match):
    value = g.attribute(node, m.group(1))
    ok = value is None or value == [] or all(v == 1 for v in value)
    return True, ([] if ok else [f"attribute `{m.group(1)}`={value!r}, must be empty or all ones"])


def _check_not_supported_attr(g: _Graph, node, m: re.Match):
    name, allowed = m.group(1), m.group(2)
    if not g.has_attribute_name(node, name):
        return False, []
    value = g.attribute(node, name)
    if allowed is not None:
        ok = value in (None, allowed)
    else:
        # "`x` is not supported": only setting it to something other than the schema's default uses it.
        explicit = any(a.name == name for a in node.attribute)
        schema = g.schema(node)
        default = schema.attributes[name].default_value if schema is not None else None
        ok = not explicit or (default is not None and default.type != 0 and value == _attr_value(default))
    return True, ([] if ok else [f"attribute `{name}`={value!r} is not supported"])


def _check_unsupported_attrs(g: _Graph, node, m: re.Match):
    names = _backticked(m.group(1))
    used = [a.name for a in node.attribute if a.name in names]
    return True, [f"attribute `{n}` is not supported" for n in used]


def _check_only_first_output(g: _Graph, node, m: re.Match):
    extra = [o for o in node.output[1:] if o]
    return True, ([f"uses outputs beyond the first: {extra}"] if extra else [])


def _check_output_unsupported(g: _Graph, node, m: re.Match):
    index = g.output_index(node, m.group(1))
    if index is None:
        return False, []
    used = index < len(node.output) and bool(node.output[index])
    return True, ([f"output `{m.group(1)}` is used"] if used else [])


def _check_spatial_rank(g: _Graph, node, m: re.Match):
    allowed = {int(m.group(1)), int(m.group(2))}
    kernel = g.attribute(node, "kernel_shape")
    if kernel:
        rank = len(kernel)
    else:
        shape = g.shapes.get(node.input[0]) if node.input else None
        if shape is None:
            return False, []
        rank = len(shape) - 2
    return True, ([] if rank in allowed else [f"{rank}D, only {sorted(allowed)}D supported"])


def _check_input_rank(g: _Graph, node, m: re.Match):
    shape = g.shapes.get(node.input[0]) if node.input else None
    if shape is None:
        return False, []
    want = int(m.group(1))
    return True, ([] if len(shape) == want else [f"input is {len(shape)}D, must be {want}D"])


def _check_static_input(g: _Graph, node, m: re.Match):
    index = g.input_index(node, m.group(1))
    if index is None or index >= len(node.input):
        return False, []
    shape = g.shapes.get(node.input[index])
    if shape is None:
        return False, []
    dynamic = [d for d in shape if not isinstance(d, int)]
    return True, ([f"input `{m.group(1)}` has dynamic dims {dynamic}"] if dynamic else [])


def _check_listed(attribute: str, default: str, only_if: tuple[str, str] | None = None):
    """Resize-style "Supported X modes: `a`, `b`." sentences: the attribute must be one of the listed."""

    def check(g: _Graph, node, m: re.Match):
        if only_if is not None and (g.attribute(node, only_if[0]) or "") != only_if[1]:
            return True, []
        allowed = _backticked(m.string[m.end() :])
        value = g.attribute(node, attribute) or default
        return True, (
            [] if value in allowed else [f"attribute `{attribute}`={value!r}, supported: {allowed}"]
        )

    return check


def _check_resize_axes(g: _Graph, node, m: re.Match):
    axes = g.attribute(node, "axes")
    if not axes:
        return True, []
    shape = g.shapes.get(node.input[0]) if node.input else None
    rank = len(shape) if shape is not None else len(axes)
    return True, (
        [] if list(axes) == list(range(rank)) else [f"attribute `axes`={axes} is not iota of rank {rank}"]
    )


def _check_antialias(g: _Graph, node, m: re.Match):
    value = g.attribute(node, "antialias") or 0
    return True, ([] if value == 0 else [f"attribute `antialias`={value}"])


def _informational(g: _Graph, node, m: re.Match):
    return True, []


_CHECKS: tuple[tuple[re.Pattern, object], ...] = tuple(
    (re.compile(pattern, re.IGNORECASE), check)
    for pattern, check in (
        (
            r"`(\w+)\s*`\s+(?:input\s+)?must be (?:an initializer|a constant tensor|a build-time constant)",
            _check_constant_input,
        ),
        (r"`(\w+)`\s+(?:attribute\s+)?must be (\d+|zero)\b", _check_equals),
        (r"`(\w+)`\s+input must be less than (\d+)", _check_less_than),
        (r"`(\w+)` must be empty or all ones", _check_all_ones),
        (r"`(\w+)`(?: other than `(\w+)`)? is not supported", _check_not_supported_attr),
        (r"^((?:`\w+`,?\s*(?:and\s+)?)+)attributes are unsupported", _check_unsupported_attrs),
        (r"Only the first output", _check_only_first_output),
        (r"`(\w+)` output tensor unsupported", _check_output_unsupported),
        (r"(\d)D or (\d)D (?:pooling|convolutions|deconvolutions) only", _check_spatial_rank),
        (r"Input must be (\d)D", _check_input_rank),
        (r"`(\w+)` must have static dimensions", _check_static_input),
        (
            r"Supported resize transformation modes:",
            _check_listed("coordinate_transformation_mode", "half_pixel"),
        ),
        (r"Supported resize modes:", _check_listed("mode", "nearest")),
        (
            r"Supported nearest modes:",
            _check_listed("nearest_mode", "round_prefer_floor", only_if=("mode", "nearest")),
        ),
        (r"Supported aspect ratio policy:", _check_listed("keep_aspect_ratio_policy", "stretch")),
        (r"`axes` must be an iota vector", _check_resize_axes),
        (r"Antialiasing is not supported", _check_antialias),
        (r"value is ignored by TensorRT", _informational),
    )
)


def _check_restrictions(g: _Graph, node, restriction: str) -> tuple[list[str], list[str]]:
    """(problems, unchecked sentences) of one node against its op's restriction text."""
    problems: list[str] = []
    unchecked: list[str] = []
    for sentence in _sentences(restriction):
        matched = False
        sentence_checked = True
        for pattern, check in _CHECKS:
            for m in pattern.finditer(sentence):
                matched = True
                ok, found = check(g, node, m)
                sentence_checked = sentence_checked and ok
                problems.extend(found)
        if not matched or not sentence_checked:
            unchecked.append(sentence)
    return problems, unchecked


# --- per-node type check ------------------------------------------------------------------------------------

#: Ops whose documented types are those of an input other than the first (or of the output).
_TYPED_INPUT = {"Where": 1}
_TYPED_BY_OUTPUT = ("Constant", "ConstantOfShape", "RandomNormal", "RandomUniform", "EyeLike")


def _typed_values(node: onnx.NodeProto) -> list[str]:
    if node.op_type in _TYPED_BY_OUTPUT:
        return [node.output[0]] if node.output else []
    if node.op_type == "Cast":
        # Both ends of a Cast must be types TensorRT has.
        return [v for v in (node.input[:1] + node.output[:1]) if v]
    index = _TYPED_INPUT.get(node.op_type, 0)
    return [node.input[index]] if len(node.input) > index and node.input[index] else []


# --- dynamic shapes and optimization profiles ---------------------------------------------------------------


def profile_shapes(graph: str | None, inputs: list[dict], facts: dict | None) -> dict:
    """The min/opt/max shapes a TensorRT optimization profile needs for the graph's dynamic inputs.

    The planner is the runtime's own (csrc/engines/tensorrt_profiles.cpp, the one the TensorRT backend
    builds its profiles with), so the report shows exactly what a TensorRT build will be given.

    Args:
        graph: the graph name (a key of `contract.GRAPHS`), or None for an unknown graph.
        inputs: `[{"name", "dtype", "shape"}]` with a string (symbol) or None for each dynamic dim.
        facts: manifest facts of the graph plus the artifact-level numbers `write_trt_report` adds.

    Returns:
        `{"dynamic_inputs": {name: {axis: symbol}}, "dims": {profile: {symbol: {min, opt, max, why}}},
        "profiles": [{"name", "inputs": {name: {"min", "opt", "max"}}}], "unresolved": [symbols]}`.
        A symbol with no fact and no default is unresolved; its dims are left null.
    """
    shapes = [{"name": v["name"], "shape": list(v["shape"])} for v in inputs]
    text = _core.trt_profile_shapes(graph or "", json.dumps(shapes), json.dumps(facts or {}))
    return json.loads(text)


# --- the report ---------------------------------------------------------------------------------------------


def _graph_name_of(path: Path) -> str | None:
    for name, names in contract.GRAPHS.items():
        if names.file == path.name:
            return name
    return None


def _io(values) -> list[dict]:
    out = []
    for v in values:
        t = v.type.tensor_type
        shape = [d.dim_value if d.HasField("dim_value") else (d.dim_param or None) for d in t.shape.dim]
        out.append({"name": v.name, "dtype": _dtype_name(t.elem_type), "shape": shape})
    return out


class _Findings(list):
    """The findings of one report, in the order found."""

    def add(self, severity: str, kind: str, message: str, **extra) -> None:
        self.append({"severity": severity, "kind": kind, "message": message, **extra})


def _node_label(node: onnx.NodeProto, where: str) -> str:
    return where + (node.name or node.op_type)


def _check_ops(g: _Graph, nodes_by_op: dict, ops_table: dict, findings: _Findings, max_nodes: int):
    """Unsupported ops, restricted ops (checked where the text allows) and custom-domain ops."""
    unsupported, restricted, custom = [], [], {}
    for key in sorted(nodes_by_op):
        nodes = nodes_by_op[key]
        op, domain = nodes[0][0].op_type, nodes[0][0].domain
        names = [_node_label(n, w) for n, w in nodes]
        if domain not in _STANDARD_DOMAINS:
            custom.setdefault(domain, {})[op] = len(nodes)
            continue
        entry = ops_table.get(op)
        if entry is None or not entry["supported"]:
            reason = "not in TensorRT's ONNX operator table" if entry is None else "marked unsupported (N)"
            if op in _ORT_INTEGER_OPS:
                reason += "; ONNX Runtime's integer quantization (TensorRT quantizes through Q/DQ instead)"
            unsupported.append({"op": op, "count": len(nodes), "reason": reason, "nodes": names[:max_nodes]})
            findings.add("error", "unsupported-op", f"{op} x{len(nodes)}: {reason}", op=op)
            continue
        if not entry.get("restrictions"):
            continue
        violations, unchecked, examples = [], set(), []
        for (node, _), name in zip(nodes, names):
            problems, not_checked = _check_restrictions(g, node, entry["restrictions"])
            unchecked.update(not_checked)
            if problems:
                violations.append({"node": name, "problems": problems})
            if len(examples) < max_nodes:
                examples.append(
                    {"node": name, "attributes": {a.name: _attr_value(a) for a in node.attribute}}
                )
        status = "violated" if violations else ("unchecked" if unchecked else "satisfied")
        restricted.append({
            "op": op, "count": len(nodes), "restriction": entry["restrictions"], "status": status,
            "violations": violations, "unchecked": sorted(unchecked), "nodes": examples,
        })  # fmt: skip
        if violations:
            first = violations[0]
            findings.add(
                "error", "restriction-violated",
                f"{op}: {len(violations)} of {len(nodes)} nodes break the documented restriction "
                f"(e.g. {first['node']}: {'; '.join(first['problems'])})", op=op,
            )  # fmt: skip
        elif unchecked:
            text = " ".join(sorted(unchecked))
            findings.add(
                "note", "restriction-unchecked", f"{op} x{len(nodes)}: not checkable here: {text}", op=op
            )

    custom_domains = []
    for domain, ops in sorted(custom.items()):
        if domain == "com.microsoft":
            why = (
                "ORT-only: ONNX Runtime contrib ops (e.g. from --quantize int8/int4); TensorRT's parser has "
                "no importer for them (it would need a TensorRT plugin of that name)"
            )
        else:
            why = "custom domain: TensorRT parses it only through a plugin registered under that op name"
        custom_domains.append({"domain": domain, "ops": ops, "note": why})
        listed = ", ".join(f"{k} x{v}" for k, v in ops.items())
        findings.add("error", "custom-domain", f"{domain}: {listed}: {why}", domain=domain)
    return unsupported, restricted, custom_domains


def _notable_ops(g: _Graph, nodes_by_op: dict, ops_table: dict, findings: _Findings, max_nodes: int) -> dict:
    """GridSample (a project rule), control flow, data-dependent shapes and Einsum equations."""
    notable: dict = {}
    if "GridSample" in nodes_by_op:
        names = [_node_label(n, w) for n, w in nodes_by_op["GridSample"]]
        notable["GridSample"] = names
        findings.add(
            "error", "gridsample",
            f"GridSample x{len(names)}: the project's graphs must hold none (deformable attention is "
            "gather-based: TensorRT miscompiled GridSample-decomposed MSDA, NVIDIA/TensorRT#4813)",
            op="GridSample",
        )  # fmt: skip
    for op in (*_CONTROL_FLOW, *_DATA_DEPENDENT):
        if op not in nodes_by_op:
            continue
        names = [_node_label(n, w) for n, w in nodes_by_op[op]]
        notable[op] = names[:max_nodes]
        if op in _CONTROL_FLOW:
            why = "control flow: subgraphs become TensorRT conditional/loop layers (see the restriction)"
        else:
            why = "data-dependent output shape: TensorRT needs an output allocator and cannot pre-size it"
        if ops_table.get(op, {}).get("supported"):  # an unsupported one is an error already
            findings.add("note", "dynamic-control", f"{op} x{len(names)}: {why}", op=op)
    if "Einsum" in nodes_by_op:
        equations = [
            {"node": _node_label(n, w), "equation": g.attribute(n, "equation") or ""}
            for n, w in nodes_by_op["Einsum"]
        ]
        notable["Einsum"] = equations
        for e in equations:
            operands = [t.strip() for t in e["equation"].split("->")[0].split(",")]
            # TensorRT 8.x documented ellipsis and diagonals (an index repeated in an operand) as unsupported;
            # the 10.x table no longer says so: worth a look on hardware rather than a verdict.
            if "..." in e["equation"] or any(len(set(t)) != len(t) for t in operands):
                findings.add("note", "einsum", f"Einsum {e['node']} {e['equation']!r}: ellipsis or diagonal")
    return notable


def _check_types(
    g: _Graph, nodes_by_op: dict, table: dict, io: list[dict], findings: _Findings, max_nodes: int
):
    """Element types of every tensor (flagged where TensorRT limits them) and per-op documented types."""
    data_types = {_HEADER_TYPE.get(t, t) for t in table.get("data_types", [])}
    counts: Counter = Counter(_dtype_name(t) for t in g.types.values())
    flags = []
    for elem, name in sorted({(t, _dtype_name(t)) for t in g.types.values()}):
        at_io = sorted(v["name"] for v in io if v["dtype"] == name)
        io_text = f" (graph inputs/outputs: {at_io})" if at_io else ""
        tname = _TABLE_TYPE.get(elem)
        if elem == TensorProto.DOUBLE:
            flag = (
                "note",
                "float64: limited support; TensorRT casts DOUBLE down to FLOAT, clamping to +-FLT_MAX",
            )
        elif elem == TensorProto.INT64:
            text = "int64: native in TensorRT 10 (no longer cast to int32); int64 inputs/outputs need int64 "
            flag = ("info", text + "bindings" + io_text)
        elif elem == TensorProto.BOOL:
            flag = ("info", "bool: a TensorRT type (logic ops, Where, Cast, shape ops)" + io_text)
        elif elem == TensorProto.STRING:
            flag = ("error", "string tensors: TensorRT has no string type")
        elif elem == TensorProto.UINT8:
            flag = ("note", "uint8: TensorRT takes it only as a network input/output type" + io_text)
        elif tname in ("INT8", "INT4", "FP8"):
            flag = (
                "note",
                f"{name}: a quantized type; TensorRT takes it only through Q/DQ from a float type",
            )
        elif tname is None or tname not in data_types:
            flag = ("error", f"{name}: not among TensorRT's ONNX data types {sorted(data_types)}")
        else:
            continue
        flags.append({"dtype": name, "severity": flag[0], "note": flag[1], "tensors": counts[name]})
        findings.add(flag[0], "dtype", flag[1], dtype=name)

    found: dict[tuple[str, str], list[str]] = {}
    for nodes in nodes_by_op.values():
        node0 = nodes[0][0]
        entry = table["ops"].get(node0.op_type) if node0.domain in _STANDARD_DOMAINS else None
        if not entry or not entry["supported"] or not entry["dtypes"]:
            continue
        for node, where in nodes:
            for value in _typed_values(node):
                elem = g.types.get(value)
                # DOUBLE is cast down by the parser (flagged above), so it is not a per-op mismatch.
                if elem is None or elem == TensorProto.DOUBLE or _TABLE_TYPE.get(elem) in entry["dtypes"]:
                    continue
                found.setdefault((node.op_type, _dtype_name(elem)), []).append(_node_label(node, where))
    mismatches = []
    for (op, dtype), names in sorted(found.items()):
        documented = table["ops"][op]["dtypes"]
        mismatches.append(
            {
                "op": op,
                "dtype": dtype,
                "count": len(names),
                "documented": documented,
                "nodes": names[:max_nodes],
            }
        )
        text = f"{op} on {dtype} x{len(names)}: documented types are {', '.join(documented)}"
        findings.add("note", "op-dtype", text, op=op, dtype=dtype)
    return {"tensors": dict(sorted(counts.items())), "flags": flags, "op_mismatches": mismatches}


def trt_report(
    onnx_path: str | Path | onnx.ModelProto,
    facts: dict | None = None,
    *,
    graph: str | None = None,
    table: dict | None = None,
    max_nodes: int = 10,
) -> dict:
    """The TensorRT 10 compatibility report of one ONNX graph.

    Args:
        onnx_path: the `.onnx` file (external data is not loaded), or a loaded model (not modified).
        facts: the graph's manifest facts, plus artifact-level numbers for the profiles (`max_context`,
            `max_tiles`, `patches_per_tile`, `max_link_queries`, `det_short_side`, `det_max_long_side`);
            `write_trt_report` gathers them. Without facts the dynamic dims are listed but unresolved.
        graph: the graph name (default: from the file name via `contract.GRAPHS`), which picks the profiles.
        table: an operator table (default: `load_ops_table()`).
        max_nodes: how many example nodes (with attributes) to list per op.

    Returns:
        A JSON-able dict: `graph`, `verdict`, `findings` (severity, kind, message), `op_histogram`,
        `unsupported`, `restricted`, `custom_domains`, `notable` (GridSample, control flow, data-dependent
        shapes, Einsum), `dtypes`, `inputs`/`outputs`, and `profiles` (see `profile_shapes`).
    """
    table = table or load_ops_table()
    if isinstance(onnx_path, onnx.ModelProto):
        model = onnx.ModelProto()
        model.CopyFrom(onnx_path)
        file = None
    else:
        path = Path(onnx_path)
        model = onnx.load(str(path), load_external_data=False)
        file = path.name
        graph = graph or _graph_name_of(path)
    _strip_large_initializers(model)
    g = _Graph(model)
    findings = _Findings()

    histogram: Counter = Counter()
    nodes_by_op: dict[str, list] = {}
    for node, where in _walk(model.graph):
        key = node.op_type if node.domain in _STANDARD_DOMAINS else f"{node.domain}:{node.op_type}"
        histogram[key] += 1
        nodes_by_op.setdefault(key, []).append((node, where))

    unsupported, restricted, custom_domains = _check_ops(g, nodes_by_op, table["ops"], findings, max_nodes)
    notable = _notable_ops(g, nodes_by_op, table["ops"], findings, max_nodes)
    inputs, outputs = _io(model.graph.input), _io(model.graph.output)
    dtypes = _check_types(g, nodes_by_op, table, inputs + outputs, findings, max_nodes)

    lo_hi = table.get("opset_range")
    if lo_hi and not (lo_hi[0] <= g.opset <= lo_hi[1]):
        findings.add("note", "opset", f"opset {g.opset} is outside the table's range {lo_hi[0]}..{lo_hi[1]}")
    if g.inference_error:
        text = f"ONNX shape inference failed ({g.inference_error}); types were read from declared values only"
        findings.add("note", "shape-inference", text)

    profiles = profile_shapes(graph, inputs, facts)
    if profiles["unresolved"]:
        text = f"dynamic dims without a range: {profiles['unresolved']} (give the facts or set the profile)"
        findings.add("note", "profile", text)

    severities = {f["severity"] for f in findings}
    verdict = "needs-work" if "error" in severities else "ok-with-notes" if "note" in severities else "ok"
    return {
        "graph": graph,
        "file": file,
        "verdict": verdict,
        "opset": g.opset,
        "opset_imports": g.domains,
        "num_nodes": sum(histogram.values()),
        "findings": list(findings),
        "op_histogram": dict(sorted(histogram.items())),
        "unsupported": unsupported,
        "restricted": restricted,
        "custom_domains": custom_domains,
        "notable": notable,
        "dtypes": dtypes,
        "inputs": inputs,
        "outputs": outputs,
        "profiles": profiles,
    }


# --- an artifact --------------------------------------------------------------------------------------------


def _model_facts(model, component_facts: dict) -> dict:
    """The artifact-level numbers the profiles need (the runtime reads them from a manifest,
    `_core.trt_artifact_profile_facts`), from the reference model during an export."""
    out: dict = {}
    cfg = getattr(model, "config", None)
    llm = component_facts.get("llm") or {}
    if llm.get("max_context"):
        out["max_context"] = llm["max_context"]
    for key, attr in (
        ("max_tiles", "max_tiles"),
        ("patches_per_tile", "patches_per_tile"),
        ("det_short_side", "det_short_side"),
        ("det_max_long_side", "det_max_long_side"),
    ):
        value = getattr(cfg, attr, None)
        if value:
            out[key] = int(value)
    queries = []
    for kind in contract.ROUTING_KINDS:
        try:
            queries.append(int(model.num_queries(kind)))
        except Exception:  # a model without that decoder has no queries for it
            continue
    if queries:
        out["max_link_queries"] = max(queries)
    return out


def artifact_trt_report(
    artifact_dir: str | Path,
    *,
    graphs: dict | None = None,
    component_facts: dict | None = None,
    model=None,
    table: dict | None = None,
) -> dict:
    """The report of every graph of an artifact folder.

    Args:
        artifact_dir: the artifact (or the export's partial folder).
        graphs: `{graph: {"file", "facts"}}` as the exporter holds them before the manifest exists; default:
            read `manifest.json`.
        component_facts: the exporters' component facts (merged under each graph's own, as the manifest does).
        model: the reference model, for the artifact-level numbers when there is no manifest yet.
        table: an operator table (default: `load_ops_table()`).
    """
    folder = Path(artifact_dir)
    table = table or load_ops_table()
    if graphs is None:
        manifest = json.loads((folder / contract.MANIFEST_FILE).read_text(encoding="utf-8"))
        graphs = manifest["graphs"]
        context = json.loads(_core.trt_artifact_profile_facts(str(folder)))
        component_facts = {}
    else:
        component_facts = component_facts or {}
        context = _model_facts(model, component_facts) if model is not None else {}
    reports = {}
    for name, entry in graphs.items():
        facts = dict(context)
        for component, graph_names in contract.COMPONENT_GRAPHS.items():
            if name in graph_names:
                facts.update(component_facts.get(component) or {})
        facts.update(entry.get("facts") or {})
        reports[name] = trt_report(folder / entry["file"], facts, graph=name, table=table)
    return {
        "schema_version": REPORT_SCHEMA_VERSION,
        "table": table["source"],
        "verdicts": {name: r["verdict"] for name, r in reports.items()},
        "graphs": reports,
    }


def write_trt_report(artifact_dir: str | Path, **kwargs) -> dict:
    """Writes `trt_report.json` (the report of every graph) into an artifact folder and returns it.

    Takes the keyword arguments of `artifact_trt_report` (the export passes what it holds before the
    manifest is written).
    """
    report = artifact_trt_report(artifact_dir, **kwargs)
    (Path(artifact_dir) / REPORT_FILE).write_text(json.dumps(report, indent=1) + "\n", encoding="utf-8")
    return report


# --- printing -----------------------------------------------------------------------------------------------


def _range(d: dict) -> str:
    return "?" if d["min"] is None else f"{d['min']}/{d['opt']}/{d['max']}"


def format_report(report: dict, details: bool = True) -> str:
    """A readable table of an artifact report (or of one graph's report)."""
    graphs = report["graphs"] if "graphs" in report else {report.get("graph") or report.get("file"): report}
    lines = []
    if "table" in report:
        src = report["table"]
        where = src.get("ref") or src.get("commit")
        lines.append(
            f"TensorRT ONNX operator table: {src['repo']} {src['path']} @ {where} "
            f"(document: TensorRT {src.get('tensorrt_version')})"
        )
    lines.append(
        f"{'graph':<18} {'verdict':<14} {'nodes':>6} {'errors':>6} {'notes':>6}  dynamic dims (min/opt/max)"
    )
    for name, r in graphs.items():
        sev = Counter(f["severity"] for f in r["findings"])
        dims = []
        for profile, symbols in r["profiles"]["dims"].items():
            text = " ".join(f"{s}={_range(d)}" for s, d in symbols.items())
            dims.append(f"{profile}: {text}" if len(r["profiles"]["dims"]) > 1 else text)
        lines.append(
            f"{name!s:<18} {r['verdict']:<14} {r['num_nodes']:>6} {sev['error']:>6} {sev['note']:>6}  "
            + ("; ".join(dims) or "static")
        )
    if details:
        for name, r in graphs.items():
            shown = [f for f in r["findings"] if f["severity"] != "info"]
            if not shown:
                continue
            lines.append(f"\n[{name}] {r['verdict']}")
            for f in shown:
                lines.append(f"  {f['severity']:<5} {f['message']}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    """`python -m visionllm_edge.export.trt_report ARTIFACT|GRAPH.onnx [--write] [--json]`."""
    ap = argparse.ArgumentParser(description="TensorRT 10 compatibility report of exported ONNX graphs.")
    ap.add_argument("path", type=Path, help="an artifact folder (with manifest.json) or one .onnx graph")
    ap.add_argument("--write", action="store_true", help=f"also write {REPORT_FILE} into the artifact")
    ap.add_argument("--json", action="store_true", help="print the JSON report instead of the table")
    ap.add_argument("--brief", action="store_true", help="the summary table only")
    ap.add_argument("--strict", action="store_true", help="exit with status 1 when a graph needs work")
    args = ap.parse_args(argv)
    if args.path.is_dir():
        report = write_trt_report(args.path) if args.write else artifact_trt_report(args.path)
    else:
        report = trt_report(args.path)
    print(json.dumps(report, indent=1) if args.json else format_report(report, details=not args.brief))
    verdicts = report["verdicts"].values() if "verdicts" in report else [report["verdict"]]
    return 1 if args.strict and "needs-work" in verdicts else 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
