"""Synthetic batches for a job without a `data:` section: throughput checks, smoke tests.

Deterministic and resumable like the real loader: batch `i` of rank `r` is drawn from a
generator seeded by (seed, rank, i), so the loader's whole state is the next batch index.
The data has structure a model can learn (embeddings are a fixed random linear function of
the text embedding; images are smooth colour gradients), so the loss falls.
"""

from __future__ import annotations

from typing import Any, Iterator

import torch
import torch.nn.functional as F
from torch import Tensor


class SyntheticLoader:
    """Yields dict batches with the keys in `shapes`; `state_dict()`/`load_state_dict()` resume."""

    def __init__(self, shapes: dict[str, tuple[int, ...]], *, batch_size: int, rank: int, seed: int = 0) -> None:
        self.shapes = shapes
        self.batch_size = batch_size
        self.rank = rank
        self.seed = seed
        self.index = 0
        self.skipped: dict[str, int] = {}
        g = torch.Generator().manual_seed(seed)  # shared by all ranks: the "true" relation
        if "text_embed" in shapes:
            d = shapes["text_embed"][0]
            self._mix = torch.linalg.qr(torch.randn(d, d, generator=g))[0]

    def state_dict(self) -> dict[str, Any]:
        return {"kind": "synthetic", "index": self.index, "rank": self.rank}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.index = int(state["index"])

    def __iter__(self) -> Iterator[dict[str, Any]]:
        return self

    def __next__(self) -> dict[str, Any]:
        seed = ((self.seed * 1_000_003 + self.rank) * 1_000_033 + self.index) % (2**63)
        g = torch.Generator().manual_seed(seed)
        self.index += 1
        return self._batch(g)

    def _batch(self, g: torch.Generator) -> dict[str, Any]:
        b, out = self.batch_size, {}
        shapes = self.shapes
        if "text_embed" in shapes:
            text = F.normalize(torch.randn(b, *shapes["text_embed"], generator=g), dim=-1)
            out["text_embed"] = text
            out["image_embed"] = F.normalize(text @ self._mix + 0.1 * torch.randn(text.shape, generator=g), dim=-1)
        elif "image_embed" in shapes:
            out["image_embed"] = F.normalize(torch.randn(b, *shapes["image_embed"], generator=g), dim=-1)
        if "text_encodings" in shapes:
            length, width = shapes["text_encodings"]
            lengths = torch.randint(1, length + 1, (b,), generator=g)
            mask = torch.arange(length)[None] < lengths[:, None]
            out["text_mask"] = mask
            out["text_encodings"] = torch.randn(b, length, width, generator=g) * mask[..., None]
        if "image" in shapes:
            out["image"] = _gradients(b, shapes["image"], g)
        if "tokens" in shapes:
            (length,) = shapes["tokens"]
            tokens = torch.randint(1, 1000, (b, length), generator=g)
            tokens[:, length // 2 :] = 0
            out["tokens"] = tokens
        out["caption"] = [f"synthetic {self.rank}/{self.index}/{i}" for i in range(b)]
        return out


def _gradients(batch: int, shape: tuple[int, ...], g: torch.Generator) -> Tensor:
    """Smooth images in [-1, 1]: a random colour plus a random linear ramp."""
    channels, h, w = shape
    ys = torch.linspace(-1, 1, h).view(1, 1, h, 1)
    xs = torch.linspace(-1, 1, w).view(1, 1, 1, w)
    base = torch.rand(batch, channels, 1, 1, generator=g) * 1.2 - 0.6
    slope = torch.rand(batch, 2, 1, 1, generator=g) * 0.8 - 0.4
    return (base + slope[:, :1] * ys + slope[:, 1:] * xs).clamp(-1, 1)
