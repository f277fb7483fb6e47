"""Each Python fuzzing harness (fuzz/python/fuzz_<name>.py) over its committed seed corpus
(fuzz/corpus/py_<name>/), once per input, in this process: what libFuzzer would run first, without the
fuzzing. An input that makes a harness raise anything but the refusals it catches, or fail one of its checks,
fails here with the input's name. scripts/fuzz.sh does the fuzzing itself.

The harnesses need atheris (the `dev` extra); without it these tests are skipped, naming it.
"""

from __future__ import annotations

import importlib
import sys
import warnings
from pathlib import Path

import pytest

pytest.importorskip(
    "atheris", reason="atheris is not installed (pip install atheris; it is in the dev extra)"
)

FUZZ = Path(__file__).resolve().parents[1] / "fuzz"
HARNESSES = sorted(p.stem.removeprefix("fuzz_") for p in (FUZZ / "python").glob("fuzz_*.py"))
#: The harnesses that load the tiny-random artifact (fuzzlib.ARTIFACT_ENV).
NEED_ARTIFACT = {"node", "pipeline", "tokenizer"}


@pytest.fixture
def harness(request, monkeypatch):
    """The harness module, imported afresh (a harness sets itself up at import: its artifact, its folder, and
    for images a lower pixel cap, which is put back afterwards so the rest of the suite sees the real one)."""
    from visionllm_edge import images

    name = request.param
    monkeypatch.setattr(images, "MAX_IMAGE_PIXELS", images.MAX_IMAGE_PIXELS)
    if name in NEED_ARTIFACT:
        monkeypatch.setenv("VLE_TINY_ARTIFACT", str(request.getfixturevalue("tiny_artifact")))
    monkeypatch.syspath_prepend(str(FUZZ / "python"))
    for module in ("fuzzlib", f"fuzz_{name}"):
        sys.modules.pop(module, None)
    yield importlib.import_module(f"fuzz_{name}")
    sys.modules.pop(f"fuzz_{name}", None)


def test_every_harness_has_a_seed_corpus():
    assert HARNESSES, f"no harness in {FUZZ / 'python'}"
    for name in HARNESSES:
        seeds = list((FUZZ / "corpus" / f"py_{name}").glob("*"))
        assert seeds, f"fuzz/corpus/py_{name} is empty"


@pytest.mark.parametrize("harness", HARNESSES, indirect=True)
def test_harness_passes_its_seed_corpus(harness):
    name = harness.__name__.removeprefix("fuzz_")
    seeds = sorted((FUZZ / "corpus" / f"py_{name}").glob("*"))
    for seed in seeds:
        try:
            # As under the fuzzer, a warning is not a finding (numpy's "invalid value encountered in cast" for
            # a label map holding NaN, a DecompressionBombWarning): the suite's filter would make it an error.
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                harness.TestOneInput(seed.read_bytes())
        except Exception as e:
            raise AssertionError(f"fuzz/corpus/py_{name}/{seed.name}: {type(e).__name__}: {e}") from e
