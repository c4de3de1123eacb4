"""The Karlo commands as a user runs them, on diffusers' own tiny unCLIP pipeline:
`unclip import --from diffusers` -> `unclip sample` gives diffusers' images; `unclip train
--init-from` fine-tunes the imported decoder on 2 DeepSpeed ranks on real shards (its first
loss is the imported model's loss on the same batch); `unclip export --format diffusers` of
that run loads and samples in `UnCLIPPipeline`; and each refusal names what is wrong.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

pytest.importorskip("diffusers", reason="diffusers is in the test extra: pip install -e '.[test]'")
pytest.importorskip("transformers", reason="transformers is in the test extra: pip install -e '.[test]'")

from diffusers.pipelines.deprecated.unclip import UnCLIPPipeline  # noqa: E402
from safetensors.torch import save_file  # noqa: E402

from launch.cli import main  # noqa: E402
from launch.config_files import load_config  # noqa: E402
from launch.import_diffusers import read_unclip_folder  # noqa: E402
from models import stages  # noqa: E402
from models.loading import load_pipeline  # noqa: E402
from models.stages import StageContext, load_weights  # noqa: E402
from models.weights import read_export, read_weights  # noqa: E402
from tests.helpers import explain, losses, train  # noqa: E402
from tests.karlo.tiny import CLIP_NAME, PROMPTS, clip_of, sample_theirs, without_final_x0_factor  # noqa: E402

STEPS = 5  # every stage's sampling steps, here and in diffusers
PNG = 0.5 / 255  # rounding to 8 bits


@pytest.fixture(scope="module")
def clip_file(folder, tmp_path_factory) -> Path:
    """open_clip's state dict of the CLIP the folder's text encoder is (OpenAI's, for Karlo)."""
    path = tmp_path_factory.mktemp("clip") / "clip.safetensors"
    save_file({k: v.contiguous() for k, v in clip_of(folder).model.state_dict().items()}, path)
    return path


@pytest.fixture(scope="module")
def weights(folder, clip_file, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("imported") / "weights"
    code = main([
        "import", "--from", "diffusers", str(folder), "--out", str(out), "--set", f"clip.name={CLIP_NAME}",
        "--set", f"clip.pretrained={clip_file}", "--set", f"model.diffusion.sample_steps={STEPS}",
    ])
    assert code == 0
    return out


def stage_files(weights: Path, *names: str) -> list[str]:
    return [str(weights / f"{name}.safetensors") for name in names]


def pngs(folder: Path, n: int) -> torch.Tensor:
    arrays = [np.array(Image.open(folder / f"prompt_{i:04d}.png")) for i in range(n)]
    return torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2).float() / 255


def test_import_writes_weights_and_configs_that_sample_diffusers_images(weights, theirs, tmp_path):
    assert sorted(p.name for p in weights.iterdir()) == [
        "decoder.safetensors", "decoder.yaml", "prior.safetensors", "prior.yaml", "upsampler.safetensors", "upsampler.yaml"
    ]
    decoder = load_config(weights / "decoder.yaml")
    # the architecture from the folder, the rest from configs/karlo/decoder.yaml
    assert (decoder.model.image_size, decoder.model.unet.base_channels, decoder.data.image_size) == (8, 8, 8)
    assert (decoder.optim.lr, decoder.model.null_text, decoder.clip.embeddings) == (1e-5, "empty_caption", "raw")
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("\n".join(PROMPTS[1:]) + "\n")
    code = main(["sample", "--weights", *stage_files(weights, "prior", "decoder", "upsampler"),
                 "--prompts", str(prompts), "--seed", "3", "--out", str(tmp_path / "out")])
    assert code == 0
    ref = sample_theirs(without_final_x0_factor(theirs), seed=3, steps=STEPS, super_res_steps=STEPS)
    ours = pngs(tmp_path / "out", 2)
    assert ref.std() > 0.05
    assert (ours - ref).abs().max() <= PNG + 2e-4


@pytest.fixture(scope="module")
def fine_tuned(weights, clip_file, tmp_path_factory):
    """The imported decoder fine-tuned for one step on 2 ranks, on shards embedded by the
    folder's CLIP (raw embeddings, text encodings), as the README shows."""
    from data_pipeline.config import PrecomputeConfig
    from data_pipeline.precompute import run_precompute
    from data_pipeline.shards import write_shards
    from models.clip import ClipConfig

    root = tmp_path_factory.mktemp("finetune")
    shards = write_shards("shapes", str(root / "img"), per_shard=8, count=16, size=32).shards
    clip = ClipConfig(name=CLIP_NAME, pretrained=str(clip_file), embeddings="raw")
    run_precompute(PrecomputeConfig(clip=clip, batch_size=8, num_workers=0, text_encodings=True),
                   shards=shards, out=str(root / "emb"), progress=False)
    sources = [{"shards": shards, "embeddings": str(root / "emb")}]
    done = train(
        weights / "decoder.yaml", root / "run", "--init-from", str(weights / "decoder.safetensors"),
        "--set", f"data.sources={json.dumps(sources)}", "--set", "data.num_workers=0", "--set", "data.shuffle_buffer=8",
        "--set", "train.steps=1", "--set", "train.micro_batch_size=2", "--set", "train.log_every=1",
        "--set", "deepspeed.precision=fp32", "--set", "deepspeed.activation_checkpointing=false",
        "--set", "model.unet.gradient_checkpointing=false", "--set", "deepspeed.timeout_s=60",
    )
    assert done.returncode == 0, explain(done)
    return root / "run", done


@pytest.mark.slow
def test_init_from_starts_the_run_at_the_imported_weights(fine_tuned, weights):
    run, done = fine_tuned
    assert "initial weights from" in done.stdout
    job = load_config(run / "config.yaml")
    assert job.init_from == str(weights / "decoder.safetensors")
    spec = stages.get("decoder")
    imported = read_export(weights / "decoder.safetensors").state
    from trainer import rng
    from trainer.loop import open_loader

    fresh_model = spec.build(job)  # freshly initialised, with the imported empty caption
    fresh_model.load_state_dict({k: v for k, v in imported.items() if k.startswith("null_caption.")}, strict=False)
    # each rank's first batch and random stream, as the trainer draws them
    expected, fresh = [], []
    for rank in range(2):
        batch = next(open_loader(job, spec, rank, 2))
        assert batch["text_embed"].shape == (2, 64)  # the decoder reads the caption's CLIP embedding
        for model, out in ((load_weights(spec.build(job), imported, "imported"), expected), (fresh_model, fresh)):
            generator = torch.Generator()
            rng.seed_everything(job.train.seed * 1000 + rank, generator)
            with torch.no_grad():
                out.append(float(spec.loss(model.train(), batch, generator, StageContext(rank, 2))))
    first = losses(run)[1]
    assert first == pytest.approx(sum(expected) / 2, rel=1e-6)
    assert abs(first - sum(fresh) / 2) > 1e-2  # not what a freshly initialised decoder gives
    # once the run has a checkpoint it resumes from it: init_from is not even checked
    from launch.train_cmd import check_initial_weights
    from models.config import ConfigError

    unfit = load_config(run / "config.yaml", [f"init_from={weights / 'prior.safetensors'}"])
    check_initial_weights(unfit, run, resume=True)
    with pytest.raises(ConfigError, match="holds prior weights"):
        check_initial_weights(unfit, run, resume=False)


@pytest.mark.slow
def test_export_diffusers_of_the_fine_tuned_run_loads_and_samples_in_diffusers(fine_tuned, weights, tmp_path):
    run, _ = fine_tuned
    out = tmp_path / "pipeline"
    code = main(["export", "--format", "diffusers", str(run), *stage_files(weights, "prior", "upsampler"), "--out", str(out)])
    assert code == 0
    theirs = without_final_x0_factor(UnCLIPPipeline.from_pretrained(out))
    # the folder holds exactly the run's EMA decoder and the imported prior and upsampler
    back = {s.stage: s.state for s in read_unclip_folder(out)}
    trained = read_weights(run).state
    assert all(torch.equal(back["decoder"][k], v) for k, v in trained.items())
    assert all(torch.equal(back["prior"][k], v) for k, v in read_export(weights / "prior.safetensors").state.items())
    ours = load_pipeline([run, *stage_files(weights, "prior", "upsampler")])
    mine = ((ours.text_to_image(PROMPTS[1:], seed=5) + 1) / 2).clamp(0, 1)
    ref = sample_theirs(theirs, seed=5, steps=STEPS, super_res_steps=STEPS)
    assert ref.std() > 0.05
    assert (mine - ref).abs().max() <= 2e-4


def test_export_diffusers_refuses_what_diffusers_cannot_express(weights, clip_file, tmp_path, capsys):
    from models.config import build_config, config_to_dict
    from models.decoder import Decoder
    from models.stages.decoder import DecoderStageConfig
    from models.weights import StageWeights, write_export

    job = build_config(DecoderStageConfig, {
        "model": {"image_size": 8, "image_embed_dim": 64, "text_width": 64, "context_dim": 12,
                  "unet": {"base_channels": 8, "channel_mults": [1, 2], "num_res_blocks": 1,
                           "attention_resolutions": [4], "head_channels": 8, "norm_groups": 4}},
        "clip": {"name": CLIP_NAME, "pretrained": str(clip_file)},
    })
    native = tmp_path / "native-decoder.safetensors"  # unclip's own decoder: unit embeddings, learned nulls
    write_export(StageWeights("decoder", 10, config_to_dict(job), Decoder(job.model).state_dict(), "test"), native)
    out = tmp_path / "refused"
    assert main(["export", "--format", "diffusers", str(native), *stage_files(weights, "prior", "upsampler"), "--out", str(out)]) == 2
    message = capsys.readouterr().err
    for setting in ("clip_embeddings='unit'", "null_text='learned'", "use_text_embed=False", "context_norm='all_tokens'"):
        assert setting in message
    assert main(["export", "--format", "diffusers", *stage_files(weights, "prior", "decoder"), "--out", str(out)]) == 2
    assert "upsampler: need exactly one, got 0" in capsys.readouterr().err
    assert not out.exists()


def test_init_from_refuses_weights_that_do_not_fit(weights, tmp_path, capsys):
    base = ["train", "--config", str(weights / "decoder.yaml"), "--run-dir", str(tmp_path / "run"),
            "--set", f"data.sources=[{{shards: {tmp_path}/none.tar, embeddings: {tmp_path}}}]"]
    refusals = {
        "holds prior weights; this job trains the decoder stage": ["--init-from", *stage_files(weights, "prior")],
        "model settings that differ: model.unet.base_channels: checkpoint 8, config 16": ["--init-from", *stage_files(weights, "decoder"), "--set", "model.unet.base_channels=16"],
        "trained on another CLIP's embeddings (clip.embeddings 'raw' there, 'unit' here)": [
            "--init-from", *stage_files(weights, "decoder"), "--set", "clip.embeddings=unit", "--set", "model.clip_embeddings=unit"],
    }
    for expected, args in refusals.items():
        assert main([*base, *args]) == 2
        assert expected in capsys.readouterr().err
    assert not (tmp_path / "run").exists()  # refused before any work


def test_import_refuses_a_clip_that_is_not_the_folders(folder, tmp_path, capsys):
    out = tmp_path / "weights"
    assert main(["import", "--from", "diffusers", str(folder), "--out", str(out)]) == 2  # configs/karlo: ViT-L/14
    message = capsys.readouterr().err
    assert "text width 64 in the folder, 768 in ViT-L-14-quickgelu" in message
    assert not out.exists()
