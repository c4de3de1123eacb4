"""benchmarks/RESULTS_gpu.md from the measurements of `benchmarks/gpu_check.py`."""

from __future__ import annotations

from typing import Any

GiB = 1024**3
TARGET_MFU = {"prior": 0.45}  # the target for the paper-width prior on a GPU

HEAD = "# GPU check: the trainer on one GPU"
HOW = (
    "`bash benchmarks/gpu_check.sh` on one GPU, under 10 minutes: the `cuda` tests "
    "(`pytest -m cuda tests/test_cuda.py`), then `python -m benchmarks.gpu_check`: the trainer's own bf16 step "
    "(`trainer.loop.Trainer`: DeepSpeed ZeRO-2, fused AdamW, the EMA of the fp32 masters, metrics; synthetic "
    "batches) of the paper-width prior (`configs/paper/prior.yaml`: 2048 x 24) and of a paper-width decoder "
    "slice (`configs/paper/decoder.yaml` with one res block per level, no recomputation, micro-batch 16); MFU "
    "against a bf16 matmul peak timed in the same run; peak memory (`max_memory_allocated`) against `unclip "
    "launch --plan` for one GPU; DDIM sampling rates of the EMA models; the UNet's CPU-tuned kernels and "
    "torch.compile against PyTorch's plain path."
)


def not_measured() -> str:
    """The committed page until a GPU run replaces it."""
    return "\n".join([
        HEAD, "", HOW, "",
        "**Not measured**: no GPU has been lent to this project's tasks yet. Every table below is written by "
        "the script when it runs on one; `bash benchmarks/gpu_check.sh --dry` runs the same code on a CPU at "
        "toy sizes (CI does, `tests/test_gpu_check.py`).", "",
        "| section | result |", "| --- | --- |",
        "| cuda tests | not measured |",
        "| bf16 matmul peak | not measured |",
        "| paper-width prior, trainer step: samples/s, MFU, peak memory vs plan | not measured |",
        "| paper-width decoder slice, trainer step: samples/s, MFU, peak memory vs plan | not measured |",
        "| sampling: prior embeddings/s, decoder images/s | not measured |",
        "| UNet kernels on CUDA: plain vs CPU-tuned | not measured (CUDA runs the plain ones until this says otherwise) |",
        "| torch.compile of the prior | not measured |",
        "",
    ])


def _flops(x: float) -> str:
    return f"{x / 1e12:.1f} TFLOP/s" if x >= 1e12 else f"{x / 1e9:.1f} GFLOP/s"


def _num(x: float) -> str:
    return f"{x:.3g}" if x < 1000 else f"{x:,.0f}"


def render(info: dict[str, Any], r: dict[str, Any]) -> str:
    peak = max(r["peak"].values()) if r["peak"] else 0.0
    mode = " (dry run: CPU, toy sizes, fp32; the numbers check the script, not a GPU)" if info["dry"] else ""
    lines = [
        HEAD, "", HOW, "",
        f"Written by `{info['command']}` on {info['date']} in {info['wall_s']:.0f} s on {info['device']}{mode}. "
        "Versions: " + ", ".join(f"{k} {v}" for k, v in info["versions"].items()) + ".", "",
        f"**cuda tests**: {info['tests']}", "",
        f"**matmul peak** (square matmuls in the training dtype, timed before and after the training rows): "
        + ", ".join(f"{k} {_flops(v)}" for k, v in r["peak"].items()) + f"; MFU below uses {_flops(peak)}.",
        "",
        "### The trainer's step", "",
        "| job | params | micro-batch | step | samples/s | GFLOP / sample | MFU | target | peak memory | plan (1 GPU) | peak / plan |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: | --- | ---: | ---: | ---: |",
    ]
    for stage, label in (("prior", "paper-width prior (2048 x 24)"), ("decoder", "paper-width decoder slice")):
        row = r[stage]
        if not row:
            lines.append(f"| {label} | - | - | - | - | - | - | - | - | - | - |")
            continue
        flops = row["flops_per_sample"] or 0.0
        mfu = flops * row["samples_per_s"] / peak if peak else 0.0
        target = TARGET_MFU.get(stage)
        met = "-" if target is None else f">= {target:.0%} ({'met' if mfu >= target else '**below**'})"
        lines.append(
            f"| {label} | {row['params'] / 1e6:,.0f}M | {row['micro_batch']} | {row['step_s'] * 1e3:.0f} ms | "
            f"{_num(row['samples_per_s'])} | {_num(flops / 1e9)} | **{mfu:.0%}** | {met} | "
            f"{row['peak_bytes'] / GiB:.2f} GiB | {row['plan_bytes'] / GiB:.2f} GiB | {row['peak_bytes'] / row['plan_bytes']:.2f} |"
        )
    lines += ["", "Step: median of the timed steps after warm-up (each includes the loss's host read and the "
              "per-step all-reduce, as in training). Peak memory from the start of set-up.", "",
              "### Sampling (EMA weights, bf16 autocast)", "", "| model | how | rate |", "| --- | --- | ---: |"]
    for key, label, unit in (("prior_sample", "paper-width prior", "embeddings/s"),
                             ("decoder_sample", "paper-width decoder slice", "images/s")):
        row = r[key]
        lines.append(f"| {label} | {row.get('label', '-')} | {_num(row['per_s']) + ' ' + unit if row else '-'} |")
    k = r["kernels"]
    lines += ["", "### UNet kernels on this device (decoder slice, trainer step)", ""]
    if k:
        faster = "CPU-tuned" if k["tuned_s"] < k["plain_s"] else "plain"
        lines += ["| PyTorch's plain NCHW kernels | CPU-tuned (channels-last, folded upsampling conv, matmul 1x1) | faster |",
                  "| ---: | ---: | --- |",
                  f"| {k['plain_s'] * 1e3:.0f} ms | {k['tuned_s'] * 1e3:.0f} ms | {faster} |", "",
                  "models/unet.py runs the CPU-tuned kernels on the device types in `TUNED_DEVICES` (CPU); add "
                  "this device's type there only if the tuned column is the faster one."]
    else:
        lines.append("not measured in this run")
    c = r["compile"]
    lines += ["", "### torch.compile (`train.compile`)", ""]
    if c:
        lines += [f"| model | eager step | compiled step | speed-up | compile time |", "| --- | ---: | ---: | ---: | ---: |",
                  f"| {c['label']} | {c['eager_s'] * 1e3:.0f} ms | {c['compiled_s'] * 1e3:.0f} ms | "
                  f"{c['eager_s'] / c['compiled_s']:.2f}x | {c['compile_s']:.0f} s |"]
    else:
        lines.append("not measured in this run")
    if r["skipped"]:
        lines += ["", "Skipped or failed:"] + [f"- {s}" for s in r["skipped"]]
    return "\n".join(lines) + "\n"
