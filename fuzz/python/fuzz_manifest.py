"""Fuzzes the manifest loader: `visionllm_edge.manifest.load_manifest` on arbitrary `manifest.json` bytes, and
`validate_manifest_dict` on whatever of them parses as a JSON object.

The manifest sits in a folder of placeholder files (`fuzzlib.make_placeholder_artifact`) named as an
export names them, with content of a few bytes, so that the seeds (the tiny-random and shapes-tiny
manifests with their sha256 and sizes rewritten to those files) pass and every check, hashes included,
is reached at each execution. The folder also holds a link out of it, a link to /dev/zero, a FIFO and a
folder with a graph's name, and a file beside it, for manifests that name them or climb out with `..` or
an absolute path. `ManifestError` (a ValueError) is the documented refusal; a manifest that loads must
name only files inside the folder.
"""

from __future__ import annotations

import json
from pathlib import Path

import fuzzlib
from visionllm_edge.manifest import ManifestError, load_manifest, validate_manifest_dict

FOLDER = fuzzlib.make_placeholder_artifact(fuzzlib.scratch_dir("vle-fuzz-manifest-") / "artifact")
MANIFEST = FOLDER / "manifest.json"


def _inside(manifest) -> None:
    """Every resolved path of a loaded manifest lies inside the folder."""
    root = FOLDER.resolve()
    paths = [g.path for g in manifest.graphs.values()]
    paths += [p for g in manifest.graphs.values() for p in g.external_data]
    paths += [manifest.embeddings.path, manifest.tokenizer.path, manifest.tokenizer.sentencepiece.path]
    paths += [f.path for f in manifest.extra_files.values()]
    for p in paths:
        assert Path(p).resolve().is_relative_to(root), f"{p} is outside {root}"
        assert Path(p).is_file(), f"{p} is not a regular file"


def TestOneInput(data: bytes) -> None:
    MANIFEST.write_bytes(data)
    try:
        _inside(load_manifest(FOLDER))
    except ManifestError:
        pass
    try:
        document = json.loads(data)
    except (ValueError, RecursionError):  # not JSON (UnicodeDecodeError is a ValueError), or nested too deep
        return
    if isinstance(document, dict):
        try:
            _inside(validate_manifest_dict(document, FOLDER))
        except ManifestError:
            pass


if __name__ == "__main__":
    fuzzlib.main(TestOneInput)
