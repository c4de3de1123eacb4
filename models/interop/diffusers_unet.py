"""unclip's UNet <-> diffusers' `UNet2DConditionModel` (Karlo's decoder: ResNet and
`SimpleCrossAttn` blocks, GLIDE-style attention over pixels and context tokens) and
`UNet2DModel` (Karlo's super-resolution UNets: ResNet blocks only), configs and weights.

Both are the same ADM network: BigGAN-style residual up/down-sampling blocks, the timestep
embedding modulating the second GroupNorm (scale-shift, or added before it), attention whose
keys and values are the context tokens' and the pixels' in one softmax. A diffusers level
is `layers_per_block` ResNets (each followed by one attention in an attention level) and a
resampling ResNet; ours lists the same blocks in the same order, so the map is a walk over
both in step. Only weight layouts differ: our packed `qkv` and `context_kv` projections are
diffusers' separate `to_q/to_k/to_v` and `add_k_proj/add_v_proj`, concatenated row-wise.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional

import torch
from torch import Tensor

from models.unet import UNetConfig


class Unmappable(ValueError):
    """A config that the other side cannot express; `problems` lists each key that does not map."""

    def __init__(self, where: str, problems: list[str]) -> None:
        self.where, self.problems = where, list(problems)
        super().__init__(f"{where}: " + "; ".join(problems))


@dataclass(frozen=True)
class Link:
    """One of our tensors and the diffusers tensors it is made of (concatenated along dim 0)."""

    ours: str
    theirs: tuple[str, ...]


_RES = (("norm_in", "norm1"), ("conv_in", "conv1"), ("emb_proj", "time_emb_proj"), ("norm_out", "norm2"), ("conv_out", "conv2"), ("skip", "conv_shortcut"))
_ATTN = (("norm", ("group_norm",)), ("qkv", ("to_q", "to_k", "to_v")), ("context_kv", ("add_k_proj", "add_v_proj")), ("proj_out", ("to_out.0",)))


def _linked(ours: str, theirs: str, kind: str) -> list[Link]:
    links = []
    if kind == "res":
        for a, b in _RES:
            links += [Link(f"{ours}.{a}.{p}", (f"{theirs}.{b}.{p}",)) for p in ("weight", "bias")]
    else:
        for a, bs in _ATTN:
            links += [Link(f"{ours}.{a}.{p}", tuple(f"{theirs}.{b}.{p}" for b in bs)) for p in ("weight", "bias")]
    return links


def unet_links(cfg: UNetConfig, has_attention: list[bool], prefix: str = "") -> list[Link]:
    """Every possible link of a UNet of `cfg` whose level `i` has attention iff
    `has_attention[i]` (optional tensors, e.g. 1x1 skips, are filtered by the caller)."""
    links = [
        Link(f"{prefix}time_mlp.0.{p}", (f"time_embedding.linear_1.{p}",)) for p in ("weight", "bias")
    ] + [Link(f"{prefix}time_mlp.2.{p}", (f"time_embedding.linear_2.{p}",)) for p in ("weight", "bias")]
    for ours, theirs in (("conv_in", "conv_in"), ("norm_out", "conv_norm_out"), ("conv_out", "conv_out")):
        links += [Link(f"{prefix}{ours}.{p}", (f"{theirs}.{p}",)) for p in ("weight", "bias")]
    levels, blocks = len(cfg.channel_mults), cfg.num_res_blocks
    k = 0
    for level in range(levels):
        for r in range(blocks):
            links += _linked(f"{prefix}down.{k}.res", f"down_blocks.{level}.resnets.{r}", "res")
            if has_attention[level]:
                links += _linked(f"{prefix}down.{k}.attention.0", f"down_blocks.{level}.attentions.{r}", "attn")
            k += 1
        if level < levels - 1:
            links += _linked(f"{prefix}down.{k}.res", f"down_blocks.{level}.downsamplers.0", "res")
            k += 1
    links += _linked(f"{prefix}middle.0.res", "mid_block.resnets.0", "res")
    if has_attention[-1]:
        links += _linked(f"{prefix}middle.0.attention.0", "mid_block.attentions.0", "attn")
    links += _linked(f"{prefix}middle.1.res", "mid_block.resnets.1", "res")
    u = 0
    for i, level in enumerate(reversed(range(levels))):
        for r in range(blocks + 1):
            links += _linked(f"{prefix}up.{u}.res", f"up_blocks.{i}.resnets.{r}", "res")
            if has_attention[level]:
                links += _linked(f"{prefix}up.{u}.attention.0", f"up_blocks.{i}.attentions.{r}", "attn")
            u += 1
        if level > 0:
            links += _linked(f"{prefix}up_resample.{u - 1}.res", f"up_blocks.{i}.upsamplers.0", "res")
    return links


def convert_from_diffusers(links: list[Link], theirs: dict[str, Tensor]) -> dict[str, Tensor]:
    """Our tensors from diffusers' (links whose sources are absent are skipped)."""
    return {
        link.ours: torch.cat([theirs[t] for t in link.theirs]) if len(link.theirs) > 1 else theirs[link.theirs[0]]
        for link in links
        if all(t in theirs for t in link.theirs)
    }


def convert_to_diffusers(links: list[Link], ours: dict[str, Tensor]) -> dict[str, Tensor]:
    """Diffusers' tensors from ours (links whose source is absent are skipped)."""
    out: dict[str, Tensor] = {}
    for link in links:
        if link.ours in ours:
            parts = ours[link.ours].chunk(len(link.theirs)) if len(link.theirs) > 1 else (ours[link.ours],)
            out.update({t: p.contiguous() for t, p in zip(link.theirs, parts)})
    return out


def attention_levels(cfg: UNetConfig, image_size: int) -> list[bool]:
    """Which levels of our UNet attend (its feature-map size is an attention resolution)."""
    return [image_size // 2**level in cfg.attention_resolutions for level in range(len(cfg.channel_mults))]


# ------------------------------------------------------------------ configs
_COMMON = {
    "act_fn": "silu",
    "flip_sin_to_cos": True,
    "freq_shift": 0,
    "norm_eps": 1e-5,
    "center_input_sample": False,
    "mid_block_scale_factor": 1,
}
_CONDITIONAL = {
    "class_embed_type": "identity",
    "mid_block_type": "UNetMidBlock2DSimpleCrossAttn",
    "only_cross_attention": False,
    "dual_cross_attention": False,
    "resnet_skip_time_act": False,
    "resnet_out_scale_factor": 1.0,
    "cross_attention_norm": None,
    "encoder_hid_dim": None,
    "encoder_hid_dim_type": None,
    "addition_embed_type": None,
    "time_embedding_type": "positional",
    "time_embedding_dim": None,
    "time_cond_proj_dim": None,
    "time_embedding_act_fn": None,
    "timestep_post_act": None,
    "num_class_embeds": None,
    "class_embeddings_concat": False,
    "conv_in_kernel": 3,
    "conv_out_kernel": 3,
    "mid_block_only_cross_attention": None,
    "addition_time_embed_dim": None,
    "projection_class_embeddings_input_dim": None,
    "num_attention_heads": None,
    "attention_type": "default",
}
_UNCONDITIONAL = {
    "add_attention": False,
    "mid_block_type": "UNetMidBlock2D",
    "time_embedding_type": "positional",
    "time_embedding_dim": None,
    "class_embed_type": None,
    "num_class_embeds": None,
}
_BLOCKS = {
    True: ("SimpleCrossAttnDownBlock2D", "SimpleCrossAttnUpBlock2D"),
    False: ("ResnetDownsampleBlock2D", "ResnetUpsampleBlock2D"),
}


def _check_fixed(cfg: dict[str, Any], fixed: dict[str, Any], problems: list[str]) -> None:
    for key, expected in fixed.items():
        got = cfg.get(key, expected)
        if got != expected and not (isinstance(got, (list, tuple)) and all(g == expected for g in got)):
            problems.append(f"{key}={got!r} (unclip's UNet implements {expected!r})")


@dataclass(frozen=True)
class UNetShape:
    """What a diffusers UNet config says besides our `UNetConfig`."""

    image_size: int
    in_channels: int
    out_channels: int
    context_dim: Optional[int]
    attention: list[bool]


def unet_from_diffusers(cfg: dict[str, Any], where: str, *, conditional: bool) -> tuple[UNetConfig, UNetShape]:
    """Our `UNetConfig` (and the shape around it) from a `UNet2DConditionModel` (conditional)
    or `UNet2DModel` config.json; `Unmappable` naming every key that does not map."""
    problems: list[str] = []
    _check_fixed(cfg, {**_COMMON, **(_CONDITIONAL if conditional else _UNCONDITIONAL)}, problems)
    widths = list(cfg["block_out_channels"])
    base = widths[0]
    if any(w % base for w in widths):
        problems.append(f"block_out_channels={widths} (unclip's widths are multiples of the first)")
    downs, ups = list(cfg["down_block_types"]), list(cfg["up_block_types"])
    attention = [d == _BLOCKS[True][0] for d in downs]
    allowed = [_BLOCKS[True][0], _BLOCKS[False][0]] if conditional else [_BLOCKS[False][0]]
    for level, d in enumerate(downs):
        if d not in allowed:
            problems.append(f"down_block_types[{level}]={d!r} (unclip's UNet has {' and '.join(allowed)})")
    expected_ups = [_BLOCKS[a][1] for a in reversed(attention)]
    if ups != expected_ups:
        problems.append(f"up_block_types={ups} (the mirror of down_block_types is {expected_ups})")
    if conditional and not attention[-1]:
        problems.append("the deepest level has no attention but the mid block does (unclip's middle attends iff the deepest level does)")
    layers = cfg.get("layers_per_block", 2)
    if not isinstance(layers, int):
        problems.append(f"layers_per_block={layers!r} (unclip uses one count for every level)")
    head_dim = cfg.get("attention_head_dim", 8) if conditional else 64
    if conditional and not isinstance(head_dim, int):
        problems.append(f"attention_head_dim={head_dim!r} (unclip uses one head width)")
    size = cfg.get("sample_size")
    if not isinstance(size, int):
        problems.append(f"sample_size={size!r} (unclip needs one square size)")
    if problems:
        raise Unmappable(where, problems)
    resolutions = tuple(size // 2**level for level, a in enumerate(attention) if a)
    unet = UNetConfig(
        base_channels=base,
        channel_mults=tuple(w // base for w in widths),
        num_res_blocks=layers,
        attention_resolutions=resolutions,
        head_channels=head_dim,
        dropout=float(cfg.get("dropout", 0.0)),
        norm_groups=int(cfg.get("norm_num_groups", 32)),
        num_context_layers_per_block=1,
        scale_shift_norm=cfg.get("resnet_time_scale_shift", "default") == "scale_shift",
    )
    shape = UNetShape(size, int(cfg["in_channels"]), int(cfg["out_channels"]), cfg.get("cross_attention_dim") if conditional else None, attention)
    return unet, shape


def unet_to_diffusers(unet: UNetConfig, shape: UNetShape, where: str, *, conditional: bool) -> dict[str, Any]:
    """The config.json of the diffusers UNet that computes what our UNet of `unet` does."""
    problems = []
    if any(shape.attention) and unet.num_context_layers_per_block != 1:
        problems.append(f"unet.num_context_layers_per_block={unet.num_context_layers_per_block} (diffusers' blocks have 1)")
    if conditional and not shape.attention[-1]:
        problems.append("unet.attention_resolutions must include the deepest level (diffusers' SimpleCrossAttn mid block attends)")
    if not conditional and any(shape.attention):
        problems.append(f"unet.attention_resolutions={list(unet.attention_resolutions)} (diffusers' UNet2DModel blocks used here have no attention)")
    if problems:
        raise Unmappable(where, problems)
    downs = [_BLOCKS[a][0] for a in shape.attention]
    config = {
        "_class_name": "UNet2DConditionModel" if conditional else "UNet2DModel",
        "sample_size": shape.image_size,
        "in_channels": shape.in_channels,
        "out_channels": shape.out_channels,
        "block_out_channels": [unet.base_channels * m for m in unet.channel_mults],
        "layers_per_block": unet.num_res_blocks,
        "down_block_types": downs,
        "up_block_types": [_BLOCKS[a][1] for a in reversed(shape.attention)],
        "norm_num_groups": unet.norm_groups,
        "dropout": unet.dropout,
        "resnet_time_scale_shift": "scale_shift" if unet.scale_shift_norm else "default",
        "downsample_padding": 1,
        **_COMMON,
    }
    if conditional:
        config.update(_CONDITIONAL, attention_head_dim=unet.head_channels, cross_attention_dim=shape.context_dim)
    else:
        config.update(_UNCONDITIONAL, attention_head_dim=None)
    return config
