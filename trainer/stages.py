"""Stage name -> (build the model, batch -> loss). Everything else is the shared loop.

A stage says which batch keys it needs (`wants`, what the data loader must produce), how to
build its model from the job, and how to turn a batch into a scalar loss. The engine wraps
the model in `StageModule`, whose forward is that loss, so DeepSpeed (and ZeRO-3's parameter
gathering hooks) sees one ordinary module call per micro-batch.
"""

from __future__ import annotations

import dataclasses
import logging
from typing import Any, Callable, Optional

import torch
from torch import Tensor, nn

Batch = dict[str, Any]
log = logging.getLogger("unclip.train")


@dataclasses.dataclass(frozen=True)
class Stage:
    name: str
    build: Callable[[Any], nn.Module]  # job -> model (models/, pure PyTorch)
    loss: Callable[[nn.Module, Batch, torch.Generator, "StageContext"], Tensor]
    wants: Callable[[Any], frozenset[str]]  # job -> batch keys the loss reads
    batch_shapes: Callable[[Any], dict[str, tuple[int, ...]]]  # job -> per-sample shapes (synthetic data)


@dataclasses.dataclass(frozen=True)
class StageContext:
    rank: int = 0
    world_size: int = 1


class StageModule(nn.Module):
    """The stage's model with `forward(batch) -> loss`, as DeepSpeed wraps and calls it."""

    def __init__(self, stage: Stage, model: nn.Module, context: StageContext) -> None:
        super().__init__()
        # DeepSpeed cannot broadcast 0-dim parameters (e.g. CLIP's logit_scale): train them as
        # shape [1] and record the model's own shape for export.
        self.original_shapes: dict[str, tuple[int, ...]] = {}
        for name, p in model.named_parameters():
            if p.ndim == 0:
                self.original_shapes[f"model.{name}"] = ()
                p.data = p.data.reshape(1)
        self.model = model
        self._stage = stage
        self._context = context
        self.generator = torch.Generator()  # the stage's randomness (t, noise, CFG drops); checkpointed

    def forward(self, batch: Batch) -> Tensor:
        return self._stage.loss(self.model, batch, self.generator, self._context)


def _text_cond(batch: Batch, use: bool) -> dict[str, Optional[Tensor]]:
    if not use:
        return {"text_encodings": None, "text_mask": None}
    return {"text_encodings": batch["text_encodings"], "text_mask": batch["text_mask"].bool()}


# ---------------------------------------------------------------- prior
def _build_prior(job: Any) -> nn.Module:
    from models.prior import ARPrior, DiffusionPrior

    if job.deepspeed.activation_checkpointing:
        log.warning("deepspeed.activation_checkpointing: the priors have no checkpointed blocks; training without it")

    return ARPrior(job.model) if job.model.kind == "autoregressive" else DiffusionPrior(job.model)


def _prior_uses_text(job: Any) -> bool:
    return bool(getattr(job.model, "use_text_encodings", True))


def _prior_loss(model: nn.Module, batch: Batch, generator: torch.Generator, ctx: StageContext) -> Tensor:
    use_text = "text_encodings" in batch
    return model.loss(batch["image_embed"], batch["text_embed"], **_text_cond(batch, use_text), generator=generator)


def _prior_wants(job: Any) -> frozenset[str]:
    base = {"image_embed", "text_embed"}
    return frozenset(base | ({"text_encodings", "text_mask"} if _prior_uses_text(job) else set()))


def _prior_shapes(job: Any) -> dict[str, tuple[int, ...]]:
    m = job.model
    return {
        "image_embed": (m.embed_dim,),
        "text_embed": (m.embed_dim,),
        "text_encodings": (m.max_text_len, m.text_width),
        "text_mask": (m.max_text_len,),
    }


# ---------------------------------------------------------------- decoder
def _build_decoder(job: Any) -> nn.Module:
    from models.decoder import Decoder

    return Decoder(_with_activation_checkpointing(job))


def _decoder_loss(model: nn.Module, batch: Batch, generator: torch.Generator, ctx: StageContext) -> Tensor:
    use_text = "text_encodings" in batch
    return model.loss(batch["image"], batch["image_embed"], **_text_cond(batch, use_text), generator=generator)


def _decoder_wants(job: Any) -> frozenset[str]:
    base = {"image", "image_embed"}
    return frozenset(base | ({"text_encodings", "text_mask"} if job.model.use_text_encodings else set()))


def _decoder_shapes(job: Any) -> dict[str, tuple[int, ...]]:
    m = job.model
    return {
        "image": (m.channels, m.image_size, m.image_size),
        "image_embed": (m.image_embed_dim,),
        "text_encodings": (m.max_text_len, m.text_width),
        "text_mask": (m.max_text_len,),
    }


# ---------------------------------------------------------------- upsampler
def _build_upsampler(job: Any) -> nn.Module:
    from models.decoder import Upsampler

    return Upsampler(_with_activation_checkpointing(job))


def _upsampler_loss(model: nn.Module, batch: Batch, generator: torch.Generator, ctx: StageContext) -> Tensor:
    return model.loss(batch["image"], generator=generator)


def _upsampler_shapes(job: Any) -> dict[str, tuple[int, ...]]:
    m = job.model
    return {"image": (m.channels, m.image_size, m.image_size)}


def _with_activation_checkpointing(job: Any) -> Any:
    """The model config, with the UNet's activation checkpointing on when the job asks for it."""
    cfg = job.model
    if job.deepspeed.activation_checkpointing and not cfg.unet.gradient_checkpointing:
        cfg = dataclasses.replace(cfg, unet=dataclasses.replace(cfg.unet, gradient_checkpointing=True))
    return cfg


# ---------------------------------------------------------------- clip (demo: contrastive CLIP)
def _build_clip(job: Any) -> nn.Module:
    import open_clip

    import models.clip  # noqa: F401  (registers the tiny architectures)

    model = open_clip.create_model(job.model.name, pretrained=None)
    if job.deepspeed.activation_checkpointing:
        model.set_grad_checkpointing(True)
    return model


def clip_normalize(model: nn.Module, images: Tensor) -> Tensor:
    """Images in [-1, 1] -> CLIP's input normalisation (its mean/std)."""
    cfg = model.visual.preprocess_cfg
    mean = torch.tensor(cfg["mean"], device=images.device).view(1, 3, 1, 1)
    std = torch.tensor(cfg["std"], device=images.device).view(1, 3, 1, 1)
    return ((images.float() + 1) / 2 - mean) / std


def _clip_loss(model: nn.Module, batch: Batch, generator: torch.Generator, ctx: StageContext) -> Tensor:
    from open_clip.loss import ClipLoss

    out = model(clip_normalize(model, batch["image"]), batch["tokens"].long())
    if isinstance(out, dict):
        image_features, text_features, logit_scale = out["image_features"], out["text_features"], out["logit_scale"]
    else:
        image_features, text_features, logit_scale = out[:3]
    # gather_with_grad: every rank's loss sees the whole job's batch as negatives.
    loss = ClipLoss(gather_with_grad=True, rank=ctx.rank, world_size=ctx.world_size)
    return loss(image_features, text_features, logit_scale)


def _clip_shapes(job: Any) -> dict[str, tuple[int, ...]]:
    from open_clip import get_model_config

    import models.clip  # noqa: F401

    cfg = get_model_config(job.model.name)
    size = cfg["vision_cfg"]["image_size"]
    size = size[0] if isinstance(size, (list, tuple)) else size
    return {"image": (3, size, size), "tokens": (cfg["text_cfg"].get("context_length", 77),)}


STAGES: dict[str, Stage] = {
    "prior": Stage("prior", _build_prior, _prior_loss, _prior_wants, _prior_shapes),
    "decoder": Stage("decoder", _build_decoder, _decoder_loss, _decoder_wants, _decoder_shapes),
    "upsampler": Stage("upsampler", _build_upsampler, _upsampler_loss, lambda job: frozenset({"image"}), _upsampler_shapes),
    "clip": Stage("clip", _build_clip, _clip_loss, lambda job: frozenset({"image", "tokens"}), _clip_shapes),
}


def get_stage(name: str) -> Stage:
    if name not in STAGES:
        raise ValueError(f"stage: expected one of {', '.join(sorted(STAGES))} (got {name!r})")
    return STAGES[name]
