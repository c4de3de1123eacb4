"""`unclip train --config FILE [--run-dir DIR] [--nproc N] [--no-resume]`.

Validates the job (exit 2 on a bad config before any work), prepares the run directory
(`config.yaml` = the resolved job), refuses to resume an incompatible run, then starts N
local ranks of `launch.worker`. For several nodes use `unclip launch`.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from launch.cli import EXIT_OK, EXIT_RUNTIME
from launch.config_files import dump_config, load_config
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
    return job


def check_embedding_widths(job: TrainJob) -> None:
    """ConfigError (exit 2, before any rank starts) where the job's model is built for other
    CLIP widths than the precomputed embeddings it would read (each source's embeddings.json):
    the chain precompute -> prior/decoder must agree on embed_dim, text width and context.
    A different CLIP name with the same widths is only warned about."""
    spec = stages.get(job.stage)
    wants = spec.fields(job)
    if job.data is None or not wants & {"image_embed", "text_embed", "text_encodings"}:
        return
    from data_pipeline.embeddings import read_manifest
    from data_pipeline.io import mask_url

    shapes = spec.field_shapes(job)
    dim = shapes["image_embed" if "image_embed" in wants else "text_embed"][0]
    clip_name = getattr(getattr(job, "clip", None), "name", None)
    for i, src in enumerate(job.data.sources):
        if src.format != "webdataset" or src.embeddings is None:
            continue
        folder = src.embeddings if isinstance(src.embeddings, str) else src.embeddings[0]
        try:
            manifest = read_manifest(folder)
        except Exception:  # noqa: BLE001 - unreachable, no credentials, unreadable: the data loader says why
            continue
        if manifest is None:
            continue
        problems = [f"embed_dim {manifest.embed_dim}, the model's {dim}"] if manifest.embed_dim != dim else []
        if "text_encodings" in wants:
            max_len, width = shapes["text_encodings"]
            if manifest.text_width != width:
                problems.append(f"text width {manifest.text_width}, the model's text_width {width}")
            if manifest.context_length > max_len:
                problems.append(f"{manifest.context_length} tokens, the model's max_text_len {max_len}")
        where = f"data.sources[{i}].embeddings ({mask_url(folder)})"
        if problems:
            raise ConfigError(
                f"{where} holds CLIP {manifest.clip_name} embeddings of other widths ({'; '.join(problems)}): "
                f"precompute them with the CLIP this job is built for (clip.name: {clip_name}) or resize model"
            )
        if clip_name is not None and manifest.clip_name != clip_name:
            print(f"[unclip train] warning: {where} holds {manifest.clip_name} embeddings; the job's clip.name is "
                  f"{clip_name} (same widths, different CLIP?)", file=sys.stderr, flush=True)


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


def main(args: argparse.Namespace) -> int:
    from launch.launchers import run_local, worker_args

    job = load_train_job(args.config, [*args.overrides, *metrics_overrides(args)])
    if args.nproc < 1:
        raise ConfigError(f"--nproc must be at least 1 (got {args.nproc})")
    check_embedding_widths(job)
    run_dir = Path(args.run_dir or Path("runs") / job.name)
    config = prepare_run_dir(job, run_dir, resume=not args.no_resume)
    print(f"[unclip train] {job.stage} job {job.name!r}: {args.nproc} rank(s), run directory {run_dir}", flush=True)
    code = run_local(worker_args(config, run_dir), args.nproc)
    return EXIT_OK if code == 0 else EXIT_RUNTIME
