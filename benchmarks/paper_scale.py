"""Table 3: the paper-scale jobs on paper: per-GPU memory, FLOPs, step time and GPU-hours.

What is measured and what is derived:
- memory (derived): `trainer.memory_plan` (what `unclip launch --plan` prints) for ZeRO 1-3
  on 8, 64 and 512 GPUs: model states by the ZeRO paper's accounting from the parameter count,
  activations from one meta-device pass (no activation checkpointing).
- FLOPs per sample (counted): one training step of the full-depth model on the meta device
  under `torch.utils.flop_counter` (shapes only, exact for matmuls/convs/attention).
- step time (measured at reduced depth): the job's own model and loss at depths d1 < d2 on this
  device, forward + backward + AdamW, per layer = (t2 - t1) / (d2 - d1), full depth =
  t1 + (depth - d1) x per layer. On CPU only the prior is measured (a paper-width UNet layer
  is over a TFLOP per sample, and two reduced-depth UNets do not fit this machine's memory);
  on CUDA every stage is.
- GPU-hours (derived): samples in the paper's budget x seconds per sample. Measured on a
  GPU, the seconds come from the extrapolated step; otherwise from counted FLOPs at an assumed
  MFU on an H100/H200-class GPU (989 TFLOP/s dense bf16), the MFU this CPU reached on the
  same architecture (stated per row).
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Callable, Optional

import torch

from benchmarks.runtime import Runtime
from benchmarks.timing import interleaved
from launch.config_files import load_config
from trainer.flops import count_flops
from trainer.memory_plan import measure, meta_training_loss, zero_plan
from models import stages
from models.stages import StageContext
from trainer.synthetic import SyntheticLoader

ROOT = Path(__file__).resolve().parent.parent
GPU_PEAK_BF16 = 989e12  # H100/H200 SXM dense bf16, FLOP/s
GPU_COUNTS = (8, 64, 512)
ZERO_STAGES = (1, 2, 3)


@dataclasses.dataclass(frozen=True)
class PaperJob:
    name: str  # configs/<folder>/<name>.yaml
    batch: int  # the paper's global batch (Table 3)
    iterations: int  # the paper's training iterations (Table 3)
    depth_key: str  # the config key that sets the depth, and the reduced depths to measure
    depths: tuple[int, int]
    measure_on_cpu: bool
    folder: str = "paper"


JOBS = (
    PaperJob("prior", 4096, 600_000, "model.depth", (1, 2), True),
    PaperJob("decoder", 2048, 800_000, "model.unet.num_res_blocks", (1, 2), False),
    PaperJob("upsampler_256", 1024, 1_000_000, "model.unet.num_res_blocks", (1, 2), False),
    PaperJob("upsampler_1024", 512, 1_000_000, "model.unet.num_res_blocks", (1, 2), False),
)
# The same code path on the demo configs, in seconds: what the test of `python -m benchmarks`
# runs (the budgets are the demo's own steps x micro-batch, one GPU).
DEMO_JOBS = (
    PaperJob("prior", 64, 1500, "model.depth", (1, 2), True, "demo"),
    PaperJob("decoder", 32, 2500, "model.unet.num_res_blocks", (1, 2), False, "demo"),
    PaperJob("upsampler", 16, 1000, "model.unet.num_res_blocks", (1, 2), False, "demo"),
)


@dataclasses.dataclass
class PaperRow:
    job: PaperJob
    params: int
    depth: int
    micro_batch: int
    memory: dict[tuple[int, int], float]  # (zero stage, gpus) -> GiB per GPU
    flops_per_sample: float
    measured: Optional[dict] = None  # device, micro batch, t1, t2, per-layer, full step seconds, mfu
    seconds_per_sample_gpu: Optional[float] = None
    how: str = ""

    @property
    def samples(self) -> int:
        return self.job.batch * self.job.iterations

    @property
    def gpu_hours(self) -> Optional[float]:
        return None if self.seconds_per_sample_gpu is None else self.samples * self.seconds_per_sample_gpu / 3600


def _load(job: PaperJob, overrides: tuple[str, ...] = ()):
    return load_config(ROOT / "configs" / job.folder / f"{job.name}.yaml", list(overrides))


def _depth(cfg, key: str) -> int:
    value = cfg
    for part in key.split("."):
        value = getattr(value, part)
    return int(value)


def _memory(cfg) -> tuple[int, dict[tuple[int, int], float]]:
    size = measure(cfg)
    plans = {(z, g): zero_plan(size, z, g, "bf16").total / 1024**3 for z in ZERO_STAGES for g in GPU_COUNTS}
    return size.params, plans


def _meta_flops(cfg) -> float:
    spec = stages.get(cfg.stage)
    with torch.device("meta"):
        model = spec.build(cfg)
    flops = count_flops(lambda: meta_training_loss(model, cfg, spec).backward())
    return flops / cfg.train.micro_batch_size


def _step_fn(cfg, runtime: Runtime, micro_batch: int) -> Callable[[], None]:
    spec = stages.get(cfg.stage)
    torch.manual_seed(0)
    model = spec.build(cfg).to(runtime.device).train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    shapes = {k: v for k, v in spec.field_shapes(cfg).items() if k in spec.fields(cfg)}
    batch = {k: v.to(runtime.device) if isinstance(v, torch.Tensor) else v
             for k, v in next(iter(SyntheticLoader(shapes, batch_size=micro_batch, rank=0))).items()}
    generator = torch.Generator().manual_seed(0)

    def step() -> None:
        with runtime.autocast():
            loss = spec.loss(model, batch, generator, StageContext())
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        runtime.sync()

    return step


def _measure(job: PaperJob, cfg, runtime: Runtime, micro_batch: int, runs: int) -> dict:
    d1, d2 = job.depths
    full = _depth(cfg, job.depth_key)
    steps: dict = {d: _step_fn(_load(job, (f"{job.depth_key}={d}",)), runtime, micro_batch) for d in (d1, d2)}
    steps["peak"], burst_flops = runtime.matmul_burst()  # this device's peak under the same load
    stats = interleaved(steps, runs, warmup=1)
    t1, t2 = stats[d1].median, stats[d2].median
    peak = stats["peak"].rate(burst_flops).median
    per_layer = (t2 - t1) / (d2 - d1)
    step = t1 + (full - d1) * per_layer
    # MFU of the measured reduced-depth step, from its own counted FLOPs
    flops_d2 = _meta_flops(_load(job, (f"{job.depth_key}={d2}", f"train.micro_batch_size={micro_batch}")))
    mfu = flops_d2 * micro_batch / t2 / peak
    return {"device": runtime.describe(), "micro_batch": micro_batch, "d1": d1, "d2": d2, "t1": t1, "t2": t2,
            "per_layer": per_layer, "step": step, "mfu": mfu, "runs": runs}


def run(runtime: Runtime, *, runs: int, cpu_micro_batch: int, fallback_mfu: dict[str, Optional[float]],
        jobs: tuple[PaperJob, ...] = JOBS, log: Callable[[str], None] = print) -> list[PaperRow]:
    """`fallback_mfu` {"unet": MFU}: the MFU to assume for stages not measured on this device."""
    rows = []
    on_gpu = runtime.device.type == "cuda"
    for job in jobs:
        cfg = _load(job)
        params, memory = _memory(cfg)
        row = PaperRow(job, params, _depth(cfg, job.depth_key), cfg.train.micro_batch_size, memory, _meta_flops(cfg))
        if on_gpu or job.measure_on_cpu:
            micro = cfg.train.micro_batch_size if on_gpu else cpu_micro_batch
            row.measured = _measure(job, cfg, runtime, micro, runs)
            if on_gpu:
                row.seconds_per_sample_gpu = row.measured["step"] / micro
                row.how = "measured on this GPU at reduced depth, extrapolated per layer"
            else:
                mfu = row.measured["mfu"]
                row.seconds_per_sample_gpu = row.flops_per_sample / (GPU_PEAK_BF16 * mfu)
                row.how = f"derived: counted FLOPs at {mfu:.0%} MFU (this CPU's, measured at reduced depth)"
        else:
            kind = "prior" if job.name.startswith("prior") else "unet"
            mfu = fallback_mfu.get(kind)
            if mfu:
                row.seconds_per_sample_gpu = row.flops_per_sample / (GPU_PEAK_BF16 * mfu)
                row.how = f"derived: counted FLOPs at {mfu:.0%} MFU (our 64 px decoder's on this CPU, table 2)"
            else:
                row.how = "not measured"
        log(f"{job.name}: {params / 1e9:.2f}B parameters, {row.flops_per_sample / 1e12:.2f} TFLOP/sample; {row.how}")
        rows.append(row)
    return rows
