"""`unclip train --config FILE [--run-dir DIR] [--nproc N] [--no-resume] [--init-from WEIGHTS]`.

Validates the job (exit 2 on a bad config before any work), prepares the run directory
(`config.yaml` = the resolved job), refuses to resume an incompatible run or to start a fresh
one from weights that do not fit it, then starts N local ranks of `launch.worker`. For
several nodes use `unclip launch` (with `--set init_from=WEIGHTS`).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from launch.cli import EXIT_OK, EXIT_RUNTIME
from launch.config_files import dump_config, load_config
from launch.url_checks import check_data_sources, check_run_dir
from models import stages
from models.config import ConfigError, config_to_dict
from trainer.config import TrainJob


def metrics_overrides(args: argparse.Namespace) -> list[str]:
    out = []
    if getattr(args, "metrics_port", None) is not None:
        out.append(f"metrics.port={args.metrics_port}")
    if getattr(args, "metrics_host", None):
        out.append(f"metrics.host={args.metrics_host}")
    if getattr(args, "pushgateway", None):
        out.append(f"metrics.pushgateway={args.pushgateway}")
    return out


def load_train_job(config: str, overrides: list[str]) -> TrainJob:
    job = load_config(config, overrides)
    if not isinstance(job, TrainJob):
        raise ConfigError(f"{config}: stage {job.stage!r} is not a training stage ({', '.join(stages.names())})")
    return resolve_embedding_scale(job)


def resolve_embedding_scale(job: TrainJob) -> TrainJob:
    """`model.image_embed_scale: stats` -> 1 / (mean per-dimension std) of the image embeddings
    in the first source's `stats.json` (written by precompute); the number is what the run's
    config.yaml and checkpoints record."""
    import dataclasses

    from data_pipeline.embed_stats import read_stats

    if getattr(job.model, "image_embed_scale", None) != "stats":
        return job
    folders = [s.embeddings for s in (job.data.sources if job.data else []) if s.embeddings is not None]
    if not folders:
        raise ConfigError("model.image_embed_scale: stats needs data.sources[].embeddings (precompute's folder)")
    folder = folders[0] if isinstance(folders[0], str) else folders[0][0]
    stats = read_stats(folder)
    if stats is None:
        raise ConfigError(f"model.image_embed_scale: stats: {folder} has no stats.json (precompute again with this version)")
    std = stats["image_embed"]["std"]
    scale = len(std) / sum(std)
    return dataclasses.replace(job, model=dataclasses.replace(job.model, image_embed_scale=scale))


def prepare_run_dir(job: TrainJob, run_dir: Path, *, resume: bool) -> Path:
    """Write RUN_DIR/config.yaml; check a resumed run is compatible (ConfigError if not)."""
    from models.weights import read_meta
    from trainer.checkpoint import Checkpoints, atomic_write_text, resume_problem

    checkpoints = run_dir / "checkpoints"
    if resume:
        latest = Checkpoints(checkpoints, 0, 1, job.checkpoint.keep_last).find_latest()
        problem = resume_problem(read_meta(latest), config_to_dict(job), latest) if latest is not None else None
        if problem:
            raise ConfigError(problem)
    elif checkpoints.exists():
        aside = run_dir / f"checkpoints.replaced-{time.strftime('%Y%m%d-%H%M%S')}"
        checkpoints.rename(aside)
        print(f"[unclip train] --no-resume: previous checkpoints moved to {aside}")
    for sub in ("checkpoints", "logs", "samples"):
        (run_dir / sub).mkdir(parents=True, exist_ok=True)
    path = run_dir / "config.yaml"
    atomic_write_text(path, dump_config(job))  # every node of a job may write it at once
    return path


def preflight(path: str, job: TrainJob, *, world_size: int) -> None:
    """`unclip check` of this job's data (cheap: listings and manifests); ConfigError naming
    every problem, before any rank starts."""
    from launch.check_cmd import check_configs, preflight_job

    report = check_configs([(path, job)])
    report.extend(preflight_job(path, job, world_size=world_size))
    if report.problems:
        raise ConfigError("preflight (`unclip check`) found problems:\n  " + "\n  ".join(report.problems))


def check_embedding_conventions(job: TrainJob) -> None:
    """ConfigError where an embeddings folder the job reads holds unit-norm embeddings and the
    stage reads raw ones, or the other way round (cheap: one manifest per source)."""
    from data_pipeline.embeddings import convention_problem, read_manifest

    clip = getattr(job, "clip", None)
    if clip is None or job.data is None:
        return
    for i, src in enumerate(job.data.sources):
        if src.embeddings is None or src.format == "clip-retrieval":
            continue
        folder = src.embeddings if isinstance(src.embeddings, str) else src.embeddings[0]
        try:
            manifest = read_manifest(folder)
        except (OSError, ValueError):
            continue  # unreadable or absent: the data loader says so, with its own message
        problem = manifest and convention_problem(manifest, clip.embeddings, folder=folder, key="clip.embeddings")
        if problem:
            raise ConfigError(f"data.sources[{i}].embeddings: {problem}")


def init_from_override(args: argparse.Namespace) -> list[str]:
    """`--init-from PATH` as the job's `init_from`, absolute (the ranks may start elsewhere)."""
    path = getattr(args, "init_from", None)
    return [f"init_from={json.dumps(str(Path(path).resolve()))}"] if path else []


def check_initial_weights(job: TrainJob, run_dir: Path, *, resume: bool) -> None:
    """A fresh run's `init_from` must fit the job (headers only); a resumed one ignores it."""
    from models.weights import find_latest
    from trainer.init_from import check_init_from

    if job.init_from is None:
        return
    if resume and find_latest(run_dir / "checkpoints") is not None:
        print(f"[unclip train] init_from {job.init_from} ignored: the run resumes from its own checkpoint", flush=True)
        return
    check_init_from(job)


def main(args: argparse.Namespace) -> int:
    from launch.launchers import run_local, worker_args

    job = load_train_job(args.config, [*args.overrides, *metrics_overrides(args), *init_from_override(args)])
    if args.nproc < 1:
        raise ConfigError(f"--nproc must be at least 1 (got {args.nproc})")
    check_data_sources(job)
    check_run_dir(args.run_dir)
    run_dir = Path(args.run_dir or Path("runs") / job.name)
    check_initial_weights(job, run_dir, resume=not args.no_resume)
    check_embedding_conventions(job)
    preflight(args.config, job, world_size=args.nproc)
    config = prepare_run_dir(job, run_dir, resume=not args.no_resume)
    print(f"[unclip train] {job.stage} job {job.name!r}: {args.nproc} rank(s), run directory {run_dir}", flush=True)
    code = run_local(worker_args(config, run_dir), args.nproc)
    return EXIT_OK if code == 0 else EXIT_RUNTIME
