"""Table 2: model FLOPs utilisation, achieved FLOP/s over the machine's own matmul peak.

FLOPs per sample are counted by `torch.utils.flop_counter` on one real training step of each
model (`trainer.flops.count_flops`: matmuls, convolutions and attention, forward + backward),
so each implementation is charged for what it actually computes. Achieved FLOP/s = FLOPs per
sample x the samples/s of table 1's training rows. The peak is the rate of large square
matmuls in the dtype the models train in (fp32 on CPU, bf16 on CUDA), timed in bursts
interleaved with those very training runs (median of the bursts), so that on a shared machine
numerator and denominator see the same load; the best rate seen before and after the tables
is reported beside it.
"""

from __future__ import annotations

import dataclasses
from typing import Callable, Optional

import torch

from benchmarks import ours, peer
from benchmarks.runtime import Runtime
from benchmarks.side_by_side import Result
from benchmarks.specs import PriorSpec
from benchmarks.timing import interleaved
from trainer.flops import count_flops, measure_peak_flops

# (device type, kind) -> the MFU target of the issue
TARGETS = {("cpu", "prior"): 0.50, ("cpu", "decoder"): 0.35, ("cuda", "prior"): 0.45}
PAPER_WIDTH_PRIOR = PriorSpec(dim=2048, depth=24, heads=32, dim_head=64, text_len=77, batch=64)


def peak_flops(runtime: Runtime, seconds: float = 1.0) -> float:
    """Best FLOP/s of square matmuls of a few sizes, in the training dtype of `runtime`."""
    dtype = torch.bfloat16 if runtime.precision == "bf16" else torch.float32
    sizes = (4096, 8192) if runtime.device.type == "cuda" else (1024, 2048)
    return max(measure_peak_flops(runtime.device, dtype, seconds=seconds, size=s) for s in sizes)


@dataclasses.dataclass(frozen=True)
class MfuRow:
    label: str
    target: Optional[float]
    flops_per_sample: dict[str, float]  # impl -> counted training FLOPs per sample
    samples_per_s: dict[str, float]  # impl -> median training samples/s
    peak: float

    def mfu(self, impl: str) -> Optional[float]:
        if impl not in self.flops_per_sample or impl not in self.samples_per_s:
            return None
        return self.flops_per_sample[impl] * self.samples_per_s[impl] / self.peak

    @property
    def ratio(self) -> Optional[float]:
        a, b = self.mfu(ours.IMPL), self.mfu(peer.IMPL)
        return None if a is None or b is None else a / b


def rows_from(result: Result, peak: float) -> list[MfuRow]:
    """One row per training row of table 1, reusing its rates, counted FLOPs and interleaved
    peak (`peak` when the row has none)."""
    out = []
    for row in result.rows:
        wl = row.workload
        if wl.action != "train":
            continue
        rates = {impl: r.median for impl, r in ((ours.IMPL, row.ours), (peer.IMPL, row.theirs)) if r is not None}
        out.append(MfuRow(wl.label, TARGETS.get((result.runtime.device.type, wl.kind)),
                          result.flops_per_sample[wl.kind], rates, row.peak.median if row.peak else peak))
    return out


def paper_width_prior(runtime: Runtime, peak: float, runs: int, log: Callable[[str], None] = print) -> MfuRow:
    """The prior at the paper's width and depth (2048 x 24, batch 64), both implementations:
    the GPU row of table 2. Only meaningful (and only run) on CUDA."""
    spec = PAPER_WIDTH_PRIOR
    builders = {ours.IMPL: ours.build_prior, peer.IMPL: peer.build_prior if peer.load() is not None else None}
    flops, rates = {}, {}
    for impl, build in builders.items():
        if build is None:
            continue
        bench = build(spec, runtime)
        flops[impl] = count_flops(lambda: bench.loss().backward()) / spec.batch
        bench.optimizer.zero_grad(set_to_none=True)
        burst, burst_flops = runtime.matmul_burst()
        stats = interleaved({impl: bench.train_step, "peak": burst}, runs, warmup=2)
        rates[impl] = stats[impl].rate(spec.batch).median
        peak = stats["peak"].rate(burst_flops).median
        log(f"  paper-width prior, {impl}: {rates[impl]:.1f} samples/s, {flops[impl] * rates[impl] / peak:.1%} MFU")
        del bench
        torch.cuda.empty_cache()
    label = f"prior at paper width ({spec.dim} x {spec.depth} blocks, batch {spec.batch})"
    return MfuRow(label, TARGETS[("cuda", "prior")], flops, rates, peak)
