"""`visionllm-edge bench` on the tiny artifact: options, the JSON record's fields, the floors' pieces (GEMM
graphs built as bytes, the FLOP counter on real ONNX Runtime profiles), the plot, named errors."""

from __future__ import annotations

import io
import json
import sys
from types import SimpleNamespace

import numpy as np
import pytest
from visionllm_edge import _core, bench, cli
from visionllm_edge.runtime.engine import make_engine


def _ordered(s):
    return s["min"] <= s["median"] <= s["p90"] <= s["max"]


def test_bench_cli_json_md_plot_and_reference(tiny_artifact, tmp_path, capsys):
    pytest.importorskip("torch", reason="--compare reference needs torch (the [export] extra)")
    out, md, png = tmp_path / "b.json", tmp_path / "b.md", tmp_path / "b.png"
    rc = cli.main(
        [
            "bench", str(tiny_artifact), "--tasks", "vqa,detect,generate", "--past", "128",
            "--warmup", "0", "--repeat", "2", "--threads", "2", "--providers", "CPUExecutionProvider",
            "--new-tokens", "4", "--compare", "reference", "--json", str(out), "--md", str(md),
            "--plot", str(png),
        ]
    )  # fmt: skip
    assert rc == 0
    assert "[bench]" in capsys.readouterr().err  # progress lines (stderr is not a terminal here)
    rec = json.loads(out.read_text())
    assert rec["options"]["tasks"] == ["vqa", "detect", "generate"]
    assert rec["machine"]["onnxruntime"] and rec["machine"]["threads"] == 2
    assert len(rec["artifact"]["manifest_sha256"]) == 64
    assert rec["floors"]["dram_read_bytes_per_s"] > 0
    assert set(rec["floors"]["gemm_flops_per_s"]) == {"fp32"}  # an fp32 artifact: no int8 / 4-bit rate
    assert rec["floors"]["gemm_flops_per_s"]["fp32"] > 0
    assert rec["memory"]["peak_rss_bytes"] > 0 and rec["memory"]["arena_bytes"] > 0
    need = {
        "vqa": {"preprocess", "vision", "tokenize", "prefill", "decode"},
        "detect": {"prefill", "object_decoder", "postprocess"},
        "generate": {"prefill", "gen_decoder"},
    }
    flagged = []
    for task, stages in need.items():
        t = rec["tasks"][task]
        assert stages <= set(t["stages_ms"]), (task, t["stages_ms"].keys())
        assert all(_ordered(s) and s["n"] == 2 for s in t["stages_ms"].values())
        assert _ordered(t["end_to_end_ms"])
        # Floors: every compute stage that ran got FLOPs from the profile, and a ratio to its floor.
        compute = stages & set(bench.STAGE_GRAPHS)
        assert compute | {"end_to_end"} <= set(t["floors"]), (task, t["floors"].keys())
        for stage in compute | {"end_to_end"}:
            f = t["floors"][stage]
            assert f["flops"]["float"] > 0 and f["flops"]["int8"] == f["flops"]["nbits"] == 0
            assert f["floor_ms"] > 0 and f["ratio_to_floor"] > 0
            if f["ratio_below_1"]:
                flagged.append(f"{task} {stage}")
        e2e = t["floors"]["end_to_end"]["flops"]["float"]
        assert e2e >= sum(t["floors"][s]["flops"]["float"] for s in compute if s != "denoise")
        # The reference ran the same requests: its stages, its end to end, the speed-up.
        ref = t["reference"]
        assert _ordered(ref["end_to_end_ms"]) and ref["end_to_end_ms"]["n"] == 2
        assert {"prefill"} <= set(ref["stages_ms"])
        assert t["speedup_over_reference"] == pytest.approx(
            ref["end_to_end_ms"]["median"] / t["end_to_end_ms"]["median"]
        )
        assert t["speedup_over_reference_min"] == pytest.approx(
            ref["end_to_end_ms"]["min"] / t["end_to_end_ms"]["min"]
        )
    assert all(any(f.startswith(name) for f in rec["flags"]) for name in flagged)
    assert rec["reference"]["source"] == "tiny-random"
    assert rec["speedup_bar"]["tasks"] == ["detect"]
    assert [d["past"] for d in rec["decode"]] == [128]
    for d in rec["decode"]:
        assert _ordered(d["ms_per_token"]) and d["floor_ms_per_token"] > 0 and d["ratio_to_floor"] > 0
        assert d["past_reached"]["median"] >= d["past"] * 0.9
    assert rec["command"].startswith(f"visionllm-edge bench {tiny_artifact} --tasks vqa,detect,generate")
    assert cli.main(["bench", *rec["command"].split()[2:], "--repeat", "0"]) == 2  # it parses back
    text = md.read_text()
    assert text.startswith(f"`{rec['command']}`") and "| decode |" in text
    assert "| detect | object_decoder |" in text and "speed-up" in text
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size < 100_000


def test_bench_defaults_to_every_served_task(tiny_artifact):
    rec = bench.run_bench(
        tiny_artifact, tasks="caption", past="", warmup=0, repeat=1, new_tokens=2, flops=False
    )
    assert list(rec["tasks"]) == ["caption"] and rec["decode"] == []
    assert "floors" not in rec["tasks"]["caption"] and "reference" not in rec
    tasks, skipped = bench.parse_tasks(None, ("vision", "llm", "det"))
    assert tasks == ["vqa", "caption", "detect", "ground", "segment"]
    assert skipped == ["pose", "generate", "edit"]


@pytest.mark.parametrize(
    "kw, match",
    [
        (dict(tasks="vqa,juggle"), "unknown task.*juggle"),
        (dict(tasks="vqa", past="100000"), "over the KV arena's capacity of \\d+ rows"),
        (dict(tasks="vqa", repeat=0), "--repeat must be at least 1"),
        (dict(tasks="vqa", warmup=-1), "--warmup must be 0 or more"),
        (dict(tasks="vqa", new_tokens=0), "--new-tokens must be at least 1"),
        (dict(tasks="vqa", threads=-2), "--threads must be 0"),
        (dict(tasks="vqa", past="12,x"), "--past takes"),
        (dict(tasks="vqa", past="0"), "--past lengths must be positive"),
        (dict(tasks="vqa", compare="torch"), "--compare takes 'reference'"),
        (
            dict(tasks="vqa", reference_source="tiny-random"),
            "--reference-source .* needs --compare reference",
        ),
        (
            dict(tasks="vqa", compare="reference", reference_source="no-such-model"),
            "'no-such-model': neither",
        ),
    ],
)
def test_bench_bad_inputs(tiny_artifact, kw, match):
    if kw.get("compare") == "reference":
        pytest.importorskip("torch", reason="resolving a reference source needs torch")
    with pytest.raises(bench.BenchError, match=match):
        bench.run_bench(tiny_artifact, **{"past": "", "warmup": 0, "repeat": 1, **kw})


def test_bench_missing_component_is_named():
    with pytest.raises(bench.BenchError, match="task pose needs component.*pose.*lacks"):
        bench.parse_tasks("vqa,pose", ("vision", "llm", "det"))


def test_compare_without_torch_names_the_package(tiny_artifact, monkeypatch):
    monkeypatch.setitem(sys.modules, "torch", None)  # `import torch` raises ImportError(name='torch')
    with pytest.raises(bench.BenchError, match="needs the PyTorch reference: the package 'torch' is missing"):
        bench.run_bench(tiny_artifact, tasks="vqa", past="", compare="reference")


def test_reference_source_resolution(tmp_path):
    pytest.importorskip("torch", reason="resolving a reference source needs torch")
    recorded = SimpleNamespace(model=SimpleNamespace(name="OpenGVLab/VisionLLMv2"))
    with pytest.raises(
        bench.BenchError, match="records model 'OpenGVLab/VisionLLMv2'.*--reference-source PATH"
    ):
        bench.resolve_reference_source(recorded, None)
    assert bench.resolve_reference_source(recorded, str(tmp_path)) == str(tmp_path)
    assert bench.resolve_reference_source(recorded, "tiny-random") == "tiny-random"
    not_a_folder = tmp_path / "weights.bin"
    not_a_folder.write_bytes(b"")
    with pytest.raises(bench.BenchError, match="not a checkpoint folder"):
        bench.resolve_reference_source(recorded, str(not_a_folder))
    named = SimpleNamespace(model=SimpleNamespace(name="shapes-tiny"))
    assert bench.resolve_reference_source(named, None) == "shapes-tiny"


def test_reference_with_other_weights_is_refused(tiny_artifact):
    """tiny-random's artifact against the bundled shapes-tiny checkpoint: another model, refused by name."""
    pytest.importorskip("torch", reason="the reference needs torch")
    from visionllm_edge.export.checkpoint import CheckpointError
    from visionllm_edge.export.train.ship import require_bundled
    from visionllm_edge.manifest import load_manifest

    try:
        require_bundled()
    except CheckpointError as e:
        pytest.skip(f"the bundled shapes-tiny checkpoint is missing: {e}")
    manifest = load_manifest(tiny_artifact, verify_hashes=False)
    assert manifest.model.name != "shapes-tiny"
    with pytest.raises(bench.BenchError, match="'shapes-tiny' does not hold this artifact's weights"):
        bench.load_reference_for(manifest, "shapes-tiny")


def test_reference_with_other_weights_is_refused_by_table(tiny_artifact, monkeypatch):
    """The check compares token tables: a reference whose table differs by one value is refused."""
    pytest.importorskip("torch", reason="the reference needs torch")
    import visionllm_edge.export as export
    from visionllm_edge.manifest import load_manifest

    manifest = load_manifest(tiny_artifact, verify_hashes=False)
    real = export.load_reference

    def perturbed(source):
        model = real(source)
        model.llm.model.embed_tokens.weight.data[3, 5] += 1.0
        return model

    monkeypatch.setattr(export, "load_reference", perturbed)
    with pytest.raises(bench.BenchError, match="does not hold this artifact's weights"):
        bench.load_reference_for(manifest, "tiny-random")
    monkeypatch.setattr(export, "load_reference", real)
    assert bench.load_reference_for(manifest, "tiny-random") is not None


@pytest.mark.parametrize(
    "name, match", [("plot.jpg", "must end in .png"), ("no/such/folder/plot.png", "does not exist")]
)
def test_bad_plot_path_is_refused_before_timing(tiny_artifact, tmp_path, capsys, name, match):
    with pytest.raises(bench.BenchError, match=match):
        bench.check_plot_path(tmp_path / name)
    assert cli.main(["bench", str(tiny_artifact), "--plot", str(tmp_path / name)]) == 2
    err = capsys.readouterr().err
    assert match.split()[0] in err and "[bench]" not in err  # refused before anything ran


def test_bench_cli_error_exit(tiny_artifact, capsys):
    assert cli.main(["bench", str(tiny_artifact), "--tasks", "nope"]) == 2
    assert "unknown task" in capsys.readouterr().err


@pytest.mark.parametrize("kind", ["fp32", "int8", "nbits"])
def test_gemm_graphs_compute_their_product(kind, tmp_path):
    """The ONNX bytes written without the onnx package load in ONNX Runtime and compute what they say."""
    model, feeds, want = bench.gemm_graph(kind, 64, seed=3)
    path = tmp_path / f"{kind}.onnx"
    path.write_bytes(model)
    engine = make_engine(path, "onnxruntime", None, 1, kind)
    got = engine.run(feeds)["y"]
    if kind == "fp32":
        np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)
    else:  # both quantize A to 8 bits per call: close, not equal
        assert np.linalg.norm(got - want) / np.linalg.norm(want) < 0.02
    assert bench.gemm_rate(kind, threads=1, sizes=(64,), tries=1)["flops_per_s"] > 0


@pytest.mark.parametrize("kind, cls", [("fp32", "float"), ("int8", "int8"), ("nbits", "nbits")])
def test_flop_counter_on_a_real_profile(kind, cls, tmp_path):
    """ONNX Runtime's profile of one n x n x n product: profile_flops counts 2 n^3, in its class, per run."""
    model, feeds, _ = bench.gemm_graph(kind, 96)
    path = tmp_path / f"{kind}.onnx"
    path.write_bytes(model)
    engine = make_engine(path, "onnxruntime", None, 1, kind, profile_prefix=str(tmp_path / kind))
    for _ in range(3):
        engine.run(feeds)
    runs = _core.profile_flops(engine.end_profiling())
    assert len(runs) == 3
    for r in runs:
        assert r[cls] == 2 * 96**3
        assert sum(r[c] for c in ("float", "int8", "nbits")) == 2 * 96**3
        assert r["uncounted"] == {}


def test_flops_of_a_pipeline_profile_follow_the_prefill_rows(tiny_artifact, tmp_path):
    """Through Pipeline.load(profile_dir=...): the llm's first run of a request is its prefill, and its
    FLOPs grow with the prompt's rows (the projections are linear in rows, attention more)."""
    from visionllm_edge import Pipeline

    pipe = Pipeline.load(tiny_artifact, threads=1, verify_hashes=False, profile_dir=tmp_path)
    short = pipe(None, "Hi.", max_new_tokens=1)
    long = pipe(None, "Hi. " + "a " * 60, max_new_tokens=1)
    files = pipe.end_profiling()
    assert set(files) == {"llm"} and files["llm"].startswith(str(tmp_path / "llm"))
    runs = _core.profile_flops(files["llm"])
    assert len(runs) == 2 + short.raw["stats"]["decode_steps"] + long.raw["stats"]["decode_steps"]
    rows_short = len(short.raw["input_ids"])
    prefill_short, prefill_long = runs[0]["float"], runs[1 + int(short.raw["stats"]["decode_steps"])]["float"]
    rows_long = len(long.raw["input_ids"]) - long.raw["stats"]["reused_rows"]
    assert prefill_long > prefill_short * (rows_long / rows_short) * 0.9


def test_last_request_runs_splits_at_the_pause():
    def run(ts, dur=10):
        return {"ts_us": ts, "dur_us": dur}

    runs = [run(0), run(15), run(30), run(900_000), run(900_020), run(900_040)]
    assert bench.last_request_runs(runs, gap_us=250_000) == runs[3:]
    assert bench.last_request_runs(runs[:3], gap_us=250_000) == runs[:3]  # one request: all of it


def test_diffusion_figures_from_the_loops_stats():
    stats = [
        {"diffusion_steps": 20, "diffusion_step_ms_min": 1.0, "diffusion_step_ms_median": 2.0,
         "diffusion_step_ms_max": 5.0},
        {"diffusion_steps": 20, "diffusion_step_ms_min": 0.5, "diffusion_step_ms_median": 3.0,
         "diffusion_step_ms_max": 4.0},
        {"decode_steps": 3},
    ]  # fmt: skip
    d = bench._diffusion(stats)
    assert d["steps"]["median"] == 20 and d["step_ms"]["n"] == 2
    assert d["step_ms"]["min"] == 0.5 and d["step_ms"]["median"] == 2.5 and d["step_ms"]["max"] == 5.0
    assert bench._diffusion([{"decode_steps": 3}]) is None


class _Tty(io.StringIO):
    def isatty(self):
        return True


def test_progress_bar_on_a_terminal_and_quiet():
    tty = _Tty()
    bar = bench._Progress(stream=tty)
    bar("floors", 0, total=4)
    bar("detect: runtime 1/2")
    bar("detect: runtime 2/2")
    bar.close()
    text = tty.getvalue()
    assert text.count("\r\033[K") == 3 and "2/4 detect: runtime 2/2" in text and text.endswith("\n")
    quiet = _Tty()
    bar = bench._Progress(stream=quiet, quiet=True)
    bar("floors", 0, total=4)
    bar("x")
    bar.close()
    assert quiet.getvalue() == ""


def test_rates_keep_the_best_sample(monkeypatch):
    """A busy moment measures a low rate: the floors use the best sample of the run, per kind and set."""
    gemm = iter([10.0, 30.0, 20.0])
    reads = iter([5.0, 1.0, 7.0, 2.0, 3.0, 9.0])
    monkeypatch.setattr(
        bench, "gemm_rate", lambda kind, threads, providers: {"flops_per_s": next(gemm), "n": 8}
    )
    monkeypatch.setattr(bench, "read_bandwidth", lambda threads, nbytes: next(reads))
    rates = bench.Rates(threads=2, providers=None, kinds=["fp32"])
    rates.want(3 * 2**20)
    for _ in range(3):
        rates.sample()
    assert rates.samples == 3 and rates.flops() == {"fp32": 30.0}
    # Each sample reads DRAM's set, then the wanted one: (5, 1), (7, 2), (3, 9).
    assert rates.read_rate(bench.DRAM_SET) == 7.0 and rates.read_rate(3 * 2**20) == 9.0
