"""Process-group set-up: rank discovery from any launcher, the accelerator, the network, timeouts.

Rank discovery reads torchrun/DeepSpeed (`RANK`, `LOCAL_RANK`, `WORLD_SIZE`), SLURM
(`SLURM_PROCID`, ...) and MPI (`OMPI_COMM_WORLD_*`, `PMI_*`) variables alike, in that order,
so the same worker runs under `unclip launch`, torchrun, `srun` or `mpirun`. On a machine
without CUDA the same code runs on DeepSpeed's CPU accelerator with gloo.

On several hosts gloo and NCCL must use an interface the other hosts can reach: where the
user has not named one (`GLOO_SOCKET_IFNAME`, `NCCL_SOCKET_IFNAME`), the interface that
routes to the master address is chosen and printed. Once the group is up, `trainer.liveness`
keeps a heartbeat per rank, so that a failed collective can name the node that was lost.
"""

from __future__ import annotations

import dataclasses
import os
import socket
from datetime import timedelta
from typing import Any, MutableMapping, Optional

import psutil
import torch

from trainer import liveness

_RANK_VARS = ("RANK", "SLURM_PROCID", "OMPI_COMM_WORLD_RANK", "PMI_RANK")
_LOCAL_RANK_VARS = ("LOCAL_RANK", "SLURM_LOCALID", "OMPI_COMM_WORLD_LOCAL_RANK", "MPI_LOCALRANKID")
_WORLD_VARS = ("WORLD_SIZE", "SLURM_NTASKS", "OMPI_COMM_WORLD_SIZE", "PMI_SIZE")
# the node's index in the job: torchrun, the DeepSpeed launcher, SLURM
_NODE_VARS = ("GROUP_RANK", "CROSS_RANK", "SLURM_NODEID")
SOCKET_IFNAME_VARS = ("GLOO_SOCKET_IFNAME", "NCCL_SOCKET_IFNAME")


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


def node_from_env(env: Optional[dict[str, str]] = None) -> Optional[int]:
    """This node's index in the job (torchrun's node rank), where the launcher says it."""
    value = _first_int(dict(os.environ if env is None else env), _NODE_VARS, -1)
    return value if value >= 0 else None


@dataclasses.dataclass(frozen=True)
class Route:
    """How this host reaches another: through `interface`, from its own `address`."""

    interface: str
    address: str


def route_to(host: str, port: int = 29500) -> Route:
    """The interface and source address this host uses to reach `host` (a name or an address).

    A UDP socket's connect() asks the routing table and sends nothing; the interface is the one
    that holds the source address the kernel picked. On the master itself that is the interface
    of its own address, not `lo` (where `ip route get` points for a local address). OSError,
    with a message naming `host`, when it does not resolve or no route leads there.
    """
    try:
        family, _, _, _, sockaddr = socket.getaddrinfo(host, port, type=socket.SOCK_DGRAM)[0]
    except socket.gaierror as err:
        raise OSError(f"the master address {host!r} does not resolve on this host ({err.strerror})") from None
    with socket.socket(family, socket.SOCK_DGRAM) as probe:
        try:
            probe.connect(sockaddr)
        except OSError as err:
            raise OSError(f"no route from this host to the master address {host} ({err.strerror})") from None
        local = probe.getsockname()[0]
    for name, addresses in psutil.net_if_addrs().items():
        if any(a.family == family and a.address.split("%")[0] == local for a in addresses):
            return Route(name, local)
    raise OSError(f"no interface holds {local}, the address this host uses to reach the master {host}")


def choose_socket_interface(env: MutableMapping[str, str], master_addr: str, master_port: int) -> Optional[str]:
    """Point gloo and NCCL at the interface that routes to the master, where the user has not.

    Left alone, gloo binds the address this host's name resolves to, often 127.0.0.1 (Debian's
    /etc/hosts), which no other host can reach: the job fails in `connectFullMesh`. Sets each of
    GLOO_SOCKET_IFNAME and NCCL_SOCKET_IFNAME that is unset in `env`, and returns one line that
    says what it chose (None when the user set both). OSError when there is no route (`route_to`).
    """
    unset = [name for name in SOCKET_IFNAME_VARS if not env.get(name)]
    if not unset:
        return None
    route = route_to(master_addr, master_port)
    for name in unset:
        env[name] = route.interface
    chosen = ", ".join(f"{name}={route.interface}" for name in unset)
    return f"{chosen}: {route.interface} ({route.address}) is the interface that routes to the master {master_addr}"


def _own_address(master_addr: str, master_port: int) -> Optional[str]:
    try:
        return route_to(master_addr, master_port).address
    except OSError:
        return None  # only a label in the lost-node report


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
    hanging when a peer is lost. With more than one rank, gloo and NCCL use the interface that
    routes to the master unless the user named one (`choose_socket_interface`), and each rank
    keeps a heartbeat in the job's store (`trainer.liveness`).
    """
    device = select_accelerator()
    # torch.distributed's env:// rendezvous reads these; SLURM/MPI launchers set other names.
    os.environ["RANK"], os.environ["WORLD_SIZE"] = str(info.rank), str(info.world_size)
    os.environ["LOCAL_RANK"] = str(info.local_rank)
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ.setdefault("MASTER_PORT", "29500")
    master_addr, master_port = os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"])
    if info.world_size > 1:
        chosen = choose_socket_interface(os.environ, master_addr, master_port)
        if chosen and info.local_rank == 0:
            print(f"[unclip] rank {info.rank} on {socket.gethostname()}: {chosen}", flush=True)
    if device == "cuda":
        os.environ.setdefault("TORCH_NCCL_ASYNC_ERROR_HANDLING", "1")
        torch.cuda.set_device(info.local_rank)
    _default_group_timeout(timedelta(seconds=timeout_s))
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
    if info.world_size > 1:
        liveness.start(
            info.rank, info.world_size, (master_addr, master_port), timeout_s,
            where={"node": node_from_env(), "host": socket.gethostname(), "address": _own_address(master_addr, master_port)},
        )
    return f"cuda:{info.local_rank}" if device == "cuda" else "cpu"


def _default_group_timeout(timeout: timedelta) -> None:
    """Make every process group created later time out after `timeout`, as the default one does.

    `new_group()` without a timeout gets torch's default (30 min for gloo, 10 for NCCL), not the
    default group's, and DeepSpeed makes its data-parallel groups that way: ZeRO's gradient
    all-reduce with a peer's link cut would wait 30 minutes instead of `deepspeed.timeout_s`.
    torch reads these module globals each time a group is made.
    """
    from torch.distributed import distributed_c10d

    distributed_c10d.default_pg_timeout = timeout
    if isinstance(getattr(distributed_c10d, "default_pg_nccl_timeout", None), timedelta):
        distributed_c10d.default_pg_nccl_timeout = timeout


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
    liveness.stop()
    if is_initialized():
        torch.distributed.destroy_process_group()
