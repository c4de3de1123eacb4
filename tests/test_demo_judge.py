"""The demo's independent judge must recognise ground-truth renders and reject wrong ones."""

import dataclasses

import numpy as np
from PIL import Image, ImageFilter

from data_pipeline import shapes
from launch.demo.judge import (
    attribute_accuracy,
    attribute_counts,
    background_noise,
    binding_accuracy,
    classify_shape,
    judge,
    total_variation,
)


def _samples(n=60, size=64, seed=321):
    """(key, image, caption, object) of the first `n` one-object samples."""
    out = []
    for key, img, caption, scene in shapes.generate(4 * n, size=size, seed=seed):
        if len(scene.objects) == 1 and len(out) < n:
            out.append((key, img, caption, scene.only))
    return out


def test_judge_recognises_ground_truth_renders():
    samples = _samples()
    acc = attribute_accuracy([s[1] for s in samples], [s[3] for s in samples])
    assert acc["colour"] == 1.0 and acc["position"] == 1.0
    assert acc["shape"] >= 0.98 and acc["size"] >= 0.98
    assert acc["count"] == 60


def test_judge_tolerates_soft_edges():
    samples = _samples()
    blurred = [s[1].filter(ImageFilter.GaussianBlur(1.0)) for s in samples]
    assert attribute_accuracy(blurred, [s[3] for s in samples])["shape"] >= 0.95


def test_judge_rejects_the_wrong_attributes():
    for _, img, _, attrs in _samples(n=20):
        other_shape = next(s for s in shapes.SHAPES if s != attrs.shape)
        other_colour = next(c for c in shapes.COLOURS if c != attrs.colour)
        verdict = judge(img, dataclasses.replace(attrs, shape=other_shape, colour=other_colour))
        assert not verdict["colour"]
        assert not verdict["shape"] or classify_shape(img) == other_shape


def test_empty_image_matches_nothing():
    blank = Image.new("RGB", (64, 64), shapes.BACKGROUND)
    assert classify_shape(blank) is None
    attrs = shapes.attributes(0, 0).objects[0]
    assert not any(judge(blank, attrs).values())


def test_binding_needs_each_colour_on_its_own_shape():
    scenes = [scene for *_, scene in shapes.generate(300, size=64, seed=5) if len(scene.objects) == 2][:20]
    images = [shapes.render(s, 64, jitter_seed=i) for i, s in enumerate(scenes)]
    assert binding_accuracy(images, scenes)["bound"] == 1.0
    # the same images judged against the scenes with the two colours swapped: colours are wrong
    swapped = [shapes.Scene((dataclasses.replace(a, colour=b.colour), dataclasses.replace(b, colour=a.colour)), s.says)
               for s in scenes for a, b in [s.objects]]
    got = binding_accuracy(images, swapped)
    assert got["colours"] == 0.0 and got["bound"] == 0.0 and got["shapes"] == 1.0


def test_total_variation_is_zero_for_a_match_and_one_for_disjoint_supports():
    assert total_variation({"a": 2, "b": 2}, {"a": 0.5, "b": 0.5}) == 0.0
    assert total_variation({"c": 4}, {"a": 0.5, "b": 0.5}) == 1.0
    assert abs(total_variation({"a": 3, "b": 1}, {"a": 0.5, "b": 0.5}) - 0.25) < 1e-12
    counts = attribute_counts([shapes.render(shapes.ShapeAttributes("red", "star", s, "left"), 64) for s in ("small", "large")]
                              + [Image.new("RGB", (64, 64), shapes.BACKGROUND)], "size")
    assert counts == {"small": 1, "large": 1, "none": 1}


def test_background_noise_sees_speckle_not_the_lighting_or_the_rim():
    lit = [img for _, img, _, _ in _samples(n=10)]
    real = background_noise(lit)
    assert 0.5 < real < shapes.LIGHT_LEVELS
    rng = np.random.default_rng(0)
    noisy = [Image.fromarray(np.clip(np.asarray(img, np.float32) + rng.normal(0, 8, (64, 64, 3)), 0, 255).astype(np.uint8))
             for img in lit]
    assert background_noise(noisy) > 2.5 * real
    blurred = [img.filter(ImageFilter.GaussianBlur(1.0)) for img in lit]
    assert background_noise(blurred) < 1.2 * real  # soft edges are not noise


def test_a_shape_cut_by_the_top_edge_is_still_classified():
    arr = np.full((64, 64, 3), shapes.BACKGROUND, np.uint8)
    arr[:2, 20:30] = shapes.COLOURS["red"]  # all of it on the first two rows: centroid at the edge
    assert classify_shape(Image.fromarray(arr)) in shapes.SHAPES
