"""What the stage specs and the trainer do for Karlo's conventions, without diffusers: the
preparation of a fresh raw / empty-caption run, the check that embeddings and stage read the
same convention, and the EMA keeping a frozen UNet (the last-step super-resolution one)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from data_pipeline.embeddings import EmbeddingManifest, convention_problem, write_manifest
from launch.cli import main
from models import stages
from models.clip import load_clip
from models.config import ConfigError, build_config
from tests.helpers import TINY_DECODER, merged, write_job
from trainer.config import job_class
from trainer.ema import ShardedEMA

CLIP = "unclip-tiny-77"  # 64-d embeddings, 64-wide text encodings, 77 tokens
RAW = {"clip_embeddings": "raw", "null_text": "empty_caption"}


def tiny_job(stage: str, model: dict, clip: dict) -> object:
    return build_config(job_class(stages.get(stage)), {"stage": stage, "model": model, "clip": clip})


def embeddings(count: int, dim: int, seed: int) -> list[dict[str, torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    scale, shift = torch.rand(dim, generator=g) * 3 + 0.5, torch.randn(dim, generator=g)
    rows = torch.randn(count, dim, generator=g) * scale + shift
    return [{"image_embed": chunk} for chunk in rows.split(1000)]


def test_a_fresh_raw_empty_caption_run_fits_statistics_and_encodes_the_empty_caption():
    prior_job = tiny_job(
        "prior", {"kind": "diffusion", "embed_dim": 64, "text_width": 64, "max_text_len": 77, "dim": 32, "depth": 1,
                  "heads": 2, "dim_head": 16, **RAW}, {"name": CLIP, "embeddings": "raw"},
    )
    decoder_job = tiny_job("decoder", {**TINY_DECODER["model"], "image_embed_dim": 64, "text_width": 64, "max_text_len": 77,
                                       "use_text_embed": True, **RAW}, {"name": CLIP, "embeddings": "raw"})
    empty = load_clip(CLIP, normalize=False).encode_text([""])
    batches = embeddings(12_000, 64, seed=0)
    fitted = torch.cat([b["image_embed"] for b in batches])[:10_000].double()
    prepared = {}
    for job, null in ((prior_job, lambda m: m.text.null_caption), (decoder_job, lambda m: m.null_caption)):
        spec = stages.get(job.stage)
        model = prepared[job.stage] = spec.build(job)
        spec.preparation(job)(model, iter(batches))
        caption = null(model)
        assert torch.equal(caption.text_embed, empty[0][0])  # raw: the CLIP's own output, not unit norm
        assert caption.text_embed.norm() != pytest.approx(1.0, abs=1e-3)
        assert torch.equal(caption.text_mask, empty[2][0]) and int(caption.text_mask.sum()) == 2
        assert torch.equal(caption.text_encodings[:2], empty[1][0, :2])
    space = prepared["prior"].embedding_space
    assert torch.allclose(space.clip_mean, fitted.mean(0).float()) and torch.allclose(space.clip_std, fitted.std(0).float())
    # the learned-null (paper) stages have nothing to prepare
    assert stages.get("decoder").preparation(tiny_job("decoder", TINY_DECODER["model"], {"name": CLIP})) is None


def test_a_stage_must_read_the_embeddings_its_clip_and_its_data_hold(tmp_path, capsys):
    with pytest.raises(ConfigError, match="model.clip_embeddings is 'raw' but clip.embeddings is 'unit'"):
        tiny_job("decoder", {**TINY_DECODER["model"], "clip_embeddings": "raw"}, {"name": CLIP})
    manifest = EmbeddingManifest(CLIP, None, 8, 8, 4, True, "raw")
    assert convention_problem(manifest, "raw", folder="emb", key="clip.embeddings") is None
    folder = tmp_path / "emb"
    folder.mkdir()
    write_manifest(str(folder), manifest)
    job = merged(TINY_DECODER, data={"sources": [{"shards": str(tmp_path / "x.tar"), "embeddings": str(folder)}]})
    config = write_job(tmp_path / "decoder.yaml", job)
    assert main(["train", "--config", str(config), "--run-dir", str(tmp_path / "run")]) == 2
    err = capsys.readouterr().err
    assert "data.sources[0].embeddings:" in err and "holds raw CLIP embeddings" in err and "clip.embeddings is 'unit'" in err
    assert not (tmp_path / "run").exists()


def test_the_ema_keeps_frozen_parameters_as_they_are():
    model = nn.Sequential(nn.Linear(3, 4), nn.Linear(4, 2))
    model[1].requires_grad_(False)  # like the upsampler's last-step UNet
    ema = ShardedEMA(model, decay=0.5, rank=0, world_size=1)
    assert set(ema.shapes) == {"0.weight", "0.bias", "1.weight", "1.bias"}  # exported with the rest
    frozen, before = model[1].weight.detach().clone(), model[0].weight.detach().clone()
    with torch.no_grad():
        model[0].weight.add_(1.0)
    ema.update(step=1000)
    assert torch.equal(ema.shadow["1.weight"].reshape(frozen.shape), frozen)
    assert torch.allclose(ema.shadow["0.weight"].reshape(before.shape), before + 0.5)


def test_the_memory_plan_sees_karlos_stages():
    from trainer.memory_plan import measure, zero_plan

    decoder = tiny_job("decoder", {**TINY_DECODER["model"], "image_embed_dim": 64, "text_width": 64, "max_text_len": 77,
                                   "use_text_embed": True, **RAW}, {"name": CLIP, "embeddings": "raw"})
    assert measure(decoder).activations_bytes  # the unset empty caption of the meta model does not stop it
    upsampler = build_config(job_class(stages.get("upsampler")), {"stage": "upsampler", "model": {
        "lowres_size": 8, "image_size": 16, "last_step_unet": True,
        "unet": {"base_channels": 8, "channel_mults": [1, 2], "num_res_blocks": 1, "attention_resolutions": [], "norm_groups": 4}}})
    size = measure(upsampler)
    assert size.frozen == size.params > 0  # the last-step UNet: held, not trained
    plan = zero_plan(size, zero_stage=2, gpus=4, precision="bf16")
    assert plan.params == 2 * (2 * size.params) and plan.ema == 4 * 2 * size.params / 4
    assert plan.optimizer == 16 * size.params / 4
