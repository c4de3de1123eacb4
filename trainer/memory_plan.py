"""Per-GPU memory of a job under ZeRO 0-3, before anyone books a cluster.

Model states follow the ZeRO paper's accounting (as DeepSpeed's own estimators do), per
parameter and for mixed precision (bf16/fp16): the 16-bit weights (2 bytes), 16-bit gradients
(2) and the optimizer's fp32 master weights, gradients, Adam m and v (16). ZeRO-1 partitions
the optimizer states over the GPUs, ZeRO-2 the gradients too, ZeRO-3 the weights as well (plus
one gathered layer at a time). In fp32 weights and gradients take 4 bytes and the optimizer 8.

Activations are estimated by running the stage's loss once on PyTorch's `meta` device (shapes
only, no memory, no time) and adding up the outputs of every leaf module: what autograd keeps
for the backward pass, without activation checkpointing. The EMA is sharded like ZeRO-3
(4 bytes per parameter over all GPUs).
"""

from __future__ import annotations

import dataclasses
from typing import Any, Optional

import torch
from torch import nn

from models import stages
from models.stages import StageContext, StageSpec
from trainer.config import TrainJob

GiB = 1024**3


@dataclasses.dataclass(frozen=True)
class ModelSize:
    params: int  # trained
    largest_layer: int
    activations_bytes: Optional[int]  # per micro-batch, per GPU; None if it could not be measured
    note: str = ""
    frozen: int = 0  # parameters held (weights, EMA) but not trained: no gradients, no optimizer state


@dataclasses.dataclass(frozen=True)
class StagePlan:
    zero_stage: int
    params: float
    grads: float
    optimizer: float
    ema: float
    activations: Optional[float]
    deepspeed_estimate: Optional[float]

    @property
    def total(self) -> float:
        return self.params + self.grads + self.optimizer + self.ema + (self.activations or 0.0)


def bytes_per_param(precision: str) -> tuple[int, int, int]:
    """(weights, gradients, optimizer states) bytes per parameter."""
    return (4, 4, 8) if precision == "fp32" else (2, 2, 16)


def zero_plan(size: ModelSize, zero_stage: int, gpus: int, precision: str) -> StagePlan:
    w, g, o = bytes_per_param(precision)
    p, held = size.params, size.params + size.frozen
    params = held * w / gpus + 2 * w * size.largest_layer if zero_stage == 3 else held * w
    grads = p * g / gpus if zero_stage >= 2 else p * g
    optimizer = p * o / gpus if zero_stage >= 1 else p * o
    ema = 4 * held / gpus
    return StagePlan(
        zero_stage, params, grads, optimizer, ema, size.activations_bytes, _deepspeed_estimate(size, zero_stage, gpus)
    )


def _deepspeed_estimate(size: ModelSize, zero_stage: int, gpus: int) -> Optional[float]:
    """DeepSpeed's own estimate of model-state memory per GPU (ZeRO-2/3, no offload)."""
    try:
        if zero_stage == 2:
            from deepspeed.runtime.zero.stage_1_and_2 import estimate_zero2_model_states_mem_needs

            return float(estimate_zero2_model_states_mem_needs(size.params, gpus, 1, cpu_offload=False)[1])
        if zero_stage == 3:
            from deepspeed.runtime.zero.stage3 import estimate_zero3_model_states_mem_needs

            return float(
                estimate_zero3_model_states_mem_needs(size.params, size.largest_layer, gpus, 1, cpu_offload=False)[1]
            )
    except ImportError:
        return None
    return None


def measure(job: TrainJob) -> ModelSize:
    """Parameter count, largest layer and activation estimate of the job's model (meta device)."""
    spec = stages.get(job.stage)
    with torch.device("meta"):
        model = spec.build(job)
    params = sum(p.numel() for p in model.parameters() if p.requires_grad)
    frozen = sum(p.numel() for p in model.parameters() if not p.requires_grad)
    largest = max((sum(p.numel() for p in m.parameters(recurse=False)) for m in model.modules()), default=0)
    activations, note = _activations(model, job, spec)
    return ModelSize(params, largest, activations, note, frozen)


def _activations(model: nn.Module, job: TrainJob, spec: StageSpec) -> tuple[Optional[int], str]:
    from trainer.engine import resolve_precision

    element = 4 if resolve_precision(job.deepspeed.precision, "cuda") == "fp32" else 2
    total = 0

    def count(module: nn.Module, inputs: Any, output: Any) -> None:
        nonlocal total
        outputs = output if isinstance(output, (tuple, list)) else (output,)
        total += sum(o.numel() for o in outputs if isinstance(o, torch.Tensor))

    leaves = [m for m in model.modules() if not list(m.children())]
    hooks = [m.register_forward_hook(count) for m in leaves]
    try:
        meta_training_loss(model, job, spec)
    except Exception as err:  # some ops have no meta kernel: report, do not guess
        return None, f"activations not estimated ({type(err).__name__}: {err})"
    finally:
        for h in hooks:
            h.remove()
    return total * element, ""


def meta_training_loss(model: nn.Module, job: TrainJob, spec: StageSpec) -> torch.Tensor:
    """The stage's training loss on one micro batch of the `meta` device (shapes, no data):
    the spec's `meta_loss` where the stage's own loss needs real numbers, else its loss on
    a batch of its fields."""
    model.train()
    if spec.meta_loss is not None:
        return spec.meta_loss(model, job, job.train.micro_batch_size)
    return spec.loss(model, _meta_batch(job, spec), None, StageContext())


def _meta_batch(job: TrainJob, spec: StageSpec) -> dict[str, Any]:
    b = job.train.micro_batch_size
    shapes = spec.field_shapes(job)
    batch: dict[str, Any] = {}
    for key in spec.fields(job):
        shape = (b, *shapes[key])
        if key == "text_mask":
            batch[key] = torch.ones(shape, dtype=torch.bool, device="meta")
        elif key == "tokens":
            batch[key] = torch.zeros(shape, dtype=torch.long, device="meta")
        else:
            batch[key] = torch.zeros(shape, device="meta")
    return batch


def format_plan(job: TrainJob, size: ModelSize, gpus: int, nodes: int, gpu_memory_gib: Optional[float] = None) -> str:
    from trainer.engine import resolve_precision

    precision = resolve_precision(job.deepspeed.precision, "cuda")
    lines = [
        f"{job.stage} job {job.name!r}: {size.params:,} parameters"
        + (f" trained + {size.frozen:,} frozen" if size.frozen else "")
        + f" (largest layer {size.largest_layer:,}), "
        f"{precision}, micro-batch {job.train.micro_batch_size} per GPU, {gpus} GPU(s) on {nodes} node(s)",
        "per-GPU memory in GiB:",
        f"{'ZeRO':>4} {'weights':>9} {'grads':>9} {'optimizer':>10} {'EMA':>7} {'activations':>12} {'total':>9} "
        f"{'DeepSpeed est.':>15}"
        + ("  fits?" if gpu_memory_gib else ""),
    ]
    for zero_stage in range(4):
        plan = zero_plan(size, zero_stage, gpus, precision)
        act = "n/a" if plan.activations is None else f"{plan.activations / GiB:.2f}"
        ds = "" if plan.deepspeed_estimate is None else f"{plan.deepspeed_estimate / GiB:.2f}"
        row = (
            f"{zero_stage:>4} {plan.params / GiB:>9.2f} {plan.grads / GiB:>9.2f} {plan.optimizer / GiB:>10.2f} "
            f"{plan.ema / GiB:>7.2f} {act:>12} {plan.total / GiB:>9.2f} {ds:>15}"
        )
        if gpu_memory_gib:
            row += "  yes" if plan.total / GiB < 0.9 * gpu_memory_gib else "  no"
        lines.append(row)
    lines.append(
        "DeepSpeed est.: its estimator's model states (weights, grads, optimizer). activations: estimated "
        "without activation checkpointing (deepspeed.activation_checkpointing: true cuts them)"
    )
    if size.note:
        lines.append(size.note)
    return "\n".join(lines)
