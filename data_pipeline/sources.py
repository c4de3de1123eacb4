"""Resolving configured sources into readable units, and turning raw samples into examples.

A source is read in units (a tar shard, or a clip-retrieval part); `SourcePlan.read(unit,
start)` streams a unit's raw samples from position `start`. What a unit holds depends on
what the stage wants: images (+ joined embeddings) for the decoder, embedding shards alone
for the prior, which then never moves image bytes.
"""

from __future__ import annotations

import dataclasses
import itertools
import json
from typing import Any, Callable, Iterator, Optional

import numpy as np
import torch

from data_pipeline.config import DataConfig, SourceConfig
from data_pipeline.decode import (DEFAULT_MAX_CAPTION_BYTES, DEFAULT_MAX_IMAGE_PIXELS, Skip, decode_caption,
                                  decode_image_uint8, decode_npy, find_image)
from data_pipeline.embeddings import (IMG_EMB, TXT_EMB, TXT_ENC, EmbeddingManifest, NpyRows, clip_retrieval_parts,
                                      embedding_shard_url, iter_clip_retrieval, iter_joined, read_manifest)
from data_pipeline.io import exists, expand_urls, join_url, mask_url, read_bytes, url_dirname
from data_pipeline.shards import SIZES_MANIFEST
from data_pipeline.stats import SkipCounter
from data_pipeline.tario import RawSample, iter_tar
from models.images import from_uint8

FIELDS = frozenset({"image", "caption", "tokens", "image_embed", "text_embed", "text_encodings", "text_mask", "key"})
EMBED_FIELDS = frozenset({"image_embed", "text_embed", "text_encodings", "text_mask"})


@dataclasses.dataclass
class SourcePlan:
    """One source, resolved: its units and how to read them (picklable, for workers)."""

    index: int
    mode: str  # images | joined | embeddings | clip-retrieval
    units: list[str]
    weight: float
    root: str = ""  # embeddings folder (joined) or clip-retrieval root
    sizes: Optional[dict[str, int]] = None

    def read(self, unit: str, skips: SkipCounter, start: int = 0) -> Iterator[RawSample]:
        """Raw samples of `unit` from position `start` (positions count samples yielded)."""
        if self.mode == "clip-retrieval":
            yield from iter_clip_retrieval(self.root, unit, skips, start=start)
            return
        if self.mode == "joined":
            records = iter_joined(unit, self.root, skips)
        else:
            records = iter_tar(unit, skips)
        if start:
            skips.muted = True  # replaying up to a restored position: counted the first time
            try:
                for _ in itertools.islice(records, start):
                    pass
            finally:
                skips.muted = False
        yield from records

    def name(self) -> str:
        return f"data.sources[{self.index}]"


@dataclasses.dataclass
class ExampleSpec:
    """What to decode from each raw sample and how (picklable, for workers)."""

    want: frozenset
    image_size: Optional[int]
    embed_dim: Optional[int]
    text_width: Optional[int]
    context_length: Optional[int]
    max_caption_bytes: int = DEFAULT_MAX_CAPTION_BYTES
    max_image_pixels: int = DEFAULT_MAX_IMAGE_PIXELS


def plan_sources(cfg: DataConfig, want: frozenset) -> tuple[list[SourcePlan], ExampleSpec]:
    """Resolve every source for a stage that wants `want`; errors name the config key."""
    unknown = set(want) - FIELDS
    if unknown:
        raise ValueError(f"unknown field(s) {sorted(unknown)}; known: {sorted(FIELDS)}")
    plans, manifests = [], []
    for i, src in enumerate(cfg.sources):
        plan, manifest = _plan_one(i, src, want)
        plans.append(plan)
        manifests.append(manifest)
    dims = {(m.embed_dim, m.text_width, m.context_length) for m in manifests if m is not None}
    if len(dims) > 1 and want & EMBED_FIELDS:
        raise ValueError(f"data.sources: embeddings of different CLIP sizes (embed_dim, text_width, context): {sorted(dims)}")
    first = next((m for m in manifests if m is not None), None)
    spec = ExampleSpec(frozenset(want), cfg.image_size, first.embed_dim if first else None,
                       first.text_width if first else None, first.context_length if first else None)
    return plans, spec


def _plan_one(i: int, src: SourceConfig, want: frozenset) -> tuple[SourcePlan, Optional[EmbeddingManifest]]:
    key = f"data.sources[{i}]"
    if src.format == "clip-retrieval":
        root = src.shards if isinstance(src.shards, str) else src.shards[0]
        if want & {"image", "text_encodings"}:
            raise ValueError(f"{key}: a clip-retrieval folder has no {sorted(want & {'image', 'text_encodings'})}")
        parts = clip_retrieval_parts(root)
        first = NpyRows(join_url(root, f"img_emb/img_emb_{parts[0]}.npy"))
        first.close()
        manifest = EmbeddingManifest("clip-retrieval", None, first.dim, 0, 0, False)
        return SourcePlan(i, "clip-retrieval", parts, src.weight, root=root), manifest
    shards = expand_urls(src.shards)
    if not shards:
        raise ValueError(f"{key}.shards: no shard URLs in {src.shards!r}")
    needs_embeddings = bool(want & EMBED_FIELDS)
    if not needs_embeddings:
        return SourcePlan(i, "images", shards, src.weight, sizes=_sizes(shards)), None
    if src.embeddings is None:
        raise ValueError(f"{key}.embeddings: this stage needs {sorted(want & EMBED_FIELDS)}; "
                         f"set it to the folder written by `unclip precompute`")
    folder = src.embeddings if isinstance(src.embeddings, str) else src.embeddings[0]
    manifest = read_manifest(folder)
    if manifest is None:
        raise ValueError(f"{key}.embeddings: no embeddings.json in {mask_url(folder)} (run `unclip precompute`)")
    if "text_encodings" in want and not manifest.text_encodings:
        raise ValueError(f"{key}.embeddings: {mask_url(folder)} has no text encodings "
                         f"(precompute with text_encodings: true)")
    if "image" in want:
        return SourcePlan(i, "joined", shards, src.weight, root=folder, sizes=_sizes(shards)), manifest
    emb_shards = [embedding_shard_url(folder, s) for s in shards]
    return SourcePlan(i, "embeddings", emb_shards, src.weight, sizes=_sizes(emb_shards)), manifest


def _sizes(urls: list[str]) -> Optional[dict[str, int]]:
    """Sample counts from the `sizes.json` beside the shards; None where any is unknown."""
    sizes: dict[str, int] = {}
    for folder in dict.fromkeys(url_dirname(u) for u in urls):
        manifest = join_url(folder, SIZES_MANIFEST)
        try:
            if not exists(manifest):
                return None
            counts = json.loads(read_bytes(manifest))
        except (OSError, ValueError):
            return None
        sizes.update({join_url(folder, name): int(n) for name, n in counts.items()})
    if not all(u in sizes for u in urls):
        return None
    return {u: sizes[u] for u in urls}


def _array(fields: dict, names: tuple[str, ...]) -> Any:
    for name in names:
        if name in fields:
            return fields[name]
    return None


def to_example(raw: RawSample, spec: ExampleSpec) -> dict[str, Any]:
    """Decode the wanted fields of one raw sample; raises Skip(reason) on bad data."""
    fields, want = raw.fields, spec.want
    ex: dict[str, Any] = {"key": raw.key}
    if want & {"caption", "tokens"}:
        ex["caption"] = decode_caption(fields, spec.max_caption_bytes)
    if "image_embed" in want:
        arr = decode_npy(_array(fields, (IMG_EMB, "img_emb")), expect_dim=spec.embed_dim)
        ex["image_embed"] = torch.from_numpy(np.asarray(arr, np.float32).reshape(-1))
    if "text_embed" in want:
        arr = decode_npy(_array(fields, (TXT_EMB, "txt_emb")), expect_dim=spec.embed_dim)
        ex["text_embed"] = torch.from_numpy(np.asarray(arr, np.float32).reshape(-1))
    if "text_encodings" in want:
        enc = decode_npy(fields.get(TXT_ENC), expect_dim=spec.text_width)
        length = spec.context_length
        if enc.ndim != 2 or enc.shape[0] > length:
            raise Skip("embedding_dim_mismatch", f"text encodings {enc.shape}, context {length}")
        padded = np.zeros((length, enc.shape[1]), np.float32)
        padded[: enc.shape[0]] = enc
        ex["text_encodings"] = torch.from_numpy(padded)
        ex["text_mask"] = torch.arange(length) < enc.shape[0]
    if "image" in want:
        ex["image"] = decode_image_uint8(find_image(fields), spec.image_size, spec.max_image_pixels)
    return ex


def collate(examples: list[dict[str, Any]], tokenizer: Optional[Callable] = None) -> dict[str, Any]:
    """Stack tensors, keep strings as lists; tokenise captions when a tokenizer is given."""
    batch: dict[str, Any] = {}
    for name in examples[0]:
        values = [ex[name] for ex in examples]
        if name == "image":  # uint8 [H, W, 3] per sample; one conversion per batch is cheaper
            batch[name] = from_uint8(np.stack(values))
        elif isinstance(values[0], torch.Tensor):
            batch[name] = torch.stack(values)
        else:
            batch[name] = values
    if tokenizer is not None and "caption" in batch:
        batch["tokens"] = tokenizer(batch["caption"])
    return batch
