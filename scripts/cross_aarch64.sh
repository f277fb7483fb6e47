#!/usr/bin/env bash
# The aarch64 cross build (issue 17, CI's aarch64 step): builds the C++ core, its tests and the examples for 64-bit
# Arm Linux with Debian's g++-aarch64-linux-gnu (preset aarch64-cross, cmake/toolchains/aarch64-linux-gnu.cmake)
# and runs every C++ test under qemu-aarch64, the engine tests on a real aarch64 libonnxruntime. Installs what is
# missing first, so a fresh Debian 12 machine needs nothing else (we are root there; sudo otherwise); a second run
# installs nothing. Prints the time of each phase.
#
# Where the target's files come from:
#   - Debian multiarch (:arm64) packages co-installed with the host's: libssl-dev, libgtest-dev, and the runtime
#     the tests run on under qemu, libc6 and libstdc++6 (the toolchain file says why not the cross toolchain's);
#   - sentencepiece: libsentencepiece0 and libsentencepiece-dev carry no Multi-Arch field, so their :arm64
#     packages cannot be installed beside the host's; they are downloaded and unpacked under build/aarch64-deps
#     (on the preset's CMAKE_PREFIX_PATH) instead;
#   - header-only libraries (nlohmann-json, stb) and sentencepiece's headers: the host's, the same files;
#   - libonnxruntime: the manylinux aarch64 wheel of the onnxruntime version in .venv, from PyPI, its library
#     unpacked into build/aarch64-ort (the preset's VLE_ONNXRUNTIME_LIBRARY, opened at run time).
# Last, where CI's earlier steps left an artifact and the host's vle-run, whole requests through the aarch64 vle-run
# under qemu must give the host's answers.
set -euo pipefail
cd "$(dirname "$0")/.."

SUDO=$([ "$(id -u)" = 0 ] && echo "" || echo sudo)
DEPS=build/aarch64-deps
ORT_DIR=build/aarch64-ort
started=$SECONDS
phase_started=$SECONDS
phase() {
  echo "cross_aarch64: $1 took $((SECONDS - phase_started)) s"
  phase_started=$SECONDS
}

# --- 1. packages: the cross compiler, qemu, the target's libraries -------------------------------------------------
if ! dpkg --print-foreign-architectures | grep -qx arm64; then
  $SUDO dpkg --add-architecture arm64
fi
PACKAGES=(cmake pkg-config unzip g++-aarch64-linux-gnu qemu-user libc6:arm64 libstdc++6:arm64 libssl-dev:arm64
          libgtest-dev:arm64 nlohmann-json3-dev libstb-dev libsentencepiece-dev)
missing=()
for p in "${PACKAGES[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
apt_updated=0
if [ ${#missing[@]} -gt 0 ] || [ ! -f "$DEPS/usr/lib/pkgconfig/sentencepiece.pc" ]; then
  # The arm64 package lists are new after --add-architecture; one update serves the install and the download.
  $SUDO apt-get update -q >/dev/null
  apt_updated=1
fi
if [ ${#missing[@]} -gt 0 ]; then
  echo "cross_aarch64: installing ${missing[*]}"
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -q --no-install-recommends \
    -o DPkg::Lock::Timeout=300 "${missing[@]}" >/dev/null
fi
phase "packages (apt-get update: $apt_updated, installed: ${#missing[@]})"

# --- 2. sentencepiece for arm64, unpacked (see the header) ---------------------------------------------------------
if [ ! -f "$DEPS/usr/lib/pkgconfig/sentencepiece.pc" ]; then
  t=$(mktemp -d)
  trap 'rm -rf "$t"' EXIT
  # Downloaded as root into a private folder, so apt's _apt sandbox user could not write there.
  (cd "$t" && apt-get -o APT::Sandbox::User=root -q download libsentencepiece0:arm64 libsentencepiece-dev:arm64 >/dev/null)
  rm -rf "$DEPS.partial" && mkdir -p "$DEPS.partial"
  for deb in "$t"/*.deb; do dpkg-deb -x "$deb" "$DEPS.partial"; done
  # The .pc file says prefix=/usr; the library is here instead. It moves to lib/pkgconfig, the folder FindPkgConfig
  # looks in under each CMAKE_PREFIX_PATH entry when cross-compiling (the multiarch one only in native builds).
  sed -i "s|^prefix=.*|prefix=$PWD/$DEPS/usr|" "$DEPS.partial/usr/lib/aarch64-linux-gnu/pkgconfig/sentencepiece.pc"
  mv "$DEPS.partial/usr/lib/aarch64-linux-gnu/pkgconfig" "$DEPS.partial/usr/lib/pkgconfig"
  rm -rf "$DEPS" && mv "$DEPS.partial" "$DEPS"
  rm -rf "$t" && trap - EXIT
fi

# --- 3. libonnxruntime for aarch64: the .venv's version ------------------------------------------------------------
if [ ! -x .venv/bin/python ]; then
  echo "cross_aarch64: no .venv (run scripts/bootstrap.sh first): its onnxruntime version is the one to fetch" >&2
  exit 1
fi
ort_version=$(.venv/bin/python -c 'from importlib.metadata import version; print(version("onnxruntime"))')
if [ ! -f "$ORT_DIR/libonnxruntime.so.$ort_version" ]; then
  t=$(mktemp -d)
  trap 'rm -rf "$t"' EXIT
  .venv/bin/python -m pip download -q "onnxruntime==$ort_version" --no-deps --only-binary=:all: \
    --platform manylinux_2_28_aarch64 --platform manylinux_2_27_aarch64 -d "$t"
  wheel=$(ls "$t"/onnxruntime-*.whl)
  rm -rf "$ORT_DIR" && mkdir -p "$ORT_DIR"
  unzip -q -j "$wheel" "onnxruntime/capi/libonnxruntime.so.$ort_version" -d "$ORT_DIR"
  ln -s "libonnxruntime.so.$ort_version" "$ORT_DIR/libonnxruntime.so.1"
  rm -rf "$t" && trap - EXIT
fi
phase "target libraries (sentencepiece unpacked, onnxruntime $ort_version for aarch64)"

# --- 4. configure, build, test under qemu --------------------------------------------------------------------------
bash scripts/fetch_onnxruntime_headers.sh
cmake --preset aarch64-cross >/dev/null
phase "configure"
cmake --build --preset aarch64-cross
phase "build"
ctest --preset aarch64-cross
phase "ctest under qemu-aarch64"

# --- 5. whole requests: aarch64 vle-run under qemu against the host's --------------------------------------------
# Same artifact, image and options on both (greedy, sampled with a seed, a region): the printed answer (its text,
# the stop reason, and detections where the model emits any) must be byte for byte the same.
# CI exports build/ci-artifact and builds build/cpu/vle-run in its earlier steps; elsewhere this is skipped.
artifact=${VLE_CROSS_ARTIFACT:-build/ci-artifact}
if [ -f "$artifact/manifest.json" ] && [ -x build/cpu/vle-run ]; then
  t=$(mktemp -d)
  trap 'rm -rf "$t"' EXIT
  .venv/bin/python -c '
import sys
from PIL import Image, ImageDraw
im = Image.new("RGB", (96, 80), (30, 30, 30))
ImageDraw.Draw(im).ellipse((10, 10, 50, 50), fill=(200, 40, 40))
im.save(sys.argv[1])' "$t/scene.png"
  requests=("--prompt|What is in the image?"
            "--prompt|Please detect the circle."
            "--prompt|Describe the image.|--sample|--seed|7"
            "--prompt|What is in <region>?|--region|8,8,52,52")
  n=0
  for r in "${requests[@]}"; do
    IFS='|' read -r -a opts <<<"$r"
    common=("$artifact" --image "$t/scene.png" --max-new-tokens 24 "${opts[@]}")
    build/cpu/vle-run "${common[@]}" >"$t/host.txt"
    qemu-aarch64 -L build/aarch64/qemu-aarch64-prefix build/aarch64/vle-run "${common[@]}" >"$t/aarch64.txt"
    if ! cmp -s "$t/host.txt" "$t/aarch64.txt"; then
      echo "cross_aarch64: vle-run ${opts[*]}: the aarch64 answer differs from the host's" >&2
      diff "$t/host.txt" "$t/aarch64.txt" >&2 || true
      exit 1
    fi
    n=$((n + 1))
  done
  rm -rf "$t" && trap - EXIT
  phase "vle-run under qemu-aarch64: $n requests on $artifact, the same answers as the host's"
else
  echo "cross_aarch64: no vle-run comparison: needs $artifact/manifest.json (visionllm-edge export) and build/cpu/vle-run"
fi
echo "cross_aarch64: done in $((SECONDS - started)) s"
