#!/usr/bin/env bash
# The local half of getting scripts/gpu_check.sh onto the borrowed GPU machine (DEVELOPERS.md): that machine
# reaches no registry and each device call carries at most 64 MiB with the working tree, so what it lacks is
# put into one bundle here and cut into parts that each fit beside the tree:
#
#   onnxruntime-gpu==1.31.1 (the CUDA 13 build, cp312 manylinux_2_28: the machine's Python 3.12), as pip
#     downloads it;
#   the Debian 12 packages of the C++ build (scripts/bootstrap.sh's list, runtime libraries beside), which
#     gpu_check.sh unpacks into a prefix only where the machine lacks them;
#   tiny-random and shapes-tiny exported here (fp32, each graph validated at its first shape), xz-compressed:
#     the machine has torch but neither diffusers nor our transformers pin, so it cannot export them itself.
#
#   bash scripts/gpu_carry.sh [ARTIFACT ...]   # writes .gpucheck/p00 ... pNN, prints the device calls
#
# ARTIFACTs: tiny-random and shapes-tiny by default; naming fewer makes fewer parts (and device calls).
#
# Each part is a folder .gpucheck/pNN holding bundle.partNN (the last one also SHA256SUMS); one device call
# carries one folder and copies it out of the working tree, since every call replaces what it carries.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-.venv/bin/python}
ORT_GPU=onnxruntime-gpu==1.31.1
DEBS=(pkgconf pkgconf-bin libpkgconf3 nlohmann-json3-dev libsentencepiece-dev libsentencepiece0 libssl-dev libssl3
      libgtest-dev libstb-dev)
work=.gpucheck
dl=$work/download
mkdir -p "$dl/debs" "$dl/bundle"

# 1. the wheel
if ! ls "$dl"/bundle/onnxruntime_gpu-*.whl >/dev/null 2>&1; then
  "$PY" -m pip download -q "$ORT_GPU" --python-version 3.12 --platform manylinux_2_28_x86_64 \
    --only-binary=:all: --no-deps -d "$dl/bundle"
fi

# 2. the Debian packages (apt-get download needs no root and changes nothing on this machine)
(cd "$dl/debs" && for p in "${DEBS[@]}"; do ls "${p}"_*.deb >/dev/null 2>&1 || apt-get download -q "$p" >/dev/null; done)
rm -rf "$dl/bundle/debs" && cp -r "$dl/debs" "$dl/bundle/debs"

# 3. the artifacts, exported afresh every time: they must come from the code being checked
artifacts=("$@")
[ ${#artifacts[@]} -gt 0 ] || artifacts=(tiny-random shapes-tiny)
rm -rf "$dl"/bundle/*.tar.xz "$dl/export"
for a in "${artifacts[@]}"; do
  "$PY" -c 'import sys; from visionllm_edge.export.exporter import export
export(sys.argv[1], sys.argv[2], validate="quick", progress=False)' "$a" "$dl/export/$a"
  tar -C "$dl/export" -cf - "$a" | xz -T0 -6 >"$dl/bundle/$a.tar.xz"
done
rm -rf "$dl/export"

# 4. the parts: each beside the working tree within 64 MiB (tracked and untracked-not-ignored files travel
# with every call, and the last call carries third_party/ too; 2 MiB spare for files others add meanwhile)
tree=$(git ls-files -z --cached --others --exclude-standard | xargs -0 stat -c %s 2>/dev/null | awk '{s+=$1} END {print s+0}')
headers=$(du -sb third_party | cut -f1)
part=$(( (64 << 20) - tree - headers - (2 << 20) ))
[ "$part" -gt $((4 << 20)) ] || { echo "gpu_carry.sh: the working tree ($tree bytes) leaves no room to carry" >&2; exit 1; }
rm -rf "$work"/p[0-9][0-9]
tar -C "$dl/bundle" -cf - . | split -b "$part" -d -a 2 - "$work/bundle.part"
n=0
for f in "$work"/bundle.part*; do
  k=${f##*.part}
  mkdir -p "$work/p$k" && mv "$f" "$work/p$k/"
  n=$((n + 1))
done
last=$(printf '%02d' $((n - 1)))
(cd "$work" && sha256sum p*/bundle.part* | sed 's| p[0-9]*/| |') >"$work/p$last/SHA256SUMS"
echo "bundle: $(du -sb "$dl/bundle" | cut -f1) bytes in $n parts of at most $part bytes (tree $tree bytes)"
echo
echo "Device calls, back to back (the machine goes back after 30 s idle), each run(command, carry):"
for ((i = 0; i < n - 1; i++)); do
  k=$(printf '%02d' "$i")
  echo "  carry [\"$work/p$k\"]: mkdir -p /tmp/vle-gpu-bundle && cp $work/p$k/* /tmp/vle-gpu-bundle/ && ls /tmp/vle-gpu-bundle"
done
echo "  carry [\"$work/p$last\", \"third_party\"]: mkdir -p /tmp/vle-gpu-bundle && cp $work/p$last/* /tmp/vle-gpu-bundle/ && bash scripts/gpu_check.sh --bundle /tmp/vle-gpu-bundle"
