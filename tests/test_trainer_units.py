"""Trainer pieces in one process: LR schedule, sharded EMA, the DeepSpeed JSON, the
non-finite guard, resumable synthetic data, RNG capture, stage wiring."""

from __future__ import annotations

import math
import random

import numpy as np
import pytest
import torch
from torch import nn

from launch.config_files import build_job
from models import stages
from models.stages import StageContext
from models.weights import cut_shard, merge_shards, shard_bounds
from trainer import rng
from trainer.config import OptimConfig
from trainer.ema import ShardedEMA
from trainer.engine import GuardedAdamW, StageModule, deepspeed_config, param_groups
from trainer.lr import lr_at
from trainer.synthetic import SyntheticLoader
from tests.helpers import TINY_DECODER, TINY_PRIOR, merged


def test_lr_warmup_then_cosine_to_min():
    optim = OptimConfig(lr=1.0, warmup_steps=10, schedule="cosine", min_lr_ratio=0.1)
    assert lr_at(0, optim, 110) == pytest.approx(0.1)
    assert lr_at(9, optim, 110) == pytest.approx(1.0)
    assert lr_at(10, optim, 110) == pytest.approx(1.0)
    assert lr_at(60, optim, 110) == pytest.approx(0.1 + 0.9 * 0.5)
    assert lr_at(110, optim, 110) == pytest.approx(0.1)
    constant = OptimConfig(lr=0.5, warmup_steps=0, schedule="constant")
    assert {lr_at(s, constant, 100) for s in range(100)} == {0.5}


@pytest.mark.parametrize("numel, world", [(10, 3), (7, 2), (5, 8), (12, 4)])
def test_ema_shards_merge_back_for_any_world_size(numel, world):
    full = torch.randn(numel)
    shards = [cut_shard(full, r, world) for r in range(world)]
    assert all(s.numel() == math.ceil(numel / world) for s in shards)
    assert torch.equal(merge_shards(shards, (numel,)), full)
    assert shard_bounds(numel, world - 1, world)[1] >= numel


def test_sharded_ema_averages_and_recuts():
    model = nn.Linear(3, 5)
    emas = [ShardedEMA(model, decay=0.5, rank=r, world_size=2) for r in range(2)]
    start = {n: p.detach().clone() for n, p in model.named_parameters()}
    with torch.no_grad():
        for p in model.parameters():
            p.add_(1.0)
    for ema in emas:
        ema.decay = 0.5
        ema.update(step=100)  # decay_at(100) = min(0.5, 101/110) = 0.5
    merged_w = merge_shards([e.shadow["weight"] for e in emas], (5, 3))
    assert torch.allclose(merged_w, start["weight"] + 0.5)
    # the same EMA re-cut for 3 ranks holds the same numbers
    three = [ShardedEMA(model, decay=0.5, rank=r, world_size=3) for r in range(3)]
    for e in three:
        e.load_shards([dict(x.shadow) for x in emas])
    assert torch.equal(merge_shards([e.shadow["weight"] for e in three], (5, 3)), merged_w)


def test_deepspeed_json_is_derived_from_the_job():
    job = build_job(merged(TINY_PRIOR, train={"micro_batch_size": 4, "grad_accum": 3}, optim={"grad_clip": 0.5},
                           deepspeed={"zero_stage": 3, "precision": "auto", "extra": {"zero_optimization": {"overlap_comm": True}}}))
    cpu = deepspeed_config(job, world_size=2, device="cpu", n_params=5000)
    assert cpu["train_batch_size"] == 4 * 3 * 2 and cpu["gradient_accumulation_steps"] == 3
    assert cpu["gradient_clipping"] == 0.5 and cpu["zero_optimization"]["stage"] == 3
    assert not cpu["bf16"]["enabled"] and not cpu["fp16"]["enabled"]  # auto = fp32 on CPU
    assert cpu["zero_optimization"]["overlap_comm"] is True  # `extra` merged last
    assert cpu["zero_optimization"]["reduce_bucket_size"] % 1024 == 0
    gpu = deepspeed_config(job, world_size=8, device="cuda:0")
    assert gpu["bf16"]["enabled"] and gpu["zero_optimization"]["reduce_bucket_size"] == int(5e8)


def test_deepspeed_monitors_write_under_the_run_directory(tmp_path):
    extra = {"tensorboard": {"enabled": True}, "csv_monitor": {"enabled": True, "output_path": "csv", "job_name": "mine"},
             "wandb": {"enabled": False, "project": "p"}}
    job = build_job(merged(TINY_PRIOR, deepspeed={"extra": extra}))
    config = deepspeed_config(job, world_size=1, device="cpu", run_dir=tmp_path)
    assert config["tensorboard"] == {"enabled": True, "job_name": "tiny-prior", "output_path": str(tmp_path / "tensorboard")}
    assert config["csv_monitor"] == {"enabled": True, "job_name": "mine", "output_path": str(tmp_path / "csv")}
    assert config["wandb"] == {"enabled": False, "project": "p"}  # DeepSpeed's own settings
    assert job.deepspeed.extra["tensorboard"] == {"enabled": True}  # the job config is not touched
    absolute = build_job(merged(TINY_PRIOR, deepspeed={"extra": {"tensorboard": {"enabled": True, "output_path": "/tb"}}}))
    assert deepspeed_config(absolute, 1, "cpu", run_dir=tmp_path)["tensorboard"]["output_path"] == "/tb"


def test_a_monitor_without_its_package_fails_at_config_load():
    import importlib.util

    from models.config import ConfigError

    assert importlib.util.find_spec("comet_ml") is None
    with pytest.raises(ConfigError, match=r"deepspeed.extra.comet: needs the comet_ml package \(pip install comet_ml\)"):
        build_job(merged(TINY_PRIOR, deepspeed={"extra": {"comet": {"enabled": True}}}))
    build_job(merged(TINY_PRIOR, deepspeed={"extra": {"comet": {"enabled": False}}}))


def test_guarded_adamw_skips_non_finite_gradients():
    model = nn.Linear(2, 1)
    opt = GuardedAdamW(param_groups(model, 0.1), lr=0.1)
    before = [p.detach().clone() for p in model.parameters()]
    model(torch.tensor([[float("nan"), 1.0]])).sum().backward()
    opt.step()
    assert opt.skipped == 1 and all(torch.equal(a, b) for a, b in zip(before, model.parameters()))
    opt.zero_grad()
    model(torch.ones(1, 2)).sum().backward()
    opt.step()
    assert opt.skipped == 1 and not torch.equal(before[0], model.weight)
    # biases are not decayed
    groups = param_groups(model, 0.1)
    assert [g["weight_decay"] for g in groups] == [0.1, 0.0] and groups[1]["params"][0] is model.bias


def test_synthetic_loader_resumes_exactly_and_differs_per_rank():
    shapes = {"image_embed": (8,), "text_embed": (8,), "text_encodings": (4, 6), "text_mask": (4,)}
    a = SyntheticLoader(shapes, batch_size=3, rank=0)
    for _ in range(3):
        next(a)
    state = a.state_dict()
    expected = next(a)
    b = SyntheticLoader(shapes, batch_size=3, rank=0)
    b.load_state_dict(state)
    got = next(b)
    assert all(torch.equal(expected[k], got[k]) for k in shapes)
    other = SyntheticLoader(shapes, batch_size=3, rank=1)
    other.load_state_dict(state)
    assert not torch.equal(next(other)["text_embed"], expected["text_embed"])


def test_rng_capture_restore_every_stream():
    g = torch.Generator().manual_seed(1)
    plain, tensors = rng.capture(g)
    first = (random.random(), np.random.rand(), torch.rand(1).item(), torch.rand(1, generator=g).item())
    rng.restore(plain, tensors, g)
    assert (random.random(), np.random.rand(), torch.rand(1).item(), torch.rand(1, generator=g).item()) == first


@pytest.mark.parametrize("job", [TINY_PRIOR, TINY_DECODER], ids=["prior", "decoder"])
def test_stage_module_loss_is_reproducible_and_trains(job):
    job = build_job(job)
    spec = stages.get(job.stage)
    torch.manual_seed(0)
    module = StageModule(spec, spec.build(job), StageContext())
    shapes = {k: v for k, v in spec.field_shapes(job).items() if k in spec.fields(job)}
    batch = next(SyntheticLoader(shapes, batch_size=4, rank=0))
    module.generator.manual_seed(3)
    a = module(batch)
    module.generator.manual_seed(3)
    assert torch.equal(a, module(batch))  # the stage's randomness is its generator's
    a.backward()
    assert all(p.grad is not None for p in module.parameters() if p.requires_grad)


def test_zero_dim_parameters_train_as_shape_1_and_export_their_own_shape():
    class WithScalar(nn.Module):
        def __init__(self):
            super().__init__()
            self.scale = nn.Parameter(torch.tensor(2.0))

    module = StageModule(stages.get("prior"), WithScalar(), StageContext())
    assert module.model.scale.shape == (1,) and module.original_shapes == {"model.scale": ()}
