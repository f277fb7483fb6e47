"""The test tokenizer widened to the release's 32026 ids (`export/wide_tokenizer.py`), for 7B-width configs.

Its size is the configs' vocabulary; the added tokens sit at the release's ids; any text tokenizes to the test
tokenizer's pieces (ids of added tokens moved by 31500); every id 0..32025 decodes, in Python and in the C++
tokenizer on the converted files, the fillers to their own private-use character; and a small model with a
32026-row lm_head, saved with it and exported, samples ids from the whole range through the runtime.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from conftest import scene

pytest.importorskip("transformers", reason="the slow LlamaTokenizer (the export extra) is needed")
pytest.importorskip("sentencepiece", reason="sentencepiece (the export extra) is needed")

from visionllm_edge import contract  # noqa: E402
from visionllm_edge.export import wide_tokenizer as wide  # noqa: E402
from visionllm_edge.export.config import (  # noqa: E402
    EXTENSION_KEY,
    ModelConfig,
    config_tiny_random,
    data_path,
    named_config,
    tokenizer_dir,
)
from visionllm_edge.export.tokenizer import ChatTokenizer  # noqa: E402
from visionllm_edge.export.tokenizer_convert import PROBE_STRINGS, _load_proto, _segmentation_probes  # noqa: E402
from visionllm_edge.tokenizer import Span  # noqa: E402

VOCAB = 32026
TINY_PIECES = 500
SHIFT = wide.BASE_PIECES - TINY_PIECES

WITH_SPECIALS = "USER: <image>\nWhat is in <reg>region1<region></reg>? ASSISTANT: a red circle[DET][EMB]</s>"
TEXTS = (
    *PROBE_STRINGS,
    WITH_SPECIALS,
    "A chat between a curious user and an artificial intelligence assistant.",
    "Please detect the circle, square, triangle in the image.",
    "private use outside the fillers: \ue000 \uf8ff \U000ffffd \U0010fffd",
)


@pytest.fixture(scope="module")
def cache(tmp_path_factory) -> Path:
    """The user's cache folder for this module: the configs' wide tokenizer is made there, not in ~/.cache."""
    root = tmp_path_factory.mktemp("cache")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("XDG_CACHE_HOME", str(root))
        yield root


@pytest.fixture(scope="module")
def wide_dir(cache) -> Path:
    return tokenizer_dir(named_config("visionllmv2-7b-2layer"))


@pytest.fixture(scope="module")
def wide_tok(wide_dir) -> ChatTokenizer:
    return ChatTokenizer.from_directory(wide_dir)


@pytest.fixture(scope="module")
def tiny_tok() -> ChatTokenizer:
    return ChatTokenizer.from_directory(data_path("tiny_tokenizer"))


@pytest.fixture(scope="module")
def runtime(wide_dir, tmp_path_factory):
    from visionllm_edge.export.tokenizer_convert import convert_tokenizer
    from visionllm_edge.tokenizer import RuntimeTokenizer

    out = tmp_path_factory.mktemp("converted") / contract.TOKENIZER_FILE
    # Checks its BPE model and the C++ tokenizer against sentencepiece and the slow tokenizer.
    convert_tokenizer(wide_dir, out)
    return RuntimeTokenizer(out)


def test_size_equals_the_vocabulary_of_the_7b_width_configs(cache, wide_dir, wide_tok):
    assert wide_dir.is_relative_to(cache)
    for name in ("visionllmv2-7b", "visionllmv2-7b-2layer"):
        config = named_config(name)
        assert tokenizer_dir(config) == wide_dir, name
        assert wide_tok.vocab_size == config.llm.vocab_size == VOCAB, name
    assert len(wide_tok.hf.sp_model) == wide.BASE_PIECES
    # The configs at test sizes keep their own bundled tokenizers.
    assert tokenizer_dir(config_tiny_random()) == data_path("tiny_tokenizer")


def test_special_tokens_sit_at_the_release_ids(wide_dir, wide_tok):
    for offset, token in enumerate(contract.ADDED_TOKENS):
        assert wide_tok.token_id(token) == wide.BASE_PIECES + offset, token
    assert [wide_tok.token_id(t) for t in ("<unk>", "<s>", "</s>")] == [0, 1, 2]
    assert (wide_tok.token_id("[DET]"), wide_tok.token_id("[EMB8]")) == (32012, 32025)
    release = named_config("visionllmv2-7b").official
    assert wide_tok.token_id("[GEN]") == release["sd_config"]["trigger_token_id"] == 32016
    assert wide_tok.token_id("[EDIT]") == release["ip2p_config"]["trigger_token_id"] == 32017
    added = json.loads((wide_dir / "added_tokens.json").read_text())
    assert added == {t: wide_tok.token_id(t) for t in added}
    assert len(added) == len(contract.ADDED_TOKENS) + 3


def test_text_encodes_to_the_test_tokenizers_pieces(wide_tok, tiny_tok):
    def moved(ids):
        return [i + SHIFT if i >= TINY_PIECES else i for i in ids]

    texts = [*TEXTS, *_segmentation_probes(_load_proto(data_path("tiny_tokenizer") / "tokenizer.model"), 500)]
    for text in texts:
        for protected in ((), (Span(0, len(text)),)):
            want = tiny_tok.encode_text(text, protected)
            assert wide_tok.encode_text(text, protected) == moved(want), (text, protected)
    # The probes above do produce added tokens, so the shift is exercised.
    assert any(i >= wide.BASE_PIECES for i in wide_tok.encode_text(WITH_SPECIALS))


def test_every_id_decodes_in_python_and_in_the_runtime(wide_tok, runtime):
    assert runtime.vocab_size == VOCAB
    specials = {wide_tok.token_id(t): t for t in (*contract.ADDED_TOKENS, "<unk>", "<s>", "</s>")}
    for i in range(VOCAB):
        text = wide_tok.decode([i])
        assert runtime.decode([i]) == text, i
        if TINY_PIECES <= i < wide.BASE_PIECES:
            assert text == wide.filler_piece(i, TINY_PIECES), i
        elif i in specials:
            assert text == specials[i], i
    every = list(range(VOCAB))
    assert runtime.decode(every) == wide_tok.decode(every)
    with pytest.raises(ValueError, match=str(VOCAB)):
        runtime.decode([VOCAB])


def test_fillers_are_reached_only_by_their_private_use_characters(wide_tok, runtime):
    for i in (TINY_PIECES, 16485, wide.BASE_PIECES - 1):
        char = wide.filler_piece(i, TINY_PIECES)
        ids = wide_tok.encode_text(f"a{char}b", add_bos=False)
        assert i in ids and runtime.encode_text(f"a{char}b", add_bos=False) == ids, i


def test_the_files_are_the_same_on_every_build(wide_dir, tmp_path):
    again = wide.write_wide_tokenizer(data_path("tiny_tokenizer"), tmp_path / "again")
    for path in sorted(wide_dir.iterdir()):
        assert (again / path.name).read_bytes() == path.read_bytes(), path.name
    assert wide.wide_tokenizer_dir(tmp_path / "cache") == wide.wide_tokenizer_dir(tmp_path / "cache")
    assert [p.name for p in (tmp_path / "cache").iterdir()] == [wide_dir.name]  # no temporary folder left


def test_refuses_a_width_it_cannot_reach():
    model = (data_path("tiny_tokenizer") / "tokenizer.model").read_bytes()
    with pytest.raises(ValueError, match="cannot widen a 500-piece sentencepiece model to 400 pieces"):
        wide.widen_model(model, 400)
    with pytest.raises(ValueError, match="to 70000 pieces"):
        wide.widen_model(model, 70000)


def _wide_tiny_config() -> ModelConfig:
    """tiny-random's vision tower and LLM with the release's 32026-row tables and the wide tokenizer."""
    raw = config_tiny_random().to_dict()
    raw["_name_or_path"] = "tiny-random-wide"
    raw["llm_config"]["vocab_size"] = VOCAB
    for flag in ("use_gdino", "use_unipose", "use_sd", "use_ip2p"):
        raw[flag] = False
    raw[EXTENSION_KEY] = {"tokenizer": wide.WIDE_TOKENIZER, "max_tiles": 4}
    return ModelConfig.from_dict(raw, "tiny-random-wide")


def test_an_export_with_it_samples_the_whole_vocabulary_in_the_runtime(cache, wide_tok, tmp_path):
    import torch
    from visionllm_edge.export.checkpoint import save_random_official
    from visionllm_edge.export.exporter import export
    from visionllm_edge.pipeline import Pipeline

    checkpoint = save_random_official(_wide_tiny_config(), tmp_path / "ck", dtype=torch.float32)
    for name in ("tokenizer.model", "added_tokens.json"):
        assert (checkpoint / name).read_bytes() == (tokenizer_dir(_wide_tiny_config()) / name).read_bytes()
    artifact = tmp_path / "art"
    export(checkpoint, artifact, components=("vision", "llm"), validate="quick", progress=False)
    pipe = Pipeline.load(artifact)
    assert pipe.manifest.model.vocab_size == VOCAB
    assert pipe.manifest.token_id("[GEN]") == 32016
    image = scene(3, 90, 70)
    ids = []
    for seed in range(4):
        result = pipe(image, "Describe.", do_sample=True, temperature=1.0, seed=seed, max_new_tokens=12)
        assert result.text == wide_tok.decode(result.token_ids, skip_special_tokens=True), seed
        ids += list(result.token_ids)
    ids = np.array(ids)
    assert ids.size >= 12 and ids.max() < VOCAB
    # Near-uniform random logits: ids from far beyond the test tokenizer's 526, where the old one stopped.
    assert (ids >= 526).mean() > 0.5, ids
