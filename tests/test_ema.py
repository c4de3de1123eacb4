"""The EMA's on-disk shards have one layout whatever pieces of the parameters each rank holds:
ranks as threads (their all-reduce a real sum across them) with ZeRO-1/2-style pieces of one
flat partition. (The masters under DeepSpeed: tests/test_trainer_in_process.py.)"""

from __future__ import annotations

import math
import threading

import pytest
import torch
from torch import nn

from models.weights import merge_shards
from trainer.ema import ShardedEMA
from trainer.masters import MasterPiece


class ThreadRanks:
    """`world` ranks as threads; `all_reduce(rank)` sums a tensor across them in place."""

    def __init__(self, world: int) -> None:
        self.world = world
        self.barrier = threading.Barrier(world)
        self.slots: list[torch.Tensor] = [torch.empty(0)] * world

    def all_reduce(self, rank: int):
        def reduce(t: torch.Tensor) -> None:
            self.slots[rank] = t.clone()
            self.barrier.wait()
            total = sum(self.slots[r] for r in range(self.world))
            self.barrier.wait()
            t.copy_(total)

        return reduce

    def run(self, fn) -> list:
        out: list = [None] * self.world
        errors: list = []

        def target(rank: int) -> None:
            try:
                out[rank] = fn(rank)
            except BaseException as err:  # noqa: BLE001 - re-raised in the main thread
                errors.append(err)
                self.barrier.abort()

        threads = [threading.Thread(target=target, args=(r,)) for r in range(self.world)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=60)
        if errors:
            raise errors[0]
        return out


def flat_partition_pieces(module: nn.Module, rank: int, world: int) -> tuple[dict[str, MasterPiece], torch.Tensor]:
    """ZeRO-1/2's layout: all parameters flattened into one buffer, cut into `world` equal
    partitions; each rank's fp32 piece of a parameter is its overlap with that rank's partition."""
    params = [(n, p) for n, p in module.named_parameters()]
    total = sum(p.numel() for _, p in params)
    size = math.ceil(total / world)
    lo, hi = rank * size, min((rank + 1) * size, total)
    flat = torch.cat([p.detach().reshape(-1) for _, p in params])[lo:hi].clone()
    pieces, offset = {}, 0
    for name, p in params:
        a, b = max(lo, offset), min(hi, offset + p.numel())
        if a < b:
            pieces[name] = MasterPiece(a - offset, flat[a - lo : b - lo])
        else:
            pieces[name] = MasterPiece(0, flat[:0])
        offset += p.numel()
    return pieces, flat


def test_pieces_of_a_flat_partition_average_and_save_in_the_shard_layout():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 7), nn.Linear(7, 3))  # 42 + 24 elements over 3 ranks of 22
    world, steps, decay = 3, 4, 0.7
    ranks = ThreadRanks(world)
    updates = [torch.randn(sum(p.numel() for p in model.parameters())) for _ in range(steps)]

    def rank_run(rank: int):
        pieces, flat = flat_partition_pieces(model, rank, world)
        ema = ShardedEMA(model, decay, rank, world, pieces=pieces, all_reduce=ranks.all_reduce(rank))
        assert not ema.own_slices  # the pieces cross parameter boundaries: re-cut on save
        size = flat.numel()
        for step, delta in enumerate(updates):
            flat.add_(delta[rank * math.ceil(delta.numel() / world) :][:size])  # the optimizer step
            ema.update(step)
        saved = ema.state_dict()
        other = ShardedEMA(model, decay, rank, world, pieces=flat_partition_pieces(model, rank, world)[0],
                           all_reduce=ranks.all_reduce(rank))
        other.load_own(saved)
        return saved, {k: v.clone() for k, v in other.shadow.items()}, {k: v.clone() for k, v in ema.shadow.items()}

    results = ranks.run(rank_run)
    # the reference: the same averages over whole tensors
    full = torch.cat([p.detach().reshape(-1) for p in model.parameters()]).clone()
    ref = full.clone()
    for step, delta in enumerate(updates):
        full.add_(delta)
        d = min(decay, (1 + step) / (10 + step))
        ref = d * ref + (1 - d) * full
    offset = 0
    for name, p in model.named_parameters():
        expect = ref[offset : offset + p.numel()]
        offset += p.numel()
        shards = [saved[name] for saved, _, _ in results]
        assert all(s.numel() == math.ceil(p.numel() / world) for s in shards)  # the on-disk layout
        torch.testing.assert_close(merge_shards(shards, (p.numel(),)), expect, rtol=1e-6, atol=1e-6)
    for _, loaded, own in results:  # load_own puts every piece back where it was
        assert all(torch.equal(loaded[k], own[k]) for k in own)
