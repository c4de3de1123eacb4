"""The decoder (CLIP image embedding -> 64px image) and the upsamplers (low-res -> high-res)."""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from models.config import (
    NonNegativeFloat,
    PositiveInt,
    Probability,
    config_dataclass,
)
from models.diffusion import DiffusionConfig
from models.unet import UNetConfig


def _image_diffusion() -> DiffusionConfig:
    return DiffusionConfig(timesteps=1000, schedule="cosine", objective="eps", clip_x0="static")


def _check_divisible(image_size: int, unet: UNetConfig, key: str) -> None:
    factor = 2 ** (len(unet.channel_mults) - 1)
    if image_size % factor:
        raise ValueError(
            f"{key} ({image_size}) must be divisible by 2**(len(unet.channel_mults)-1) = {factor}"
        )


@config_dataclass
class DecoderConfig:
    image_size: PositiveInt = 64
    channels: PositiveInt = 3
    image_embed_dim: PositiveInt = 512
    text_width: PositiveInt = 512
    max_text_len: PositiveInt = 77
    use_text_encodings: bool = True
    num_image_tokens: PositiveInt = 4  # the image embedding also becomes this many context tokens
    image_embed_drop: Probability = 0.1
    text_drop: Probability = 0.5
    unet: UNetConfig = Field(default_factory=UNetConfig)
    diffusion: DiffusionConfig = Field(default_factory=_image_diffusion)

    def __post_init__(self) -> None:
        _check_divisible(self.image_size, self.unet, "image_size")


@config_dataclass
class UpsamplerConfig:
    lowres_size: PositiveInt = 64
    image_size: PositiveInt = 256
    channels: PositiveInt = 3
    # Paper: Gaussian blur for the first upsampler, BSR degradation for the second.
    degradation: Literal["gaussian_blur", "bsr"] = "gaussian_blur"
    blur_sigma: tuple[NonNegativeFloat, NonNegativeFloat] = (0.4, 0.6)
    unet: UNetConfig = Field(default_factory=UNetConfig)
    diffusion: DiffusionConfig = Field(default_factory=_image_diffusion)

    def __post_init__(self) -> None:
        if self.image_size <= self.lowres_size:
            raise ValueError(
                f"image_size ({self.image_size}) must be larger than lowres_size ({self.lowres_size}): "
                "an upsampler's output must be larger than its input"
            )
        _check_divisible(self.image_size, self.unet, "image_size")
