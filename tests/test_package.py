"""The package itself: the torch-free import, the C++ core against the Python reference, compare()."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest
from visionllm_edge import _core, contract
from visionllm_edge.contract import compare


def test_import_does_not_pull_torch():
    code = (
        "import sys, visionllm_edge, visionllm_edge.runtime, visionllm_edge.cli; "
        "print('torch' in sys.modules)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


def test_export_subpackage_maps_to_the_export_folder():
    import visionllm_edge.export as export

    assert export.__file__.replace("\\", "/").endswith("export/__init__.py")


@pytest.mark.parametrize("max_tiles", [1, 4, 6])
def test_core_anyres_grid_matches_python(max_tiles):
    from visionllm_edge.export.preprocess import choose_grid

    candidates = contract.anyres_candidates(max_tiles)
    rng = np.random.default_rng(0)
    sizes = [(56, 140), (336, 336), (672, 336), (336, 672), (100, 150), (150, 100), (1, 4000), (4000, 1)]
    sizes += [tuple(int(v) for v in rng.integers(1, 3000, size=2)) for _ in range(300)]
    # Exact ties between two grids: aspect 1.5 lies halfway between 1:1 and 2:1.
    sizes += [(3 * k, 2 * k) for k in (1, 10, 100, 200, 400)]
    for w, h in sizes:
        assert _core.choose_anyres_grid(w, h, 336, candidates) == choose_grid(w, h, 336, max_tiles), (w, h)


def test_core_anyres_grid_rejects_bad_input():
    with pytest.raises(ValueError, match="image size must be positive, got 0x5"):
        _core.choose_anyres_grid(0, 5, 336, [(1, 1)])
    with pytest.raises(ValueError, match="candidates is empty"):
        _core.choose_anyres_grid(5, 5, 336, [])


def test_anyres_candidates_follow_the_official_order():
    assert contract.anyres_candidates(4) == [(1, 1), (1, 2), (2, 1), (3, 1), (1, 3), (4, 1), (1, 4), (2, 2)]


def test_compare_checks_shape_nonfinite_pattern_and_tolerance():
    a = np.array([1.0, -np.inf, 2.0], dtype=np.float32)
    assert compare(a, a.copy()) is None
    assert "shape" in compare(a[:2], a).reason
    assert "non-finite pattern" in compare(np.array([1.0, 0.0, 2.0]), a).reason
    assert "sign" in compare(np.array([1.0, np.inf, 2.0]), a).reason
    m = compare(a + np.array([0, 0, 1e-3]), a)
    assert m is not None and m.max_abs == pytest.approx(1e-3, rel=1e-3)
    assert compare(a + np.array([0, 0, 1e-5]), a) is None
    assert "integer" in compare(np.array([1, 2]), np.array([1, 3])).reason


def test_cli_parser_knows_the_commands():
    from visionllm_edge.cli import build_parser

    args = build_parser().parse_args(
        ["reference", "tiny-random", "--image", "x.png", "--prompt", "hi", "--region", "1,2,3,4"]
    )
    assert args.region == [(1.0, 2.0, 3.0, 4.0)]
    with pytest.raises(SystemExit):
        build_parser().parse_args(
            ["reference", "tiny-random", "--image", "x", "--prompt", "p", "--region", "1,2,3"]
        )


def test_demo_runs_every_kind_and_writes_pictures(tmp_path, capsys):
    from visionllm_edge.demo import DEMO_REQUESTS, run_reference_demo

    run_reference_demo(tmp_path)
    out = capsys.readouterr().out
    assert out.count("== ") == len(DEMO_REQUESTS)
    written = sorted(p.name for p in tmp_path.iterdir())
    assert {"scene.png", "detection.png", "segmentation.png", "pose.png", "generation_0.png"} <= set(written)
