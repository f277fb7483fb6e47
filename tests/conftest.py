"""Shared fixtures. Heavy ones (torch, an exported artifact) are built once per test session, lazily."""

from __future__ import annotations

import os
from pathlib import Path

import pytest


@pytest.fixture(scope="session")
def tiny_model():
    """The tiny-random reference model (torch)."""
    from visionllm_edge.export import load_reference

    return load_reference("tiny-random")


@pytest.fixture(scope="session")
def tiny_artifact(tiny_model, tmp_path_factory) -> Path:
    """tiny-random exported with every component and validated (or an artifact given by VLE_TINY_ARTIFACT)."""
    given = os.environ.get("VLE_TINY_ARTIFACT")
    if given:
        return Path(given)
    from visionllm_edge.export.exporter import export

    out = tmp_path_factory.mktemp("artifact") / "tiny-random"
    export("tiny-random", out, model=tiny_model, progress=False)
    return out
