"""Converts the checkpoint's sentencepiece tokenizer into the artifact's two tokenizer files.

The device runtime (`visionllm_edge.tokenizer.RuntimeTokenizer`, the C++ tokenizer in `csrc/tokenizer/`)
runs SentencePiece's own C++ library on `tokenizer.model` for the innermost step and reproduces the slow
`LlamaTokenizer`'s logic around it; `tokenizer.json` gives it the added tokens (ids, `lstrip`/`rstrip`,
`special`) and records the settings in `LlamaConverter`'s layout. So two files are written:

* `tokenizer.model`: the checkpoint's model as the slow tokenizer loads it. For `legacy=False` the slow
  tokenizer switches the model's `add_dummy_prefix` off when it loads it; that is baked into the written
  model's `normalizer_spec`, so the runtime's SentencePiece needs no protobuf and no special loading.
* `tokenizer.json`: a complete fast-tokenizer file (other tools can read it). Its BPE model is built to
  segment as sentencepiece does, which `LlamaConverter` nearly gives; the differences we remove:
  - Its merges are built from the whole vocabulary, so a merge can produce a control, unknown or byte
    piece (`"<s>"` from `"<"` + `"s>"`). Sentencepiece's BPE only merges into normal pieces. We keep only
    merges whose two halves and result are normal pieces.
  - Sentencepiece applies the highest-scoring merge first, the leftmost on a tie; a BPE model applies the
    lowest rank first. We rank merges by the result's score, ties by the result's id. (Equal scores between
    different pieces are the one case a rank cannot express in general; the self-check below catches it.)
  - Settings that the fast tokenizer spells differently from the slow one (`legacy`, `add_prefix_space`,
    `add_dummy_prefix`) go into the file's structure in `LlamaConverter`'s layout, where the runtime reads
    them back. `legacy=True` takes its `Prepend` from the model's `add_dummy_prefix` (what the slow
    tokenizer does), not from `add_prefix_space`.

Sentencepiece features that the slow tokenizer's reproduction does not cover (a non-identity normalizer,
extra-whitespace removal, user-defined or unused pieces, whitespace as suffix, a non-BPE model) are refused.
Before the files are renamed into place, the BPE model of `tokenizer.json` is checked against sentencepiece,
and the runtime tokenizer on the two written files against the slow tokenizer, on sets of probe strings.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

from visionllm_edge import contract
from visionllm_edge.tokenizer import RuntimeTokenizer, Span, TokenizerSettings

SPIECE_UNDERLINE = "\u2581"

# sentencepiece ModelProto.SentencePiece.Type and TrainerSpec.ModelType values.
_NORMAL, _UNKNOWN, _CONTROL, _USER_DEFINED, _UNUSED, _BYTE = 1, 2, 3, 4, 5, 6
_BPE = 2

#: Strings the converted tokenizer is checked on, besides the special tokens in every pairing.
PROBE_STRINGS: tuple[str, ...] = (
    "",
    " ",
    "  ",
    "\n",
    "hello world",
    " hello  world ",
    "   leading and trailing   ",
    "a\tb\r\nc",
    "2023 1,234.5 007",
    "caf\u00e9 na\u00efve \u00c5ngstr\u00f6m",
    "\u65e5\u672c\u8a9e\u306e\u30c6\u30ad\u30b9\u30c8 \u4e2d\u6587",
    "emoji \U0001f600\U0001f44d\U0001f3fd!",
    "\u2581already\u2581underlined \u2581",
    "<s> </s> <unk> <0x41> [PAD]",
    "What is in <reg>region1<region></reg>? Please segment it.",
    "<image>\nDescribe the image.",
    "The person[DET][EMB][EMB2][EMB3][EMB4], road[SEG][EMB][EMB2][EMB3][EMB4].",
    "x <image> y <im_patch>z</s>  w",
    "!!! ??? ... --- ''' \"\"\" ((( )))",
)


def _load_proto(path: Path):
    try:
        from sentencepiece import sentencepiece_model_pb2 as model_pb2
    except ImportError:  # older sentencepiece wheels do not ship the proto module
        from transformers.convert_slow_tokenizer import import_protobuf

        model_pb2 = import_protobuf()
    proto = model_pb2.ModelProto()
    proto.ParseFromString(path.read_bytes())
    return proto


def _check_supported(proto, path: Path) -> None:
    """Refuses sentencepiece features the runtime's BPE-only reproduction does not cover."""
    spec, norm = proto.trainer_spec, proto.normalizer_spec
    problems = []
    if spec.model_type != _BPE:
        problems.append(f"model_type {spec.model_type} (only BPE = {_BPE} is supported)")
    if not spec.byte_fallback:
        problems.append("byte_fallback is off")
    if norm.precompiled_charsmap or (norm.name and norm.name != "identity"):
        problems.append(f"normalizer {norm.name!r} is not the identity")
    if norm.remove_extra_whitespaces:
        problems.append("remove_extra_whitespaces is on")
    if norm.HasField("escape_whitespaces") and not norm.escape_whitespaces:
        problems.append("escape_whitespaces is off")
    if spec.treat_whitespace_as_suffix:
        problems.append("treat_whitespace_as_suffix is on")
    odd = [p.piece for p in proto.pieces if p.type in (_USER_DEFINED, _UNUSED)]
    if odd:
        problems.append(f"{len(odd)} user-defined or unused pieces (e.g. {odd[:3]})")
    # Sentencepiece can merge a character that is not a piece into a longer piece; a BPE model turns such a
    # character into bytes first. Trained models never have this (every character of a piece is a piece).
    chars = {p.piece for p in proto.pieces if p.type == _NORMAL and len(p.piece) == 1}
    orphans = sorted({c for p in proto.pieces if p.type == _NORMAL for c in p.piece} - chars)
    if orphans:
        problems.append(f"pieces contain characters that are not pieces themselves: {orphans[:5]}")
    if problems:
        raise NotImplementedError(f"{path}: cannot convert this sentencepiece model: " + "; ".join(problems))


def _merges(proto) -> list[tuple[str, str]]:
    """BPE merges equivalent to sentencepiece's merge order, restricted to normal pieces."""
    normal = {p.piece: i for i, p in enumerate(proto.pieces) if p.type == _NORMAL}
    ranked = []
    for piece, idx in normal.items():
        score = proto.pieces[idx].score
        for cut in range(1, len(piece)):
            left, right = piece[:cut], piece[cut:]
            if left in normal and right in normal:
                ranked.append((-score, idx, cut, left, right))
    ranked.sort()
    return [(left, right) for *_, left, right in ranked]


def _build(slow, proto):
    from tokenizers import AddedToken, Tokenizer, decoders, models, normalizers, pre_tokenizers, processors

    legacy = bool(getattr(slow, "legacy", True))
    add_prefix_space = bool(getattr(slow, "add_prefix_space", True))
    # legacy=False loads the sentencepiece model with the dummy prefix switched off.
    add_dummy_prefix = legacy and bool(proto.normalizer_spec.add_dummy_prefix)
    vocab = {p.piece: i for i, p in enumerate(proto.pieces)}
    unk_piece = proto.pieces[proto.trainer_spec.unk_id].piece
    tok = Tokenizer(
        models.BPE(
            vocab=vocab,
            merges=_merges(proto),
            unk_token=unk_piece,
            fuse_unk=True,
            byte_fallback=True,
            dropout=None,
        )
    )
    if legacy:
        steps = [normalizers.Prepend(SPIECE_UNDERLINE)] if add_dummy_prefix else []
        tok.normalizer = normalizers.Sequence([*steps, normalizers.Replace(" ", SPIECE_UNDERLINE)])
    else:
        tok.pre_tokenizer = pre_tokenizers.Metaspace(
            replacement=SPIECE_UNDERLINE, prepend_scheme="first" if add_prefix_space else "never", split=False
        )
    steps = [decoders.Replace(SPIECE_UNDERLINE, " "), decoders.ByteFallback(), decoders.Fuse()]
    if add_prefix_space:
        steps.append(decoders.Strip(content=" ", left=1, right=0))
    tok.decoder = decoders.Sequence(steps)

    specials = set(slow.all_special_tokens)
    for idx, added in sorted(slow.added_tokens_decoder.items()):
        token = AddedToken(
            added.content,
            single_word=bool(added.single_word),
            lstrip=bool(added.lstrip),
            rstrip=bool(added.rstrip),
            normalized=bool(added.normalized),
            special=added.content in specials,
        )
        tok.add_tokens([token])
        got = tok.token_to_id(added.content)
        if got != int(idx):
            raise ValueError(
                f"added token {added.content!r} got id {got} in tokenizer.json, {idx} in the slow one"
            )

    # `tokenizer(text)` adds BOS (and EOS) as `LlamaTokenizerFast.update_post_processor` does; the runtime
    # adds them itself.
    bos, eos = slow.bos_token, slow.eos_token
    single = (f"{bos}:0 " if slow.add_bos_token else "") + "$A:0"
    single += f" {eos}:0" if slow.add_eos_token else ""
    pair = single + (f" {bos}:1" if slow.add_bos_token else "") + " $B:1"
    pair += f" {eos}:1" if slow.add_eos_token else ""
    used = [(bos, slow.bos_token_id)] if slow.add_bos_token else []
    used += [(eos, slow.eos_token_id)] if slow.add_eos_token else []
    tok.post_processor = processors.TemplateProcessing(single=single, pair=pair, special_tokens=used)
    return tok, TokenizerSettings(
        legacy=legacy, add_prefix_space=add_prefix_space, add_dummy_prefix=add_dummy_prefix
    )


def _probes(special_tokens) -> list[str]:
    out = list(PROBE_STRINGS)
    for t in special_tokens:
        out += [t, f"a{t}b", f" {t} x ", f"{t}\n y", f"x  {t}{t}  ", f"\u2581{t}\u2581"]
    return out


def _segmentation_probes(proto, count: int = 3000, seed: int = 0) -> list[str]:
    """Texts for the sentencepiece-versus-BPE check: every normal piece on its own, runs of spaces (where
    Llama-style vocabularies have many pieces), and seeded random concatenations of 2 to 4 pieces."""
    import random

    pieces = [p.piece.replace(SPIECE_UNDERLINE, " ") for p in proto.pieces if p.type == _NORMAL]
    out = list(pieces)
    for n in range(1, 33):
        out += [" " * n, "a" + " " * n + "b", " " * n + "x" + " " * n]
    rng = random.Random(seed)
    out += ["".join(rng.choice(pieces) for _ in range(rng.randint(2, 4))) for _ in range(count)]
    return out


def _bpe_pieces(model, text: str, add_dummy_prefix: bool) -> list[str]:
    """What `tokenizer.json`'s BPE model makes of `text` where the slow tokenizer calls sentencepiece
    (spaces as "▁", the dummy prefix when the model has it), bypassing the fast tokenizer's wrapping."""
    if not text:
        return []
    text = text.replace(" ", SPIECE_UNDERLINE)
    if add_dummy_prefix:
        text = SPIECE_UNDERLINE + text
    return [t.value for t in model.tokenize(text)]


def check_bpe_model(tok, chat_tokenizer, proto, add_dummy_prefix: bool) -> None:
    """Checks that `tokenizer.json`'s BPE model (`tok`, a `tokenizers.Tokenizer`) segments as the slow
    tokenizer's sentencepiece does, on `_segmentation_probes(proto)`.

    Raises:
        ValueError: on the first text where the pieces differ (scores tied between different pieces).
    """
    sp = chat_tokenizer.hf.sp_model
    for text in _segmentation_probes(proto):
        want = sp.encode(text, out_type=str)
        got = _bpe_pieces(tok.model, text, add_dummy_prefix)
        if got != want:
            raise ValueError(
                f"tokenizer.json's BPE model segments {text!r} as {got}, sentencepiece as {want} "
                "(scores tied between different pieces?)"
            )


def verify_tokenizer(chat_tokenizer, runtime: RuntimeTokenizer, strings=None, proto=None) -> None:
    """Checks the runtime tokenizer (the C++ one, on the written files) against the slow `ChatTokenizer`.

    `encode_text` plain and with the whole string protected, and `decode`, on `strings` (default:
    `PROBE_STRINGS` and each special token in several contexts); with a model proto also plain
    `encode_text` on `_segmentation_probes(proto)` (every piece, runs of spaces, random concatenations).

    Raises:
        ValueError: on the first text where the ids or the decoded text differ.
    """
    if proto is not None:
        for text in _segmentation_probes(proto):
            want, got = chat_tokenizer.encode_text(text), runtime.encode_text(text)
            if got != want:
                raise ValueError(f"runtime tokenizer encodes {text!r} as {got}, the slow one as {want}")
    for text in strings if strings is not None else _probes(chat_tokenizer._special):
        for protected in ((), (Span(0, len(text)),)):
            want = chat_tokenizer.encode_text(text, protected)
            got = runtime.encode_text(text, protected)
            if got != want:
                raise ValueError(
                    f"runtime tokenizer differs from the slow one on {text!r} "
                    f"(protected={bool(protected)}): {got} != {want}"
                )
            if runtime.decode(got) != chat_tokenizer.decode(want):
                raise ValueError(f"runtime tokenizer decodes {want} differently from the slow one")


def _temp_beside(path: Path, suffix: str) -> Path:
    fd, tmp = tempfile.mkstemp(prefix=f".{path.stem}-", suffix=suffix, dir=path.parent)
    os.close(fd)
    os.chmod(tmp, 0o644)  # mkstemp makes it owner-only; the artifact is meant to be read by others
    return Path(tmp)


def convert_tokenizer(
    checkpoint_dir: str | Path,
    out_path: str | Path,
    verify: bool = True,
    sentencepiece_path: str | Path | None = None,
) -> TokenizerSettings:
    """Writes `tokenizer.json` and `tokenizer.model` converted from a checkpoint's tokenizer files.

    Args:
        checkpoint_dir: folder with `tokenizer.model`, `tokenizer_config.json` (which sets `legacy`) and the
            added-token files, in the released layout.
        out_path: where to write the `tokenizer.json`.
        verify: compare the runtime tokenizer on the written files with the slow tokenizer
            (`verify_tokenizer`) before renaming.
        sentencepiece_path: where to write the `tokenizer.model` the runtime runs (the slow tokenizer's
            settings baked in); default `tokenizer.model` beside `out_path`.

    Both files are written to temporary files beside their targets, checked, and only then renamed; on any
    failure neither target is touched and the temporary files are removed.

    Returns:
        The settings the runtime reads back from the files.

    Raises:
        FileNotFoundError: `tokenizer.model` is missing.
        NotImplementedError: the sentencepiece model uses a feature the runtime does not reproduce, or the
            slow tokenizer cleans up tokenization spaces (not expressible in `tokenizer.json`).
        ValueError: the added tokens do not have the official ids, or a check against sentencepiece or the
            slow tokenizer fails.
    """
    from visionllm_edge.export.tokenizer import ChatTokenizer

    checkpoint_dir, out_path = Path(checkpoint_dir), Path(out_path)
    model_path = (
        Path(sentencepiece_path) if sentencepiece_path else out_path.with_name(contract.SENTENCEPIECE_FILE)
    )
    model_file = checkpoint_dir / "tokenizer.model"
    if not model_file.is_file():
        raise FileNotFoundError(
            f"{checkpoint_dir}: no tokenizer.model (the official tokenizer files are needed)"
        )
    proto = _load_proto(model_file)
    _check_supported(proto, model_file)
    chat = ChatTokenizer.from_directory(checkpoint_dir)
    slow = chat.hf
    if slow.clean_up_tokenization_spaces:
        raise NotImplementedError(
            f"{checkpoint_dir}: clean_up_tokenization_spaces=True cannot be expressed in tokenizer.json"
        )
    tok, settings = _build(slow, proto)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    model_path.parent.mkdir(parents=True, exist_ok=True)
    if verify:
        check_bpe_model(tok, chat, proto, settings.add_dummy_prefix)
    # The model as the slow tokenizer runs it: legacy=False loads it with the dummy prefix switched off.
    proto.normalizer_spec.add_dummy_prefix = settings.add_dummy_prefix

    tmp_json, tmp_model = _temp_beside(out_path, ".json"), None
    try:
        tmp_model = _temp_beside(model_path, ".model")
        tok.save(str(tmp_json), pretty=True)
        tmp_model.write_bytes(proto.SerializeToString())
        runtime = RuntimeTokenizer(tmp_json, tmp_model)
        if runtime.settings != settings:
            raise ValueError(f"the tokenizer files read back as {runtime.settings}, written as {settings}")
        if verify:
            verify_tokenizer(chat, runtime, proto=proto)
        os.replace(tmp_model, model_path)
        os.replace(tmp_json, out_path)
    except BaseException:
        for tmp in (tmp_json, tmp_model):
            if tmp is not None:
                tmp.unlink(missing_ok=True)
        raise
    return settings
