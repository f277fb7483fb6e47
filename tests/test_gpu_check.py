"""benchmarks/gpu_check.py without a GPU: the `--cpu` smoke run writes the report the GPU run writes, with the
GPU-only phases skipped and saying why, and the pieces the GPU run relies on (the two columns' comparison,
GoogleTest's report, the phase verdicts) judge what they are given. The profile's Memcpy nodes are read by the
core's `_core.profile_copies`, tested in test_core_engine.py."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "benchmarks"))
import gpu_check  # noqa: E402

#: A build with VLE_WITH_CUDA=ON, compiled here (nvcc needs no GPU): the cuda preset's, as CI builds it, or
#: the one $VLE_CUDA_BUILD names. Its CUDA tests skip, naming the reason.
CUDA_BUILD = Path(os.environ.get("VLE_CUDA_BUILD", REPO / "build" / "cuda"))
CUDA_BUILD_COMMAND = "cmake --preset cuda && cmake --build --preset cuda (or VLE_CUDA_BUILD=DIR)"

#: Requests of vle_run_parity.py that the LLM-only artifact below answers, and one it cannot (no det graph).
REQUESTS = ["vqa", "caption", "region_caption", "detection"]


@pytest.fixture(scope="module")
def llm_artifact(tmp_path_factory) -> Path:
    """tiny-random with the vision, region and LLM graphs only (seconds to export, unvalidated: the export
    tests validate these graphs)."""
    from visionllm_edge.export.exporter import export

    out = tmp_path_factory.mktemp("gpu-check") / "tiny-random"
    export("tiny-random", out, components=("vision", "region", "llm"), validate=False, progress=False)
    return out


@pytest.fixture(scope="module")
def report(llm_artifact, tmp_path_factory) -> tuple[dict, str]:
    out = tmp_path_factory.mktemp("gpu-check-out")
    cmd = [sys.executable, str(REPO / "benchmarks" / "gpu_check.py"), "--cpu", "--out", str(out)]
    cmd += ["--tiny-random", str(llm_artifact), "--requests", *REQUESTS, "--repeats", "5", "--warmup", "1"]
    if (CUDA_BUILD / "vle_tests").is_file():
        cmd += ["--build-dir", str(CUDA_BUILD)]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout + done.stderr
    return json.loads((out / "gpu_check.json").read_text()), (out / "gpu_check.md").read_text()


def test_smoke_run_reports_every_phase_and_skips_the_gpu_ones_with_a_reason(report):
    data, md = report
    phases = {p["phase"]: p for p in data["phases"]}
    assert [p["phase"] for p in data["phases"]] == list(gpu_check.PHASES)
    assert data["mode"] == "cpu"
    for name in ("cuda_build", "python_extension", "tensorrt"):
        assert phases[name]["status"] == "skipped", phases[name]
        assert "--cpu" in phases[name]["reason"]
    assert all(p["status"] != "passed" or p["checks"] for p in data["phases"])
    assert "nothing here was measured on a GPU" in md
    for name, p in phases.items():
        assert f"| {name} | {p['status']} |" in md


def test_smoke_run_compares_the_two_columns_request_by_request(report):
    data, md = report
    pipelines = next(p for p in data["phases"] if p["phase"] == "pipelines")
    assert pipelines["status"] == "passed", pipelines["reason"]
    rows = {r["request"]: r for r in pipelines["data"]["rows"]}
    assert sorted(rows) == sorted(REQUESTS)
    for task in ("vqa", "caption", "region_caption"):
        assert rows[task]["same"] and rows[task]["tokens"] and rows[task]["max_box_diff"] == 0.0
    # The artifact has no object decoder: the request is recorded as skipped with the SDK's named error.
    assert "det" in rows["detection"]["skipped"]
    assert pipelines["data"]["providers"] == ["CPUExecutionProvider"]
    assert "| tiny_random | detection | skipped:" in md


def test_smoke_run_times_the_decode_step_against_the_floor_but_holds_no_gpu_bar(report):
    data, md = report
    phases = {p["phase"]: p for p in data["phases"]}
    step = phases["decode_step"]
    assert step["status"] == "passed", step["reason"]
    assert [r["past"] for r in step["data"]["rows"]] == list(gpu_check.SMOKE_PASTS)
    for r in step["data"]["rows"]:
        assert r["floor_ms"] > 0 and r["ort_ms"] > 0 and r["eager_ms"] > 0
        assert r["ort_over_floor"] == pytest.approx(r["ort_ms"] / r["floor_ms"])
    # The GPU run's graph (fp16 with fp32 logits) and binding, at small widths.
    assert step["data"]["precision"] == "fp16" and step["data"]["widths"] == gpu_check.SMOKE_WIDTHS
    assert not any("HBM floor" in c["name"] for c in step["checks"])
    assert "not held in --cpu mode" in step["data"]["bar"]
    # The CPU EP inserts no Memcpy nodes: the profile was read and found none.
    profile = phases["memcpy_profile"]
    assert profile["status"] == "passed" and profile["data"]["memcpy_nodes"] == []
    assert "## Decode step: 4 layers, hidden 256, fp16, on cpu" in md


def test_smoke_run_reads_the_cuda_kernel_tests_of_a_cuda_build_without_a_gpu(report):
    data, _ = report
    phase = next(p for p in data["phases"] if p["phase"] == "cuda_kernel_tests")
    if not (CUDA_BUILD / "vle_tests").is_file():
        pytest.skip(f"no {CUDA_BUILD}/vle_tests: {CUDA_BUILD_COMMAND}")
    tests = phase["data"]["tests"]
    assert tests and all("cuda" in t["name"].lower() for t in tests)
    # Without a GPU the comparisons skip with GoogleTest's reason and the phase is skipped, never "passed";
    # the tests that need no GPU (error paths) run and pass.
    counts = phase["data"]["counts"]
    assert phase["status"] == "skipped" and counts["failed"] == 0 and counts["skipped"] > 0
    assert counts["passed"] + counts["skipped"] == len(tests)
    assert all(t["message"] for t in tests if t["outcome"] == "skipped")
    assert f"{counts['skipped']} of {len(tests)} CUDA tests skipped" in phase["reason"]


def _result(boxes, tokens=(1, 2, 3), keypoints=None):
    detections = [
        SimpleNamespace(label="circle", kind="det", query_index=i, box_xyxy=b, mask=None)
        for i, b in enumerate(boxes)
    ]
    poses = [] if keypoints is None else [
        SimpleNamespace(label="person", query_index=0, box_xyxy=(0, 0, 9, 9), keypoints=np.asarray(keypoints))
    ]  # fmt: skip
    links = [SimpleNamespace(kind="det", label="circle", position=5)]
    return SimpleNamespace(
        text="a", token_ids=list(tokens), stop_reason="eos", links=links, detections=detections, poses=poses,
        segmentation=None, images=[],
    )  # fmt: skip


def test_comparison_holds_boxes_and_keypoints_to_the_tolerance_and_tokens_exactly():
    base = _result([(10.0, 10.0, 20.0, 20.0)], keypoints=[[1.0, 1.0]])
    near = _result([(10.0005, 10.0, 20.0, 20.0)], keypoints=[[1.0, 1.0009]])
    far = _result([(10.002, 10.0, 20.0, 20.0)], keypoints=[[1.0, 1.0]])
    moved_keypoint = _result([(10.0, 10.0, 20.0, 20.0)], keypoints=[[1.0, 1.002]])
    other_tokens = _result([(10.0, 10.0, 20.0, 20.0)], tokens=(1, 2, 4), keypoints=[[1.0, 1.0]])
    assert gpu_check.compare_results(base, near)["same"]
    assert gpu_check.compare_results(base, near)["max_box_diff"] == pytest.approx(9e-4)
    assert not gpu_check.compare_results(base, far)["same"]
    assert not gpu_check.compare_results(base, moved_keypoint)["same"]
    row = gpu_check.compare_results(base, other_tokens)
    assert not row["same"] and not row["tokens"] and row["text"]
    fewer = gpu_check.compare_results(base, _result([], keypoints=[[1.0, 1.0]]))
    assert not fewer["same"] and fewer["max_box_diff"] is None


def test_verdicts_never_pass_a_phase_that_checked_nothing_or_failed_a_check():
    empty = gpu_check.settle(gpu_check.phase_result("x", "ran"))
    assert empty["status"] == "failed" and "checked nothing" in empty["reason"]
    one_bad = gpu_check.phase_result("x", "ran")
    gpu_check.add_check(one_bad, "a", True)
    gpu_check.add_check(one_bad, "b", False, "3.1x the floor")
    assert gpu_check.settle(one_bad)["status"] == "failed" and "b: 3.1x the floor" in one_bad["reason"]
    good = gpu_check.phase_result("x", "ran")
    gpu_check.add_check(good, "a", True)
    assert gpu_check.settle(good)["status"] == "passed"
    assert gpu_check.settle(gpu_check.skipped("x", "no GPU"))["status"] == "skipped"


def test_gtest_reader_takes_skip_reasons_from_the_output():
    report = {
        "testsuites": [{"name": "CudaX", "testsuite": [
            {"name": "Skips", "result": "SKIPPED"},
            {"name": "Passes", "result": "COMPLETED"},
            {"name": "Fails", "result": "COMPLETED", "failures": [{"failure": "t.cpp:4\nboom"}]},
        ]}]
    }  # fmt: skip
    stdout = (
        "[ RUN      ] CudaX.Skips\nt.cpp:2: Skipped\nneeds a CUDA GPU: no driver\n\n"
        "[  SKIPPED ] CudaX.Skips (0 ms)\n"
        "[ RUN      ] CudaX.Passes\n[       OK ] CudaX.Passes (0 ms)\n"
        "[ RUN      ] CudaX.Fails\nt.cpp:4: Failure\nboom\n[  FAILED  ] CudaX.Fails (0 ms)\n"
    )
    rows = gpu_check.read_gtest(report, stdout)
    assert [(r["name"], r["outcome"]) for r in rows] == [
        ("CudaX.Skips", "skipped"), ("CudaX.Passes", "passed"), ("CudaX.Fails", "failed")
    ]  # fmt: skip
    assert rows[0]["message"] == "needs a CUDA GPU: no driver" and rows[2]["message"] == "t.cpp:4\nboom"
    assert gpu_check.read_ctest_summary("97% tests passed, 3 tests failed out of 100") == {
        "failed": 3, "total": 100, "passed": 97
    }  # fmt: skip
    assert gpu_check.read_ctest_summary("no tests were found") is None
