"""diffusers' `UnCLIPPipeline` components <-> unclip's stages, configs and weights.

    prior/  PriorTransformer                 <-> DiffusionPrior (raw embeddings, empty-caption
                                                 null, q/k/v biases, one candidate)
    decoder/ UNet2DConditionModel + text_proj/ UnCLIPTextProjModel
                                             <-> Decoder (raw embeddings, empty-caption null,
                                                 text embedding in the timestep embedding,
                                                 LayerNorm on the text tokens, learned sigma)
    super_res_first/, super_res_last/ UNet2DModel
                                             <-> Upsampler with a last-step UNet
    *_scheduler/ UnCLIPScheduler             <-> DiffusionConfig (cosine, DDPM)

Going in, each function returns the architecture's part of our config as a nested dict (the
caller merges it into a stage config that supplies training and sampling settings) or our
state dict; going out, it takes our config and state dict and raises `Unmappable`, naming
every setting diffusers cannot express, before producing anything. Tensors map one to one
(concatenations, splits and one row permutation), so a round trip is bit-exact. The empty
caption's CLIP outputs (`null_caption.*` buffers) are not weights of either side: diffusers
recomputes them with its text encoder; going in, the caller computes and sets them.
"""

from __future__ import annotations

from typing import Any

import torch
from einops import rearrange
from torch import Tensor

from models.decoder import DecoderConfig
from models.diffusion import DiffusionConfig
from models.interop.diffusers_unet import (
    Link,
    UNetShape,
    Unmappable,
    attention_levels,
    convert_from_diffusers,
    convert_to_diffusers,
    unet_from_diffusers,
    unet_links,
    unet_to_diffusers,
)
from models.prior import DiffusionPriorConfig
from models.upsampler import UpsamplerConfig

# ------------------------------------------------------------------ schedulers
_OBJECTIVES = {"epsilon": "eps", "sample": "x0"}


def diffusion_from_scheduler(cfg: dict[str, Any], where: str) -> dict[str, Any]:
    """Our `diffusion` section (the process; sampling steps and guidance are the caller's)
    from an `UnCLIPScheduler` config: the cosine schedule, DDPM with `fixed_small_log` (the
    posterior variance) or `learned_range` (learned sigma), static clipping of x0."""
    problems = []
    if cfg.get("_class_name", "UnCLIPScheduler") != "UnCLIPScheduler":
        problems.append(f"_class_name={cfg['_class_name']!r} (the unCLIP pipeline's scheduler is UnCLIPScheduler)")
    if cfg.get("beta_schedule", "squaredcos_cap_v2") != "squaredcos_cap_v2":
        problems.append(f"beta_schedule={cfg['beta_schedule']!r} (UnCLIPScheduler supports squaredcos_cap_v2)")
    prediction = cfg.get("prediction_type", "epsilon")
    if prediction not in _OBJECTIVES:
        problems.append(f"prediction_type={prediction!r} (expected epsilon or sample)")
    variance = cfg.get("variance_type", "fixed_small_log")
    if variance not in ("fixed_small_log", "learned_range"):
        problems.append(f"variance_type={variance!r} (expected fixed_small_log or learned_range)")
    if problems:
        raise Unmappable(where, problems)
    clip = bool(cfg.get("clip_sample", True))
    return {
        "timesteps": int(cfg.get("num_train_timesteps", 1000)),
        "schedule": "cosine",
        "objective": _OBJECTIVES[prediction],
        "learn_sigma": variance == "learned_range",
        "sampler": "ddpm",
        "clip_x0": "static" if clip else "none",
        "clip_range": float(cfg.get("clip_sample_range", 1.0)),
    }


def scheduler_from_diffusion(d: DiffusionConfig, where: str) -> dict[str, Any]:
    """The `UnCLIPScheduler` config of our process (diffusers samples it with DDPM)."""
    problems = []
    if d.schedule != "cosine":
        problems.append(f"diffusion.schedule={d.schedule!r} (UnCLIPScheduler has the cosine schedule only)")
    if d.objective not in ("eps", "x0"):
        problems.append(f"diffusion.objective={d.objective!r} (UnCLIPScheduler predicts epsilon or the sample)")
    if d.clip_x0 == "dynamic":
        problems.append("diffusion.clip_x0='dynamic' (UnCLIPScheduler clips statically or not at all)")
    if problems:
        raise Unmappable(where, problems)
    return {
        "_class_name": "UnCLIPScheduler",
        "num_train_timesteps": d.timesteps,
        "variance_type": "learned_range" if d.learn_sigma else "fixed_small_log",
        "clip_sample": d.clip_x0 == "static",
        "clip_sample_range": d.clip_range,
        "prediction_type": "epsilon" if d.objective == "eps" else "sample",
        "beta_schedule": "squaredcos_cap_v2",
    }


# ------------------------------------------------------------------ prior
_PRIOR_FIXED = {
    "time_embed_act_fn": "silu",
    "norm_in_type": None,
    "embedding_proj_norm_type": None,
    "encoder_hid_proj_type": "linear",
    "added_emb_type": "prd",
    "additional_embeddings": 4,
}


def prior_from_diffusers_config(cfg: dict[str, Any], scheduler: dict[str, Any]) -> dict[str, Any]:
    """Our prior `model` section's architecture from `prior/config.json` and its scheduler."""
    problems = [f"{k}={cfg.get(k, v)!r} (unclip's prior implements {v!r})" for k, v in _PRIOR_FIXED.items() if cfg.get(k, v) != v]
    heads, head_dim, dim = cfg.get("num_attention_heads", 32), cfg.get("attention_head_dim", 64), cfg.get("embedding_dim", 768)
    inner = heads * head_dim
    for key, expected in (("time_embed_dim", inner), ("embedding_proj_dim", dim), ("clip_embed_dim", dim)):
        if cfg.get(key) not in (None, expected):
            problems.append(f"{key}={cfg[key]} (unclip's prior uses {expected})")
    if problems:
        raise Unmappable("prior/config.json", problems)
    diffusion = diffusion_from_scheduler(scheduler, "prior_scheduler/scheduler_config.json")
    if diffusion["learn_sigma"]:
        raise Unmappable("prior_scheduler/scheduler_config.json", ["variance_type='learned_range' (the prior has fixed variances)"])
    return {
        "kind": "diffusion",
        "embed_dim": dim,
        "text_width": dim,  # PriorTransformer projects the text encodings from embedding_dim
        "max_text_len": int(cfg.get("num_embeddings", 77)),
        "dim": inner,
        "depth": int(cfg.get("num_layers", 20)),
        "heads": heads,
        "dim_head": head_dim,
        "ff_mult": 4,
        "dropout": float(cfg.get("dropout", 0.0)),
        "use_text_encodings": True,
        "clip_embeddings": "raw",
        "null_text": "empty_caption",
        "qkv_bias": True,
        "sample_candidates": 1,
        "diffusion": diffusion,
    }


def _prior_links(cfg: DiffusionPriorConfig) -> list[Link]:
    links = [
        Link("time_mlp.0.weight", ("time_embedding.linear_1.weight",)), Link("time_mlp.0.bias", ("time_embedding.linear_1.bias",)),
        Link("time_mlp.2.weight", ("time_embedding.linear_2.weight",)), Link("time_mlp.2.bias", ("time_embedding.linear_2.bias",)),
    ]
    for ours, theirs in (
        ("image_proj", "proj_in"), ("text.text_embed_proj", "embedding_proj"), ("text.text_proj", "encoder_hidden_states_proj"),
        ("transformer.norm", "norm_out"), ("to_out", "proj_to_clip_embeddings"),
    ):
        links += [Link(f"{ours}.{p}", (f"{theirs}.{p}",)) for p in ("weight", "bias")]
    for i in range(cfg.depth):
        a, b = f"transformer.blocks.{i}.", f"transformer_blocks.{i}."
        for ours, theirs in (("norm_attn", "norm1"), ("norm_ff", "norm3"), ("attn.to_out", "attn1.to_out.0"), ("ff.0", "ff.net.0.proj"), ("ff.3", "ff.net.2")):
            links += [Link(f"{a}{ours}.{p}", (f"{b}{theirs}.{p}",)) for p in ("weight", "bias")]
        links += [Link(f"{a}attn.to_qkv.{p}", tuple(f"{b}attn1.to_{x}.{p}" for x in "qkv")) for p in ("weight", "bias")]
    return links


def prior_from_diffusers(state: dict[str, Tensor], cfg: DiffusionPriorConfig) -> dict[str, Tensor]:
    """Our prior's state dict (all but `text.null_caption.*`) from `PriorTransformer` weights."""
    ours = convert_from_diffusers(_prior_links(cfg), state)
    length = cfg.max_text_len
    ours["text.text_pos"] = state["positional_embedding"][0, :length].contiguous()
    ours["tail_pos"] = state["positional_embedding"][0, length:].contiguous()
    ours["query"] = state["prd_embedding"].reshape(-1)
    ours["embedding_space.clip_mean"] = state["clip_mean"].reshape(-1)
    ours["embedding_space.clip_std"] = state["clip_std"].reshape(-1)
    return ours


def _check_prior(cfg: DiffusionPriorConfig) -> None:
    wanted = {
        "kind": "diffusion", "clip_embeddings": "raw", "null_text": "empty_caption", "qkv_bias": True,
        "use_text_encodings": True, "ff_mult": 4, "text_width": cfg.embed_dim,
    }
    problems = [f"model.{k}={getattr(cfg, k)!r} (PriorTransformer: {v!r})" for k, v in wanted.items() if getattr(cfg, k) != v]
    if cfg.dim != cfg.heads * cfg.dim_head:
        problems.append(f"model.dim={cfg.dim} != heads * dim_head = {cfg.heads * cfg.dim_head} (PriorTransformer's width)")
    if problems:
        raise Unmappable("prior", problems)


def prior_to_diffusers(state: dict[str, Tensor], cfg: DiffusionPriorConfig) -> tuple[dict[str, Any], dict[str, Tensor]]:
    """`(prior/config.json, PriorTransformer state dict)` of our prior."""
    _check_prior(cfg)
    theirs = convert_to_diffusers(_prior_links(cfg), state)
    theirs["positional_embedding"] = torch.cat([state["text.text_pos"], state["tail_pos"]])[None].contiguous()
    theirs["prd_embedding"] = state["query"].reshape(1, 1, -1).contiguous()
    theirs["clip_mean"] = state["embedding_space.clip_mean"].reshape(1, -1).contiguous()
    theirs["clip_std"] = state["embedding_space.clip_std"].reshape(1, -1).contiguous()
    config = {
        "_class_name": "PriorTransformer",
        "num_attention_heads": cfg.heads,
        "attention_head_dim": cfg.dim_head,
        "num_layers": cfg.depth,
        "embedding_dim": cfg.embed_dim,
        "num_embeddings": cfg.max_text_len,
        "dropout": cfg.dropout,
        "time_embed_dim": None,
        "embedding_proj_dim": None,
        "clip_embed_dim": None,
        **_PRIOR_FIXED,
    }
    return config, theirs


# ------------------------------------------------------------------ decoder (+ text_proj)
def decoder_from_diffusers_config(
    unet_cfg: dict[str, Any], text_proj_cfg: dict[str, Any], scheduler: dict[str, Any], max_text_len: int
) -> dict[str, Any]:
    """Our decoder `model` section's architecture from `decoder/config.json`,
    `text_proj/config.json` and the decoder scheduler; `max_text_len` is the text encoder's."""
    unet, shape = unet_from_diffusers(unet_cfg, "decoder/config.json", conditional=True)
    dim = int(text_proj_cfg.get("clip_embeddings_dim", 768))
    problems = []
    if text_proj_cfg.get("time_embed_dim") != 4 * unet.base_channels:
        problems.append(f"time_embed_dim={text_proj_cfg.get('time_embed_dim')} (the decoder's timestep embedding is {4 * unet.base_channels} wide)")
    if text_proj_cfg.get("cross_attention_dim") != shape.context_dim:
        problems.append(f"cross_attention_dim={text_proj_cfg.get('cross_attention_dim')} (the decoder's is {shape.context_dim})")
    diffusion = diffusion_from_scheduler(scheduler, "decoder_scheduler/scheduler_config.json")
    channels = shape.in_channels
    if shape.out_channels != channels * (2 if diffusion["learn_sigma"] else 1):
        problems.append(f"decoder out_channels={shape.out_channels} with in_channels={channels} and variance_type={scheduler.get('variance_type')!r}")
    if problems:
        raise Unmappable("text_proj/config.json", problems)
    return {
        "image_size": shape.image_size,
        "channels": channels,
        "image_embed_dim": dim,
        "text_width": dim,  # UnCLIPTextProjModel projects the text encodings from clip_embeddings_dim
        "max_text_len": int(max_text_len),
        "use_text_encodings": True,
        "num_image_tokens": int(text_proj_cfg.get("clip_extra_context_tokens", 4)),
        "context_dim": shape.context_dim,
        "clip_embeddings": "raw",
        "null_text": "empty_caption",
        "use_text_embed": True,
        "context_norm": "text_tokens",
        "unet": _unet_section(unet),
        "diffusion": diffusion,
    }


def _unet_section(unet) -> dict[str, Any]:
    return {
        "base_channels": unet.base_channels,
        "channel_mults": list(unet.channel_mults),
        "num_res_blocks": unet.num_res_blocks,
        "attention_resolutions": list(unet.attention_resolutions),
        "head_channels": unet.head_channels,
        "dropout": unet.dropout,
        "norm_groups": unet.norm_groups,
        "num_context_layers_per_block": 1,
        "scale_shift_norm": unet.scale_shift_norm,
    }


def _text_proj_links() -> list[Link]:
    pairs = (
        ("unet.cond_proj", "clip_image_embeddings_project_to_time_embeddings"),
        ("text_embed_proj", "embedding_proj"),
        ("text_proj", "encoder_hidden_states_proj"),
        ("context_norm", "text_encoder_hidden_states_norm"),
    )
    links = [Link(f"{a}.{p}", (f"{b}.{p}",)) for a, b in pairs for p in ("weight", "bias")]
    return links + [Link("null_image_embed", ("learned_classifier_free_guidance_embeddings",))]


def _decoder_unet_links(cfg: DecoderConfig) -> list[Link]:
    return unet_links(cfg.unet, attention_levels(cfg.unet, cfg.image_size), prefix="unet.")


# diffusers reshapes the image-token projection to [batch, width, tokens] (row c * n + k is
# token k, channel c); ours to [batch, tokens, width] (row k * width + c)
def _tokens_from_diffusers(x: Tensor, n: int) -> Tensor:
    return rearrange(x, "(c n) ... -> (n c) ...", n=n).contiguous()


def _tokens_to_diffusers(x: Tensor, n: int) -> Tensor:
    return rearrange(x, "(n c) ... -> (c n) ...", n=n).contiguous()


def decoder_from_diffusers(unet_state: dict[str, Tensor], text_proj_state: dict[str, Tensor], cfg: DecoderConfig) -> dict[str, Tensor]:
    """Our decoder's state dict (all but `null_caption.*`) from the UNet and text_proj weights."""
    ours = convert_from_diffusers(_decoder_unet_links(cfg), unet_state)
    ours.update(convert_from_diffusers(_text_proj_links(), text_proj_state))
    for p in ("weight", "bias"):
        ours[f"image_to_tokens.{p}"] = _tokens_from_diffusers(text_proj_state[f"clip_extra_context_tokens_proj.{p}"], cfg.num_image_tokens)
    return ours


def _check_decoder(cfg: DecoderConfig) -> None:
    wanted = {
        "clip_embeddings": "raw", "null_text": "empty_caption", "use_text_embed": True, "context_norm": "text_tokens",
        "use_text_encodings": True, "text_width": cfg.image_embed_dim,
    }
    problems = [f"model.{k}={getattr(cfg, k)!r} (UnCLIPTextProjModel: {v!r})" for k, v in wanted.items() if getattr(cfg, k) != v]
    if problems:
        raise Unmappable("decoder", problems)


def decoder_to_diffusers(state: dict[str, Tensor], cfg: DecoderConfig) -> tuple[dict, dict[str, Tensor], dict, dict[str, Tensor]]:
    """`(decoder/config.json, UNet2DConditionModel weights, text_proj/config.json,
    UnCLIPTextProjModel weights)` of our decoder."""
    _check_decoder(cfg)
    attention = attention_levels(cfg.unet, cfg.image_size)
    shape = UNetShape(cfg.image_size, cfg.channels, 2 * cfg.channels if cfg.diffusion.learn_sigma else cfg.channels, cfg.context_dim, attention)
    unet_config = unet_to_diffusers(cfg.unet, shape, "decoder", conditional=True)
    text_proj_config = {
        "_class_name": "UnCLIPTextProjModel",
        "clip_extra_context_tokens": cfg.num_image_tokens,
        "clip_embeddings_dim": cfg.image_embed_dim,
        "time_embed_dim": 4 * cfg.unet.base_channels,
        "cross_attention_dim": cfg.context_dim,
    }
    unet_state = convert_to_diffusers(_decoder_unet_links(cfg), state)
    text_proj_state = convert_to_diffusers(_text_proj_links(), state)
    for p in ("weight", "bias"):
        text_proj_state[f"clip_extra_context_tokens_proj.{p}"] = _tokens_to_diffusers(state[f"image_to_tokens.{p}"], cfg.num_image_tokens)
    return unet_config, unet_state, text_proj_config, text_proj_state


# ------------------------------------------------------------------ super resolution
def upsampler_from_diffusers_config(
    first_cfg: dict[str, Any], last_cfg: dict[str, Any], scheduler: dict[str, Any], lowres_size: int
) -> dict[str, Any]:
    """Our upsampler `model` section's architecture from `super_res_first/` and
    `super_res_last/` (which must have the same architecture), the super-resolution scheduler
    and the decoder's image size; resizing as the pipeline does (antialiased bicubic, no clamp)."""
    unet, shape = unet_from_diffusers(first_cfg, "super_res_first/config.json", conditional=False)
    last_unet, last_shape = unet_from_diffusers({**last_cfg, "sample_size": shape.image_size}, "super_res_last/config.json", conditional=False)
    problems = []
    if (last_unet, last_shape) != (unet, shape):
        problems.append("super_res_last's architecture differs from super_res_first's (unclip's last-step UNet has the same)")
    diffusion = diffusion_from_scheduler(scheduler, "super_res_scheduler/scheduler_config.json")
    channels = shape.in_channels // 2
    if shape.in_channels % 2 or shape.out_channels != channels * (2 if diffusion["learn_sigma"] else 1):
        problems.append(f"in_channels={shape.in_channels}, out_channels={shape.out_channels} (expected 2C in: noisy image and low-res image)")
    if problems:
        raise Unmappable("super_res_first/config.json", problems)
    return {
        "lowres_size": int(lowres_size),
        "image_size": shape.image_size,
        "channels": channels,
        "unet": _unet_section(unet),
        "diffusion": diffusion,
        "lowres_upsample_mode": "bicubic_antialias",
        "lowres_clamp": False,
        "last_step_unet": True,
    }


def upsampler_from_diffusers(first_state: dict[str, Tensor], last_state: dict[str, Tensor], cfg: UpsamplerConfig) -> dict[str, Tensor]:
    """Our upsampler's state dict from the two super-resolution UNets' weights."""
    links = unet_links(cfg.unet, attention_levels(cfg.unet, cfg.image_size))
    ours = {f"unet.{k}": v for k, v in convert_from_diffusers(links, first_state).items()}
    ours.update({f"last_step_unet.{k}": v for k, v in convert_from_diffusers(links, last_state).items()})
    return ours


def upsampler_to_diffusers(state: dict[str, Tensor], cfg: UpsamplerConfig) -> tuple[dict, dict[str, Tensor], dict[str, Tensor]]:
    """`(the super-resolution UNets' config.json, super_res_first weights, super_res_last
    weights)`; without a last-step UNet both are ours (the pipeline then computes what our
    sampler does: one UNet for every step)."""
    problems = []
    if cfg.lowres_upsample_mode != "bicubic_antialias" or cfg.lowres_clamp:
        problems.append(
            f"model.lowres_upsample_mode={cfg.lowres_upsample_mode!r}, lowres_clamp={cfg.lowres_clamp} "
            "(UnCLIPPipeline resizes with antialiased bicubic and does not clamp)"
        )
    if problems:
        raise Unmappable("upsampler", problems)
    attention = attention_levels(cfg.unet, cfg.image_size)
    shape = UNetShape(cfg.image_size, 2 * cfg.channels, 2 * cfg.channels if cfg.diffusion.learn_sigma else cfg.channels, None, attention)
    config = unet_to_diffusers(cfg.unet, shape, "upsampler", conditional=False)
    links = unet_links(cfg.unet, attention)
    first = convert_to_diffusers(links, {k.removeprefix("unet."): v for k, v in state.items() if k.startswith("unet.")})
    last_prefix = "last_step_unet." if cfg.last_step_unet else "unet."
    last = convert_to_diffusers(links, {k.removeprefix(last_prefix): v for k, v in state.items() if k.startswith(last_prefix)})
    return config, first, last
