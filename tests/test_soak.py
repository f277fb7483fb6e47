"""benchmarks/soak.py, the soak driver (issue 19, item 5), on tiny-random: a short run writes the record the
10,000-request run writes (every sample, the resource counts, the per-task counts), its probes repeat their
answers, every bad request of its mix is refused with the error it expects, and the probe comparison does
catch a different answer. Whether the soak's bars hold is the long run's business
(benchmarks/results/soak.md), not a unit test's: nothing here is timed."""

from __future__ import annotations

import mmap
import re
import sys
from pathlib import Path

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import soak  # noqa: E402
from visionllm_edge import Pipeline  # noqa: E402


@pytest.fixture(scope="module")
def pipe(tiny_artifact) -> Pipeline:
    return Pipeline.load(tiny_artifact, threads=1)


def test_short_run_writes_the_record(tiny_artifact, tmp_path):
    # The guard is on this process's RSS, which in a full test run already holds torch and other artifacts:
    # it may grow 2000 MiB past where it starts.
    rss_mib = soak.rss_kib() // 1024
    rec = soak.soak(
        tiny_artifact,
        requests=50,
        seed=1,
        threads=1,
        sample_every=20,
        trace=False,
        max_rss_mib=rss_mib + 2000,
        progress=lambda message: None,
    )
    assert rec["requests"] >= 50  # a chat's turns may carry it past the count
    # Samples: after loading, at the first count past each multiple of 20 (a chat adds up to 4), at the end.
    counts = [r["requests"] for r in rec["samples"]]
    assert counts[0] == 0 and counts[-1] == rec["requests"]
    assert [0 <= c - 20 * k < 4 for k, c in enumerate(counts[:-1])] == [True] * (len(counts) - 1), counts
    for r in rec["samples"]:
        assert r["rss_kib"] > 0 and r["fds"] > 0 and r["threads"] > 0 and r["python_blocks"] > 0
        assert r["arena_bytes"] == rec["end"]["arena_bytes"] > 0
    # Each request is counted once under its task (a bad one: the refusal and the probe after it).
    assert sum(rec["counts"].values()) == rec["requests"]
    assert set(rec["counts"]) == set(rec["latency_ms_median"]) == set(rec["latency_ms_max"])
    assert rec["frames"]["fresh"] > 0 and rec["frames"]["repeated"] > 0
    assert rec["probes"] == sorted(
        ["vqa", "caption", "region", "interactive", "detect", "segment", "ground", "pose", "generate", "edit"]
    )
    assert rec["probe_differences_end"] == {}, rec["probe_deltas_end"]
    assert rec["bars"]["probes_identical"] and rec["wrong_answers"] == []
    assert set(rec["bars"]) == {
        "rss_within_5pct_of_first_sample",
        "fds_unchanged",
        "threads_unchanged",
        "probes_identical",
        "no_wrong_answers",
    }
    text = soak.markdown(rec)
    assert f"| {rec['requests']} |" in text and "## Requests per task" in text


@pytest.mark.parametrize("case", soak.BAD, ids=[c[0] for c in soak.BAD])
def test_each_bad_request_is_refused_and_the_next_answers_right(pipe, case):
    name, call, error, pattern = case
    s = soak.Soak(pipe, seed=0)
    s.baseline = {"vqa": soak.signature(s.probes["vqa"]())}
    image = s.frame(s.sample("vqa"))
    with pytest.raises(error) as refused:
        call(pipe, image)
    assert re.search(pattern, str(refused.value)), str(refused.value)
    assert soak.differences(s.baseline["vqa"], soak.signature(s.probes["vqa"]())) == []


def test_probe_comparison_sees_a_different_answer(pipe):
    s = soak.Soak(pipe, seed=0)
    one = soak.signature(s.probes["detect"]())
    assert soak.differences(one, soak.signature(s.probes["detect"]())) == []
    assert "images" in soak.differences(
        soak.signature(s.probes["generate"]()),
        soak.signature(pipe.generate_image("a large red circle", seed=8)),
    )
    box = dict(one, numbers=np.array([0.5, 10.0, 20.0, 30.0, 40.0]))
    assert soak.differences(box, dict(box, numbers=box["numbers"] + soak.NUMBER_TOL / 2)) == []
    assert soak.differences(box, dict(box, numbers=box["numbers"] + 2 * soak.NUMBER_TOL)) == ["numbers"]
    assert soak.differences(one, dict(one, token_ids=one["token_ids"][:-1])) == ["token_ids"]


def test_resources_reads_this_process(pipe):
    before = soak.resources(pipe)
    with open(__file__):  # one more fd while it is open
        assert soak.resources(pipe)["fds"] == before["fds"] + 1
    # 64 MiB of fresh anonymous pages, touched: RSS grows by that (a heap block could reuse freed pages).
    with mmap.mmap(-1, 64 << 20) as block:
        block.write(b"\x01" * (64 << 20))
        assert soak.resources(pipe)["rss_kib"] - before["rss_kib"] >= 60 << 10


def test_streamed_pieces_join_to_the_answer(pipe):
    """The soak's stream check found this: a character that tiny-random spells with byte-fallback tokens over
    several steps was streamed as U+FFFD and never corrected (csrc/loop/pipeline.cpp, stream_text)."""
    s = soak.Soak(pipe, seed=1)
    multibyte = 0
    for _ in range(10):
        image = s.frame(s.sample("vqa"))
        *pieces, result = pipe.stream(image, soak.CAPTION_QUESTION, max_new_tokens=32)
        assert "".join(pieces) == result.text
        multibyte += any(ord(c) > 127 and c != "\ufffd" for c in result.text)
    assert multibyte > 0, "no answer had a character of several bytes: the case is not exercised"
