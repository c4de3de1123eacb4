"""Statistics of precomputed embeddings: mean norm and per-dimension mean and std.

`unclip precompute` keeps running fp64 sums per embedding shard (`NAME.tar.stats.npy`, so a
restarted job loses none and the merge is exact) and merges them into `EMB/stats.json`:

    {"count": N, "image_embed": {"mean_norm": float, "mean": [D], "std": [D]}, "text_embed": {...}}

A stage that asks for it (the diffusion prior's `image_embed_scale: stats`) scales by them.
"""

from __future__ import annotations

import io
import json
from typing import Optional

import numpy as np

from data_pipeline.io import atomic_write, exists, join_url, read_bytes

STATS = "stats.json"
FIELDS = ("image_embed", "text_embed")


class EmbedStats:
    """Running sums over rows of [B, D] embeddings (fp64): count, sum, sum of squares, norms."""

    def __init__(self, dim: int):
        self.count = 0
        self.sum, self.sum_sq, self.norm_sum = np.zeros(dim), np.zeros(dim), 0.0

    def add(self, rows: np.ndarray) -> None:
        rows = np.asarray(rows, np.float64).reshape(-1, self.sum.shape[0])
        self.count += rows.shape[0]
        self.sum += rows.sum(0)
        self.sum_sq += np.square(rows).sum(0)
        self.norm_sum += float(np.linalg.norm(rows, axis=1).sum())

    def merge(self, other: "EmbedStats") -> None:
        self.count += other.count
        self.sum, self.sum_sq, self.norm_sum = self.sum + other.sum, self.sum_sq + other.sum_sq, self.norm_sum + other.norm_sum

    def summary(self) -> dict:
        n = max(self.count, 1)
        mean = self.sum / n
        std = np.sqrt(np.maximum(self.sum_sq / n - np.square(mean), 0.0))
        return {"mean_norm": self.norm_sum / n, "mean": mean.tolist(), "std": std.tolist()}


def shard_stats_bytes(stats: dict[str, EmbedStats]) -> bytes:
    """One shard's sums as a .npy (deterministic bytes): row f = [count, norm sum, sum[D], sum_sq[D]]
    for the fields of FIELDS in order."""
    rows = [np.concatenate([[stats[f].count, stats[f].norm_sum], stats[f].sum, stats[f].sum_sq]) for f in FIELDS]
    buf = io.BytesIO()
    np.save(buf, np.stack(rows).astype(np.float64), allow_pickle=False)
    return buf.getvalue()


def shard_stats_from_bytes(data: bytes) -> dict[str, EmbedStats]:
    rows = np.load(io.BytesIO(data), allow_pickle=False)
    if rows.ndim != 2 or rows.shape[0] != len(FIELDS) or (rows.shape[1] - 2) % 2:
        raise ValueError(f"embedding statistics of shape {rows.shape}, expected [{len(FIELDS)}, 2 + 2D]")
    dim = (rows.shape[1] - 2) // 2
    out = {}
    for field, row in zip(FIELDS, rows):
        s = EmbedStats(dim)
        s.count, s.norm_sum, s.sum, s.sum_sq = int(row[0]), float(row[1]), row[2 : 2 + dim], row[2 + dim :]
        out[field] = s
    return out


def write_stats(folder: str, per_shard: list[dict[str, EmbedStats]]) -> dict:
    """Merge per-shard sums into `folder/stats.json`; returns what it wrote."""
    merged: dict[str, EmbedStats] = {}
    for shard in per_shard:
        for field, s in shard.items():
            if field in merged:
                merged[field].merge(s)
            else:
                merged[field] = s
    out = {"count": max((s.count for s in merged.values()), default=0),
           **{field: s.summary() for field, s in merged.items()}}
    with atomic_write(join_url(folder, STATS), "w") as f:
        json.dump(out, f)
    return out


def read_stats(folder: str) -> Optional[dict]:
    url = join_url(folder, STATS)
    if not exists(url):
        return None
    try:
        return json.loads(read_bytes(url))
    except ValueError as err:
        raise ValueError(f"{url}: not valid embedding statistics: {err}") from None
