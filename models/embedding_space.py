"""Where the diffusion prior's diffusion runs: the map between CLIP image embeddings and the
prior's diffusion space, in both directions.

`unit` (the paper's way): unit-norm CLIP embeddings scaled by `scale` (the paper's 17.2, or
sqrt(D) so the entries have unit variance like the noise); samples are renormalised.
`raw` (Karlo's way): CLIP's unnormalised embeddings standardised per dimension by `clip_mean`
and `clip_std`, statistics of the training set's image embeddings; samples are mapped back,
not renormalised (the norm of a raw CLIP embedding carries information the decoder reads).
"""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor

from models.layers import FullPrecisionBuffers

ClipEmbeddings = Literal["unit", "raw"]


class EmbeddingSpace(FullPrecisionBuffers):
    """`to_diffusion(embeds [B, D]) -> [B, D]` and `from_diffusion` back. With `raw`, the
    statistics are persistent float32 buffers `clip_mean`, `clip_std` `[D]` (0 and 1 until
    `fit` or a load fills them)."""

    def __init__(self, embed_dim: int, kind: ClipEmbeddings = "unit", scale: float = 1.0) -> None:
        super().__init__()
        if kind not in ("unit", "raw"):
            raise ValueError(f"clip_embeddings must be 'unit' or 'raw', got {kind!r}")
        self.kind, self.scale = kind, float(scale)
        if kind == "raw":
            self.register_buffer("clip_mean", torch.zeros(embed_dim))
            self.register_buffer("clip_std", torch.ones(embed_dim))

    def to_diffusion(self, embeds: Tensor) -> Tensor:
        if self.kind == "unit":
            return embeds.float() * self.scale
        return (embeds.float() - self.clip_mean) / self.clip_std

    def from_diffusion(self, x: Tensor) -> Tensor:
        if self.kind == "unit":
            return F.normalize(x.float() / self.scale, dim=-1)
        return x.float() * self.clip_std + self.clip_mean

    @torch.no_grad()
    def fit(self, embeds: Tensor) -> None:
        """Per-dimension mean and standard deviation of raw image embeddings `[N, D]` (N >= 2)."""
        if self.kind != "raw":
            raise ValueError("EmbeddingSpace.fit: only raw embeddings are standardised")
        if embeds.ndim != 2 or embeds.shape[0] < 2 or embeds.shape[1] != self.clip_mean.shape[0]:
            raise ValueError(f"EmbeddingSpace.fit: need [N >= 2, {self.clip_mean.shape[0]}] embeddings, got {tuple(embeds.shape)}")
        embeds = embeds.double()
        self.clip_mean.copy_(embeds.mean(0))
        self.clip_std.copy_(embeds.std(0).clamp(min=1e-6))
