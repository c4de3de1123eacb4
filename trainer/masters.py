"""Where DeepSpeed keeps the fp32 master weights: for each trained parameter, the part this
rank holds, as a flat fp32 view (no copy) and its offset in the flattened parameter.

Under bf16/fp16 the module's parameters are low-precision working copies, rounded from the
fp32 masters that the optimizer updates; the EMA (trainer/ema.py) averages the masters, so
what sampling and export use carries no rounding of the working copies. The views point into
DeepSpeed's own buffers and move with them (the EMA reads them every step, never copies them):

    ZeRO-3                  the fp32 partition of each parameter, elements [r * p, (r + 1) * p)
                            (the same slice as its `ds_tensor`)
    ZeRO-1/2, bf16 wrapper  the fragment of each parameter inside this rank's flat fp32
                            partition (`param._hp_mapping`): any range, or none
    ZeRO-0 with bf16/fp16   the fp32 copy of each parameter, which every rank has whole: its
                            slice [r * p, (r + 1) * p) of it, so that the pieces do not overlap
    ZeRO-0 in fp32          the same slice of the parameter itself
"""

from __future__ import annotations

import dataclasses
from typing import Any

import torch
from torch import Tensor, nn

from models.weights import shard_bounds


@dataclasses.dataclass(frozen=True)
class MasterPiece:
    """Elements `[start, start + source.numel())` of a flattened parameter, as fp32."""

    start: int
    source: Tensor  # 1-D fp32 view of the master weights


def own_slice(full: Tensor, rank: int, world_size: int) -> MasterPiece:
    """Rank `rank`'s slice of a tensor that every rank holds whole."""
    flat = full.detach().view(-1)
    start, stop = shard_bounds(flat.numel(), rank, world_size)
    return MasterPiece(min(start, flat.numel()), flat[start:stop])


def frozen_piece(param: nn.Parameter, rank: int, world_size: int) -> MasterPiece:
    """A parameter that is not trained (no fp32 master): this rank's part of its value, its
    partition under ZeRO-3, else its own slice."""
    if hasattr(param, "ds_id"):
        return MasterPiece(param.ds_tensor.numel() * _partition_index(param), param.ds_tensor.detach().view(-1))
    return own_slice(param, rank, world_size)


def _piece_of(param: nn.Parameter, fp32_copies: dict[int, Tensor], rank: int, world_size: int) -> MasterPiece:
    if hasattr(param, "ds_id"):  # ZeRO-3
        zero3 = param._z3_optimizer
        group, offset, numel = zero3.grad_position[zero3.get_param_id(param)]
        flat = zero3.fp32_partitioned_groups_flat[group]
        return MasterPiece(param.ds_tensor.numel() * _partition_index(param), flat.narrow(0, offset, numel))
    if hasattr(param, "_hp_mapping"):  # ZeRO-1/2 (and DeepSpeed's bf16 optimizer)
        mapping = param._hp_mapping
        if mapping is None:  # no element of this parameter lives on this rank
            return MasterPiece(0, torch.empty(0, device=param.device))
        return MasterPiece(mapping.lp_fragment_address.start, mapping.get_hp_fragment())
    # ZeRO-0: the fp32 copy of a low-precision working parameter, or the (fp32) parameter itself
    return own_slice(fp32_copies.get(id(param), param), rank, world_size)


def _partition_index(param: nn.Parameter) -> int:
    import deepspeed.comm as ds_dist

    return ds_dist.get_rank(group=param.ds_process_group)


def _zero0_fp32_copies(optimizer: Any) -> dict[int, Tensor]:
    """ZeRO-0's bf16/fp16 wrappers keep an fp32 copy of each working parameter: the unfused
    one per parameter (`fp32_groups`), the fused one as a flat buffer per group."""
    out: dict[int, Tensor] = {}
    low = getattr(optimizer, "fp16_groups", None)
    if low is None:
        return out
    if hasattr(optimizer, "fp32_groups"):
        for lows, highs in zip(low, optimizer.fp32_groups):
            out.update({id(lp): hp for lp, hp in zip(lows, highs)})
    elif hasattr(optimizer, "fp32_groups_flat"):
        for lows, flat in zip(low, optimizer.fp32_groups_flat):
            offset = 0
            for lp in lows:
                out[id(lp)] = flat.narrow(0, offset, lp.numel())
                offset += lp.numel()
    return out


def master_pieces(engine: Any, rank: int, world_size: int) -> dict[str, MasterPiece]:
    """This rank's fp32 master piece of every trained parameter of `engine.module`, by name."""
    copies = _zero0_fp32_copies(engine.optimizer)
    pieces = {}
    for name, param in engine.module.named_parameters():
        if not param.requires_grad:
            continue
        piece = _piece_of(param, copies, rank, world_size)
        if piece.source.numel() and piece.source.dtype != torch.float32:
            raise RuntimeError(f"EMA: the master weights of {name} are {piece.source.dtype}, not fp32")
        pieces[name] = piece
    return pieces
