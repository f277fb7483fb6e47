"""Shared fixtures. Heavy ones (torch, an exported artifact) are built once per test session, lazily."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest


def scene(seed: int, width: int, height: int) -> np.ndarray:
    """A deterministic, non-degenerate test image: gradients plus seeded noise, H x W x 3 uint8."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:height, 0:width]
    img = np.stack([(xx * 255 // max(width - 1, 1)), (yy * 255 // max(height - 1, 1)), (xx + yy) % 256], -1)
    img = img.astype(np.float64) * 0.6 + rng.uniform(0, 255, (height, width, 3)) * 0.4
    return img.astype(np.uint8)


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


@pytest.fixture(scope="session")
def shapes_artifact(tmp_path_factory) -> Path:
    """The bundled model exported with full validation (or `$VLE_SHAPES_ARTIFACT`, an existing export); one
    export per session, shared by the shapes-tiny metrics and the serving tests."""
    given = os.environ.get("VLE_SHAPES_ARTIFACT")
    if given:
        return Path(given)
    from visionllm_edge.export.exporter import export

    out = tmp_path_factory.mktemp("shapes") / "artifact"
    report = export("shapes-tiny", out, progress=False)
    assert report.validation["passed"]
    return out
