"""The demo's independent judge must recognise ground-truth renders and reject wrong ones."""

import dataclasses

from PIL import Image, ImageFilter

from data_pipeline import shapes
from launch.demo.judge import attribute_accuracy, classify_shape, judge


def _samples(n=60, size=64, seed=321):
    return list(shapes.generate(n, size=size, seed=seed))


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
    attrs = shapes.attributes(0, 0)
    assert not any(judge(blank, attrs).values())
