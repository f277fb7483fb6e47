"""The C++ image pre- and post-processing (`_core`) against the reference (export/preprocess.py, the
post-processing of export/reference.py) and against PIL / NumPy.

Preprocessing is bit-exact: PIL's resampling is replicated operation for operation, including the pass
order Pillow 13 picks. Post-processing matches the reference's float32 results; a mask pixel may differ
only where the reference's probability is within 1e-5 of the threshold, a semantic-map pixel only where two
classes (or the best class and the threshold) are within float rounding of each other.
"""

from __future__ import annotations

import functools
import types

import numpy as np
import PIL
import pytest
import torch
from PIL import Image
from visionllm_edge import _core, contract
from visionllm_edge.export import preprocess as pp
from visionllm_edge.export.reference import PostProcessSettings, ReferencePipeline, _nms
from visionllm_edge.results import Detection, Link, Result

PILLOW_13 = int(PIL.__version__.split(".")[0]) >= 13

RESIZES = {
    "bicubic": (Image.BICUBIC, _core.resize_bicubic),
    "bilinear": (Image.BILINEAR, _core.resize_bilinear),
}


def _image(rng, h, w):
    return rng.integers(0, 256, (h, w, 3), dtype=np.uint8)


def _resize_pairs() -> list[tuple[tuple[int, int], tuple[int, int]]]:
    """(w, h) -> (out_w, out_h): edge cases (1 pixel, identity, one axis, extreme ratios, both pass orders)
    and random pairs."""
    pairs = [
        ((1, 1), (5, 7)),
        ((1, 1), (1, 1)),
        ((3, 2), (1, 1)),
        ((100, 1), (1, 100)),
        ((1, 300), (17, 1)),
        ((1000, 7), (3, 700)),
        ((37, 53), (1000, 20)),  # wider and much shorter: Pillow 13 resamples vertically first
        ((29, 142), (22, 128)),  # height shrinks exactly twice the width: horizontal first
        ((29, 142), (22, 127)),  # one row more: vertical first
        ((512, 512), (512, 256)),
        ((512, 512), (256, 512)),
        ((333, 444), (333, 444)),
        ((640, 480), (672, 336)),  # a 2x1 anyres grid
        ((1333, 2000), (533, 800)),
        ((2, 2), (999, 999)),
        ((4000, 3), (7, 600)),
    ]
    rng = np.random.default_rng(1234)
    for _ in range(30):
        w, h, ow, oh = (int(v) for v in rng.integers(1, 300, 4))
        pairs.append(((w, h), (ow, oh)))
    return pairs


# --- preprocessing ---------------------------------------------------------------------------------------


@pytest.mark.skipif(
    not PILLOW_13, reason="the pass-order rule replicated is Pillow 13's (python-pillow#9549)"
)
@pytest.mark.parametrize("name", sorted(RESIZES))
def test_resize_matches_pil_bit_exact(name):
    pil_filter, resize = RESIZES[name]
    rng = np.random.default_rng(7)
    worst, exact, total = 0, 0, 0
    for (w, h), (ow, oh) in _resize_pairs():
        img = _image(rng, h, w)
        want = np.asarray(Image.fromarray(img).resize((ow, oh), pil_filter))
        got = resize(img, ow, oh)
        assert got.shape == want.shape == (oh, ow, 3) and got.dtype == np.uint8
        diff = np.abs(got.astype(np.int16) - want.astype(np.int16))
        worst = max(worst, int(diff.max()))
        exact += int((diff == 0).sum())
        total += diff.size
    print(f"{name}: {len(_resize_pairs())} pairs, max |diff| {worst}, exact {exact / total:.6f}")
    assert worst == 0, f"{name}: max |diff| {worst}, exact fraction {exact / total:.6f}"


@pytest.mark.skipif(
    not PILLOW_13, reason="the pass-order rule replicated is Pillow 13's (python-pillow#9549)"
)
def test_resize_reads_strided_views_in_place():
    rng = np.random.default_rng(3)
    big = _image(rng, 120, 160)
    for view in (big[:, :, ::-1], big[10:90:2, 5:150:3], big[::-1, ::-1], big.transpose(1, 0, 2)):
        want = np.asarray(Image.fromarray(np.ascontiguousarray(view)).resize((57, 41), Image.BICUBIC))
        np.testing.assert_array_equal(_core.resize_bicubic(view, 57, 41), want)


@pytest.mark.parametrize(
    "size", [(640, 480), (336, 336), (100, 1000), (1000, 90), (1, 1), (700, 3), (337, 335)]
)
def test_clip_tiles_match_reference(size):
    w, h = size
    img = _image(np.random.default_rng(w * h), h, w)
    want, (cols, rows) = pp.anyres_tiles(Image.fromarray(img), 336, 4)
    assert _core.choose_anyres_grid(w, h, 336, contract.anyres_candidates(4)) == (cols, rows)
    got = _core.clip_tiles(img, cols, rows, 336, pp.CLIP_MEAN, pp.CLIP_STD)
    assert got.dtype == np.float32 and got.shape == tuple(want.shape)
    np.testing.assert_array_equal(got, want.numpy())


@pytest.mark.parametrize(
    "size", [(640, 480), (800, 800), (100, 1000), (1000, 90), (1, 1), (4000, 3), (1333, 799)]
)
def test_detection_input_matches_reference(size):
    w, h = size
    img = _image(np.random.default_rng(w + h), h, w)
    want_pixels, want_mask, want_hw = pp.detection_image(Image.fromarray(img), 800, 1333)
    pixels, mask, resized = _core.detection_input(img, 800, 1333, pp.IMAGENET_MEAN, pp.IMAGENET_STD)
    assert resized == want_hw
    assert pixels.dtype == np.float32 and mask.dtype == np.bool_
    np.testing.assert_array_equal(pixels, want_pixels.numpy())
    np.testing.assert_array_equal(mask, want_mask.numpy())


def test_detection_input_pads_into_a_bucket():
    img = _image(np.random.default_rng(0), 480, 640)
    ref_pixels, ref_mask, (rh, rw) = _core.detection_input(img, 800, 1333, pp.IMAGENET_MEAN, pp.IMAGENET_STD)
    pixels, mask, resized = _core.detection_input(
        img, 800, 1333, pp.IMAGENET_MEAN, pp.IMAGENET_STD, pad_to=(1344, 1344)
    )
    assert resized == (rh, rw) and pixels.shape == (1, 3, 1344, 1344) and mask.shape == (1, 1344, 1344)
    np.testing.assert_array_equal(pixels[..., :rh, :rw], ref_pixels[..., :rh, :rw])
    assert not pixels[..., rh:, :].any() and not pixels[..., rw:].any()
    assert mask[0, :rh, :rw].all() and mask.sum() == rh * rw
    with pytest.raises(
        ValueError, match=r"pad_to \(800, 1000\) is smaller than the resized image \(800, 1067\)"
    ):
        _core.detection_input(img, 800, 1333, pp.IMAGENET_MEAN, pp.IMAGENET_STD, pad_to=(800, 1000))


def test_region_masks_match_reference():
    rng = np.random.default_rng(5)
    for w, h in [(640, 480), (7, 300), (336, 336), (1000, 1)]:
        boxes = [(0, 0, w, h), (w * 0.1, h * 0.2, w * 0.3, h * 0.9), (0.0, 0.0, 0.01, 0.01 * h)]
        for box in boxes:
            want = pp.region_mask(box, (w, h), 336).numpy()
            np.testing.assert_array_equal(_core.region_mask_box(box, (w, h), 336), want)
        for point in [(0, 0), (w - 1e-3, h - 1e-3), (w / 3, h / 2)]:
            want = pp.region_mask(point, (w, h), 336).numpy()
            np.testing.assert_array_equal(_core.region_mask_point(point, (w, h), 336), want)
        mask = rng.random((h, w)) > 0.7
        mask[0, 0] = True
        for m in (mask, mask[::-1]):
            want = pp.region_mask(m, (w, h), 336).numpy()
            np.testing.assert_array_equal(_core.region_mask_mask(m, (w, h), 336), want)


def test_region_mask_errors_name_the_problem():
    with pytest.raises(ValueError, match=r"box \(10, 0, 5, 4\) is empty or outside the 20x10 image"):
        _core.region_mask_box((10, 0, 5, 4), (20, 10), 336)
    with pytest.raises(ValueError, match=r"point \(20, 3\) is outside the 20x10 image"):
        _core.region_mask_point((20, 3), (20, 10), 336)
    with pytest.raises(ValueError, match=r"expected shape \(10, 20\) \(the image\), got \(10, 21\)"):
        _core.region_mask_mask(np.ones((10, 21), bool), (20, 10), 336)
    with pytest.raises(ValueError, match="region mask is empty"):
        _core.region_mask_mask(np.zeros((10, 20), bool), (20, 10), 336)
    with pytest.raises(TypeError, match="region_mask_mask: mask: expected dtype bool, got uint8"):
        _core.region_mask_mask(np.ones((10, 20), np.uint8), (20, 10), 336)


# --- post-processing -------------------------------------------------------------------------------------


def _reference_topk(logits: np.ndarray, k: int, threshold: float):
    """The reference's `[DET]` candidates: sort by (-score, group, query), top k, then the threshold."""
    probs = torch.from_numpy(logits).sigmoid()
    cands = [(float(probs[q, g]), g, q) for g in range(logits.shape[1]) for q in range(logits.shape[0])]
    cands.sort(key=lambda c: (-c[0], c[1], c[2]))
    return [c for c in cands[:k] if c[0] >= threshold]


def _assert_same_topk(got, want):
    """Same (class, query) pairs in the same order; scores equal up to torch's vectorised exp (1 ulp)."""
    scores, queries, classes = got
    assert [(int(c), int(q)) for c, q in zip(classes, queries)] == [(c, q) for _, c, q in want]
    np.testing.assert_allclose(scores, [s for s, _, _ in want], rtol=1e-6, atol=0)


def test_topk_query_class_matches_reference_order():
    rng = np.random.default_rng(11)
    logits = rng.standard_normal((40, 5)).astype(np.float32)
    logits[3, :] = logits[7, :] = 1.25  # exact ties across queries and classes
    logits[:, 4] = -np.inf  # the decoder's unused class slots
    for k, threshold in [(300, 0.0), (10, 0.3), (25, 0.5), (0, 0.0), (5, 0.99)]:
        got = _core.topk_query_class(logits, k, threshold)
        assert got[0].dtype == np.float32 and got[1].dtype == got[2].dtype == np.int64
        _assert_same_topk(got, _reference_topk(logits, k, threshold))
    # Column slices are read in place (no copy): the group columns of a wider decoder output.
    got = _core.topk_query_class(logits[:, 1:3], 20, 0.2)
    _assert_same_topk(got, _reference_topk(np.ascontiguousarray(logits[:, 1:3]), 20, 0.2))


def test_topk_query_major_is_the_pose_order():
    rng = np.random.default_rng(12)
    logits = rng.standard_normal((50, 3)).astype(np.float32)
    logits[10, :] = logits[2, :] = 0.5
    flat = torch.from_numpy(logits).sigmoid().flatten()
    order = torch.argsort(flat, descending=True, stable=True)[:20].tolist()
    want = [(float(flat[i]), *divmod(i, 3)) for i in order if float(flat[i]) >= 0.4]  # (score, query, class)
    scores, queries, classes = _core.topk_query_class(logits, 20, 0.4, query_major=True)
    _assert_same_topk((scores, classes, queries), want)


def test_boxes_to_pixels_match_reference_floats():
    rng = np.random.default_rng(13)
    boxes = rng.random((17, 4)).astype(np.float32)
    got = _core.boxes_cxcywh_to_xyxy(boxes, 640, 480)
    assert got.dtype == np.float64 and got.shape == (17, 4)
    for row, (cx, cy, bw, bh) in zip(got, boxes.tolist()):
        assert tuple(row) == (
            (cx - bw / 2) * 640,
            (cy - bh / 2) * 480,
            (cx + bw / 2) * 640,
            (cy + bh / 2) * 480,
        )


def _numpy_nms(boxes, scores, labels, iou):
    """Plain class-aware greedy NMS."""
    keep = []
    for i in np.argsort(-scores, kind="stable"):
        suppressed = False
        for j in keep:
            if labels[i] != labels[j]:
                continue
            x0, y0 = np.maximum(boxes[i, :2], boxes[j, :2])
            x1, y1 = np.minimum(boxes[i, 2:], boxes[j, 2:])
            inter = max(0.0, x1 - x0) * max(0.0, y1 - y0)
            area = (boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1])
            union = area[i] + area[j] - inter
            if union > 0 and inter / union > iou:
                suppressed = True
                break
        if not suppressed:
            keep.append(int(i))
    return keep


def test_nms_matches_numpy_and_reference():
    rng = np.random.default_rng(14)
    xy = rng.random((60, 2)) * 100
    boxes = np.concatenate([xy, xy + 5 + rng.random((60, 2)) * 40], axis=1)
    scores = rng.random(60).astype(np.float32)
    scores[5] = scores[9] = scores[20]  # ties keep input order
    labels = rng.integers(0, 3, 60).astype(np.int64)
    for iou in (0.0, 0.3, 0.5, 0.9):
        want = _numpy_nms(boxes, scores.astype(np.float64), labels, iou)
        for b, s in [(boxes, scores), (boxes.astype(np.float32), scores), (boxes, scores.astype(np.float64))]:
            assert _core.nms_class_aware(b, s, labels, iou).tolist() == _numpy_nms(
                b.astype(np.float64), s.astype(np.float64), labels, iou
            )
        assert _core.nms_class_aware(boxes, scores, labels, iou).tolist() == want
        dets = [
            Detection(f"c{c}", "det", float(s), tuple(b)) for b, s, c in zip(boxes.tolist(), scores, labels)
        ]
        kept = _nms(dets, iou)
        assert [dets.index(d) for d in kept] == want


def _prep(resized_hw, image_size, padded_hw=None):
    pixels = None if padded_hw is None else torch.zeros(1, 3, *padded_hw)
    return types.SimpleNamespace(det_resized=resized_hw, image_size=image_size, det_pixels=pixels)


def _assert_masks_match(got: np.ndarray, prob: np.ndarray, threshold: float):
    """Equal to `prob > threshold`, except where the reference's probability is within 1e-5 of it."""
    differ = got != (prob > threshold)
    assert not differ.any() or np.abs(prob[differ] - threshold).max() < 1e-5, (
        f"{int(differ.sum())} mask pixels differ away from the threshold"
    )


@pytest.mark.parametrize(
    "mask_hw, resized_hw, image_size",
    [
        ((20, 25), (80, 100), (200, 160)),  # original larger than the resized image
        ((8, 8), (29, 31), (13, 17)),  # smaller, odd sizes
        ((8, 8), (32, 32), (32, 32)),  # no crop, no second resize
        ((25, 34), (100, 133), (133, 100)),  # crop only
        ((200, 334), (800, 1333), (640, 480)),  # a real 800 x 1333 detection image
        ((1, 1), (3, 2), (1, 5)),
    ],
)
def test_masks_to_image_match_reference(mask_hw, resized_hw, image_size):
    rng = np.random.default_rng(sum(mask_hw))
    logits = (rng.standard_normal((3, *mask_hw)) * 4).astype(np.float32)
    logits[1] = 0.0  # every pixel exactly at the threshold: the boundary case
    prob = ReferencePipeline._mask_to_image(None, torch.from_numpy(logits), _prep(resized_hw, image_size))
    prob = prob.sigmoid().numpy()
    w, h = image_size
    got = _core.masks_to_image(logits, resized_hw, (h, w), 0.5)
    assert got.dtype == np.bool_ and got.shape == (3, h, w)
    _assert_masks_match(got, prob, 0.5)
    # A strided view (one query out of the decoder's stack) gives the same masks.
    np.testing.assert_array_equal(_core.masks_to_image(logits[::2], resized_hw, (h, w), 0.5), got[::2])


def _reference_semantic_map(class_logits, mask_logits, resized_hw, image_size, threshold):
    fake = types.SimpleNamespace(post=PostProcessSettings(seg_score_threshold=threshold))
    fake._mask_to_image = functools.partial(ReferencePipeline._mask_to_image, fake)
    groups = [(c, types.SimpleNamespace(label=f"c{c}"), 0, c) for c in range(class_logits.shape[1])]
    obj = {"logits": class_logits[None], "pred_masks": mask_logits[None]}
    return ReferencePipeline._semantic_map(fake, groups, obj, _prep(resized_hw, image_size)).label_map


def test_semantic_map_matches_reference():
    rng = np.random.default_rng(21)
    for queries, classes, mask_hw, resized_hw, image_size, threshold in [
        (30, 3, (20, 25), (80, 100), (160, 200), 0.3),
        (12, 1, (8, 8), (29, 31), (17, 13), 2.0),  # a single class, about 15 % below the threshold
        (40, 4, (25, 34), (100, 133), (400, 300), 10.0),  # about 25 % below the threshold
    ]:
        class_logits = (rng.standard_normal((queries, classes)) * 2).astype(np.float32)
        mask_logits = (rng.standard_normal((queries, *mask_hw)) * 4).astype(np.float32)
        want = _reference_semantic_map(class_logits, mask_logits, resized_hw, image_size, threshold)
        w, h = image_size
        got = _core.semantic_map(class_logits, mask_logits, resized_hw, (h, w), threshold)
        assert got.dtype == np.int32 and got.shape == (h, w)
        assert set(np.unique(got)) <= set(range(-1, classes))
        differ = got != want
        # Any difference must be a float-rounding tie: recompute the per-class sums in float64.
        if differ.any():
            prob = ReferencePipeline._mask_to_image(
                None, torch.from_numpy(mask_logits), _prep(resized_hw, image_size)
            )
            sums = np.einsum(
                "qc,qhw->chw", 1 / (1 + np.exp(-class_logits.astype(np.float64))), prob.sigmoid().double()
            )
            top = np.sort(sums[:, differ], axis=0)
            near_tie = (top[-1] - (top[-2] if classes > 1 else -np.inf) < 1e-4) | (
                np.abs(top[-1] - threshold) < 1e-4
            )
            assert near_tie.all(), f"{int(differ.sum())} label pixels differ away from a tie"
        assert (got == -1).any() == (threshold > 1) and (got >= 0).any()


def _fake_pipeline(post: PostProcessSettings):
    """A ReferencePipeline stand-in with just what `_postprocess` reads, so its post-processing runs alone."""
    fake = types.SimpleNamespace(post=post, config=types.SimpleNamespace(official={"gdino_config": {}}))
    for name in ("_mask_to_image", "_detection", "_semantic_map"):
        setattr(fake, name, functools.partial(getattr(ReferencePipeline, name), fake))
    return fake


def test_detection_chain_matches_reference_postprocess():
    """topk -> boxes -> masks -> NMS in C++ gives the reference's `[DET]` detections."""
    rng = np.random.default_rng(31)
    queries, groups = 60, 2
    logits = np.full((1, queries, 8), -np.inf, np.float32)
    logits[0, :, :groups] = rng.standard_normal((queries, groups)).astype(np.float32) * 2
    xy = rng.random((queries, 2)) * 0.6 + 0.2
    boxes = np.concatenate([xy, 0.1 + rng.random((queries, 2)) * 0.3], axis=1).astype(np.float32)[None]
    masks = (rng.standard_normal((1, queries, 20, 25)) * 3).astype(np.float32)
    image_size, resized_hw = (200, 160), (80, 100)
    post = PostProcessSettings(det_top_k=15, det_score_threshold=0.4, nms_iou=0.3)
    links = [Link("det", "cat", 0), Link("det", "dog", 1)]
    result = Result()
    raw = {"object": {"logits": logits, "pred_boxes": boxes, "pred_masks": masks}}
    ReferencePipeline._postprocess(_fake_pipeline(post), links, raw, _prep(resized_hw, image_size), result)

    scores, q, c = _core.topk_query_class(logits[0, :, :groups], post.det_top_k, post.det_score_threshold)
    xyxy = _core.boxes_cxcywh_to_xyxy(boxes[0][q], *image_size)
    keep = _core.nms_class_aware(xyxy, scores, c, post.nms_iou)
    w, h = image_size
    got_masks = _core.masks_to_image(masks[0][q[keep]], resized_hw, (h, w), post.mask_threshold)
    assert len(q) > len(keep) == len(result.detections) > 3  # NMS dropped some
    for det, i, mask in zip(result.detections, keep, got_masks):
        assert (det.label, det.query_index) == (links[c[i]].label, int(q[i]))
        assert det.score == pytest.approx(float(scores[i]), rel=1e-6)
        assert det.box_xyxy == tuple(xyxy[i])
        prob = ReferencePipeline._mask_to_image(
            None, torch.from_numpy(masks[0][q[i] : q[i] + 1]), _prep(resized_hw, image_size)
        )
        _assert_masks_match(mask, prob[0].sigmoid().numpy(), post.mask_threshold)


def test_pose_chain_matches_reference_postprocess():
    rng = np.random.default_rng(41)
    objects, names = 2, ["nose", "left eye", "right eye"]
    logits = np.full((1, 50, 100), -np.inf, np.float32)
    logits[0, :, :objects] = rng.standard_normal((50, objects)).astype(np.float32)
    logits[0, 7, :] = logits[0, 3, :]  # ties: the pose order is (-score, query, object)
    boxes = rng.random((1, 50, 4)).astype(np.float32)
    keypoints = rng.random((1, 50, 204)).astype(np.float32)
    image_size, resized_hw, padded_hw = (640, 480), (800, 1067), (800, 1088)
    post = PostProcessSettings(pose_top_k=20, pose_score_threshold=0.4)
    links = [Link("det", "person", 0), Link("det", "robot", 1)] + [
        Link("pose", n, 2 + i) for i, n in enumerate(names)
    ]
    result = Result()
    raw = {"pose": {"pred_logits": logits, "pred_boxes": boxes, "pred_keypoints": keypoints}}
    ReferencePipeline._postprocess(
        _fake_pipeline(post), links, raw, _prep(resized_hw, image_size, padded_hw), result
    )

    scores, q, c = _core.topk_query_class(
        logits[0, :, :objects], post.pose_top_k, post.pose_score_threshold, True
    )
    xyxy, kps = _core.keypoints_to_pixels(
        boxes[0][q], keypoints[0][q], len(names), padded_hw, resized_hw, image_size
    )
    assert kps.dtype == np.float32 and kps.shape == (len(q), len(names), 3)
    assert len(result.poses) == len(q) > 3
    for i, pose in enumerate(result.poses):
        assert (pose.label, pose.query_index) == (links[c[i]].label, int(q[i]))
        assert pose.score == pytest.approx(float(scores[i]), rel=1e-6)
        assert pose.box_xyxy == tuple(xyxy[i])
        np.testing.assert_array_equal(pose.keypoints, kps[i])


# --- bad inputs ------------------------------------------------------------------------------------------


def test_wrong_dtype_is_a_type_error_naming_the_argument():
    img = np.zeros((4, 5, 3), np.float32)
    with pytest.raises(TypeError, match="resize_bicubic: image: expected dtype uint8, got float32"):
        _core.resize_bicubic(img, 2, 2)
    with pytest.raises(TypeError, match="clip_tiles: image: expected dtype uint8, got float32"):
        _core.clip_tiles(img, 1, 1, 4, pp.CLIP_MEAN, pp.CLIP_STD)
    with pytest.raises(TypeError, match="topk_query_class: logits: expected dtype float32, got float64"):
        _core.topk_query_class(np.zeros((3, 2)), 1, 0.5)
    with pytest.raises(TypeError, match="masks_to_image: mask_logits: expected dtype float32, got float16"):
        _core.masks_to_image(np.zeros((1, 2, 2), np.float16), (8, 8), (8, 8), 0.5)
    with pytest.raises(
        TypeError, match="nms_class_aware: boxes: expected dtype float32 or float64, got int64"
    ):
        _core.nms_class_aware(np.zeros((1, 4), np.int64), np.zeros(1), np.zeros(1, np.int64), 0.5)
    with pytest.raises(TypeError, match="nms_class_aware: labels: expected dtype int64, got int32"):
        _core.nms_class_aware(np.zeros((1, 4)), np.zeros(1), np.zeros(1, np.int32), 0.5)


def test_wrong_shape_is_a_value_error_with_the_shape():
    with pytest.raises(
        ValueError, match=r"resize_bilinear: image: expected an H x W x 3 uint8 RGB array, got shape \(4, 5\)"
    ):
        _core.resize_bilinear(np.zeros((4, 5), np.uint8), 2, 2)
    with pytest.raises(
        ValueError, match=r"image: expected an H x W x 3 uint8 RGB array, got shape \(4, 5, 4\)"
    ):
        _core.detection_input(np.zeros((4, 5, 4), np.uint8), 800, 1333, pp.IMAGENET_MEAN, pp.IMAGENET_STD)
    with pytest.raises(
        ValueError, match=r"semantic_map: mask_logits: expected \[Q, h/4, w/4\] .*, got shape \(3, 4\)"
    ):
        _core.semantic_map(np.zeros((3, 2), np.float32), np.zeros((3, 4), np.float32), (8, 8), (8, 8), 0.3)
    with pytest.raises(ValueError, match="class_logits has 3 queries but mask_logits has 2"):
        _core.semantic_map(np.zeros((3, 2), np.float32), np.zeros((2, 4, 4), np.float32), (8, 8), (8, 8), 0.3)
    with pytest.raises(
        ValueError, match=r"resized_hw \(17, 8\) must be positive and within the x4 mask size \(16, 16\)"
    ):
        _core.masks_to_image(np.zeros((1, 4, 4), np.float32), (17, 8), (8, 8), 0.5)
    with pytest.raises(ValueError, match=r"boxes: expected \[n, 4\] float32 boxes, got shape \(2, 3\)"):
        _core.keypoints_to_pixels(
            np.zeros((2, 3), np.float32), np.zeros((2, 9), np.float32), 3, (8, 8), (8, 8), (8, 8)
        )
    with pytest.raises(
        ValueError,
        match=r"expected boxes \[n, 4\], scores \[n\] and labels \[n\], got boxes \(2, 4\), scores \(3,\)",
    ):
        _core.nms_class_aware(np.zeros((2, 4)), np.zeros(3), np.zeros(2, np.int64), 0.5)


def test_zero_size_image_is_a_value_error():
    for fn, args in [
        (_core.resize_bicubic, (4, 4)),
        (_core.clip_tiles, (1, 1, 4, pp.CLIP_MEAN, pp.CLIP_STD)),
        (_core.detection_input, (800, 1333, pp.IMAGENET_MEAN, pp.IMAGENET_STD)),
    ]:
        with pytest.raises(ValueError, match=r"image has zero size, shape \(0, 5, 3\)"):
            fn(np.zeros((0, 5, 3), np.uint8), *args)
    with pytest.raises(ValueError, match="out_w and out_h must be positive, got 0 and 3"):
        _core.resize_bicubic(np.zeros((2, 2, 3), np.uint8), 0, 3)
    with pytest.raises(ValueError, match=r"threshold must be in \(0, 1\)"):
        _core.masks_to_image(np.zeros((1, 2, 2), np.float32), (8, 8), (8, 8), 1.0)
