"""The prior stage: caption -> CLIP image embedding (unCLIP sec. 2.2).

Two kinds share the stage (`model.kind`): the diffusion prior and the autoregressive prior
(PCA codes); both read the caption's CLIP text embedding and, unless
`model.use_text_encodings` is false, its per-token encodings, and learn from precomputed
CLIP image embeddings. The autoregressive prior fits its PCA and buckets before training.
"""

from __future__ import annotations

import logging
from typing import Annotated, Any, Iterator, Literal, Optional, Union

import torch
from pydantic import Discriminator, Field, Tag
from torch import Tensor, nn

from models.clip import ClipConfig, ClipExpectation
from models.config import config_dataclass
from models.prior import ARPrior, ARPriorConfig, DiffusionPrior, DiffusionPriorConfig
from models.stages import Batch, StageContext, StageSpec
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
    """The autoregressive prior's PCA and buckets, fitted on the first training embeddings."""
    need = max(4 * model.cfg.embed_dim, 256)
    images, texts = [], []
    while sum(x.shape[0] for x in images) < need:
        batch = next(batches)
        images.append(batch["image_embed"].float())
        texts.append(batch["text_embed"].float())
    model.fit_pca(torch.cat(images)[:need], torch.cat(texts)[:need])


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


SPEC = StageSpec(
    name="prior", config=PriorStageConfig, build=build, loss=loss, fields=fields, field_shapes=field_shapes,
    role="prior", preparation=preparation, embeddings=embeddings,
)
