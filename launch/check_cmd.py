"""`unclip check --config FILE [--config FILE ...] [--set ...] [--world-size N] [--no-data]`.

The preflight of a pipeline's jobs, before any GPU is asked for (also run by `unclip train`):
each training job's data (data_pipeline.preflight), each job's CLIP widths against its model,
and, given together, a precompute job's CLIP against the stages that read its embeddings.
Exit 0 when nothing is wrong, 2 with every problem named.
"""

from __future__ import annotations

import argparse
import sys
from typing import Any, Optional

from data_pipeline.preflight import Report, compare_clip
from launch.cli import EXIT_OK, EXIT_USAGE
from models import stages
from models.clip import ClipExpectation, architecture_widths


def stage_expectation(job: Any) -> Optional[ClipExpectation]:
    """The CLIP a training job expects its embeddings from (its spec's; None: it reads none)."""
    spec = stages.get(job.stage)
    return spec.embeddings(job) if spec.embeddings is not None else None


def stage_wants(job: Any) -> frozenset:
    return frozenset(stages.get(job.stage).fields(job))


def _reads_embeddings(job: Any) -> bool:
    return job.data is not None and stage_expectation(job) is not None


def check_configs(jobs: list[tuple[str, Any]]) -> Report:
    """The jobs' CLIPs against their models, and each precompute job's against every stage."""
    report = Report()
    precomputes = [(p, j) for p, j in jobs if j.stage == "precompute"]
    for path, job in jobs:
        expect = stage_expectation(job) if job.stage != "precompute" else None
        if expect is None or job.data is None:
            continue
        widths = architecture_widths(job.clip.name)
        if widths is not None:
            for text in compare_clip(expect, name=job.clip.name, pretrained=None, embed_dim=widths[0],
                                     text_width=widths[1], context_length=widths[2], source="its clip.name"):
                report.problem(f"{path}: {text}")
        for pre_path, pre in precomputes:
            widths = architecture_widths(pre.clip.name)
            if widths is None:
                report.note(f"{pre_path}: open_clip has no config for {pre.clip.name}: its widths are checked "
                            f"against the embeddings' manifest only")
                continue
            for text in compare_clip(expect, name=pre.clip.name, pretrained=pre.clip.pretrained, embed_dim=widths[0],
                                     text_width=widths[1], context_length=widths[2],
                                     source=f"{pre_path} (what precompute embeds with)"):
                report.problem(f"{path}: {text}")
            folders = [s.embeddings for s in job.data.sources if s.embeddings is not None]
            if pre.out and folders and pre.out not in folders:
                report.note(f"{path} reads embeddings from {', '.join(map(str, folders))}; {pre_path} writes {pre.out}")
    return report


def preflight_job(path: str, job: Any, *, world_size: int) -> Report:
    """The data checks of one job (training: its data as the stage reads it; precompute: its inputs)."""
    from data_pipeline.config import DataConfig, SourceConfig
    from data_pipeline.preflight import check_data

    if job.stage == "precompute":
        if not job.shards:
            return Report()
        data = DataConfig(sources=[SourceConfig(shards=job.shards, storage_options=job.storage_options)], resampled=True)
        return check_data(data, want=frozenset({"image", "caption"}), world_size=world_size)
    if job.data is None:
        return Report()  # synthetic batches
    return check_data(job.data, want=stage_wants(job), world_size=world_size, expect=stage_expectation(job))


def print_report(path: str, report: Report, file=sys.stdout) -> None:
    for line in report.lines():
        print(f"  {line}", file=file)


def main(args: argparse.Namespace) -> int:
    from launch.config_files import load_config

    jobs = [(path, load_config(path, args.overrides)) for path in args.config]
    from trainer.distributed import world_info_from_env

    world_size = args.world_size or world_info_from_env().world_size
    total = Report()
    configs = check_configs(jobs)
    if configs.problems or configs.notes:
        print("unclip check: the configs together")
        print_report("", configs)
    total.extend(configs)
    for path, job in jobs:
        print(f"unclip check: {path} ({job.stage}, {world_size} rank(s))")
        report = Report() if args.no_data else preflight_job(path, job, world_size=world_size)
        if args.no_data:
            report.note("data not checked (--no-data)")
        print_report(path, report)
        total.extend(report)
    if total.problems:
        print(f"unclip check: {len(total.problems)} problem(s)", file=sys.stderr)
        return EXIT_USAGE
    print("unclip check: no problems")
    return EXIT_OK
