"""vle-run (csrc/examples/vle_run.cpp: the C++ example on the public C++ API, no Python) against
`visionllm-edge run --json` on the tiny-random artifact: one request of every task run both ways in
subprocesses gives the same text, token ids, groups and printed summary, boxes and keypoints within 1e-3,
equal mask areas and semantic-map pixel counts, generated images within 1e-3 of full scale for the same seed;
and `ldd vle-run` names no libpython. The requests and the comparison are those of
benchmarks/vle_run_parity.py, which runs the same check on any artifact (e.g. shapes-tiny).

`vle-run --bench`: the record's fields, each summary equal to numpy's over the record's own repetitions, the
loop's link / denoise / diffusion-step figures, and the bad options' messages.

The binary is `build/cpu/vle-run` (the `cpu` CMake preset) or `$VLE_RUN`; without it these tests skip.
"""

from __future__ import annotations

import copy
import hashlib
import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

_SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "vle_run_parity.py"
_spec = importlib.util.spec_from_file_location("vle_run_parity", _SCRIPT)
parity = importlib.util.module_from_spec(_spec)
sys.modules[_spec.name] = parity  # its dataclasses look their module up there
_spec.loader.exec_module(parity)

#: Short answers keep the 18 subprocesses quick; the forced prefixes route every decoder anyway.
MAX_NEW_TOKENS = 8
TIMEOUT_S = 300


@pytest.fixture(scope="session")  # session scope: set up (or skipped) before the tiny_artifact export
def vle_run() -> Path:
    path = parity.find_vle_run()
    if not path.is_file():
        pytest.skip(
            f"vle-run is not built at {path}: build it with `{parity.BUILD_COMMAND}` (or set $VLE_RUN)"
        )
    return path


@pytest.fixture(scope="module")
def scene_png(tmp_path_factory) -> Path:
    return parity.write_scene(tmp_path_factory.mktemp("vle-run") / "scene.png")


#: What each request must have produced on both sides, so that its comparison is not vacuous.
def _check_task_output(task: str, run) -> None:
    r = run.result
    kinds = [lk["kind"] for lk in r["links"]]
    assert r["token_ids"], "no answer tokens"
    if task == "detection":
        assert kinds.count("det") >= 3
    elif task == "grounding":
        assert any(d["kind"] == "grd" and "mask_area" in d for d in r["detections"])
    elif task == "segmentation":
        assert kinds.count("seg") >= 2 and r["segmentation"]["labels"][:2] == ["circle", "square"]
    elif task == "pose":
        assert "det" in kinds and kinds.count("pose") >= 7
    elif task in ("generation", "editing"):
        assert r["images"] and len(run.images) == len(r["images"])
        assert run.images[0].std() > 0, "a flat generated image"


@pytest.mark.parametrize("req", parity.REQUESTS, ids=parity.TASKS)
def test_vle_run_matches_python_cli(vle_run, tiny_artifact, scene_png, tmp_path, req):
    opts = dict(max_new_tokens=MAX_NEW_TOKENS, seed=3, timeout=TIMEOUT_S)
    py = parity.run_python(tiny_artifact, req, scene_png, tmp_path, **opts)
    cpp = parity.run_cpp(vle_run, tiny_artifact, req, scene_png, tmp_path, **opts)
    assert parity.compare(py, cpp) == []
    _check_task_output(req.task, py)
    _check_task_output(req.task, cpp)
    if req.task in ("generation", "sampled_caption"):  # the seed reaches the noise or the sampler
        other = parity.run_cpp(
            vle_run, tiny_artifact, req, scene_png, tmp_path / "seed4", **dict(opts, seed=4)
        )
        if req.task == "generation":
            assert not np.array_equal(other.images[0], cpp.images[0])
        else:
            assert other.result["token_ids"] != cpp.result["token_ids"]


def test_vle_run_links_no_libpython(vle_run):
    found, listed = parity.libpython_in_ldd(vle_run)
    assert listed > 0, "ldd listed nothing"
    assert found == []


def test_comparison_sees_each_kind_of_difference():
    """The checker itself: every compared field, changed past its tolerance, is reported; within it, not."""
    result = {
        "text": "a[DET]",
        "token_ids": [1, 2],
        "stop_reason": "eos",
        "links": [{"kind": "det", "label": "a", "position": 5}],
        "detections": [
            {
                "label": "a",
                "kind": "det",
                "score": 0.5,
                "box_xyxy": [1.0, 2.0, 3.0, 4.0],
                "query_index": 3,
                "mask_area": 7,
            }
        ],
        "segmentation": {"labels": ["sky"], "pixels_per_label": {"sky": 10}},
        "poses": [
            {
                "label": "person",
                "score": 0.5,
                "box_xyxy": [1.0, 2.0, 3.0, 4.0],
                "keypoints": [[1.0, 2.0, 0.5]],
                "keypoint_names": ["head"],
            }
        ],
        "images": [[2, 2, 3]],
        "timings_ms": {},
    }
    image = np.full((2, 2, 3), 100, np.uint8)
    base = parity.Run("a[DET]\nstop: eos, 2 tokens\nwrote x.json\n", result, [image])
    other = copy.deepcopy(base)
    other.stdout = "a[DET]\nstop: eos, 2 tokens\nwrote y.json\n"
    other.result["detections"][0]["box_xyxy"][0] += 0.9e-3
    other.result["poses"][0]["keypoints"][0][0] += 1e-3
    assert parity.compare(base, other) == []  # within the tolerances; the output file names may differ

    def changed(edit) -> list[str]:
        run = copy.deepcopy(base)
        edit(run)
        return parity.compare(base, run)

    assert changed(lambda r: r.result.update(text="b"))
    assert changed(lambda r: r.result["token_ids"].append(3))
    assert changed(lambda r: r.result["links"][0].update(label="b"))
    assert changed(lambda r: r.result["detections"][0].update(mask_area=8))
    assert changed(lambda r: r.result["detections"][0]["box_xyxy"].__setitem__(2, 3.002))
    assert changed(lambda r: r.result["detections"].pop())
    assert changed(lambda r: r.result["segmentation"]["pixels_per_label"].update(sky=11))
    assert changed(lambda r: r.result["poses"][0]["keypoints"][0].__setitem__(1, 2.0015))
    assert changed(lambda r: r.result["poses"][0]["box_xyxy"].__setitem__(0, float("nan")))
    assert changed(lambda r: r.images[0].__setitem__((0, 0, 0), 101))  # one level is 1/255 > 1e-3
    assert changed(lambda r: setattr(r, "stdout", r.stdout.replace("eos", "length")))


# --- vle-run --bench --------------------------------------------------------------------------------------

SUMMARY_KEYS = ["min", "median", "p90", "max", "n"]


def _numpy_summary(values) -> dict:
    """What `visionllm-edge bench` reports for a quantity: the C++ record must name and compute the same."""
    from visionllm_edge.bench import summary

    return summary(values)


def test_vle_run_bench_record(vle_run, tiny_artifact, scene_png, tmp_path):
    import onnxruntime
    import visionllm_edge
    from visionllm_edge.pipeline import Pipeline

    gen = next(r for r in parity.REQUESTS if r.task == "generation")  # a link, a denoising loop, decoding
    out = tmp_path / "bench.json"
    cmd = [str(vle_run), str(tiny_artifact), "--image", str(scene_png), "--prompt", gen.prompt]
    cmd += ["--answer-prefix", gen.answer_prefix, "--max-new-tokens", "4"]
    cmd += ["--bench", "--repeat", "2", "--bench-json", str(out)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=TIMEOUT_S)
    assert proc.returncode == 0, proc.stderr
    assert "bench: 2 runs after 1 warm-up, each on a fresh frame (ms)" in proc.stdout
    rec = json.loads(out.read_text())

    assert rec["kind"] == "vle-run --bench"
    assert rec["versions"] == {
        "visionllm_edge": visionllm_edge.__version__,
        "onnxruntime": onnxruntime.__version__,
    }
    art = rec["artifact"]
    assert Path(art["path"]) == Path(tiny_artifact).resolve()
    manifest_bytes = (Path(tiny_artifact) / "manifest.json").read_bytes()
    assert art["manifest_sha256"] == hashlib.sha256(manifest_bytes).hexdigest()
    assert {"llm", "gen"} <= set(art["components"])
    assert rec["options"]["repeat"] == 2 and rec["options"]["warmup"] == 1
    assert rec["options"]["prompt"] == gen.prompt

    pipe = Pipeline.load(tiny_artifact)
    reps = rec["repetitions"]
    assert len(reps) == 2
    stages = rec["stages_ms"]
    for stage in ("preprocess", "tokenize", "prefill", "decode", "link", "denoise", "gen_decoder", "total"):
        assert stage in stages, stage
    for stage, s in stages.items():
        assert list(s) == SUMMARY_KEYS, stage
        assert s["min"] <= s["median"] <= s["p90"] <= s["max"], (stage, s)
        assert s == _numpy_summary([r["timings_ms"][stage] for r in reps]), stage
        assert f"  {stage} " in proc.stdout, stage  # a row of the printed table
    assert rec["end_to_end_ms"] == _numpy_summary([r["wall_ms"] for r in reps])
    for r in reps:
        t = r["timings_ms"]
        assert t["denoise"] <= t["gen_decoder"]
        assert r["stats"]["diffusion_steps"] == pipe.manifest.generation.diffusion_steps
    per_token = [r["timings_ms"]["decode"] / r["stats"]["decode_steps"] for r in reps]
    assert rec["decode"]["ms_per_token"] == _numpy_summary(per_token)
    for name, s in rec["stats"].items():
        assert s == _numpy_summary([r["stats"][name] for r in reps]), name

    mem = rec["memory"]
    assert mem["arena_bytes"] == pipe.arena_bytes and mem["context_capacity"] == pipe.context_capacity
    assert mem["peak_rss_bytes"] > 0 and mem["peak_rss_source"] in ("VmHWM", "getrusage")


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--bench", "--repeat", "0"], "argument --repeat: must be at least 1, got 0"),
        (["--bench", "--warmup", "-1"], "argument --warmup: must be 0 or more, got -1"),
        (["--bench", "--repeat", "two"], "argument --repeat: invalid int value: 'two'"),
        (["--repeat", "3"], "argument --repeat: only with --bench"),
        (["--bench-json", "out.json"], "argument --bench-json: only with --bench"),
        (
            ["--bench", "--bench-json", "{missing}/bench.json"],
            "argument --bench-json: the folder {missing} does not exist",
        ),
    ],
)
def test_vle_run_bench_bad_options(vle_run, tmp_path, argv, message):
    missing = tmp_path / "no-such-folder"
    argv = [a.format(missing=missing) for a in argv]
    # Refused before the artifact is read: a folder that does not exist is never looked at.
    cmd = [str(vle_run.resolve()), str(tmp_path / "no-artifact"), "--image", "x.png", "--prompt", "hi", *argv]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=60, cwd=tmp_path)
    assert proc.returncode == 2
    assert proc.stderr.startswith("usage: vle-run ")
    assert proc.stderr.rstrip().endswith("vle-run: error: " + message.format(missing=missing))
    assert not missing.exists() and not (tmp_path / "out.json").exists()
