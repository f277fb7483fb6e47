"""The C++ engine through `_core` (runtime/engine.py): zero-copy binding, outputs as numpy, errors by name.

Runs csrc/tests/data/elementwise.onnx (made by csrc/tests/data/make_fixtures.py): `sum` = a + b,
`ids_plus_one` = ids + 1, `half` = float16(a), `greater` = a > b, `count` = int32(ids).
"""

from __future__ import annotations

import json
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
from visionllm_edge import _core
from visionllm_edge.manifest import ManifestError
from visionllm_edge.runtime.engine import (
    BackendUnavailableError,
    available_providers,
    make_engine,
    onnxruntime_library,
)

DATA = Path(__file__).resolve().parents[1] / "csrc" / "tests" / "data"


@pytest.fixture()
def engine():
    return make_engine(DATA / "elementwise.onnx", "onnxruntime", None, 1, "elementwise")


def feeds():
    a = np.arange(6, dtype=np.float32).reshape(2, 3)
    b = np.full((2, 3), 2.5, np.float32)
    return {"a": a, "b": b, "ids": np.array([7, 41], np.int64)}


def test_signature_and_plain_run(engine):
    assert engine.name == "elementwise"
    assert engine.input_names == ["a", "b", "ids"]
    assert engine.output_names == ["sum", "ids_plus_one", "half", "greater", "count"]
    f = feeds()
    got = engine.run(f)
    assert list(got) == engine.output_names
    np.testing.assert_array_equal(got["sum"], f["a"] + f["b"])
    np.testing.assert_array_equal(got["ids_plus_one"], [8, 42])
    assert [got[k].dtype for k in ("half", "greater", "count")] == [np.float16, np.bool_, np.int32]
    np.testing.assert_array_equal(got["greater"], f["a"] > f["b"])
    only = engine.run(f, ["count"])
    assert list(only) == ["count"] and only["count"].tolist() == [7, 41]


def test_outputs_own_the_engines_buffer(engine):
    got = engine.run(feeds(), ["sum"])["sum"]
    # Not a copy made by numpy: the array is a view whose base holds the engine's tensor.
    assert not got.flags.owndata and got.base is not None and got.flags.writeable
    del engine
    assert got[1, 2] == 7.5  # still readable after the engine is gone


def test_run_bound_writes_into_the_callers_buffer(engine):
    block = np.full((4, 3), -1.0, np.float32)
    rows = block[1:3]  # a contiguous slice in the middle, as the KV arena's next rows are
    got = engine.run_bound(feeds(), {"sum": rows}, fetch=["ids_plus_one"])
    assert list(got) == ["ids_plus_one"] and got["ids_plus_one"].tolist() == [8, 42]
    np.testing.assert_array_equal(block[1:3], feeds()["a"] + 2.5)
    assert (block[0] == -1).all() and (block[3] == -1).all()
    assert engine.run_bound(feeds(), {"sum": rows}) == {}


def test_bad_inputs_are_named(engine):
    f = feeds()
    with pytest.raises(ValueError, match=r"elementwise: inputs missing \['b'\], unexpected \['c'\]"):
        engine.run({"a": f["a"], "c": f["b"], "ids": f["ids"]})
    with pytest.raises(TypeError, match="elementwise: input 'ids' must be int64, got int32"):
        engine.run({**f, "ids": f["ids"].astype(np.int32)})
    with pytest.raises(TypeError, match="elementwise: input 'a' must be float32, got float64"):
        engine.run({**f, "a": f["a"].astype(np.float64)})
    with pytest.raises(TypeError, match="input 'a' must be a numpy array, got list"):
        engine.run({**f, "a": [[0.0] * 3] * 2})
    with pytest.raises(ValueError, match="input 'a' must be C-contiguous"):
        engine.run({**f, "a": np.asfortranarray(f["a"])})
    with pytest.raises(ValueError, match=r"input 'a' must have shape \[-1, 3\]"):
        engine.run({**f, "a": np.zeros((2, 4), np.float32)})
    with pytest.raises(RuntimeError, match="elementwise: ONNX Runtime failed running the graph"):
        engine.run({**f, "b": np.zeros((3, 3), np.float32)})


def test_bad_outputs_are_named(engine):
    f = feeds()
    with pytest.raises(ValueError, match=r"no output named 'product'; outputs are \['sum'"):
        engine.run(f, ["product"])
    with pytest.raises(ValueError, match="no output named 'product'"):
        engine.run_bound(f, {"product": np.zeros((2, 3), np.float32)})
    frozen = np.zeros((2, 3), np.float32)
    frozen.flags.writeable = False
    with pytest.raises(ValueError, match="output buffer 'sum' must be writable"):
        engine.run_bound(f, {"sum": frozen})
    with pytest.raises(TypeError, match="output buffer 'sum' must be float32, got float16"):
        engine.run_bound(f, {"sum": np.zeros((2, 3), np.float16)})
    with pytest.raises(ValueError, match="output buffer 'sum' must be C-contiguous"):
        engine.run_bound(f, {"sum": np.zeros((3, 2), np.float32).T})


def test_files_providers_and_backends_are_named():
    missing = DATA / "no_such_graph.onnx"
    with pytest.raises(ManifestError, match="no_such_graph.onnx"):
        make_engine(missing, "onnxruntime", None, 0, "llm")
    with pytest.raises(ManifestError, match="ONNX Runtime cannot load .*not_a_model.onnx"):
        make_engine(DATA / "not_a_model.onnx", "onnxruntime", None, 0, "llm")
    unknown = r"execution provider\(s\) \['NoSuchExecutionProvider'\] are not in this onnxruntime build"
    with pytest.raises(BackendUnavailableError, match=unknown):
        make_engine(DATA / "elementwise.onnx", "onnxruntime", ["NoSuchExecutionProvider"], 0, "det")
    if "TensorrtExecutionProvider" not in available_providers():
        no_trt = r"llm: the TensorRT backend needs ONNX Runtime's TensorrtExecutionProvider, and .* has \["
        with pytest.raises(BackendUnavailableError, match=no_trt + ".*'CPUExecutionProvider'"):
            make_engine(missing, "tensorrt", None, 0, "llm")
    with pytest.raises(ValueError, match="unknown backend 'openvino'"):
        make_engine(missing, "openvino", None, 0, "llm")
    assert "CPUExecutionProvider" in available_providers()
    assert "onnxruntime/capi/libonnxruntime.so.1" in onnxruntime_library()


def test_a_cpu_session_has_no_device_io_and_profiles_its_runs(tmp_path):
    plain = make_engine(DATA / "elementwise.onnx", "onnxruntime", None, 1, "elementwise")
    assert plain.device_io is False and plain.end_profiling() == ""
    with pytest.raises(ValueError, match="device_id must be a CUDA device index"):
        make_engine(DATA / "elementwise.onnx", "onnxruntime", None, 1, "elementwise", device_id=-1)
    engine = make_engine(
        DATA / "elementwise.onnx", "onnxruntime", None, 1, "elementwise", profile_prefix=str(tmp_path / "p")
    )
    for _ in range(2):
        engine.run(feeds(), ["sum"])
    profile = engine.end_profiling()
    assert Path(profile).parent == tmp_path and Path(profile).name.startswith("p_")
    no_copies = {"to_host": 0, "from_host": 0, "nodes": []}  # no host<->device copy on the CPU
    assert _core.profile_copies(profile) == [no_copies, no_copies]  # two runs


def test_profile_copies_lists_each_runs_memcpy_nodes_with_their_bytes(tmp_path):
    # What ONNX Runtime writes for a CUDA session: each kernel's "<node>_kernel_time" event inside its
    # model_run, output_size as a decimal string; the fence event and the MatMul are not copies.
    events = [
        {"cat": "Session", "name": "model_run", "ts": 100, "dur": 50},
        {"cat": "Node", "name": "Memcpy_0_fence_before", "ts": 100, "dur": 0,
         "args": {"op_name": "MemcpyToHost"}},
        {"cat": "Node", "name": "Memcpy_0_kernel_time", "ts": 101, "dur": 3,
         "args": {"op_name": "MemcpyToHost", "output_size": "4096"}},
        {"cat": "Node", "name": "MatMul_1_kernel_time", "ts": 105, "dur": 30,
         "args": {"op_name": "MatMul", "output_size": "8"}},
        {"cat": "Node", "name": "Memcpy_1_kernel_time", "ts": 140, "dur": 3,
         "args": {"op_name": "MemcpyFromHost", "output_size": "16"}},
        {"cat": "Session", "name": "model_run", "ts": 200, "dur": 50},
    ]  # fmt: skip
    path = tmp_path / "profile.json"
    path.write_text(json.dumps(events))
    assert _core.profile_copies(str(path)) == [
        {
            "to_host": 1,
            "from_host": 1,
            "nodes": [
                {"op": "MemcpyToHost", "node": "Memcpy_0", "bytes": 4096},
                {"op": "MemcpyFromHost", "node": "Memcpy_1", "bytes": 16},
            ],
        },
        {"to_host": 0, "from_host": 0, "nodes": []},
    ]
    del events[2]["args"]["output_size"]  # a size that cannot be read would pass the GPU check's bar unseen
    path.write_text(json.dumps(events))
    with pytest.raises(ManifestError, match="MemcpyToHost node 'Memcpy_0' has no output_size"):
        _core.profile_copies(str(path))


def test_the_gil_is_released_while_a_graph_runs():
    # With a long switch interval the main thread keeps the GIL between bytecodes, so another Python thread
    # can run inside the window around a call only if the call itself lets go of the GIL.
    engine = make_engine(DATA / "matmul_chain.onnx", "onnxruntime", None, 1, "matmul_chain")
    x = np.full((256, 256), 1e-3, np.float32)
    ticks: list[float] = []
    done = threading.Event()

    def tick():
        while not done.is_set():
            ticks.append(time.perf_counter())

    interval = sys.getswitchinterval()
    sys.setswitchinterval(0.5)
    t = threading.Thread(target=tick)
    t.start()
    windows = []
    try:
        for _ in range(3):
            start = time.perf_counter()
            engine.run({"x": x})
            windows.append((start, time.perf_counter()))
    finally:
        done.set()
        t.join()
        sys.setswitchinterval(interval)
    inside = [s for s in ticks if any(a < s < b for a, b in windows)]
    assert len(inside) > 10, f"{len(inside)} ticks inside {len(windows)} engine calls"


def test_importing_the_engine_loads_no_python_onnxruntime():
    code = (
        "import sys; from pathlib import Path; from visionllm_edge.runtime.engine import make_engine; "
        f"e = make_engine(Path({str(DATA / 'elementwise.onnx')!r}), 'onnxruntime', None, 1, 'x'); "
        "assert 'onnxruntime' not in sys.modules, 'onnxruntime was imported'; "
        "assert 'torch' not in sys.modules"
    )
    subprocess.run([sys.executable, "-c", code], check=True)
