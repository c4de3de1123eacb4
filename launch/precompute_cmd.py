"""`unclip precompute`: CLIP embeddings for every shard, resumable, split across ranks.

Ranks come from `--rank/--world-size` (job arrays), else torchrun/SLURM/MPI variables
(`trainer.distributed.world_info_from_env`);
`--nproc N` starts N local ranks; `--slurm --array N` submits a SLURM job array whose task i
runs `unclip precompute ... --rank i --world-size N`. Each rank embeds its share of the
shards; finished shards are skipped on restart (a resubmitted array redoes only what is
missing), and the last rank to finish writes `_SUCCESS`.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path
from typing import Any, Optional

from launch.cli import EXIT_OK, EXIT_RUNTIME, EXIT_USAGE
from launch.config_files import load_config
from launch.url_checks import check_urls
from models.config import ConfigError


def _metrics(args: argparse.Namespace, cfg: Any, rank: int, world_size: int) -> Any:
    from trainer.config import MetricsConfig
    from trainer.metrics import Metrics, NullMetrics

    if args.metrics_port is None and not args.pushgateway:
        return NullMetrics()
    metrics_cfg = MetricsConfig(port=args.metrics_port, host=args.metrics_host or "127.0.0.1",
                                pushgateway=args.pushgateway)
    # without a process group every rank serves its own series: port + rank on one machine
    local_rank = int(os.environ.get("LOCAL_RANK", rank))
    return Metrics("precompute", "precompute", rank, world_size, None, metrics_cfg, local_rank, console=False).start()


def _rank_argv(args: argparse.Namespace, config: str) -> list[str]:
    """The arguments each rank runs `unclip precompute` with (its rank comes from elsewhere)."""
    argv = ["--config", config]
    for flag, value in (("--shards", args.shards), ("--out", args.out), ("--metrics-host", args.metrics_host),
                        ("--metrics-port", args.metrics_port), ("--pushgateway", args.pushgateway)):
        if value is not None:
            argv += [flag, str(value)]
    for assignment in args.overrides:
        argv += ["--set", assignment]
    if args.format:
        argv += ["--format", args.format]
    return argv


def _spawn(args: argparse.Namespace) -> int:
    from launch.launchers import run_local

    code = run_local(_rank_argv(args, args.config), args.nproc, module=["-m", "launch", "precompute"])
    return EXIT_OK if code == 0 else EXIT_RUNTIME


def _slurm(args: argparse.Namespace, cfg: Any) -> int:
    """Submit (or print) a job array of `--array N` tasks, task i embedding shards[i::N]."""
    from data_pipeline.io import expand_urls
    from launch.slurm import ArraySpec, SlurmResources, array_script, write_and_submit

    if args.array is None:
        raise ConfigError("--slurm needs --array N (the number of tasks to split the shards across)")
    if args.rank is not None or args.world_size is not None or args.nproc != 1:
        raise ConfigError("--slurm: each array task's rank is its task index; drop --rank/--world-size/--nproc")
    shards = expand_urls(args.shards if args.shards is not None else cfg.shards)
    if not shards:
        raise ConfigError("shards: no input shard URLs (set `shards:` or pass --shards)")
    if not (args.out or cfg.out):
        raise ConfigError("out: no output folder (set `out:` or pass --out)")
    if args.array > len(shards):
        raise ConfigError(f"--array {args.array}: there are only {len(shards)} shard(s), one task per shard at most")
    try:
        spec = ArraySpec("unclip-precompute", args.array, args.gpus_per_task, SlurmResources(
            args.time, args.partition, args.account, args.cpus_per_task, args.mem))
    except ValueError as err:
        raise ConfigError(str(err)) from None
    command = [sys.executable, "-m", "launch", "precompute", *_rank_argv(args, str(Path(args.config).resolve()))]
    log_dir = Path(args.slurm_dir)
    script = array_script(spec, command, log_dir, Path.cwd())
    if args.dry_run:
        print(script)
        return EXIT_OK
    log_dir.mkdir(parents=True, exist_ok=True)  # SLURM does not create the folder of --output
    return EXIT_OK if write_and_submit(script, log_dir / "precompute.sbatch", "unclip precompute") else EXIT_RUNTIME


def job_rank(rank: Optional[int], world_size: Optional[int]) -> tuple[int, int]:
    """(rank, world size) of this process: `--rank/--world-size` (a job array), else the
    launcher's environment (torchrun, SLURM, MPI), else (0, 1). ValueError if inconsistent."""
    from trainer.distributed import world_info_from_env

    if rank is None and world_size is None:
        info = world_info_from_env()
        return info.rank, info.world_size
    if rank is None or world_size is None:
        raise ValueError("--rank and --world-size go together")
    if not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} is not in [0, world size {world_size})")
    return rank, world_size


def main(args: argparse.Namespace) -> int:
    from data_pipeline.precompute import run_precompute

    overrides = [*args.overrides, *([f"format={args.format}"] if args.format else [])]
    cfg = load_config(args.config, overrides)
    if cfg.stage != "precompute":
        raise ConfigError(f"{args.config}: stage {cfg.stage!r} is not 'precompute'")
    if args.nproc < 1:
        raise ConfigError(f"--nproc must be at least 1 (got {args.nproc})")
    check_urls("--shards" if args.shards else "shards", args.shards or cfg.shards)
    check_urls("--out" if args.out else "out", args.out or cfg.out, write=True)
    if args.slurm:
        return _slurm(args, cfg)
    if args.array is not None or args.dry_run:
        raise ConfigError("--array and --dry-run go with --slurm")
    if args.nproc > 1 and args.rank is None and "RANK" not in os.environ:
        return _spawn(args)
    try:
        rank, world_size = job_rank(args.rank, args.world_size)
    except ValueError as err:
        print(f"unclip precompute: {err}", file=sys.stderr)
        return EXIT_USAGE
    metrics = _metrics(args, cfg, rank, world_size)

    def progress(samples: int, shards: int, skipped: dict[str, int]) -> None:
        metrics.precompute_progress(samples, shards)
        metrics.set_skipped_samples(skipped)

    try:
        summary = run_precompute(cfg, shards=args.shards, out=args.out, rank=rank, world_size=world_size,
                                 progress=sys.stderr.isatty(), on_progress=progress)
    except ValueError as err:
        print(f"unclip precompute: {err}", file=sys.stderr)
        return EXIT_USAGE
    except OSError as err:
        print(f"unclip precompute: {err}", file=sys.stderr)
        return EXIT_RUNTIME
    finally:
        metrics.close()
    print(f"unclip precompute: {summary.summary()}", flush=True)
    return EXIT_OK
