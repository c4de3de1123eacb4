"""The one adapter over open_clip: load any architecture, encode text and images.

Every package that needs CLIP goes through `load_clip`, which returns a frozen `ClipAdapter`
in eval mode. The adapter speaks the project's conventions: images in [-1, 1] at any size,
unit-norm embeddings, and per-token text encodings with a padding mask (the prior and the
decoder condition on those). Pure PyTorch: open_clip reads its own config and vocabulary
files; nothing here opens a network connection or a file except a local weights file.

open_clip is imported on first use, inside the functions that need it: its import (through
torchvision, torch._dynamo and transformers) is ~10 s of CPU, more than torch and DeepSpeed
together, and every job's config names a `ClipConfig`, while the prior, decoder and upsampler
ranks never build a CLIP (they read precomputed embeddings).
"""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path
from typing import Literal, Optional, Sequence, Union

import torch
import torch.nn.functional as F
from torch import nn

from models.config import config_dataclass
from models.images import resize_center_crop_tensor


@config_dataclass
class ClipConfig:
    """`name`: an open_clip architecture (e.g. `ViT-L-14`) or a registered tiny one;
    `pretrained`: None (random weights), an open_clip pretrained tag, or a local file path;
    `embeddings`: `unit` (L2-normalised, the paper's convention) or `raw` (as CLIP's towers
    output them: Karlo's prior and decoder read these)."""

    name: str = "ViT-B-32"
    pretrained: Optional[str] = None
    embeddings: Literal["unit", "raw"] = "unit"


# Tiny architectures for tests and the demo, as open_clip model-config files in
# `models/clip_configs/` (registered with open_clip's public `add_model_config`):
# - `unclip-tiny`: CLIP's tokenizer (its 49408-row token table holds most of the ~3.3M
#   parameters) with towers of a few hundred K parameters, which train contrastively on
#   32 px coloured shapes in minutes on 2 CPU cores;
# - `unclip-demo`, the demo's CLIP: a small ModifiedResNet image tower (CLIP's RN50 design:
#   conv stem, four bottleneck stages, attention pooling) in place of the ViT. On 32 px
#   shapes the convolutions' locality learns shape and position within the demo's minute of
#   training: after 150 steps a linear probe on its image embeddings reads shape 95% and
#   position 100%, where the ViT reads 65% and 89% after 300. 16 tokens hold every demo
#   caption (at most 9 with the start and end tokens) at half the prior's sequence;
# - `unclip-tiny-77`: the tiny towers with 77 tokens like every published CLIP, to test
#   context-length handling.
# - `unclip-tiny-512`: ViT-B-32's embedding interface (512-d embeddings, text width 512, 77
#   tokens) on one-layer towers over 32 px images, for benchmarks/trainer_e2e.py: the sizes
#   benchmarks/specs.py matches against dalle2-pytorch need 512-wide embeddings and encodings;
# - `unclip-tiny-vit-h-14`: ViT-H-14's interface (1024-d embeddings, text width 1024, 77
#   tokens, 224 px input) on one-layer towers, so that the paper configs' chain runs in CI
#   (tests/test_paper_chain.py); the real ViT-H-14 at random init takes minutes per image on 2 CPU cores.
TINY_CONFIGS = Path(__file__).resolve().parent / "clip_configs"


def open_clip_module():
    """open_clip, imported on first use, with the tiny architectures registered (once)."""
    import open_clip

    if not set(tiny_architectures()) <= set(open_clip.list_models()):
        open_clip.add_model_config(TINY_CONFIGS)
    return open_clip


def tiny_architectures() -> list[str]:
    return sorted(p.stem for p in TINY_CONFIGS.glob("*.json"))


def architecture(name: str) -> dict:
    """open_clip's config of architecture `name` (`embed_dim`, `vision_cfg`, `text_cfg`)."""
    open_clip = open_clip_module()
    cfg = open_clip.get_model_config(name)
    if cfg is None:
        raise ValueError(f"clip.name: unknown open_clip architecture {name!r} (e.g. ViT-B-32, unclip-tiny)")
    return cfg


def build_open_clip(name: str) -> nn.Module:
    """A trainable open_clip model of architecture `name`, initialised from the caller's RNG."""
    open_clip = open_clip_module()
    architecture(name)
    return open_clip.create_model(name, pretrained=None)


@dataclasses.dataclass
class ClipExpectation:
    """The CLIP embeddings a stage reads, as its config states them (its spec's `embeddings`):
    the preflight compares them with what precompute recorded. `where` names the config keys."""

    name: Optional[str]
    pretrained: Optional[str]
    embed_dim: int
    text_width: Optional[int]  # None: the stage reads no per-token encodings
    max_text_len: Optional[int]
    wants_stats: bool = False
    where: dict[str, str] = dataclasses.field(default_factory=dict)  # field -> config key


def architecture_widths(name: str) -> Optional[tuple[int, int, int]]:
    """(embedding width D, text width W, context length L) of an open_clip architecture, from
    its config alone (no weights); None for a name open_clip has no config for."""
    open_clip = open_clip_module()
    cfg = open_clip.get_model_config(name)
    if not cfg:
        return None
    text = cfg.get("text_cfg", {})
    return int(cfg["embed_dim"]), int(text.get("width", 512)), int(text.get("context_length", 77))


TextInput = Union[Sequence[str], torch.Tensor]


class ClipAdapter(nn.Module):
    """A frozen open_clip model with the project's calling conventions.

    Attributes: `embed_dim` D, `text_width` W, `image_size` (pixels), `context_length` L,
    `mean`/`std` (CLIP's per-channel normalisation, tuples of 3), `model` (open_clip).
    """

    def __init__(self, model: nn.Module, tokenizer, name: str = "", normalize: bool = True):
        open_clip = open_clip_module()
        super().__init__()
        self.model = model
        self.name = name
        self.normalize = normalize
        self._tokenizer = tokenizer
        self.context_length = int(getattr(tokenizer, "context_length", None) or _text_tower(model).context_length)
        size = model.visual.image_size
        self.image_size = int(size[0] if isinstance(size, (tuple, list)) else size)
        self.mean = tuple(float(m) for m in model.visual.preprocess_cfg.get("mean", open_clip.OPENAI_DATASET_MEAN))
        self.std = tuple(float(s) for s in model.visual.preprocess_cfg.get("std", open_clip.OPENAI_DATASET_STD))
        self.register_buffer("_mean", torch.tensor(self.mean).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("_std", torch.tensor(self.std).view(1, 3, 1, 1), persistent=False)
        self.text_width = int(_text_tower(model).ln_final.normalized_shape[0])
        self.embed_dim = int(self._probe_embed_dim())
        self.requires_grad_(False)
        self.eval()

    def _probe_embed_dim(self) -> int:
        proj = getattr(_text_tower(self.model), "text_projection", None)
        if isinstance(proj, nn.Linear):
            return proj.out_features
        if isinstance(proj, torch.Tensor):
            return proj.shape[-1]
        return self.text_width

    def train(self, mode: bool = True) -> "ClipAdapter":
        # Frozen: a parent module's .train() must not switch dropout etc. back on.
        return super().train(False)

    @property
    def tokenizer(self):
        """open_clip's tokenizer (picklable, holds no weights): `tokenizer(texts, context_length=L)`."""
        return self._tokenizer

    @property
    def device(self) -> torch.device:
        return self._mean.device

    def tokenize(self, texts: Sequence[str]) -> torch.Tensor:
        """Tokenise captions (truncated to the context length): LongTensor [batch, context_length]."""
        if isinstance(texts, str):
            raise TypeError("tokenize expects a list of strings, got a single str")
        return self._tokenizer(list(texts), context_length=self.context_length)

    @torch.no_grad()
    def encode_text(self, texts: TextInput) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Encode captions or tokens [batch, L].

        Returns `text_embed` [batch, D] (unit norm unless built with `normalize=False`),
        `text_encodings` [batch, L, W] (the text transformer's per-token outputs after
        ln_final, before pooling/projection, zero at padding) and `text_mask` [batch, L] bool
        (True at real tokens).
        """
        tokens = texts if isinstance(texts, torch.Tensor) else self.tokenize(texts)
        if tokens.ndim != 2:
            raise ValueError(f"encode_text expects tokens [batch, length], got shape {tuple(tokens.shape)}")
        embed, encodings, mask = encode_tokens(self.model, _text_tower(self.model), tokens.to(self.device, torch.long))
        return (F.normalize(embed, dim=-1) if self.normalize else embed), encodings, mask

    @torch.no_grad()
    def encode_image(self, images: torch.Tensor) -> torch.Tensor:
        """Encode images [batch, 3, H, W] in [-1, 1]: unit-norm `image_embed` [batch, D].

        Images of another size go through the project's one crop policy to `image_size`
        (`models.images.resize_center_crop_tensor`: shorter side scaled, centre square, as the
        precompute's); CLIP's mean/std normalisation is applied here, so callers never see it.
        """
        if images.ndim != 4 or images.shape[1] != 3:
            raise ValueError(f"encode_image expects images [batch, 3, H, W], got shape {tuple(images.shape)}")
        x = resize_center_crop_tensor(images.to(self.device, torch.float32), self.image_size)
        x = ((x + 1) / 2 - self._mean) / self._std
        embed = self.model.encode_image(x).float()
        return F.normalize(embed, dim=-1) if self.normalize else embed


@torch.no_grad()
def encode_tokens(model: Optional[nn.Module], tower: nn.Module, tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Raw (unnormalised) `text_embed` [B, D], `text_encodings` [B, L, W] zeroed at padding
    and `text_mask` [B, L] of open_clip `tokens` (0 pads) through `tower` (a CLIP's text
    tower: the CLIP `model` itself or its `.text`, or a standalone `TextTransformer` with
    `model=None`)."""
    embed, encodings = _text_forward(model, tower, tokens)
    mask = tokens != 0
    return embed.float(), encodings.masked_fill(~mask[..., None], 0.0).float(), mask


def _text_tower(model: nn.Module) -> nn.Module:
    """The module holding ln_final/context_length: the CLIP itself or its `.text` tower."""
    return model if hasattr(model, "ln_final") else model.text


def _text_forward(model: nn.Module, tower: nn.Module, tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(pooled projected embedding [B, D], per-token encodings [B, L, W]) in one pass."""
    open_clip = open_clip_module()
    if tower is model:  # open_clip's CLIP class keeps the text tower's parts on the model
        cast = model.transformer.get_cast_dtype()
        x = model.token_embedding(tokens).to(cast) + model.positional_embedding.to(cast)
        x = model.ln_final(model.transformer(x, attn_mask=model.attn_mask))
        pooled = open_clip.transformer.text_global_pool(
            x, tokens, model.text_pool_type, eos_token_id=getattr(model, "text_eos_id", None)
        )
        proj = model.text_projection
        if proj is not None:
            pooled = proj(pooled) if isinstance(proj, nn.Linear) else pooled @ proj
        return pooled, x
    if not hasattr(tower, "output_tokens"):
        raise ValueError(f"text tower {type(tower).__name__} cannot return per-token encodings")
    previous = tower.output_tokens
    tower.output_tokens = True
    try:
        pooled, x = tower(tokens)
    finally:
        tower.output_tokens = previous
    return pooled, x


def _resolve_pretrained(name: str, pretrained: Optional[str]) -> Optional[str]:
    """Check `pretrained` up front so a typo fails with a message, not a download attempt."""
    open_clip = open_clip_module()
    if pretrained is None or pretrained == "":
        return None
    looks_like_path = os.sep in pretrained or pretrained.endswith((".pt", ".pth", ".bin", ".safetensors"))
    if looks_like_path:
        if not os.path.isfile(pretrained):
            raise FileNotFoundError(f"clip.pretrained: weights file {pretrained!r} does not exist")
        return pretrained
    tags = open_clip.list_pretrained_tags_by_model(name)
    if pretrained not in tags:
        raise ValueError(f"clip.pretrained: {pretrained!r} is neither a file nor a pretrained tag of {name!r} (tags: {tags})")
    return pretrained


def load_clip(
    name: str, pretrained: Optional[str] = None, device: Union[str, torch.device] = "cpu", normalize: bool = True
) -> ClipAdapter:
    """Build open_clip architecture `name`, frozen and in eval mode (`normalize`: unit-norm
    embeddings out, else raw).

    `pretrained`: None (random init, seeded so that every process builds the same model), an open_clip pretrained tag (needs the
    hub or its cache), or a local .pt/.pth/.bin/.safetensors file (loaded with
    weights_only=True).
    """
    open_clip = open_clip_module()
    if name not in open_clip.list_models():
        raise ValueError(f"clip.name: unknown open_clip architecture {name!r} (e.g. ViT-B-32, unclip-tiny)")
    pretrained = _resolve_pretrained(name, pretrained)
    # Random weights are seeded: every rank of a job (and every restart) must embed with the
    # same frozen model, and the caller's RNG stream must not move.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = open_clip.create_model(name, pretrained=pretrained, device=device, weights_only=True, pretrained_text=False)
    tokenizer = open_clip.get_tokenizer(name)
    return ClipAdapter(model, tokenizer, name=name, normalize=normalize).to(device)


def load_clip_from_config(cfg: ClipConfig, device: Union[str, torch.device] = "cpu") -> ClipAdapter:
    """`load_clip(cfg.name, cfg.pretrained, device)`, with `cfg.embeddings` unit or raw."""
    return load_clip(cfg.name, cfg.pretrained, device=device, normalize=cfg.embeddings == "unit")
