"""An upsampler stage: low-res image -> high-res image (unCLIP sec. 2.1, appendix C).

It learns from images alone: the low-res input is made from each image by the model's
degradation. Its sample grid shows the low-res inputs (enlarged), the samples, and the real
high-res images.
"""

from __future__ import annotations

import dataclasses
from typing import Literal, Optional

import torch
import torch.nn.functional as F
from pydantic import Field
from torch import Tensor, nn

from models.config import config_dataclass
from models.decoder import Upsampler, UpsamplerConfig
from models.stages import Batch, StageContext, StageSpec


@config_dataclass
class UpsamplerStageConfig:
    stage: Literal["upsampler"] = "upsampler"
    model: UpsamplerConfig = Field(default_factory=UpsamplerConfig)


def build(cfg: UpsamplerStageConfig, *, activation_checkpointing: bool = False) -> nn.Module:
    model = cfg.model
    if activation_checkpointing and not model.unet.gradient_checkpointing:
        model = dataclasses.replace(model, unet=dataclasses.replace(model.unet, gradient_checkpointing=True))
    return Upsampler(model)


def loss(model: nn.Module, batch: Batch, generator: Optional[torch.Generator], ctx: StageContext) -> Tensor:
    return model.loss(batch["image"], generator=generator)


def fields(cfg: UpsamplerStageConfig) -> frozenset[str]:
    return frozenset({"image"})


def field_shapes(cfg: UpsamplerStageConfig) -> dict[str, tuple[int, ...]]:
    m = cfg.model
    return {"image": (m.channels, m.image_size, m.image_size)}


def sample_grid(model: nn.Module, batch: Batch, generator: torch.Generator) -> list[Tensor]:
    """Low-res inputs (nearest-enlarged), the upsampled samples, the real high-res images."""
    images = batch["image"]
    lowres = F.interpolate(images, size=model.cfg.lowres_size, mode="bilinear", antialias=True, align_corners=False)
    samples = model.sample(lowres.clamp(-1, 1), generator=generator)
    shown = F.interpolate(lowres, size=images.shape[-1], mode="nearest")
    return [shown, samples, images]


def meta_loss(model: nn.Module, cfg: UpsamplerStageConfig, micro_batch: int) -> Tensor:
    """The diffusion loss on a (crop-sized) image and low-res condition directly: drawing the
    crop offsets and the degradation's parameters needs real numbers, which meta tensors do
    not have (cropping and degrading keep nothing for the backward pass)."""
    m = cfg.model
    size = m.train_crop_size or m.image_size
    images = torch.zeros(micro_batch, m.channels, size, size, device="meta")
    cond = {"lowres_cond": torch.zeros_like(images)}
    if model.noise_aug is not None:
        cond["noise_level"] = torch.zeros(micro_batch, device="meta")
    return model.diffusion.loss(model, images, cond=cond)


SPEC = StageSpec(
    name="upsampler", config=UpsamplerStageConfig, build=build, loss=loss, fields=fields, field_shapes=field_shapes,
    role="upsampler", sample_grid=sample_grid, meta_loss=meta_loss,
)
