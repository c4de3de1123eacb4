"""What a person looks at: the console line and the loss/throughput curves.

Drawn with PIL only (no matplotlib): two curves do not need a plotting library. Sample
grids are laid out by `models.images`.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any, Mapping, Optional, Sequence

import numpy as np
from PIL import Image, ImageDraw, ImageFont


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


def nice_ticks(lo: float, hi: float, count: int = 5) -> list[float]:
    """About `count` round tick values (1, 2, 5 x 10^k apart) covering [lo, hi]."""
    if not hi > lo:
        return [lo]
    raw = (hi - lo) / max(1, count - 1)
    base = 10 ** math.floor(math.log10(raw))
    step = min((m * base for m in (1, 2, 5, 10)), key=lambda candidate: abs(candidate - raw))
    first = math.ceil(lo / step - 1e-9) * step
    return [first + i * step for i in range(int((hi - first) / step + 1e-9) + 1)]


def _text_size(font: Any, text: str) -> tuple[int, int]:
    left, top, right, bottom = font.getbbox(text)
    return right - left, bottom - top


def _fmt(value: float) -> str:
    return f"{value:.3g}" if abs(value) < 1e4 else f"{value:.2e}"


def _panel(draw: ImageDraw.ImageDraw, box: tuple[int, int, int, int], title: str, xs: list[float], ys: list[float]) -> None:
    """Axes, ticks and the curve (raw in light blue, a moving average in dark blue)."""
    font = ImageFont.load_default()
    left, top, right, bottom = box
    draw.text((left, top - 18), title, fill="black", font=font)
    draw.rectangle(box, outline="black")
    points = [(x, y) for x, y in zip(xs, ys) if math.isfinite(y)]
    if not points:
        draw.text((left + 10, top + 10), "no finite values", fill="gray", font=font)
        return
    x_lo, x_hi = min(p[0] for p in points), max(p[0] for p in points)
    y_lo, y_hi = min(p[1] for p in points), max(p[1] for p in points)
    if x_hi == x_lo:
        x_hi = x_lo + 1
    if y_hi == y_lo:
        y_lo, y_hi = y_lo - 0.5 * (abs(y_lo) or 1), y_hi + 0.5 * (abs(y_hi) or 1)
    y_pad = 0.05 * (y_hi - y_lo)
    y_lo, y_hi = y_lo - y_pad, y_hi + y_pad

    def at(x: float, y: float) -> tuple[float, float]:
        return left + (x - x_lo) / (x_hi - x_lo) * (right - left), bottom - (y - y_lo) / (y_hi - y_lo) * (bottom - top)

    for tick in nice_ticks(y_lo, y_hi):
        _, py = at(x_lo, tick)
        draw.line([(left, py), (right, py)], fill=(230, 230, 230))
        draw.line([(left - 4, py), (left, py)], fill="black")
        draw.text((left - 8 - _text_size(font, _fmt(tick))[0], py - 6), _fmt(tick), fill="black", font=font)
    for tick in nice_ticks(x_lo, x_hi):
        px, _ = at(tick, y_lo)
        draw.line([(px, bottom), (px, bottom + 4)], fill="black")
        label = _fmt(tick)
        draw.text((px - _text_size(font, label)[0] / 2, bottom + 6), label, fill="black", font=font)
    raw = [at(x, y) for x, y in points]
    smooth = [at(x, y) for x, y in zip((p[0] for p in points), moving_average([p[1] for p in points]))]
    if len(raw) == 1:
        x, y = raw[0]
        draw.ellipse([x - 3, y - 3, x + 3, y + 3], fill=(20, 60, 160))
        return
    draw.line(raw, fill=(150, 180, 230), width=1)
    draw.line(smooth, fill=(20, 60, 160), width=2)


def moving_average(values: Sequence[float], window: Optional[int] = None) -> list[float]:
    """Trailing mean over `window` values (default: a twentieth of the series)."""
    window = window or max(1, len(values) // 20)
    cumulative = np.concatenate([[0.0], np.cumsum(values, dtype=np.float64)])
    ends = np.arange(1, len(values) + 1)
    starts = np.maximum(0, ends - window)
    return [float(v) for v in (cumulative[ends] - cumulative[starts]) / (ends - starts)]


def plot_curves(records: Sequence[Mapping[str, Any]], path: Path | str, title: str = "") -> Path:
    """Loss and samples/s against step, two panels in one PNG."""
    if not records:
        raise ValueError("plot_curves: no records to draw")
    width, height = 1000, 720
    image = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(image)
    font = ImageFont.load_default()
    draw.text((20, 10), title, fill="black", font=font)
    steps = [float(r["step"]) for r in records]
    panels = [("loss", "unclip_loss"), ("samples/s (job)", "unclip_samples_per_second")]
    for i, (label, key) in enumerate(panels):
        top = 60 + i * 330
        values = [math.nan if r.get(key) is None else float(r[key]) for r in records]
        _panel(draw, (90, top, width - 30, top + 260), label, steps, values)
        draw.text(((width - 30 + 90) / 2 - 12, top + 280), "step", fill="black", font=font)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    image.save(path)
    return path


def plot_run(run_dir: Path | str) -> Path:
    """RUN_DIR/metrics.jsonl -> RUN_DIR/report.png. Raises ValueError if nothing was logged."""
    run_dir = Path(run_dir)
    records = read_metrics(run_dir / "metrics.jsonl")
    if not records:
        raise ValueError(f"{run_dir / 'metrics.jsonl'} has no logged steps yet")
    last = records[-1]
    title = f"{last.get('job', '?')} / {last.get('stage', '?')}: {len(records)} logged steps, last step {last['step']}"
    return plot_curves(records, run_dir / "report.png", title)
