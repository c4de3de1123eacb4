"""Exponential moving average of the fp32 master weights, sharded like ZeRO shards them.

Each rank averages only the fp32 master elements it holds (`trainer/masters.py`: under
bf16/fp16 those are the optimizer's fp32 weights, not the rounded working copies), in one
foreach kernel per step over views prepared once: no copies, no communication, no host sync.
So the EMA costs 4 bytes per parameter per job, not per rank, under every ZeRO stage.

On disk (and for export and resume at another world size) the EMA has one layout whatever
DeepSpeed's: rank r of W holds elements `[r * p, (r + 1) * p)` of each flattened parameter,
`p = ceil(numel / W)`, zero padded (`models/weights.py`). ZeRO-0 and ZeRO-3 hold exactly
those elements; ZeRO-1/2 partition one flat buffer of all parameters instead, so their
pieces are re-cut into that layout when saved and back when loaded (a few collectives per
checkpoint, never per step). The EMA weights are what sampling and export use.
"""

from __future__ import annotations

import math
from typing import Callable, Iterator, Mapping, Optional

import torch
from torch import Tensor, nn

from models.weights import cut_shard, merge_shards, shard_bounds
from trainer.masters import MasterPiece, frozen_piece, own_slice

BUCKET_ELEMENTS = 1 << 26  # full parameters assembled at a time when re-cutting (256 MiB fp32)


def module_pieces(module: nn.Module, rank: int, world_size: int) -> dict[str, MasterPiece]:
    """Without DeepSpeed: every rank holds every parameter; its piece is its own slice."""
    return {name: own_slice(p, rank, world_size) for name, p in module.named_parameters() if p.requires_grad}


def full_shape(param: nn.Parameter) -> tuple[int, ...]:
    return tuple(getattr(param, "ds_shape", None) or param.shape)


class ShardedEMA:
    """`shadow[name]`: this rank's fp32 EMA of the elements `[start, start + n)` of parameter
    `name` that it holds the master weights of (`own_slices` says whether those are exactly
    its on-disk slices on every rank)."""

    def __init__(
        self, module: nn.Module, decay: float, rank: int, world_size: int,
        pieces: Optional[Mapping[str, MasterPiece]] = None,
        all_reduce: Optional[Callable[[Tensor], None]] = None,
    ) -> None:
        self.decay = decay
        self.rank, self.world_size = rank, world_size
        params = dict(module.named_parameters())
        # A frozen parameter (e.g. Karlo's last-step super-resolution UNet) is its own average
        # and has no fp32 master: it is kept as it is, so that the checkpoints' EMA, which
        # export and sampling load, holds the whole model. Only the trained ones are updated.
        self.frozen = {name for name, p in params.items() if not p.requires_grad}
        self.shapes = {name: full_shape(p) for name, p in params.items()}
        self.numels = {name: math.prod(shape) for name, shape in self.shapes.items()}
        # sums a tensor over the ranks in place (torch.distributed.all_reduce); None: one rank
        self._all_reduce = all_reduce
        pieces = module_pieces(module, rank, world_size) if pieces is None else pieces
        pieces = {**{name: frozen_piece(params[name], rank, world_size) for name in self.frozen}, **pieces}
        self.starts = {name: pieces[name].start for name in params}
        canonical = all(self._is_own_slice(name, pieces[name]) for name in params)
        self.own_slices = self._everywhere(canonical)
        self.shadow = {name: self._initial_shadow(name, pieces[name].source) for name in params}
        self.bind(pieces)

    # ------------------------------------------------------------------ layout
    def _valid(self, name: str, numel: int) -> int:
        """Elements of a piece of `numel` that lie inside the parameter (no padding)."""
        return max(0, min(numel, self.numels[name] - self.starts[name]))

    def _is_own_slice(self, name: str, piece: MasterPiece) -> bool:
        start, stop = shard_bounds(self.numels[name], self.rank, self.world_size)
        if start >= self.numels[name]:
            return piece.source.numel() == 0 or piece.start == start
        return piece.start == start and piece.source.numel() >= min(stop, self.numels[name]) - start

    def _everywhere(self, local: bool) -> bool:
        if self._all_reduce is None:
            return local
        flag = torch.tensor([0.0 if local else 1.0], dtype=torch.float64)
        self._all_reduce(flag)
        return flag.item() == 0

    def _initial_shadow(self, name: str, source: Tensor) -> Tensor:
        n = self._valid(name, source.numel())
        if self.own_slices:  # padded to the on-disk slice length
            start, stop = shard_bounds(self.numels[name], self.rank, self.world_size)
            out = torch.zeros(stop - start, dtype=torch.float32, device=source.device)
        else:
            out = torch.zeros(n, dtype=torch.float32, device=source.device)
        out[:n] = source[:n].float()
        return out

    def bind(self, pieces: Mapping[str, MasterPiece]) -> None:
        """Point the averages at `pieces` (the same elements as at construction, e.g. after
        DeepSpeed loaded a checkpoint into its buffers): the views each update reads."""
        self._targets: list[Tensor] = []
        self._sources: list[Tensor] = []
        self._casts: list[tuple[Tensor, Tensor]] = []  # sources that are not fp32 (no master)
        for name, shadow in self.shadow.items():
            if name in self.frozen:
                continue
            piece = pieces[name]
            if piece.start != self.starts[name]:
                raise ValueError(f"EMA: {name} moved from element {self.starts[name]} to {piece.start}")
            n = self._valid(name, piece.source.numel())
            if n == 0:
                continue
            target, source = shadow[:n], piece.source[:n]
            if source.dtype == torch.float32 and source.device == target.device:
                self._targets.append(target)
                self._sources.append(source)
            else:
                self._casts.append((target, source))

    # ------------------------------------------------------------------ averaging
    def decay_at(self, step: int) -> float:
        # Warm up the average so that early, random weights do not dominate it for ~1/(1-decay)
        # steps; a function of the step only, so a resumed run averages identically.
        return min(self.decay, (1 + step) / (10 + step))

    @torch.no_grad()
    def update(self, step: int) -> None:
        """shadow = d * shadow + (1 - d) * master, every piece in one foreach kernel."""
        weight = 1.0 - self.decay_at(step)
        if self._targets:
            torch._foreach_lerp_(self._targets, self._sources, weight)
        for target, source in self._casts:
            target.lerp_(source.to(target), weight)

    # ------------------------------------------------------------------ the on-disk layout
    def state_dict(self) -> dict[str, Tensor]:
        """This rank's on-disk slices, on CPU. A collective when the pieces are not them."""
        if self.own_slices:
            return {name: t.cpu() for name, t in self.shadow.items()}
        out = {}
        for name, full in self.full_tensors():
            start, stop = shard_bounds(full.numel(), self.rank, self.world_size)
            out[name] = _padded(full[start:stop], stop - start).cpu()
        return out

    def full_tensors(self) -> Iterator[tuple[str, Tensor]]:
        """Every parameter's whole flattened fp32 EMA, in order (a collective on every rank:
        each contributes its pieces; a few parameters are assembled at a time)."""
        names = list(self.shadow)
        for bucket in _buckets(names, self.numels):
            sizes = [self.numels[n] for n in bucket]
            device = self.shadow[bucket[0]].device
            flat = torch.zeros(sum(sizes), dtype=torch.float32, device=device)
            offset = 0
            for name, size in zip(bucket, sizes):
                n = self._valid(name, self.shadow[name].numel())
                start = offset + self.starts[name]
                flat[start : start + n] = self.shadow[name][:n]
                offset += size
            if self._all_reduce is not None:
                self._all_reduce(flat)  # disjoint pieces: the sum adds only zeros, exactly
            yield from zip(bucket, flat.split(sizes))

    def load_own(self, shard: Mapping[str, Tensor]) -> None:
        """Restore this rank's on-disk slices, saved by the same rank at the same world size
        (a collective when the pieces are not those slices)."""
        self._check(shard)
        if self.own_slices:
            for name, t in self.shadow.items():
                t.copy_(shard[name].float().to(t.device).reshape(-1))
            return
        names = list(self.shadow)
        for bucket in _buckets(names, self.numels):
            padded = [shard_bounds(self.numels[n], self.rank, self.world_size) for n in bucket]
            sizes = [self.world_size * (stop - start) for start, stop in padded]
            device = self.shadow[bucket[0]].device
            flat = torch.zeros(sum(sizes), dtype=torch.float32, device=device)
            offset = 0
            for name, (start, stop), size in zip(bucket, padded, sizes):
                flat[offset + start : offset + stop] = shard[name].float().reshape(-1).to(device)
                offset += size
            if self._all_reduce is not None:
                self._all_reduce(flat)
            for name, full in zip(bucket, flat.split(sizes)):
                self._take(name, full)

    def load_shards(self, shards_by_rank: list[Mapping[str, Tensor]]) -> None:
        """Restore from the EMA shards of every rank of a checkpoint at another world size."""
        self._check(shards_by_rank[0])
        for name in self.shadow:
            self._take(name, merge_shards([s[name] for s in shards_by_rank], (self.numels[name],)))

    def _take(self, name: str, full: Tensor) -> None:
        """Set this rank's part of `name` from its whole flattened EMA."""
        t = self.shadow[name]
        if self.own_slices:
            t.copy_(cut_shard(full[: self.numels[name]], self.rank, self.world_size).to(t.device))
        else:
            n = self._valid(name, t.numel())
            start = self.starts[name]
            t[:n].copy_(full[start : start + n].to(t.device))

    def _check(self, shard: Mapping[str, Tensor]) -> None:
        missing = sorted(set(self.shadow) - set(shard))
        if missing:
            raise ValueError(f"checkpoint EMA lacks parameters: {', '.join(missing[:5])}")


def _padded(t: Tensor, length: int) -> Tensor:
    out = torch.zeros(length, dtype=t.dtype, device=t.device)
    out[: t.numel()] = t
    return out


def _buckets(names: list[str], numels: Mapping[str, int]) -> Iterator[list[str]]:
    bucket: list[str] = []
    size = 0
    for name in names:
        if bucket and size + numels[name] > BUCKET_ELEMENTS:
            yield bucket
            bucket, size = [], 0
        bucket.append(name)
        size += numels[name]
    if bucket:
        yield bucket
