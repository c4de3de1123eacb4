"""On a CUDA GPU: a bf16 step of every stage, the EMA of the fp32 masters, sampling, and a
checkpoint round trip, each as a user runs it (`unclip train --nproc 1`, exported weights).

Marked `cuda` and skipped without a GPU; `benchmarks/gpu_check.sh` runs them first
(`pytest -m cuda tests/test_cuda.py`) and records the outcome in benchmarks/RESULTS_gpu.md.
"""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from tests.helpers import TINY_DECODER, TINY_PRIOR, TINY_UPSAMPLER, explain, losses, merged, train, unclip, write_job

pytestmark = [
    pytest.mark.cuda,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (benchmarks/gpu_check.sh runs these)"),
]

GPU = {"DS_ACCELERATOR": "cuda"}
BF16 = {"precision": "bf16", "timeout_s": 120}

TINY_CLIP = {"stage": "clip", "name": "tiny-clip", "model": {"name": "unclip-tiny"},
             "optim": {"lr": 0.002, "schedule": "constant"}}
STAGES = {"clip": TINY_CLIP, "prior": TINY_PRIOR, "decoder": TINY_DECODER, "upsampler": TINY_UPSAMPLER}
IMAGE_STAGES = ("decoder", "upsampler")


def gpu_job(base: dict, **sections) -> dict:
    job = merged(base, deepspeed={**base.get("deepspeed", {}), **BF16},
                 train={"steps": 4, "micro_batch_size": 4, "log_every": 1, "seed": 0},
                 checkpoint={"every_steps": 2, "keep_last": 4})
    return merged(job, **sections)


def step_dir(run_dir: Path, step: int) -> Path:
    return run_dir / "checkpoints" / f"step_{step:07d}"


def ema_of(run_dir: Path, step: int) -> dict[str, torch.Tensor]:
    return {k.removeprefix("ema/"): v for k, v in load_file(step_dir(run_dir, step) / "rank_00000.safetensors").items()
            if k.startswith("ema/")}


def fp32_masters(run_dir: Path, step: int) -> dict[str, torch.Tensor]:
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    from trainer.safe_load import weights_only_loads

    with weights_only_loads():
        return get_fp32_state_dict_from_zero_checkpoint(str(run_dir / "checkpoints"), tag=step_dir(run_dir, step).name)


@pytest.mark.parametrize("stage", sorted(STAGES))
def test_a_bf16_step_of_every_stage(stage, tmp_path):
    job = gpu_job(STAGES[stage])
    if stage in IMAGE_STAGES:
        job["train"]["sample_every"] = 2
    done = train(write_job(tmp_path / f"{stage}.yaml", job), tmp_path / "run", nproc=1, env=GPU)
    assert done.returncode == 0, explain(done)
    loss = losses(tmp_path / "run")
    assert sorted(loss) == [1, 2, 3, 4] and all(math.isfinite(v) for v in loss.values()), loss
    meta = json.loads((step_dir(tmp_path / "run", 4) / "meta.json").read_text())
    assert meta["precision"] == "bf16"
    if stage in IMAGE_STAGES:  # sample grids made on the GPU from the EMA
        assert sorted(p.name for p in (tmp_path / "run" / "samples").glob("*.png")) == [
            "step_0000002.png", "step_0000004.png"]


def test_ema_is_the_fp32_masters_not_the_bf16_copies(tmp_path):
    # decay 0: the EMA is the last master weights themselves, so it can be compared exactly
    job = gpu_job(TINY_PRIOR, train={"ema_decay": 0.0}, deepspeed={**BF16, "zero_stage": 2})
    done = train(write_job(tmp_path / "prior.yaml", job), tmp_path / "run", nproc=1, env=GPU)
    assert done.returncode == 0, explain(done)
    ema, masters = ema_of(tmp_path / "run", 4), fp32_masters(tmp_path / "run", 4)
    working = torch.load(step_dir(tmp_path / "run", 4) / "mp_rank_00_model_states.pt", map_location="cpu",
                         weights_only=True)["module"]
    rounded = 0
    for name, master in masters.items():
        assert torch.equal(ema[name][: master.numel()], master.reshape(-1).float()), name
        rounded += not torch.equal(working[name].float(), master.float())
    assert rounded  # the bf16 working copies differ from the masters the EMA follows


def test_checkpoint_round_trip_on_the_gpu(tmp_path):
    job = gpu_job(TINY_PRIOR, train={"steps": 6, "deterministic": True}, checkpoint={"every_steps": 3})
    config = write_job(tmp_path / "prior.yaml", job)
    whole = tmp_path / "whole"
    done = train(config, whole, nproc=1, env=GPU)
    assert done.returncode == 0, explain(done)
    resumed = tmp_path / "resumed"
    (resumed / "checkpoints").mkdir(parents=True)
    shutil.copytree(step_dir(whole, 3), step_dir(resumed, 3))
    (resumed / "checkpoints" / "latest").write_text(step_dir(resumed, 3).name)
    done = train(config, resumed, nproc=1, env=GPU)
    assert done.returncode == 0, explain(done)
    assert "resumed from" in done.stdout and min(losses(resumed)) == 4
    for a, b in ((ema_of(whole, 6), ema_of(resumed, 6)), (fp32_masters(whole, 6), fp32_masters(resumed, 6))):
        assert a.keys() == b.keys()
        for k in a:  # the weights, Adam's moments and every random stream came back
            torch.testing.assert_close(a[k], b[k], rtol=1e-3, atol=1e-4, msg=k)
    assert losses(resumed)[6] == pytest.approx(losses(whole)[6], rel=1e-2)


def test_sampling_on_the_gpu_matches_the_cpu(tmp_path):
    from models import stages
    from models.stages import load_weights

    job = gpu_job(TINY_DECODER)
    config = write_job(tmp_path / "decoder.yaml", job)
    done = train(config, tmp_path / "run", nproc=1, env=GPU)
    assert done.returncode == 0, explain(done)
    out = tmp_path / "decoder.safetensors"
    exported = unclip("export", str(tmp_path / "run"), "--out", str(out), env=GPU)
    assert exported.returncode == 0, explain(exported)
    from launch.config_files import build_job

    cfg = build_job(job)
    spec = stages.get("decoder")
    weights = load_file(out)
    g = torch.Generator().manual_seed(0)
    embed = torch.nn.functional.normalize(torch.randn(2, cfg.model.image_embed_dim, generator=g), dim=-1)
    text = torch.randn(2, cfg.model.max_text_len, cfg.model.text_width, generator=g)
    mask = torch.ones(2, cfg.model.max_text_len, dtype=torch.bool)
    start = torch.randn(2, 3, 8, 8, generator=g)  # the same x_T for both devices
    images = {}
    for device in ("cpu", "cuda"):
        model = load_weights(spec.build(cfg), weights, "decoder").to(device).eval()
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=device == "cuda"):
            images[device] = model.sample(embed.to(device), text_encodings=text.to(device), text_mask=mask.to(device),
                                          noise=start.to(device), sampler="ddim", eta=0.0).float().cpu()
    assert images["cuda"].shape == (2, 3, 8, 8) and torch.isfinite(images["cuda"]).all()
    # DDIM with eta 0 from one x_T is deterministic: GPU bf16 and CPU fp32 differ by rounding only
    diff = (images["cuda"] - images["cpu"]).abs()
    assert diff.mean() < 0.05 and diff.max() < 0.3, (diff.mean(), diff.max())
