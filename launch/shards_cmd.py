"""`unclip shards`: webdataset shards from an image folder, a table, or the shapes dataset."""

from __future__ import annotations

import argparse
import sys

from data_pipeline.io import mask_url
from data_pipeline.shards import parse_source, write_shards
from launch.cli import EXIT_OK, EXIT_RUNTIME, EXIT_USAGE
from launch.url_checks import check_urls


def main(args: argparse.Namespace) -> int:
    try:
        kind, arg = parse_source(args.source)
    except ValueError as err:
        print(f"unclip shards: {err}", file=sys.stderr)
        return EXIT_USAGE
    check_urls("--out", args.out, write=True)
    if kind == "table":
        check_urls("--source", arg)
    try:
        report = write_shards(
            args.source,
            args.out,
            per_shard=args.per_shard,
            count=args.count,
            size=args.size,
            seed=args.seed,
            image_format=args.image_format,
            quality=args.quality,
            min_size=args.min_size,
            progress=sys.stderr.isatty(),
        )
    except ValueError as err:
        print(f"unclip shards: {err}", file=sys.stderr)
        return EXIT_USAGE
    except OSError as err:
        print(f"unclip shards: cannot write {mask_url(args.out)}: {err}", file=sys.stderr)
        return EXIT_RUNTIME
    print(f"unclip shards: {report.summary()}")
    if report.samples == 0:
        print(f"unclip shards: no usable samples in {args.source}", file=sys.stderr)
        return EXIT_RUNTIME
    return EXIT_OK
