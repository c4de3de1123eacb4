"""The per-rank entry point: `python -m launch.worker --config RUN_DIR/config.yaml --run-dir RUN_DIR`.

Whatever started it (`unclip train --nproc`, `unclip launch`, torchrun, srun, mpirun, the
DeepSpeed launcher), the rank, local rank and world size come from the environment
(`trainer/distributed.py`). Exit 0 on success or after a checkpoint on SIGTERM, 1 on failure,
with the rank named in the message.
"""

from __future__ import annotations

import argparse
import os
import sys
import traceback
from pathlib import Path
from typing import Optional, Sequence


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m launch.worker", description="one rank of an unclip training job")
    parser.add_argument("--config", required=True, help="the job's resolved config (RUN_DIR/config.yaml)")
    parser.add_argument("--run-dir", required=True)
    parser.add_argument("--no-resume", action="store_true")
    parser.add_argument("--local_rank", type=int, help=argparse.SUPPRESS)  # some launchers pass it
    args = parser.parse_args(argv)
    # DeepSpeed picks its accelerator at import; decide before anything imports it.
    from trainer.distributed import select_accelerator

    select_accelerator()
    from launch.config_files import load_config
    from models.config import ConfigError
    from trainer.loop import train

    rank = os.environ.get("RANK", os.environ.get("SLURM_PROCID", "?"))
    try:
        job = load_config(args.config)
        return train(job, Path(args.run_dir), resume=not args.no_resume)
    except ConfigError as err:
        print(f"[unclip worker] rank {rank}: {err}", file=sys.stderr, flush=True)
        return 2
    except Exception as err:
        traceback.print_exc()
        print(f"[unclip worker] rank {rank} failed: {type(err).__name__}: {_first_line(err)}", file=sys.stderr, flush=True)
        if _is_lost_peer(err):
            print(f"[unclip worker] rank {rank}: {_lost_peer_message()}", file=sys.stderr, flush=True)
        return 1


def _lost_peer_message() -> str:
    from trainer import distributed, liveness

    if not distributed.is_initialized():
        return (
            "the process group did not form (deepspeed.timeout_s bounds the wait): a node did not start, died while "
            "starting, or cannot reach the master (MASTER_ADDR:MASTER_PORT) from its host"
        )
    found = liveness.report()  # which rank stopped beating: names the lost node
    return (
        "a collective failed, so another rank is gone or stopped responding (deepspeed.timeout_s bounds the "
        f"wait); {found or 'the launcher log names it'}. The job resumes from RUN_DIR/checkpoints/latest when restarted."
    )


def _first_line(err: BaseException) -> str:
    text = str(err).strip()
    return text.splitlines()[0] if text else ""


def _is_lost_peer(err: BaseException) -> bool:
    """A gloo/NCCL error of a collective whose peer died or hung (timeouts, closed sockets)."""
    text = f"{type(err).__name__} {err}".lower()
    return any(s in text for s in (
        "timed out", "timeout", "connection closed", "connection reset", "connection refused", "broken pipe",
        "connectfullmesh", "nccl",
    ))


if __name__ == "__main__":
    sys.exit(main())
