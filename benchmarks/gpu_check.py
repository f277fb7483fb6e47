"""The GPU check of issue 17 (item 5): every GPU claim of the SDK measured in one run, one JSON and one
markdown report. `scripts/gpu_check.sh` sets up the machine (the carried onnxruntime-gpu wheel, missing
build packages) and calls this; DEVELOPERS.md says how to get it onto the borrowed GPU machine.

    python3 benchmarks/gpu_check.py --out DIR [--tiny-random DIR] [--shapes-tiny DIR]
    python3 benchmarks/gpu_check.py --cpu --out DIR --tiny-random DIR [--build-dir build/cuda]

Phases, in this order, each with its own time box inside one budget (`--budget-s`, 470 s by default, so
that the whole check ends within 8 minutes); the measurements come before the second build, so that a slow
compile costs the preset's own check, not them:

1. `environment`: GPU, driver, nvcc, torch, and the ONNX Runtime build the check will use (its providers).
2. `python_extension`: the package built with `VLE_WITH_CUDA=ON` (and its GoogleTest binary, one compile
   for both) into a scratch folder; the processes of the next phases import it from there.
3. `cuda_kernel_tests`: ctest over that build, then the GoogleTest cases whose name says CUDA, each kernel
   against its CPU twin, read from GoogleTest's JSON report.
4. `pipelines`: each artifact (tiny-random, shapes-tiny) loaded twice, with the CUDA execution provider and
   with the CPU one, on the requests of `vle_run_parity.py` (one per task and a sampled caption): the same
   text, tokens, stop reason and groups, boxes and keypoints within 1e-3; `stats["llm_device"]` (1.0 when the
   loop keeps the KV arena on the GPU) is recorded and must be 1.0 on the CUDA column.
5. `decode_step`: one decode step (S=1) of a 4-layer Llama at Vicuna-7B widths (`llm_kv_step.build_model`,
   seeded random weights, exported through our `llm.onnx` path in fp16), past 512 and 2048: ONNX Runtime's
   CUDA EP with device I/O binding (the past bound by pointer as prefix views of a device arena, the new rows
   written into the arena, as the runtime does) against torch eager on the same weights and against the
   HBM floor, (weight bytes + past KV bytes) / the device-to-device copy rate measured in the same process
   (bytes read plus written, as KINDS.md counts them). Bar: ORT within 1.5x of the floor at past 512.
6. `memcpy_profile`: an ONNX Runtime profile of that step: no Memcpy node moves a past-sized tensor.
7. `tensorrt`: the same step through the TensorRT EP where the installed onnxruntime has it and it loads.
8. `cuda_build`: the `cuda` CMake preset itself configured and built, as CI builds it (with this GPU's
   architecture only).

The phases that measure run in processes of their own (a hung CUDA call, or a second ONNX Runtime in one
process, cannot take the run with it), which write their results as they go: a phase cut off by its box
keeps what it measured, marked `timeout`.

A phase that cannot run here is `skipped` with the reason, never `passed`; one whose checks fail is
`failed`; one that ran past its box is `timeout`; one that raised is `error`. `--cpu` is the smoke mode for
machines without a GPU: the CPU execution provider in both columns, small widths for the decode step (the
same fp16 graph and binding), the GPU-only phases skipped; its numbers are CPU numbers and say nothing about
a GPU.
"""

from __future__ import annotations

import argparse
import importlib.metadata
import importlib.util
import json
import os
import platform
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
BENCHMARKS = REPO / "benchmarks"
# vle_run_parity (the parity requests and tolerances) and llm_kv_step are imported where they are used: they
# import visionllm_edge, which on the GPU machine exists only once the python_extension phase has built it.
sys.path.insert(0, str(BENCHMARKS))

PHASES = (
    "environment",
    "python_extension",
    "cuda_kernel_tests",
    "pipelines",
    "decode_step",
    "memcpy_profile",
    "tensorrt",
    "cuda_build",
)
#: Seconds each phase may take at most (the run's remaining budget cuts it further).
BOXES = {
    "environment": 60,
    "python_extension": 180,
    "cuda_kernel_tests": 90,
    "pipelines": 120,
    "decode_step": 200,  # with memcpy_profile and tensorrt: one process, one exported graph
    "cuda_build": 180,
}
#: Phases that need an NVIDIA GPU and are skipped by `--cpu`.
GPU_ONLY = ("python_extension", "cuda_build")

#: The CMake build folder of the package's CUDA build (python_extension); the kernel tests run its vle_tests.
PYTHON_BUILD = REPO / "build" / "cuda-python"

CUDA_PROVIDERS = ["CUDAExecutionProvider", "CPUExecutionProvider"]
CPU_PROVIDERS = ["CPUExecutionProvider"]

#: The decode step's model: Vicuna-7B widths on the GPU (llm_kv_step.WIDTHS), small ones in the smoke run.
SMOKE_WIDTHS = dict(
    vocab_size=1000,
    hidden_size=256,
    intermediate_size=688,
    num_attention_heads=4,
    num_key_value_heads=4,
    max_position_embeddings=4096,
)
DECODE_LAYERS = 4
GPU_PASTS = (512, 2048)
SMOKE_PASTS = (64, 256)
#: The same step measured before issue 17's work (shared/DESIGN.md section 8), for the reader of a GPU report.
BEFORE_THIS_WORK = (
    "Before this work (H200, shared/DESIGN.md section 8): ONNX Runtime with device I/O binding 1.58 ms, "
    "torch eager 4.06 ms, against a 0.44 ms floor, at past 512."
)
#: Issue 17's bar: a decode step at 7B widths (4 layers, fp16, past 512) within this factor of the HBM floor.
FLOOR_BAR = 1.5
FLOOR_BAR_PAST = 512


# --- results ---------------------------------------------------------------------------------------------


def phase_result(name: str, status: str, reason: str = "", **data) -> dict:
    return {"phase": name, "status": status, "reason": reason, "seconds": None, "checks": [], "data": data}


def skipped(name: str, reason: str) -> dict:
    return phase_result(name, "skipped", reason)


def add_check(result: dict, name: str, ok: bool, detail: str = "") -> None:
    result["checks"].append({"name": name, "ok": bool(ok), "detail": detail})


def settle(result: dict) -> dict:
    """`passed` when the phase has checks and all hold, `failed` naming the first that does not; a phase
    already skipped, timed out or in error keeps its status."""
    if result["status"] not in ("", "ran"):
        return result
    failed = [c for c in result["checks"] if not c["ok"]]
    if not result["checks"]:
        result["status"], result["reason"] = "failed", result["reason"] or "the phase checked nothing"
    elif failed:
        result["status"] = "failed"
        result["reason"] = "; ".join(f"{c['name']}: {c['detail']}" for c in failed)[:2000]
    else:
        result["status"] = "passed"
    return result


# --- running phases in their own processes ----------------------------------------------------------------


def run_child(names: list[str], config: dict, box: float, env: dict) -> list[dict]:
    """Runs `_child NAMES` in a fresh interpreter (so that a hung CUDA call or a second ONNX Runtime in the
    process cannot take the parent with it) and returns its phase results, or timeouts / errors for them."""
    with tempfile.TemporaryDirectory(prefix="gpu-check-") as tmp:
        out = Path(tmp) / "result.json"
        cmd = [
            sys.executable,
            str(Path(__file__).resolve()),
            "_child",
            ",".join(names),
            json.dumps(config),
            str(out),
        ]
        try:
            done = subprocess.run(cmd, capture_output=True, text=True, timeout=box, env=env)
        except subprocess.TimeoutExpired as e:
            tail = _tail((e.stdout or b"").decode() if isinstance(e.stdout, bytes) else (e.stdout or ""))
            done_so_far = json.loads(out.read_text()) if out.is_file() else []
            for r in done_so_far:  # finished phases keep their verdict; the one cut off keeps its data
                if r["status"] == "ran":
                    r["status"], r["reason"] = "timeout", f"cut off by its {box:.0f} s box"
            return done_so_far + [
                phase_result(n, "timeout", f"did not finish within its {box:.0f} s box", log=tail)
                for n in names[len(done_so_far) :]
            ]
        if out.is_file():
            results = json.loads(out.read_text())
            for r in results:
                r["data"].setdefault("log", _tail(done.stdout + done.stderr))
            return results + [
                phase_result(n, "error", "the phase process ended before this phase", log=_tail(done.stderr))
                for n in names[len(results) :]
            ]
        reason = f"the phase process exited with {done.returncode} and wrote no result"
        return [phase_result(n, "error", reason, log=_tail(done.stdout + done.stderr)) for n in names]


def _tail(text: str, chars: int = 3000) -> str:
    return text[-chars:]


class Emitter:
    """Writes a child's phase results to its result file whenever they change (atomically), so that the
    parent finds what was measured even when it has to stop the child."""

    def __init__(self, path: str):
        self.path = Path(path)
        self.results: list[dict] = []

    def __call__(self, result: dict) -> dict:
        """Records `result` (a new phase, or the latest state of the last one) and writes them all."""
        if self.results and self.results[-1]["phase"] == result["phase"]:
            self.results[-1] = result
        else:
            self.results.append(result)
        tmp = self.path.with_suffix(".tmp")
        tmp.write_text(json.dumps(self.results, indent=1, default=str))
        tmp.replace(self.path)
        return result


def child_main(names: str, config_json: str, out_path: str) -> int:
    config = json.loads(config_json)
    emit = Emitter(out_path)
    try:
        if names == "environment":
            emit(environment(config))
        elif names == "pipelines":
            pipelines(config, emit)
        elif names == "decode_step,memcpy_profile,tensorrt":
            decode_phases(config, emit)
        else:
            raise ValueError(f"no child phase group {names!r}")
    except Exception as e:  # the parent records the failure as the result of the phase that raised
        import traceback

        done = [r["phase"] for r in emit.results if r["status"] != "ran"]
        raised = None
        for n in names.split(","):
            if n in done:
                continue
            if raised is None:
                raised = n
                error = f"{type(e).__name__}: {e}"
                emit(phase_result(n, "error", error, traceback=traceback.format_exc()[-3000:]))
            else:  # the phases after it share its process and its graph
                emit(skipped(n, f"{raised} raised before this phase could run"))
    return 0


# --- 1. environment ---------------------------------------------------------------------------------------


def _command(cmd: list[str], timeout: float = 20) -> str | None:
    """The command's stdout, or None where it is missing or fails."""
    if shutil.which(cmd[0]) is None:
        return None
    try:
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return done.stdout.strip() if done.returncode == 0 else None


def gpu_name() -> str | None:
    """The first GPU's name from nvidia-smi, or None where there is no NVIDIA GPU to see."""
    out = _command(["nvidia-smi", "--query-gpu=name", "--format=csv,noheader"])
    return out.splitlines()[0].strip() if out else None


def environment(config: dict) -> dict:
    result = phase_result("environment", "ran")
    d = result["data"]
    d["mode"] = config["mode"]
    d["host"] = (
        f"{platform.node()}, {os.cpu_count()} CPUs, {platform.machine()}, Python {platform.python_version()}"
    )
    smi = _command(
        ["nvidia-smi", "--query-gpu=name,driver_version,memory.total,compute_cap", "--format=csv,noheader"]
    )
    d["gpu"] = smi
    nvcc = _command(["nvcc", "--version"])
    d["nvcc"] = nvcc.splitlines()[-1] if nvcc else None
    try:  # the version without importing torch (seconds on a loaded CPU); CUDA only where it matters
        d["torch"] = importlib.metadata.version("torch")
    except importlib.metadata.PackageNotFoundError:
        d["torch"] = None
    if config["mode"] == "cuda" and d["torch"]:
        import torch

        d["torch_cuda"] = torch.cuda.is_available()
    import onnxruntime as ort

    d["onnxruntime"] = ort.__version__
    d["onnxruntime_path"] = str(Path(ort.__file__).parent)
    d["providers"] = ort.get_available_providers()
    if config["mode"] == "cuda":
        add_check(result, "nvidia-smi sees a GPU", bool(smi), smi or "nvidia-smi found no GPU")
        add_check(
            result,
            "onnxruntime has the CUDA EP",
            "CUDAExecutionProvider" in d["providers"],
            f"onnxruntime {ort.__version__} at {d['onnxruntime_path']}: {d['providers']}",
        )
    else:
        add_check(
            result,
            "onnxruntime has the CPU EP",
            "CPUExecutionProvider" in d["providers"],
            str(d["providers"]),
        )
    return settle(result)


# --- 2-3. the cuda preset and its tests -------------------------------------------------------------------


def preset_binary_dir(name: str, presets: Path = REPO / "CMakePresets.json") -> Path | None:
    """The binary folder of configure preset `name`, or None when CMakePresets.json has no such preset."""
    data = json.loads(presets.read_text())
    by_name = {p["name"]: p for p in data.get("configurePresets", [])}
    preset = by_name.get(name)
    while preset is not None and "binaryDir" not in preset and preset.get("inherits"):
        parent = preset["inherits"]
        preset = by_name.get(parent[0] if isinstance(parent, list) else parent)
    if preset is None or "binaryDir" not in preset:
        return None
    return Path(preset["binaryDir"].replace("${sourceDir}", str(REPO)))


def _run_logged(cmd: list[str], timeout: float, log: list[str], env: dict | None = None) -> int:
    log.append("$ " + " ".join(cmd))
    done = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=timeout, env=env)
    log.append(_tail(done.stdout + done.stderr, 4000))
    return done.returncode


def gpu_architecture() -> str | None:
    """The architectures to build for: $CUDAARCHS (CMake's own variable) where set, else the first GPU's
    compute capability as CMake spells it ("90"), or None."""
    if os.environ.get("CUDAARCHS"):
        return os.environ["CUDAARCHS"]
    out = _command(["nvidia-smi", "--query-gpu=compute_cap", "--format=csv,noheader"])
    return out.splitlines()[0].strip().replace(".", "") if out else None


def onnxruntime_library_path() -> str | None:
    """The libonnxruntime.so.1 of the onnxruntime package first on the path, found without importing it (the
    same search as runtime/engine.py's), for the C++ tests' default library."""
    spec = importlib.util.find_spec("onnxruntime")
    if spec is None or not spec.submodule_search_locations:
        return None
    found = sorted((Path(next(iter(spec.submodule_search_locations))) / "capi").glob("libonnxruntime.so.1*"))
    return str(found[-1]) if found else None


def cmake_defines() -> list[str]:
    """This GPU's architecture only (the preset's default builds 8.7 and 9.0: twice the nvcc time) and the
    ONNX Runtime library the C++ tests open."""
    defines = []
    if gpu_architecture():
        defines.append(f"CMAKE_CUDA_ARCHITECTURES={gpu_architecture()}")
    if onnxruntime_library_path():
        defines.append(f"VLE_ONNXRUNTIME_LIBRARY={onnxruntime_library_path()}")
    return defines


def cuda_build(box: float, env: dict) -> dict:
    result = phase_result("cuda_build", "ran")
    build = preset_binary_dir("cuda")
    if build is None:
        return phase_result("cuda_build", "failed", "CMakePresets.json has no 'cuda' configure preset")
    log: list[str] = []
    t0 = time.monotonic()
    rc = _run_logged(["cmake", "--preset", "cuda", *("-D" + d for d in cmake_defines())], box, log, env)
    add_check(result, "cmake --preset cuda", rc == 0, f"exit {rc}")
    if rc == 0:
        left = box - (time.monotonic() - t0)
        rc = _run_logged(["cmake", "--build", str(build), "-j", str(os.cpu_count() or 2)], left, log, env)
        add_check(result, f"cmake --build {build.name}", rc == 0, f"exit {rc}")
    result["data"].update(build_dir=str(build), log="\n".join(log)[-6000:])
    return settle(result)


def read_gtest(report: dict, stdout: str) -> list[dict]:
    """GoogleTest's JSON report (`--gtest_output=json:PATH`) as one row per test: name, outcome (`passed`,
    `failed`, `skipped`) and message (the failures, or the skip's reason, which the JSON of GoogleTest 1.12
    leaves out and its output prints between `[ RUN ]` and `[  SKIPPED ]`)."""
    skip_reasons = {
        m.group(1): m.group(2).strip()
        for m in re.finditer(
            r"\[ RUN      \] (\S+)\n(?:.*?: Skipped\n)?(.*?)\[  SKIPPED \] \1 ", stdout, re.S
        )
    }
    rows = []
    for suite in report.get("testsuites", []):
        for case in suite.get("testsuite", []):
            name = f"{suite['name']}.{case['name']}"
            failures = "\n".join(f.get("failure", "") for f in case.get("failures", []))
            if case.get("result") == "SKIPPED":
                rows.append({"name": name, "outcome": "skipped", "message": skip_reasons.get(name, "")})
            else:
                rows.append(
                    {"name": name, "outcome": "failed" if failures else "passed", "message": failures}
                )
    return rows


def read_ctest_summary(text: str) -> dict | None:
    """ctest's closing line ('100% tests passed, 0 tests failed out of 412') as numbers, or None."""
    m = re.search(r"(\d+)% tests passed, (\d+) tests? failed out of (\d+)", text)
    if m is None:
        return None
    failed, total = int(m.group(2)), int(m.group(3))
    return {"failed": failed, "total": total, "passed": total - failed}


#: GoogleTest names of the CUDA kernels' tests (csrc/tests/test_cuda_*.cpp name their suites so).
CUDA_TEST_FILTER = "*Cuda*:*CUDA*:*cuda*"


def _configured_with_cuda(build: Path) -> bool:
    cache = build / "CMakeCache.txt"
    return (
        cache.is_file()
        and re.search(r"^VLE_WITH_CUDA:BOOL=(ON|1|TRUE)$", cache.read_text(), re.M) is not None
    )


def cuda_kernel_tests(build: Path, box: float, mode: str, run_ctest: bool) -> dict:
    result = phase_result("cuda_kernel_tests", "ran")
    binary = build / "vle_tests"
    if not binary.is_file():
        how = "cmake --preset cuda && cmake --build --preset cuda" if mode == "cuda" else "--build-dir"
        return skipped("cuda_kernel_tests", f"no GoogleTest binary at {binary} ({how})")
    log: list[str] = []
    t0 = time.monotonic()
    if run_ctest:
        cmd = ["ctest", "--test-dir", str(build), "--output-on-failure", "-j", str(os.cpu_count() or 2)]
        log.append("$ " + " ".join(cmd))
        done = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=box)
        log.append(_tail(done.stdout + done.stderr, 4000))
        summary = read_ctest_summary(done.stdout)
        result["data"]["ctest"] = summary
        add_check(
            result,
            "ctest",
            done.returncode == 0 and summary is not None,
            f"exit {done.returncode}: {summary}",
        )
    with tempfile.TemporaryDirectory(prefix="gpu-check-gtest-") as tmp:
        report = Path(tmp) / "cuda.json"
        cmd = [str(binary), f"--gtest_filter={CUDA_TEST_FILTER}", f"--gtest_output=json:{report}"]
        log.append("$ " + " ".join(cmd))
        done = subprocess.run(
            cmd, cwd=REPO, capture_output=True, text=True, timeout=max(5.0, box - (time.monotonic() - t0))
        )
        log.append(_tail(done.stdout + done.stderr, 4000))
        rows = read_gtest(json.loads(report.read_text()), done.stdout) if report.is_file() else []
    result["data"].update(tests=rows, log="\n".join(log)[-6000:])
    counts = {k: sum(r["outcome"] == k for r in rows) for k in ("passed", "failed", "skipped")}
    result["data"]["counts"] = counts
    if not rows and not _configured_with_cuda(build):
        reason = f"{build} was configured without VLE_WITH_CUDA: it has no CUDA tests"
        if mode == "cpu":
            return skipped("cuda_kernel_tests", reason)
        return phase_result("cuda_kernel_tests", "failed", reason, **result["data"])
    if not rows:
        add_check(
            result, "CUDA kernel tests", False, f"{binary.name} has no test matching {CUDA_TEST_FILTER}"
        )
    elif counts["failed"] == 0 and counts["skipped"] and mode == "cpu":
        # The comparisons with the CPU twins need a GPU; the tests that need none (error paths) ran.
        why = next((r["message"] for r in rows if r["outcome"] == "skipped" and r["message"]), "")
        result["status"] = "skipped"
        result["reason"] = (
            f"{counts['skipped']} of {len(rows)} CUDA tests skipped by GoogleTest ({why.strip()[:200]}); "
            f"the {counts['passed']} that need no GPU passed"
        )
    else:
        skips = [f"{r['name']}: {r['message'][:100]}" for r in rows if r["outcome"] == "skipped"]
        add_check(
            result,
            "CUDA kernels equal their CPU twins",
            counts["failed"] == 0 and counts["skipped"] == 0,
            f"{counts}; skipped on a GPU machine: {skips[:3]}" if skips else str(counts),
        )
    return settle(result)


# --- 4. the Python extension with CUDA --------------------------------------------------------------------


def python_extension(site: Path, box: float, env: dict) -> dict:
    result = phase_result("python_extension", "ran")
    log: list[str] = []
    cmd = [
        sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--no-build-isolation", "--no-index",
        "--upgrade", "--target", str(site),  # --upgrade: a rerun on a warm machine replaces the last build
        "-Ccmake.define.VLE_WITH_CUDA=ON", "-Ccmake.define.VLE_BUILD_TESTS=ON", f"-Cbuild-dir={PYTHON_BUILD}",
        *(f"-Ccmake.define.{d}" for d in cmake_defines()), str(REPO),
    ]  # fmt: skip
    rc = _run_logged(cmd, box, log, env)
    add_check(result, "pip install . -Ccmake.define.VLE_WITH_CUDA=ON", rc == 0, f"exit {rc}")
    result["data"].update(site=str(site), log="\n".join(log)[-6000:])
    return settle(result)


# --- 5. the pipelines on two execution providers ----------------------------------------------------------


def request_kwargs(req, max_new_tokens: int, seed: int) -> tuple[dict, list | None]:
    """`Pipeline.__call__` keywords and regions for one of vle_run_parity's requests (the same settings
    its two commands get)."""
    from vle_run_parity import SAMPLING

    kwargs = {"max_new_tokens": max_new_tokens, "seed": seed}
    if req.answer_prefix is not None:
        kwargs["answer_prefix"] = req.answer_prefix
    if req.sample:
        kwargs.update(do_sample=True, **SAMPLING)
    regions = [tuple(float(v) for v in req.region.split(","))] if req.region else None
    return kwargs, regions


def compare_results(a, b) -> dict:
    """What issue 17's bar compares between two columns: text, tokens, stop reason and groups equal; boxes
    and keypoints within BOX_TOL. Masks, the semantic map and generated images are measured, not held."""
    import numpy as np
    from vle_run_parity import BOX_TOL

    row = {
        "text": a.text == b.text,
        "tokens": list(a.token_ids) == list(b.token_ids),
        "stop_reason": a.stop_reason == b.stop_reason,
        "groups": [(x.kind, x.label, x.position) for x in a.links]
        == [(x.kind, x.label, x.position) for x in b.links],
    }
    box = 0.0
    same_objects = [(d.label, d.kind, d.query_index) for d in a.detections] == [
        (d.label, d.kind, d.query_index) for d in b.detections
    ]
    same_objects &= [(p.label, p.query_index) for p in a.poses] == [(p.label, p.query_index) for p in b.poses]
    if same_objects:
        for x, y in zip(a.detections, b.detections):
            box = max(box, float(np.abs(np.subtract(x.box_xyxy, y.box_xyxy)).max()))
        for x, y in zip(a.poses, b.poses):
            box = max(box, float(np.abs(np.subtract(x.box_xyxy, y.box_xyxy)).max()))
            box = max(box, float(np.abs(np.asarray(x.keypoints) - np.asarray(y.keypoints)).max(initial=0.0)))
    row["objects"] = same_objects
    row["max_box_diff"] = box if same_objects else None
    masks = [int((x.mask != y.mask).sum()) for x, y in zip(a.detections, b.detections) if x.mask is not None]
    row["mask_pixels_differing"] = sum(masks) if same_objects else None
    if a.segmentation is not None and b.segmentation is not None:
        row["semantic_pixels_differing"] = int((a.segmentation.label_map != b.segmentation.label_map).sum())
    if a.images and len(a.images) == len(b.images):
        row["max_image_diff"] = max(
            float(np.abs(x.astype(np.float64) - y.astype(np.float64)).max()) / 255.0
            for x, y in zip(a.images, b.images)
        )
    row["same"] = all(row[k] for k in ("text", "tokens", "stop_reason", "groups", "objects")) and (
        row["max_box_diff"] is not None and row["max_box_diff"] <= BOX_TOL
    )
    return row


def pipelines(config: dict, emit) -> dict:
    import numpy as np
    from visionllm_edge import Pipeline
    from visionllm_edge.demo import demo_scene
    from vle_run_parity import REQUESTS

    result = phase_result("pipelines", "ran")
    image = np.asarray(demo_scene())
    rows = []
    missing = []
    result["data"].update(rows=rows, providers=config["providers"], missing_artifacts=missing)
    for name, folder in config["artifacts"].items():
        if not folder:
            missing.append(name)
            continue
        columns = {
            "a": Pipeline.load(folder, providers=config["providers"]),
            "b": Pipeline.load(folder, providers=CPU_PROVIDERS),
        }
        for req in REQUESTS:
            if config["requests"] and req.task not in config["requests"]:
                continue
            kwargs, regions = request_kwargs(req, config["max_new_tokens"], 0)
            row = {"artifact": name, "request": req.task}
            try:
                out = {k: p(image, req.prompt, regions=regions, **kwargs) for k, p in columns.items()}
            except Exception as e:  # an artifact exported without a component answers with a named error
                if "has no" in str(e) and "graph" in str(e):
                    row["skipped"] = str(e).splitlines()[0][:300]
                    rows.append(row)
                    continue
                raise
            row.update(compare_results(out["a"], out["b"]))
            stats = (out["a"].raw or {}).get("stats", {})
            row["llm_device"] = stats.get("llm_device")
            row["ms"] = {k: round(r.timings.get("total", 0.0), 1) for k, r in out.items()}
            rows.append(row)
            emit(result)
        del columns
    ran = [r for r in rows if "skipped" not in r]
    if not ran:
        why = (
            f"no artifact given ({', '.join('--' + m.replace('_', '-') for m in missing)})" if missing else ""
        )
        return emit(skipped("pipelines", why or "every request needs a graph the artifacts lack"))
    for r in ran:
        add_check(
            result,
            f"{r['artifact']} {r['request']}",
            r["same"],
            "same"
            if r["same"]
            else json.dumps(
                {k: r[k] for k in ("text", "tokens", "stop_reason", "groups", "objects", "max_box_diff")}
            ),
        )
        if config["mode"] == "cuda":
            add_check(
                result,
                f"{r['artifact']} {r['request']} llm_device",
                r["llm_device"] == 1.0,
                f"stats['llm_device'] = {r['llm_device']} (1.0: the KV arena is on the GPU)",
            )
    return emit(settle(result))


# --- 6-8. a decode step at 7B widths ----------------------------------------------------------------------


def copy_bandwidth(torch, device: str, nbytes: int, repeats: int = 10) -> float:
    """Bytes read plus written per second by a large copy on `device` (median of `repeats`)."""
    src = torch.empty(nbytes, dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    times = []
    for i in range(repeats + 2):
        _sync(torch, device)
        t0 = time.perf_counter()
        dst.copy_(src)
        _sync(torch, device)
        if i >= 2:
            times.append(time.perf_counter() - t0)
    del src, dst
    return 2 * nbytes / statistics.median(times)


def _sync(torch, device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def time_calls(fn, sync, warmup: int, repeats: int) -> list[float]:
    """Milliseconds of `repeats` calls after `warmup`, each synchronised with the device."""
    for _ in range(warmup):
        fn()
    sync()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        sync()
        times.append((time.perf_counter() - t0) * 1e3)
    return times


class DecodeStep:
    """One exported llm.onnx step with its arena on `device`, bound as the runtime binds it: the past as the
    prefix `[0:past]` of each layer's arena, the new K/V row written at `[past]`, the logits and hidden state
    into device buffers; torch tensors own every buffer, each of the dtype the graph declares (an fp16 graph
    takes fp16 rows and past but returns fp32 logits: its fp32 islands)."""

    def __init__(self, ort, torch, path: Path, providers, provider_options, device, settings, capacity, seed,
                 profile_prefix: str | None = None):  # fmt: skip
        from visionllm_edge.export.onnx.llm import io_names

        self.torch, self.device = torch, device
        opts = ort.SessionOptions()
        opts.log_severity_level = 3
        if profile_prefix:
            opts.enable_profiling = True
            opts.profile_file_prefix = profile_prefix
        entries = [(p, provider_options.get(p, {})) for p in providers]
        self.session = ort.InferenceSession(str(path), opts, providers=entries)
        self.providers = self.session.get_providers()
        types = {t.name: t.type for t in [*self.session.get_inputs(), *self.session.get_outputs()]}
        dtype = {"tensor(float16)": torch.float16, "tensor(float)": torch.float32}
        self.dtypes = {name: dtype[t] for name, t in types.items() if t in dtype}
        inputs, outputs = io_names(settings.num_hidden_layers)
        self.past_names, self.new_names = inputs[3:], outputs[2:]
        for past_name, new_name in zip(self.past_names, self.new_names):
            if self.dtypes[past_name] != self.dtypes[new_name]:
                raise TypeError(f"{path}: {new_name} is {types[new_name]} but {past_name} {types[past_name]}")
        g = torch.Generator(device="cpu").manual_seed(seed)
        shape = (capacity, settings.num_key_value_heads, settings.head_dim)
        self.arena = {n: self._random(shape, g, n) for n in self.past_names}
        self.x = self._random((1, 1, settings.hidden_size), g, "inputs_embeds")
        self.logits = torch.empty(1, settings.vocab_size, device=device, dtype=self.dtypes["logits"])
        self.hidden = torch.empty(1, settings.hidden_size, device=device, dtype=self.dtypes["hidden"])
        self.rows = torch.zeros(1, dtype=torch.int64, device=device)

    def _random(self, shape, generator, name):
        return self.torch.randn(shape, generator=generator).to(device=self.device, dtype=self.dtypes[name])

    def _bind(self, binding, name, tensor, output=False):
        import numpy as np

        t = self.torch
        dtype = {t.float16: np.float16, t.float32: np.float32, t.int64: np.int64}[tensor.dtype]
        bind = binding.bind_output if output else binding.bind_input
        bind(
            name, "cuda" if self.device == "cuda" else "cpu", 0, dtype, list(tensor.shape), tensor.data_ptr()
        )

    def binding(self, past: int):
        """The step's binding at `past` (the position lives on the device with everything else)."""
        b = self.session.io_binding()
        self.position = self.torch.tensor([past], dtype=self.torch.int64, device=self.device)
        self._bind(b, "inputs_embeds", self.x)
        self._bind(b, "position_ids", self.position)
        self._bind(b, "output_rows", self.rows)
        for name in self.past_names:
            self._bind(b, name, self.arena[name][:past])
        self._bind(b, "logits", self.logits, output=True)
        self._bind(b, "hidden", self.hidden, output=True)
        for past_name, new_name in zip(self.past_names, self.new_names):
            self._bind(b, new_name, self.arena[past_name][past : past + 1], output=True)
        return b

    def run(self, binding) -> None:
        self.session.run_with_iobinding(binding)


def decode_phases(config: dict, emit) -> None:
    import numpy as np
    import onnxruntime as ort
    import torch
    from llm_kv_step import WIDTHS, build_model
    from visionllm_edge import _core
    from visionllm_edge.export.onnx.base import ExportSettings, export_graph
    from visionllm_edge.export.onnx.llm import build_graph

    cuda = config["mode"] == "cuda"
    device = "cuda" if cuda else "cpu"
    if cuda and hasattr(ort, "preload_dlls"):  # onnxruntime >= 1.21
        ort.preload_dlls()  # cuDNN / cuBLAS from the nvidia-* wheels torch uses, before a CUDA session
    precision = config["precision"]
    dtype, width = {"fp16": (torch.float16, 2), "fp32": (torch.float32, 4)}[precision]
    widths = WIDTHS if cuda else SMOKE_WIDTHS
    pasts = list(GPU_PASTS if cuda else SMOKE_PASTS)
    warmup, repeats = config["warmup"], config["repeats"]
    step = phase_result("decode_step", "ran")
    profile_result = phase_result("memcpy_profile", "ran")
    d = step["data"]

    t0 = time.perf_counter()
    llm = build_model(DECODE_LAYERS, seed=0, widths=widths)
    s = llm.settings
    weight_bytes = sum(p.numel() for n, p in llm.named_parameters() if "embed_tokens" not in n) * width
    work = Path(tempfile.mkdtemp(prefix="gpu-check-llm-", dir=config.get("scratch")))
    path = work / "llm.onnx"
    export_graph(build_graph(llm, ExportSettings(precision=precision)), path, external_data=True)
    d.update(
        layers=DECODE_LAYERS, widths=widths, precision=precision, pasts=pasts, weight_bytes=weight_bytes,
        export_s=round(time.perf_counter() - t0, 1), device=device,
    )  # fmt: skip
    bandwidth = copy_bandwidth(torch, device, config["copy_bytes"])
    d["copy_bandwidth_GBps"] = round(bandwidth / 1e9, 1)
    kv_row_bytes = 2 * s.num_hidden_layers * s.num_key_value_heads * s.head_dim * width

    llm_dev = llm.to(device=device, dtype=dtype)
    capacity = max(pasts) + 1
    providers = config["providers"]
    options = {"CUDAExecutionProvider": {"device_id": "0"}} if cuda else {}
    stepper = DecodeStep(ort, torch, path, providers, options, device, s, capacity, seed=1)
    d["providers_loaded"] = stepper.providers
    if stepper.providers[0] != providers[0]:  # ONNX Runtime falls back quietly when a provider fails to load
        reason = f"the session asked for {providers} runs on {stepper.providers}"
        emit(phase_result("decode_step", "failed", reason, **d))
        emit(skipped("memcpy_profile", reason))
        emit(skipped("tensorrt", reason))
        return
    sync = (lambda: torch.cuda.synchronize()) if cuda else (lambda: None)

    rows = []
    for past in pasts:
        binding = stepper.binding(past)
        ref_past = [
            tuple(
                stepper.arena[f"{kind}.{i}"][:past].permute(1, 0, 2).contiguous()[None]
                for kind in ("past_key", "past_value")
            )
            for i in range(s.num_hidden_layers)
        ]
        pos = torch.tensor([past], device=device)

        def eager(ref_past=ref_past, pos=pos):
            with torch.inference_mode():
                out = llm_dev(stepper.x, pos, ref_past)
                return llm_dev.lm_head(out.hidden[:, -1])

        stepper.run(binding)
        sync()
        got = stepper.logits.float().cpu().numpy()
        want = eager().float().cpu().numpy()
        diff = float(np.abs(got - want).max())
        scale = max(1.0, float(np.abs(want).max()))
        tol = {"fp16": 2e-2, "fp32": 1e-3}[precision] * scale  # fp16: both sides round differently
        add_check(
            step,
            f"ORT logits equal eager at past {past}",
            diff <= tol,
            f"max |diff| {diff:.3g} (tolerance {tol:.3g})",
        )
        ort_ms = time_calls(lambda b=binding: stepper.run(b), sync, warmup, repeats)
        eager_ms = time_calls(eager, sync, warmup, repeats)
        floor_ms = (weight_bytes + past * kv_row_bytes) / bandwidth * 1e3
        row = {
            "past": past, "floor_ms": floor_ms, "ort_ms": statistics.median(ort_ms),
            "ort_min_ms": min(ort_ms), "ort_max_ms": max(ort_ms), "eager_ms": statistics.median(eager_ms),
            "max_logit_diff": diff,
        }  # fmt: skip
        row["ort_over_floor"] = row["ort_ms"] / floor_ms
        row["eager_over_floor"] = row["eager_ms"] / floor_ms
        rows.append(row)
        d["rows"] = rows
        emit(step)
        del ref_past
    d["rows"] = rows
    bar_row = next((r for r in rows if r["past"] == FLOOR_BAR_PAST), None)
    if cuda and bar_row is not None:
        add_check(
            step,
            f"ORT within {FLOOR_BAR}x of the HBM floor at past {FLOOR_BAR_PAST}",
            bar_row["ort_over_floor"] <= FLOOR_BAR,
            f"{bar_row['ort_ms']:.3f} ms against a {bar_row['floor_ms']:.3f} ms floor "
            f"({bar_row['ort_over_floor']:.2f}x)",
        )
    else:
        d["bar"] = f"the {FLOOR_BAR}x floor bar applies to a GPU at 7B widths; not held in --cpu mode"
    emit(settle(step))

    # 7. the profile of the same step, past as large as the arena allows
    past = max(pasts)
    prof = DecodeStep(ort, torch, path, providers, options, device, s, capacity, seed=1,
                      profile_prefix=str(work / "profile"))  # fmt: skip
    binding = prof.binding(past)
    for _ in range(5):
        prof.run(binding)
    sync()
    profile = Path(prof.session.end_profiling())
    # The core's reader (engines/ort_profile.h): the Memcpy kernels of each run, with their output bytes.
    nodes = [n for run in _core.profile_copies(str(profile)) for n in run["nodes"]]
    layer_past_bytes = past * s.num_key_value_heads * s.head_dim * width
    big = [n for n in nodes if n["bytes"] >= layer_past_bytes]
    profile_result["data"].update(past=past, memcpy_nodes=nodes, layer_past_bytes=layer_past_bytes, steps=5)
    add_check(
        profile_result,
        "no Memcpy node moves a past-sized tensor",
        not big,
        f"{len(nodes)} Memcpy node runs in 5 steps, {len(big)} of >= {layer_past_bytes} bytes: {big[:4]}",
    )
    emit(settle(profile_result))
    del prof

    # 8. TensorRT, where this onnxruntime has it and it loads
    emit(trt_phase(ort, torch, path, device, s, capacity, pasts, warmup, repeats, sync, work, cuda))
    shutil.rmtree(work, ignore_errors=True)


def trt_phase(ort, torch, path, device, s, capacity, pasts, warmup, repeats, sync, work, cuda) -> dict:
    name = "TensorrtExecutionProvider"
    if not cuda:
        return skipped("tensorrt", "--cpu mode: the TensorRT EP runs on an NVIDIA GPU only")
    if name not in ort.get_available_providers():
        return skipped(
            "tensorrt", f"onnxruntime {ort.__version__} has no {name}: {ort.get_available_providers()}"
        )
    options = {
        name: {
            "trt_fp16_enable": "True",
            "trt_engine_cache_enable": "True",
            "trt_engine_cache_path": str(work / "trt"),
        }
    }
    try:
        stepper = DecodeStep(
            ort, torch, path, [name, "CUDAExecutionProvider"], options, device, s, capacity, seed=1
        )
    except Exception as e:  # libnvinfer missing: ONNX Runtime refuses the provider
        return skipped(
            "tensorrt", f"{name} is in this build but did not load: {str(e).splitlines()[0][:300]}"
        )
    if stepper.providers[0] != name:
        return skipped(
            "tensorrt",
            f"{name} is in this build but did not load (libnvinfer.so.10 missing?); "
            f"the session runs {stepper.providers}",
        )
    result = phase_result("tensorrt", "ran")
    rows = []
    for past in pasts:
        binding = stepper.binding(past)
        times = time_calls(lambda b=binding: stepper.run(b), sync, warmup, repeats)
        rows.append({"past": past, "trt_ms": statistics.median(times)})
    result["data"]["rows"] = rows
    add_check(result, "the TensorRT EP ran the step", True, str(rows))
    return settle(result)


# --- the run ----------------------------------------------------------------------------------------------


def child_env(extra_paths: list[str]) -> dict:
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    paths = [p for p in extra_paths if p] + [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p]
    if paths:
        env["PYTHONPATH"] = os.pathsep.join(paths)
    return env


def run_check(args) -> dict:
    mode = "cpu" if args.cpu else "cuda"
    start = time.monotonic()
    deadline = start + args.budget_s
    scratch = Path(args.scratch or tempfile.mkdtemp(prefix="gpu-check-"))
    site = scratch / "vle-site"
    env = child_env([])
    config = {
        "mode": mode,
        "providers": CPU_PROVIDERS if args.cpu else CUDA_PROVIDERS,
        "artifacts": {"tiny_random": args.tiny_random, "shapes_tiny": args.shapes_tiny},
        "max_new_tokens": args.max_new_tokens,
        "requests": args.requests,
        "warmup": args.warmup,
        "repeats": args.repeats,
        "precision": args.precision,
        "copy_bytes": (1 << 30) if not args.cpu else (128 << 20),
        "scratch": str(scratch),
    }
    results: dict[str, dict] = {}

    def box(name: str) -> float:
        return min(BOXES[name], deadline - time.monotonic())

    def timed(names: list[str], fn) -> None:
        if set(names) <= set(args.skip):
            for n in names:
                results[n] = skipped(n, "--skip")
            return
        left = box(names[0])
        if left < 5:
            for n in names:
                results[n] = skipped(n, f"the run's {args.budget_s:.0f} s budget was spent before this phase")
            return
        t0 = time.monotonic()
        try:
            out = fn(left)
        except subprocess.TimeoutExpired:
            out = [phase_result(n, "timeout", f"did not finish within its {left:.0f} s box") for n in names]
        out = out if isinstance(out, list) else [out]
        for r in out:
            r["seconds"] = round(time.monotonic() - t0, 1)
            results[r["phase"]] = r

    timed(["environment"], lambda left: run_child(["environment"], config, left, env))
    if args.cpu:
        for n in GPU_ONLY:
            results[n] = skipped(n, "--cpu mode: needs an NVIDIA GPU machine (nvcc, the CUDA runtime, a GPU)")
        build = Path(args.build_dir) if args.build_dir else None
        if build is None:
            results["cuda_kernel_tests"] = skipped("cuda_kernel_tests", "--cpu mode without --build-dir")
        else:
            timed(["cuda_kernel_tests"], lambda left: cuda_kernel_tests(build, left, mode, run_ctest=False))
    else:
        if gpu_name() is None:
            raise SystemExit("no NVIDIA GPU (nvidia-smi sees none): run with --cpu for the smoke mode")
        timed(["python_extension"], lambda left: python_extension(site, left, env))
        timed(["cuda_kernel_tests"], lambda left: cuda_kernel_tests(PYTHON_BUILD, left, mode, run_ctest=True))
        if results["python_extension"]["status"] != "passed":
            reason = "the CUDA build of the Python package failed (python_extension)"
            for n in ("pipelines", "decode_step", "memcpy_profile", "tensorrt"):
                results[n] = skipped(n, reason)
        env = child_env([str(site)])
    if "pipelines" not in results:
        timed(["pipelines"], lambda left: run_child(["pipelines"], config, left, env))
        group = ["decode_step", "memcpy_profile", "tensorrt"]
        timed(group, lambda left: run_child(group, config, left, env))
    if not args.cpu:
        timed(["cuda_build"], lambda left: cuda_build(left, env))
    report = {
        "check": "gpu_check",
        "mode": mode,
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "command": " ".join([Path(sys.argv[0]).name, *sys.argv[1:]]),
        "budget_s": args.budget_s,
        "total_s": round(time.monotonic() - start, 1),
        "phases": [results[n] for n in PHASES],
    }
    if not args.scratch:
        shutil.rmtree(scratch, ignore_errors=True)
    return report


# --- the markdown report ----------------------------------------------------------------------------------


def markdown(report: dict) -> str:
    phases = {p["phase"]: p for p in report["phases"]}
    env = phases["environment"]["data"]
    lines = [
        f"# GPU check ({report['mode']} mode), {report['date']}",
        "",
        f"Command: `{report['command']}`; {report['total_s']} s of a {report['budget_s']:.0f} s budget.",
        f"Host: {env.get('host', '?')}; GPU: {env.get('gpu') or 'none'}; nvcc: {env.get('nvcc') or 'none'}; "
        f"torch {env.get('torch')}; onnxruntime {env.get('onnxruntime')} "
        f"({', '.join(env.get('providers', []))}).",
    ]
    if report["mode"] == "cpu":
        lines += [
            "",
            "**Smoke mode (`--cpu`): the CPU execution provider in both columns and small widths for the "
            "decode step. These are CPU numbers; nothing here was measured on a GPU.**",
        ]
    lines += ["", "| phase | status | s | reason or checks |", "|---|---|---|---|"]
    for p in report["phases"]:
        detail = p["reason"] or f"{sum(c['ok'] for c in p['checks'])} of {len(p['checks'])} checks hold"
        lines.append(
            f"| {p['phase']} | {p['status']} | {'-' if p['seconds'] is None else p['seconds']} | "
            f"{_cell(detail)} |"
        )
    rows = phases["pipelines"]["data"].get("rows", [])
    if rows:
        lines += ["", f"## Pipelines: {' + '.join(phases['pipelines']['data']['providers'])} against CPU", ""]
        lines += [
            "| artifact | request | text | tokens | groups | objects | max box diff | llm_device | "
            "ms (a / b) |"
        ]
        lines += ["|---|---|---|---|---|---|---|---|---|"]
        for r in rows:
            if "skipped" in r:
                lines.append(
                    f"| {r['artifact']} | {r['request']} | skipped: {_cell(r['skipped'])} | | | | | | |"
                )
                continue
            yn = {True: "same", False: "DIFFERENT"}
            box = "-" if r["max_box_diff"] is None else f"{r['max_box_diff']:.2e}"
            lines.append(
                f"| {r['artifact']} | {r['request']} | {yn[r['text']]} | {yn[r['tokens']]} | "
                f"{yn[r['groups']]} | "
                f"{yn[r['objects']]} | {box} | {r['llm_device']} | {r['ms']['a']} / {r['ms']['b']} |"
            )
    step = phases["decode_step"]["data"]
    if step.get("rows"):
        lines += [
            "",
            f"## Decode step: {step['layers']} layers, hidden {step['widths']['hidden_size']}, "
            f"{step['precision']}, on {step['device']} ({', '.join(step['providers_loaded'])})",
            "",
            f"Weights {step['weight_bytes'] / 1e9:.3f} GB; copy rate {step['copy_bandwidth_GBps']} GB/s "
            "(read + written); floor = (weights + past KV bytes) / copy rate. "
            f"Median of {report.get('repeats', '')} calls.",
            "",
            "| past | floor ms | ORT ms (min-max) | torch eager ms | ORT / floor | eager / floor | "
            "max logit diff |",
            "|---|---|---|---|---|---|---|",
        ]
        for r in step["rows"]:
            lines.append(
                f"| {r['past']} | {r['floor_ms']:.3f} | {r['ort_ms']:.3f} "
                f"({r['ort_min_ms']:.3f}-{r['ort_max_ms']:.3f}) | {r['eager_ms']:.3f} | "
                f"{r['ort_over_floor']:.2f} | {r['eager_over_floor']:.2f} | {r['max_logit_diff']:.2e} |"
            )
        if step.get("bar"):
            lines += ["", step["bar"] + "."]
        else:
            lines += ["", BEFORE_THIS_WORK]
    trt = phases["tensorrt"]["data"].get("rows")
    if trt:
        lines += [
            "",
            "TensorRT EP (fp16): " + ", ".join(f"past {r['past']}: {r['trt_ms']:.3f} ms" for r in trt),
        ]
    tests = phases["cuda_kernel_tests"]["data"].get("tests", [])
    if tests:
        counts = phases["cuda_kernel_tests"]["data"]["counts"]
        lines += ["", f"## CUDA tests: {counts['passed']} passed, {counts['failed']} failed, "
                  f"{counts['skipped']} skipped", ""]  # fmt: skip
        lines += [
            f"- {t['outcome']}: `{t['name']}` {_cell(t['message'][:200])}"
            for t in tests
            if t["outcome"] != "passed"
        ]
    mem = phases["memcpy_profile"]["data"]
    if "memcpy_nodes" in mem:
        lines += ["", f"## Memcpy nodes in the profile (5 steps at past {mem['past']})", ""]
        lines += [f"- {n['op']} `{n['node']}`: {n['bytes']} bytes" for n in mem["memcpy_nodes"]] or ["- none"]
    return "\n".join(lines) + "\n"


def _cell(text: str) -> str:
    return str(text).replace("|", "\\|").replace("\n", " ")[:400]


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] == "_child":
        return child_main(*argv[1:4])
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", type=Path, required=True, help="folder for gpu_check.json and gpu_check.md")
    ap.add_argument(
        "--cpu", action="store_true", help="smoke mode: CPU EP in both columns, GPU phases skipped"
    )
    ap.add_argument(
        "--tiny-random", default=None, help="a tiny-random artifact folder (exported on any host)"
    )
    ap.add_argument(
        "--shapes-tiny", default=None, help="a shapes-tiny artifact folder (exported on any host)"
    )
    ap.add_argument(
        "--build-dir", default=None, help="--cpu: a CPU build whose vle_tests to read the CUDA tests of"
    )
    ap.add_argument("--budget-s", type=float, default=470.0, help="the whole run's time budget (default 470)")
    ap.add_argument("--max-new-tokens", type=int, default=16)
    ap.add_argument(
        "--skip", nargs="+", default=[], choices=PHASES, metavar="PHASE", help="phases not to run this time"
    )
    ap.add_argument(
        "--requests", nargs="+", default=None, help="only these of vle_run_parity's tasks (default: all)"
    )
    ap.add_argument(
        "--precision",
        choices=("fp16", "fp32"),
        default="fp16",
        help="the decode step's graph (issue 17: fp16)",
    )
    ap.add_argument("--warmup", type=int, default=10)
    ap.add_argument("--repeats", type=int, default=50)
    ap.add_argument("--scratch", default=None, help="keep builds and graphs here (default: a temp folder)")
    args = ap.parse_args(argv)
    report = run_check(args)
    report["repeats"] = args.repeats
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "gpu_check.json").write_text(json.dumps(report, indent=1, default=str))
    (args.out / "gpu_check.md").write_text(markdown(report))
    for p in report["phases"]:
        print(f"{p['phase']:>18}: {p['status']:<8} {p['reason'][:150]}")
    print(f"wrote {args.out / 'gpu_check.json'} and {args.out / 'gpu_check.md'} ({report['total_s']} s)")
    return 1 if any(p["status"] in ("failed", "error", "timeout") for p in report["phases"]) else 0


if __name__ == "__main__":
    raise SystemExit(main())
