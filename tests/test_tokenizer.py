"""The device tokenizer (the C++ `_core.Tokenizer` on `tokenizer.json` + `tokenizer.model`, through
`RuntimeTokenizer`) against the slow reference tokenizer, and the C++ chat template against the Python one.

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
from visionllm_edge import _core, contract
from visionllm_edge import conversation as py_conversation
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
    assert isinstance(runtime._core, _core.Tokenizer)  # the C++ tokenizer, the only runtime one
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
    with pytest.raises(ValueError, match="unsupported pre_tokenizer"):
        RuntimeTokenizer(bad, runtime.sentencepiece_path)


def test_written_model_has_the_slow_tokenizers_settings_baked_in(pair):
    """legacy=False: the slow tokenizer loads the model with the dummy prefix off, so the written model has
    it off; legacy=True: the model's own flag (on for the fixture) stays."""
    from sentencepiece import sentencepiece_model_pb2 as model_pb2

    chat, runtime, legacy = pair
    written, official = model_pb2.ModelProto(), model_pb2.ModelProto()
    written.ParseFromString(runtime.sentencepiece_path.read_bytes())
    official.ParseFromString((CHECKPOINT / "tokenizer.model").read_bytes())
    assert official.normalizer_spec.add_dummy_prefix
    assert written.normalizer_spec.add_dummy_prefix is legacy
    official.normalizer_spec.add_dummy_prefix = legacy
    assert written == official  # nothing else changed
    # The Python sentencepiece on the written model is the slow tokenizer's own processor.
    import sentencepiece

    sp = sentencepiece.SentencePieceProcessor(model_proto=runtime.sentencepiece_path.read_bytes())
    for text in _strings(seed=31, count=200):
        assert sp.encode(text, out_type=str) == chat.hf.sp_model.encode(text, out_type=str), text


def test_tokenizer_mismatch_with_the_manifest_names_the_token(pair):
    chat, runtime, legacy = pair
    table = {t: chat.token_id(t) for t in SPECIALS}
    RuntimeTokenizer(runtime.path, expected_ids=table, legacy=legacy, add_prefix_space=True)
    with pytest.raises(ValueError, match=r"tokenizer mismatch: token '\[SEG\]' has id 1 in the manifest"):
        RuntimeTokenizer(runtime.path, expected_ids={**table, "[SEG]": 1})
    with pytest.raises(ValueError, match="tokenizer mismatch.*legacy="):
        RuntimeTokenizer(runtime.path, legacy=not legacy)


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
    assert not (tmp_path / "tokenizer.model").exists()
    with pytest.raises(FileNotFoundError, match="tokenizer.json"):
        RuntimeTokenizer(tmp_path / "tokenizer.json")


def test_missing_sentencepiece_model_is_a_clear_error(fixture_runtime, tmp_path):
    shutil.copy(fixture_runtime.path, tmp_path / "tokenizer.json")
    with pytest.raises(FileNotFoundError, match="tokenizer.model"):
        RuntimeTokenizer(tmp_path / "tokenizer.json")


def test_runtime_needs_neither_torch_nor_transformers(fixture_runtime):
    code = (
        "import sys; from visionllm_edge.tokenizer import RuntimeTokenizer; "
        f"t = RuntimeTokenizer({str(fixture_runtime.path)!r}); "
        "ids = t.tokenize_with_image('<image>\\nWhat is in <reg>r<region></reg>?'); t.decode(ids[2:]); "
        "print([m for m in ('torch', 'transformers', 'sentencepiece', 'tokenizers') if m in sys.modules])"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


# --- the chat template in C++ against the Python one -------------------------------------------------------


def _py_turns(conv_seed: int, count: int = 250):
    """The turns `_conversations` builds, before the template."""
    rng = random.Random(conv_seed)
    out = []
    for _ in range(count):
        turns = [(_user_message(rng), _answer(rng)) for _ in range(rng.randint(1, 3))]
        if rng.random() < 0.8:
            turns[0] = ("<image>" + rng.choice(["\n", "", " ", "\n\n"]) + turns[0][0], turns[0][1])
        if rng.random() < 0.5:
            turns[-1] = (turns[-1][0], None)
        out.append(turns)
    return out


def test_cpp_build_conversation_equals_the_python_one():
    cases = _py_turns(41) + [[("caf\u00e9 \U0001f600 \u65e5", "\u2581x")], [("", None)], []]
    for turns in cases:
        want = py_conversation.build_conversation(turns)
        text, spans = _core.build_conversation(turns)
        assert text == want.text
        assert [Span(a, b) for a, b in spans] == want.user_spans  # character offsets, as in Python
    with pytest.raises(ValueError, match="only the last turn may have no answer"):
        _core.build_conversation([("a", None), ("b", "c")])


def test_cpp_insert_placeholders_equals_the_python_one():
    rng = random.Random(43)
    answers = [_answer(rng) for _ in range(400)] + ["[DET][EMB]", "[GEN]" + "[EMB]" * 3, "x[SEG][EMB][EMB2]y"]
    for answer in answers:
        for n, n_gen in ((4, 8), (1, 64), (8, 0), (0, 1)):
            want = insert_placeholders(answer, n, n_gen)
            assert _core.insert_placeholders(answer, n, n_gen) == want, answer


def test_cpp_template_constants_equal_the_contract():
    """The C++ tokenizer and template take their constants from the C++ contract (artifact/contract.h): the
    ones they use equal contract.py's."""
    c = _core.artifact_contract()
    assert tuple(c["ADDED_TOKENS"]) == contract.ADDED_TOKENS
    assert tuple(c["REQUIRED_TOKENS"]) == (*contract.ADDED_TOKENS, "<s>", "</s>", "<unk>")
    assert (c["BOS_TOKEN"], c["EOS_TOKEN"]) == (contract.BOS_TOKEN, contract.EOS_TOKEN)
    assert c["UNK_TOKEN"] == "<unk>"
    for name in ("IMAGE_TOKEN", "IMAGE_PATCH_TOKEN", "REGION_TOKEN", "REGION_OPEN", "REGION_CLOSE"):
        assert c[name] == getattr(contract, name), name
    assert tuple(c["INPUT_MARKERS"]) == contract.INPUT_MARKERS
    assert list(c["ROUTING_TOKENS"].items()) == list(contract.ROUTING_TOKENS.items())
    assert tuple(c["GENERATION_KINDS"]) == contract.GENERATION_KINDS
    assert tuple(c["ALL_PLACEHOLDERS"]) == contract.ALL_PLACEHOLDERS
    assert c["GENERATION_PLACEHOLDER"] == contract.GENERATION_PLACEHOLDER
    assert c["SYSTEM_PROMPT"] == contract.SYSTEM_PROMPT
    assert tuple(c["ROLES"]) == contract.ROLES
    assert (c["SEP"], c["SEP2"]) == (contract.SEP, contract.SEP2)
    assert c["SENTENCEPIECE_FILE"] == contract.SENTENCEPIECE_FILE


def test_spans_in_characters_reach_cpp_as_bytes(fixture_runtime):
    """Multi-byte characters before a protected special token: character offsets must protect the same
    token in C++ (bytes) as in Python; offsets outside the text act as Python's do."""
    chat = ChatTokenizer.from_directory(CHECKPOINT)
    text = "caf\u00e9 \U0001f600[DET] x [DET]\u65e5[SEG]"
    for a in range(-2, len(text) + 3):
        for b in (a, a + 3, a + 6, len(text), len(text) + 5):
            spans = (Span(a, b),)
            assert fixture_runtime.encode_text(text, spans) == chat.encode_text(text, spans), (a, b)


def test_from_manifest_passes_both_files_the_token_table_and_the_flags(fixture_runtime):
    from types import SimpleNamespace

    table = {t: fixture_runtime.token_id(t) for t in SPECIALS}
    info = SimpleNamespace(
        path=fixture_runtime.path,
        sentencepiece=SimpleNamespace(path=fixture_runtime.sentencepiece_path),
        legacy=False,
        add_prefix_space=True,
    )
    tok = RuntimeTokenizer.from_manifest(SimpleNamespace(tokenizer=info, tokens=table))
    assert tok.encode_text("hello [DET]") == fixture_runtime.encode_text("hello [DET]")
    with pytest.raises(ValueError, match=r"tokenizer mismatch: token '\[EMB\]'"):
        RuntimeTokenizer.from_manifest(SimpleNamespace(tokenizer=info, tokens={**table, "[EMB]": 3}))
