"""ADM/GLIDE-style UNet shared by the decoder and the upsamplers."""

from __future__ import annotations

from pydantic import Field

from models.config import NonNegativeInt, PositiveInt, Probability, config_dataclass


@config_dataclass
class UNetConfig:
    base_channels: PositiveInt = 128
    channel_mults: tuple[PositiveInt, ...] = (1, 2, 3, 4)
    num_res_blocks: PositiveInt = 2
    attention_resolutions: tuple[PositiveInt, ...] = (32, 16, 8)  # in pixels of the feature map
    head_channels: PositiveInt = 64
    dropout: Probability = 0.0
    norm_groups: PositiveInt = 32
    gradient_checkpointing: bool = False
    num_context_layers_per_block: NonNegativeInt = 1
