"""Sample grids while training: every `train.sample_every` steps, rank 0 draws a few images
with the EMA weights (what sampling uses) and writes `RUN_DIR/samples/step_XXXXXXX.png`.

The EMA shards are gathered to rank 0 and loaded into a fresh copy of the model, so the grid
shows exactly what `unclip export` would ship at this step. What the rows are is the stage's
(`StageSpec.sample_grid`); stages whose output is not an image (the priors, CLIP) have none.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Optional

import torch
from torch import Tensor

from models.images import grid_of_rows
from models.stages import StageSpec
from models.weights import merged_state
from trainer import distributed as dist
from trainer.config import TrainJob

MAX_IMAGES = 8


def keep_for_sampling(batch: dict[str, Any]) -> dict[str, Any]:
    """The first few items of a batch, on CPU: the conditions every grid of the run reuses."""
    return {k: v[:MAX_IMAGES].detach().cpu() for k, v in batch.items() if isinstance(v, Tensor)}


def grid_path(run_dir: Path, step: int) -> Path:
    """Where the sample grid of `step` goes: RUN_DIR/samples/step_0000123.png (like its checkpoint)."""
    return Path(run_dir) / "samples" / f"step_{step:07d}.png"


def write_grid(
    *, spec: StageSpec, job: TrainJob, ema_state: dict[str, Tensor], shapes: dict[str, tuple[int, ...]],
    buffers: dict[str, Tensor], batch: Optional[dict[str, Any]], out: Path, seed: int,
) -> Optional[Path]:
    """Collective: gather the EMA to rank 0, which samples and writes `out`. Path on rank 0."""
    shards = dist.gather_object({k.removeprefix("model."): v for k, v in ema_state.items()})
    if shards is None or batch is None:
        return None
    model = spec.build(job)
    weights = merged_state(shards, {k.removeprefix("model."): v for k, v in shapes.items()})
    own = model.state_dict()
    weights = {k: v.reshape(own[k].shape) for k, v in weights.items()}
    model.load_state_dict({**buffers, **weights})
    model.eval()
    rows = spec.sample_grid(model, batch, torch.Generator().manual_seed(seed))
    out.parent.mkdir(parents=True, exist_ok=True)
    grid_of_rows(rows).save(out)
    return out
