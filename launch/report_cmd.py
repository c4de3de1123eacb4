"""`unclip report RUN_DIR`: draw the loss and throughput curves of a run to RUN_DIR/report.png."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from launch.cli import EXIT_OK, EXIT_RUNTIME, EXIT_USAGE


def main(args: argparse.Namespace) -> int:
    from trainer.report import plot_run

    run_dir = Path(args.run_dir)
    if not run_dir.is_dir():
        print(f"unclip report: {run_dir} is not a directory (expected a run directory)", file=sys.stderr)
        return EXIT_USAGE
    if not (run_dir / "metrics.jsonl").is_file():
        print(f"unclip report: {run_dir} has no metrics.jsonl (has the run logged a step yet?)", file=sys.stderr)
        return EXIT_RUNTIME
    try:
        path = plot_run(run_dir)
    except ValueError as err:
        print(f"unclip report: {err}", file=sys.stderr)
        return EXIT_RUNTIME
    print(path)
    return EXIT_OK
