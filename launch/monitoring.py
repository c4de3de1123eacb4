"""File-based service discovery for Prometheus: which host:port serves a job's metrics.

A launcher that knows a job's nodes writes one JSON file per job into the folder the
scrape config watches (`configs/monitoring/prometheus.yml`: `targets/*.json`), and removes
it when the job ends. Prometheus notices new files without a restart.

Ports: global rank 0 serves the job (its own and the all-reduced `rank="all"` series) on
`--metrics-port`; with per-rank exporters every local rank r serves on port + r on every
node. Bind with `--metrics-host 0.0.0.0` (or the node's address) when Prometheus scrapes
from another machine.

From a shell (an sbatch script):
    python -m launch.monitoring write --dir /shared/prometheus/targets --job decoder-64 \\
        --stage decoder --hosts $(scontrol show hostnames | paste -sd,) --port 9400 --nproc 8
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shlex
import sys
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator, Optional, Sequence

TARGETS_ENV = "UNCLIP_PROMETHEUS_TARGETS"  # the folder the scrape config watches
PER_RANK_ENV = "UNCLIP_METRICS_PER_RANK"  # the same switch trainer/metrics.py reads in every rank
_SAFE = re.compile(r"[^A-Za-z0-9_.-]+")


def scrape_targets(hosts: Sequence[str], port: int, nproc_per_node: int = 1, per_rank: bool = False) -> list[str]:
    """`host:port` of every metrics server of a job whose ranks fill `hosts` in order.

    Without per-rank exporters only the first host (global rank 0) serves.
    """
    if not hosts:
        raise ValueError("scrape_targets: a job needs at least one host")
    if not 1 <= port <= 65535 or (per_rank and port + nproc_per_node - 1 > 65535):
        raise ValueError(f"scrape_targets: metrics ports {port}..{port + nproc_per_node - 1} are not valid TCP ports")
    if nproc_per_node < 1:
        raise ValueError(f"scrape_targets: nproc_per_node must be >= 1 (got {nproc_per_node})")
    if not per_rank:
        return [f"{hosts[0]}:{port}"]
    return [f"{host}:{port + local}" for host in hosts for local in range(nproc_per_node)]


def targets_file(targets_dir: Path | str, job: str) -> Path:
    return Path(targets_dir) / f"unclip-{_SAFE.sub('_', job)}.json"


def write_targets(
    targets_dir: Path | str,
    job: str,
    stage: str,
    hosts: Sequence[str],
    port: int,
    nproc_per_node: int = 1,
    per_rank: bool = False,
) -> Path:
    """Write (atomically: Prometheus may read at any moment) the SD file of one job."""
    entry = {
        "targets": scrape_targets(hosts, port, nproc_per_node, per_rank),
        # the same `job` the exporter puts on its series (see honor_labels in prometheus.yml)
        "labels": {"job": job, "stage": stage},
    }
    path = targets_file(targets_dir, job)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".tmp-", suffix=".json.partial")
    with os.fdopen(fd, "w") as f:
        json.dump([entry], f, indent=2)
        f.write("\n")
    os.replace(tmp, path)
    return path


def remove_targets(targets_dir: Path | str, job: str) -> bool:
    """Forget a finished job's targets; True if there was a file."""
    try:
        targets_file(targets_dir, job).unlink()
        return True
    except FileNotFoundError:
        return False


@contextmanager
def published(
    job: str,
    stage: str,
    hosts: Sequence[str],
    port: Optional[int],
    nproc_per_node: int = 1,
    per_rank: Optional[bool] = None,
    targets_dir: Optional[Path | str] = None,
) -> Iterator[Optional[Path]]:
    """For a launcher: the job's SD file exists while the `with` block (the job) runs.

    `targets_dir` defaults to $UNCLIP_PROMETHEUS_TARGETS and `per_rank` to
    $UNCLIP_METRICS_PER_RANK (what the ranks themselves read); without a folder or a
    metrics port nothing is written and the block runs as is.
    """
    targets_dir = targets_dir or os.environ.get(TARGETS_ENV)
    if not targets_dir or port is None:
        yield None
        return
    if per_rank is None:
        per_rank = os.environ.get(PER_RANK_ENV, "0").strip().lower() in ("1", "true", "yes")
    path = write_targets(targets_dir, job, stage, hosts, port, nproc_per_node, per_rank)
    try:
        yield path
    finally:
        remove_targets(targets_dir, job)


def sbatch_lines(job: str, stage: str, port: int, per_rank: bool = False, python: str = "python") -> list[str]:
    """Shell lines for an sbatch script, before `srun`: publish every node's targets, remove
    them when the script exits. Needs $UNCLIP_PROMETHEUS_TARGETS at run time (skipped if unset).
    """
    q = shlex.quote
    flags = " --per-rank" if per_rank else ""
    write = (
        f'{python} -m launch.monitoring write --dir "$UNCLIP_PROMETHEUS_TARGETS" --job {q(job)} --stage {q(stage)} '
        f'--hosts "$(scontrol show hostnames "$SLURM_JOB_NODELIST" | paste -sd,)" --port {int(port)} '
        f'--nproc "${{SLURM_NTASKS_PER_NODE:-1}}"{flags}'
    )
    remove = f'{python} -m launch.monitoring remove --dir "$UNCLIP_PROMETHEUS_TARGETS" --job {q(job)}'
    return [
        "# Prometheus file-based service discovery for this job's metrics ports (configs/monitoring/)",
        'if [ -n "${UNCLIP_PROMETHEUS_TARGETS:-}" ]; then',
        f"  {write}",
        f"  trap {q(remove)} EXIT",
        "fi",
    ]


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m launch.monitoring", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="action", required=True)
    w = sub.add_parser("write", help="write a job's file-SD targets")
    w.add_argument("--dir", required=True, help="folder the scrape config watches")
    w.add_argument("--job", required=True)
    w.add_argument("--stage", required=True)
    w.add_argument("--hosts", required=True, help="comma-separated node names, the first runs rank 0")
    w.add_argument("--port", type=int, required=True, help="the job's --metrics-port")
    w.add_argument("--nproc", type=int, default=1, help="ranks per node")
    w.add_argument("--per-rank", action="store_true", help="every rank serves on port + local rank")
    r = sub.add_parser("remove", help="remove a finished job's targets")
    r.add_argument("--dir", required=True)
    r.add_argument("--job", required=True)
    args = parser.parse_args(argv)
    if args.action == "remove":
        remove_targets(args.dir, args.job)
        return 0
    try:
        hosts = [h for h in args.hosts.split(",") if h]
        print(write_targets(args.dir, args.job, args.stage, hosts, args.port, args.nproc, args.per_rank))
    except ValueError as err:
        print(f"launch.monitoring: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
