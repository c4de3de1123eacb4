"""Noise conditioning augmentation of an upsampler's low-res input.

Cascaded Diffusion Models (Ho et al. 2021, sec. 4.2) and Imagen (Saharia et al. 2022, sec.
2.5): in training, the (resized) low-res conditioning image is noised by a random level and the
upsampler is told the level; at sampling, the previous stage's output is noised by a chosen
level and the upsampler conditioned on it. The upsampler then learns to ignore low-res detail
below that noise, so the artefacts of the stage below it matter less; sweeping the sampling
level trades fidelity to the low-res input against repair of it.

The level `s` in [0, 1] is the fraction of a continuous cosine schedule (Nichol & Dhariwal
2021), whatever the upsampler's own schedule: `x = sqrt(a(s)) x + sqrt(1 - a(s)) eps` with
`a(s) = cos^2((s + 0.008) / 1.008 * pi / 2) / cos^2(0.008 / 1.008 * pi / 2)`, so level 0 is
the clean input, 0.1 adds noise of std 0.17, 0.2 of std 0.32, 0.5 of std 0.71. The UNet reads
the level as a sinusoidal embedding through a small MLP, added to its timestep embedding.

With `max_level` 0 (the default) nothing changes: no noise, no level input, the weights of an
upsampler trained without it.
"""

from __future__ import annotations

import math
from typing import Optional

import torch
from torch import Tensor, nn

from models.config import Probability, config_dataclass
from models.layers import timestep_embedding

_S = 0.008  # the cosine schedule's offset (Nichol & Dhariwal 2021)
LEVEL_SCALE = 1000.0  # levels are embedded like timesteps of a 1000-step process


@config_dataclass
class NoiseAugConfig:
    """`max_level`: training noises each low-res image by a level drawn uniformly from
    [0, max_level] (0: off); `sample_level`: the level used at sampling unless another is asked
    for (it must lie in the trained range)."""

    max_level: Probability = 0.0
    sample_level: Probability = 0.0

    def __post_init__(self) -> None:
        if self.sample_level > self.max_level:
            raise ValueError(
                f"noise_aug.sample_level ({self.sample_level}) must be <= noise_aug.max_level ({self.max_level}): "
                "the upsampler only learns the levels it is trained on"
            )

    @property
    def enabled(self) -> bool:
        return self.max_level > 0


def signal_and_noise(level: Tensor) -> tuple[Tensor, Tensor]:
    """`(sqrt(a(s)), sqrt(1 - a(s)))` for levels `s` `[batch]` in [0, 1] (float32)."""
    s = level.float().clamp(0.0, 1.0)
    alpha = (torch.cos((s + _S) / (1 + _S) * math.pi / 2) / math.cos(_S / (1 + _S) * math.pi / 2)) ** 2
    alpha = alpha.clamp(0.0, 1.0)
    return alpha.sqrt(), (1 - alpha).sqrt()


class NoiseAugmentation(nn.Module):
    """Draws levels, noises conditioning images, embeds levels for a UNet whose timestep
    embedding is `4 * width` wide (`cond_dim` is what the UNet's `cond` input must take)."""

    def __init__(self, cfg: NoiseAugConfig, width: int) -> None:
        super().__init__()
        self.cfg = cfg
        self.width = width
        self.cond_dim = 4 * width
        self.mlp = nn.Sequential(nn.Linear(width, self.cond_dim), nn.SiLU())

    def draw_levels(self, batch: int, device: torch.device, generator: Optional[torch.Generator] = None) -> Tensor:
        """Training levels `[batch]`, uniform in [0, max_level]."""
        gen_device = generator.device if generator is not None else device
        u = torch.rand(batch, generator=generator, device=gen_device).to(device)
        return u * self.cfg.max_level

    def levels(self, batch: int, device: torch.device, level: Optional[float] = None) -> Tensor:
        """Sampling levels `[batch]`: `level`, else the configured `sample_level`."""
        level = self.cfg.sample_level if level is None else float(level)
        if not 0.0 <= level <= self.cfg.max_level:
            raise ValueError(
                f"noise level {level} is outside the levels this upsampler was trained on "
                f"(0..noise_aug.max_level = {self.cfg.max_level})"
            )
        return torch.full((batch,), level, device=device)

    def augment(
        self, images: Tensor, level: Tensor, generator: Optional[torch.Generator] = None, noise: Optional[Tensor] = None
    ) -> Tensor:
        """`images` `[batch, c, h, w]` noised by `level` `[batch]` with `noise` (like `images`;
        drawn from `generator` unless given). Not clamped: the noise must stay Gaussian for the
        level to mean what it says."""
        signal, noise_std = (v.to(images.device).view(-1, 1, 1, 1) for v in signal_and_noise(level))
        if noise is None:
            gen_device = generator.device if generator is not None else images.device
            noise = torch.randn(images.shape, generator=generator, device=gen_device, dtype=torch.float32)
        noise = noise.to(images.device, torch.float32)
        return (signal * images.float() + noise_std * noise).to(images.dtype)

    def forward(self, level: Tensor) -> Tensor:
        """The UNet's `cond` `[batch, 4 * width]` for levels `[batch]`."""
        dtype = self.mlp[0].weight.dtype
        return self.mlp(timestep_embedding(level.float() * LEVEL_SCALE, self.width).to(dtype))
