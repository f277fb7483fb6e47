#!/usr/bin/env bash
# Sets up .venv with the package (editable, C++ core built) and everything the demo and tests need.
# torch is installed first, pinned, so that no dependency range pulls a multi-GB CUDA build.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi
.venv/bin/python -m pip install -q --upgrade pip
.venv/bin/python -m pip install -q torch==2.13.0
.venv/bin/python -m pip install -q -e ".[export,dev]"
