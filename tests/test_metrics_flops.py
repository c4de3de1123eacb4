"""trainer.flops: FLOPs are counted from what runs (frozen parts cost no backward)."""

import math

import pytest
import torch
from torch import nn

from trainer.flops import count_flops, counted, flops_per_sample, measure_peak_flops


def test_frozen_layers_cost_a_forward_only():
    torch.manual_seed(0)
    frozen, trained = nn.Linear(16, 32, bias=False), nn.Linear(32, 8, bias=False)
    frozen.requires_grad_(False)
    model = nn.Sequential(frozen, trained)
    x = torch.randn(4, 16)
    per_sample = flops_per_sample(model, lambda: model(x).square().mean(), batch_size=4)
    # frozen: forward 2*16*32; trained: forward 2*32*8 + weight grad 2*32*8, and no input
    # grad since nothing before it needs one. The "3 x forward" rule would say 6*(512+256).
    assert per_sample == 2 * 16 * 32 + 4 * 32 * 8
    assert all(p.grad is None for p in model.parameters())  # the count leaves no gradients behind


def test_all_trainable_is_three_forwards_after_the_first_layer():
    a, b = nn.Linear(16, 32, bias=False), nn.Linear(32, 8, bias=False)
    model = nn.Sequential(a, b)
    x = torch.randn(2, 16)
    total = count_flops(lambda: model(x).sum().backward())
    # first layer: forward + weight grad (its input needs no grad); second: 3x
    assert total == 2 * (2 * 2 * 16 * 32) + 3 * (2 * 2 * 32 * 8)


def test_bad_batch_size_is_rejected():
    with pytest.raises(ValueError, match="batch_size"):
        flops_per_sample(nn.Linear(2, 2), lambda: torch.zeros(()), batch_size=0)


def test_measured_peak_is_a_plausible_rate():
    peak = measure_peak_flops(seconds=0.02, size=64)
    assert math.isfinite(peak) and 1e6 < peak < 1e15


def test_counted_returns_the_steps_result():
    layer = nn.Linear(4, 3, bias=False)
    x = torch.randn(5, 4)

    def step():
        loss = layer(x).sum()
        loss.backward()
        return loss

    loss, flops = counted(step)
    assert torch.isfinite(loss) and flops == 2 * (2 * 5 * 4 * 3)  # forward + weight grad
