"""`visionllm-edge demo` and `visionllm-edge export shapes-tiny`, on a random-weights stand-in for the model.

The bundled folder is pointed at a shapes-tiny checkpoint with seeded random weights written here
(`$VLE_SHAPES_TINY`), and the cache at a temporary folder (`$XDG_CACHE_HOME`). The one expensive step is the
demo's export of shapes-tiny into the cache (about a minute on the 2-core CPU), done once for the module.
"""

from __future__ import annotations

import contextlib
import io
import shutil
from pathlib import Path

import pytest
from visionllm_edge.cli import build_parser, main

#: The pictures every demo run writes (one or more per kind).
PICTURES = {
    "scene",
    "region_caption",
    "detection",
    "grounding",
    "segmentation",
    "pose",
    "generation",
    "editing_input",
    "editing",
    "editing_truth",
}


@pytest.fixture(scope="module")
def shipped(tmp_path_factory) -> Path:
    """shapes-tiny with seeded random weights, shipped as `export/data/shapes_tiny` is."""
    from visionllm_edge.export import build_model, named_config
    from visionllm_edge.export.train.ship import save_shipped

    return save_shipped(
        build_model(named_config("shapes-tiny"), seed=0), tmp_path_factory.mktemp("ship") / "st"
    )


@pytest.fixture(scope="module")
def first_run(shipped, tmp_path_factory):
    """The demo's first run with an empty cache: `(cache folder, pictures folder, stdout)`."""
    cache = tmp_path_factory.mktemp("xdg")
    out = tmp_path_factory.mktemp("demo") / "pictures"
    printed = io.StringIO()
    with pytest.MonkeyPatch.context() as mp, contextlib.redirect_stdout(printed):
        mp.setenv("VLE_SHAPES_TINY", str(shipped))
        mp.setenv("XDG_CACHE_HOME", str(cache))
        assert main(["demo", "--out", str(out)]) == 0
    return cache, out, printed.getvalue()


def _artifacts(cache: Path) -> list[Path]:
    root = cache / "visionllm-edge"
    return sorted(root.iterdir()) if root.is_dir() else []


def test_parser_defaults():
    from visionllm_edge.demo import DEMO_SEED

    args = build_parser().parse_args(["demo"])
    assert (args.seed, args.out, args.artifact, args.reference) == (
        DEMO_SEED,
        "visionllm-edge-demo",
        None,
        False,
    )


@pytest.mark.slow
def test_first_run_exports_into_the_cache_and_shows_every_kind(first_run):
    from visionllm_edge.demo import KINDS

    cache, out, text = first_run
    (artifact,) = _artifacts(cache)
    assert artifact.name.startswith("shapes-tiny-") and (artifact / "manifest.json").is_file()
    assert text.count("first run: exporting") == 1
    for kind, _ in KINDS:
        assert f"== {kind}:" in text
    assert text.count("timings (ms):") == len(KINDS)
    assert "truth:" in text and "question:" in text
    written = {p.stem for p in out.iterdir()}
    assert PICTURES <= written
    for name in PICTURES:
        assert str(out / f"{name}.png") in text  # every picture's path is printed
    from PIL import Image

    sizes = {}
    for name in PICTURES:
        with Image.open(out / f"{name}.png") as im:
            sizes[name] = im.size
    # Scenes are 128 pixels, generation and editing 64, all written 4x larger.
    assert sizes == {
        n: (256, 256) if n.startswith(("generation", "editing")) else (512, 512) for n in PICTURES
    }


@pytest.mark.slow
def test_second_run_reuses_the_cache(first_run, shipped, tmp_path, monkeypatch, capsys):
    import visionllm_edge.export.exporter as exporter

    cache, _, first_text = first_run
    monkeypatch.setenv("VLE_SHAPES_TINY", str(shipped))
    monkeypatch.setenv("XDG_CACHE_HOME", str(cache))

    def no_export(*args, **kwargs):
        raise AssertionError("the cached artifact should have been used")

    monkeypatch.setattr(exporter, "export", no_export)
    out = tmp_path / "again"
    assert main(["demo", "--out", str(out)]) == 0
    text = capsys.readouterr().out
    assert "first run" not in text and len(_artifacts(cache)) == 1
    assert PICTURES <= {p.stem for p in out.iterdir()}
    # Same seed, same scenes, same answers.
    first = [line for line in first_text.splitlines() if line.strip().startswith(("question:", "answer:"))]
    again = [line for line in text.splitlines() if line.strip().startswith(("question:", "answer:"))]
    assert first == again

    # --artifact uses the folder it is given and never looks at the bundled model.
    monkeypatch.setenv("VLE_SHAPES_TINY", str(tmp_path / "absent"))
    (artifact,) = _artifacts(cache)
    assert main(["demo", "--artifact", str(artifact), "--out", str(tmp_path / "given"), "--seed", "3"]) == 0
    assert "scene" in capsys.readouterr().out and (tmp_path / "given" / "editing.png").is_file()


def test_absent_bundled_model_is_a_clear_error(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("VLE_SHAPES_TINY", str(tmp_path / "absent"))
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    assert main(["demo", "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert "bundled shapes-tiny model is not available" in err and "VLE_SHAPES_TINY" in err
    assert str(tmp_path / "absent") in err
    assert not _artifacts(tmp_path / "cache") and not (tmp_path / "out").exists()
    # The export command resolves the name the same way.
    assert main(["export", "shapes-tiny", str(tmp_path / "art")]) == 2
    assert "bundled shapes-tiny model is not available" in capsys.readouterr().err


def test_corrupted_bundled_model_is_a_clear_error(shipped, tmp_path, monkeypatch, capsys):
    broken = tmp_path / "broken"
    shutil.copytree(shipped, broken)
    with open(broken / "model.safetensors", "r+b") as f:
        f.truncate(1000)
    monkeypatch.setenv("VLE_SHAPES_TINY", str(broken))
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    assert main(["demo", "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert str(broken / "model.safetensors") in err and "cannot read" in err
    # The export failed before anything was published: no artifact, no partial folder left in the cache.
    assert not _artifacts(tmp_path / "cache")


def test_name_resolves_to_the_bundled_folder_and_the_key_follows_the_weights(shipped, tmp_path, monkeypatch):
    from visionllm_edge.demo import artifact_key, cache_root
    from visionllm_edge.export.exporter import resolve_source
    from visionllm_edge.export.train.ship import bundled_path

    monkeypatch.setenv("VLE_SHAPES_TINY", str(shipped))
    assert bundled_path() == shipped and resolve_source("shapes-tiny") == shipped
    assert resolve_source("tiny-random") == "tiny-random"
    monkeypatch.delenv("VLE_SHAPES_TINY")
    assert bundled_path().parts[-2:] == ("data", "shapes_tiny")

    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    assert cache_root() == tmp_path / "visionllm-edge"
    monkeypatch.setenv("XDG_CACHE_HOME", "relative/path")  # not absolute: ignored, as the XDG spec says
    assert cache_root() == Path.home() / ".cache" / "visionllm-edge"

    copy = tmp_path / "copy"
    shutil.copytree(shipped, copy)
    assert artifact_key(copy) == artifact_key(shipped)
    data = bytearray((copy / "model.safetensors").read_bytes())
    data[-1] ^= 1
    (copy / "model.safetensors").write_bytes(bytes(data))
    assert artifact_key(copy) != artifact_key(shipped)
    # A new artifact format gets a folder of its own: the runtime refuses an older schema's artifact.
    from visionllm_edge import contract

    before = artifact_key(shipped)
    monkeypatch.setattr(contract, "MANIFEST_SCHEMA_VERSION", contract.MANIFEST_SCHEMA_VERSION + 1)
    assert artifact_key(shipped) != before
