"""The priors: text -> CLIP image embedding (diffusion prior and autoregressive prior)."""

from __future__ import annotations

from typing import Literal, Optional

from pydantic import Field

from models.config import PositiveFloat, PositiveInt, Probability, config_dataclass
from models.diffusion import DiffusionConfig


def _prior_diffusion() -> DiffusionConfig:
    # The paper's prior predicts the clean embedding directly (x0), 1000 steps, 64 at sampling.
    return DiffusionConfig(timesteps=1000, schedule="cosine", objective="x0", sample_steps=64)


@config_dataclass
class DiffusionPriorConfig:
    """Causal transformer over [text encodings, text embed, time, noised image embed, query]."""

    kind: Literal["diffusion"] = "diffusion"
    embed_dim: PositiveInt = 512  # CLIP embedding size D
    text_width: PositiveInt = 512  # width W of CLIP's per-token text encodings
    max_text_len: PositiveInt = 77
    dim: PositiveInt = 512
    depth: PositiveInt = 6
    heads: PositiveInt = 8
    dim_head: PositiveInt = 64
    ff_mult: PositiveInt = 4
    dropout: Probability = 0.0
    use_text_encodings: bool = True
    text_encodings_drop: Probability = 0.5
    text_embed_drop: Probability = 0.1
    # CLIP embeddings are unit-norm; scaled by sqrt(embed_dim) (None) their entries have unit
    # variance like the noise they are mixed with.
    image_embed_scale: Optional[PositiveFloat] = None
    sample_candidates: PositiveInt = 2  # paper: draw 2, keep the one closest to the text embed
    diffusion: DiffusionConfig = Field(default_factory=_prior_diffusion)


@config_dataclass
class ARPriorConfig:
    """Decoder-only transformer over PCA-reduced, quantised image-embedding tokens."""

    kind: Literal["autoregressive"] = "autoregressive"
    embed_dim: PositiveInt = 512
    text_width: PositiveInt = 512
    max_text_len: PositiveInt = 77
    dim: PositiveInt = 512
    depth: PositiveInt = 6
    heads: PositiveInt = 8
    dim_head: PositiveInt = 64
    ff_mult: PositiveInt = 4
    dropout: Probability = 0.0
    pca_variance: Probability = 0.99  # keep the components holding this share of variance
    max_components: Optional[PositiveInt] = None
    num_buckets: PositiveInt = 1024
    dot_buckets: PositiveInt = 1024  # quantised "dot product with the text embedding" token
    text_drop: Probability = 0.5
