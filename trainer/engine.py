"""DeepSpeed initialisation: the DeepSpeed JSON derived from the job, the optimizer, the engine.

Users keep one YAML file; `deepspeed_config` turns its `train`, `optim` and `deepspeed`
sections into DeepSpeed's JSON (`deepspeed.extra` is merged last for anything not modelled).
The stage's model is wrapped in `StageModule`, whose forward is the stage's loss.
The optimizer is torch's AdamW passed as DeepSpeed's client optimizer: it works under ZeRO
0-3 on CPU and GPU without a JIT-built kernel. The learning rate is set by the loop each step
(`trainer/lr.py`), so no scheduler state needs checkpointing.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Iterable, Optional

import torch
from torch import nn

from models.config import deep_merge
from models.stages import Batch, Measure, StageContext, StageSpec
from trainer.config import TrainJob
from trainer.monitors import monitor_sections


class StageModule(nn.Module):
    """The stage's model with `forward(batch) -> loss`, as DeepSpeed wraps and calls it: one
    ordinary module call per micro-batch, so ZeRO-3's parameter-gathering hooks see it."""

    def __init__(self, spec: StageSpec, model: nn.Module, context: StageContext, device: str = "cpu") -> None:
        super().__init__()
        # DeepSpeed cannot broadcast 0-dim parameters (e.g. CLIP's logit_scale): train them as
        # shape [1] and record the model's own shape for export.
        self.original_shapes: dict[str, tuple[int, ...]] = {}
        for name, p in model.named_parameters():
            if p.ndim == 0:
                self.original_shapes[f"model.{name}"] = ()
                p.data = p.data.reshape(1)
        self.model = model
        self._spec = spec
        self._context = context
        # the stage's randomness (t, noise, CFG drops), on the device its draws are made on; checkpointed
        self.generator = torch.Generator(device=device)

    def forward(
        self, batch: Batch, generator: Optional[torch.Generator] = None, measure: Optional[Measure] = None
    ) -> Any:
        """The stage's loss of `batch` (draws from `generator`, default the training stream);
        with `measure`, its values instead (validation's sampled metrics). Either runs inside
        this module's forward, where ZeRO-3 has gathered the weights."""
        generator = self.generator if generator is None else generator
        if measure is not None:
            return measure(self.model, batch, generator)
        return self._spec.loss(self.model, batch, generator, self._context)


def resolve_precision(precision: str, device: str) -> str:
    if precision == "auto":
        return "bf16" if device.startswith("cuda") else "fp32"
    return precision


DEFAULT_BUCKET = int(5e8)  # DeepSpeed's default communication bucket, in elements


def deepspeed_config(
    job: TrainJob, world_size: int, device: str, *, n_params: Optional[int] = None, load_universal: bool = False,
    run_dir: Optional[Path] = None,
) -> dict[str, Any]:
    """The DeepSpeed JSON for `job` on `world_size` ranks of `device` ('cpu' or 'cuda:N');
    DeepSpeed's file monitors write under `run_dir` (see `monitor_sections`)."""
    precision = resolve_precision(job.deepspeed.precision, device)
    ds = job.deepspeed
    # DeepSpeed allocates its buckets up front (2 GB in fp32 by default): a small model needs
    # buckets no larger than itself.
    # (rounded up to a multiple of 1024: DeepSpeed wants them aligned to the world size).
    bucket = DEFAULT_BUCKET if n_params is None else max(min(DEFAULT_BUCKET, -(-n_params // 1024) * 1024), 1 << 16)
    zero: dict[str, Any] = {"stage": ds.zero_stage, "reduce_bucket_size": bucket, "allgather_bucket_size": bucket}
    if ds.zero_stage >= 2:
        zero.update(overlap_comm=False, contiguous_gradients=True, reduce_scatter=True)
    if ds.zero_stage == 3:
        # Gather each layer's parameters when its forward runs; keep nothing resident, so the
        # plan of `unclip launch --plan` holds.
        zero.update(
            stage3_param_persistence_threshold=0, stage3_max_live_parameters=int(1e9), stage3_prefetch_bucket_size=bucket
        )
    config: dict[str, Any] = {
        "train_micro_batch_size_per_gpu": job.train.micro_batch_size,
        "gradient_accumulation_steps": job.train.grad_accum,
        "train_batch_size": job.train.micro_batch_size * job.train.grad_accum * world_size,
        "gradient_clipping": job.optim.grad_clip,
        "zero_optimization": zero,
        "bf16": {"enabled": precision == "bf16"},
        "fp16": {"enabled": precision == "fp16", "loss_scale": 0, "initial_scale_power": 16},
        "steps_per_print": 10**9,  # the loop logs; DeepSpeed's own step prints are noise
        "wall_clock_breakdown": False,
        "checkpoint": {"load_universal": load_universal},
        # GuardedAdamW is torch's AdamW plus a finiteness check; DeepSpeed only knows the
        # exact class, so it must be told that the subclass is fine.
        "zero_allow_untested_optimizer": True,
    }
    return monitor_sections(deep_merge(config, ds.extra), job.name, run_dir)


class GuardedAdamW(torch.optim.AdamW):
    """AdamW that skips a step whose gradients are not finite.

    DeepSpeed's ZeRO 1-3 and bf16/fp16 optimizers already skip such steps (and count them in
    `engine.skipped_steps`); plain fp32 ZeRO-0 calls the client optimizer directly, so this
    guard gives every configuration the same behaviour. The check is one fused kernel over
    every gradient per device (GradScaler's non-finite check, with a scale of 1: an exact
    no-op on finite values) and one host read per step, however many parameters there are.
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.skipped = 0

    @torch.no_grad()
    def step(self, closure=None):  # type: ignore[override]
        grads = [p.grad for group in self.param_groups for p in group["params"] if p.grad is not None]
        if grads and not all_finite(grads):
            self.skipped += 1
            return None
        return super().step(closure)


def all_finite(tensors: list[torch.Tensor]) -> bool:
    """Whether every element of every tensor is finite: one fused check per (device, dtype)
    and a single host-device synchronisation."""
    by_kind: dict[tuple[torch.device, torch.dtype], list[torch.Tensor]] = {}
    for t in tensors:
        by_kind.setdefault((t.device, t.dtype), []).append(t)
    found: list[torch.Tensor] = []
    for (device, _), group in by_kind.items():
        flag = torch.zeros(1, device=device)
        torch._amp_foreach_non_finite_check_and_unscale_(group, flag, torch.ones(1, device=device))
        found.append(flag.to(tensors[0].device))
    return not bool(torch.stack(found).any())


def _no_decay(name: str, param: nn.Parameter) -> bool:
    # Biases, norms' gains, embeddings' position/null vectors: decaying them only hurts.
    return param.ndim < 2 or name.endswith(".bias")


def param_groups(model: nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    decay, keep = [], []
    for name, p in model.named_parameters():
        if p.requires_grad:
            (keep if _no_decay(name, p) else decay).append(p)
    groups = [{"params": decay, "weight_decay": weight_decay}, {"params": keep, "weight_decay": 0.0}]
    return [g for g in groups if g["params"]]


def build_engine(
    model: nn.Module, job: TrainJob, world_size: int, device: str, *, load_universal: bool = False,
    run_dir: Optional[Path] = None,
):
    """Wrap `model` in a DeepSpeed engine with AdamW; return (engine, the DeepSpeed JSON)."""
    import deepspeed

    from trainer import safe_load

    n_params = count_parameters(model.parameters())
    config = deepspeed_config(job, world_size, device, n_params=n_params, load_universal=load_universal, run_dir=run_dir)
    optim = job.optim
    optimizer = GuardedAdamW(
        param_groups(model, optim.weight_decay), lr=optim.lr, betas=tuple(optim.betas), eps=optim.eps,
        fused=True,  # one kernel for every parameter (CUDA and CPU), not a kernel per tensor and moment
    )
    engine, _, _, _ = deepspeed.initialize(model=model, optimizer=optimizer, config=config)
    # DeepSpeed's own engine unpickles checkpoint files (weights_only=False)
    safe_load.install(engine)
    return engine, config


def set_lr(engine: Any, lr: float) -> None:
    for group in engine.optimizer.param_groups:
        group["lr"] = lr


def skipped_steps(engine: Any, optimizer: Optional[GuardedAdamW]) -> int:
    """Steps skipped for non-finite gradients so far, by DeepSpeed or by the guard."""
    return int(getattr(engine, "skipped_steps", 0)) + (optimizer.skipped if optimizer is not None else 0)


def count_parameters(params: Iterable[nn.Parameter]) -> int:
    return sum(int(getattr(p, "ds_numel", 0) or p.numel()) for p in params)
