"""The stages on real shards: the contrastive CLIP on 2 ranks (its loss gathers features
across ranks) and an upsampler, both read through data_pipeline's streaming loader; the CLIP
export loads with `models.clip.load_clip`."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file

from tests.helpers import TINY_UPSAMPLER, explain, losses, merged, train, unclip, write_job

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    from data_pipeline.shards import write_shards

    out = tmp_path_factory.mktemp("shards")
    write_shards("shapes", str(out), per_shard=16, count=64, size=32, seed=0)
    return f"{out}/shard-{{000000..000003}}.tar"


def test_clip_stage_trains_on_shards_and_exports_for_load_clip(shards, tmp_path):
    job = {
        "stage": "clip", "name": "tiny-clip", "model": {"name": "unclip-tiny"},
        "data": {"sources": [{"shards": shards}], "num_workers": 0, "image_size": 32, "shuffle_buffer": 16},
        "train": {"steps": 8, "micro_batch_size": 8, "log_every": 1},
        "optim": {"lr": 0.002, "schedule": "constant"},
        "deepspeed": {"zero_stage": 2, "timeout_s": 60},
        "checkpoint": {"every_steps": 8},
    }
    config = write_job(tmp_path / "clip.yaml", job)
    done = train(config, tmp_path / "run")
    assert done.returncode == 0, explain(done)
    loss = losses(tmp_path / "run")
    # contrastive loss over the job's batch of 16 (8 per rank, gathered): starts near ln(16)
    assert abs(loss[1] - torch.log(torch.tensor(16.0)).item()) < 0.5
    assert loss[8] < loss[1]
    out = tmp_path / "clip.safetensors"
    exported = unclip("export", str(tmp_path / "run"), "--out", str(out))
    assert exported.returncode == 0, explain(exported)
    from models.clip import load_clip

    adapter = load_clip("unclip-tiny", pretrained=str(out))
    weights = load_file(out)
    assert torch.equal(adapter.model.token_embedding.weight, weights["token_embedding.weight"])


def test_upsampler_trains_on_shards(shards, tmp_path):
    job = merged(
        TINY_UPSAMPLER,
        data={"sources": [{"shards": shards}], "num_workers": 0, "image_size": 16, "shuffle_buffer": 16},
        train={"steps": 10, "micro_batch_size": 8, "log_every": 1},
        deepspeed={"zero_stage": 1, "timeout_s": 60},
        checkpoint={"every_steps": 10},
    )
    config = write_job(tmp_path / "up.yaml", job)
    done = train(config, tmp_path / "run", nproc=1)
    assert done.returncode == 0, explain(done)
    loss = losses(tmp_path / "run")
    assert sum(loss[s] for s in (8, 9, 10)) < sum(loss[s] for s in (1, 2, 3)), loss


def test_prior_trains_on_precomputed_embeddings(shards, tmp_path):
    from data_pipeline.config import PrecomputeConfig
    from data_pipeline.precompute import run_precompute

    embeddings = tmp_path / "embeddings"
    cfg = PrecomputeConfig(clip={"name": "unclip-tiny"}, batch_size=32, text_encodings=True, num_workers=0)
    run_precompute(cfg, shards=shards, out=str(embeddings), rank=0, world_size=1, progress=False)
    training, held_out = shards.replace("000003}", "000002}"), shards.replace("{000000..000003}", "000003")
    job = {
        "stage": "prior", "name": "tiny-prior-real",
        "model": {"kind": "diffusion", "embed_dim": 64, "text_width": 64, "max_text_len": 32, "dim": 32, "depth": 1,
                  "heads": 2, "dim_head": 16, "ff_mult": 2, "diffusion": {"timesteps": 100, "sample_steps": 10}},
        "clip": {"name": "unclip-tiny"},
        "data": {"sources": [{"shards": training, "embeddings": str(embeddings)}], "num_workers": 0, "shuffle_buffer": 16,
                 "validation": [{"shards": held_out, "embeddings": str(embeddings)}]},
        "train": {"steps": 6, "micro_batch_size": 8, "log_every": 1},
        "optim": {"lr": 0.003, "schedule": "constant"},
        "deepspeed": {"zero_stage": 2, "timeout_s": 60},
        "checkpoint": {"every_steps": 3},
        "validation": {"every_steps": 3, "batches": 2, "sample_steps": 4},  # the held-out shard's 16 samples
    }
    config = write_job(tmp_path / "prior.yaml", job)
    done = train(config, tmp_path / "run")
    assert done.returncode == 0, explain(done)
    assert sorted(losses(tmp_path / "run")) == list(range(1, 7))
    import json

    records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    validated = {r["step"]: r for r in records if "unclip_validation_loss" in r}
    assert sorted(validated) == [3, 6]
    # the reference cosine is the held-out shard's own: every one of its samples, read apart
    from data_pipeline.config import DataConfig
    from data_pipeline.stream import build_loader

    data = DataConfig(sources=[{"shards": held_out, "embeddings": str(embeddings)}], resampled=False, num_workers=0)
    pairs = list(build_loader(data, batch_size=16, want={"image_embed", "text_embed"}))
    assert len(pairs) == 1 and len(pairs[0]["key"]) == 16
    cosine = torch.nn.functional.cosine_similarity(pairs[0]["image_embed"], pairs[0]["text_embed"]).mean()
    for record in validated.values():
        assert record["unclip_validation_prior_reference_text_cosine"] == pytest.approx(float(cosine), rel=1e-5)
        assert -1 <= record["unclip_validation_prior_image_cosine"] <= 1
    _check_one_pass_preparation(job)
    # the loader's position (per rank) is part of the checkpoint, for exact resume
    import json

    state = json.loads((tmp_path / "run" / "checkpoints" / "step_0000006" / "rank_00001.json").read_text())["loader"]
    assert state["rank"] == 1 and state["world_size"] == 2


def _check_one_pass_preparation(job: dict) -> None:
    """A preparation reads one pass over the training data (48 samples here), and the
    autoregressive prior's fit says so when it needs more."""
    from launch.config_files import build_job
    from models import stages
    from models.config import ConfigError
    from trainer.loop import open_loader

    model = {k: v for k, v in job["model"].items() if k != "diffusion"}
    ar = build_job({**job, "model": {**model, "kind": "autoregressive", "num_buckets": 16, "dot_buckets": 16,
                                     "pca_fit_embeddings": 49}, "validation": {}})
    spec = stages.get("prior")
    fields = spec.preparation_fields(ar)
    batches = list(open_loader(ar, spec, 0, 1, want=fields, one_pass=True))
    assert sum(len(b["key"]) for b in batches) == 48 and set(batches[0]) == {"key", *fields}
    with pytest.raises(ConfigError, match="on 49 training embeddings, but data.sources holds 48"):
        spec.preparation(ar)(spec.build(ar), open_loader(ar, spec, 0, 1, want=fields, one_pass=True))
