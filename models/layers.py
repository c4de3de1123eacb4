"""Small layers shared by the priors and the UNet."""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn


def timestep_embedding(t: Tensor, dim: int, max_period: float = 10000.0) -> Tensor:
    """Sinusoidal embedding of diffusion timesteps (Vaswani et al. 2017; as in ADM).

    `t`: `[batch]` integer (or float) timesteps. Returns float32 `[batch, dim]`: the first half
    cosines, the second half sines, of frequencies from 1 down to `1 / max_period`; an odd
    `dim` gets a trailing zero column.
    """
    if t.ndim != 1:
        raise ValueError(f"timestep_embedding: t must be 1-D [batch], got shape {tuple(t.shape)}")
    if dim < 1:
        raise ValueError(f"timestep_embedding: dim must be >= 1, got {dim}")
    half = dim // 2
    freqs = torch.exp(
        -math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t.device) / max(half, 1)
    )
    args = t.float()[:, None] * freqs[None, :]
    emb = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
    if dim % 2:
        emb = torch.cat([emb, torch.zeros_like(emb[:, :1])], dim=-1)
    return emb


class FullPrecisionBuffers(nn.Module):
    """A module whose buffers follow device moves but never dtype casts.

    `model.to(torch.bfloat16)` (as mixed-precision engines do) casts buffers too, which rounds
    tables that need every digit: quantile edges, a PCA basis, noise-schedule coefficients.
    Subclass this instead of `nn.Module` to keep them in the dtype they were created in.
    """

    def _apply(self, fn, recurse=True):
        originals = dict(self._buffers)
        super()._apply(fn, recurse)
        for name, old in originals.items():
            new = self._buffers[name]
            if old is not None and new is not None and new.dtype != old.dtype:
                self._buffers[name] = old.to(device=new.device)  # the move, from the unrounded original
        return self
