"""What the image stages (the decoder and the upsamplers) share: their default diffusion, the
checks of their inputs and sizes, and how sampling options default to the config."""

from __future__ import annotations

from contextlib import contextmanager
from typing import Any, Iterator, Optional

from torch import Tensor, nn

from models.diffusion import DiffusionConfig
from models.unet import UNetConfig


def image_diffusion() -> DiffusionConfig:
    return DiffusionConfig(timesteps=1000, schedule="cosine", objective="eps", clip_x0="static")


def check_divisible(image_size: int, unet: UNetConfig, key: str) -> None:
    factor = 2 ** (len(unet.channel_mults) - 1)
    if image_size % factor:
        raise ValueError(
            f"{key} ({image_size}) must be divisible by 2**(len(unet.channel_mults)-1) = {factor}"
        )


def out_channels(cfg: Any) -> int:
    """The UNet's output channels: the prediction, and with learned variance also `v`."""
    return 2 * cfg.channels if cfg.diffusion.learn_sigma else cfg.channels


def check_images(images: Tensor, channels: int, size: Optional[int], what: str) -> None:
    if images.ndim != 4 or images.shape[1] != channels or (size is not None and images.shape[-2:] != (size, size)):
        side = f"{size}, {size}" if size is not None else "H, W"
        raise ValueError(f"{what} must be [batch, {channels}, {side}], got {tuple(images.shape)}")


@contextmanager
def eval_mode(module: nn.Module) -> Iterator[None]:
    """Sampling never uses dropout or CFG dropout, whatever mode the trainer left us in."""
    was_training = module.training
    module.eval()
    try:
        yield
    finally:
        module.train(was_training)


def sample_kwargs(d: DiffusionConfig, steps, sampler, eta, guidance_scale) -> dict:
    """`GaussianDiffusion.sample` options: the given ones, the config's for those left None."""
    return dict(
        steps=d.sample_steps if steps is None else steps,
        sampler=d.sampler if sampler is None else sampler,
        eta=d.eta if eta is None else eta,
        guidance_scale=d.guidance_scale if guidance_scale is None else guidance_scale,
        clip_x0=d.clip_x0,
        dynamic_threshold_percentile=d.dynamic_threshold_percentile,
        clip_range=d.clip_range,
    )
