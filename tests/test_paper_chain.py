"""The paper chain from the shipped paper configs: precompute -> prior -> decoder -> both
upsamplers -> sample, each a real `unclip` job, so any drift between the stages' contracts
(CLIP widths, context length, resolutions, stage names, sampling options) fails CI.

Only sizes and steps are overridden, each listed below, and the test checks that every other
key of each run's resolved config.yaml is the shipped file's:
- the CLIP: `unclip-tiny-vit-h-14` stands in for ViT-H-14 (`clip.name`, and `clip.pretrained`
  null: no weights can be downloaded in CI). It has ViT-H-14's whole interface (1024-d
  embeddings, text width 1024, 77 tokens, 224 px; tests/test_paper_configs.py checks that
  against the shipped name) on one-layer towers: ViT-H-14 at random init measured 57 s to
  build, 134 s for 4 images and 64 s for 4 captions on this 2-core machine (load ~10), and
  4.8 GB of memory per process, for a precompute and again for sampling;
- widths and depths: the prior's transformer, the UNets' base channels, residual blocks per
  level and attention head width, the decoder's context width;
- resolution, 1/8 of the paper's throughout: 64 -> 256 -> 1024 px becomes 8 -> 32 -> 128 px,
  the crops (a quarter of the side) and the attention resolutions scaled with it;
- steps and batch: one optimizer step of micro-batch 2, data read in the rank (no loader
  processes), 2 sampling steps per stage.
Everything else (precision bf16, ZeRO 2, activation checkpointing, the optimizer, dropout
rates, diffusion schedules, degradations, the prior's candidates...) runs as shipped.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from PIL import Image

from data_pipeline.embeddings import read_manifest
from data_pipeline.shards import write_shards
from launch.config_files import dump_config, load_config
from tests.helpers import env_for_tests, explain

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[1]
PAPER = ROOT / "configs" / "paper"
STAND_IN = ["clip.name=unclip-tiny-vit-h-14", "clip.pretrained=null"]
UNET = ["model.unet.base_channels=32", "model.unet.num_res_blocks=1"]
SIZES = {
    "prior": [*STAND_IN, "model.dim=32", "model.depth=1", "model.heads=2", "model.dim_head=16"],
    "decoder": [*STAND_IN, *UNET, "model.image_size=8", "data.image_size=8", "model.context_dim=32",
                "model.unet.attention_resolutions=[4,2,1]", "model.unet.head_channels=32"],
    "upsampler_256": [*UNET, "model.lowres_size=8", "model.image_size=32", "data.image_size=32", "model.train_crop_size=8"],
    "upsampler_1024": [*UNET, "model.lowres_size=32", "model.image_size=128", "data.image_size=128",
                       "model.train_crop_size=32"],
}
STEPS = ["train.steps=1", "train.micro_batch_size=2", "data.num_workers=0"]
TIMEOUT = 600


def _start(*args: str) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "launch", *args], env=env_for_tests(), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)


def _finish(proc: subprocess.Popen) -> subprocess.CompletedProcess:
    try:
        out, err = proc.communicate(timeout=TIMEOUT)
    except subprocess.TimeoutExpired:
        proc.kill()
        out, err = proc.communicate()
    done = subprocess.CompletedProcess(proc.args, proc.returncode, out, err)
    assert done.returncode == 0, explain(done)
    return done


def _sets(overrides: list[str]) -> list[str]:
    return [arg for o in overrides for arg in ("--set", o)]


def _train(name: str, runs: Path, source: str) -> subprocess.Popen:
    overrides = [*SIZES[name], *STEPS, source]
    return _start("train", "--config", str(PAPER / f"{name}.yaml"), "--run-dir", str(runs / name), "--nproc", "1",
                  *_sets(overrides))


def _flat(data, prefix: str = "") -> dict[str, object]:
    if not isinstance(data, dict):
        return {prefix: data}
    out: dict[str, object] = {}
    for key, value in data.items():
        out.update(_flat(value, f"{prefix}.{key}" if prefix else key))
    return out


def _assert_only_sizes_and_steps_changed(name: str, run_dir: Path) -> None:
    shipped = _flat(yaml.safe_load(dump_config(load_config(PAPER / f"{name}.yaml"))))
    ran = _flat(yaml.safe_load((run_dir / "config.yaml").read_text()))
    allowed = {o.split("=", 1)[0] for o in [*SIZES[name], *STEPS]} | {"data.sources"}
    changed = {k for k in shipped.keys() | ran.keys() if shipped.get(k) != ran.get(k)}
    assert changed <= allowed, f"{name}: keys changed beyond sizes and steps: {sorted(changed - allowed)}"


def test_the_paper_configs_chain_from_precompute_to_samples(tmp_path):
    data, embeddings, runs = tmp_path / "data", tmp_path / "embeddings", tmp_path / "runs"
    write_shards("shapes", str(data), per_shard=8, count=16, size=64, seed=0)
    shards = str(data / "shard-{000000..000001}.tar")
    images_only = "data.sources=" + json.dumps([{"shards": shards}])
    with_embeddings = "data.sources=" + json.dumps([{"shards": shards, "embeddings": str(embeddings)}])

    # the upsamplers need only images: they train while the CLIP embeds
    upsamplers = [_train(name, runs, images_only) for name in ("upsampler_256", "upsampler_1024")]
    _finish(_start("precompute", "--config", str(PAPER / "precompute.yaml"), "--shards", shards, "--out", str(embeddings),
                   *_sets([*STAND_IN, "num_workers=0"])))
    manifest = read_manifest(str(embeddings))
    assert (manifest.embed_dim, manifest.text_width, manifest.context_length) == (1024, 1024, 77)
    embedders = [_train(name, runs, with_embeddings) for name in ("prior", "decoder")]
    for proc in [*upsamplers, *embedders]:
        _finish(proc)
    for name in SIZES:
        assert (runs / name / "checkpoints" / "latest").is_file(), name
        _assert_only_sizes_and_steps_changed(name, runs / name)

    out = tmp_path / "samples"
    done = _finish(_start("sample", "--weights", str(runs), "--clip", "unclip-tiny-vit-h-14", "--prompt",
                          "a large red circle on the left", "--prior-steps", "2", "--steps", "2",
                          "--upsampler-steps", "2", "--out", str(out)))
    assert done.stdout.split() == [str(out / "prompt_0000.png")]
    assert Image.open(out / "prompt_0000.png").size == (128, 128)  # through the decoder and both upsamplers
