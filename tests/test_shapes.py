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
    for key, _, caption, attrs in shapes.generate(50, size=16, seed=11):
        assert shapes.attributes_for_key(key) == attrs
        assert caption == attrs.caption
        assert caption.startswith(f"a {attrs.size} {attrs.colour} {attrs.shape} ")
    with pytest.raises(ValueError, match="not a shapes-dataset key"):
        shapes.parse_key("img_0001")


def test_every_attribute_value_occurs():
    seen = [attrs for _, _, _, attrs in shapes.generate(400, size=8, seed=0)]
    assert {a.colour for a in seen} == set(shapes.COLOURS)
    assert {a.shape for a in seen} == set(shapes.SHAPES)
    assert {a.size for a in seen} == set(shapes.SIZES)
    assert {a.position for a in seen} == set(shapes.POSITIONS)


def test_palette_is_far_apart():
    for (_, a), (_, b) in itertools.combinations(shapes.COLOURS.items(), 2):
        assert np.linalg.norm(np.subtract(a, b)) > 110
    for c in shapes.COLOURS.values():
        assert np.linalg.norm(np.subtract(c, shapes.BACKGROUND)) > 150


@pytest.mark.parametrize("size", [32, 64, 200])
def test_measure_reads_colour_size_position_back(size):
    wrong = 0
    for _, img, _, attrs in shapes.generate(120, size=size, seed=2):
        got = shapes.measure(img)
        wrong += got != {"colour": attrs.colour, "size": attrs.size, "position": attrs.position}
    assert wrong <= (2 if size == 32 else 0)


def test_held_out_pairs_are_excluded_on_request():
    plain = {(a.colour, a.shape) for _, _, _, a in shapes.generate(600, size=8, seed=1)}
    assert plain & shapes.HELD_OUT_PAIRS  # they exist in the full distribution
    kept = {(a.colour, a.shape) for _, _, _, a in shapes.generate(600, size=8, seed=1, exclude_held_out=True)}
    assert not kept & shapes.HELD_OUT_PAIRS


def test_render_any_resolution():
    attrs = shapes.ShapeAttributes("red", "star", "large", "center")
    for size in (8, 33, 256):
        img = shapes.render(attrs, size)
        assert img.size == (size, size) and img.mode == "RGB"
    assert shapes.measure(shapes.render(attrs, 128))["colour"] == "red"
