"""`visionllm-edge export` end to end on tiny-random: every graph, validation, manifest, atomicity."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import onnx
import pytest
from visionllm_edge import contract
from visionllm_edge.export.exporter import export
from visionllm_edge.manifest import load_manifest


@pytest.fixture(scope="module")
def model(tiny_model):
    return tiny_model


@pytest.fixture(scope="module")
def artifact(tiny_artifact):
    return tiny_artifact, None


def test_every_graph_is_written_checked_and_validated(artifact):
    out, report = artifact
    manifest = load_manifest(out)
    assert set(manifest.graphs) == set(contract.GRAPHS)
    validation = json.loads((out / contract.VALIDATION_FILE).read_text())
    assert validation["passed"] is True
    assert set(validation["graphs"]) == set(contract.GRAPHS)
    for name, result in validation["graphs"].items():
        assert result["passed"], name
        assert len(result["shapes"]) >= 3, f"{name} validated at {result['shapes']}"
        for output, err in result["outputs"].items():
            assert err["max_abs"] <= 1e-3, f"{name}.{output}: {err}"
    for entry in manifest.graphs.values():
        onnx.checker.check_model(str(entry.path), full_check=True)


def test_manifest_carries_the_facts_the_runtime_needs(artifact, model):
    out, _ = artifact
    m = load_manifest(out)
    assert m.model.num_layers == model.config.llm.num_hidden_layers
    assert m.routing["det"].queries == model.config.num_embs
    assert m.routing["gen"].queries == model.config.num_embs_gen
    assert m.tokens["[DET]"] == 512
    assert [list(g) for g in m.data["preprocess"]["clip"]["candidate_grids"]] == [
        list(g) for g in contract.anyres_candidates(model.config.max_tiles)
    ]
    assert "gen_uncond" in m.data["extra_files"]


def test_embeddings_file_holds_the_tables(artifact, model):
    from safetensors.numpy import load_file

    out, _ = artifact
    tables = load_file(str(out / contract.EMBEDDINGS_FILE))
    np.testing.assert_array_equal(tables["token_embeddings"], model.llm.model.embed_tokens.weight.numpy())
    np.testing.assert_array_equal(tables["queries.gen"], model.emb_embeddings_gen.weight.numpy())


def test_existing_folder_and_unknown_component_are_errors(artifact, model, tmp_path):
    out, _ = artifact
    with pytest.raises(FileExistsError, match="already exists"):
        export("tiny-random", out, model=model, progress=False)
    with pytest.raises(ValueError, match="unknown component 'bert'"):
        export("tiny-random", tmp_path / "x", model=model, components=["bert"], progress=False)
    assert not (tmp_path / "x").exists()


def test_component_subset(model, tmp_path):
    out = tmp_path / "subset"
    export("tiny-random", out, model=model, components=["vision", "llm"], progress=False)
    m = load_manifest(out)
    assert set(m.graphs) == {"vision", "llm"}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["subset"]  # no partial folder left behind


def test_killing_an_export_midway_leaves_no_artifact(tmp_path):
    out = tmp_path / "killed"
    code = (
        "import sys; from visionllm_edge.export.exporter import export; "
        f"export('tiny-random', {str(out)!r}, progress=True)"
    )
    proc = subprocess.Popen(
        [sys.executable, "-c", code], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    # Wait until it is exporting (a partial folder exists), then kill it without warning.
    deadline = time.time() + 120
    while time.time() < deadline and not any(
        p.name.startswith(".killed.partial-") for p in tmp_path.iterdir()
    ):
        time.sleep(0.05)
    time.sleep(0.5)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert not out.exists()
    for leftover in tmp_path.iterdir():
        assert leftover.name.startswith("."), leftover
        assert not (leftover / contract.MANIFEST_FILE).exists(), "a partial folder must never hold a manifest"


def test_quick_validation_checks_each_graph_at_its_first_shape(tmp_path):
    report = export(
        "tiny-random", tmp_path / "a", components=["vision", "region"], validate="quick", progress=False
    )
    graphs = report.validation["graphs"]
    assert set(graphs) == {"vision", "region"}
    assert all(len(g["shapes"]) == 1 and g["passed"] for g in graphs.values())
    with pytest.raises(ValueError, match="validate must be True, False or 'quick'"):
        export("tiny-random", tmp_path / "b", components=["vision"], validate="fast")
