"""RESULTS.md: the index of every benchmark, and the model tables of `python -m benchmarks`.

The index keeps one row per benchmark script (the data pipeline's results stay in their own
file, linked from here); the model section below it is rewritten whole by each run.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Optional

from benchmarks import ours, peer
from benchmarks.mfu import MfuRow
from benchmarks.notes import BELOW_TARGET, MATCHING
from benchmarks.paper_scale import GPU_COUNTS, GPU_PEAK_BF16, ZERO_STAGES, PaperRow
from benchmarks.side_by_side import TARGET_MEMORY, TARGET_SPEEDUP, Result, Row
from benchmarks.timing import Rate

NOT_INSTALLED = "not installed"

INDEX_HEAD = """\
# Benchmark results

Latest committed measurements. This page is the index; each benchmark script writes its own
section or file.

| benchmark | command | results | latest headline (2 CPU cores, shared machine) |
|---|---|---|---|"""
MODELS_ROW = "| models vs dalle2-pytorch"
DEFAULT_OTHER_ROWS = [
    "| data pipeline overhead | `python benchmarks/data_pipeline.py` | [RESULTS_data_pipeline.md]"
    "(RESULTS_data_pipeline.md) | loader 1.16x a plain decode+resize loop (target >= 0.9); precompute 1.00x a "
    "plain open_clip forward loop with ViT-B-32, 0.37x with the ~150K-parameter demo CLIP (decode-bound) |",
]


def other_index_rows(existing: Optional[str]) -> list[str]:
    """The index rows of the other benchmarks, kept as they are in the current RESULTS.md."""
    if not existing:
        return DEFAULT_OTHER_ROWS
    rows, in_index = [], False
    for line in existing.splitlines():
        if line.startswith("| benchmark |"):
            in_index = True
        elif in_index and not line.startswith("|"):
            break
        elif in_index and not line.startswith("|---") and not line.startswith(MODELS_ROW):
            rows.append(line)
    return rows or DEFAULT_OTHER_ROWS


@dataclasses.dataclass
class RunInfo:
    command: str
    date: str
    wall_seconds: float
    machine: str  # CPU model, cores
    load_before: float
    load_after: float
    versions: dict[str, str]
    threads: int
    gpu: Optional[str]  # None: no CUDA device


def _fmt(x: float) -> str:
    return f"{x:.3g}" if x < 100 else f"{x:.0f}"


def _down(x: float, digits: int = 2) -> float:
    """Truncated, not rounded, so a value that misses a lower bound never prints as meeting it."""
    return math.floor(x * 10**digits) / 10**digits


def _up(x: float, digits: int = 2) -> float:
    """Rounded up, so a value over an upper bound never prints as meeting it."""
    return math.ceil(x * 10**digits) / 10**digits


def _count(n: float) -> str:
    for scale, unit in ((1e12, "T"), (1e9, "B"), (1e6, "M"), (1e3, "K")):
        if n >= scale:
            return f"{n / scale:.3g}{unit}"
    return f"{n:.3g}"


def _rate(rate: Optional[Rate], peer_installed: bool) -> str:
    if rate is None:
        return NOT_INSTALLED if not peer_installed else "-"
    return f"{_fmt(rate.median)} ({_fmt(rate.low)}-{_fmt(rate.high)})"


def _mib(n: Optional[int], note: str) -> str:
    return f"{n / 2**20:.0f} MiB" if n else (note or "-")


def _ok(met: Optional[bool]) -> str:
    return "" if met is None else (" (met)" if met else " (**below target**)")


def _key(row: Row, what: str) -> str:
    return f"{row.workload.kind}-{row.workload.action}-{what}"


def side_by_side_table(result: Result) -> list[str]:
    installed = result.peer_version != NOT_INSTALLED
    p = result.params
    out = [
        f"### 1. Side by side, {result.runtime.describe()}",
        "",
        "Parameters: prior ours " + f"{p['prior'][ours.IMPL]:,}" + ", theirs "
        + (f"{p['prior'][peer.IMPL]:,}" if peer.IMPL in p["prior"] else NOT_INSTALLED)
        + "; decoder ours " + f"{p['decoder'][ours.IMPL]:,}" + ", theirs "
        + (f"{p['decoder'][peer.IMPL]:,}" if peer.IMPL in p["decoder"] else NOT_INSTALLED) + ".",
        "",
        f"| row | ours | dalle2-pytorch {result.peer_version} | ours / theirs | target |",
        "| --- | ---: | ---: | ---: | --- |",
    ]
    below = []
    for row in result.rows:
        wl = row.workload
        met = None if row.speedup is None else row.speedup >= TARGET_SPEEDUP
        ratio = "-" if row.speedup is None else f"**{_down(row.speedup):.2f}x**"
        out.append(f"| {wl.label}, {wl.unit} | {_rate(row.ours, installed)} | {_rate(row.theirs, installed)} | "
                   f"{ratio} | >= {TARGET_SPEEDUP}x{_ok(met)} |")
        if met is False:
            below.append((_key(row, "speed"), f"{wl.label}: {_down(row.speedup):.2f}x"))
    for row in result.rows:
        wl = row.workload
        ratio = row.memory_ratio
        met = None if ratio is None else ratio <= TARGET_MEMORY
        theirs = _mib(row.theirs_memory, NOT_INSTALLED if not installed else row.memory_note)
        out.append(f"| peak memory, {wl.label} | {_mib(row.ours_memory, row.memory_note)} | {theirs} | "
                   f"{'-' if ratio is None else f'**{_up(ratio):.2f}**'} | <= {TARGET_MEMORY:g}{_ok(met)} |")
        if met is False:
            below.append((_key(row, "memory"), f"peak memory, {wl.label}: {_up(ratio):.2f}"))
    out += ["", "Throughput: median of the timed runs (slowest-fastest run in brackets), runs of ours and "
            "theirs interleaved. Memory: " + ("`max_memory_allocated`" if result.runtime.device.type == "cuda"
                                             else "peak RSS above the post-import baseline") +
            ", each in its own fresh process (`benchmarks/memory.py`)."]
    return out + _below(below)


def mfu_table(rows: list[MfuRow], title: str, peak_note: str) -> list[str]:
    out = [f"### {title}", "", peak_note, "",
           "| model | GFLOP / sample, ours | theirs | achieved GFLOP/s, ours | theirs | peak GFLOP/s (same runs) | "
           "MFU ours | MFU theirs | ours / theirs | target (ours) |",
           "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | --- |"]
    below = []
    for row in rows:
        f, r = row.flops_per_sample, row.samples_per_s

        def cell(impl: str, what: str) -> str:
            if impl not in f or impl not in r:
                return NOT_INSTALLED if impl == peer.IMPL else "-"
            return {"flops": _fmt(f[impl] / 1e9), "rate": _fmt(f[impl] * r[impl] / 1e9),
                    "mfu": f"{_down(row.mfu(impl)):.0%}"}[what]

        mfu = row.mfu(ours.IMPL)
        met = None if row.target is None or mfu is None else mfu >= row.target
        target = "-" if row.target is None else f">= {row.target:.0%}{_ok(met)}"
        ratio = "-" if row.ratio is None else f"{row.ratio:.2f}x"
        out.append(f"| {row.label} | {cell(ours.IMPL, 'flops')} | {cell(peer.IMPL, 'flops')} | "
                   f"{cell(ours.IMPL, 'rate')} | {cell(peer.IMPL, 'rate')} | {_fmt(row.peak / 1e9)} | "
                   f"**{cell(ours.IMPL, 'mfu')}** | "
                   f"{cell(peer.IMPL, 'mfu')} | {ratio} | {target} |")
        if met is False:
            kind = "prior" if row.label.startswith("prior") else "decoder"
            below.append((f"{kind}-mfu", f"MFU, {row.label}: {_down(mfu):.0%}"))
    return out + _below(below)


def paper_tables(rows: list[PaperRow]) -> list[str]:
    out = ["### 3. Paper scale, on paper", "",
           "Per-GPU memory in GiB (derived: `trainer/memory_plan.py`, as `unclip launch --plan`; bf16, the "
           "config's micro-batch, activations without activation checkpointing):", "",
           "| job | params | micro-batch | ZeRO | " + " | ".join(f"{g} GPUs" for g in GPU_COUNTS) + " |",
           "| --- | ---: | ---: | ---: | " + " | ".join("---:" for _ in GPU_COUNTS) + " |"]
    for row in rows:
        for z in ZERO_STAGES:
            cells = " | ".join(f"{row.memory[(z, g)]:.1f}" for g in GPU_COUNTS)
            out.append(f"| {row.job.name} | {_count(row.params)} | {row.micro_batch} | {z} | {cells} |")
    out += ["", "Compute for the paper's budget (global batch x iterations, Table 3 of the paper). FLOPs "
            "counted on the full-depth model (meta device); step time measured at two reduced depths and "
            "extrapolated per layer; GPU-hours derived as stated per row "
            f"(GPU peak assumed: {GPU_PEAK_BF16 / 1e12:.0f} TFLOP/s dense bf16, H100/H200 class).", "",
            "| job | depth | budget (samples) | GFLOP / sample (counted) | measured here: step at reduced depths "
            "(per layer) | full-depth step (extrapolated) | GPU-hours | how |",
            "| --- | ---: | ---: | ---: | --- | ---: | ---: | --- |"]
    for row in rows:
        m = row.measured
        if m:
            meas = (f"{m['device']}, micro-batch {m['micro_batch']}: depth {m['d1']} {m['t1']:.2f} s, depth "
                    f"{m['d2']} {m['t2']:.2f} s ({m['per_layer']:.2f} s/layer; median of {m['runs']})")
            full = f"{m['step']:.1f} s"
        else:
            meas, full = "not measured on this device", "-"
        hours = "-" if row.gpu_hours is None else f"{row.gpu_hours:,.0f}"
        budget = f"{row.job.batch} x {row.job.iterations:,} = {_count(row.samples)}"
        out.append(f"| {row.job.name} | {row.depth} | {budget} | {_fmt(row.flops_per_sample / 1e9)} | {meas} | "
                   f"{full} | {hours} | {row.how} |")
    return out


def _below(items: list[tuple[str, str]]) -> list[str]:
    if not items:
        return []
    out = ["", "Below target:"]
    for key, what in items:
        out.append(f"- {what}. {BELOW_TARGET.get(key, 'No note for this row yet.')}")
    return out


def render(info: RunInfo, sections: list[list[str]], headline: str, existing: Optional[str] = None) -> str:
    v = info.versions
    head = [
        INDEX_HEAD,
        *other_index_rows(existing),
        f"{MODELS_ROW}, MFU, paper-scale plan | `{info.command}` | [below](#models) | {headline} |",
        "",
        '<a id="models"></a>',
        "## Models: ours against dalle2-pytorch, against the machine, and at paper scale",
        "",
        f"Written by `{info.command}` on {info.date}, in {info.wall_seconds:.0f} s. Machine: {info.machine}, "
        f"torch threads {info.threads}; shared with other engineers' jobs (load average {info.load_before:.1f} "
        f"before, {info.load_after:.1f} after), so absolute rates move from run to run: the ratios, measured "
        "side by side in one process with runs interleaved, are what the targets are about. "
        + ("GPU: " + info.gpu + "." if info.gpu else
           "No GPU was lent to this task: the CUDA (bf16) tables were not measured here; the same command "
           "writes them when CUDA is present."),
        "",
        "Versions: " + ", ".join(f"{k} {val}" for k, val in v.items()) + ".",
        "",
    ]
    body = []
    for section in sections:
        body += section + [""]
    tail = ["### How the sizes were matched", "", MATCHING]
    return "\n".join(head + body + tail + kept_sections(existing))


# Sections other scripts write into this page between their own markers (e.g.
# benchmarks/trainer_e2e.py's "End to end: the trainers"): a rewrite of the models tables keeps them.
KEPT_MARKERS = (("<!-- trainer_e2e: begin -->", "<!-- trainer_e2e: end -->"),)


def kept_sections(existing: Optional[str]) -> list[str]:
    """The marked sections of the current RESULTS.md, as they are (each preceded by a blank line)."""
    out: list[str] = []
    for begin, end in KEPT_MARKERS:
        if existing and begin in existing and end in existing.split(begin, 1)[1]:
            out += ["", begin + existing.split(begin, 1)[1].split(end, 1)[0] + end]
    return out
