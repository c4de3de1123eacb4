"""The prior stage: caption -> CLIP image embedding (unCLIP sec. 2.2).

Two kinds share the stage (`model.kind`): the diffusion prior and the autoregressive prior
(PCA codes); both read the caption's CLIP text embedding and, unless
`model.use_text_encodings` is false, its per-token encodings, and learn from precomputed
CLIP image embeddings. The autoregressive prior fits its PCA and buckets before training.

Validation samples embeddings for held-out captions with the prior's own sampler (as the
pipeline would, at `validation.sample_steps` for the diffusion prior, one candidate) and
reports the cosines LAION's prior runs report. Sampling, not the x0 prediction at a fixed
timestep: the x0 prediction at one noise level is a regression to the conditional mean
(near t = T it scores well while samples may be poor), it says nothing about the sampler's
schedule and guidance, and the autoregressive prior has no timestep at all; what the decoder
receives is a sample, so that is what is scored.
"""

from __future__ import annotations

import logging
from typing import Annotated, Any, Iterator, Literal, Optional, Union

import torch
import torch.nn.functional as F
from pydantic import Discriminator, Field, Tag
from torch import Tensor, nn

from models.clip import ClipConfig, ClipExpectation
from models.config import ConfigError, config_dataclass
from models.prior import ARPrior, ARPriorConfig, DiffusionPrior, DiffusionPriorConfig
from models.stages import Batch, Measure, StageContext, StageSpec, Validation
from models.stages._clip_outputs import embedding_convention, fit_clip_statistics, in_order, set_null_caption
from models.stages._text import text_conditions

log = logging.getLogger("unclip.stages")


def _model_kind(value: Any) -> str:
    kind = value.get("kind", "diffusion") if isinstance(value, dict) else getattr(value, "kind", None)
    return f"kind={kind}"


PriorModelConfig = Annotated[
    Union[
        Annotated[DiffusionPriorConfig, Tag("kind=diffusion")],
        Annotated[ARPriorConfig, Tag("kind=autoregressive")],
    ],
    Discriminator(
        _model_kind,
        custom_error_type="invalid_kind",
        custom_error_message="model.kind must be 'diffusion' or 'autoregressive'",
    ),
]


@config_dataclass
class PriorStageConfig:
    stage: Literal["prior"] = "prior"
    model: PriorModelConfig = Field(default_factory=DiffusionPriorConfig)
    clip: ClipConfig = Field(default_factory=ClipConfig)  # the CLIP whose embeddings it learns

    def __post_init__(self) -> None:
        problem = embedding_convention(self)
        if problem:
            raise ValueError(problem)


def build(cfg: PriorStageConfig, *, activation_checkpointing: bool = False) -> nn.Module:
    if activation_checkpointing:
        log.warning("deepspeed.activation_checkpointing: the priors have no checkpointed blocks; training without it")
    return ARPrior(cfg.model) if cfg.model.kind == "autoregressive" else DiffusionPrior(cfg.model)


def loss(model: nn.Module, batch: Batch, generator: Optional[torch.Generator], ctx: StageContext) -> Tensor:
    return model.loss(batch["image_embed"], batch["text_embed"], **text_conditions(batch), generator=generator)


def fields(cfg: PriorStageConfig) -> frozenset[str]:
    text = {"text_encodings", "text_mask"} if cfg.model.use_text_encodings else set()
    return frozenset({"image_embed", "text_embed", *text})


def field_shapes(cfg: PriorStageConfig) -> dict[str, tuple[int, ...]]:
    m = cfg.model
    return {
        "image_embed": (m.embed_dim,),
        "text_embed": (m.embed_dim,),
        "text_encodings": (m.max_text_len, m.text_width),
        "text_mask": (m.max_text_len,),
    }


def embeddings(cfg: PriorStageConfig) -> ClipExpectation:
    m = cfg.model
    text = m.use_text_encodings
    return ClipExpectation(
        cfg.clip.name, cfg.clip.pretrained, m.embed_dim, m.text_width if text else None, m.max_text_len if text else None,
        wants_stats=getattr(m, "image_embed_scale", None) == "stats",
        where={"embed_dim": "model.embed_dim", "name": "clip.name", "pretrained": "clip.pretrained",
               "text_width": "model.text_width", "max_text_len": "model.max_text_len"},
    )


def fit_pca(model: nn.Module, batches: Iterator[Batch]) -> None:
    """The autoregressive prior's PCA and buckets, fitted on the first `model.fit_embeddings`
    training embeddings of one pass over the data (ConfigError when it holds fewer).

    Memory: the fitted image embeddings (N x D float32) and their dot products with the text
    embeddings (N); the PCA then works through them a chunk at a time (models/pca.py).
    """
    cfg = model.cfg
    need = cfg.fit_embeddings
    images = torch.empty(need, cfg.embed_dim)
    dots = torch.empty(need)
    have = 0
    for batch in batches:
        image = batch["image_embed"][: need - have].float()
        text = batch["text_embed"][: len(image)].float()
        images[have : have + len(image)] = image
        dots[have : have + len(image)] = (image * text).sum(-1)
        have += len(image)
        if have == need:
            break
    if have < need:
        buckets = max(cfg.num_buckets, cfg.dot_buckets)
        raise ConfigError(
            f"model.pca_fit_embeddings: the autoregressive prior fits its PCA and buckets on {need} training "
            f"embeddings, but data.sources holds {have}; add data or lower model.pca_fit_embeddings "
            f"(at least {buckets}, one per bucket)"
        )
    model.fit_pca(images, dots=dots)


def preparation_fields(cfg: PriorStageConfig) -> frozenset[str]:
    return frozenset({"image_embed", "text_embed"})


def preparation(cfg: PriorStageConfig):
    """The autoregressive prior's PCA fit; for the diffusion prior in Karlo's conventions, the
    raw embeddings' statistics and the empty caption's CLIP outputs."""
    if cfg.model.kind == "autoregressive":
        return fit_pca
    steps = []
    if cfg.model.clip_embeddings == "raw":
        steps.append(fit_clip_statistics)
    if cfg.model.null_text == "empty_caption":
        steps.append(set_null_caption(cfg.clip, lambda model: model.text.null_caption))
    return in_order(steps)


def validation_measure(cfg: PriorStageConfig, device: str, sample_steps: int) -> Measure:
    def measure(model: nn.Module, batch: Batch, generator: torch.Generator) -> dict[str, Tensor]:
        text_embed = batch["text_embed"]
        if cfg.model.kind == "diffusion":
            steps = min(sample_steps, cfg.model.diffusion.timesteps)
            sampled = model.sample(text_embed, **text_conditions(batch), steps=steps, candidates=1, generator=generator)
        else:
            sampled = model.sample(text_embed, **text_conditions(batch), generator=generator)
        return embedding_cosines(sampled, batch["image_embed"], text_embed)

    return measure


def embedding_cosines(sampled: Tensor, image_embed: Tensor, text_embed: Tensor) -> dict[str, Tensor]:
    """Per-caption cosines `[B]` of the sampled image embeddings `[B, D]` with the true image
    embeddings, the captions' text embeddings and another caption's (the next one in the
    batch; needs B > 1), and of the true image embedding with its caption (the reference)."""
    sampled, image, text = (F.normalize(x.float(), dim=-1) for x in (sampled, image_embed, text_embed))
    out = {
        "prior_image_cosine": (sampled * image).sum(-1),
        "prior_text_cosine": (sampled * text).sum(-1),
        "prior_reference_text_cosine": (image * text).sum(-1),
    }
    if len(text) > 1:
        out["prior_unrelated_text_cosine"] = (sampled * text.roll(1, dims=0)).sum(-1)
    return out


VALIDATION = Validation(
    metrics=(
        ("prior_image_cosine", "Cosine of sampled and true CLIP image embeddings of held-out captions (-1..1)."),
        ("prior_text_cosine", "Cosine of sampled image embeddings and their captions' CLIP text embeddings (-1..1)."),
        ("prior_unrelated_text_cosine", "Cosine of sampled image embeddings and another held-out caption's text embedding (-1..1)."),
        ("prior_reference_text_cosine", "Cosine of the true image embeddings and their captions' text embeddings: the data's own (-1..1)."),
    ),
    build=validation_measure,
    sample_batches=None,  # sampling an embedding is cheap: all held-out batches
)


SPEC = StageSpec(
    name="prior", config=PriorStageConfig, build=build, loss=loss, fields=fields, field_shapes=field_shapes,
    role="prior", preparation=preparation, preparation_fields=preparation_fields, embeddings=embeddings,
    validation=VALIDATION,
)
