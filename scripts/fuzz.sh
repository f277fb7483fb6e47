#!/usr/bin/env bash
# Runs every fuzzing harness for SECONDS in all, divided evenly among them (docs/limits.md, "Fuzzing"):
#   the C++ ones, fuzz/cpp/fuzz_<name>.cpp: libFuzzer binaries built here with clang, ASan and UBSan
#     (VLE_BUILD_FUZZERS), seeded from fuzz/corpus/<name>/, with fuzz/dict/<name>.dict when there is one;
#   the Python ones, fuzz/python/fuzz_<name>.py: atheris in .venv, seeded from fuzz/corpus/py_<name>/.
# It installs what it lacks (clang-16 and libclang-rt-16-dev through apt-get, atheris into .venv), builds the
# C++ harnesses, runs them, and prints per harness the executions, libFuzzer's final coverage (cov: edges,
# ft: features) and any crash file. Exit status 1 when any harness found a crash (a sanitizer report, an
# exception that is not a named refusal, a hang past -timeout, memory past -rss_limit_mb / -malloc_limit_mb).
#
#   bash scripts/fuzz.sh 60                    # CI: a minute in all
#   FUZZ_JOBS=2 bash scripts/fuzz.sh 3900      # two harnesses at a time (wall time SECONDS / 2)
#   bash scripts/fuzz.sh -j 2 600 router tokenizer   # only these harnesses (C++ or py_<name>)
#
# New corpus entries and crash files go to a scratch folder (FUZZ_SCRATCH, default a new /tmp/vle-fuzz-*),
# never into the committed corpus: merge useful ones by hand (`fuzz_<name> -merge=1 fuzz/corpus/<name> DIR`).
# FUZZ_BUILD_DIR (default build/fuzz) is the C++ build folder; FUZZ_FLAGS adds libFuzzer flags to every run.
# The Python harnesses load the tiny-random artifact named by VLE_TINY_ARTIFACT; unset, it is exported once
# into build/fuzz-artifact and reused.
set -euo pipefail
cd "$(dirname "$0")/.."

jobs=${FUZZ_JOBS:-1}
if [[ ${1:-} == -j ]]; then
  jobs=${2:?"-j needs a number"}
  shift 2
fi
if [[ $# -lt 1 || ! $1 =~ ^[0-9]+$ || $1 -lt 1 ]]; then
  echo "usage: scripts/fuzz.sh [-j JOBS] SECONDS [HARNESS...]  (SECONDS: a positive integer, got '${1:-}')" >&2
  exit 2
fi
if [[ ! $jobs =~ ^[1-9][0-9]*$ ]]; then
  echo "scripts/fuzz.sh: FUZZ_JOBS / -j must be a positive integer, got '$jobs'" >&2
  exit 2
fi
total=$1
shift
only=("$@")
build=${FUZZ_BUILD_DIR:-build/fuzz}
scratch=${FUZZ_SCRATCH:-$(mktemp -d /tmp/vle-fuzz-XXXXXX)}
mkdir -p "$scratch/corpus" "$scratch/crashes" "$scratch/logs"
python=.venv/bin/python
# Every run: no input may take more than 25 s (a hang), use more than 2 GB, or ask malloc for more than 2 GB
# at once (a size read from the input that nothing capped).
flags=(-rss_limit_mb=2048 -malloc_limit_mb=2048 -timeout=25 -print_final_stats=1 ${FUZZ_FLAGS:-})

# --- what to run ---------------------------------------------------------------------------------------------
wanted() {
  [[ ${#only[@]} -eq 0 ]] && return 0
  local n
  for n in "${only[@]}"; do [[ $n == "$1" ]] && return 0; done
  return 1
}
cpp=() py=()
for source in fuzz/cpp/fuzz_*.cpp; do
  name=$(basename "$source" .cpp)
  name=${name#fuzz_}
  wanted "$name" && cpp+=("$name")
done
for source in fuzz/python/fuzz_*.py; do
  [[ -e $source ]] || continue
  name=$(basename "$source" .py)
  name=py_${name#fuzz_}
  wanted "$name" && py+=("$name")
done
count=$((${#cpp[@]} + ${#py[@]}))
if [[ $count -eq 0 ]]; then
  echo "scripts/fuzz.sh: no harness matches: ${only[*]}" >&2
  exit 2
fi
each=$((total / count))
[[ $each -ge 1 ]] || each=1

# --- tools ---------------------------------------------------------------------------------------------------
as_root() { if [[ $(id -u) -eq 0 ]]; then "$@"; else sudo "$@"; fi; }
if [[ ${#cpp[@]} -gt 0 ]]; then
  if ! command -v clang++-16 >/dev/null || ! compgen -G "/usr/lib/llvm-16/lib/clang/16/lib/linux/libclang_rt.fuzzer-*.a" >/dev/null; then
    echo "== installing clang-16 and libclang-rt-16-dev"
    as_root apt-get update -qq
    as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq clang-16 libclang-rt-16-dev >/dev/null
  fi
fi
if [[ ${#py[@]} -gt 0 ]] && ! "$python" -c "import atheris" 2>/dev/null; then
  echo "== installing atheris into .venv"
  "$python" -m pip install -q atheris
fi

if [[ ${#py[@]} -gt 0 && -z ${VLE_TINY_ARTIFACT:-} ]]; then
  export VLE_TINY_ARTIFACT=build/fuzz-artifact
  if [[ ! -f $VLE_TINY_ARTIFACT/manifest.json ]]; then
    echo "== exporting tiny-random into $VLE_TINY_ARTIFACT for the Python harnesses"
    rm -rf "$VLE_TINY_ARTIFACT"
    .venv/bin/visionllm-edge export tiny-random "$VLE_TINY_ARTIFACT" >"$scratch/logs/export.log" 2>&1 ||
      { tail -20 "$scratch/logs/export.log"; exit 1; }
  fi
fi

# --- the C++ harnesses ---------------------------------------------------------------------------------------
if [[ ${#cpp[@]} -gt 0 ]]; then
  echo "== building the C++ harnesses in $build"
  start=$(date +%s)
  cmake -S . -B "$build" -DCMAKE_BUILD_TYPE=Release -DCMAKE_CXX_COMPILER=clang++-16 -DVLE_BUILD_FUZZERS=ON \
    -DVLE_BUILD_TESTS=OFF -DVLE_BUILD_EXAMPLES=OFF -DVLE_BUILD_PYTHON=OFF >"$scratch/logs/cmake.log"
  cmake --build "$build" -j2 --target "${cpp[@]/#/fuzz_}" >>"$scratch/logs/cmake.log" ||
    { tail -40 "$scratch/logs/cmake.log"; exit 1; }
  echo "   built in $(($(date +%s) - start)) s"
fi

# --- running ---------------------------------------------------------------------------------------------------
# One harness: its log, and a status line "name status executions cov ft seconds crash-file".
run_one() {
  local name=$1 command=() corpus dict log
  if [[ $name == py_* ]]; then
    command=("$python" "fuzz/python/fuzz_${name#py_}.py")
  else
    command=("$build/fuzz_$name")
  fi
  corpus=fuzz/corpus/$name
  dict=fuzz/dict/$name.dict
  log=$scratch/logs/$name.log
  mkdir -p "$scratch/corpus/$name"
  local extra=()
  [[ -f $dict ]] && extra+=("-dict=$dict")
  local seeds=()
  [[ -d $corpus ]] && seeds+=("$corpus")
  local start status=ok
  start=$(date +%s)
  # The scratch folder first: libFuzzer writes new entries into the first corpus folder only.
  "${command[@]}" "${flags[@]}" "${extra[@]}" -max_total_time="$each" -artifact_prefix="$scratch/crashes/$name-" \
    "$scratch/corpus/$name" "${seeds[@]}" >"$log" 2>&1 || status=failed
  local seconds=$(($(date +%s) - start))
  local execs cov ft crash
  # A harness that stopped before fuzzing has no stats: the greps find nothing, which is not an error here.
  execs=$(grep -o 'stat::number_of_executed_units: [0-9]*' "$log" | tail -1 | awk '{print $2}' || true)
  cov=$(grep -o 'cov: [0-9]*' "$log" | tail -1 | awk '{print $2}' || true)
  ft=$(grep -o 'ft: [0-9]*' "$log" | tail -1 | awk '{print $2}' || true)
  crash=$(compgen -G "$scratch/crashes/$name-*" | head -1 || true)
  [[ -n $crash ]] && status=crash
  echo "$name $status ${execs:--} ${cov:--} ${ft:--} $seconds ${crash:--}" >"$scratch/logs/$name.status"
  echo "   $name: $status (${execs:-?} executions, cov ${cov:-?}, ft ${ft:-?}, ${seconds} s)"
}

echo "== fuzzing $count harnesses, $each s each, $jobs at a time (scratch: $scratch)"
for name in "${cpp[@]}" "${py[@]}"; do
  while [[ $(jobs -rp | wc -l) -ge $jobs ]]; do wait -n || true; done
  run_one "$name" &
done
wait

echo
printf '%-20s %-7s %12s %7s %7s %6s  %s\n' harness status executions cov ft secs crash
found=0
for name in "${cpp[@]}" "${py[@]}"; do
  status_file=$scratch/logs/$name.status
  [[ -f $status_file ]] || echo "$name failed - - - - -" >"$status_file"
  read -r n status execs cov ft seconds crash <"$status_file"
  printf '%-20s %-7s %12s %7s %7s %6s  %s\n' "$n" "$status" "$execs" "$cov" "$ft" "$seconds" "$crash"
  if [[ $status != ok ]]; then
    found=1
    echo "---- $scratch/logs/$name.log (last 30 lines)"
    tail -30 "$scratch/logs/$name.log"
  fi
done
if [[ $found -ne 0 ]]; then
  echo "scripts/fuzz.sh: a harness failed or found a crash (reproduce: the harness binary or script with the crash file)" >&2
  exit 1
fi
