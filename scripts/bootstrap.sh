#!/usr/bin/env bash
# Sets up everything the demo, the tests and the C++ build need on a fresh Debian machine:
#   1. the system packages of the C++ core (installed when missing; we are root on our machines);
#   2. ONNX Runtime's C/C++ headers (third_party/onnxruntime, scripts/fetch_onnxruntime_headers.sh);
#   3. .venv with the package (editable, C++ core built) and its Python dependencies, the serving ones too
#      (nvidia-pytriton, 55 MB, and tritonclient). torch is installed first, pinned, so that no dependency
#      range pulls a multi-GB CUDA build.
set -euo pipefail
cd "$(dirname "$0")/.."

SYSTEM_PACKAGES=(cmake g++ pkg-config libgtest-dev nlohmann-json3-dev libsentencepiece-dev libssl-dev libstb-dev)
missing=()
for p in "${SYSTEM_PACKAGES[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if [ ${#missing[@]} -gt 0 ]; then
  SUDO=$([ "$(id -u)" = 0 ] && echo "" || echo sudo)
  $SUDO apt-get update -q >/dev/null
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -q --no-install-recommends "${missing[@]}" >/dev/null
fi
bash scripts/fetch_onnxruntime_headers.sh

PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi
.venv/bin/python -m pip install -q --upgrade pip
.venv/bin/python -m pip install -q torch==2.13.0
.venv/bin/python -m pip install -q -e ".[export,dev,serve]"
# The serve extra's server: nvidia-pytriton without its numpy<2 pin (pyproject.toml, docs/serving.md).
.venv/bin/python -m pip install -q --no-deps nvidia-pytriton==0.7.0
