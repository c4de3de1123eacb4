"""sbatch scripts: a training job (N nodes, one `srun torchrun` per node) and a precompute
job array (one task per share of the shards), and their submission.

A training job runs on GPU nodes (`gpus_per_node` G >= 1: one rank per GPU, a GRES request)
or on CPU nodes (G = 0: `ranks_per_node` ranks, no GRES). Either way SLURM sees one task per
node, torchrun, which starts that node's ranks: `cpus_per_task` and `mem` are that task's,
i.e. the node's share for all of its ranks.

Preemption and time limits both end in a checkpoint: SLURM sends SIGTERM to the job's
processes (every rank saves and exits 0; torchrun waits for them) and, with `--requeue`, puts
a preempted job back in the queue. Before the time limit SLURM signals the batch shell
(`--signal=B:USR1@LEAD`), which has SLURM send SIGTERM to the ranks, waits for the checkpoint
and requeues the job itself. A requeued job resumes from `RUN_DIR/checkpoints/latest`.

SLURM's own timing (measured on 22.05; sbatch(1) allows up to 60 s): slurmctld checks time
limits and warnings every 30 s and sends the warning at the first check at most 30 s before
it is due, so it comes LEAD to LEAD+30 s before the limit (keep LEAD above a checkpoint's
duration); a requeued job may start again only after `AuthInfo=cred_expire` (120 s by
default).
"""

from __future__ import annotations

import dataclasses
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Optional, Sequence

from launch.launchers import shell_join, torchrun_command, worker_args

MAX_SIGNAL_LEAD_S = 65535  # sbatch --signal's limit
_TIME = re.compile(r"(?:(\d+)-)?(\d+)(?::(\d+))?(?::(\d+))?")
_MEM = re.compile(r"\d+[KMGT]?", re.IGNORECASE)


def time_limit_seconds(text: str) -> Optional[int]:
    """Seconds of a SLURM time limit (`MM`, `MM:SS`, `HH:MM:SS`, `D-HH[:MM[:SS]]`); None when
    unlimited (`INFINITE`, `UNLIMITED`). ValueError names the accepted forms."""
    value = text.strip()
    if value.upper() in ("INFINITE", "UNLIMITED"):
        return None
    match = _TIME.fullmatch(value)
    if not match:
        raise ValueError(f"--time {text!r}: expected MM, MM:SS, HH:MM:SS, D-HH, D-HH:MM or D-HH:MM:SS")
    days, a, b, c = match.groups()
    if days is not None:
        return int(days) * 86400 + int(a) * 3600 + int(b or 0) * 60 + int(c or 0)
    if b is None:
        return int(a) * 60
    if c is None:
        return int(a) * 60 + int(b)
    return int(a) * 3600 + int(b) * 60 + int(c)


@dataclasses.dataclass(frozen=True)
class SlurmResources:
    """What any unclip job asks of SLURM besides its shape: the limit, where, and the size
    of each task (`cpus_per_task` None: the job's default; `mem` in SLURM's syntax, e.g. 64G)."""

    time: str = "24:00:00"
    partition: Optional[str] = None
    account: Optional[str] = None
    cpus_per_task: Optional[int] = None
    mem: Optional[str] = None

    def __post_init__(self) -> None:
        time_limit_seconds(self.time)
        if self.cpus_per_task is not None and self.cpus_per_task < 1:
            raise ValueError(f"--cpus-per-task must be >= 1 (got {self.cpus_per_task})")
        if self.mem is not None and not _MEM.fullmatch(self.mem):
            raise ValueError(f"--mem {self.mem!r}: expected a size such as 4096, 500M or 64G")

    def header(self, job_name: str, cpus_per_task: int, output: str) -> list[str]:
        lines = [
            "#!/bin/bash",
            f"#SBATCH --job-name={job_name}",
            f"#SBATCH --cpus-per-task={cpus_per_task}",
            f"#SBATCH --time={self.time}",
            "#SBATCH --requeue",
            f"#SBATCH --output={output}",
            "#SBATCH --open-mode=append",
        ]
        if self.mem:
            lines.append(f"#SBATCH --mem={self.mem}")
        if self.partition:
            lines.append(f"#SBATCH --partition={self.partition}")
        if self.account:
            lines.append(f"#SBATCH --account={self.account}")
        return lines


@dataclasses.dataclass(frozen=True)
class SlurmSpec:
    """A training job: `nodes` x (`gpus_per_node` GPUs, or with 0 `ranks_per_node` CPU ranks)."""

    job_name: str
    nodes: int
    gpus_per_node: int
    ranks_per_node: Optional[int] = None
    time: str = "24:00:00"
    partition: Optional[str] = None
    account: Optional[str] = None
    cpus_per_gpu: int = 8
    cpus_per_task: Optional[int] = None  # default: cpus_per_gpu per GPU, one per CPU rank
    mem: Optional[str] = None
    master_port: int = 29500
    signal_lead_s: int = 300  # seconds before the time limit to checkpoint and requeue

    def __post_init__(self) -> None:
        if self.nodes < 1 or self.gpus_per_node < 0:
            raise ValueError(f"SLURM: --nnodes ({self.nodes}) must be >= 1 and --gpus-per-node ({self.gpus_per_node}) >= 0")
        if self.gpus_per_node and self.ranks_per_node not in (None, self.gpus_per_node):
            raise ValueError(f"SLURM: GPU nodes run one rank per GPU; --nproc {self.ranks_per_node} is for CPU "
                             f"nodes (--gpus-per-node 0), here --gpus-per-node is {self.gpus_per_node}")
        if self.ranks_per_node is not None and self.ranks_per_node < 1:
            raise ValueError(f"SLURM: --nproc (ranks per node) must be >= 1 (got {self.ranks_per_node})")
        limit = time_limit_seconds(self.resources.time)  # building the resources validates them
        if not 0 < self.signal_lead_s <= MAX_SIGNAL_LEAD_S or (limit is not None and self.signal_lead_s >= limit):
            raise ValueError(f"SLURM: --signal-lead {self.signal_lead_s} s must be > 0 and shorter than --time "
                             f"{self.time} (and at most {MAX_SIGNAL_LEAD_S})")

    @property
    def resources(self) -> SlurmResources:
        return SlurmResources(self.time, self.partition, self.account, self.cpus_per_task, self.mem)

    @property
    def ranks(self) -> int:
        """Ranks per node."""
        return self.gpus_per_node or self.ranks_per_node or 1

    @property
    def cpus(self) -> int:
        """CPUs of each node's task (torchrun and its ranks)."""
        if self.cpus_per_task is not None:
            return self.cpus_per_task
        return self.cpus_per_gpu * self.gpus_per_node if self.gpus_per_node else self.ranks


def sbatch_script(spec: SlurmSpec, config: Path, run_dir: Path, workdir: Path, python: str = sys.executable) -> str:
    """The text of a training job's sbatch script (paths made absolute: the job runs elsewhere)."""
    config, run_dir, workdir = config.resolve(), run_dir.resolve(), workdir.resolve()
    torchrun = torchrun_command(
        worker_args(config, run_dir), nproc_per_node=spec.ranks, nnodes=spec.nodes,
        master_addr="$MASTER_ADDR", master_port=spec.master_port, rdzv=True, python=python,
    )
    shape = [f"#SBATCH --nodes={spec.nodes}", "#SBATCH --ntasks-per-node=1"]  # one torchrun per node
    if spec.gpus_per_node:
        shape.append(f"#SBATCH --gpus-per-node={spec.gpus_per_node}")
    header = _with_shape(spec.resources.header(spec.job_name, spec.cpus, f"{run_dir}/logs/slurm-%j.out"), shape)
    header.append(f"#SBATCH --signal=B:USR1@{spec.signal_lead_s}")
    body = f"""
set -uo pipefail
cd {shlex.quote(str(workdir))}
export MASTER_ADDR=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)
export MASTER_PORT={spec.master_port}
export OMP_NUM_THREADS={max(1, spec.cpus // spec.ranks)}
export TORCH_NCCL_ASYNC_ERROR_HANDLING=1
export TORCH_ELASTIC_SHUTDOWN_TIMEOUT={spec.signal_lead_s}  # torchrun's wait for saving ranks (default 30 s)
echo "unclip: job $SLURM_JOB_ID (restart ${{SLURM_RESTART_COUNT:-0}}) on $SLURM_JOB_NUM_NODES node(s), master $MASTER_ADDR"

# Near the time limit: ask every rank to checkpoint (SIGTERM), wait, then requeue this job.
# The signal goes through SLURM to the step's processes on every node: a SIGTERM to srun
# itself would make it abort the step (SIGKILL) before the ranks could save.
requeue() {{
  echo "unclip: time limit near; checkpointing and requeueing"
  scancel --signal=TERM "$SLURM_JOB_ID"
  wait "$srun_pid"
  scontrol requeue "$SLURM_JOB_ID"
  exit 0
}}
trap requeue USR1

# --cpus-per-task again: since SLURM 22.05 a step does not inherit the job's
srun --kill-on-bad-exit=1 --ntasks-per-node=1 --cpus-per-task={spec.cpus} \\
  {shell_join(torchrun)} &
srun_pid=$!
wait "$srun_pid"
rc=$?
# `wait` returns early (rc > 128) when the USR1 trap fires; the trap then owns the exit.
while kill -0 "$srun_pid" 2>/dev/null; do wait "$srun_pid"; rc=$?; done
exit $rc
"""
    return "\n".join(header) + "\n" + body


def _with_shape(header: list[str], shape: list[str]) -> list[str]:
    """The job's shape (nodes, tasks, GPUs) right after its name, where readers look first."""
    return header[:2] + shape + header[2:]


@dataclasses.dataclass(frozen=True)
class ArraySpec:
    """A job array of `tasks` single-process tasks: task i runs `command` with `--rank i
    --world-size tasks` appended (each takes its share of the work, e.g. shards[i::tasks])."""

    job_name: str
    tasks: int
    gpus_per_task: int = 0
    resources: SlurmResources = SlurmResources()

    def __post_init__(self) -> None:
        if self.tasks < 1 or self.gpus_per_task < 0:
            raise ValueError(f"SLURM: --array ({self.tasks}) must be >= 1 and --gpus-per-task ({self.gpus_per_task}) >= 0")


def array_script(spec: ArraySpec, command: Sequence[str], log_dir: Path, workdir: Path) -> str:
    """The text of a job array's sbatch script; each task's log is LOG_DIR/NAME-JOB_TASK.out."""
    log_dir, workdir = log_dir.resolve(), workdir.resolve()
    cpus = spec.resources.cpus_per_task or 1
    shape = [f"#SBATCH --array=0-{spec.tasks - 1}", "#SBATCH --ntasks=1"]
    if spec.gpus_per_task:
        shape.append(f"#SBATCH --gpus-per-task={spec.gpus_per_task}")
    header = _with_shape(spec.resources.header(spec.job_name, cpus, f"{log_dir}/{spec.job_name}-%A_%a.out"), shape)
    ranked = [*command, "--rank", "$SLURM_ARRAY_TASK_ID", "--world-size", str(spec.tasks)]
    body = f"""
set -uo pipefail
cd {shlex.quote(str(workdir))}
export OMP_NUM_THREADS={cpus}
echo "unclip: task $SLURM_ARRAY_TASK_ID of {spec.tasks} (job ${{SLURM_ARRAY_JOB_ID}}, restart ${{SLURM_RESTART_COUNT:-0}}) on $(hostname)"
# exec: the task is the batch step's process, so a preemption's SIGTERM reaches it directly
exec {shell_join(ranked)}
"""
    return "\n".join(header) + "\n" + body


def write_and_submit(script: str, path: Path, prog: str) -> bool:
    """Write the script to `path` and submit it with sbatch if sbatch is here (its output,
    `Submitted batch job N`, goes to stdout); False when sbatch refused it."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(script)
    print(f"[{prog}] wrote {path}", flush=True)
    if shutil.which("sbatch") is None:
        print(f"[{prog}] sbatch is not on PATH here; submit it on the cluster with: sbatch {path}", flush=True)
        return True
    return subprocess.run(["sbatch", str(path)]).returncode == 0
