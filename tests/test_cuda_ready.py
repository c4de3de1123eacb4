"""What makes the trainer ready for GPUs, checked on the CPU: PyTorch's plain kernels compute
what the CPU-tuned ones do, the fused non-finite check, the grid's columns dealt over the
ranks, `train.deterministic`. (`train.compile` in a real trainer: tests/test_trainer_in_process.py.)"""

from __future__ import annotations

import pytest
import torch

from models import unet
from launch.config_files import build_job
from tests.helpers import TINY_PRIOR, merged
from trainer.engine import all_finite
from trainer.loop import deterministic
from trainer.samples import MAX_IMAGES, share

CFG = unet.UNetConfig(base_channels=16, channel_mults=(1, 2), num_res_blocks=1, attention_resolutions=(8,),
                      head_channels=8, norm_groups=4)


def test_plain_kernels_compute_what_the_cpu_tuned_ones_do(monkeypatch):
    torch.manual_seed(0)
    model = unet.UNet(CFG, 3, 3, context_dim=8, image_size=16)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn_like(p) * 0.1)  # zero-initialised outputs would hide everything
    x, t = torch.randn(2, 3, 16, 16), torch.tensor([3, 700])
    context = torch.randn(2, 5, 8)
    results = []
    for devices in (frozenset({"cpu"}), frozenset()):  # tuned, then what a GPU runs
        monkeypatch.setattr(unet, "TUNED_DEVICES", devices)
        model.zero_grad()
        out = model(x, t, context=context)
        out.square().mean().backward()
        results.append((out.detach(), [p.grad.clone() for p in model.parameters()]))
    (tuned, tuned_grads), (plain, plain_grads) = results
    assert not tuned.is_contiguous() and plain.is_contiguous()  # channels-last only where tuned
    torch.testing.assert_close(plain, tuned, rtol=1e-4, atol=1e-5)
    for a, b in zip(plain_grads, tuned_grads):
        torch.testing.assert_close(a, b, rtol=1e-3, atol=1e-5)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_all_finite_checks_every_tensor_at_once(dtype):
    grads = [torch.randn(5, dtype=dtype), torch.randn(3, 4, dtype=dtype), torch.randn(2, dtype=torch.float32)]
    assert all_finite(grads)
    for bad in (float("nan"), float("inf"), -float("inf")):
        spoiled = [g.clone() for g in grads]
        spoiled[1][2, 3] = bad
        assert not all_finite(spoiled)
        assert torch.equal(spoiled[0], grads[0])  # the check leaves finite values exactly as they were


@pytest.mark.parametrize("world", [1, 2, 3, 8, 20])
@pytest.mark.parametrize("micro_batch", [1, 4, 32])
def test_grid_columns_are_dealt_over_the_ranks(world, micro_batch):
    counts = [share(r, world, micro_batch) for r in range(world)]
    assert sum(counts) == min(MAX_IMAGES, micro_batch)
    assert max(counts) - min(counts) <= 1


def test_deterministic_by_default_on_cpu_only():
    job = build_job(TINY_PRIOR)
    assert deterministic(job, "cpu") and not deterministic(job, "cuda:0")
    forced = build_job(merged(TINY_PRIOR, train={**TINY_PRIOR["train"], "deterministic": True}))
    assert deterministic(forced, "cuda:3")
