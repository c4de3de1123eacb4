"""`unclip export RUN_DIR --out FILE`: consolidated EMA weights (safetensors), no DeepSpeed needed."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

EXIT_OK, EXIT_RUNTIME = 0, 1


def main(args: argparse.Namespace) -> int:
    from trainer.checkpoint import CheckpointError
    from trainer.export import export

    try:
        info = export(Path(args.run_dir), Path(args.out))
    except (CheckpointError, OSError) as err:
        print(f"unclip export: {err}", file=sys.stderr)
        return EXIT_RUNTIME
    print(
        f"unclip export: {info['stage']} EMA weights of {info['checkpoint']} (step {info['step']}, "
        f"{info['parameters']:,} values in {info['tensors']} tensors) -> {args.out}"
    )
    return EXIT_OK
