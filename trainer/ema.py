"""Exponential moving average of the weights, sharded like ZeRO-3 shards parameters.

Each rank keeps, for every parameter, an fp32 EMA of only its slice of the flattened
parameter: elements `[rank * p, (rank + 1) * p)` with `p = ceil(numel / world_size)` (zero
padded), which is exactly the partition ZeRO-3 keeps in `param.ds_tensor`. So the EMA costs
4 bytes per parameter per job, not per rank, under every ZeRO stage; it stays on the
parameter's device (no host copies per step), and a checkpoint's EMA shards can be merged
into full tensors (export) or re-cut for another world size (resume).
The EMA weights are what sampling and export use.
"""

from __future__ import annotations

from typing import Mapping

import torch
from torch import Tensor, nn

from models.weights import cut_shard, merge_shards


def _local_view(param: nn.Parameter, rank: int, world_size: int) -> Tensor:
    """This rank's slice of `param`'s current value, as fp32 on the parameter's device."""
    ds_tensor = getattr(param, "ds_tensor", None)
    if ds_tensor is not None:  # ZeRO-3: the partition is all this rank holds
        return ds_tensor.detach().reshape(-1).float()
    return cut_shard(param.data, rank, world_size)


def full_shape(param: nn.Parameter) -> tuple[int, ...]:
    return tuple(getattr(param, "ds_shape", None) or param.shape)


class ShardedEMA:
    """`shadow[name]` = this rank's fp32 EMA slice of parameter `name`."""

    def __init__(self, module: nn.Module, decay: float, rank: int, world_size: int) -> None:
        self.decay = decay
        self.rank, self.world_size = rank, world_size
        # Every parameter: a frozen one (e.g. Karlo's last-step super-resolution UNet) is its
        # own average, and the checkpoints' EMA is what export and sampling load. Only the
        # trained ones are updated.
        self.params = dict(module.named_parameters())
        self.trained = [name for name, p in self.params.items() if p.requires_grad]
        self.shapes = {name: full_shape(p) for name, p in self.params.items()}
        self.shadow = {name: _local_view(p, rank, world_size) for name, p in self.params.items()}

    def decay_at(self, step: int) -> float:
        # Warm up the average so that early, random weights do not dominate it for ~1/(1-decay)
        # steps; a function of the step only, so a resumed run averages identically.
        return min(self.decay, (1 + step) / (10 + step))

    @torch.no_grad()
    def update(self, step: int) -> None:
        d = self.decay_at(step)
        for name in self.trained:
            self.shadow[name].mul_(d).add_(_local_view(self.params[name], self.rank, self.world_size), alpha=1 - d)

    def state_dict(self) -> dict[str, Tensor]:
        """This rank's slices, on CPU."""
        return {name: t.cpu() for name, t in self.shadow.items()}

    def load_own(self, shard: Mapping[str, Tensor]) -> None:
        """Restore this rank's slices, saved by the same rank at the same world size."""
        self._check(shard)
        self.shadow = {name: shard[name].float().to(self.shadow[name].device).clone() for name in self.shadow}

    def load_shards(self, shards_by_rank: list[Mapping[str, Tensor]]) -> None:
        """Restore from the EMA shards of every rank of a checkpoint at another world size."""
        self._check(shards_by_rank[0])
        for name in self.shadow:
            full = merge_shards([s[name] for s in shards_by_rank], self.shapes[name])
            self.shadow[name] = cut_shard(full, self.rank, self.world_size).to(self.shadow[name].device)

    def _check(self, shard: Mapping[str, Tensor]) -> None:
        missing = sorted(set(self.shadow) - set(shard))
        if missing:
            raise ValueError(f"checkpoint EMA lacks parameters: {', '.join(missing[:5])}")
