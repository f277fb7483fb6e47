"""The shapes world: determinism, annotation consistency, instruction formats and the pixel checker."""

from __future__ import annotations

import numpy as np
import pytest
from visionllm_edge import templates
from visionllm_edge.shapes import checker, world
from visionllm_edge.shapes.coco import decode_mask, encode_mask
from visionllm_edge.shapes.instructions import TASKS, make_sample, recolor, unique_description


def test_scenes_are_a_pure_function_of_seed_and_index():
    a = world.make_scene(3, 17, people=(0, 2))
    b = world.make_scene(3, 17, people=(0, 2))
    c = world.make_scene(3, 18, people=(0, 2))
    assert np.array_equal(np.asarray(a.image), np.asarray(b.image))
    assert [o.name for o in a.objects] == [o.name for o in b.objects]
    assert not np.array_equal(np.asarray(a.image), np.asarray(c.image))


@pytest.mark.parametrize("index", range(12))
def test_annotations_match_the_pixels(index):
    scene = world.make_scene(5, index, people=(1, 2))
    arr = np.asarray(scene.image).astype(int)
    assert scene.objects, "every scene has at least one object"
    for o in scene.objects:
        assert o.mask.any()
        x0, y0, x1, y1 = o.box
        ys, xs = np.nonzero(o.mask)
        assert (xs.min(), ys.min(), xs.max() + 1, ys.max() + 1) == (x0, y0, x1, y1)
        if o.color is not None:  # the visible pixels have the shape's colour
            assert np.abs(arr[o.mask] - np.array(world.COLORS[o.color])).max() == 0
        else:
            assert o.keypoints.shape == (len(world.KEYPOINTS), 3)
            assert (o.keypoints[:, :2] >= 0).all() and (o.keypoints[:, :2] <= scene.image.width).all()
    # Visible masks do not overlap: later shapes hide what they cover.
    total = sum(o.mask.astype(int) for o in scene.objects)
    assert total.max() == 1
    sem = scene.semantic_map()
    for o in scene.objects:
        assert (sem[o.mask] == world.CATEGORIES.index(o.category)).all()


def test_coco_export_round_trips_masks():
    scene = world.make_scene(1, 2, people=(1, 1))
    image, anns = scene.to_coco(7, 100)
    assert image == {"id": 7, "width": 128, "height": 128}
    assert [a["id"] for a in anns] == list(range(100, 100 + len(anns)))
    for a, o in zip(anns, scene.objects):
        assert np.array_equal(decode_mask(a["segmentation"]), o.mask)
        assert a["category_id"] == world.CATEGORIES.index(o.category) + 1
        assert ("keypoints" in a) == (o.category == world.PERSON)
    with pytest.raises(ValueError, match="counts sum"):
        decode_mask({"size": [2, 2], "counts": [1, 1]})
    with pytest.raises(ValueError, match="H x W"):
        encode_mask(np.zeros(4, bool))


def test_rle_starts_with_zeros_even_when_the_first_pixel_is_set():
    m = np.zeros((3, 4), bool)
    m[0, 0] = m[2, 3] = True
    rle = encode_mask(m)
    assert rle["counts"][0] == 0 and sum(rle["counts"]) == 12
    assert np.array_equal(decode_mask(rle), m)


@pytest.mark.parametrize("task", TASKS)
def test_samples_use_the_official_formats(task):
    for i in range(8):
        s = make_sample(task, 11, i, canonical=True)
        routing = sum(
            s.answer.count(t) + sum(a.count(t) for _q, a in s.history)
            for t in ("[DET]", "[GRD]", "[SEG]", "[POSE]", "[GEN]", "[EDIT]")
        )
        assert routing == len(s.phrases) == len(s.targets) or task in ("vqa", "caption", "region_caption")
        assert s.question.count("<region>") == len(s.regions)
        if task == "detect":
            assert (s.question, s.answer) == templates.detection(world.CATEGORIES)
        if task == "pose":
            assert (s.history, s.question, s.answer) == templates.pose(world.KEYPOINTS)
        if task == "ground":
            k = s.targets[0][0]
            assert s.phrases[0] in (unique_description(s.scene, k), s.scene.objects[k].name)
            same = [o for o in s.scene.objects if s.phrases[0] in (o.name, o.short_name, o.category)]
            assert len(same) == 1, "a referring expression names exactly one object"
    with pytest.raises(ValueError, match="unknown task"):
        make_sample("juggle", 0, 0)


def test_vqa_answers_are_true():
    for i in range(60):
        s = make_sample("vqa", 4, i)
        q, a, scene = s.question, s.answer, s.scene
        if q.startswith("How many"):
            kind = next(k for k in world.KINDS if q.startswith(f"How many {k}"))
            assert int(a) == scene.count(kind)
        elif q.startswith("Is there"):
            color, kind = q[len("Is there a ") : -1].split()
            assert (a == "yes") == any(o.color == color and o.category == kind for o in scene.shapes)


def test_the_checker_finds_every_generated_shape():
    rng = np.random.default_rng(0)
    for _ in range(40):
        kind, color = str(rng.choice(world.KINDS)), str(rng.choice(list(world.COLORS)))
        size = str(rng.choice(world.SIZES))
        image = world.single_shape_image(kind, color, size, 64, rng)
        found = checker.find_shapes(image)
        assert [(f.color, f.kind) for f in found] == [(color, kind)]
    blank = np.full((64, 64, 3), 230, np.uint8)
    assert checker.find_shapes(blank) == []


def test_edit_targets_recolour_exactly_one_shape():
    for i in range(20):
        s = make_sample("edit", 9, i)
        before, after = np.asarray(s.scene.image), np.asarray(s.image_out)
        k = s.targets[0][0]
        changed = np.any(before != after, axis=-1)
        assert np.array_equal(changed, s.scene.objects[k].mask)
        assert s.instruction.endswith(s.meta["new"])
        assert np.array_equal(np.asarray(recolor(s.scene, k, s.meta["old"])), before)
