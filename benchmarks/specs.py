"""The matched sizes both implementations are built at, and the inputs both are fed.

One `PriorSpec` and one `DecoderSpec` per preset; `ours.py` and `peer.py` each turn a spec
into their own model, and `make_prior_inputs` / `make_decoder_inputs` give both the same
tensors (same seed), so the only difference in a row is the implementation.
"""

from __future__ import annotations

import dataclasses

import torch
import torch.nn.functional as F
from torch import Tensor


@dataclasses.dataclass(frozen=True)
class PriorSpec:
    """Diffusion prior: a causal transformer over `text_len + 4` tokens of width `dim`.

    dalle2-pytorch needs the CLIP embedding and the text encodings to be `dim` wide (it has no
    input projections), so both sides use `embed_dim = text_width = dim`."""

    dim: int = 512
    depth: int = 6
    heads: int = 8
    dim_head: int = 64
    ff_mult: int = 4
    text_len: int = 77
    batch: int = 32
    sample_batch: int = 2
    sample_steps: int = 50


@dataclasses.dataclass(frozen=True)
class DecoderSpec:
    """Decoder UNet at `image_size` conditioned on a CLIP image embedding (added to the time
    embedding and as 4 context tokens) and `text_len` text encodings."""

    image_size: int = 64
    base_channels: int = 32
    channel_mults: tuple[int, ...] = (1, 2, 3, 4)
    num_res_blocks: int = 2
    attention_resolutions: tuple[int, ...] = (32, 16, 8)
    head_channels: int = 32
    norm_groups: int = 32
    embed_dim: int = 512
    text_width: int = 512
    text_len: int = 77
    # != embed_dim: dalle2-pytorch's Unet skips its image-token projection when they are equal
    context_dim: int = 256
    batch: int = 16
    sample_batch: int = 1
    sample_steps: int = 50
    guidance_scale: float = 3.0


@dataclasses.dataclass(frozen=True)
class Preset:
    name: str
    prior: PriorSpec
    decoder: DecoderSpec
    runs: int  # timed runs per row (the table gives their median, min and max)
    warmup: int


PRESETS = {
    # the sizes of the committed tables: the prior (dim 512, depth 6, batch 32) and a
    # 64 px decoder that fits the 10-minute budget on 2 CPU cores
    "quick": Preset("quick", PriorSpec(), DecoderSpec(), runs=5, warmup=1),
    # the smallest sizes, for the test that keeps the command working
    "tiny": Preset(
        "tiny",
        PriorSpec(dim=32, depth=1, heads=2, dim_head=16, text_len=8, batch=2, sample_batch=2, sample_steps=2),
        DecoderSpec(
            image_size=16, base_channels=16, channel_mults=(1, 2), num_res_blocks=1, attention_resolutions=(8,),
            head_channels=16, norm_groups=8, embed_dim=16, text_width=16, text_len=4, context_dim=24, batch=2,
            sample_batch=1, sample_steps=2,
        ),
        runs=1,
        warmup=0,
    ),
}


def text_mask_for(batch: int, text_len: int, generator: torch.Generator) -> Tensor:
    """`[batch, text_len]` bool: captions of random length, at least half the context."""
    lengths = torch.randint(max(1, text_len // 2), text_len + 1, (batch,), generator=generator)
    return torch.arange(text_len)[None, :] < lengths[:, None]


@dataclasses.dataclass
class PriorInputs:
    image_embed: Tensor  # [B, dim] unit-norm
    text_embed: Tensor  # [B, dim] unit-norm
    text_encodings: Tensor  # [B, L, dim], zero at padding (dalle2-pytorch reads padding as all-zero rows)
    text_mask: Tensor  # [B, L] bool


@dataclasses.dataclass
class DecoderInputs:
    images: Tensor  # [B, 3, H, W] in [-1, 1]
    image_embed: Tensor  # [B, embed_dim] unit-norm
    text_encodings: Tensor  # [B, L, text_width], zero at padding
    text_mask: Tensor  # [B, L] bool


def make_prior_inputs(spec: PriorSpec, batch: int, device: torch.device, seed: int = 0) -> PriorInputs:
    g = torch.Generator().manual_seed(seed)
    mask = text_mask_for(batch, spec.text_len, g)
    enc = torch.randn(batch, spec.text_len, spec.dim, generator=g) * mask[..., None]
    return PriorInputs(
        F.normalize(torch.randn(batch, spec.dim, generator=g), dim=-1).to(device),
        F.normalize(torch.randn(batch, spec.dim, generator=g), dim=-1).to(device),
        enc.to(device),
        mask.to(device),
    )


def make_decoder_inputs(spec: DecoderSpec, batch: int, device: torch.device, seed: int = 0) -> DecoderInputs:
    g = torch.Generator().manual_seed(seed)
    mask = text_mask_for(batch, spec.text_len, g)
    enc = torch.randn(batch, spec.text_len, spec.text_width, generator=g) * mask[..., None]
    images = torch.rand(batch, 3, spec.image_size, spec.image_size, generator=g) * 2 - 1
    return DecoderInputs(
        images.to(device),
        F.normalize(torch.randn(batch, spec.embed_dim, generator=g), dim=-1).to(device),
        enc.to(device),
        mask.to(device),
    )
