"""data_pipeline/shapes.py: the procedural demo dataset is deterministic and checkable."""

from __future__ import annotations

import itertools

import numpy as np
import pytest

from data_pipeline import shapes


def test_same_seed_same_pixels_other_seed_other_data():
    a = [np.asarray(img) for _, img, _, _ in shapes.generate(8, size=48, seed=5)]
    b = [np.asarray(img) for _, img, _, _ in shapes.generate(8, size=48, seed=5)]
    c = [cap for _, _, cap, _ in shapes.generate(8, size=48, seed=6)]
    assert all(np.array_equal(x, y) for x, y in zip(a, b))
    assert c != [cap for _, _, cap, _ in shapes.generate(8, size=48, seed=5)]


def test_key_gives_ground_truth_and_caption():
    for key, _, caption, scene in shapes.generate(50, size=16, seed=11):
        assert shapes.attributes_for_key(key) == scene
        assert caption == scene.caption
        for obj in scene.objects:
            assert obj.shape in caption
            assert (obj.colour in caption) == ("colour" in scene.says)
            assert (f" {obj.size} " in f" {caption} ") == ("size" in scene.says)
    with pytest.raises(ValueError, match="not a shapes-dataset key"):
        shapes.parse_key("img_0001")


def test_captions_leave_attributes_open_as_real_ones_do():
    scenes = [scene for _, _, _, scene in shapes.generate(3000, size=8, seed=4)]
    two = [s for s in scenes if len(s.objects) == 2]
    one = [s for s in scenes if len(s.objects) == 1]
    assert abs(len(two) / len(scenes) - shapes.TWO_OBJECT_SHARE) < 0.03
    for attribute, odds in shapes.SAYS_ODDS.items():
        assert abs(np.mean([attribute in s.says for s in one]) - odds) < 0.04
    # two objects: small, different colours, one in each half of a layout, colours always named
    for s in two:
        a, b = s.objects
        assert a.size == b.size == "small" and a.colour != b.colour and "colour" in s.says
        assert tuple(sorted((a.position, b.position))) in {tuple(sorted(x)) for x in shapes.TWO_OBJECT_LAYOUTS}
        assert " and " in s.caption
    assert shapes.ShapeAttributes("orange", "star", "large", "top").phrase(("colour",)) == "an orange star"


def test_every_attribute_value_occurs():
    seen = [o for _, _, _, scene in shapes.generate(400, size=8, seed=0) for o in scene.objects]
    assert {a.colour for a in seen} == set(shapes.COLOURS)
    assert {a.shape for a in seen} == set(shapes.SHAPES)
    assert {a.size for a in seen} == set(shapes.SIZES)
    assert {a.position for a in seen} == set(shapes.POSITIONS)


def test_backgrounds_are_lit_but_stay_dark():
    _, img, _, _ = shapes.sample(0, 3, 64)
    arr = np.asarray(img, np.float32)
    corners = [arr[1, 1], arr[1, -2], arr[-2, 1], arr[-2, -2]]
    spread = max(np.abs(c - d).max() for c in corners for d in corners)
    assert 2 <= spread <= 2 * shapes.LIGHT_LEVELS + 1
    flat = np.asarray(shapes.render(shapes.ShapeAttributes("red", "star", "small", "left"), 64))
    assert (flat[0] == shapes.BACKGROUND).all()


def test_palette_is_far_apart():
    for (_, a), (_, b) in itertools.combinations(shapes.COLOURS.items(), 2):
        assert np.linalg.norm(np.subtract(a, b)) > 110
    for c in shapes.COLOURS.values():
        assert np.linalg.norm(np.subtract(c, shapes.BACKGROUND)) > 150


@pytest.mark.parametrize("size", [32, 64, 200])
def test_measure_reads_colour_size_position_back(size):
    wrong = 0
    for _, img, _, scene in shapes.generate(150, size=size, seed=2):
        if len(scene.objects) != 1:
            continue
        attrs, got = scene.only, shapes.measure(img)
        wrong += got != {"colour": attrs.colour, "size": attrs.size, "position": attrs.position}
    assert wrong <= (2 if size == 32 else 0)


def test_held_out_pairs_are_excluded_unless_asked():
    plain = {(a.colour, a.shape) for *_, s in shapes.generate(600, size=8, seed=1, exclude_held_out=False) for a in s.objects}
    assert plain & shapes.HELD_OUT_PAIRS  # they exist in the full distribution
    kept = {(a.colour, a.shape) for *_, s in shapes.generate(600, size=8, seed=1) for a in s.objects}
    assert not kept & shapes.HELD_OUT_PAIRS


def test_render_any_resolution():
    attrs = shapes.ShapeAttributes("red", "star", "large", "center")
    for size in (8, 33, 256):
        img = shapes.render(attrs, size)
        assert img.size == (size, size) and img.mode == "RGB"
    assert shapes.measure(shapes.render(attrs, 128))["colour"] == "red"
