"""What the Python fuzzing harnesses (fuzz/python/) found, one test per fault, each with the input that found
it (reduced by hand to what the fault needs) and the named error or the answer it gets now. In the style of
tests/test_hostile.py: every case asserts the error's text, or that the unusual input answers exactly as its
plain equivalent does.
"""

from __future__ import annotations

import tracemalloc

import numpy as np
import pytest
from conftest import scene
from PIL import Image
from visionllm_edge import Pipeline
from visionllm_edge.images import MAX_IMAGE_PIXELS, load_image
from visionllm_edge.manifest import ManifestError, load_manifest
from visionllm_edge.results import Detection, Pose, Result, SemanticMap
from visionllm_edge.visualize import draw_result

IMG = scene(0, 64, 48)


@pytest.fixture(scope="module")
def pipe(tiny_artifact) -> Pipeline:
    return Pipeline.load(tiny_artifact, threads=1, max_context=256)


def peak_bytes(call) -> int:
    """The most memory Python and numpy held at once during `call()` (numpy reports to tracemalloc)."""
    tracemalloc.start()
    try:
        call()
    except ValueError:
        pass
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    return peak


# --- images (fuzz_images) --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "shape, dtype, message",
    [
        (
            (16384, 10923, 3),
            np.uint8,
            r"image is 10923x16384 = 178962432 pixels; the most allowed is 178956970",
        ),
        (
            (16384, 10923),
            np.uint16,
            r"image is 10923x16384 = 178962432 pixels; the most allowed is 178956970",
        ),
        ((1, 100000, 4), np.uint8, r"image is 100000x1; the largest side allowed is 16384"),
    ],
    ids=["rgb", "gray-16-bit", "rgba-one-row"],
)
def test_a_broadcast_array_over_the_cap_is_refused_before_it_is_copied(shape, dtype, message):
    # Found as an OOM kill: np.broadcast_to gives an array of any size with no memory behind it, and the
    # array path made its contiguous RGB copy (here 537 MB; 20 GB in the fuzzer's case) before the size check.
    image = np.broadcast_to(np.zeros((1,) * len(shape), dtype), shape)
    assert shape[0] * shape[1] > MAX_IMAGE_PIXELS or max(shape[:2]) > 16384
    with pytest.raises(ValueError, match=message):
        load_image(image)
    assert peak_bytes(lambda: load_image(image)) < 1 << 20


def test_16_bit_images_convert_in_integers_to_what_the_float_formula_gave():
    # The conversion took float64 (8 bytes a pixel, four times a 16-bit picture); it is v // 257 of v clipped
    # to 16 bits now, equal to the truncated clip(v / 257, 0, 255) for every value.
    values = np.arange(65536, dtype=np.uint16).reshape(256, 256)
    # I;16, and I (32-bit) with values below 0 and above 65535 (clipped)
    for pil in (Image.fromarray(values), Image.fromarray(values.astype(np.int32) * 2 - 300)):
        expected = np.clip(np.asarray(pil).astype(np.float64) / 257.0, 0, 255).astype(np.uint8)
        assert (np.asarray(load_image(pil)) == expected[:, :, None]).all(), pil.mode
    big = Image.fromarray(np.zeros((1000, 1000), np.uint16))
    assert peak_bytes(lambda: load_image(big)) < 8 * 1000 * 1000  # float64 alone took 8 MB


# --- results and drawing (fuzz_results) ------------------------------------------------------------------


def test_a_keypoint_far_off_the_picture_is_left_out_of_the_drawing():
    # ImageDraw.text at x = 1e30 raised "SystemError: <method 'draw_bitmap' of 'ImagingDraw' objects>
    # returned a result with an exception set" (Pillow takes C longs). Such a keypoint now draws as a
    # non-finite one does: not at all.
    def drawn(keypoint):
        pose = Pose(
            "person", 0.9, (2.0, 2.0, 30.0, 30.0), np.array([keypoint, [10.0, 10.0, 1.0]]), ["a", "b"]
        )
        return draw_result(IMG, Result(poses=[pose]))

    far = drawn([1e30, 5.0, 1.0])
    assert far.shape == IMG.shape and far.dtype == np.uint8
    assert (far == drawn([np.nan, np.nan, 1.0])).all()
    assert not (drawn([20.0, 20.0, 1.0]) == far).all()  # a keypoint on the picture is drawn


def test_a_label_map_or_mask_that_is_not_2_d_is_named():
    # Image.fromarray raised "IndexError: tuple index out of range" on a 1-D label map.
    seg = Result(segmentation=SemanticMap(np.zeros(5, np.int32), ["a"]))
    with pytest.raises(
        ValueError, match=r"segmentation.label_map: expected an H x W array, got shape \(5,\)"
    ):
        draw_result(IMG, seg)
    det = Result(detections=[Detection("a", "det", 0.5, (1, 1, 5, 5), np.zeros((2, 3, 4), bool))])
    with pytest.raises(
        ValueError, match=r"detections\[0\].mask: expected an H x W array, got shape \(2, 3, 4\)"
    ):
        draw_result(IMG, det)


def test_the_area_of_a_mask_of_any_dtype_is_its_pixels_set():
    # int(mask.sum()) raised "OverflowError: cannot convert float infinity to integer" for a float mask
    # holding inf, in to_dict and in str(result).
    mask = np.array([[np.inf, 0.0], [1.5, np.nan]])
    r = Result(detections=[Detection("a", "det", 0.5, (0.0, 0.0, 2.0, 2.0), mask)])
    assert r.to_dict()["detections"][0]["mask_area"] == 3  # inf, 1.5 and NaN are non-zero
    assert "mask=3px" in str(r)
    bool_mask = Result(detections=[Detection("a", "det", 0.5, (0.0, 0.0, 2.0, 2.0), mask != 0)])
    assert bool_mask.to_dict()["detections"][0]["mask_area"] == 3


# --- the manifest (fuzz_manifest) ------------------------------------------------------------------------


def test_a_manifest_that_is_not_utf_8_is_a_manifest_error_quoting_the_byte(tmp_path):
    # The two bytes ff 36: the parser's message quotes what it read, and the translation of the message to a
    # Python str failed ("UnicodeDecodeError: 'utf-8' codec can't decode byte 0xff in position 154"),
    # taking the place of the ManifestError. Every error of the core now comes with such bytes escaped.
    (tmp_path / "manifest.json").write_bytes(b"\xff6")
    with pytest.raises(ManifestError, match=r"manifest\.json: invalid JSON at line 1, column 1: .*'\\xff'"):
        load_manifest(tmp_path)


# --- requests (fuzz_pipeline) ----------------------------------------------------------------------------

REQUEST_CASES = [
    ("region-of-strings", lambda p: p(IMG, "<region>?", regions=[("a", "b", "c", "d")]), ValueError,
     r"region: expected a mask, a 4-number box or a 2-number point, got \('a', 'b', 'c', 'd'\)"),
    ("region-past-float", lambda p: p(IMG, "<region>?", regions=[(10**400, 1)]), ValueError,
     r"region: expected a mask, a 4-number box or a 2-number point, got \(1000000000"),
    ("history-not-a-list", lambda p: p(IMG, "hi", history=5), TypeError,
     r"history must be a list of \(user, assistant\) pairs, got 5"),
    ("history-turn-a-number", lambda p: p(IMG, "hi", history=[7]), ValueError,
     r"history\[0\]: expected a \(user, assistant\) pair, got 7"),
    ("history-turn-none", lambda p: p.detect(IMG, ["a"], history=[None]), ValueError,
     r"history\[0\]: expected a \(user, assistant\) pair, got None"),
    ("resized-hw-over-int64", lambda p: p.detect(IMG, ["a"], det_image=det_input(p, resized_hw=(2**63, 58))),
     ValueError, r"det_image\['resized_hw'\]: expected two positive ints \(h, w\), got \(922337203685477580"),
    ("resized-hw-infinite", lambda p: p.detect(IMG, ["a"], det_image=det_input(p, resized_hw=(14, -np.inf))),
     ValueError, r"det_image\['resized_hw'\]: expected two positive ints \(h, w\), got \(14, -inf\)"),
    ("resized-hw-negative", lambda p: p.detect(IMG, ["a"], det_image=det_input(p, resized_hw=(-4, -4))),
     ValueError, r"det_image\['resized_hw'\]: expected two positive ints \(h, w\), got \(-4, -4\)"),
    ("det-image-missing-key", lambda p: p.detect(IMG, ["a"], det_image={"pixel_values": np.zeros(3)}),
     ValueError, r"det_image: expected pixel_values, pixel_mask \(and resized_hw\), got \['pixel_values'\]"),
    ("det-image-nan-pixels", lambda p: p.detect(IMG, ["a"], det_image=det_input(p, nan=True)), ValueError,
     r"det_image\['pixel_values'\] is not finite: NaN at element 0 of 36864"),
    ("det-image-nan-pixels-pose", lambda p: p.pose(IMG, ["nose"], det_image=det_input(p, nan=True)),
     ValueError, r"det_image\['pixel_values'\] is not finite: NaN at element 0 of 36864"),
]  # fmt: skip


def det_input(p: Pipeline, resized_hw=None, nan: bool = False) -> dict:
    pixels, mask, resized = p.detection_input(IMG)
    if nan:
        pixels = pixels.copy()
        pixels[0, 0, 0, 0] = np.nan
    return {
        "pixel_values": pixels,
        "pixel_mask": mask,
        "resized_hw": resized if resized_hw is None else resized_hw,
    }


@pytest.mark.parametrize(
    "call, error, message", [c[1:] for c in REQUEST_CASES], ids=[c[0] for c in REQUEST_CASES]
)
def test_bad_request_options_are_named(pipe, call, error, message):
    # Were: "could not convert string to float: 'a'" and "OverflowError: int too large to convert to
    # float" for regions; "TypeError: object of type 'int' has no len()"; pybind11's "RuntimeError: Unable
    # to cast Python instance of type <class 'tuple'> to C++ type '?'"; "OverflowError: cannot convert float
    # infinity to integer"; a KeyError; and for NaN pixels ONNX Runtime's "GatherElements op: Out of range
    # value in index tensor" as a RuntimeError from the object decoder.
    with pytest.raises(error, match=message):
        call(pipe)


ELONGATED = np.zeros((3, 32, 3), np.uint8)  # pads to 32 x 160 for the decoders: 108 encoder tokens
TOO_FEW_TOKENS = (
    r"pose: the decoder's image of 160x32 pixels gives 108 encoder tokens, fewer than the 120 its top-k "
    r"takes \(facts.min_encoder_tokens\): the picture is too small or too elongated"
)


def test_a_picture_too_elongated_for_the_keypoint_decoder_is_named(pipe, tiny_artifact):
    # Found as the fuzzer's pose request with no image and a 3 x 32 det_image: ONNX Runtime's "TopK node ...
    # k argument [120] should not be greater than specified axis dim value [108]" as a RuntimeError. The
    # request's own image reaches the same graph input (a pipeline whose arena holds the prompt's patches).
    with pytest.raises(ValueError, match=TOO_FEW_TOKENS):
        pipe.pose(None, ["x"], det_image=ELONGATED)
    with pytest.raises(ValueError, match=TOO_FEW_TOKENS):
        Pipeline.load(tiny_artifact, threads=1).pose(ELONGATED, ["x"])
    assert pipe.detect(ELONGATED, ["x"]).stop_reason  # the object decoder takes fewer tokens: it answers
    assert pipe.pose(np.zeros((1, 1, 3), np.uint8), ["x"]).stop_reason  # 96 x 96: 193 tokens


def test_a_prepared_det_image_still_answers_as_the_pipeline_prepares_it(pipe):
    # The checks above refuse only what is wrong: the pipeline's own input, passed back, answers as before.
    # Each detection runs on a freshly encoded frame (a repeated frame reuses KV rows, which may move the
    # last bits), so equal inputs must give equal answers.
    def detect(**kw):
        pipe(scene(99, 32, 32), "x", answer="ok")
        return [(d.label, d.score, d.box_xyxy) for d in pipe.detect(IMG, ["circle"], **kw).detections]

    want = detect()
    assert want
    assert detect(det_image=det_input(pipe)) == want


def test_an_option_of_the_wrong_type_is_named_even_when_its_shown_value_is_cut_inside_a_character(pipe):
    # The value's repr is cut to 80 bytes; cut inside a character, the message was invalid UTF-8 and Python
    # raised UnicodeDecodeError in place of the TypeError (found by fuzz_pipeline with a seed of CJK text).
    seed = "櫺" * 40  # 3 bytes each: 80 bytes of repr end inside the 27th
    with pytest.raises(TypeError, match=r"request option 'seed' must be .*, got str '櫺{26}\.\.\.$"):
        pipe(IMG, "what is it?", seed=seed, max_new_tokens=2)
