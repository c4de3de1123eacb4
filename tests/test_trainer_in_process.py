"""The trainer's engine in this process, one rank: under bf16 the EMA averages DeepSpeed's fp32
master weights (ZeRO-0, 2 and 3), and `train.compile` compiles the stage's model in place."""

from __future__ import annotations

import pytest
import torch

from models.config import ConfigError
from tests.helpers import TINY_DECODER, TINY_PRIOR, merged
from tests.process_group import process_group  # noqa: F401 - a pytest fixture
from trainer.ema import ShardedEMA


def full_masters(engine) -> dict[str, torch.Tensor]:
    """The fp32 master of every parameter, as DeepSpeed itself assembles it."""
    from deepspeed.utils import safe_get_full_fp32_param

    optimizer = engine.optimizer
    if hasattr(optimizer, "fp32_groups") and hasattr(optimizer, "fp16_groups"):  # ZeRO-0 (no ZeRO API)
        by_id = {id(lp): hp for lows, highs in zip(optimizer.fp16_groups, optimizer.fp32_groups)
                 for lp, hp in zip(lows, highs)}
        return {n: by_id[id(p)].detach().reshape(-1).double() for n, p in engine.module.named_parameters()}
    return {n: safe_get_full_fp32_param(p).reshape(-1).double() for n, p in engine.module.named_parameters()}


@pytest.mark.parametrize("zero_stage", [0, 2, 3])
def test_ema_under_bf16_averages_the_fp32_masters(process_group, zero_stage):
    from launch.config_files import build_job
    from models import stages
    from models.stages import StageContext
    from trainer import distributed as dist
    from trainer.engine import StageModule, build_engine
    from trainer.masters import master_pieces
    from trainer.synthetic import SyntheticLoader

    job = build_job(merged(TINY_PRIOR, deepspeed={"zero_stage": zero_stage, "precision": "bf16"},
                           optim={"lr": 0.02}, train={"ema_decay": 0.8, "micro_batch_size": 8}))
    spec = stages.get(job.stage)
    torch.manual_seed(0)
    engine, _ = build_engine(StageModule(spec, spec.build(job), StageContext()), job, 1, "cpu")
    ema = ShardedEMA(engine.module, 0.8, 0, 1, pieces=master_pieces(engine, 0, 1), all_reduce=dist.all_reduce_tensor)
    shapes = {k: v for k, v in spec.field_shapes(job).items() if k in spec.fields(job)}
    batches = SyntheticLoader(shapes, batch_size=8, rank=0)
    ref = full_masters(engine)
    working = {n: p.detach().reshape(-1).double() for n, p in engine.module.named_parameters()}
    for step in range(6):
        engine.backward(engine(next(batches)))
        engine.step()
        ema.update(step)
        d = ema.decay_at(step)
        masters = full_masters(engine)
        ref = {n: d * ref[n] + (1 - d) * masters[n] for n in ref}
        if zero_stage != 3:  # ZeRO-3's working copies are partitioned away between steps
            working = {n: d * working[n] + (1 - d) * p.detach().reshape(-1).double()
                       for n, p in engine.module.named_parameters()}
    state = ema.state_dict()
    worst_bf16 = 0.0
    for name, expect in ref.items():
        got = state[name][: expect.numel()].double()
        # fp32 arithmetic on fp32 masters: rounding ~1e-7 relative, nothing of bf16's 4e-3
        torch.testing.assert_close(got, expect, rtol=1e-6, atol=1e-7, msg=name)
        if zero_stage != 3:
            worst_bf16 = max(worst_bf16, float((working[name] - expect).abs().max()))
    if zero_stage != 3:
        assert worst_bf16 > 1e-4  # an EMA of the bf16 working copies would have failed the check above


def _trainer(job_dict, run_dir):
    from launch.config_files import build_job
    from trainer import distributed as dist
    from trainer.loop import Trainer

    return Trainer(build_job(job_dict), run_dir, dist.WorldInfo(0, 0, 1), "cpu")


def test_compile_switch_compiles_the_stage_model_in_place(process_group, tmp_path):
    before = torch.are_deterministic_algorithms_enabled()
    job = merged(TINY_PRIOR, train={**TINY_PRIOR["train"], "compile": "eager"}, deepspeed={"zero_stage": 2})
    trainer = _trainer(job, tmp_path / "run")
    try:
        trainer.setup(resume=False)
        model = trainer.module.model
        assert model._compiled_call_impl is not None  # compiled in place: same module, same state dict
        batch = next(trainer.loader)
        for _ in range(2):
            trainer.module.generator.manual_seed(5)
            compiled = trainer.module(batch)
            trainer.module.generator.manual_seed(5)
            with torch.compiler.set_stance("force_eager"):
                eager = trainer.module(batch)
            torch.testing.assert_close(compiled, eager)
        loss, _ = trainer._train_step()
        assert loss == loss  # a step of the compiled model trains (finite loss)
        with pytest.raises(ConfigError, match="train.compile: not with deepspeed.zero_stage 3"):
            zero3 = merged(TINY_DECODER, train={**TINY_DECODER["train"], "compile": "eager"})
            _trainer(zero3, tmp_path / "zero3").setup(resume=False)
    finally:
        trainer.close()
        torch.use_deterministic_algorithms(before)
