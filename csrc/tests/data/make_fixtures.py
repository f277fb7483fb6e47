"""Writes the tiny ONNX graphs the engine tests run (csrc/tests/test_engine.cpp, tests/test_core_engine.py).

Run from the repository root after changing this file, and commit what it writes:

    .venv/bin/python csrc/tests/data/make_fixtures.py

`elementwise.onnx` takes `a` and `b` (float32 [N, 3], N dynamic) and `ids` (int64 [N]) and returns
`sum` = a + b (float32), `ids_plus_one` = ids + 1 (int64), `half` = float16(a), `greater` = a > b (bool) and
`count` = int32(ids): one output of each element type the engine maps, so a test sees every dtype come back.
`matmul_chain.onnx` multiplies `x` (float32 [256, 256]) by itself 16 times into `y`: a graph slow enough (tens
of milliseconds) for a test to see another thread run while it does.
`not_a_model.onnx` is text, for the error a corrupt graph file gives.
`flat_200.jpg` is a 16 x 16 baseline JPEG of one colour (200, 200, 200), written by Pillow, for the image
decoding test (test_results.cpp); stb_image_write's JPEG encoder, which the test used before, left-shifts
negative values (undefined before C++20; the asan preset's UBSan stops there).
"""

from __future__ import annotations

from pathlib import Path

import onnx
from onnx import TensorProto, helper
from PIL import Image

HERE = Path(__file__).resolve().parent
OPSET = helper.make_opsetid("", 17)


def elementwise() -> onnx.ModelProto:
    n = "N"
    inputs = [
        helper.make_tensor_value_info("a", TensorProto.FLOAT, [n, 3]),
        helper.make_tensor_value_info("b", TensorProto.FLOAT, [n, 3]),
        helper.make_tensor_value_info("ids", TensorProto.INT64, [n]),
    ]
    outputs = [
        helper.make_tensor_value_info("sum", TensorProto.FLOAT, [n, 3]),
        helper.make_tensor_value_info("ids_plus_one", TensorProto.INT64, [n]),
        helper.make_tensor_value_info("half", TensorProto.FLOAT16, [n, 3]),
        helper.make_tensor_value_info("greater", TensorProto.BOOL, [n, 3]),
        helper.make_tensor_value_info("count", TensorProto.INT32, [n]),
    ]
    one = helper.make_tensor("one", TensorProto.INT64, [], [1])
    nodes = [
        helper.make_node("Add", ["a", "b"], ["sum"]),
        helper.make_node("Add", ["ids", "one"], ["ids_plus_one"]),
        helper.make_node("Cast", ["a"], ["half"], to=TensorProto.FLOAT16),
        helper.make_node("Greater", ["a", "b"], ["greater"]),
        helper.make_node("Cast", ["ids"], ["count"], to=TensorProto.INT32),
    ]
    graph = helper.make_graph(nodes, "elementwise", inputs, outputs, initializer=[one])
    model = helper.make_model(graph, opset_imports=[OPSET], producer_name="make_fixtures")
    model.ir_version = 8  # readable by every ONNX Runtime the engine accepts
    onnx.checker.check_model(model)
    return model


def matmul_chain(steps: int = 16, size: int = 256) -> onnx.ModelProto:
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [size, size])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [size, size])
    names = ["x"] + [f"p{i}" for i in range(1, steps)] + ["y"]
    nodes = [helper.make_node("MatMul", [names[i], "x"], [names[i + 1]]) for i in range(steps)]
    graph = helper.make_graph(nodes, "matmul_chain", [x], [y])
    model = helper.make_model(graph, opset_imports=[OPSET], producer_name="make_fixtures")
    model.ir_version = 8
    onnx.checker.check_model(model)
    return model


def main() -> None:
    onnx.save(elementwise(), HERE / "elementwise.onnx")
    onnx.save(matmul_chain(), HERE / "matmul_chain.onnx")
    (HERE / "not_a_model.onnx").write_text("this file is not an ONNX model\n")
    Image.new("RGB", (16, 16), (200, 200, 200)).save(HERE / "flat_200.jpg", quality=95)
    print(f"wrote elementwise.onnx, matmul_chain.onnx, not_a_model.onnx and flat_200.jpg in {HERE}")


if __name__ == "__main__":
    main()
