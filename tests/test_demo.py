"""`unclip demo --quick` end to end (every stage a real 2-rank job), then `unclip sample` on
its weights for every application."""

import json
from pathlib import Path

import pytest

from data_pipeline import shapes
from launch.cli import main

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def demo_root(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("demo")
    assert main(["demo", "--quick", "--out", str(root)]) == 0
    return root


def test_quick_demo_writes_every_artefact(demo_root, capsys):
    for stage in ("clip", "prior", "decoder", "upsampler"):
        assert (demo_root / "weights" / f"{stage}.safetensors").stat().st_size > 0
    assert (demo_root / "embeddings" / "_SUCCESS").exists()
    assert (demo_root / "samples.png").stat().st_size > 0
    report = json.loads((demo_root / "report.json").read_text())
    assert report["image_size"] == 64 and report["prompts"]["fully_specified"] == 8 and report["prompts"]["two_object"] == 4
    for run in ("unclip", "decoder_only_baseline", "text_embedding_baseline"):
        acc, div = report[run]["attribute_accuracy"], report[run]["diversity"]
        assert all(0.0 <= acc[k] <= 1.0 for k in ("colour", "shape", "size", "position"))
        assert all(0.0 <= div[a]["total_variation"] <= 1.0 for a in ("colour", "size", "position"))
        assert div["colour"]["samples"] == 8 and div["size"]["samples"] == 12  # 4 shape-only x 2, + 4 coloured x 1
        assert -1.0 <= report[run]["clip_score"] <= 1.0 and report[run]["clip_frechet_distance"] >= 0
        assert report[run]["background_noise"] >= 0
    assert 0.0 <= report["unclip"]["binding_accuracy"]["bound"] <= 1.0
    real = report["real_images"]  # the judge itself is sound on real images of the same prompts
    assert real["attribute_accuracy"]["colour"] == 1.0 and real["binding_accuracy"]["bound"] == 1.0
    retrieval = real["clip_shape_retrieval"]
    assert retrieval["overall"]["count"] == 8 and 0.0 <= retrieval["overall"]["accuracy"] <= 1.0
    assert set(report["meets"]) == {"colour", "shape", "size", "position", "diversity_colour", "diversity_size",
                                    "diversity_position", "shape_beats_baselines", "diversity_beats_baselines",
                                    "background_noise"}
    assert isinstance(report["meets_targets"], bool)
    assert report["seed"] == 0
    # a second run skips every stage: outputs exist; it ends with the command to sample more
    capsys.readouterr()
    assert main(["demo", "--quick", "--out", str(demo_root)]) == 0
    out = capsys.readouterr().out
    assert out.count("done already, skipped") == 8
    assert f"unclip sample --weights {demo_root / 'weights'} --prompt" in out.splitlines()[-1]
    # the root belongs to seed 0: another seed is refused before any work
    assert main(["demo", "--quick", "--seed", "1", "--out", str(demo_root)]) == 2
    assert "holds a demo run with seed 0" in capsys.readouterr().err


@pytest.fixture(scope="module")
def images(demo_root) -> list[str]:
    paths = []
    for key, img, _, _ in shapes.generate(2, size=64, seed=7):
        path = demo_root / f"{key}.png"
        img.save(path)
        paths.append(str(path))
    return paths


@pytest.mark.parametrize("mode", ["prompt", "variations", "interpolate", "text_diff"])
def test_sample_every_application(demo_root, images, tmp_path, mode, capsys):
    weights = sorted(str(p) for p in (demo_root / "weights").glob("*.safetensors"))
    args = {
        "prompt": ["--prompt", "a large red circle in the center", "-n", "2"],
        "variations": ["--variations", images[0], "-n", "2"],
        "interpolate": ["--interpolate", images[0], images[1], "--frames", "3"],
        "text_diff": ["--text-diff", images[0], "--from", "a red circle", "--to", "a blue square"],
    }[mode]
    assert main(["sample", "--weights", *weights, *args, "--steps", "4", "--out", str(tmp_path)]) == 0
    printed = [Path(line) for line in capsys.readouterr().out.split()]
    assert printed and all(p.exists() for p in printed)
    from PIL import Image

    pngs = [p for p in printed if p.suffix == ".png"]
    assert {Image.open(p).size for p in pngs} == {(64, 64)}
    expected = {"prompt": 2, "variations": 2, "interpolate": 3, "text_diff": 3}[mode]
    assert len(pngs) == expected
