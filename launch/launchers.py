"""How a job's ranks start: local processes, torchrun, the DeepSpeed launcher (hostfile).

`run_local` is what `unclip train --nproc N` and the tests use: N worker processes with
torchrun's environment variables, a free port on 127.0.0.1, and one supervisor that forwards
SIGTERM/SIGINT to every rank, and when one rank fails stops the others and names it. The
torchrun and hostfile forms only build command lines; `unclip launch` runs or prints them.
"""

from __future__ import annotations

import math
import os
import shlex
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Optional, Sequence

WORKER = ["-m", "launch.worker"]


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def worker_args(config: Path, run_dir: Path, *, resume: bool = True) -> list[str]:
    args = ["--config", str(config), "--run-dir", str(run_dir)]
    return args if resume else [*args, "--no-resume"]


def rank_env(base: dict[str, str], *, rank: int, world_size: int, port: int, addr: str = "127.0.0.1") -> dict[str, str]:
    env = dict(base)
    env.update(
        RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world_size), LOCAL_WORLD_SIZE=str(world_size),
        MASTER_ADDR=addr, MASTER_PORT=str(port),
    )
    env.setdefault("OMP_NUM_THREADS", "1")  # N ranks on one machine: no thread oversubscription
    env.setdefault("PYTHONUNBUFFERED", "1")
    return env


def _describe(code: int) -> str:
    if code < 0:
        try:
            return f"killed by {signal.Signals(-code).name}"
        except ValueError:
            return f"killed by signal {-code}"
    return f"exit code {code}"


def run_local(
    worker: Sequence[str], nproc: int, *, grace_s: float = 5.0, env: Optional[dict[str, str]] = None,
    module: Sequence[str] = WORKER,
) -> int:
    """Run `nproc` ranks of `python <module> <worker>` (the training worker by default) here,
    each with torchrun's RANK/WORLD_SIZE/MASTER_* variables; their combined exit code.

    The first rank to fail decides the result: the others get SIGTERM and SIGKILL after
    `grace_s` seconds (a short wait: with a peer gone they cannot save anything). A SIGTERM or
    SIGINT sent to this process goes to every rank, which checkpoint and exit on their own.
    """
    base = dict(os.environ if env is None else env)
    port = free_port()
    procs = [
        subprocess.Popen([sys.executable, *module, *worker], env=rank_env(base, rank=r, world_size=nproc, port=port))
        for r in range(nproc)
    ]

    def forward(signum: int, frame: object) -> None:
        for p in procs:
            if p.poll() is None:
                p.send_signal(signum)

    previous = {sig: signal.signal(sig, forward) for sig in (signal.SIGTERM, signal.SIGINT)}
    try:
        return _supervise(procs, grace_s)
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        _stop(procs, grace_s=0)


def _supervise(procs: list[subprocess.Popen], grace_s: float) -> int:
    while True:
        codes = [p.poll() for p in procs]
        if any(c not in (None, 0) for c in codes):
            _report_failures(procs)
            _stop(procs, grace_s)
            return 1
        if all(c == 0 for c in codes):
            return 0
        time.sleep(0.1)


def _report_failures(procs: list[subprocess.Popen], settle_s: float = 1.0) -> None:
    """Name the failed ranks, the root cause first.

    When one rank dies, its peers fail on their next collective within moments, and a
    process killed by a signal can take longer to be reaped than a peer takes to exit: so
    wait briefly, then list ranks killed by a signal before ranks that exited with an error.
    """
    deadline = time.monotonic() + settle_s
    while time.monotonic() < deadline and any(p.poll() is None for p in procs):
        time.sleep(0.05)
    failed = [(r, p.returncode) for r, p in enumerate(procs) if p.returncode not in (None, 0)]
    failed.sort(key=lambda item: (item[1] >= 0, item[0]))  # signals (negative codes) first
    for rank, code in failed:
        print(f"[unclip launch] rank {rank} failed ({_describe(code)}); stopping the other ranks",
              file=sys.stderr, flush=True)


def _stop(procs: list[subprocess.Popen], grace_s: float) -> None:
    for p in procs:
        if p.poll() is None:
            p.terminate()
    deadline = time.monotonic() + grace_s
    for p in procs:
        try:
            p.wait(timeout=max(0.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait()


def torchrun_command(
    worker: Sequence[str], *, nproc_per_node: int, nnodes: int = 1, node_rank: int = 0,
    master_addr: str = "127.0.0.1", master_port: int = 29500, rdzv: bool = False, python: str = sys.executable,
    rdzv_timeout_s: Optional[float] = None,
) -> list[str]:
    """A torchrun command line for one node of the job.

    `rdzv_timeout_s` bounds how long a node waits for the others to join (torchrun's default
    is 600 s for the static rendezvous and 600 s to join a c10d one); `unclip launch` passes the
    job's `deepspeed.timeout_s`, so a node that never comes up ends the job like a lost peer.
    """
    cmd = [python, "-m", "torch.distributed.run", f"--nnodes={nnodes}", f"--nproc-per-node={nproc_per_node}"]
    timeout = None if rdzv_timeout_s is None else max(1, math.ceil(rdzv_timeout_s))
    if rdzv:  # elastic rendezvous: no fixed node ranks (SLURM, requeue-friendly)
        cmd += ["--rdzv-backend=c10d", f"--rdzv-endpoint={master_addr}:{master_port}", "--rdzv-id=$SLURM_JOB_ID"]
        if timeout is not None:
            cmd.append(f"--rdzv-conf=join_timeout={timeout}")
    else:
        cmd += [f"--node-rank={node_rank}", f"--master-addr={master_addr}", f"--master-port={master_port}"]
        if timeout is not None:
            cmd.append(f"--rdzv-conf=timeout={timeout}")
    return [*cmd, *WORKER, *worker]


def hostfile_command(
    worker: Sequence[str], hostfile: Path, *, master_port: int = 29500, master_addr: Optional[str] = None,
    python: str = sys.executable,
) -> list[str]:
    """The DeepSpeed launcher over the nodes of a hostfile (`host slots=N` per line).

    It reaches every host with pdsh over ssh (passwordless keys, as on any cluster) and starts
    `slots` ranks there; without `master_addr` the master is the first address that
    `hostname -I` prints on the first host. Run by this Python, like torchrun, so that the
    `deepspeed` script need not be on PATH.
    """
    cmd = [python, "-m", "deepspeed.launcher.runner", f"--hostfile={hostfile}", f"--master_port={master_port}"]
    if master_addr:
        cmd.append(f"--master_addr={master_addr}")
    return [*cmd, "--no_local_rank", "--module", "launch.worker", *worker]


def read_hostfile(path: Path) -> list[tuple[str, int]]:
    """[(host, slots)] from a DeepSpeed hostfile; a clear error on a malformed line."""
    hosts = []
    for number, line in enumerate(Path(path).read_text().splitlines(), 1):
        line = line.split("#", 1)[0].strip()
        if not line:
            continue
        parts = line.split()
        slots = [p for p in parts[1:] if p.startswith("slots=")]
        if len(parts) != 2 or not slots or not slots[0][6:].isdigit():
            raise ValueError(f"{path}:{number}: expected 'HOST slots=N', got {line!r}")
        hosts.append((parts[0], int(slots[0][6:])))
    if not hosts:
        raise ValueError(f"{path}: no hosts")
    return hosts


def shell_join(cmd: Sequence[str]) -> str:
    """A shell line; arguments holding $VARS are double-quoted so the node expands them."""
    return " ".join(f'"{c}"' if "$" in c else shlex.quote(c) for c in cmd)
