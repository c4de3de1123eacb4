"""Hugging Face's `CLIPTextModelWithProjection` <-> open_clip's text tower, both directions.

The same network under two names: token and position embeddings, pre-LN residual blocks
(HF's separate q/k/v projections are open_clip's packed `in_proj`), a final LayerNorm, the
pooled end-of-text token projected without bias (HF keeps the projection as a Linear
`[D, W]`, open_clip as a matrix `[W, D]`). Keys are open_clip's own, without a prefix: a
plain CLIP keeps its text tower at the top level, a `TextTransformer` is exactly this.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

HF_PREFIX = "text_model."


class UnmappableTextEncoder(ValueError):
    """A text encoder config that open_clip's text tower cannot express."""


def open_clip_text_cfg(hf_config: dict[str, Any]) -> tuple[int, dict[str, Any], bool]:
    """`(embed_dim, text_cfg, quick_gelu)` for open_clip from a `CLIPTextConfig` dict."""
    act = hf_config.get("hidden_act", "quick_gelu")
    if act not in ("quick_gelu", "gelu"):
        raise UnmappableTextEncoder(f"text_encoder: hidden_act {act!r} (open_clip's text tower has GELU or QuickGELU)")
    if abs(float(hf_config.get("layer_norm_eps", 1e-5)) - 1e-5) > 1e-12:
        raise UnmappableTextEncoder(f"text_encoder: layer_norm_eps {hf_config['layer_norm_eps']} (open_clip uses 1e-5)")
    width = int(hf_config["hidden_size"])
    text_cfg = {
        "context_length": int(hf_config["max_position_embeddings"]),
        "vocab_size": int(hf_config["vocab_size"]),
        "width": width,
        "heads": int(hf_config["num_attention_heads"]),
        "layers": int(hf_config["num_hidden_layers"]),
        "mlp_ratio": int(hf_config["intermediate_size"]) / width,
    }
    return int(hf_config["projection_dim"]), text_cfg, act == "quick_gelu"


def hf_text_config(embed_dim: int, text_cfg: dict[str, Any], quick_gelu: bool) -> dict[str, Any]:
    """The `CLIPTextConfig` dict (config.json of a `CLIPTextModelWithProjection`) of an
    open_clip text tower with OpenAI's tokenizer (start 49406, end 49407, which also pads)."""
    width = int(text_cfg["width"])
    return {
        "architectures": ["CLIPTextModelWithProjection"],
        "model_type": "clip_text_model",
        "vocab_size": int(text_cfg.get("vocab_size", 49408)),
        "hidden_size": width,
        "intermediate_size": int(round(width * float(text_cfg.get("mlp_ratio", 4.0)))),
        "projection_dim": int(embed_dim),
        "num_hidden_layers": int(text_cfg["layers"]),
        "num_attention_heads": int(text_cfg["heads"]),
        "max_position_embeddings": int(text_cfg.get("context_length", 77)),
        "hidden_act": "quick_gelu" if quick_gelu else "gelu",
        "layer_norm_eps": 1e-5,
        "attention_dropout": 0.0,
        "dropout": 0.0,
        "initializer_range": 0.02,
        "initializer_factor": 1.0,
        "bos_token_id": 49406,
        "eos_token_id": 49407,
        "pad_token_id": 49407,
        "torch_dtype": "float32",
    }


def _layer_keys(i: int) -> list[tuple[str, str]]:
    ours, theirs = f"transformer.resblocks.{i}.", f"{HF_PREFIX}encoder.layers.{i}."
    pairs = [("ln_1", "layer_norm1"), ("ln_2", "layer_norm2"), ("mlp.c_fc", "mlp.fc1"), ("mlp.c_proj", "mlp.fc2"), ("attn.out_proj", "self_attn.out_proj")]
    return [(f"{ours}{a}.{p}", f"{theirs}{b}.{p}") for a, b in pairs for p in ("weight", "bias")]


def _layers(state: dict[str, Tensor], prefix: str) -> int:
    return len({k[len(prefix):].split(".")[0] for k in state if k.startswith(prefix)})


def from_hf(hf_state: dict[str, Tensor]) -> dict[str, Tensor]:
    """open_clip text-tower state dict from a `CLIPTextModelWithProjection` state dict."""
    out = {
        "token_embedding.weight": hf_state[f"{HF_PREFIX}embeddings.token_embedding.weight"],
        "positional_embedding": hf_state[f"{HF_PREFIX}embeddings.position_embedding.weight"],
        "ln_final.weight": hf_state[f"{HF_PREFIX}final_layer_norm.weight"],
        "ln_final.bias": hf_state[f"{HF_PREFIX}final_layer_norm.bias"],
        "text_projection": hf_state["text_projection.weight"].t().contiguous(),
    }
    for i in range(_layers(hf_state, f"{HF_PREFIX}encoder.layers.")):
        out.update({ours: hf_state[theirs] for ours, theirs in _layer_keys(i)})
        attn = f"{HF_PREFIX}encoder.layers.{i}.self_attn."
        for p in ("weight", "bias"):
            out[f"transformer.resblocks.{i}.attn.in_proj_{p}"] = torch.cat([hf_state[f"{attn}{x}_proj.{p}"] for x in "qkv"])
    return out


def to_hf(state: dict[str, Tensor]) -> dict[str, Tensor]:
    """`CLIPTextModelWithProjection` state dict from open_clip text-tower keys (extra keys of
    a full CLIP, e.g. `visual.*`, are ignored)."""
    out = {
        f"{HF_PREFIX}embeddings.token_embedding.weight": state["token_embedding.weight"],
        f"{HF_PREFIX}embeddings.position_embedding.weight": state["positional_embedding"],
        f"{HF_PREFIX}final_layer_norm.weight": state["ln_final.weight"],
        f"{HF_PREFIX}final_layer_norm.bias": state["ln_final.bias"],
        "text_projection.weight": state["text_projection"].t().contiguous(),
    }
    for i in range(_layers(state, "transformer.resblocks.")):
        out.update({theirs: state[ours] for ours, theirs in _layer_keys(i)})
        attn = f"{HF_PREFIX}encoder.layers.{i}.self_attn."
        for p in ("weight", "bias"):
            for x, part in zip("qkv", state[f"transformer.resblocks.{i}.attn.in_proj_{p}"].chunk(3)):
                out[f"{attn}{x}_proj.{p}"] = part.contiguous()
    return out


def build_text_tower(hf_config: dict[str, Any], hf_state: dict[str, Tensor]) -> "torch.nn.Module":
    """open_clip's `TextTransformer` computing what the `CLIPTextModelWithProjection` of
    `hf_config` and `hf_state` computes (frozen, eval mode, returning pooled and per-token
    outputs); for encoding without the CLIP's image tower, e.g. the empty caption at import."""
    from open_clip.model import QuickGELU
    from open_clip.transformer import TextTransformer
    from torch import nn

    embed_dim, text_cfg, quick_gelu = open_clip_text_cfg(hf_config)
    tower = TextTransformer(
        context_length=text_cfg["context_length"],
        vocab_size=text_cfg["vocab_size"],
        width=text_cfg["width"],
        heads=text_cfg["heads"],
        layers=text_cfg["layers"],
        mlp_ratio=text_cfg["mlp_ratio"],
        output_dim=embed_dim,
        act_layer=QuickGELU if quick_gelu else nn.GELU,
        output_tokens=True,
    )
    tower.load_state_dict(from_hf(hf_state), strict=True)
    return tower.requires_grad_(False).eval()
