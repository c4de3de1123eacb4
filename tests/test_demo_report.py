"""The demo report's measures on real images: the floors they give, and what they reject."""

import pytest
import torch

from data_pipeline import shapes
from launch.demo import report


def test_open_prompts_expect_what_training_draws():
    prompts = report.open_prompts(8)
    assert [p.caption for p in prompts[:4]] == [f"a {s}" for s in shapes.SHAPES]
    assert prompts[4].caption == "a red circle" and prompts[4].samples == 4
    star = prompts[3]
    assert star.scene.open == ("colour", "size", "position")
    colours = star.expected("colour")
    assert "red" not in colours and abs(sum(colours.values()) - 1) < 1e-9  # red stars are held out
    assert star.expected("position") == {p: 0.2 for p in shapes.POSITIONS}


def test_real_images_of_open_prompts_are_diverse_and_one_value_is_not():
    prompts = report.open_prompts(24)
    real = [img for p in prompts for img in report.real_open_samples(p, 64)]
    div = report.diversity(real, prompts)
    assert div["colour"]["samples"] == 96 and div["size"]["samples"] == 144
    assert all(div[a]["total_variation"] < 0.12 for a in ("colour", "size", "position")), div
    # one image repeated: every open attribute collapses onto one value
    collapsed = report.diversity([real[0]] * len(real), prompts)
    assert all(collapsed[a]["total_variation"] >= 0.5 for a in ("colour", "size", "position")), collapsed


def test_fully_specified_prompts_include_held_out_pairs_and_real_images_pass():
    full = report.full_prompts(64)
    assert all(s.says == shapes.ALL_SAID and len(s.objects) == 1 for s in full)
    accuracy = report._accuracy(report.real_images(full, 64), full)
    assert accuracy["novel_pairs"]["count"] >= 3
    assert accuracy["colour"] == accuracy["shape"] == accuracy["size"] == accuracy["position"] == 1.0


@pytest.mark.parametrize("flaw", ["shape", "diversity", "noise"])
def test_verdict_names_the_target_missed(flaw):
    def run(shape, tv, noise):
        return {"attribute_accuracy": {"colour": 1.0, "shape": shape, "size": 1.0, "position": 1.0},
                "diversity": {"colour": {"total_variation": tv}, "size": {"total_variation": tv},
                              "position": {"total_variation": tv}, "mean_total_variation": tv},
                "background_noise": noise}
    good = run(0.9, 0.05, 2.0)
    baseline = run(0.6, 0.4, 2.0)
    assert report.verdict(good, [baseline], real_noise=2.0)["meets_targets"]
    bad = {"shape": run(0.7, 0.05, 2.0), "diversity": run(0.9, 0.2, 2.0), "noise": run(0.9, 0.05, 3.5)}[flaw]
    meets = report.verdict(bad, [baseline], real_noise=2.0)["meets"]
    missed = {k for k, ok in meets.items() if not ok}
    assert missed == {"shape": {"shape"}, "diversity": {"diversity_colour", "diversity_size", "diversity_position"},
                      "noise": {"background_noise"}}[flaw]


class _ShapeClip:
    """Embeds a caption as the one-hot of the shape it names."""

    def encode_text(self, captions):
        named = [next(s for s in shapes.SHAPES if s in c.split()) for c in captions]
        return torch.stack([self._onehot(s) for s in named]), None, None

    @staticmethod
    def _onehot(shape):
        return torch.nn.functional.one_hot(torch.tensor(shapes.SHAPES.index(shape)), len(shapes.SHAPES)).float()


def _onehots(drawn):
    """Image embeddings of the shapes a CLIP 'sees' in each image."""
    return torch.stack([_ShapeClip._onehot(s) for s in drawn])


def test_clip_shape_retrieval_splits_seen_from_novel_pairs():
    full = report.full_prompts(64)
    truth = [s.only.shape for s in full]
    exact = report.clip_shape_retrieval(_ShapeClip(), _onehots(truth), full)
    assert exact["overall"]["accuracy"] == exact["seen"]["accuracy"] == exact["novel_pairs"]["accuracy"] == 1.0
    novel = [(s.only.colour, s.only.shape) in shapes.HELD_OUT_PAIRS for s in full]
    # a CLIP that sees a held-out pair as its colour's next shape: right on seen pairs only
    entangled = [shapes.SHAPES[(shapes.SHAPES.index(t) + 1) % 4] if n else t for t, n in zip(truth, novel)]
    got = report.clip_shape_retrieval(_ShapeClip(), _onehots(entangled), full)
    assert got["seen"] == {"accuracy": 1.0, "count": len(full) - sum(novel)}
    assert got["novel_pairs"] == {"accuracy": 0.0, "count": sum(novel)}
    assert got["overall"]["accuracy"] == round(1 - sum(novel) / len(full), 4)
