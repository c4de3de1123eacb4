"""Run the model benchmarks and rewrite benchmarks/RESULTS.md.

    python -m benchmarks --quick           # every table, under 10 minutes on 2 CPU cores
    python -m benchmarks --preset tiny     # the smallest sizes (what the test runs)

Tables: (1) ours against dalle2-pytorch at matched sizes (training steps, DDIM sampling, peak
memory); (2) MFU against the matmul peak measured in the same run, and on CUDA the bf16 table
with the prior at paper width; (3) the paper-scale jobs: memory plan, FLOPs, step time at
reduced depth, GPU-hours. The peer needs the benchmark environment (`benchmarks/setup.sh`);
without it the peer columns say "not installed".
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import sys
import time
from pathlib import Path

import torch

from benchmarks import mfu, paper_scale, peer, report, side_by_side
from benchmarks.runtime import Runtime
from benchmarks.specs import PRESETS

HERE = Path(__file__).resolve().parent


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "CPU"


def _versions() -> dict[str, str]:
    out = {"python": platform.python_version(), "torch": torch.__version__}
    for name in ("deepspeed", "open_clip"):
        try:
            out[name] = __import__(name).__version__
        except Exception:  # noqa: BLE001 - a version string is all we want
            out[name] = "not installed"
    out["dalle2-pytorch"] = peer.version()
    return out


def _headline(result: side_by_side.Result, mfu_rows: list[mfu.MfuRow]) -> str:
    speed = [f"{r.workload.kind} {r.workload.action} {report._down(r.speedup):.2f}x" for r in result.rows if r.speedup]
    memory = [f"{report._up(r.memory_ratio):.2f}" for r in result.rows if r.memory_ratio]
    mfus = [f"{row.label.split()[0]} {report._down(row.mfu('ours')):.0%}" for row in mfu_rows
            if row.mfu("ours") is not None]
    parts = []
    if speed:
        parts.append("ours/theirs " + ", ".join(speed) + " (target >= 1.5x)")
    if memory:
        parts.append("memory ours/theirs " + ", ".join(memory))
    parts.append("MFU (CPU fp32) " + ", ".join(mfus))
    return "; ".join(parts)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks", description=__doc__.split("\n")[0])
    p.add_argument("--quick", action="store_true", help="the committed tables' sizes (the default preset)")
    p.add_argument("--preset", choices=sorted(PRESETS), default="quick")
    p.add_argument("--threads", type=int, default=2, help="torch intra-op threads (CPU)")
    p.add_argument("--no-memory", action="store_true", help="skip the peak-memory rows (fresh processes)")
    p.add_argument("--no-paper", action="store_true", help="skip table 3")
    p.add_argument("--out", type=Path, default=HERE / "RESULTS.md")
    args = p.parse_args(argv)
    start, load_before = time.perf_counter(), os.getloadavg()[0]
    torch.set_num_threads(args.threads)
    preset = PRESETS[args.preset]
    small = preset.name == "tiny"
    sections, all_mfu = [], []
    devices = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
    first = None
    for device in devices:
        runtime = Runtime.for_device(device)
        print(f"== {runtime.describe()}: peak matmul rate", flush=True)
        peak_before = mfu.peak_flops(runtime, seconds=0.2 if small else 0.5)
        result = side_by_side.run(preset, runtime, memory=not args.no_memory)
        peak_after = mfu.peak_flops(runtime, seconds=0.2 if small else 0.5)
        peak = max(peak_before, peak_after)
        rows = mfu.rows_from(result, peak)
        if device == "cuda" and not small:
            rows.append(mfu.paper_width_prior(runtime, peak, preset.runs))
        note = (f"Peak: the {runtime.precision} square-matmul rate timed in bursts between the training runs of each "
                f"row (median), so that it saw the same load as they did. For scale, a separate matmul "
                f"measurement gave {peak_before / 1e9:.0f} GFLOP/s before the tables and {peak_after / 1e9:.0f} after "
                "(the other jobs' load moves in between).")
        sections += [report.side_by_side_table(result), report.mfu_table(rows, f"2. MFU, {runtime.describe()}", note)]
        all_mfu += rows
        first = first or (result, rows)
    if not torch.cuda.is_available():
        sections.append(["### 2b. MFU on a GPU (bf16)", "",
                         "Not measured here: no GPU was lent to this task. On a CUDA machine the same command adds "
                         "tables 1 and 2 in bf16 autocast, with the prior at paper width (2048 x 24, batch 64; "
                         "target MFU >= 45%)."])
    if not args.no_paper:
        runtime = Runtime.for_device(devices[-1])
        _, cpu_rows = first
        fallback = {"unet": next((r.mfu("ours") for r in cpu_rows if not r.label.startswith("prior")), None)}
        print("== paper scale", flush=True)
        paper_rows = paper_scale.run(runtime, runs=1 if small else preset.runs,
                                     cpu_micro_batch=2 if small else 4, fallback_mfu=fallback,
                                     jobs=paper_scale.DEMO_JOBS if small else paper_scale.JOBS)
        sections.append(report.paper_tables(paper_rows))
    info = report.RunInfo(
        command="python -m benchmarks " + " ".join(argv if argv is not None else sys.argv[1:]),
        date=datetime.date.today().isoformat(), wall_seconds=time.perf_counter() - start,
        machine=f"{_cpu_name()}, {os.cpu_count()} cores", load_before=load_before, load_after=os.getloadavg()[0],
        versions=_versions(), threads=args.threads,
        gpu=torch.cuda.get_device_name() if torch.cuda.is_available() else None,
    )
    existing = args.out.read_text() if args.out.exists() else None
    text = report.render(info, sections, _headline(*first), existing)
    args.out.write_text(text)
    print(f"wrote {args.out} ({info.wall_seconds:.0f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
