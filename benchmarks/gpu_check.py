"""The measuring half of `benchmarks/gpu_check.sh`: on one GPU, the trainer's own bf16 step of
the paper-width prior and a paper-width decoder slice, MFU against a bf16 matmul peak timed in
the same run, peak memory against `unclip launch --plan`, sampling rates, the CPU-tuned UNet
kernels and torch.compile against PyTorch's plain path; writes benchmarks/RESULTS_gpu.md.

    python -m benchmarks.gpu_check                  # on a CUDA machine (gpu_check.sh calls it)
    python -m benchmarks.gpu_check --dry --out X    # CPU, tiny sizes: the same code, in seconds

A training row is the trainer's own loop (`trainer.loop.Trainer`: DeepSpeed engine, fused
AdamW, EMA of the fp32 masters, metrics) on synthetic batches, set up from the paper's
config files with only the sizes below overridden; every section has a deadline, so the
script ends in time and says what it skipped.
"""

from __future__ import annotations

import argparse
import datetime
import gc
import os
import socket
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable, Optional

import torch

ROOT = Path(__file__).resolve().parent.parent
PAPER = ROOT / "configs" / "paper"
NO_DATA = ["data=null", "checkpoint.every_steps=null", "train.sample_every=0", "train.log_every=1000000",
           "metrics.port=null"]
# the paper decoder at its width (512 channels, x1,2,3,4, attention at 32/16/8 with 64-channel
# heads, 2048-wide context) with one res block per level instead of three, without
# recomputation so that the plan's activation estimate applies
DECODER_SLICE = ["model.unet.num_res_blocks=1", "model.unet.gradient_checkpointing=false",
                 "deepspeed.activation_checkpointing=false", "train.micro_batch_size=16"]
DRY = {  # CPU, seconds: the same code at toy sizes
    "prior": ["model.dim=64", "model.depth=2", "model.heads=2", "model.embed_dim=32", "model.text_width=32",
              "model.max_text_len=8", "train.micro_batch_size=4", "deepspeed.precision=fp32"],
    "decoder": ["model.unet.base_channels=32", "model.unet.head_channels=32", "model.image_embed_dim=32",
                "model.text_width=32", "model.max_text_len=8", "model.context_dim=64", "model.image_size=16",
                "model.unet.attention_resolutions=[8,4,2]", "model.unet.norm_groups=8",
                "train.micro_batch_size=2", "deepspeed.precision=fp32"],
}


class Deadline:
    def __init__(self, seconds: float) -> None:
        self.end = time.monotonic() + seconds

    def left(self) -> float:
        return self.end - time.monotonic()


def load_job(stage: str, dry: bool, extra: list[str] = ()) -> Any:
    from launch.config_files import load_config

    overrides = NO_DATA + (DECODER_SLICE if stage == "decoder" else []) + (DRY[stage] if dry else []) + list(extra)
    return load_config(PAPER / f"{stage}.yaml", overrides)


def sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def peak_bytes() -> int:
    if torch.cuda.is_available():
        return int(torch.cuda.max_memory_allocated())
    from benchmarks.memory import _status_kib

    return (_status_kib("VmHWM") or 0) * 1024


def reset_peak() -> None:
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    else:
        from benchmarks.memory import _reset_hwm

        _reset_hwm()


def join_group() -> str:
    from trainer import distributed as dist

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        os.environ.setdefault("MASTER_PORT", str(s.getsockname()[1]))
    return dist.init_process_group(dist.WorldInfo(0, 0, 1), timeout_s=600)


def trainer_row(stage: str, job: Any, device: str, steps: int, warmup: int, out: dict) -> Any:
    """The trainer's step of `job`, timed; the Trainer is kept for the sampling rows."""
    from trainer.loop import Trainer
    from trainer import distributed as dist
    from trainer.memory_plan import measure, zero_plan

    reset_peak()
    trainer = Trainer(job, Path(tempfile.mkdtemp(prefix=f"gpu_check_{stage}_")), dist.WorldInfo(0, 0, 1), device)
    trainer.setup(resume=False)
    times = []
    for i in range(warmup + steps):
        started = time.perf_counter()
        loss, flags = trainer._train_step()
        trainer.step += 1
        trainer._after_step(loss, flags)
        sync()
        if i >= warmup:
            times.append(time.perf_counter() - started)
    step = statistics.median(times)
    size = measure(job)
    plan = zero_plan(size, job.deepspeed.zero_stage, 1, "bf16" if device.startswith("cuda") else "fp32")
    out.update(params=trainer.n_params, micro_batch=job.train.micro_batch_size, step_s=step,
               samples_per_s=job.train.micro_batch_size / step, flops_per_sample=trainer.flops_per_sample,
               peak_bytes=peak_bytes(), plan_bytes=plan.total, loss=loss, steps=steps)
    return trainer


def time_calls(fns: dict[str, Callable[[], object]], runs: int) -> dict[str, float]:
    """Median seconds per call of each, runs interleaved, one untimed call each first."""
    for fn in fns.values():
        fn()
        sync()
    seconds: dict[str, list[float]] = {k: [] for k in fns}
    for _ in range(runs):
        for name, fn in fns.items():
            started = time.perf_counter()
            fn()
            sync()
            seconds[name].append(time.perf_counter() - started)
    return {k: statistics.median(v) for k, v in seconds.items()}


def sampling_row(trainer: Any, device: str, batch: int, steps: int, out: dict) -> None:
    """Images (or embeddings) per second of the EMA model, DDIM, under the job's autocast."""
    from trainer.samples import _autocast, ema_model

    job, spec = trainer.job, trainer.spec
    model = ema_model(spec, job, trainer.ema, trainer._buffers(), device)
    m = job.model
    g = torch.Generator().manual_seed(0)
    embed = torch.nn.functional.normalize(torch.randn(batch, m.embed_dim if job.stage == "prior" else m.image_embed_dim,
                                                      generator=g), dim=-1).to(device)
    text = torch.randn(batch, m.max_text_len, m.text_width, generator=g).to(device)
    mask = torch.ones(batch, m.max_text_len, dtype=torch.bool, device=device)
    precision = "bf16" if device.startswith("cuda") else "fp32"

    def run() -> None:
        with torch.no_grad(), _autocast(device, precision):
            if job.stage == "prior":
                model.sample(embed, text, mask, steps=steps, sampler="ddim", eta=0.0)
            else:
                model.sample(embed, text, mask, steps=steps, sampler="ddim", eta=0.0, guidance_scale=3.0)

    seconds = time_calls({"sample": run}, runs=2)["sample"]
    guidance = "" if job.stage == "prior" else ", guidance 3"
    out.update(sample_batch=batch, sample_steps=steps, per_s=batch / seconds,
               label=f"DDIM {steps} steps{guidance}, batch {batch}")
    del model


def kernels_row(trainer: Any, runs: int, out: dict) -> None:
    """The decoder's train step with the CPU-tuned UNet kernels on this device vs PyTorch's
    plain ones (models/unet.py TUNED_DEVICES)."""
    from models import unet

    device_type = torch.device(trainer.device).type
    plain, tuned = unet.TUNED_DEVICES - {device_type}, unet.TUNED_DEVICES | {device_type}

    def step_with(devices: frozenset) -> Callable[[], None]:
        def run() -> None:
            unet.TUNED_DEVICES = devices
            loss, flags = trainer._train_step()
            trainer.step += 1
            trainer._after_step(loss, flags)

        return run

    try:
        seconds = time_calls({"plain": step_with(plain), "tuned": step_with(tuned)}, runs)
    finally:
        unet.TUNED_DEVICES = frozenset({"cpu"})
    out.update(plain_s=seconds["plain"], tuned_s=seconds["tuned"])


def compile_row(device: str, dry: bool, runs: int, out: dict) -> None:
    """The paper-width prior's bare step (benchmarks/ours.py), eager vs torch.compile."""
    from benchmarks import ours
    from benchmarks.mfu import PAPER_WIDTH_PRIOR
    from benchmarks.runtime import Runtime
    from benchmarks.specs import PriorSpec

    spec = PriorSpec(dim=64, depth=2, heads=2, dim_head=32, text_len=8, batch=4) if dry else PAPER_WIDTH_PRIOR
    runtime = Runtime.for_device(device.split(":")[0])
    eager = ours.build_prior(spec, runtime)
    compiled = ours.build_prior(spec, runtime)
    # dry: dynamo's tracing alone (the wiring, in seconds); a GPU: inductor, torch's default
    compiled.model.compile(backend="eager" if dry else "inductor")
    started = time.perf_counter()
    compiled.train_step()
    out["compile_s"] = time.perf_counter() - started
    seconds = time_calls({"eager": eager.train_step, "compiled": compiled.train_step}, runs)
    out.update(eager_s=seconds["eager"], compiled_s=seconds["compiled"], batch=spec.batch,
               label=f"prior {spec.dim} x {spec.depth}, batch {spec.batch}")


def main(argv: Optional[list[str]] = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.gpu_check", description=__doc__.split("\n")[0])
    p.add_argument("--dry", action="store_true", help="CPU, tiny sizes (the CI check of this script)")
    p.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "RESULTS_gpu.md")
    p.add_argument("--tests", default="not run", help="the cuda tests' pytest summary line (gpu_check.sh)")
    p.add_argument("--deadline-s", type=float, default=300.0, help="stop measuring after this long")
    args = p.parse_args(argv)
    if not args.dry and not torch.cuda.is_available():
        print("gpu_check: no CUDA device (use --dry for the CPU check of this script)", file=sys.stderr)
        return 2
    from benchmarks.mfu import peak_flops
    from benchmarks.runtime import Runtime
    from benchmarks.gpu_report import render

    started, deadline = time.perf_counter(), Deadline(args.deadline_s)
    device = join_group()
    runtime = Runtime.for_device(device.split(":")[0])
    steps, warmup, runs = (2, 1, 1) if args.dry else (10, 3, 3)
    results: dict[str, Any] = {"peak": {}, "prior": {}, "decoder": {}, "prior_sample": {}, "decoder_sample": {},
                               "kernels": {}, "compile": {}, "skipped": []}
    results["peak"]["before"] = peak_flops(runtime, seconds=0.1 if args.dry else 1.0)

    def section(name: str, need_s: float, fn: Callable[[], None]) -> None:
        if deadline.left() < need_s:
            results["skipped"].append(f"{name} (out of time: {deadline.left():.0f} s left)")
            return
        print(f"== {name}", flush=True)
        begun = time.perf_counter()
        try:
            fn()
            print(f"   {time.perf_counter() - begun:.1f} s", flush=True)
        except Exception as err:  # noqa: BLE001 - one failed row is reported, the rest still run
            results["skipped"].append(f"{name} (failed: {type(err).__name__}: {str(err).splitlines()[0][:200]})")
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()

    trainers: dict[str, Any] = {}

    def train(stage: str) -> None:
        trainers[stage] = trainer_row(stage, load_job(stage, args.dry), device, steps, warmup, results[stage])

    def sample(stage: str) -> None:
        batch, n = (2, 2) if args.dry else (8, 64 if stage == "prior" else 50)
        sampling_row(trainers[stage], device, batch, n, results[f"{stage}_sample"])

    section("paper-width prior: the trainer's bf16 step", 60, lambda: train("prior"))
    section("prior sampling", 30, lambda: sample("prior") if "prior" in trainers else None)
    trainers.pop("prior", None)
    gc.collect()
    section("paper-width decoder slice: the trainer's bf16 step", 60, lambda: train("decoder"))
    section("decoder sampling", 30, lambda: sample("decoder") if "decoder" in trainers else None)
    section("UNet kernels: plain vs CPU-tuned", 30,
            lambda: kernels_row(trainers["decoder"], runs, results["kernels"]) if "decoder" in trainers else None)
    trainers.clear()
    gc.collect()
    results["peak"]["after"] = peak_flops(runtime, seconds=0.1 if args.dry else 1.0)
    if args.dry:  # the compile wiring has its own CPU test; here it would only add seconds
        results["skipped"].append("torch.compile of the prior (GPU runs only)")
    else:
        section("torch.compile of the prior", 120, lambda: compile_row(device, args.dry, runs, results["compile"]))
    info = {
        "date": datetime.date.today().isoformat(), "wall_s": time.perf_counter() - started, "dry": args.dry,
        "device": torch.cuda.get_device_name() if torch.cuda.is_available() else "CPU (dry run)",
        "versions": _versions(), "tests": args.tests,
        "command": "bash benchmarks/gpu_check.sh" + (" --dry" if args.dry else ""),
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(render(info, results))
    print(f"wrote {args.out} ({info['wall_s']:.0f} s)")
    return 0


def _versions() -> dict[str, str]:
    out = {"torch": torch.__version__, "cuda": str(torch.version.cuda)}
    try:
        import deepspeed

        out["deepspeed"] = deepspeed.__version__
    except ImportError:
        out["deepspeed"] = "not installed"
    return out


if __name__ == "__main__":
    sys.exit(main())
