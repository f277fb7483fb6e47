"""The device tokenizer (`tokenizer.json` + `RuntimeTokenizer`) against the slow reference tokenizer.

`ChatTokenizer` (slow sentencepiece `LlamaTokenizer`, the protected-span rule) is the reference; the runtime
tokenizer must give the same ids on every input, for `legacy=False` (the fixture checkpoint) and
`legacy=True` (a copy of it with the flag flipped). The inputs are generated from a word list that holds
every special token, look-alikes of special tokens, punctuation, digits, accented, CJK and emoji text (byte
fallback), "▁", and whitespace of every kind, plus chat-template conversations with their user spans,
`<image>` prompts and region markers, and the golden ids of the official run.
"""

from __future__ import annotations

import json
import random
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from visionllm_edge import contract
from visionllm_edge.export import tokenizer as reference
from visionllm_edge.export.tokenizer import ChatTokenizer, build_conversation, insert_placeholders
from visionllm_edge.export.tokenizer_convert import convert_tokenizer
from visionllm_edge.tokenizer import IMAGE_SENTINEL, RuntimeTokenizer, Span, TokenizerSettings

GOLDEN = Path(__file__).parent / "fixtures" / "golden_dev"
CHECKPOINT = GOLDEN / "tiny_official"
TOKENIZER_FILES = ("tokenizer.model", "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json")

SPECIALS = [*contract.ADDED_TOKENS, "<s>", "</s>", "<unk>"]
WORDS = [
    *SPECIALS,
    # plain words, template words
    "hello", "world", "person", "image", "the", "right", "region1", "dog", "USER:", "ASSISTANT:", "A",
    # look-alikes of special tokens and of byte pieces: text, never tokens
    "<", ">", "s>", "<s", "<0x41>", "[DET", "EMB]", "<reg", "/reg>", "[", "]", "<<image>>",
    # punctuation and digits (sentencepiece splits digits)
    ".", ",", "?", "!", "'s", "(", ")", '"', "-", ":", ";", "...", "0", "7", "42", "2023", "3.14", "1,000",
    # byte fallback and unicode whitespace
    "é", "café", "naïve", "Ångström", "日本語", "中文", "😀", "👍🏽", "\u00a0", "\u3000", "\x1c", "\u2581",
    # whitespace
    " ", "  ", "   ", "\n", "\n\n", "\t", " \n ",
]  # fmt: skip
SEPARATORS = ["", " ", " ", "  ", "\n"]
EDGES = ["", "", "", " ", "  ", "\n", "\u2581"]


def _text(rng: random.Random, max_words: int = 12) -> str:
    words = [rng.choice(WORDS) + rng.choice(SEPARATORS) for _ in range(rng.randint(0, max_words))]
    return rng.choice(EDGES) + "".join(words) + rng.choice(EDGES)


def _spans(rng: random.Random, text: str) -> tuple[Span, ...]:
    spans = []
    for _ in range(rng.randint(1, 2)):
        a = rng.randint(0, len(text))
        spans.append(Span(a, rng.randint(a, len(text))))
    return tuple(spans)


def _strings(seed: int, count: int = 1100) -> list[str]:
    rng = random.Random(seed)
    fixed = [
        "",
        " ",
        "\n",
        "hello world",
        "  leading, trailing  ",
        "<image>\nWhat is in <reg>region1<region></reg>?",
        "<reg>region1<region></reg><reg>region2<region></reg>",
        "[DET][EMB][EMB2][EMB3][EMB4]",
        "a<s>b</s>c<unk>d",
        "\u2581\u2581x\u2581",
    ]
    return fixed + [_text(rng) for _ in range(count - len(fixed))]


def _user_message(rng: random.Random) -> str:
    text = _text(rng, 8)
    if rng.random() < 0.4:
        at = rng.randint(0, len(text))
        text = text[:at] + f"<reg>region{rng.randint(1, 9)}<region></reg>" + text[at:]
    return text


def _answer(rng: random.Random) -> str:
    parts = []
    for _ in range(rng.randint(0, 4)):
        parts.append(_text(rng, 4))
        if rng.random() < 0.5:
            parts.append(rng.choice(list(contract.ROUTING_TOKENS)))
    answer = "".join(parts)
    return insert_placeholders(answer, 4, 8) if rng.random() < 0.7 else answer


def _conversations(seed: int, count: int = 250):
    rng = random.Random(seed)
    out = []
    for _ in range(count):
        turns = [(_user_message(rng), _answer(rng)) for _ in range(rng.randint(1, 3))]
        if rng.random() < 0.8:
            turns[0] = ("<image>" + rng.choice(["\n", "", " ", "\n\n"]) + turns[0][0], turns[0][1])
        if rng.random() < 0.5:
            turns[-1] = (turns[-1][0], None)
        out.append(build_conversation(turns))
    return out


# --- fixtures ----------------------------------------------------------------------------------------------


def _tokenizer_copy(dst: Path, legacy: bool | None) -> Path:
    dst.mkdir(parents=True)
    for name in TOKENIZER_FILES:
        shutil.copy(CHECKPOINT / name, dst / name)
    if legacy is not None:
        config = json.loads((dst / "tokenizer_config.json").read_text())
        config["legacy"] = legacy
        (dst / "tokenizer_config.json").write_text(json.dumps(config, indent=2))
    return dst


@pytest.fixture(scope="module", params=[False, True], ids=["legacy_false", "legacy_true"])
def pair(request, tmp_path_factory):
    """(slow ChatTokenizer, RuntimeTokenizer from the converted tokenizer.json, legacy) for one setting."""
    legacy = request.param
    folder = CHECKPOINT if not legacy else _tokenizer_copy(tmp_path_factory.mktemp("legacy") / "tok", True)
    out = tmp_path_factory.mktemp("converted") / "tokenizer.json"
    settings = convert_tokenizer(folder, out)
    chat = ChatTokenizer.from_directory(folder)
    assert chat.legacy is legacy  # the copy really switched the setting
    runtime = RuntimeTokenizer(out)
    assert runtime.settings == settings
    return chat, runtime, legacy


@pytest.fixture(scope="module")
def fixture_runtime(tmp_path_factory) -> RuntimeTokenizer:
    out = tmp_path_factory.mktemp("fixture") / "tokenizer.json"
    convert_tokenizer(CHECKPOINT, out)
    return RuntimeTokenizer(out)


def _mismatches(items, want_fn, got_fn, limit: int = 5) -> list:
    bad = []
    for item in items:
        want, got = want_fn(item), got_fn(item)
        if want != got:
            bad.append((item, want, got))
            if len(bad) >= limit:
                break
    return bad


# --- ids ---------------------------------------------------------------------------------------------------


def test_encode_text_matches_the_slow_tokenizer(pair):
    chat, runtime, legacy = pair
    strings = _strings(seed=1 + legacy)
    assert len(strings) >= 1000
    rng = random.Random(7)
    cases = []
    for s in strings:
        cases += [(s, ()), (s, (Span(0, len(s)),)), (s, _spans(rng, s))]
    bad = _mismatches(cases, lambda c: chat.encode_text(*c), lambda c: runtime.encode_text(*c))
    assert not bad, bad
    no_bos = _mismatches(
        strings[:200],
        lambda s: chat.encode_text(s, add_bos=False),
        lambda s: runtime.encode_text(s, add_bos=False),
    )
    assert not no_bos, no_bos


def test_unprotected_text_matches_the_slow_tokenizer_call(pair):
    """Closes the chain: with nothing protected, the runtime equals `tokenizer(text).input_ids` itself."""
    chat, runtime, _ = pair
    bad = _mismatches(_strings(seed=11, count=300), lambda s: chat.hf(s).input_ids, runtime.encode_text)
    assert not bad, bad


def test_conversations_and_image_prompts_match_the_slow_tokenizer(pair):
    chat, runtime, legacy = pair
    convs = _conversations(seed=3 + legacy)
    bad = _mismatches(
        convs,
        lambda c: chat.tokenize_with_image(c.text, c.user_spans),
        lambda c: runtime.tokenize_with_image(c.text, c.user_spans),
    )
    assert not bad, bad
    bad = _mismatches(
        convs,
        lambda c: chat.encode_text(c.text, c.user_spans),
        lambda c: runtime.encode_text(c.text, c.user_spans),
    )
    assert not bad, bad
    assert sum(IMAGE_SENTINEL in runtime.tokenize_with_image(c.text, c.user_spans) for c in convs) > 100
    # Loose prompts with several images, images at the edges, and protected spans across the cuts.
    rng = random.Random(5)
    prompts = []
    for _ in range(200):
        parts = [_text(rng, 5) for _ in range(rng.randint(1, 4))]
        text = "<image>".join(parts)
        prompts.append((text, _spans(rng, text)))
    bad = _mismatches(
        prompts,
        lambda p: chat.tokenize_with_image(*p),
        lambda p: runtime.tokenize_with_image(*p),
    )
    assert not bad, bad


def test_special_tokens_in_user_text_stay_text_except_the_markers(pair):
    chat, runtime, _ = pair
    text = "Find [DET] and </s> in <reg>region1<region></reg>"
    user = (Span(0, len(text)),)
    ids = runtime.encode_text(text, user)
    assert ids == chat.encode_text(text, user)
    assert runtime.token_id("[DET]") not in ids and runtime.eos_id not in ids
    for marker in ("<reg>", "<region>", "</reg>"):
        assert runtime.token_id(marker) in ids
    assert runtime.token_id("[DET]") in runtime.encode_text(text)  # unprotected it is a token


# --- golden ids of the official run (legacy=False) ---------------------------------------------------------


def _expand(runtime: RuntimeTokenizer, ids: list[int], n: int) -> list[int]:
    assert ids.count(IMAGE_SENTINEL) == 1
    at = ids.index(IMAGE_SENTINEL)
    return ids[:at] + [runtime.token_id(contract.IMAGE_PATCH_TOKEN)] * n + ids[at + 1 :]


def test_golden_teacher_forced_input_ids(fixture_runtime):
    meta = json.loads((GOLDEN / "golden_meta_run.json").read_text())
    want = np.load(GOLDEN / "golden_llm_tf.npz")["input_ids"][0]
    conv = build_conversation([(meta["question_a"], meta["answer_a"])])
    ids = fixture_runtime.tokenize_with_image(conv.text, conv.user_spans)
    np.testing.assert_array_equal(_expand(fixture_runtime, ids, meta["image_token_len"]), want)


def test_golden_generate_prompt_ids(fixture_runtime):
    meta = json.loads((GOLDEN / "golden_meta_run.json").read_text())
    want = np.load(GOLDEN / "golden_generate.npz")["prompt_input_ids"][0]
    question = "<image>\nWhat is in <reg>region1<region></reg>? Please segment it."
    conv = build_conversation([(question, None)])
    assert conv.text == meta["prompt_b"]
    ids = fixture_runtime.tokenize_with_image(conv.text, conv.user_spans)
    np.testing.assert_array_equal(_expand(fixture_runtime, ids, meta["image_token_len"]), want)


# --- decoding and the token table --------------------------------------------------------------------------


def test_decode_matches_the_slow_tokenizer(pair):
    chat, runtime, _ = pair
    encoded = [chat.encode_text(s) for s in _strings(seed=21, count=300)]
    rng = random.Random(9)
    # Random ids reach what encoding never produces: invalid UTF-8 byte runs, bare "▁" pieces after
    # special tokens, control pieces in the middle.
    random_ids = [[rng.randrange(chat.vocab_size) for _ in range(rng.randint(1, 12))] for _ in range(400)]
    for skip in (False, True):
        bad = _mismatches(
            encoded + random_ids,
            lambda ids, skip=skip: chat.decode(ids, skip_special_tokens=skip),
            lambda ids, skip=skip: runtime.decode(ids, skip_special_tokens=skip),
        )
        assert not bad, bad
    with pytest.raises(ValueError, match="outside the vocabulary"):
        runtime.decode([chat.vocab_size])


def test_token_table_matches(pair):
    chat, runtime, _ = pair
    assert runtime.vocab_size == chat.vocab_size
    assert (runtime.bos_id, runtime.eos_id) == (chat.bos_id, chat.eos_id)
    for token in SPECIALS:
        assert runtime.token_id(token) == chat.token_id(token)
    with pytest.raises(KeyError, match="hello"):
        runtime.token_id("hello")


def test_settings_are_read_back_from_the_file(pair, tmp_path):
    _, runtime, legacy = pair
    want = TokenizerSettings(legacy=legacy, add_prefix_space=True, add_dummy_prefix=legacy)
    assert runtime.settings == want
    data = json.loads(runtime.path.read_text())
    data["pre_tokenizer"] = {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True}
    bad = tmp_path / "tokenizer.json"
    bad.write_text(json.dumps(data))
    with pytest.raises(ValueError, match="unsupported"):
        RuntimeTokenizer(bad)


def test_span_and_sentinel_are_shared_with_the_reference():
    assert reference.Span is Span
    assert reference.IMAGE_SENTINEL == IMAGE_SENTINEL


# --- the converter ---------------------------------------------------------------------------------------


def test_merges_never_produce_control_pieces(tmp_path):
    """A vocabulary where `<` + `s>` spells the control piece `<s>`: sentencepiece never merges into a
    control piece (a user who types `<s>` gets text pieces), transformers' LlamaConverter merges would."""
    from sentencepiece import sentencepiece_model_pb2 as model_pb2

    folder = _tokenizer_copy(tmp_path / "tok", None)
    proto = model_pb2.ModelProto()
    proto.ParseFromString((folder / "tokenizer.model").read_bytes())
    normal = [p for p in proto.pieces if p.type == 1]
    for piece, new in zip(normal[-6:], ["<", ">", "s>", "/", "/s>", "<s"]):
        piece.piece = new
    (folder / "tokenizer.model").write_bytes(proto.SerializeToString())
    convert_tokenizer(folder, folder / "tokenizer.json")
    runtime, chat = RuntimeTokenizer(folder / "tokenizer.json"), ChatTokenizer.from_directory(folder)
    text = "say <s> and </s> or <unk>, <s>x</s>"
    user = (Span(0, len(text)),)
    ids = runtime.encode_text(text, user)
    assert ids == chat.encode_text(text, user)
    assert ids.count(runtime.bos_id) == 1 and runtime.eos_id not in ids


def test_convert_refuses_tied_scores_it_cannot_reproduce_and_leaves_no_file(tmp_path):
    """Sentencepiece breaks score ties by position, a BPE model by rank; the check catches the difference."""
    from sentencepiece import sentencepiece_model_pb2 as model_pb2

    folder = _tokenizer_copy(tmp_path / "tok", None)
    proto = model_pb2.ModelProto()
    proto.ParseFromString((folder / "tokenizer.model").read_bytes())
    for i, piece in enumerate(proto.pieces):
        if piece.type == 1:
            piece.score = float(-(i // 4))
    (folder / "tokenizer.model").write_bytes(proto.SerializeToString())
    out = tmp_path / "out" / "tokenizer.json"
    with pytest.raises(ValueError, match="sentencepiece"):
        convert_tokenizer(folder, out)
    assert list(out.parent.iterdir()) == []


def test_missing_tokenizer_model_is_a_clear_error(tmp_path):
    folder = _tokenizer_copy(tmp_path / "tok", None)
    (folder / "tokenizer.model").unlink()
    with pytest.raises(FileNotFoundError, match="tokenizer.model"):
        convert_tokenizer(folder, tmp_path / "tokenizer.json")
    assert not (tmp_path / "tokenizer.json").exists()
    with pytest.raises(FileNotFoundError, match="tokenizer.json"):
        RuntimeTokenizer(tmp_path / "tokenizer.json")


def test_runtime_needs_neither_torch_nor_transformers(fixture_runtime):
    code = (
        "import sys; from visionllm_edge.tokenizer import RuntimeTokenizer; "
        f"t = RuntimeTokenizer({str(fixture_runtime.path)!r}); "
        "ids = t.tokenize_with_image('<image>\\nWhat is in <reg>r<region></reg>?'); t.decode(ids[2:]); "
        "print([m for m in ('torch', 'transformers', 'sentencepiece') if m in sys.modules])"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"
