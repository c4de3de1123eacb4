"""`unclip launch`: one job description, four ways to start it.

    --nproc N                                   N local ranks (like `unclip train --nproc N`)
    --nnodes N --node-rank R --master-addr A    this node's torchrun (run it on every node)
    --hostfile F                                the DeepSpeed launcher over the hosts of F
    --slurm [--gpus-per-node G | --gpus-per-node 0 --nproc N]
                                                an sbatch script (submitted if sbatch exists):
                                                G GPUs per node, or N ranks on CPU nodes
    --plan --gpus N                             per-GPU memory under ZeRO 0-3, starts nothing

`--dry-run` prints the command or script instead of running it.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
from pathlib import Path
from typing import Any, Optional

from launch.cli import EXIT_OK, EXIT_RUNTIME
from launch.launchers import hostfile_command, read_hostfile, run_local, shell_join, torchrun_command, worker_args
from launch.train_cmd import load_train_job, preflight, prepare_run_dir
from launch.url_checks import check_data_sources, check_run_dir
from models.config import ConfigError
from trainer.distributed import choose_socket_interface


def main(args: argparse.Namespace) -> int:
    job = load_train_job(args.config, args.overrides)
    if args.plan:
        return _plan(job, args)
    check_data_sources(job)
    check_run_dir(args.run_dir)
    run_dir = Path(args.run_dir or Path("runs") / job.name)
    if args.hostfile and args.nproc is not None:
        raise ConfigError("--nproc with --hostfile: the hostfile's slots=N set the ranks per host")
    spec = _slurm_spec(job, args) if args.slurm else None  # bad SLURM options fail before any work
    hosts = _hosts(args) if args.hostfile else None
    config = run_dir / "config.yaml"
    if not args.dry_run:
        preflight(args.config, job, world_size=_world_size(args, spec, hosts))
        config = prepare_run_dir(job, run_dir, resume=True)
    worker = worker_args(config, run_dir)
    if spec is not None:
        return _slurm(spec, args, config, run_dir)
    if args.hostfile:
        cmd = hostfile_command(worker, Path(args.hostfile), master_port=args.master_port, master_addr=args.master_addr)
        return _run(cmd, args.dry_run, what="the DeepSpeed launcher")
    if args.nnodes is not None:
        if args.node_rank is None or args.master_addr is None:
            raise ConfigError("--nnodes needs --node-rank and --master-addr (the address of node 0)")
        cmd = torchrun_command(
            worker, nproc_per_node=args.nproc or _local_devices(), nnodes=args.nnodes, node_rank=args.node_rank,
            master_addr=args.master_addr, master_port=args.master_port, rdzv_timeout_s=job.deepspeed.timeout_s,
        )
        return _run(cmd, args.dry_run, env=None if args.dry_run else _node_env(args), what=f"node {args.node_rank}")
    nproc = args.nproc or 1
    if args.dry_run:
        print(f"{nproc} local rank(s) of: {shell_join([sys.executable, '-m', 'launch.worker', *worker])}")
        return EXIT_OK
    return EXIT_OK if run_local(worker, nproc) == 0 else EXIT_RUNTIME


def _hosts(args: argparse.Namespace) -> list[tuple[str, int]]:
    try:
        return read_hostfile(Path(args.hostfile))
    except (OSError, ValueError) as err:
        raise ConfigError(f"--hostfile: {err}") from None


def _world_size(args: argparse.Namespace, spec: Any, hosts: Optional[list[tuple[str, int]]]) -> int:
    """The ranks the job will run on, for the preflight's shards-per-rank check."""
    if hosts is not None:
        return sum(slots for _, slots in hosts)
    if spec is not None:
        return spec.nodes * (spec.gpus_per_node or spec.ranks_per_node or 1)
    return (args.nnodes or 1) * (args.nproc or (_local_devices() if args.nnodes else 1))


def _local_devices() -> int:
    import torch

    return max(1, torch.cuda.device_count())


def _node_env(args: argparse.Namespace) -> dict[str, str]:
    """This node's environment for torchrun: gloo/NCCL on the interface that reaches the master."""
    env = dict(os.environ)
    try:
        chosen = choose_socket_interface(env, args.master_addr, args.master_port)
    except OSError as err:
        raise ConfigError(f"--master-addr: {err}") from None
    if chosen:
        print(f"[unclip launch] node {args.node_rank}: {chosen}", flush=True)
    return env


def _run(cmd: list[str], dry_run: bool, *, what: str, env: Optional[dict[str, str]] = None) -> int:
    print(shell_join(cmd), flush=True)
    if dry_run:
        return EXIT_OK
    code = subprocess.run(cmd, env=env).returncode
    if code == 0:
        return EXIT_OK
    print(f"[unclip launch] {what}: the job failed (exit code {code}); the ranks' lines above name the cause. "
          "Restart every node with the same command to resume from RUN_DIR/checkpoints/latest.",
          file=sys.stderr, flush=True)
    return EXIT_RUNTIME


def _slurm_spec(job: Any, args: argparse.Namespace) -> Any:
    from launch.slurm import SlurmSpec

    try:
        return SlurmSpec(
            job_name=job.name, nodes=args.nnodes or 1, gpus_per_node=args.gpus_per_node, ranks_per_node=args.nproc,
            time=args.time, partition=args.partition, account=args.account, cpus_per_task=args.cpus_per_task,
            mem=args.mem, master_port=args.master_port, signal_lead_s=args.signal_lead,
        )
    except ValueError as err:
        raise ConfigError(str(err)) from None


def _slurm(spec: Any, args: argparse.Namespace, config: Path, run_dir: Path) -> int:
    from launch.slurm import sbatch_script, write_and_submit

    script = sbatch_script(spec, config, run_dir, Path.cwd())
    if args.dry_run:
        print(script)
        return EXIT_OK
    return EXIT_OK if write_and_submit(script, run_dir / "launch" / "train.sbatch", "unclip launch") else EXIT_RUNTIME


def _plan(job: Any, args: argparse.Namespace) -> int:
    from trainer.memory_plan import format_plan, measure

    gpus = args.gpus or (args.nnodes or 1) * args.gpus_per_node
    nodes = args.nnodes or max(1, -(-gpus // args.gpus_per_node))
    if gpus < 1 or gpus % nodes:
        raise ConfigError(f"--plan: {gpus} GPU(s) cannot be spread evenly over {nodes} node(s)")
    print(format_plan(job, measure(job), gpus, nodes, args.gpu_memory))
    return EXIT_OK
