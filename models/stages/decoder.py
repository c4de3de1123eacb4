"""The decoder stage: CLIP image embedding (+ caption) -> image (unCLIP sec. 2.1).

It learns from images with their precomputed CLIP image embeddings and, unless
`model.use_text_encodings` is false, the caption's per-token CLIP text encodings; with
`model.use_text_embed` (Karlo's decoder) also the caption's CLIP text embedding. Its sample
grid decodes the embeddings of real images: the first row shows those images, the second
what the decoder makes of their embeddings.

Validation can score decoded held-out embeddings with the job's frozen CLIP (`clip:`, the
one that made the embeddings): the CLIP score against the captions, and the cosine with the
embedding decoded. It loads that CLIP beside the decoder and samples, so it is off unless
`validation.sample_batches` is set.
"""

from __future__ import annotations

import dataclasses
from typing import Literal, Optional

import torch
import torch.nn.functional as F
from pydantic import Field
from torch import Tensor, nn

from models.clip import ClipConfig, ClipExpectation, load_clip_from_config
from models.config import config_dataclass
from models.decoder import Decoder, DecoderConfig
from models.stages import Batch, Measure, StageContext, StageSpec, Validation
from models.stages._clip_outputs import embedding_convention, in_order, set_null_caption
from models.stages._text import text_conditions


@config_dataclass
class DecoderStageConfig:
    stage: Literal["decoder"] = "decoder"
    model: DecoderConfig = Field(default_factory=DecoderConfig)
    clip: ClipConfig = Field(default_factory=ClipConfig)  # the CLIP whose embeddings it decodes

    def __post_init__(self) -> None:
        problem = embedding_convention(self)
        if problem:
            raise ValueError(problem)


def build(cfg: DecoderStageConfig, *, activation_checkpointing: bool = False) -> nn.Module:
    model = cfg.model
    if activation_checkpointing and not model.unet.gradient_checkpointing:
        model = dataclasses.replace(model, unet=dataclasses.replace(model.unet, gradient_checkpointing=True))
    return Decoder(model)


def _conditions(batch: Batch) -> dict[str, Optional[Tensor]]:
    """The caption's conditions the batch carries: encodings and mask, and `text_embed`
    (present when the decoder reads it)."""
    return {**text_conditions(batch), "text_embed": batch.get("text_embed")}


def loss(model: nn.Module, batch: Batch, generator: Optional[torch.Generator], ctx: StageContext) -> Tensor:
    return model.loss(batch["image"], batch["image_embed"], **_conditions(batch), generator=generator)


def fields(cfg: DecoderStageConfig) -> frozenset[str]:
    text = {"text_encodings", "text_mask"} if cfg.model.use_text_encodings else set()
    embed = {"text_embed"} if cfg.model.use_text_embed else set()
    return frozenset({"image", "image_embed", *text, *embed})


def field_shapes(cfg: DecoderStageConfig) -> dict[str, tuple[int, ...]]:
    m = cfg.model
    return {
        "image": (m.channels, m.image_size, m.image_size),
        "image_embed": (m.image_embed_dim,),
        "text_embed": (m.image_embed_dim,),
        "text_encodings": (m.max_text_len, m.text_width),
        "text_mask": (m.max_text_len,),
    }


def embeddings(cfg: DecoderStageConfig) -> ClipExpectation:
    m = cfg.model
    text = m.use_text_encodings
    return ClipExpectation(
        cfg.clip.name, cfg.clip.pretrained, m.image_embed_dim, m.text_width if text else None,
        m.max_text_len if text else None,
        where={"embed_dim": "model.image_embed_dim", "name": "clip.name", "pretrained": "clip.pretrained",
               "text_width": "model.text_width", "max_text_len": "model.max_text_len"},
    )


def sample_grid(model: nn.Module, batch: Batch, generator: torch.Generator) -> list[Tensor]:
    """The real images, then the decoder's samples from their CLIP image embeddings."""
    samples = model.sample(batch["image_embed"], **_conditions(batch), generator=generator)
    return [batch["image"], samples]


def preparation(cfg: DecoderStageConfig):
    """With `null_text: empty_caption`, the empty caption's CLIP outputs (Karlo's null text)."""
    if cfg.model.null_text != "empty_caption":
        return None
    return in_order([set_null_caption(cfg.clip, lambda model: model.null_caption)])


def validation_measure(cfg: DecoderStageConfig, device: str, sample_steps: int) -> Measure:
    clip = load_clip_from_config(cfg.clip, device=device)
    if clip.embed_dim != cfg.model.image_embed_dim:
        raise ValueError(
            f"clip: {cfg.clip.name} embeds to {clip.embed_dim} dimensions, model.image_embed_dim is "
            f"{cfg.model.image_embed_dim}: the validation CLIP score needs the CLIP that made the embeddings"
        )
    steps = min(sample_steps, cfg.model.diffusion.timesteps)

    def measure(model: nn.Module, batch: Batch, generator: torch.Generator) -> dict[str, Tensor]:
        samples = model.sample(batch["image_embed"], **text_conditions(batch), steps=steps, generator=generator)
        return clip_scores(clip.encode_image(samples), clip.encode_image(batch["image"]), batch["image_embed"], batch["text_embed"])

    return measure


def clip_scores(sampled: Tensor, real: Tensor, image_embed: Tensor, text_embed: Tensor) -> dict[str, Tensor]:
    """Per-item scores `[B]` from CLIP image embeddings `[B, D]` of the decoder's samples and
    of the real held-out images (both through the same resize), the embeddings decoded and the
    captions' text embeddings. CLIP score = max(cosine with the caption, 0) (Hessel et al.
    2021, without the x100 of display)."""
    sampled, real, image, text = (F.normalize(x.float(), dim=-1) for x in (sampled, real, image_embed, text_embed))
    return {
        "decoder_clip_score": (sampled * text).sum(-1).clamp(min=0),
        "decoder_reference_clip_score": (real * text).sum(-1).clamp(min=0),
        "decoder_image_cosine": (sampled * image).sum(-1),
    }


VALIDATION = Validation(
    metrics=(
        ("decoder_clip_score", "CLIP score of decoded held-out embeddings: max(cosine with the caption, 0), 0..1."),
        ("decoder_reference_clip_score", "CLIP score of the real held-out images at the decoder's resolution, 0..1."),
        ("decoder_image_cosine", "Cosine of the CLIP embedding of each decoded image and the embedding it decoded (-1..1)."),
    ),
    build=validation_measure,
    field_shapes=lambda cfg: {"text_embed": (cfg.model.image_embed_dim,)},
    sample_batches=0,  # loads the frozen CLIP beside the decoder: on request only
)


SPEC = StageSpec(
    name="decoder", config=DecoderStageConfig, build=build, loss=loss, fields=fields, field_shapes=field_shapes,
    role="decoder", sample_grid=sample_grid, embeddings=embeddings, preparation=preparation, validation=VALIDATION,
)
