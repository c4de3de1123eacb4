"""`unclip precompute`: CLIP embeddings for every shard, resumable, split across ranks.

Ranks come from `--rank/--world-size` (job arrays), else torchrun/SLURM/MPI variables (the
trainer's one rank discovery, `trainer.distributed.world_info_from_env`); `--nproc N` starts
N local ranks. Each rank embeds its share of the shards; finished shards
are skipped on restart, and the last rank to finish writes `_SUCCESS`.
"""

from __future__ import annotations

import argparse
import os
import sys
from typing import Any, Optional

from launch.cli import EXIT_OK, EXIT_RUNTIME, EXIT_USAGE
from launch.config_files import load_config
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


def _spawn(args: argparse.Namespace) -> int:
    from launch.launchers import run_local

    argv = ["--config", args.config]
    for flag, value in (("--shards", args.shards), ("--out", args.out), ("--metrics-host", args.metrics_host),
                        ("--metrics-port", args.metrics_port), ("--pushgateway", args.pushgateway)):
        if value is not None:
            argv += [flag, str(value)]
    for assignment in args.overrides:
        argv += ["--set", assignment]
    code = run_local(argv, args.nproc, module=["-m", "launch", "precompute"])
    return EXIT_OK if code == 0 else EXIT_RUNTIME


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

    cfg = load_config(args.config, args.overrides)
    if cfg.stage != "precompute":
        raise ConfigError(f"{args.config}: stage {cfg.stage!r} is not 'precompute'")
    if args.nproc < 1:
        raise ConfigError(f"--nproc must be at least 1 (got {args.nproc})")
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
