"""Timing: runs of competing workloads interleaved, summarised as median and min-max.

On a machine shared with other jobs, load comes and goes; timing A five times and then B five
times can hand one side a quiet minute and the other a busy one. Interleaving (A, B, A, B, ...)
exposes both to the same load, so their ratio is fair even when their absolute rates are not.
"""

from __future__ import annotations

import dataclasses
import statistics
import time
from typing import Callable, Optional


@dataclasses.dataclass(frozen=True)
class Stats:
    """Seconds per run over `runs` timed runs."""

    seconds: tuple[float, ...]

    @property
    def median(self) -> float:
        return statistics.median(self.seconds)

    @property
    def runs(self) -> int:
        return len(self.seconds)

    def rate(self, items: int) -> "Rate":
        return Rate(items / self.median, items / max(self.seconds), items / min(self.seconds), self.runs)


@dataclasses.dataclass(frozen=True)
class Rate:
    """Items per second: at the median run, and at the slowest and fastest runs."""

    median: float
    low: float
    high: float
    runs: int


def interleaved(fns: dict[str, Optional[Callable[[], object]]], runs: int, warmup: int = 1) -> dict[str, Stats]:
    """Time each callable `runs` times, taking turns; `warmup` untimed calls each first.
    Entries that are None (an implementation that is not available) are skipped."""
    live = {name: fn for name, fn in fns.items() if fn is not None}
    for _ in range(warmup):
        for fn in live.values():
            fn()
    seconds: dict[str, list[float]] = {name: [] for name in live}
    for _ in range(runs):
        for name, fn in live.items():
            start = time.perf_counter()
            fn()
            seconds[name].append(time.perf_counter() - start)
    return {name: Stats(tuple(s)) for name, s in seconds.items()}
