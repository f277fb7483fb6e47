#!/usr/bin/env bash
# The sanitizer run (issue 19 item 2): the C++ core built with AddressSanitizer and UndefinedBehaviorSanitizer
# (CMake preset asan, GCC), then
#   --cpp     the C++ tests (ctest --preset asan), leak detection on;
#   --python  the Python tests that exercise csrc/ (the list in PYTHON_TESTS below), on the module _core built with
#             the same flags and vle-run from the asan build, with the ASan runtime preloaded into the interpreter;
#             leak detection off (CPython keeps its interned objects and arenas to the end by design).
# No argument runs both. ASan and LSan write their reports to files under build/asan-reports (log_path), so that a
# report from any process counts, a child process's too (vle-run started by a test, a test's own subprocess),
# whatever a test makes of that process's exit status. GCC 12's UBSan does not follow log_path when ASan is loaded
# too: its reports ("FILE:LINE:COL: runtime error: ...") go to stderr and end the process
# (-fno-sanitize-recover), and are searched for in ctest's log and in pytest's output, which -rA makes carry the
# captured output of every test, passed or not. The run fails if a phase fails or any report was found; the
# reports are printed. Prints the time of each phase.
#
# Works from a fresh checkout: scripts/bootstrap.sh runs first when .venv or the ONNX Runtime headers are missing.
# Nothing in .venv is changed: the sanitized _core is staged with the package's sources under build/asan-python
# and imported by a venv of its own there (build/asan-python/venv) that borrows .venv's site-packages, minus the
# editable install's import hook; the test process prints which _core it imported and the run stops if it is
# not the staged one.
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD

run_cpp=0
run_python=0
case "${1:-}" in
  "") run_cpp=1; run_python=1 ;;
  --cpp) run_cpp=1 ;;
  --python) run_python=1 ;;
  *) echo "usage: scripts/sanitize.sh [--cpp | --python]" >&2; exit 2 ;;
esac

BUILD=${VLE_ASAN_BUILD:-build/asan}   # the preset's binaryDir unless given
STAGE=build/asan-python         # the staged package, the venv, the test artifact
REPORTS=$ROOT/$BUILD-reports   # one folder per build, so that two runs never clear each other's
PYTHON_TESTS=(tests/test_runtime.py tests/test_core_diffusion.py tests/test_core_engine.py tests/test_core_image.py
              tests/test_core_results.py tests/test_core_runtime.py tests/test_hostile.py
              tests/test_pipeline_timings.py tests/test_vle_run.py tests/test_node.py)

started=$SECONDS
phase_started=$SECONDS
phase() {
  echo "sanitize: $1 took $((SECONDS - phase_started)) s"
  phase_started=$SECONDS
}

# Every report goes to a file of its own (log_path appends the process id); halt and abort on the first one
# so that a test sees the failure where it happened.
common_asan="abort_on_error=1:halt_on_error=1:strict_string_checks=1:detect_stack_use_after_return=1"
common_asan+=":check_initialization_order=1:log_path=$REPORTS/asan"
# The host allocator takes a block's size from the artifact and turns a null from calloc into the named
# 'cannot allocate' error (memory/tensor.cpp, tested in test_kv_arena.cpp and test_hostile.py); ASan's default
# is to end the process on an allocation it cannot serve instead of returning null as calloc must.
common_asan+=":allocator_may_return_null=1"
export UBSAN_OPTIONS="print_stacktrace=1:halt_on_error=1"
export LSAN_OPTIONS="suppressions=$ROOT/scripts/sanitizers/lsan.supp:print_suppressions=0"

check_reports() {  # $1: the phase, $2: the log its UBSan reports would be in
  shopt -s nullglob
  local reports=("$REPORTS"/asan.*)
  shopt -u nullglob
  local ubsan
  ubsan=$(grep -c ": runtime error: " "$2" || true)
  if [ ${#reports[@]} -gt 0 ] || [ "$ubsan" -gt 0 ]; then
    echo "sanitize: $1: ${#reports[@]} ASan/LSan report file(s), $ubsan UBSan report(s):" >&2
    for r in "${reports[@]}"; do echo "--- $r" >&2; cat "$r" >&2; done
    grep -A12 ": runtime error: " "$2" >&2 || true
    return 1
  fi
  echo "sanitize: $1: 0 sanitizer reports"
}

if [ ! -x .venv/bin/python ] || [ ! -f third_party/onnxruntime/include/onnxruntime_cxx_api.h ]; then
  bash scripts/bootstrap.sh
  phase "bootstrap"
fi

# --- the build (the library, the C++ tests, vle-run; with --python also the module) --------------------------
python_flags=()
if [ $run_python = 1 ]; then
  python_flags=(-DVLE_BUILD_PYTHON=ON -DPython_EXECUTABLE="$ROOT/.venv/bin/python"
                -Dpybind11_DIR="$(.venv/bin/python -m pybind11 --cmakedir)")
fi
cmake --preset asan -B "$BUILD" "${python_flags[@]}" >/dev/null
cmake --build "$BUILD" -j2
phase "build"

status=0
rm -rf "$REPORTS"
mkdir -p "$REPORTS"

# --- the C++ tests ---------------------------------------------------------------------------------------------
if [ $run_cpp = 1 ]; then
  ASAN_OPTIONS="detect_leaks=1:$common_asan" ctest --test-dir "$BUILD" --output-on-failure -j2 || status=1
  check_reports "C++ tests" "$BUILD/Testing/Temporary/LastTest.log" || status=1
  phase "C++ tests (ctest, ASan + UBSan, leaks checked)"
fi

# --- the Python tests of the runtime ---------------------------------------------------------------------------
if [ $run_python = 1 ]; then
  rm -rf "$STAGE/site"
  mkdir -p "$STAGE/site/visionllm_edge"
  # The wheel's layout (pyproject.toml's wheel.packages): the SDK's files, export/ and runtime/ as subpackages.
  for f in python/visionllm_edge/*; do
    [ "$(basename "$f")" = __pycache__ ] || ln -s "$ROOT/$f" "$STAGE/site/visionllm_edge/"
  done
  ln -s "$ROOT/export" "$STAGE/site/visionllm_edge/export"
  ln -s "$ROOT/runtime" "$STAGE/site/visionllm_edge/runtime"
  core=$(ls "$BUILD"/_core.*.so)
  cp "$core" "$STAGE/site/visionllm_edge/"
  if [ ! -x "$STAGE/venv/bin/python" ]; then
    "$(.venv/bin/python -c 'import sys; print(sys._base_executable)')" -m venv --without-pip "$STAGE/venv"
  fi
  site=$("$STAGE/venv/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')
  dot_site=$(.venv/bin/python -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')
  # Lines of a .pth are added to sys.path in order, and the .pth files in the folders they name are not read:
  # the staged package first, then .venv's packages without its editable install's import hook.
  printf '%s\n%s\n' "$ROOT/$STAGE/site" "$dot_site" > "$site/asan_stage.pth"

  # The tests' artifact: $VLE_TINY_ARTIFACT when set (as for pytest), else tiny-random exported by the
  # uninstrumented .venv (torch is not what is under test), reused while the Python sources that write it are
  # unchanged.
  artifact=${VLE_TINY_ARTIFACT:-$ROOT/$STAGE/tiny-random}
  stamp=$(cat export/*.py python/visionllm_edge/*.py | sha256sum | cut -c1-16)
  if [ -z "${VLE_TINY_ARTIFACT:-}" ] && [ "$(cat "$STAGE/tiny-random.stamp" 2>/dev/null)" != "$stamp" ]; then
    rm -rf "$STAGE/tiny-random"
    .venv/bin/visionllm-edge export tiny-random "$STAGE/tiny-random" >/dev/null
    echo "$stamp" > "$STAGE/tiny-random.stamp"
    phase "test artifact (tiny-random, exported without sanitizers)"
  fi

  preload="$(gcc -print-file-name=libasan.so):$(gcc -print-file-name=libubsan.so)"
  # CPython and the uninstrumented extensions (numpy, torch, onnxruntime) are not built for ASan: no leak
  # detection (the interpreter frees little at exit by design) and no ODR check across libraries we do not build.
  py_asan="detect_leaks=0:detect_odr_violation=0:$common_asan"
  imported=$(LD_PRELOAD=$preload ASAN_OPTIONS=$py_asan "$STAGE/venv/bin/python" -c \
             'import visionllm_edge._core as c; print(c.__file__)')
  echo "sanitize: the tests import $imported"
  case "$imported" in
    "$ROOT/$STAGE/site/visionllm_edge/_core."*) ;;
    *) echo "sanitize: the test interpreter imports another _core than the sanitized one" >&2; exit 1 ;;
  esac
  # The test process passes 2.5 GB under ASan (shadow memory, the quarantine of freed blocks): on the machines
  # we share it takes their memory lock, /tmp/vle-mem.lock, shared, where there is one.
  mem_lock=()
  [ -e /tmp/vle-mem.lock ] && mem_lock=(flock -s /tmp/vle-mem.lock)
  LD_PRELOAD=$preload ASAN_OPTIONS=$py_asan VLE_RUN="$ROOT/$BUILD/vle-run" VLE_TINY_ARTIFACT="$artifact" \
    "${mem_lock[@]}" "$STAGE/venv/bin/python" -m pytest -q -rA -p no:cacheprovider "${PYTHON_TESTS[@]}" > "$STAGE/pytest.log" 2>&1 \
    || status=1
  # The summary, not the captured output of the passed tests that -rA adds (it stays in the log).
  grep -E "^(FAILED|ERROR|SKIPPED|XFAIL|XPASS) |^(=+ )?[0-9]+ (passed|failed|error)" "$STAGE/pytest.log" || true
  check_reports "Python runtime tests" "$STAGE/pytest.log" || status=1
  phase "Python runtime tests (ASan + UBSan preloaded)"
fi

echo "sanitize: $([ $status = 0 ] && echo clean || echo FAILED) in $((SECONDS - started)) s"
exit $status
