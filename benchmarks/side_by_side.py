"""Table 1: ours against dalle2-pytorch at matched sizes, in one process, runs interleaved.

Rows: prior and decoder training steps (forward + backward + AdamW), DDIM-50 sampling of
each, and the peak memory of each of those four workloads (fresh process per measurement,
`benchmarks/memory.py`). Also counts the training FLOPs of both sides, which table 2 (MFU)
turns into a fraction of the machine's peak.
"""

from __future__ import annotations

import dataclasses
import gc
import time
from typing import Callable, Optional

import torch

from benchmarks import ours, peer
from benchmarks.memory import peak_memory
from benchmarks.runtime import Bench, Runtime
from benchmarks.specs import Preset
from benchmarks.timing import Rate, interleaved
from trainer.flops import count_flops

TARGET_SPEEDUP = 1.5  # ours / theirs throughput, every row
TARGET_MEMORY = 1.0  # ours / theirs peak memory, at most


@dataclasses.dataclass(frozen=True)
class Workload:
    kind: str  # "prior" | "decoder"
    action: str  # "train" | "sample"
    label: str
    unit: str


def workloads(preset: Preset) -> list[Workload]:
    p, d = preset.prior, preset.decoder
    return [
        Workload("prior", "train", f"prior training step (batch {p.batch})", "samples/s"),
        Workload("decoder", "train", f"decoder training step, {d.image_size} px (batch {d.batch})", "samples/s"),
        Workload("prior", "sample", f"prior sampling, DDIM {p.sample_steps} steps (batch {p.sample_batch})",
                 "embeddings/s"),
        Workload("decoder", "sample", f"decoder sampling, DDIM {d.sample_steps} steps, guidance "
                 f"{d.guidance_scale:g} (batch {d.sample_batch})", "images/s"),
    ]


@dataclasses.dataclass
class Row:
    workload: Workload
    ours: Optional[Rate]
    theirs: Optional[Rate]
    peak: Optional[Rate] = None  # FLOP/s of the matmul bursts timed between the training runs
    ours_memory: Optional[int] = None  # peak bytes
    theirs_memory: Optional[int] = None
    memory_note: str = ""

    @property
    def speedup(self) -> Optional[float]:
        return None if self.ours is None or self.theirs is None else self.ours.median / self.theirs.median

    @property
    def memory_ratio(self) -> Optional[float]:
        if not self.ours_memory or not self.theirs_memory:
            return None
        return self.ours_memory / self.theirs_memory


@dataclasses.dataclass
class Result:
    preset: Preset
    runtime: Runtime
    peer_version: str
    params: dict[str, dict[str, int]]  # kind -> impl -> trainable parameters
    flops_per_sample: dict[str, dict[str, float]]  # kind -> impl -> training FLOPs per sample
    rows: list[Row]


def _builders(kind: str, have_peer: bool) -> dict[str, Optional[Callable]]:
    return {ours.IMPL: getattr(ours, f"build_{kind}"), peer.IMPL: getattr(peer, f"build_{kind}") if have_peer else None}


def _train_flops(bench: Bench, batch: int) -> float:
    flops = count_flops(lambda: bench.loss().backward())
    bench.optimizer.zero_grad(set_to_none=True)
    return flops / batch


def run(preset: Preset, runtime: Runtime, *, memory: bool = True, log: Callable[[str], None] = print) -> Result:
    have_peer = peer.load() is not None
    rows, params, flops = [], {}, {}
    start = time.perf_counter()
    for kind in ("prior", "decoder"):
        spec = getattr(preset, kind)
        torch.manual_seed(0)
        benches = {impl: build(spec, runtime) for impl, build in _builders(kind, have_peer).items() if build}
        params[kind] = {impl: b.params for impl, b in benches.items()}
        flops[kind] = {impl: _train_flops(b, spec.batch) for impl, b in benches.items()}
        log(f"{kind}: parameters " + ", ".join(f"{impl} {n:,}" for impl, n in params[kind].items()))
        for wl in (w for w in workloads(preset) if w.kind == kind):
            items = spec.batch if wl.action == "train" else spec.sample_batch
            fns = {impl: (b.train_step if wl.action == "train" else b.sample) for impl, b in benches.items()}
            if wl.action == "train":  # the machine's peak, under the load these runs saw (MFU)
                fns["peak"], burst_flops = runtime.matmul_burst()
            # a sampling run is 50 model calls, already warmed by the training rows of the same
            # model: its first run needs no untimed twin
            stats = interleaved(fns, preset.runs, preset.warmup if wl.action == "train" else 0)
            rates = {impl: s.rate(items) for impl, s in stats.items() if impl != "peak"}
            row = Row(wl, rates.get(ours.IMPL), rates.get(peer.IMPL))
            if "peak" in stats:
                row.peak = stats["peak"].rate(burst_flops)
            log(f"  {wl.label}: " + ", ".join(f"{impl} {r.median:.3g} {wl.unit}" for impl, r in rates.items())
                + (f" -> {row.speedup:.2f}x" if row.speedup else "") + f"  [{time.perf_counter() - start:.0f} s]")
            rows.append(row)
        del benches
        gc.collect()
    if memory:
        for row in rows:
            wl = row.workload
            args = (wl.kind, wl.action, preset.name, str(runtime.device), torch.get_num_threads())
            row.ours_memory, note = peak_memory(ours.IMPL, *args)
            row.theirs_memory, peer_note = peak_memory(peer.IMPL, *args) if have_peer else (None, "not installed")
            row.memory_note = note if row.theirs_memory or not have_peer else f"{note}; peer: {peer_note}"
            log(f"  peak memory, {wl.label}: ours {row.ours_memory}, theirs {row.theirs_memory} ({row.memory_note})"
                f"  [{time.perf_counter() - start:.0f} s]")
    return Result(preset, runtime, peer.version(), params, flops, rows)
