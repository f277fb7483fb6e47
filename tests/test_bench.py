"""`visionllm-edge bench` on the tiny artifact: options, the JSON record's figures, named errors."""

from __future__ import annotations

import json

import pytest
from visionllm_edge import bench, cli


def _ordered(s):
    return s["min"] <= s["median"] <= s["p90"] <= s["max"]


def test_bench_cli_json_and_md(tiny_artifact, tmp_path, capsys):
    out, md = tmp_path / "b.json", tmp_path / "b.md"
    rc = cli.main(
        [
            "bench", str(tiny_artifact), "--tasks", "vqa,detect,generate", "--past", "128,512",
            "--warmup", "0", "--repeat", "2", "--threads", "2", "--providers", "CPUExecutionProvider",
            "--new-tokens", "4", "--json", str(out), "--md", str(md),
        ]
    )  # fmt: skip
    assert rc == 0
    assert "[bench]" in capsys.readouterr().err
    rec = json.loads(out.read_text())
    assert rec["options"]["tasks"] == ["vqa", "detect", "generate"]
    assert rec["machine"]["onnxruntime"] and rec["machine"]["threads"] == 2
    assert len(rec["artifact"]["manifest_sha256"]) == 64
    assert rec["floors"]["dram_read_bytes_per_s"] > 0 and rec["floors"]["gemm_fp32_flops_per_s"] > 0
    assert rec["memory"]["peak_rss_bytes"] > 0 and rec["memory"]["arena_bytes"] > 0
    need = {
        "vqa": {"preprocess", "vision", "tokenize", "prefill", "decode"},
        "detect": {"prefill", "object_decoder", "postprocess"},
        "generate": {"prefill", "gen_decoder"},
    }
    for task, stages in need.items():
        t = rec["tasks"][task]
        assert stages <= set(t["stages_ms"]), (task, t["stages_ms"].keys())
        assert all(_ordered(s) and s["n"] == 2 for s in t["stages_ms"].values())
        assert _ordered(t["end_to_end_ms"])
    assert [d["past"] for d in rec["decode"]] == [128, 512]
    for d in rec["decode"]:
        assert _ordered(d["ms_per_token"]) and d["floor_ms_per_token"] > 0 and d["ratio_to_floor"] > 0
        assert d["past_reached"]["median"] >= d["past"] * 0.9
    assert "| decode |" in md.read_text()


def test_bench_defaults_to_every_served_task(tiny_artifact):
    rec = bench.run_bench(tiny_artifact, tasks="caption", past="", warmup=0, repeat=1, new_tokens=2)
    assert list(rec["tasks"]) == ["caption"] and rec["decode"] == []
    tasks, skipped = bench.parse_tasks(None, ("vision", "llm", "det"))
    assert tasks == ["vqa", "caption", "detect", "ground", "segment"]
    assert skipped == ["pose", "generate", "edit"]


@pytest.mark.parametrize(
    "kw, match",
    [
        (dict(tasks="vqa,juggle"), "unknown task.*juggle"),
        (dict(tasks="vqa", past="100000"), "over the KV arena's capacity of \\d+ rows"),
        (dict(tasks="vqa", repeat=0), "--repeat must be at least 1"),
        (dict(tasks="vqa", past="12,x"), "--past takes"),
    ],
)
def test_bench_bad_inputs(tiny_artifact, kw, match):
    with pytest.raises(bench.BenchError, match=match):
        bench.run_bench(tiny_artifact, **{"past": "", "warmup": 0, "repeat": 1, **kw})


def test_bench_missing_component_is_named():
    with pytest.raises(bench.BenchError, match="task pose needs component.*pose.*lacks"):
        bench.parse_tasks("vqa,pose", ("vision", "llm", "det"))


def test_bench_cli_error_exit(tiny_artifact, capsys):
    assert cli.main(["bench", str(tiny_artifact), "--tasks", "nope"]) == 2
    assert "unknown task" in capsys.readouterr().err
