#!/usr/bin/env bash
# Puts ONNX Runtime's C/C++ headers in third_party/onnxruntime/include (the pip wheel ships the library but no
# headers). They come from Debian trixie's libonnxruntime-dev, downloaded without touching this machine's apt
# sources; the C API is versioned, so these headers work with the wheel's newer library.
set -euo pipefail
cd "$(dirname "$0")/.."
dest=third_party/onnxruntime
if [ -f "$dest/include/onnxruntime_cxx_api.h" ]; then
  exit 0
fi
t=$(mktemp -d)
trap 'rm -rf "$t"' EXIT
mkdir -p "$t/lists/partial" "$t/deb"
sed -n '1,/^$/p' /etc/apt/sources.list.d/debian.sources | sed 's/^Suites:.*/Suites: trixie/' >"$t/trixie.sources"
o=(-o Dir::Etc::SourceList=/dev/null -o Dir::Etc::SourceParts="$t" -o Dir::State::Lists="$t/lists")
apt-get "${o[@]}" -q update >/dev/null
(cd "$t/deb" && apt-get "${o[@]}" -q download libonnxruntime-dev >/dev/null)
dpkg -x "$t"/deb/libonnxruntime-dev_*.deb "$t/x"
header=$(find "$t/x" -name onnxruntime_cxx_api.h | head -n 1)
if [ -z "$header" ]; then
  echo "fetch_onnxruntime_headers: libonnxruntime-dev has no onnxruntime_cxx_api.h" >&2
  exit 1
fi
rm -rf "$dest.partial" && mkdir -p "$dest.partial/include"
cp "$(dirname "$header")"/*.h "$dest.partial/include/"
rm -rf "$dest" && mv "$dest.partial" "$dest"
echo "ONNX Runtime headers in $dest/include"
