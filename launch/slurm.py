"""The sbatch script of a training job: N nodes x G GPUs, one `srun torchrun` per node.

Preemption and time limits both end in a checkpoint: SLURM sends SIGTERM to the job's tasks
(torchrun forwards it to every rank, which saves and exits 0) and, with `--requeue`, puts a
preempted job back in the queue. Before the time limit SLURM signals the batch shell
(`--signal=B:USR1@...`), which forwards SIGTERM to the ranks, waits for the checkpoint and
requeues the job itself. A requeued job resumes from `RUN_DIR/checkpoints/latest`.
"""

from __future__ import annotations

import dataclasses
import shlex
import sys
from pathlib import Path
from typing import Optional

from launch.launchers import shell_join, torchrun_command, worker_args


@dataclasses.dataclass(frozen=True)
class SlurmSpec:
    job_name: str
    nodes: int
    gpus_per_node: int
    time: str = "24:00:00"
    partition: Optional[str] = None
    account: Optional[str] = None
    cpus_per_gpu: int = 8
    master_port: int = 29500
    signal_lead_s: int = 300  # seconds before the time limit to checkpoint and requeue

    def __post_init__(self) -> None:
        if self.nodes < 1 or self.gpus_per_node < 1:
            raise ValueError(f"SLURM: --nnodes ({self.nodes}) and --gpus-per-node ({self.gpus_per_node}) must be >= 1")


def sbatch_script(spec: SlurmSpec, config: Path, run_dir: Path, workdir: Path, python: str = sys.executable) -> str:
    """The text of the sbatch script (paths made absolute: the job runs elsewhere)."""
    config, run_dir, workdir = config.resolve(), run_dir.resolve(), workdir.resolve()
    torchrun = torchrun_command(
        worker_args(config, run_dir), nproc_per_node=spec.gpus_per_node, nnodes=spec.nodes,
        master_addr="$MASTER_ADDR", master_port=spec.master_port, rdzv=True, python=python,
    )
    torchrun_line = shell_join(torchrun)
    header = [
        "#!/bin/bash",
        f"#SBATCH --job-name={spec.job_name}",
        f"#SBATCH --nodes={spec.nodes}",
        "#SBATCH --ntasks-per-node=1",  # one torchrun per node; it starts the node's ranks
        f"#SBATCH --gpus-per-node={spec.gpus_per_node}",
        f"#SBATCH --cpus-per-task={spec.cpus_per_gpu * spec.gpus_per_node}",
        f"#SBATCH --time={spec.time}",
        "#SBATCH --requeue",
        f"#SBATCH --signal=B:USR1@{spec.signal_lead_s}",
        f"#SBATCH --output={run_dir}/logs/slurm-%j.out",
        "#SBATCH --open-mode=append",
    ]
    if spec.partition:
        header.append(f"#SBATCH --partition={spec.partition}")
    if spec.account:
        header.append(f"#SBATCH --account={spec.account}")
    body = f"""
set -uo pipefail
cd {shlex.quote(str(workdir))}
export MASTER_ADDR=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)
export MASTER_PORT={spec.master_port}
export OMP_NUM_THREADS={spec.cpus_per_gpu}
export TORCH_NCCL_ASYNC_ERROR_HANDLING=1
echo "unclip: job $SLURM_JOB_ID (restart ${{SLURM_RESTART_COUNT:-0}}) on $SLURM_JOB_NUM_NODES node(s), master $MASTER_ADDR"

# Near the time limit: ask every rank to checkpoint (SIGTERM), wait, then requeue this job.
requeue() {{
  echo "unclip: time limit near; checkpointing and requeueing"
  kill -TERM "$srun_pid" 2>/dev/null
  wait "$srun_pid"
  scontrol requeue "$SLURM_JOB_ID"
  exit 0
}}
trap requeue USR1

srun --kill-on-bad-exit=1 --ntasks-per-node=1 \\
  {torchrun_line} &
srun_pid=$!
wait "$srun_pid"
rc=$?
# `wait` returns early (rc > 128) when the USR1 trap fires; the trap then owns the exit.
while kill -0 "$srun_pid" 2>/dev/null; do wait "$srun_pid"; rc=$?; done
exit $rc
"""
    return "\n".join(header) + "\n" + body
