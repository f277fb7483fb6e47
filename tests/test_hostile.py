"""Hostile inputs, concurrency and interruption (issue 19, items 3, 4 and 6), on tiny-random.

Every case hands the SDK something a caller or a copied artifact could give it and asserts the text of the
error it gets back, or, where the input is legitimate but unusual (16-bit, palette, CMYK images; special
tokens typed as text), that the answer is exactly the one its plain equivalent gets. None may crash the
process, hang or return a silently wrong result: each test runs under a watchdog that dumps every thread's
stack and ends the run if it takes longer than WATCHDOG_S. docs/limits.md lists every limit and refusal.
"""

from __future__ import annotations

import faulthandler
import hashlib
import io
import json
import os
import shutil
import signal
import struct
import subprocess
import threading
import time
import zlib
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from conftest import scene
from visionllm_edge import Pipeline, _core
from visionllm_edge.manifest import ManifestError, load_manifest

#: No case needs more than a few seconds on the 2-core CPU; a hang is ended and reported as one.
WATCHDOG_S = 120


@pytest.fixture(autouse=True)
def watchdog():
    faulthandler.dump_traceback_later(WATCHDOG_S, exit=True)
    yield
    faulthandler.cancel_dump_traceback_later()


@pytest.fixture(scope="module")
def pipe(tiny_artifact) -> Pipeline:
    return Pipeline.load(tiny_artifact, threads=1)


@pytest.fixture(scope="module")
def small(tiny_artifact) -> Pipeline:
    """A pipeline whose KV arena holds 256 rows."""
    return Pipeline.load(tiny_artifact, threads=1, max_context=256)


IMG = scene(0, 64, 48)


def answer(r) -> tuple:
    """Everything a result says, for exact comparison."""
    return (
        r.text,
        tuple(r.token_ids),
        r.stop_reason,
        tuple((d.label, d.kind, d.score, d.box_xyxy, None if d.mask is None else d.mask.tobytes()) for d in r.detections),
        tuple((p.label, p.score, p.box_xyxy, p.keypoints.tobytes()) for p in r.poses),
        tuple(im.tobytes() for im in r.images),
    )


# --- images ---------------------------------------------------------------------------------------------


def png_header_only(path: Path, width: int, height: int) -> Path:
    """A PNG whose header claims width x height and whose data is a few bytes: what a decompression bomb's
    header looks like before anything is decoded."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 16)) + chunk(b"IEND", b""))
    return path


def truncated_png(path: Path) -> Path:
    buf = io.BytesIO()
    Image.fromarray(IMG).save(buf, "PNG")
    path.write_bytes(buf.getvalue()[: len(buf.getvalue()) // 2])
    return path


IMAGE_CASES = [
    ("truncated-file", lambda d: truncated_png(d / "t.png"), ValueError, r"cannot read image .*t\.png: "),
    ("missing-file", lambda d: d / "nope.png", ValueError, r"image file not found: .*nope\.png"),
    ("a-folder", lambda d: d, ValueError, r"cannot read image .*: "),
    ("side-over-cap", lambda d: png_header_only(d / "wide.png", 16385, 1), ValueError,
     r"image .*wide\.png is 16385x1; the largest side allowed is 16384"),
    ("zero-size-array", lambda d: np.zeros((0, 10, 3), np.uint8), ValueError, r"image has zero size \(10x0\)"),
    ("float-array", lambda d: IMG.astype(np.float32), ValueError,
     r"image array: expected dtype uint8 \(or uint16\), got float32"),
    ("nan-array", lambda d: np.full((8, 8, 3), np.nan), ValueError,
     r"image array: expected dtype uint8 \(or uint16\), got float64"),
    ("five-channels", lambda d: np.zeros((8, 8, 5), np.uint8), ValueError,
     r"image array: expected H x W x 3 \(or 4\), got shape \(8, 8, 5\)"),
    ("one-dimensional", lambda d: np.zeros(30, np.uint8), ValueError,
     r"image array: expected H x W x 3 \(or 4\), got shape \(30,\)"),
    ("a-list", lambda d: [[1, 2, 3]], TypeError,
     r"image: expected a path, a PIL.Image or a numpy array, got list"),
]


@pytest.mark.parametrize("make, error, message", [c[1:] for c in IMAGE_CASES], ids=[c[0] for c in IMAGE_CASES])
def test_bad_images_are_named(pipe, tmp_path, make, error, message):
    with pytest.raises(error, match=message):
        pipe(make(tmp_path), "what is this?", max_new_tokens=2)


def test_decompression_bomb_is_refused_from_its_header_even_with_pillows_limit_off(pipe, tmp_path, monkeypatch):
    # 16000 x 12000 = 192 M pixels: inside the side cap, over the pixel cap. Pillow's own check is turned
    # off (a caller may do that); ours still refuses, before decoding (the file's data is 30 bytes).
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", None)
    bomb = png_header_only(tmp_path / "bomb.png", 16000, 12000)
    with pytest.raises(ValueError, match=r"bomb\.png is 16000x12000 = 192000000 pixels; the most allowed is 178956970"):
        pipe(bomb, "what is this?", max_new_tokens=2)


def detect_on_a_new_frame(p: Pipeline, image, classes) -> tuple:
    """A detection whose frame is encoded afresh: a request on an unrelated image goes first, so two calls on
    equal pixels compare equal states (a repeated frame reuses its KV rows, which may move the last bits)."""
    p(scene(99, 32, 32), "x", answer="ok")
    return answer(p.detect(image, classes))


def test_16_bit_palette_and_cmyk_images_answer_as_their_rgb_equivalents(pipe, tmp_path):
    gray = IMG[:, :, 0]
    Image.fromarray(gray.astype(np.uint16) * 257).save(tmp_path / "g16.png")  # I;16: v * 257 -> v
    with Image.open(tmp_path / "g16.png") as im:
        assert im.mode.startswith("I")
    want = detect_on_a_new_frame(pipe, np.repeat(gray[:, :, None], 3, axis=2), ["circle", "square"])
    assert detect_on_a_new_frame(pipe, tmp_path / "g16.png", ["circle", "square"]) == want

    palette = Image.fromarray(IMG).quantize(16)
    palette.save(tmp_path / "p.png")
    want = detect_on_a_new_frame(pipe, np.asarray(palette.convert("RGB")), ["circle"])
    assert detect_on_a_new_frame(pipe, tmp_path / "p.png", ["circle"]) == want

    Image.fromarray(IMG).convert("CMYK").save(tmp_path / "c.jpg", quality=95)
    with Image.open(tmp_path / "c.jpg") as im:
        assert im.mode == "CMYK"
        rgb = np.asarray(im.convert("RGB"))
    assert detect_on_a_new_frame(pipe, tmp_path / "c.jpg", ["circle"]) == detect_on_a_new_frame(pipe, rgb, ["circle"])


# --- prompts, regions, options ---------------------------------------------------------------------------

REQUEST_CASES = [
    # prompts
    ("lone-surrogate", lambda p: p(IMG, "a\udcffb"), ValueError,
     r"prompt is not valid UTF-8: surrogates not allowed at index 1 \('\\udcff'\)"),
    ("nul-in-prompt", lambda p: p(IMG, "a\x00b"), ValueError,
     r"prompt: the control character '\\x00' at byte 1 \(only tab, newline and carriage return are allowed\)"),
    ("escape-in-history", lambda p: p(IMG, "hi", history=[("\x1b[2J", "ok")]), ValueError,
     r"history\[0\]: the control character '\\x1b' at byte 0"),
    ("bytes-prompt", lambda p: p(IMG, b"hi"), TypeError, r"prompt must be a str, got bytes b'hi'"),
    ("two-images", lambda p: p(IMG, "<image>\n<image>\nhi"), ValueError,
     r"the conversation must contain 1 <image>, found 2"),
    ("more-markers-than-regions", lambda p: p(IMG, "<region> and <region>?", regions=[(1, 1, 9, 9)]), ValueError,
     r"the prompt has 2 <region> marker\(s\) but 1 region\(s\) were given"),
    ("regions-without-markers", lambda p: p(IMG, "what?", regions=[(1, 1, 9, 9)]), ValueError,
     r"the prompt has 0 <region> marker\(s\) but 1 region\(s\) were given"),
    ("malformed-history", lambda p: p(IMG, "hi", history=[("only the user",)]), ValueError,
     r"history\[0\]: expected a \(user, assistant\) pair, got \('only the user',\)"),
    # regions
    ("box-out-of-frame", lambda p: p(IMG, "<region>?", regions=[(10, 10, 500, 500)]), ValueError,
     r"region_mask_box: box \(10, 10, 500, 500\) is empty or outside the 64x48 image"),
    ("box-negative", lambda p: p(IMG, "<region>?", regions=[(-20, -20, -5, -5)]), ValueError,
     r"region_mask_box: box \(-20, -20, -5, -5\) is empty or outside the 64x48 image"),
    ("box-zero-area", lambda p: p(IMG, "<region>?", regions=[(5, 5, 5, 9)]), ValueError,
     r"region_mask_box: box \(5, 5, 5, 9\) is empty or outside the 64x48 image"),
    ("box-nan", lambda p: p(IMG, "<region>?", regions=[(float("nan"), 1, 9, 9)]), ValueError,
     r"region_mask_box: box \(nan, 1, 9, 9\) is empty or outside the 64x48 image"),
    ("point-out-of-frame", lambda p: p(IMG, "<region>?", regions=[(1000, 5)]), ValueError,
     r"region_mask_point: point \(1000, 5\) is outside the 64x48 image"),
    ("mask-wrong-shape", lambda p: p(IMG, "<region>?", regions=[np.ones((10, 10), bool)]), ValueError,
     r"region_mask_mask: mask: expected shape \(48, 64\) \(the image\), got \(10, 10\)"),
    ("three-numbers", lambda p: p(IMG, "<region>?", regions=[(1, 2, 3)]), ValueError,
     r"region: expected a mask, a 4-number box or a 2-number point, got \(1, 2, 3\)"),
    ("regions-without-image", lambda p: p(None, "<region>?", regions=[(1, 1, 9, 9)]), ValueError,
     r"regions need an image"),
    ("bad-region-frame", lambda p: p(IMG, "<region>?", regions=[(1, 1, 9, 9)], region_frame="pixels"), ValueError,
     r"region_frame must be 'image' or 'thumbnail', got 'pixels'"),
    # options
    ("max-new-tokens-zero", lambda p: p(IMG, "hi", max_new_tokens=0), ValueError,
     r"max_new_tokens must be positive, got 0"),
    ("max-new-tokens-negative", lambda p: p(IMG, "hi", max_new_tokens=-5), ValueError,
     r"max_new_tokens must be positive, got -5"),
    ("max-new-tokens-over-int64", lambda p: p(IMG, "hi", max_new_tokens=2**70), TypeError,
     r"request option 'max_new_tokens' must be an int that fits int64, got int 1180591620717411303424"),
    ("max-new-tokens-str", lambda p: p(IMG, "hi", max_new_tokens="5"), TypeError,
     r"request option 'max_new_tokens' must be an int that fits int64, got str '5'"),
    ("temperature-negative", lambda p: p(IMG, "hi", do_sample=True, temperature=-1.0), ValueError,
     r"temperature must be positive when sampling, got -1"),
    ("temperature-nan", lambda p: p(IMG, "hi", do_sample=True, temperature=float("nan")), ValueError,
     r"temperature must be positive when sampling, got nan"),
    ("top-p-zero", lambda p: p(IMG, "hi", do_sample=True, top_p=0.0), ValueError,
     r"top_p must be in \(0, 1\], got 0"),
    ("top-p-over-one", lambda p: p(IMG, "hi", do_sample=True, top_p=1.5), ValueError,
     r"top_p must be in \(0, 1\], got 1.5"),
    ("top-k-negative", lambda p: p(IMG, "hi", top_k=-1), ValueError, r"top_k must be >= 0 \(0 turns it off\), got -1"),
    ("repetition-penalty-zero", lambda p: p(IMG, "hi", repetition_penalty=0.0), ValueError,
     r"repetition_penalty must be positive, got 0"),
    ("seed-negative", lambda p: p(IMG, "hi", seed=-1), TypeError,
     r"request option 'seed' must be an int in \[0, 2\*\*64\), got int -1"),
    ("unknown-keyword", lambda p: p(IMG, "hi", max_tokens=5), TypeError, r"unknown request keyword\(s\) \['max_tokens'\]"),
    ("noise-nan", lambda p: p.generate_image("a cat", noise=np.full((1, 4, 16, 16), np.nan, np.float32)), ValueError,
     r"noise is not finite: NaN at element 0 of 1024"),
    ("noise-wrong-shape", lambda p: p.generate_image("a cat", noise=np.zeros((1, 2, 3), np.float32)), ValueError,
     r"noise: expected float32 of shape \[1, 4, 16, 16\], got \[1, 2, 3\]"),
    # class names and phrases
    ("classes-as-a-string", lambda p: p.detect(IMG, "cat"), TypeError,
     r"classes must be a list of names, got the string 'cat'; wrap it: \['cat'\]"),
    ("keypoints-as-a-string", lambda p: p.pose(IMG, "nose"), TypeError,
     r"keypoint_names must be a list of names, got the string 'nose'"),
    ("routing-token-in-class", lambda p: p.detect(IMG, ["cat[DET]", "dog"]), ValueError,
     r"name 'cat\[DET\]' contains the special token '\[DET\]'"),
    ("region-token-in-class", lambda p: p.segment(IMG, ["<region>"]), ValueError,
     r"name '<region>' contains the special token '<region>'"),
    ("eos-in-phrase", lambda p: p.ground(IMG, "the dog</s>"), ValueError,
     r"name 'the dog</s>' contains the special token '</s>'"),
    ("delimiter-in-class", lambda p: p.detect(IMG, ["cup of tea"]), ValueError,
     r"name 'cup of tea' contains ' of ', where the answer's labels are split: its label would not be the name"),
    ("comma-in-class", lambda p: p.detect(IMG, ["a, b"]), ValueError, r"name 'a, b' contains ', '"),
    ("newline-in-class", lambda p: p.detect(IMG, ["a\nb"]), ValueError,
     r"name 'a\\nb' contains the control character '\\n'"),
    ("no-classes", lambda p: p.detect(IMG, []), ValueError, r"expected one or more non-empty names, got \[\]"),
]


@pytest.mark.parametrize("call, error, message", [c[1:] for c in REQUEST_CASES], ids=[c[0] for c in REQUEST_CASES])
def test_bad_requests_are_named(pipe, call, error, message):
    with pytest.raises(error, match=message):
        call(pipe)


def test_a_prompt_over_the_context_is_refused_and_a_huge_max_new_tokens_stops_at_it(small):
    with pytest.raises(ValueError, match=r"the prompt is \d+ tokens; the context holds 256"):
        small(IMG, "hi " * 300)
    r = small(IMG, "count", max_new_tokens=10**9)  # no allocation follows the option: the arena bounds it
    assert r.stop_reason in ("eos", "length")
    assert len(r.raw["input_ids"]) <= small.context_capacity


def test_special_tokens_typed_by_the_user_are_text(pipe):
    ids = {t: pipe.manifest.tokens[t] for t in ("[DET]", "<im_patch>", "</s>", "[EMB]", "[GEN]")}
    r = pipe(IMG, "[DET] <im_patch> </s> [EMB] [GEN]", answer="ok")
    prompt_ids = list(r.raw["input_ids"])
    patches = prompt_ids.count(ids["<im_patch>"])
    plain = pipe(IMG, "x", answer="ok")
    assert patches == list(plain.raw["input_ids"]).count(ids["<im_patch>"])  # only the image's own
    for token in ("[DET]", "[EMB]", "[GEN]"):
        assert ids[token] not in prompt_ids, token
    assert prompt_ids.count(ids["</s>"]) == list(plain.raw["input_ids"]).count(ids["</s>"])
    assert r.detections == [] and r.images == []


def test_non_finite_logits_are_refused_at_sampling():
    sampler = _core.Sampler(0)
    for bad, word in ((np.nan, "NaN"), (np.inf, r"\+inf")):
        logits = np.zeros(8, np.float32)
        logits[3] = bad
        for params in (_core.SamplingParams(), _core.SamplingParams(do_sample=True)):
            with pytest.raises(ValueError, match=rf"logits: token 3 of 8 is {word} \(the llm graph's output is not finite\)"):
                sampler.sample(logits, params, [])
    masked = np.zeros(8, np.float32)
    masked[:7] = -np.inf  # -inf is a masked token, not an error
    assert sampler.sample(masked, _core.SamplingParams(), []) == 7


# --- artifacts --------------------------------------------------------------------------------------------


def copy_artifact(src: Path, dst: Path) -> Path:
    """The artifact's files hard-linked (read-only use), manifest.json copied so that it can be edited."""
    dst.mkdir(parents=True)
    for f in src.iterdir():
        if f.is_file():
            (shutil.copy2 if f.name == "manifest.json" else os.link)(f, dst / f.name)
    return dst


def replace_file(folder: Path, name: str, data: bytes, manifest: dict, entry: dict) -> None:
    """Writes `data` as a new file (the hard link broken) and records its size and sha256 in `entry`."""
    (folder / name).unlink()
    (folder / name).write_bytes(data)
    entry["sha256"] = hashlib.sha256(data).hexdigest()
    if "size_bytes" in entry:
        entry["size_bytes"] = len(data)


def nan_embeddings(folder: Path, m: dict) -> None:
    from safetensors.numpy import load_file, save

    path = folder / m["embeddings"]["file"]
    tensors = load_file(path)
    table = tensors[m["embeddings"]["token_table"]].copy()
    table[5, 7] = np.nan
    tensors[m["embeddings"]["token_table"]] = table
    replace_file(folder, m["embeddings"]["file"], save(tensors), m, m["embeddings"])


def truncate_graph(folder: Path, m: dict) -> None:
    data = (folder / "pose.onnx").read_bytes()
    (folder / "pose.onnx").unlink()
    (folder / "pose.onnx").write_bytes(data[: len(data) // 2])


def flip_a_byte(folder: Path, m: dict) -> None:
    data = bytearray((folder / "pose.onnx").read_bytes())
    data[len(data) // 2] ^= 0xFF
    (folder / "pose.onnx").unlink()
    (folder / "pose.onnx").write_bytes(bytes(data))


def symlink_out(folder: Path, m: dict) -> None:
    outside = folder.parent / "outside.onnx"
    shutil.copy(folder / "pose.onnx", outside)
    (folder / "pose.onnx").unlink()
    (folder / "pose.onnx").symlink_to(outside)


def swap_det_for_pose(folder: Path, m: dict) -> None:
    """det.onnx's bytes under the pose entry, hashes updated: a graph whose inputs differ from the manifest."""
    replace_file(folder, "pose.onnx", (folder / "det.onnx").read_bytes(), m, m["graphs"]["pose"])


def set_key(*path_and_value):
    *path, value = path_and_value

    def edit(folder: Path, m: dict) -> None:
        node = m
        for key in path[:-1]:
            node = node[key]
        node[path[-1]] = value

    return edit


ARTIFACT_CASES = [
    ("path-escapes", set_key("graphs", "pose", "file", "../pose.onnx"), ManifestError,
     r"graphs\.pose\.file: .*leaves the artifact folder"),
    ("absolute-path", set_key("graphs", "pose", "file", "/etc/passwd"), ManifestError,
     r"graphs\.pose\.file: '/etc/passwd' is not a relative '/'-separated path inside the artifact folder"),
    ("symlink-out", symlink_out, ManifestError,
     r"graphs\.pose\.file: 'pose\.onnx' resolves outside the artifact folder \(to .*outside\.onnx\)"),
    ("missing-graph", lambda f, m: (f / "pose.onnx").unlink(), ManifestError, r"graphs\.pose\.file: .*pose\.onnx"),
    ("truncated-graph", truncate_graph, ManifestError,
     r"graphs\.pose\.size_bytes: pose\.onnx is \d+ bytes, the manifest says \d+ \(truncated or replaced file\)"),
    ("sha256-mismatch", flip_a_byte, ManifestError, r"graphs\.pose\.sha256: pose\.onnx: sha256 mismatch"),
    ("newer-schema", set_key("schema_version", 99), ManifestError,
     r"schema_version: the artifact was written by a newer visionllm-edge"),
    ("unknown-key", set_key("model", "sliding_window", 4096), ManifestError,
     r"model\.sliding_window: unknown key \(allowed here: "),
    ("context-over-cap", set_key("model", "max_context", 2**40), ManifestError,
     r"model\.max_context: must be <= 1048576 \(docs/limits\.md\), got 1099511627776"),
    ("layers-over-cap", set_key("model", "num_layers", 10**6), ManifestError,
     r"model\.num_layers: must be <= 1024 \(docs/limits\.md\), got 1000000"),
    ("steps-over-cap", set_key("generation", "diffusion_steps", 10**6), ManifestError,
     r"generation\.diffusion_steps: must be <= 1000 \(docs/limits\.md\), got 1000000"),
    ("queries-over-cap", set_key("routing", "gen", "queries", 10**6), ManifestError,
     r"routing\.gen\.queries: must be <= 4096 \(docs/limits\.md\), got 1000000"),
    ("tokenizer-disagrees", set_key("tokens", "[DET]", 7), ManifestError, r"\[DET\]"),
    ("nan-embeddings", nan_embeddings, ManifestError,
     r"tensor 'token_embeddings' \(embeddings\.token_table\) is not finite: NaN at element \d+"),
]


@pytest.mark.parametrize("edit, error, message", [c[1:] for c in ARTIFACT_CASES], ids=[c[0] for c in ARTIFACT_CASES])
def test_bad_artifacts_are_named(tiny_artifact, tmp_path, edit, error, message):
    folder = copy_artifact(tiny_artifact, tmp_path / "art")
    m = json.loads((folder / "manifest.json").read_text())
    edit(folder, m)
    (folder / "manifest.json").write_text(json.dumps(m))
    with pytest.raises(error, match=message):
        Pipeline.load(folder, threads=1)


def test_a_graph_whose_inputs_differ_from_the_manifest_is_refused_naming_it(tiny_artifact, tmp_path):
    folder = copy_artifact(tiny_artifact, tmp_path / "art")
    m = json.loads((folder / "manifest.json").read_text())
    swap_det_for_pose(folder, m)
    (folder / "manifest.json").write_text(json.dumps(m))
    p = Pipeline.load(folder, threads=1)
    with pytest.raises(ManifestError, match=r"graphs\.pose\.inputs: pose\.onnx takes \[.*text_query:float32.*\], "
                       r"the manifest says \[.*keypoint_query:float32.*\]"):
        p.pose(IMG, ["head"])


def test_a_lazily_loaded_graph_is_hashed_again_when_its_engine_is_made(tiny_artifact, tmp_path):
    folder = copy_artifact(tiny_artifact, tmp_path / "art")
    p = Pipeline.load(folder, threads=1)  # the manifest (and every hash) checked here; no pose engine yet
    flip_a_byte(folder, {})
    with pytest.raises(ManifestError, match=r"graphs\.pose\.sha256: pose\.onnx: sha256 mismatch when its engine was made"):
        p.pose(IMG, ["head"])


def test_manifest_that_is_not_json_is_named(tiny_artifact, tmp_path):
    folder = copy_artifact(tiny_artifact, tmp_path / "art")
    text = (folder / "manifest.json").read_text()
    (folder / "manifest.json").write_text(text[: len(text) // 2])
    with pytest.raises(ManifestError, match=r"manifest\.json"):
        load_manifest(folder)


# --- concurrency (item 4) ---------------------------------------------------------------------------------


def mixed_request(p: Pipeline, i: int):
    image = scene(i, 40 + 8 * i, 48)
    kind = i % 4
    if kind == 0:
        return answer(p(image, f"describe the picture {i}", max_new_tokens=12))
    if kind == 1:
        return answer(p.detect(image, ["circle", "square"]))
    if kind == 2:
        return answer(p.ground(image, "the red thing"))
    pieces = []
    r = p(image, "<region> what is it?", regions=[(2, 2, 30, 30)], max_new_tokens=8, _on_text=pieces.append)
    assert "".join(pieces) == r.text
    return answer(r)


def test_one_pipeline_from_8_threads_answers_as_serially(pipe):
    serial = [mixed_request(pipe, i) for i in range(8)]
    for _ in range(2):
        with ThreadPoolExecutor(8) as pool:
            parallel = list(pool.map(lambda i: mixed_request(pipe, i), range(8)))
        assert parallel == serial


def test_one_chat_from_8_threads_keeps_every_turn_whole(pipe):
    chat = pipe.chat(IMG)
    prompts = [f"question {i}?" for i in range(8)]
    with ThreadPoolExecutor(8) as pool:
        results = dict(zip(prompts, pool.map(lambda q: chat.ask(q, max_new_tokens=6).text, prompts)))
    history = chat.history
    assert sorted(u for u, _ in history) == sorted(prompts)
    assert all(results[u] == a for u, a in history)
    # Replayed one after another in the order the turns took the lock, each turn answers the same.
    replay = pipe.chat(IMG)
    for user, said in history:
        assert replay.ask(user, max_new_tokens=6).text == said


# --- interruption and recovery (item 6) -------------------------------------------------------------------


@pytest.fixture(scope="module")
def slow_artifact(tiny_artifact, tmp_path_factory) -> Path:
    """tiny-random with 500 denoising steps: a request long enough to interrupt (about 1.5 s here)."""
    folder = copy_artifact(tiny_artifact, tmp_path_factory.mktemp("slow") / "art")
    m = json.loads((folder / "manifest.json").read_text())
    m["generation"]["diffusion_steps"] = 500
    (folder / "manifest.json").write_text(json.dumps(m))
    return folder


def test_sigint_during_a_request_raises_keyboard_interrupt_and_the_pipeline_still_answers(slow_artifact):
    p = Pipeline.load(slow_artifact, threads=1)
    p.generate_image("a red circle")  # makes the engines, so the next run is the loop alone
    start = time.monotonic()
    full = p.generate_image("a red circle")  # the whole loop, for the scale of "promptly"
    full_s = time.monotonic() - start
    assert full.raw["stats"]["diffusion_steps"] == 500 and len(full.images) == 1
    # Python's own SIGINT handling, scoped to this test: a signal arriving after it is ignored, not raised in
    # whatever runs next.
    armed = threading.Event()

    def on_sigint(signum, frame):
        if armed.is_set():
            raise KeyboardInterrupt

    previous = signal.signal(signal.SIGINT, on_sigint)
    timer = threading.Timer(full_s / 10, os.kill, (os.getpid(), signal.SIGINT))
    try:
        armed.set()
        start = time.monotonic()
        timer.start()
        with pytest.raises(KeyboardInterrupt):
            p.generate_image("a red circle")
        interrupted_s = time.monotonic() - start
    finally:
        armed.clear()
        timer.join()
        signal.signal(signal.SIGINT, previous)
    assert interrupted_s < full_s / 2, (interrupted_s, full_s)  # stopped inside the loop, not after it
    # The same requests on a pipeline that was never interrupted answer the same, to the bit.
    after = [detect_on_a_new_frame(p, IMG, ["circle"]), answer(p.generate_image("a red circle"))]
    q = Pipeline.load(slow_artifact, threads=1)
    q.generate_image("a red circle")
    assert answer(q.generate_image("a red circle")) == answer(full)
    assert [detect_on_a_new_frame(q, IMG, ["circle"]), answer(q.generate_image("a red circle"))] == after


# A failing request and the same request made valid: where it fails (in its frame, after its frame and tokens,
# at its first decoding step, in dispatch after decoding), and what the valid one sends.
RECOVERABLE_ERRORS = [
    (lambda p: p(IMG, "<region>?", regions=[(500, 500, 600, 600)]),
     lambda p: p(IMG, "<region>?", regions=[(5, 5, 30, 30)])),
    (lambda p: p(scene(9, 64, 48), "hi " * 5000), lambda p: p(scene(9, 64, 48), "hi")),
    (lambda p: p(IMG, "hi", max_new_tokens=4, _on_text=lambda piece: 1 / 0),
     lambda p: p(IMG, "hi", max_new_tokens=4, _on_text=lambda piece: None)),
    (lambda p: p.generate_image("a cat", noise=np.full((1, 4, 16, 16), np.inf, np.float32)),
     lambda p: p.generate_image("a cat", noise=np.zeros((1, 4, 16, 16), np.float32))),
]


@pytest.mark.parametrize("fail, succeed", RECOVERABLE_ERRORS, ids=["region", "context", "callback", "noise"])
def test_a_request_after_an_error_answers_as_after_its_valid_twin(tiny_artifact, fail, succeed):
    # What follows a failed request answers, to the bit, as it does on a pipeline where that request never ran
    # or where its valid twin ran instead (a failure before the frame changes leaves the state as it was; one
    # after it leaves what the valid request would): the failed request kept nothing half-done, no rows, ids,
    # frame or links of its own. (The two references can differ in the last bits: a frame whose KV rows are
    # reused computes its answer in other blocks than one encoded afresh.)
    def after(first) -> list:
        p = Pipeline.load(tiny_artifact, threads=1)
        p(IMG, "what is here?", max_new_tokens=8)  # the frame and the KV rows are warm before it
        first(p)
        return [answer(p(IMG, "what is here?", max_new_tokens=8)), answer(p.detect(IMG, ["circle", "square"]))]

    want = [after(lambda p: None), after(succeed)]
    used = Pipeline.load(tiny_artifact, threads=1)
    used(IMG, "what is here?", max_new_tokens=8)
    with pytest.raises((ValueError, ZeroDivisionError)):
        fail(used)
    assert [answer(used(IMG, "what is here?", max_new_tokens=8)), answer(used.detect(IMG, ["circle", "square"]))] in want


def vle_run_binary() -> Path:
    path = Path(os.environ.get("VLE_RUN") or Path(__file__).parents[1] / "build" / "cpu" / "vle-run")
    if not path.is_file():
        pytest.skip(f"vle-run is not built at {path}: build it with `cmake --preset cpu && cmake --build --preset cpu` (or set $VLE_RUN)")
    return path


def test_vle_run_exits_cleanly_on_sigint(tiny_artifact, tmp_path):
    binary = vle_run_binary()
    Image.fromarray(IMG).save(tmp_path / "img.png")
    # --bench repeats the request far longer than the wait: the signal lands inside one of them.
    proc = subprocess.Popen(
        [str(binary), str(tiny_artifact), "--image", str(tmp_path / "img.png"), "--prompt", "what is it?",
         "--max-new-tokens", "8", "--threads", "1", "--bench", "--repeat", "1000000"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )
    time.sleep(3)
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 130, (proc.returncode, out, err)
    assert err.startswith("vle-run: interrupted (SIGINT): the request was interrupted "), err
