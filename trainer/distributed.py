"""Process-group set-up: rank discovery from any launcher, the accelerator, timeouts.

Rank discovery reads torchrun/DeepSpeed (`RANK`, `LOCAL_RANK`, `WORLD_SIZE`), SLURM
(`SLURM_PROCID`, ...) and MPI (`OMPI_COMM_WORLD_*`, `PMI_*`) variables alike, in that order,
so the same worker runs under `unclip launch`, torchrun, `srun` or `mpirun`. On a machine
without CUDA the same code runs on DeepSpeed's CPU accelerator with gloo.
"""

from __future__ import annotations

import dataclasses
import os
from datetime import timedelta
from typing import Any, Optional

import torch

_RANK_VARS = ("RANK", "SLURM_PROCID", "OMPI_COMM_WORLD_RANK", "PMI_RANK")
_LOCAL_RANK_VARS = ("LOCAL_RANK", "SLURM_LOCALID", "OMPI_COMM_WORLD_LOCAL_RANK", "MPI_LOCALRANKID")
_WORLD_VARS = ("WORLD_SIZE", "SLURM_NTASKS", "OMPI_COMM_WORLD_SIZE", "PMI_SIZE")


@dataclasses.dataclass(frozen=True)
class WorldInfo:
    rank: int
    local_rank: int
    world_size: int


def _first_int(env: dict[str, str], names: tuple[str, ...], default: int) -> int:
    for name in names:
        value = env.get(name)
        if value not in (None, ""):
            try:
                return int(value)
            except ValueError:
                raise ValueError(f"environment variable {name}={value!r} is not an integer") from None
    return default


def world_info_from_env(env: Optional[dict[str, str]] = None) -> WorldInfo:
    """(rank, local rank, world size) from torchrun, SLURM or MPI variables; (0, 0, 1) alone."""
    env = dict(os.environ if env is None else env)
    info = WorldInfo(
        rank=_first_int(env, _RANK_VARS, 0),
        local_rank=_first_int(env, _LOCAL_RANK_VARS, 0),
        world_size=_first_int(env, _WORLD_VARS, 1),
    )
    if not 0 <= info.rank < info.world_size:
        raise ValueError(f"rank {info.rank} is outside world size {info.world_size} (check the launcher's variables)")
    return info


def has_cuda() -> bool:
    return torch.cuda.is_available()


def select_accelerator() -> str:
    """'cuda' or 'cpu'; on CPU, tell DeepSpeed before it is imported."""
    if has_cuda():
        return "cuda"
    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    return "cpu"


def init_process_group(info: WorldInfo, timeout_s: float) -> str:
    """Join the job's process group (gloo on CPU, NCCL on GPUs); return the device string.

    Every collective after this, in init and in each step, fails after `timeout_s` instead of
    hanging when a peer is lost.
    """
    device = select_accelerator()
    # torch.distributed's env:// rendezvous reads these; SLURM/MPI launchers set other names.
    os.environ["RANK"], os.environ["WORLD_SIZE"] = str(info.rank), str(info.world_size)
    os.environ["LOCAL_RANK"] = str(info.local_rank)
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ.setdefault("MASTER_PORT", "29500")
    if device == "cuda":
        os.environ.setdefault("TORCH_NCCL_ASYNC_ERROR_HANDLING", "1")
        torch.cuda.set_device(info.local_rank)
    import deepspeed

    if device == "cpu":
        _skip_shm_inference_op()

    deepspeed.init_distributed(
        dist_backend="nccl" if device == "cuda" else "gloo",
        auto_mpi_discovery=False,
        timeout=timedelta(seconds=timeout_s),
        rank=info.rank,
        world_size=info.world_size,
    )
    return f"cuda:{info.local_rank}" if device == "cuda" else "cpu"


def _skip_shm_inference_op() -> None:
    """DeepSpeed's CPU backend JIT-compiles a shared-memory all-reduce (C++, one to several
    minutes on 2 cores, a compiler and Python headers needed) when the group starts; only its
    inference all-reduce uses it, never training over gloo. Mark it unavailable so the build
    never runs (DeepSpeed then uses torch.distributed for every collective)."""
    import deepspeed.ops

    deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False


def is_initialized() -> bool:
    return torch.distributed.is_available() and torch.distributed.is_initialized()


def barrier() -> None:
    if is_initialized():
        torch.distributed.barrier()


def all_reduce_sum(values: list[float]) -> list[float]:
    """Sum a few floats over all ranks in one collective (float64 on CPU: gloo-friendly)."""
    t = torch.tensor(values, dtype=torch.float64)
    if is_initialized():
        if torch.distributed.get_backend() == "nccl":
            t = t.cuda()
        torch.distributed.all_reduce(t)
    return t.cpu().tolist()


def all_reduce_tensor(t: torch.Tensor) -> None:
    """Sum `t` over all ranks, in place, wherever it lives (NCCL reduces on the GPU only)."""
    if not is_initialized():
        return
    if torch.distributed.get_backend() == "nccl" and t.device.type != "cuda":
        on_gpu = t.cuda()
        torch.distributed.all_reduce(on_gpu)
        t.copy_(on_gpu)
    else:
        torch.distributed.all_reduce(t)


def broadcast_object(obj: Any, src: int = 0) -> Any:
    """Rank `src`'s `obj` on every rank."""
    if not is_initialized():
        return obj
    box = [obj]
    torch.distributed.broadcast_object_list(box, src=src)
    return box[0]


def all_gather_object(obj: Any) -> list[Any]:
    if not is_initialized():
        return [obj]
    out: list[Any] = [None] * torch.distributed.get_world_size()
    torch.distributed.all_gather_object(out, obj)
    return out


def gather_object(obj: Any, dst: int = 0) -> Optional[list[Any]]:
    """Every rank's `obj`, in rank order, on rank `dst` (None on the others)."""
    if not is_initialized():
        return [obj]
    rank = torch.distributed.get_rank()
    out: Optional[list[Any]] = [None] * torch.distributed.get_world_size() if rank == dst else None
    torch.distributed.gather_object(obj, out, dst=dst)
    return out


def destroy() -> None:
    if is_initialized():
        torch.distributed.destroy_process_group()
