"""`unclip launch`: one job description, four ways to start it.

    --nproc N                                   N local ranks (like `unclip train --nproc N`)
    --nnodes N --node-rank R --master-addr A    this node's torchrun (run it on every node)
    --hostfile F                                the DeepSpeed launcher over the hosts of F
    --slurm                                     an sbatch script (submitted if sbatch exists)
    --plan --gpus N                             per-GPU memory under ZeRO 0-3, starts nothing

`--dry-run` prints the command or script instead of running it.
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

from launch.cli import EXIT_OK, EXIT_RUNTIME
from launch.launchers import hostfile_command, read_hostfile, run_local, shell_join, torchrun_command, worker_args
from launch.train_cmd import check_embedding_widths, load_train_job, prepare_run_dir
from models.config import ConfigError


def main(args: argparse.Namespace) -> int:
    job = load_train_job(args.config, args.overrides)
    if args.plan:
        return _plan(job, args)
    run_dir = Path(args.run_dir or Path("runs") / job.name)
    config = run_dir / "config.yaml"
    if not args.dry_run:
        check_embedding_widths(job)
        config = prepare_run_dir(job, run_dir, resume=True)
    worker = worker_args(config, run_dir)
    if args.slurm:
        return _slurm(job, args, config, run_dir)
    if args.hostfile:
        try:
            read_hostfile(Path(args.hostfile))
        except (OSError, ValueError) as err:
            raise ConfigError(f"--hostfile: {err}") from None
        return _run(hostfile_command(worker, Path(args.hostfile), master_port=args.master_port), args.dry_run)
    if args.nnodes is not None:
        if args.node_rank is None or args.master_addr is None:
            raise ConfigError("--nnodes needs --node-rank and --master-addr (the address of node 0)")
        cmd = torchrun_command(
            worker, nproc_per_node=args.nproc or _local_devices(), nnodes=args.nnodes, node_rank=args.node_rank,
            master_addr=args.master_addr, master_port=args.master_port,
        )
        return _run(cmd, args.dry_run)
    nproc = args.nproc or 1
    if args.dry_run:
        print(f"{nproc} local rank(s) of: {shell_join([sys.executable, '-m', 'launch.worker', *worker])}")
        return EXIT_OK
    return EXIT_OK if run_local(worker, nproc) == 0 else EXIT_RUNTIME


def _local_devices() -> int:
    import torch

    return max(1, torch.cuda.device_count())


def _run(cmd: list[str], dry_run: bool) -> int:
    print(shell_join(cmd), flush=True)
    if dry_run:
        return EXIT_OK
    return EXIT_OK if subprocess.run(cmd).returncode == 0 else EXIT_RUNTIME


def _slurm(job: Any, args: argparse.Namespace, config: Path, run_dir: Path) -> int:
    from launch.slurm import SlurmSpec, sbatch_script

    spec = SlurmSpec(
        job_name=job.name, nodes=args.nnodes or 1, gpus_per_node=args.gpus_per_node, time=args.time,
        partition=args.partition, account=args.account, master_port=args.master_port,
    )
    script = sbatch_script(spec, config, run_dir, Path.cwd())
    if args.dry_run:
        print(script)
        return EXIT_OK
    path = run_dir / "launch" / "train.sbatch"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(script)
    print(f"[unclip launch] wrote {path}")
    if shutil.which("sbatch") is None:
        print(f"[unclip launch] sbatch is not on PATH here; submit it on the cluster with: sbatch {path}")
        return EXIT_OK
    return EXIT_OK if subprocess.run(["sbatch", str(path)]).returncode == 0 else EXIT_RUNTIME


def _plan(job: Any, args: argparse.Namespace) -> int:
    from trainer.memory_plan import format_plan, measure

    gpus = args.gpus or (args.nnodes or 1) * args.gpus_per_node
    nodes = args.nnodes or max(1, -(-gpus // args.gpus_per_node))
    if gpus < 1 or gpus % nodes:
        raise ConfigError(f"--plan: {gpus} GPU(s) cannot be spread evenly over {nodes} node(s)")
    print(format_plan(job, measure(job), gpus, nodes, args.gpu_memory))
    return EXIT_OK
