"""`unclip export RUN_DIR [RUN_DIR ...] --out PATH [--format unclip|diffusers]`.

unclip (default): consolidated EMA weights (safetensors), no DeepSpeed needed. Several runs
export in one process (one interpreter start-up instead of one per stage), each to
`PATH/<run dir name>.safetensors`.
diffusers: one `UnCLIPPipeline` folder at PATH from a prior, a decoder and an upsampler (run
directories or export files) and the CLIP they read; refused, naming every setting that does
not map and writing nothing, for runs diffusers cannot express."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from data_pipeline.io import join_url, makedirs, mask_url, mask_urls_in, url_dirname
from launch.cli import EXIT_OK, EXIT_RUNTIME, EXIT_USAGE
from launch.url_checks import check_run_dir, check_urls


def targets(run_dirs: list[str], out: str) -> list[tuple[Path, str]]:
    """(run dir, export file) pairs: `out` is the file for one run, the folder for several;
    a path or any fsspec URL (kept a string: `Path` would fold `s3://` into `s3:/`)."""
    if len(run_dirs) == 1:
        return [(Path(run_dirs[0]), out)]
    return [(Path(run), join_url(out, f"{Path(run).resolve().name}.safetensors")) for run in run_dirs]


def export_diffusers(args: argparse.Namespace) -> int:
    from launch.export_diffusers import export_runs
    from models.config import ConfigError
    from models.interop.diffusers_unet import Unmappable
    from models.weights import WeightsError

    try:
        out = export_runs(args.run_dirs, args.out)
    except (Unmappable, FileExistsError, ConfigError) as err:
        print(f"unclip export: {err}", file=sys.stderr)
        return EXIT_USAGE
    except (WeightsError, OSError) as err:
        print(f"unclip export: {err}", file=sys.stderr)
        return EXIT_RUNTIME
    print(f"unclip export: diffusers UnCLIPPipeline folder -> {out}")
    return EXIT_OK


def main(args: argparse.Namespace) -> int:
    for run_dir in args.run_dirs:
        check_run_dir(run_dir, "RUN_DIR")
    check_urls("--out", args.out, write=True)
    from models.weights import WeightsError
    from trainer.export import export

    if getattr(args, "export_format", "unclip") == "diffusers":
        return export_diffusers(args)

    pairs = targets(args.run_dirs, args.out)
    try:  # the output folder, before any checkpoint is read; in an object store, its bucket
        makedirs(url_dirname(pairs[0][1]))
    except ValueError as err:
        print(f"unclip export: {err}", file=sys.stderr)
        return EXIT_USAGE
    except OSError as err:
        print(f"unclip export: cannot write {mask_url(args.out)}: {err}", file=sys.stderr)
        return EXIT_RUNTIME
    for run_dir, out in pairs:
        try:
            info = export(run_dir, out)
        except (WeightsError, OSError) as err:
            print(f"unclip export: {mask_urls_in(str(err))}", file=sys.stderr)
            return EXIT_RUNTIME
        print(
            f"unclip export: {info['stage']} EMA weights of {info['checkpoint']} (step {info['step']}, "
            f"{info['parameters']:,} values in {info['tensors']} tensors) -> {mask_url(out)}"
        )
    return EXIT_OK
