"""DeepSpeed's own monitors (TensorBoard, CSV, W&B, Comet), configured in `deepspeed.extra`.

DeepSpeed builds them on rank 0 from the sections of its JSON and writes its own events
(`Train/Samples/lr`); the job's logged values go to the same monitors (`monitor_events`,
written by trainer/metrics.py at each logging step), so one `tensorboard --logdir` shows
the loss, the validation figures and DeepSpeed's timers together.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Mapping, Optional

# DeepSpeed's monitor sections and the package each imports when its engine starts
MONITOR_PACKAGES = {"tensorboard": "tensorboard", "wandb": "wandb", "comet": "comet_ml"}
FILE_MONITORS = ("tensorboard", "csv_monitor")  # DeepSpeed monitors that write files


def monitor_sections(config: dict[str, Any], job_name: str, run_dir: Optional[Path]) -> dict[str, Any]:
    """DeepSpeed's TensorBoard and CSV monitors, where enabled, write to
    `output_path/job_name`: `job_name` defaults to the job's name and `output_path` to
    RUN_DIR/<section>; a relative `output_path` is taken from RUN_DIR (not from wherever the
    launcher started). W&B (`wandb`) and Comet keep DeepSpeed's own settings."""
    out = dict(config)
    for section in FILE_MONITORS:
        monitor = out.get(section)
        if not isinstance(monitor, dict) or not monitor.get("enabled"):
            continue
        monitor = out[section] = {"job_name": job_name, **monitor}
        path = monitor.get("output_path") or section
        if run_dir is not None and not os.path.isabs(path):
            path = str(Path(run_dir) / path)
        monitor["output_path"] = path
    return out


def monitor_events(record: Mapping[str, Any]) -> list[tuple[str, float, int]]:
    """A metrics.jsonl record as DeepSpeed monitor events `(tag, value, step)`: each logged
    number as `unclip/<name without unclip_>` (timestamps, counts by reason and nulls left out)."""
    step = int(record["step"])
    events = []
    for name, value in record.items():
        if not name.startswith("unclip_") or name.endswith("_timestamp_seconds"):
            continue
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            events.append((f"unclip/{name.removeprefix('unclip_')}", float(value), step))
    return events
