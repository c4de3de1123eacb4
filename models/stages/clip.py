"""The CLIP stage: contrastive training of a small CLIP (the demo's: no pretrained weights
can be downloaded here). Its export is open_clip's own state dict, so it loads wherever a
CLIP does (`clip.pretrained: FILE` in another job, `models.clip.load_clip`), and in the
sampling pipeline it is the text and image encoder.
"""

from __future__ import annotations

from typing import Literal, Optional

import torch
from pydantic import Field
from torch import Tensor, nn

from models.clip import ClipAdapter, ClipConfig, architecture, build_open_clip
from models.config import config_dataclass
from models.stages import Batch, StageContext, StageSpec, load_weights


@config_dataclass
class ClipStageConfig:
    stage: Literal["clip"] = "clip"
    model: ClipConfig = Field(default_factory=ClipConfig)  # the architecture trained (`pretrained` unused)


def build(cfg: ClipStageConfig, *, activation_checkpointing: bool = False) -> nn.Module:
    model = build_open_clip(cfg.model.name)
    if activation_checkpointing:
        model.set_grad_checkpointing(True)
    return model


def clip_normalize(model: nn.Module, images: Tensor) -> Tensor:
    """Images in [-1, 1] -> CLIP's input normalisation (its mean/std)."""
    cfg = model.visual.preprocess_cfg
    mean = torch.tensor(cfg["mean"], device=images.device).view(1, 3, 1, 1)
    std = torch.tensor(cfg["std"], device=images.device).view(1, 3, 1, 1)
    return ((images.float() + 1) / 2 - mean) / std


def loss(model: nn.Module, batch: Batch, generator: Optional[torch.Generator], ctx: StageContext) -> Tensor:
    out = model(clip_normalize(model, batch["image"]), batch["tokens"].long())
    if isinstance(out, dict):
        image_features, text_features, logit_scale = out["image_features"], out["text_features"], out["logit_scale"]
    else:
        image_features, text_features, logit_scale = out[:3]
    from open_clip.loss import ClipLoss

    # gather_with_grad: every rank's loss sees the whole job's batch as negatives.
    contrastive = ClipLoss(gather_with_grad=True, rank=ctx.rank, world_size=ctx.world_size)
    return contrastive(image_features, text_features, logit_scale)


def fields(cfg: ClipStageConfig) -> frozenset[str]:
    return frozenset({"image", "tokens"})


def field_shapes(cfg: ClipStageConfig) -> dict[str, tuple[int, ...]]:
    arch = architecture(cfg.model.name)
    size = arch["vision_cfg"]["image_size"]
    size = size[0] if isinstance(size, (list, tuple)) else size
    return {"image": (3, size, size), "tokens": (arch["text_cfg"].get("context_length", 77),)}


def tokenizer(cfg: ClipStageConfig):
    from models.clip import open_clip_module

    open_clip = open_clip_module()
    return open_clip.get_tokenizer(cfg.model.name)


def load(cfg: ClipStageConfig, weights: dict[str, Tensor], device: str) -> ClipAdapter:
    """The trained CLIP as the pipeline's frozen text and image encoder."""
    model = load_weights(build(cfg), weights, f"clip {cfg.model.name} weights")
    return ClipAdapter(model, tokenizer(cfg), name=cfg.model.name).to(device)


SPEC = StageSpec(
    name="clip", config=ClipStageConfig, build=build, loss=loss, fields=fields, field_shapes=field_shapes,
    role="clip", tokenizer=tokenizer, load=load,
)
