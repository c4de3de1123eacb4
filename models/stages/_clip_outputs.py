"""What a fresh run of a stage reading CLIP's raw outputs (Karlo's conventions) sets before
its first step: the empty caption's CLIP outputs (`null_text: empty_caption`) and the image
embeddings' per-dimension statistics (the diffusion prior's `clip_embeddings: raw`).

Both are persistent buffers, so they travel with checkpoints and exports; an imported or
`--init-from` run brings its own and skips this. The empty caption is encoded by the stage's
own CLIP (its `clip:` section, the CLIP that wrote the embeddings), so the null condition
sits in the same space as the training conditions.
"""

from __future__ import annotations

from typing import Any, Callable, Iterator, Optional

import torch
from torch import Tensor, nn

from models.clip import ClipConfig, load_clip_from_config
from models.stages import Batch, Preparation

# Image embeddings the raw prior's mean and std are fitted on: the standard error of each
# dimension's std is then ~0.7% of it.
STATS_SAMPLES = 10_000


def embedding_convention(stage_cfg: Any) -> Optional[str]:
    """Where the stage's `model.clip_embeddings` and its `clip.embeddings` disagree, why that
    cannot train (the model would read embeddings its CLIP does not produce); else None."""
    model = getattr(stage_cfg.model, "clip_embeddings", None)
    clip = getattr(getattr(stage_cfg, "clip", None), "embeddings", None)
    if model is None or clip is None or model == clip:
        return None
    return (
        f"model.clip_embeddings is {model!r} but clip.embeddings is {clip!r}: the model must read the "
        "embeddings its CLIP writes (set both to the same, and precompute with that clip section)"
    )


@torch.no_grad()
def empty_caption(clip_cfg: ClipConfig) -> tuple[Tensor, Tensor, Tensor]:
    """The stage's CLIP on "": `text_embed [D]` (raw or unit as `clip_cfg.embeddings` says),
    `text_encodings [L, W]` and `text_mask [L]`, L the CLIP's context length."""
    embed, encodings, mask = load_clip_from_config(clip_cfg).encode_text([""])
    return embed[0], encodings[0], mask[0]


@torch.no_grad()
def image_embeddings(batches: Iterator[Batch], count: int) -> Tensor:
    """The first `count` image embeddings `[count, D]` of the training stream (float64)."""
    rows, have = [], 0
    while have < count:
        embeds = next(batches)["image_embed"].double()
        rows.append(embeds)
        have += embeds.shape[0]
    return torch.cat(rows)[:count]


def in_order(steps: list[Callable[[nn.Module, Iterator[Batch]], None]]) -> Optional[Preparation]:
    """One preparation running `steps` in order (None when there are none)."""
    if not steps:
        return None

    def prepare(model: nn.Module, batches: Iterator[Batch]) -> None:
        for step in steps:
            step(model, batches)

    return prepare


def set_null_caption(clip_cfg: ClipConfig, find: Callable[[nn.Module], nn.Module]):
    """A preparation step: `find(model).set(...)` with the empty caption's CLIP outputs."""

    def step(model: nn.Module, batches: Iterator[Batch]) -> None:
        find(model).set(*empty_caption(clip_cfg))

    return step


def fit_clip_statistics(model: nn.Module, batches: Iterator[Batch]) -> None:
    """A preparation step: the raw prior's `clip_mean`/`clip_std` from training embeddings."""
    model.embedding_space.fit(image_embeddings(batches, STATS_SAMPLES))
