"""What a person looks at: the console line and `RUN_DIR/report.png`.

The curves are drawn with matplotlib's object API on its Agg canvas (no display, no pyplot
global state, safe in any process): axes, ticks, legends and layout are what a plotting
library is for. It is imported when a report is drawn, not by every rank at start. Sample
grids are laid out by `models.images`.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any, Mapping, Optional, Sequence

import numpy as np


def console_line(record: Mapping[str, Any]) -> str:
    """One human line per logging step, from a metrics.jsonl record (null prints as nan)."""

    def num(key: str, spec: str, scale: float = 1.0) -> str:
        value = record.get(key)
        return "nan" if value is None else format(value * scale, spec)

    parts = [f"[{record['job']}/{record['stage']}] step {record['step']}", f"loss {num('unclip_loss', '.4g')}"]
    parts.append(f"lr {num('unclip_learning_rate', '.3g')}")
    if "unclip_grad_norm" in record:
        parts.append(f"gnorm {num('unclip_grad_norm', '.3g')}")
    parts.append(f"{num('unclip_samples_per_second', '.1f')} samples/s")
    parts.append(f"{num('unclip_step_time_seconds', '.0f', 1000)} ms/step (data {num('unclip_data_wait_ratio', '.0%')})")
    if "unclip_mfu_ratio" in record:
        parts.append(f"MFU {num('unclip_mfu_ratio', '.1%')}")
    if "unclip_validation_loss" in record:
        parts.append(f"val loss {num('unclip_validation_loss', '.4g')}")
    parts.append(f"mem {num('unclip_memory_used_bytes', '.2f', 2**-30)} GiB")
    skipped = sum(record.get("unclip_skipped_samples_total", {}).values())
    if skipped:
        parts.append(f"skipped {skipped} samples")
    return " | ".join(parts)


# --------------------------------------------------------------------- curves
def read_metrics(path: Path | str) -> list[dict[str, Any]]:
    """Records of a metrics.jsonl, one per step, sorted by step.

    A resumed run logs some steps twice (it restarts from its last checkpoint): the later
    line wins. A torn last line (a killed job) is ignored.
    """
    by_step: dict[int, dict[str, Any]] = {}
    with open(path) as f:
        for line in f:
            try:
                record = json.loads(line)
                by_step[int(record["step"])] = record
            except (ValueError, KeyError, TypeError):
                continue
    return [by_step[s] for s in sorted(by_step)]


def moving_average(values: Sequence[float], window: Optional[int] = None) -> list[float]:
    """Trailing mean over `window` values (default: a twentieth of the series)."""
    window = window or max(1, len(values) // 20)
    cumulative = np.concatenate([[0.0], np.cumsum(values, dtype=np.float64)])
    ends = np.arange(1, len(values) + 1)
    starts = np.maximum(0, ends - window)
    return [float(v) for v in (cumulative[ends] - cumulative[starts]) / (ends - starts)]


def plot_curves(records: Sequence[Mapping[str, Any]], path: Path | str, title: str = "") -> Path:
    """Loss with validation loss, the stage's sampled validation metrics (if any) and samples/s
    against step, one panel each, in one PNG."""
    if not records:
        raise ValueError("plot_curves: no records to draw")
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    sampled = sorted({k for r in records for k in r if k.startswith(VALIDATION_PREFIX)} - set(_NOT_SAMPLED))
    panels = [_loss_panel] + ([lambda ax, rs: _metrics_panel(ax, rs, sampled)] if sampled else []) + [_throughput_panel]
    height = 0.6 + 2.8 * len(panels)
    figure = Figure(figsize=(10, height), dpi=100)
    FigureCanvasAgg(figure)  # Agg renders to a buffer: no display, no pyplot state
    # a fixed layout: matplotlib's layout engines cost more than drawing the curves
    figure.subplots_adjust(left=0.08, right=0.98, bottom=0.45 / height, top=1 - 0.5 / height, hspace=0.3)
    axes = figure.subplots(len(panels), 1, sharex=True, squeeze=False)[:, 0]
    for ax, panel in zip(axes, panels):
        panel(ax, records)
        ax.grid(True, color="0.9")
    axes[-1].set_xlabel("step")
    figure.suptitle(title, fontsize=10)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path)
    return path


VALIDATION_PREFIX = "unclip_validation_"
_NOT_SAMPLED = ("unclip_validation_loss", "unclip_validation_seconds")


def _series(records: Sequence[Mapping[str, Any]], key: str) -> tuple[list[float], list[float]]:
    """(steps, values) of the records that logged a finite `key`."""
    points = [(float(r["step"]), float(r[key])) for r in records if isinstance(r.get(key), (int, float))]
    points = [(x, y) for x, y in points if math.isfinite(y)]
    return [x for x, _ in points], [y for _, y in points]


def _curve(ax: Any, records: Sequence[Mapping[str, Any]], key: str, label: str, color: str) -> None:
    """Raw values (light) under their moving average (dark)."""
    xs, ys = _series(records, key)
    if len(xs) == 1:
        ax.plot(xs, ys, "o", color=color, label=label)
    elif xs:
        ax.plot(xs, ys, color=color, alpha=0.3, linewidth=1)
        ax.plot(xs, moving_average(ys), color=color, linewidth=2, label=label)


def _loss_panel(ax: Any, records: Sequence[Mapping[str, Any]]) -> None:
    _curve(ax, records, "unclip_loss", "training loss", "tab:blue")
    xs, ys = _series(records, "unclip_validation_loss")
    if xs:
        ax.plot(xs, ys, "o-", color="tab:orange", markersize=4, label="validation loss (held out)")
    _finish(ax, "loss")


def _metrics_panel(ax: Any, records: Sequence[Mapping[str, Any]], keys: Sequence[str]) -> None:
    for key in keys:
        xs, ys = _series(records, key)
        reference = "reference" in key  # the data's own figure: a level to reach, drawn dashed
        ax.plot(xs, ys, "--" if reference else "o-", markersize=4, label=key.removeprefix(VALIDATION_PREFIX))
    _finish(ax, "validation (sampled)")


def _throughput_panel(ax: Any, records: Sequence[Mapping[str, Any]]) -> None:
    _curve(ax, records, "unclip_samples_per_second", "samples/s (job)", "tab:green")
    _finish(ax, "throughput")


def _finish(ax: Any, title: str) -> None:
    ax.set_title(title, fontsize=10, loc="left")
    if ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize=8, loc="best")
    else:
        ax.text(0.5, 0.5, "no finite values", transform=ax.transAxes, ha="center", color="gray")


def plot_run(run_dir: Path | str) -> Path:
    """RUN_DIR/metrics.jsonl -> RUN_DIR/report.png. Raises ValueError if nothing was logged."""
    run_dir = Path(run_dir)
    records = read_metrics(run_dir / "metrics.jsonl")
    if not records:
        raise ValueError(f"{run_dir / 'metrics.jsonl'} has no logged steps yet")
    last = records[-1]
    title = f"{last.get('job', '?')} / {last.get('stage', '?')}: {len(records)} logged steps, last step {last['step']}"
    return plot_curves(records, run_dir / "report.png", title)
