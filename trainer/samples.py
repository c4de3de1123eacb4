"""Sample grids while training: every `train.sample_every` steps, rank 0 draws a few images
with the EMA weights (what sampling uses) and writes `RUN_DIR/samples/step_XXXXXXX.png`.

The EMA shards are gathered to rank 0 and loaded into a fresh copy of the model, so the grid
shows exactly what `unclip export` would ship at this step. Stages whose output is not an
image (the priors, CLIP) have no grid. Rows of the grid: the inputs (decoder: the images
whose CLIP embeddings condition the samples; upsampler: the low-res inputs, resized), then
the samples, then (upsampler) the real high-res images.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable, Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from models.images import grid_of_rows
from trainer import distributed as dist
from trainer.ema import merged_state

MAX_IMAGES = 8


def _decoder_rows(model: nn.Module, batch: dict[str, Any], generator: torch.Generator) -> list[Tensor]:
    cond = {k: batch[k] for k in ("text_encodings", "text_mask") if k in batch}
    samples = model.sample(batch["image_embed"], **cond, generator=generator)
    return [batch["image"], samples]


def _upsampler_rows(model: nn.Module, batch: dict[str, Any], generator: torch.Generator) -> list[Tensor]:
    images = batch["image"]
    lowres = F.interpolate(images, size=model.cfg.lowres_size, mode="bilinear", antialias=True, align_corners=False)
    samples = model.sample(lowres.clamp(-1, 1), generator=generator)
    shown = F.interpolate(lowres, size=images.shape[-1], mode="nearest")
    return [shown, samples, images]


SAMPLERS: dict[str, Callable[[nn.Module, dict[str, Any], torch.Generator], list[Tensor]]] = {
    "decoder": _decoder_rows,
    "upsampler": _upsampler_rows,
}


def has_samples(stage: str) -> bool:
    return stage in SAMPLERS


def keep_for_sampling(batch: dict[str, Any]) -> dict[str, Any]:
    """The first few items of a batch, on CPU: the conditions every grid of the run reuses."""
    return {k: v[:MAX_IMAGES].detach().cpu() for k, v in batch.items() if isinstance(v, Tensor)}


def write_grid(
    *, stage: Any, job: Any, ema_state: dict[str, Tensor], shapes: dict[str, tuple[int, ...]],
    buffers: dict[str, Tensor], batch: Optional[dict[str, Any]], out: Path, seed: int,
) -> Optional[Path]:
    """Collective: gather the EMA to rank 0, which samples and writes `out`. Path on rank 0."""
    shards = dist.gather_object({k.removeprefix("model."): v for k, v in ema_state.items()})
    if shards is None or batch is None:
        return None
    model = stage.build(job)
    weights = merged_state(shards, {k.removeprefix("model."): v for k, v in shapes.items()})
    own = model.state_dict()
    weights = {k: v.reshape(own[k].shape) for k, v in weights.items()}
    model.load_state_dict({**buffers, **weights})
    model.eval()
    rows = SAMPLERS[stage.name](model, batch, torch.Generator().manual_seed(seed))
    out.parent.mkdir(parents=True, exist_ok=True)
    grid_of_rows(rows).save(out)
    return out
