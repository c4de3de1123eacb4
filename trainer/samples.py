"""Sample grids while training: every `train.sample_every` steps, the ranks draw a few images
with the EMA weights (what sampling uses) and rank 0 writes `RUN_DIR/samples/step_XXXXXXX.png`.

Every rank samples its share of the grid on its own device: the EMA is assembled into a
copy of the model on each rank (bucketed all-reduces of the EMA's pieces, like ZeRO's own
gathers, never a gather of everything to one rank), each rank draws the columns of the
conditions it kept from its own first batch, and only the images travel to rank 0. So the
grid shows exactly what `unclip export` would ship at this step, costs every rank the same
and keeps them in step. What the rows are is the stage's (`StageSpec.sample_grid`); stages
whose output is not an image (the priors, CLIP) have none.
"""

from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Any, Iterator, Optional

import torch
from torch import Tensor, nn

from models.images import grid_of_rows
from models.stages import StageSpec
from trainer import distributed as dist
from trainer.config import TrainJob
from trainer.ema import ShardedEMA

MAX_IMAGES = 8


def share(rank: int, world_size: int, micro_batch: int) -> int:
    """How many of the grid's columns rank `rank` draws: the grid has min(MAX_IMAGES,
    micro-batch) columns, dealt out over the ranks in turn."""
    return len(range(rank, min(MAX_IMAGES, micro_batch), world_size))


def keep_for_sampling(batch: dict[str, Any], count: int) -> dict[str, Any]:
    """The first `count` items of a batch, on CPU: the conditions every grid of the run reuses."""
    return {k: v[:count].detach().cpu() for k, v in batch.items() if isinstance(v, Tensor)}


def grid_path(run_dir: Path, step: int) -> Path:
    """Where the sample grid of `step` goes: RUN_DIR/samples/step_0000123.png (like its checkpoint)."""
    return Path(run_dir) / "samples" / f"step_{step:07d}.png"


def ema_model(spec: StageSpec, job: TrainJob, ema: ShardedEMA, buffers: dict[str, Tensor], device: str) -> nn.Module:
    """Collective: a fresh fp32 copy of the stage's model on `device` holding the EMA weights."""
    with torch.device(device):
        model = spec.build(job)
    params = dict(model.named_parameters())
    with torch.no_grad():
        for name, full in ema.full_tensors():
            param = params[name.removeprefix("model.")]
            param.copy_(full.view(param.shape))
        for name, value in buffers.items():
            model.get_buffer(name).copy_(value)
    return model.eval()


@contextlib.contextmanager
def _autocast(device: str, precision: str) -> Iterator[None]:
    if device.startswith("cuda") and precision == "bf16":
        with torch.autocast("cuda", dtype=torch.bfloat16):
            yield
    else:
        yield


def write_grid(
    *, spec: StageSpec, job: TrainJob, ema: ShardedEMA, buffers: dict[str, Tensor], batch: Optional[dict[str, Any]],
    out: Path, seed: int, rank: int, device: str, precision: str,
) -> Optional[Path]:
    """Collective: every rank samples its columns on `device`; rank 0 writes `out` (its path
    there, None elsewhere)."""
    model = ema_model(spec, job, ema, buffers, device)
    rows = None
    count = next((v.shape[0] for v in (batch or {}).values()), 0)
    if count:
        generator = torch.Generator(device=device).manual_seed(seed + rank)
        on_device = {k: v.to(device) for k, v in batch.items()}
        with torch.no_grad(), _autocast(device, precision):
            rows = [r.float().cpu() for r in spec.sample_grid(model, on_device, generator)]
    del model
    parts = [p for p in (dist.gather_object(rows) or []) if p is not None]
    if rank != 0 or not parts:
        return None
    columns = [torch.cat([part[i] for part in parts]) for i in range(len(parts[0]))]
    out.parent.mkdir(parents=True, exist_ok=True)
    grid_of_rows(columns).save(out)
    return out
