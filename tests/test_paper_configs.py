"""The paper configs as resolved (base merged): Table 3's optimizer, EMA and diffusion settings,
and one CLIP whose widths every stage is built for.

Table 3 of Ramesh et al. 2022 ("Hierarchical Text-Conditional Image Generation with CLIP
Latents"), per model: learning rate, weight decay, Adam beta2 and eps, EMA decay, batch size,
iterations, diffusion steps, noise schedule and sampling steps. The batch sizes are global:
micro-batch x accumulation x the 64 GPUs the configs are written for.
"""

from __future__ import annotations

import json
from pathlib import Path

import open_clip
import pytest
import torch

from launch.cli import main
from launch.config_files import load_config
from models.clip import ClipAdapter

ROOT = Path(__file__).resolve().parents[1]
GPUS = 64
# file: (lr, weight decay, beta2, eps, EMA, global batch, iterations, (timesteps, schedule, sample steps))
TABLE_3 = {
    "prior_ar": (1.6e-4, 4.0e-2, 0.91, 1.0e-10, 0.999, 4096, 1_000_000, None),
    "prior": (1.1e-4, 6.0e-2, 0.96, 1.0e-6, 0.9999, 4096, 600_000, (1000, "cosine", 64)),
    "decoder": (1.2e-4, 0.0, 0.999, 1.0e-8, 0.9999, 2048, 800_000, (1000, "cosine", 250)),
    "upsampler_256": (1.2e-4, 0.0, 0.999, 1.0e-8, 0.9999, 1024, 1_000_000, (1000, "cosine", 27)),
    "upsampler_1024": (1.0e-4, 0.0, 0.999, 1.0e-8, 0.9999, 512, 1_000_000, (1000, "linear", 15)),
}
PRIORS = ("prior", "prior_ar")


def _paper(name: str):
    return load_config(ROOT / "configs" / "paper" / f"{name}.yaml")


@pytest.mark.parametrize("name", sorted(TABLE_3))
def test_resolved_paper_configs_carry_table_3(name):
    lr, weight_decay, beta2, eps, ema, batch, iterations, diffusion = TABLE_3[name]
    job = _paper(name)
    assert (job.optim.lr, job.optim.weight_decay, job.optim.betas, job.optim.eps) == (lr, weight_decay, (0.9, beta2), eps)
    assert job.train.ema_decay == ema
    assert job.train.micro_batch_size * job.train.grad_accum * GPUS == batch
    assert job.train.steps == iterations
    if diffusion is not None:
        d = job.model.diffusion
        assert (d.timesteps, d.schedule, d.sample_steps) == diffusion


def test_every_stage_is_built_for_the_precomputes_clip():
    precompute = _paper("precompute").clip
    arch = open_clip.get_model_config(precompute.name)
    embed_dim, text_width, context = arch["embed_dim"], arch["text_cfg"]["width"], arch["text_cfg"]["context_length"]
    assert (precompute.name, embed_dim, text_width) == ("ViT-H-14", 1024, 1024)  # the paper's widths (sec. 2.2)
    for name in PRIORS:
        job = _paper(name)
        assert job.clip == precompute, name
        assert (job.model.embed_dim, job.model.text_width, job.model.max_text_len) == (embed_dim, text_width, context), name
    decoder = _paper("decoder")
    assert decoder.clip == precompute
    assert (decoder.model.image_embed_dim, decoder.model.text_width, decoder.model.max_text_len) == (embed_dim, text_width, context)


def test_the_shipped_clip_through_our_adapter_gives_those_widths():
    """The real ViT-H-14, built on the meta device (no memory, no compute), through the
    adapter the precompute uses: its outputs have the widths the prior and decoder read."""
    name = _paper("precompute").clip.name
    with torch.device("meta"):
        model = open_clip.create_model(name, device="meta")
    clip = ClipAdapter(model, open_clip.get_tokenizer(name), name=name).to("meta")
    text_embed, encodings, mask = clip.encode_text(["a corgi in a hat"])
    image_embed = clip.encode_image(torch.zeros(2, 3, 300, 200, device="meta"))
    assert (text_embed.shape, encodings.shape, mask.shape, image_embed.shape) == ((1, 1024), (1, 77, 1024), (1, 77), (2, 1024))


def test_the_chain_tests_stand_in_clip_has_the_shipped_clips_interface():
    """tests/test_paper_chain.py embeds with `unclip-tiny-vit-h-14` (one-layer towers): it must
    have every width of the shipped CLIP that another stage reads."""
    shipped = open_clip.get_model_config(_paper("precompute").clip.name)
    tiny = open_clip.get_model_config("unclip-tiny-vit-h-14")
    keep = lambda cfg: (cfg["embed_dim"], cfg["text_cfg"]["width"], cfg["text_cfg"]["context_length"],  # noqa: E731
                        cfg["text_cfg"]["vocab_size"], cfg["vision_cfg"]["image_size"])
    assert keep(tiny) == keep(shipped)


@pytest.mark.parametrize("name", ["prior", "decoder"])
def test_training_on_embeddings_of_other_widths_stops_before_any_work(name, tmp_path, capsys):
    """What the paper chain did before: ViT-L-14 (768-d) embeddings into 1024-d stages."""
    embeddings = tmp_path / "embeddings"
    embeddings.mkdir()
    manifest = {"clip_name": "ViT-L-14", "clip_pretrained": "openai", "embed_dim": 768, "text_width": 768,
                "context_length": 77, "text_encodings": True}
    (embeddings / "embeddings.json").write_text(json.dumps(manifest))
    source = f'data.sources=[{{shards: "{tmp_path}/shard-000000.tar", embeddings: "{embeddings}"}}]'
    code = main(["train", "--config", str(ROOT / "configs" / "paper" / f"{name}.yaml"), "--set", source,
                 "--run-dir", str(tmp_path / "run")])
    err = capsys.readouterr().err
    key = "model.embed_dim" if name == "prior" else "model.image_embed_dim"
    assert code == 2 and err.startswith("unclip train: preflight"), err
    assert f"has embedding width 768 (ViT-L-14), but {key} is 1024" in err
    assert "has text width 768 (ViT-L-14), but model.text_width is 1024" in err
    assert not (tmp_path / "run").exists()
