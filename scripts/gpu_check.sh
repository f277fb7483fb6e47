#!/usr/bin/env bash
# The GPU check of issue 17 on any Linux machine with an NVIDIA GPU: sets the machine up, then runs
# benchmarks/gpu_check.py (the package built with CUDA and its kernel tests against their CPU twins, the
# pipelines on the CUDA EP against the CPU, a 7B-width decode step against torch eager and the HBM floor, the
# Memcpy profile, TensorRT where it loads, the cuda preset), writing gpu_check.json and gpu_check.md.
#
#   bash scripts/gpu_check.sh [--bundle DIR] [--out DIR] [gpu_check.py options...]
#   bash scripts/gpu_check.sh --cpu [--out DIR] --tiny-random ART [...]     # the smoke mode, no GPU needed
#
# --bundle DIR: the parts scripts/gpu_carry.sh made (bundle.partNN and SHA256SUMS, collected in DIR by the
# earlier device calls; DEVELOPERS.md). They are checked, joined and unpacked: the onnxruntime-gpu wheel is
# installed with pip --no-deps --target into the scratch folder (first on PYTHONPATH), the Debian packages of
# the C++ build that this machine lacks are unpacked into a prefix the build is pointed at (never into /),
# and the exported artifacts are the pipelines phase's. Without --bundle the machine must already have
# onnxruntime with the CUDA EP and the build's packages (scripts/bootstrap.sh's list).
# With --cpu the bundle is checked and unpacked too but its wheel is not installed (a cp312 CUDA build; the
# smoke run uses the machine's onnxruntime). --unpack-all-debs unpacks every carried package, also those the
# machine has: to try the prefix build on a machine that has them all. --out DIR (default: $OUT where set, as
# on the device machine, else SCRATCH/out). --scratch DIR (default /tmp/vle-gpu-check).
set -euo pipefail
cd "$(dirname "$0")/.."

bundle="" out="${OUT:-}" scratch=/tmp/vle-gpu-check cpu=0 all_debs=0 pass=()
while [ $# -gt 0 ]; do
  case "$1" in
    --bundle) bundle=$2; shift 2 ;;
    --out) out=$2; shift 2 ;;
    --scratch) scratch=$2; shift 2 ;;
    --cpu) cpu=1; pass+=(--cpu); shift ;;
    --unpack-all-debs) all_debs=1; shift ;;
    *) pass+=("$1"); shift ;;
  esac
done
if [ "$cpu" = 1 ] && [ -x .venv/bin/python ]; then PY=${PYTHON:-.venv/bin/python}; else PY=${PYTHON:-python3}; fi
out=${out:-$scratch/out}
mkdir -p "$scratch" "$out"
log() { echo "gpu_check.sh: $*" >&2; }

# --- the bundle: check, join, unpack -------------------------------------------------------------------------
if [ -n "$bundle" ]; then
  t0=$SECONDS
  [ -f "$bundle/SHA256SUMS" ] || { log "$bundle/SHA256SUMS missing: the last part's call did not run"; exit 2; }
  missing=$(cd "$bundle" && awk '{print $2}' SHA256SUMS | while read -r f; do [ -f "$f" ] || echo "$f"; done)
  if [ -n "$missing" ]; then
    log "parts missing in $bundle (the machine went back between calls? start again from part 00):" $missing
    exit 2
  fi
  (cd "$bundle" && sha256sum --quiet -c SHA256SUMS) || { log "a part in $bundle does not match SHA256SUMS"; exit 2; }
  rm -rf "$scratch/bundle" && mkdir -p "$scratch/bundle"
  (cd "$bundle" && awk '{print $2}' SHA256SUMS | grep '^bundle\.part' | sort | xargs cat) | tar -x -C "$scratch/bundle"
  log "bundle joined and unpacked in $((SECONDS - t0)) s: $(ls "$scratch/bundle" | tr '\n' ' ')"

  # onnxruntime-gpu: its own folder, first on PYTHONPATH, so `import onnxruntime` and the C++ core's search
  # for libonnxruntime.so.1 (runtime/engine.py) both find it before the machine's CPU build.
  wheel=$(ls "$scratch"/bundle/onnxruntime_gpu-*.whl 2>/dev/null | head -n 1 || true)
  if [ -n "$wheel" ] && [ "$cpu" = 0 ]; then
    rm -rf "$scratch/ort-site"
    "$PY" -m pip install -q --no-index --no-deps --no-compile --target "$scratch/ort-site" "$wheel"
    export PYTHONPATH="$scratch/ort-site${PYTHONPATH:+:$PYTHONPATH}"
    log "$(basename "$wheel") installed into $scratch/ort-site"
  fi

  # Debian packages of the C++ build: only those whose files this machine lacks, unpacked into a prefix.
  if [ -d "$scratch/bundle/debs" ]; then
    prefix="$scratch/deps"
    rm -rf "$prefix" && mkdir -p "$prefix"
    has_header() { [ "$all_debs" = 0 ] && echo "#include <$1>" | ${CXX:-c++} -x c++ -fsyntax-only - 2>/dev/null; }
    need=()
    { [ "$all_debs" = 0 ] && command -v pkg-config >/dev/null; } || need+=(pkgconf-bin libpkgconf3 pkgconf)
    has_header nlohmann/json.hpp || need+=(nlohmann-json3-dev)
    has_header sentencepiece_processor.h || need+=(libsentencepiece-dev libsentencepiece0)
    has_header openssl/sha.h || need+=(libssl-dev)
    { [ "$all_debs" = 0 ] && ls /usr/lib/x86_64-linux-gnu/libcrypto.so.3 /lib/x86_64-linux-gnu/libcrypto.so.3 \
      >/dev/null 2>&1; } || need+=(libssl3)
    has_header gtest/gtest.h || need+=(libgtest-dev)
    has_header stb/stb_image.h || need+=(libstb-dev)
    if [ ${#need[@]} -gt 0 ] && ! command -v dpkg >/dev/null; then
      log "this machine lacks ${need[*]} and has no dpkg to unpack the carried packages with"
      exit 2
    fi
    for p in "${need[@]}"; do
      deb=$(ls "$scratch"/bundle/debs/"${p}"_*.deb 2>/dev/null | head -n 1 || true)
      [ -n "$deb" ] || { log "this machine lacks $p and the bundle has no $p .deb"; exit 2; }
      dpkg -x "$deb" "$prefix"
    done
    if [ ${#need[@]} -gt 0 ]; then
      # The .pc files say prefix=/usr; point them at the prefix. Headers of the multiarch folder (openssl's
      # configuration.h) and stb are found through CPATH, libraries at run time through LD_LIBRARY_PATH.
      # The same settings go to $prefix/env.sh, for building by hand on that machine (`. $prefix/env.sh`).
      find "$prefix" -name '*.pc' -exec sed -i "s|^prefix=/usr|prefix=$prefix/usr|" {} +
      lib="$prefix/usr/lib/x86_64-linux-gnu"
      cat >"$prefix/env.sh" <<EOF
export CMAKE_PREFIX_PATH="$prefix/usr\${CMAKE_PREFIX_PATH:+:\$CMAKE_PREFIX_PATH}"
export PKG_CONFIG_PATH="$lib/pkgconfig:$prefix/usr/share/pkgconfig\${PKG_CONFIG_PATH:+:\$PKG_CONFIG_PATH}"
export CPATH="$prefix/usr/include:$prefix/usr/include/x86_64-linux-gnu\${CPATH:+:\$CPATH}"
export LIBRARY_PATH="$lib\${LIBRARY_PATH:+:\$LIBRARY_PATH}"
export LD_LIBRARY_PATH="$lib\${LD_LIBRARY_PATH:+:\$LD_LIBRARY_PATH}"
export PATH="$prefix/usr/bin:\$PATH"
EOF
      . "$prefix/env.sh"
      # libssl-dev's libcrypto.so points at libssl3's libcrypto.so.3: where only the machine has that, use it.
      if [ -L "$lib/libcrypto.so" ] && [ ! -e "$lib/libcrypto.so" ]; then
        ln -sf "$(ls /usr/lib/x86_64-linux-gnu/libcrypto.so.3 /lib/x86_64-linux-gnu/libcrypto.so.3 2>/dev/null | head -n 1)" \
          "$lib/libcrypto.so"
      fi
    fi
    log "build packages unpacked into $prefix: ${need[*]:-none needed}"
  fi

  # Artifacts exported on a CPU host (gpu_carry.sh): tiny-random and shapes-tiny.
  for a in tiny-random shapes-tiny; do
    if [ -f "$scratch/bundle/$a.tar.xz" ]; then
      rm -rf "${scratch:?}/$a" && tar -xJf "$scratch/bundle/$a.tar.xz" -C "$scratch"
      pass+=("--${a}" "$scratch/$a")
    fi
  done
fi

if [ "$cpu" = 0 ]; then
  # The CUDA EP's libraries (cuBLAS, cuRAND, the CUDA runtime, cuDNN 9) are torch's nvidia-* wheels on the
  # GPU machine. The C++ core opens libonnxruntime itself, with no onnxruntime.preload_dlls() before it, so
  # the loader must find them on its own.
  nv=$("$PY" -c 'import site; print(" ".join(site.getsitepackages()))' 2>/dev/null || true)
  for d in $nv; do
    [ -d "$d/nvidia" ] || continue
    libs=$(find "$d/nvidia" -name 'lib*.so*' -printf '%h\n' | sort -u | tr '\n' ':')
    export LD_LIBRARY_PATH="${libs}${LD_LIBRARY_PATH:-}"
  done
fi
exec "$PY" benchmarks/gpu_check.py --out "$out" --scratch "$scratch" "${pass[@]}"
