"""What the Python harnesses share: the artifact they run on, and text, numbers and arrays drawn from the
fuzzer's bytes.

Each harness (`fuzz_<name>.py` beside this file) is run by scripts/fuzz.sh as
`python fuzz/python/fuzz_<name>.py fuzz/corpus/py_<name> -max_total_time=S -rss_limit_mb=2048`. A harness
catches exactly the errors its entry point is documented to raise (ValueError, TypeError and their
subclasses such as `ManifestError`); anything else, a crash, a hang or memory past the limit is a finding.
Each harness calls `atheris.instrument_all()` after its imports, not `atheris.instrument_imports()` around
them: the package is installed editable, its modules load through scikit-build-core's loader, and atheris's
import hook does not see through that one (it runs, and libFuzzer reports no coverage at all: "corp: 1/1b"
after any number of executions). `instrument_all` instruments every Python function loaded, ours among them
(about 20 s at start on the 2-core machine).
"""

from __future__ import annotations

import atexit
import os
import resource
import shutil
import sys
import tempfile
from pathlib import Path

import atheris
import numpy as np
from visionllm_edge import contract

#: The address space a harness may take (the pipeline's, every graph loaded, is 2.5 GB). libFuzzer checks
#: -rss_limit_mb once a second, after the fact: one allocation sized from the input could take the shared
#: machine's memory before then. Past this limit it fails instead, as a MemoryError: a finding like any
#: exception that is not a named refusal.
ADDRESS_SPACE_LIMIT = 6 << 30


def limit_memory() -> None:
    """Caps this process's address space at `ADDRESS_SPACE_LIMIT` (a harness's `main` calls it; a test that
    runs the harness's inputs in its own process does not)."""
    hard = resource.getrlimit(resource.RLIMIT_AS)[1]
    soft = ADDRESS_SPACE_LIMIT if hard == resource.RLIM_INFINITY else min(ADDRESS_SPACE_LIMIT, hard)
    resource.setrlimit(resource.RLIMIT_AS, (soft, hard))


#: The environment variable naming the exported tiny-random artifact the pipeline, tokenizer and node
#: harnesses load (the one the tests' `tiny_artifact` fixture also takes).
ARTIFACT_ENV = "VLE_TINY_ARTIFACT"

#: Every string the tokenizer or the loop treats specially: the added tokens, <s> </s> <unk>, and the
#: pieces the template and the label rule split on.
SPECIAL_PIECES: tuple[str, ...] = (
    *contract.REQUIRED_TOKENS,
    *contract.LABEL_DELIMITERS,
    contract.SYSTEM_PROMPT,
    "USER:",
    "ASSISTANT:",
    contract.SEP2,
    "\n",
    "\r\n",
    "\t",
    " ",
    "\u2581",  # SentencePiece's word boundary
    "<0x0A>",  # a byte piece's spelling
    "<",
    ">",
    "[",
    "]",
)

#: Characters that have broken text handling elsewhere: NUL and other controls, Unicode whitespace that
#: `str.isspace` knows and C's isspace does not, a BOM, combining marks, a lone surrogate of each half,
#: the replacement character, and characters outside the BMP.
ODD_CHARS: tuple[str, ...] = (
    "\x00", "\x01", "\x1b", "\x7f", "\x85", "\xa0", "\u1680", "\u2028", "\u2029", "\u3000", "\ufeff",
    "\u0301", "\ud800", "\udfff", "\ufffd", "\U0001f600", "\U0010ffff",
)  # fmt: skip


def artifact_dir() -> Path:
    """The tiny-random artifact folder from `VLE_TINY_ARTIFACT`; the process ends with a message when the
    variable is not set, since a harness without its artifact would fuzz nothing."""
    value = os.environ.get(ARTIFACT_ENV)
    if not value:
        sys.exit(
            f"{ARTIFACT_ENV} is not set: export tiny-random (visionllm-edge export tiny-random DIR) and "
            f"set it to that folder"
        )
    path = Path(value)
    if not (path / contract.MANIFEST_FILE).is_file():
        sys.exit(f"{ARTIFACT_ENV}={value}: no {contract.MANIFEST_FILE} in that folder")
    return path


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    return True


def scratch_dir(prefix: str) -> Path:
    """A new folder `<tmp>/<prefix><pid>`, removed when the process ends. libFuzzer ends a run with exit(),
    which skips Python's atexit, so the folders of processes no longer alive are removed here first."""
    root = Path(tempfile.gettempdir())
    for old in root.glob(f"{prefix}*"):
        pid = old.name.removeprefix(prefix)
        if pid.isdigit() and not _alive(int(pid)):
            shutil.rmtree(old, ignore_errors=True)
    path = root / f"{prefix}{os.getpid()}"
    shutil.rmtree(path, ignore_errors=True)
    path.mkdir()
    atexit.register(shutil.rmtree, path, ignore_errors=True)
    return path


def text(fdp: atheris.FuzzedDataProvider, max_parts: int = 12) -> str:
    """A string of up to `max_parts` parts, each a special piece, an odd character or free text (which may
    hold lone surrogates, as `ConsumeUnicode` makes them)."""
    parts = []
    for _ in range(fdp.ConsumeIntInRange(0, max_parts)):
        choice = fdp.ConsumeIntInRange(0, 3)
        if choice == 0:
            parts.append(fdp.PickValueInList(list(SPECIAL_PIECES)))
        elif choice == 1:
            parts.append(fdp.PickValueInList(list(ODD_CHARS)))
        elif choice == 2:
            parts.append(fdp.ConsumeUnicode(fdp.ConsumeIntInRange(0, 16)))
        else:
            parts.append(fdp.ConsumeUnicodeNoSurrogates(fdp.ConsumeIntInRange(0, 16)))
    return "".join(parts)


def chance(fdp: atheris.FuzzedDataProvider, p: float) -> bool:
    """True with probability `p`; False once the bytes are spent (so a short input asks for little)."""
    return fdp.ConsumeProbability() > 1.0 - p


def number(fdp: atheris.FuzzedDataProvider) -> float | int:
    """A number a caller could pass for a coordinate or an option: small or huge ints, any float (NaN and
    the infinities included), or a value at a boundary."""
    choice = fdp.ConsumeIntInRange(0, 3)
    if choice == 0:
        return fdp.ConsumeIntInRange(-4, 80)
    if choice == 1:
        return fdp.ConsumeInt(8)
    if choice == 2:
        return fdp.ConsumeFloat()
    return fdp.PickValueInList(
        [0, -1, 1, 0.5, 1e-30, -0.0, 2**31, 2**63, float("nan"), float("inf"), -float("inf")]
    )


#: dtypes an array from a caller may have.
DTYPES: tuple[str, ...] = (
    "uint8", "uint16", "int8", "int16", "int32", "int64", "uint32", "uint64", "float16", "float32", "float64",
    "bool", "complex64", ">u2", ">f4",
)  # fmt: skip


def array(fdp: atheris.FuzzedDataProvider, max_ndim: int = 4, max_side: int = 24) -> np.ndarray:
    """An array of any dtype in `DTYPES` and up to `max_ndim` axes of up to `max_side` each, filled from the
    bytes (so floats may be NaN or inf); sometimes a non-contiguous view of a bigger one."""
    dtype = np.dtype(fdp.PickValueInList(list(DTYPES)))
    shape = tuple(fdp.ConsumeIntInRange(0, max_side) for _ in range(fdp.ConsumeIntInRange(0, max_ndim)))
    count = int(np.prod(shape, dtype=np.int64))
    raw = fdp.ConsumeBytes(count * dtype.itemsize)
    raw += bytes(count * dtype.itemsize - len(raw))
    if dtype == np.bool_:  # a bool byte other than 0 or 1 is no value numpy can make
        out = (np.frombuffer(raw, dtype=np.uint8) != 0).reshape(shape)
    else:
        out = np.frombuffer(raw, dtype=dtype).reshape(shape)
    if out.ndim and fdp.ConsumeBool():
        out = out[::-1]  # a negative stride
    return out


# --- the manifest harness's folder ------------------------------------------------------------------------

#: The hostile entries of the placeholder folder, by name: a link to a file outside it, a link to a device
#: that never ends, a FIFO (opening it for hashing would block), a folder where a file is expected.
OUTSIDE_LINK, DEVICE_LINK, FIFO, FOLDER = "outside.onnx", "zero.onnx", "fifo.onnx", "folder.onnx"


def placeholder_files() -> dict[str, bytes]:
    """Every file a manifest of ours names, with a few bytes of content each (the parser checks presence,
    size, confinement and sha256, never the content), plus one in a sub-folder."""
    names = [g.file for g in contract.GRAPHS.values()]
    names += [contract.EMBEDDINGS_FILE, contract.TOKENIZER_FILE, contract.SENTENCEPIECE_FILE]
    names += [contract.UNCOND_FILE.format(kind=k) for k in contract.GENERATION_KINDS]
    names += ["llm.onnx.data", "sub/llm.onnx"]
    return {n: f"placeholder {n}\n".encode() for n in names}


def make_placeholder_artifact(folder: Path) -> Path:
    """Writes `placeholder_files()` and the hostile entries into `folder` (made fresh); the outside link
    points at a file beside the folder."""
    folder.mkdir(parents=True)
    for name, content in placeholder_files().items():
        (folder / name).parent.mkdir(parents=True, exist_ok=True)
        (folder / name).write_bytes(content)
    outside = folder.parent / "outside-the-artifact.onnx"
    outside.write_bytes(placeholder_files()["llm.onnx"])
    (folder / OUTSIDE_LINK).symlink_to(outside)
    (folder / DEVICE_LINK).symlink_to("/dev/zero")
    os.mkfifo(folder / FIFO)
    (folder / FOLDER).mkdir()
    return folder


def main(test_one_input) -> None:
    """A harness's entry point: the memory cap, every module instrumented (`instrument_imports` gives no
    coverage through the editable install's loader), then libFuzzer's loop on the command line's flags."""
    limit_memory()
    atheris.instrument_all()
    atheris.Setup(sys.argv, test_one_input)
    atheris.Fuzz()
