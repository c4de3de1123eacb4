"""`unclip precompute`: CLIP embeddings for every image shard, aligned by key.

For each input shard `.../NAME.tar` this writes `OUT/NAME.tar` (see data_pipeline.embeddings
for the layout) in the input's sample order, so readers join the two by key with no
re-ordering job. Shards are split across ranks (`rank::world_size`; the caller says which rank this is: see
`launch/precompute_cmd.py`) and, within a rank,
across loader workers; every shard is written under a temporary name and renamed when
complete, with a sidecar `NAME.tar.json` (count, skips). A restarted job skips the shards
already renamed into place, so a killed job loses at most the shards in flight, and the
outputs are byte-identical to an uninterrupted run's.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import logging
import os
import time
from typing import Any, Callable, Iterator, Optional

import numpy as np
import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from data_pipeline.config import PrecomputeConfig
from data_pipeline.decode import Skip, decode_caption, find_image, image_to_uint8, open_image
from data_pipeline.embed_stats import EmbedStats, shard_stats_bytes, shard_stats_from_bytes, write_stats
from data_pipeline.embeddings import SHARD_INDEX, EmbeddingManifest, embedding_fields, embedding_shard_url, read_manifest, write_manifest
from data_pipeline.io import (atomic_write, exists, expand_urls, join_url, list_dir, makedirs, mask_url, read_bytes, remove,
                              set_storage_options, size_of, url_basename, url_dirname)
from data_pipeline.manifests import count_shards
from data_pipeline.shards import SIZES_MANIFEST
from data_pipeline.stats import SkipCounter
from data_pipeline.stream import keep_batch
from data_pipeline.tario import TarWriter, iter_tar
from models.clip import ClipAdapter, load_clip_from_config
from models.images import from_uint8, resize_center_crop  # the crop policy sampling inputs follow too

log = logging.getLogger(__name__)


@dataclasses.dataclass
class PrecomputeSummary:
    """This rank's work: shards written now, shards found done, samples, skips, time."""

    rank: int
    world_size: int
    shards_assigned: int
    shards_written: int
    shards_already_done: int
    samples: int
    skipped: dict[str, int]
    seconds: float
    inputs: str = ""  # what the inputs' manifests say (sizes.json, img2dataset's failed downloads)

    @property
    def samples_per_second(self) -> float:
        return self.samples / self.seconds if self.seconds > 0 else 0.0

    def summary(self) -> str:
        skipped = ", ".join(f"{k}={v}" for k, v in self.skipped.items()) or "none"
        inputs = f"; inputs: {self.inputs}" if self.inputs else ""
        return (f"rank {self.rank}/{self.world_size}: {self.shards_written} shard(s) written, "
                f"{self.shards_already_done} already done, {self.samples} samples in {self.seconds:.1f}s "
                f"({self.samples_per_second:.1f} samples/s); skipped: {skipped}{inputs}")


def _process_group_rank() -> tuple[int, int]:
    """(rank, world size) of an initialised torch.distributed group, else (0, 1)."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    return 0, 1


class _ShardBatches(IterableDataset):
    """Worker side: decode whole shards into batches; a final item per shard carries its skips."""

    def __init__(self, shards: list[str], batch_size: int, image_size: int, tokenize: Callable):
        super().__init__()
        self.shards, self.batch_size, self.image_size, self.tokenize = shards, batch_size, image_size, tokenize

    def __iter__(self) -> Iterator[dict[str, Any]]:
        info = get_worker_info()
        worker, workers = (info.id, info.num_workers) if info is not None else (0, 1)
        for shard in self.shards[worker::workers]:
            skips = SkipCounter()
            keys, images, captions = [], [], []
            first_key = None
            for raw in iter_tar(shard, skips):
                first_key = raw.key if first_key is None else first_key
                try:
                    caption = decode_caption(raw.fields)
                    img = resize_center_crop(open_image(find_image(raw.fields), draft_size=self.image_size), self.image_size)
                except Skip as skip:
                    skips.skip(skip.reason, f"{raw.key!r} in {mask_url(shard)}")
                    continue
                keys.append(raw.key)
                images.append(image_to_uint8(img))
                captions.append(caption)
                if len(keys) == self.batch_size:
                    yield self._batch(shard, keys, images, captions)
                    keys, images, captions = [], [], []
            if keys:
                yield self._batch(shard, keys, images, captions)
            yield {"shard": shard, "final": True, "skipped": skips.as_dict(), "source_bytes": _size_or_none(shard),
                   "source_first_key": first_key}

    def _batch(self, shard: str, keys: list, images: list, captions: list) -> dict[str, Any]:
        return {"shard": shard, "final": False, "key": keys, "image": torch.from_numpy(np.stack(images)), "caption": captions,
                "tokens": self.tokenize(captions)}


def _size_or_none(url: str) -> Optional[int]:
    try:
        return size_of(url)
    except OSError:
        return None


def _manifest(cfg: PrecomputeConfig, clip: ClipAdapter) -> EmbeddingManifest:
    return EmbeddingManifest(cfg.clip.name, cfg.clip.pretrained, clip.embed_dim, clip.text_width,
                             clip.context_length, cfg.text_encodings, cfg.clip.embeddings)


def _use_storage_options(cfg: PrecomputeConfig, urls: list[str], out: str) -> None:
    """The config's storage options for the input shards' folders and for `out`."""
    for folder in dict.fromkeys(url_dirname(u) for u in urls):
        set_storage_options(folder, cfg.storage_options)
    set_storage_options(out, cfg.storage_options if cfg.out_storage_options is None else cfg.out_storage_options)


def _check_manifest(out: str, manifest: EmbeddingManifest) -> None:
    existing = read_manifest(out)
    if existing is not None and existing != manifest:
        raise ValueError(f"out: {mask_url(out)} already holds embeddings of another setup ({existing}); "
                         f"this job would write {manifest}. Use a new folder.")
    if existing is None:
        write_manifest(out, manifest)


def _remove_stale_temporaries(out: str, names: set[str]) -> None:
    """Temporaries left by a killed run for shards this run redoes (never anyone else's)."""
    for entry in list_dir(out):
        base, sep, _ = entry.partition(".tmp-")
        if sep and base in names:
            remove(join_url(out, entry))


def merge_sizes(out: str) -> dict[str, int]:
    """Write `OUT/sizes.json`, `OUT/shards.json` (every sidecar) and `OUT/stats.json` (the
    embedding statistics) from the per-shard files present now; returns the sizes."""
    index, stats = {}, []
    entries = set(list_dir(out))
    for entry in sorted(entries):
        name = entry[: -len(".json")]
        if entry.endswith(".tar.json") and name in entries:
            index[name] = json.loads(read_bytes(join_url(out, entry)))
            if f"{name}.stats.npy" in entries:
                stats.append(shard_stats_from_bytes(read_bytes(join_url(out, f"{name}.stats.npy"))))
    sizes = {name: record["count"] for name, record in index.items()}
    with atomic_write(join_url(out, SIZES_MANIFEST), "w") as f:
        json.dump(sizes, f, indent=1, sort_keys=True)
    with atomic_write(join_url(out, SHARD_INDEX), "w") as f:
        json.dump(index, f, indent=1, sort_keys=True)
    if stats:
        write_stats(out, stats)
    return sizes


SUCCESS_MARKER = "_SUCCESS"


def _finish_job(out: str, urls: list[str]) -> None:
    """Merge `sizes.json`; once every input shard has its embedding shard, write `_SUCCESS`."""
    sizes = merge_sizes(out)
    if all(url_basename(u) in sizes for u in urls):
        with atomic_write(join_url(out, SUCCESS_MARKER), "w") as f:
            json.dump({"shards": len(urls), "samples": sum(sizes.values())}, f)


def run_precompute(
    cfg: PrecomputeConfig,
    *,
    shards: Optional[str | list[str]] = None,
    out: Optional[str] = None,
    rank: Optional[int] = None,
    world_size: Optional[int] = None,
    device: Optional[str] = None,
    clip: Optional[ClipAdapter] = None,
    progress: bool = True,
    on_batch: Optional[Callable[[int], None]] = None,
    on_progress: Optional[Callable[[int, int, dict[str, int]], None]] = None,
) -> PrecomputeSummary:
    """Embed this rank's share of the shards (`shards`/`out` override the config's).

    `clip`: an already loaded adapter (else built from cfg.clip). `on_batch(n)` is called
    after the n-th batch is written (tests use it to interrupt the job); `on_progress(samples,
    shards, skipped)` with this rank's running totals after every batch and shard (metrics).
    """
    start = time.perf_counter()
    urls = expand_urls(shards if shards is not None else cfg.shards)
    out = out if out is not None else cfg.out
    if not urls:
        raise ValueError("shards: no input shard URLs (set `shards:` or pass --shards)")
    if not out:
        raise ValueError("out: no output folder (set `out:` or pass --out)")
    _use_storage_options(cfg, urls, out)
    names = [url_basename(u) for u in urls]
    if len(set(names)) != len(names):
        raise ValueError("shards: two input shards share a file name; their embedding shards would collide")
    if rank is None or world_size is None:
        rank, world_size = _process_group_rank()
    if not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} is not in [0, world size {world_size})")
    device = device or cfg.device or ("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cuda" and "LOCAL_RANK" in os.environ:  # one GPU per local rank
        device = f"cuda:{int(os.environ['LOCAL_RANK'])}"
    clip = clip if clip is not None else load_clip_from_config(cfg.clip, device=device)
    makedirs(out)
    _check_manifest(out, _manifest(cfg, clip))
    mine = urls[rank::world_size]
    todo = [u for u in mine if not exists(embedding_shard_url(out, u))]
    _remove_stale_temporaries(out, {url_basename(u) for u in todo})
    skips, samples, written = SkipCounter(), 0, 0
    if todo:
        samples, written = _embed_shards(cfg, clip, todo, out, skips, progress and rank == 0, on_batch, on_progress)
    if cfg.format == "clip-retrieval":
        from data_pipeline.clip_retrieval_export import export_parts

        export_parts(out, urls, mine, clip.embed_dim)
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.barrier()
        if rank == 0:
            _finish_job(out, urls)
    else:
        _finish_job(out, urls)  # job arrays: whichever rank finishes last completes it
    summary = PrecomputeSummary(rank, world_size, len(mine), written, len(mine) - len(todo), samples,
                                skips.as_dict(), time.perf_counter() - start, count_shards(mine).summary())
    log.info("%s", summary.summary())
    return summary


def _embed_shards(cfg: PrecomputeConfig, clip: ClipAdapter, todo: list[str], out: str, skips: SkipCounter,
                  progress: bool, on_batch: Optional[Callable[[int], None]],
                  on_progress: Optional[Callable[[int, int, dict[str, int]], None]] = None) -> tuple[int, int]:
    from tqdm import tqdm

    tokenize = functools.partial(clip.tokenizer, context_length=clip.context_length)
    dataset = _ShardBatches(todo, cfg.batch_size, clip.image_size, tokenize)
    workers = min(cfg.num_workers, len(todo))
    loader = DataLoader(dataset, batch_size=None, num_workers=workers, collate_fn=keep_batch,
                        multiprocessing_context="fork" if workers else None)
    writers: dict[str, TarWriter] = {}
    stats: dict[str, dict[str, EmbedStats]] = {}
    samples = written = batches = 0
    bar = tqdm(total=len(todo), unit="shard", disable=not progress, dynamic_ncols=True)
    try:
        for item in loader:
            shard = item["shard"]
            writer = writers.get(shard)
            if writer is None:
                writer = writers[shard] = TarWriter(embedding_shard_url(out, shard))
                stats[shard] = {"image_embed": EmbedStats(clip.embed_dim), "text_embed": EmbedStats(clip.embed_dim)}
            if item["final"]:
                _finish_shard(writers.pop(shard), item, stats.pop(shard), skips)
                written += 1
                bar.update(1)
                if on_progress is not None:
                    on_progress(samples, written, skips.as_dict())
                continue
            _write_batch(writer, clip, item, cfg.text_encodings, stats[shard])
            samples += len(item["key"])
            batches += 1
            elapsed = bar.format_dict["elapsed"] or 1e-9
            bar.set_postfix(samples=samples, rate=f"{samples / elapsed:.1f}/s", refresh=False)
            if on_progress is not None:
                on_progress(samples, written, skips.as_dict())
            if on_batch is not None:
                on_batch(batches)
    finally:
        bar.close()
        for writer in writers.values():  # interrupted: nothing half-written appears
            writer.abort()
    return samples, written


@torch.no_grad()
def _write_batch(writer: TarWriter, clip: ClipAdapter, item: dict[str, Any], with_encodings: bool,
                 stats: dict[str, EmbedStats]) -> None:
    image_embed = clip.encode_image(from_uint8(item["image"].to(clip.device))).cpu().numpy()  # [B, H, W, 3] uint8
    text_embed, text_encodings, text_mask = (t.cpu().numpy() for t in clip.encode_text(item["tokens"]))
    # statistics of what readers get: the fp16 values stored
    stats["image_embed"].add(image_embed.astype(np.float16))
    stats["text_embed"].add(text_embed.astype(np.float16))
    for i, key in enumerate(item["key"]):
        enc = text_encodings[i] if with_encodings else None
        writer.write(key, embedding_fields(item["caption"][i], image_embed[i], text_embed[i], enc, text_mask[i]))


def _finish_shard(writer: TarWriter, final: dict[str, Any], stats: dict[str, EmbedStats], total: SkipCounter) -> None:
    # Sidecars first, shard last: the shard's final name is the one mark of completion. The
    # sidecar names the image shard and its size then, and this shard's size: `unclip check`
    # compares them with listings to find shards swapped, renamed or rewritten since.
    skipped = final["skipped"]
    writer.finish()
    keys = writer.keys
    record = {"count": writer.count, "skipped": skipped, "source": url_basename(final["shard"]),
              "source_bytes": final.get("source_bytes"), "source_first_key": final.get("source_first_key"), "bytes": writer.size,
              "first_key": keys[0] if keys else None, "last_key": keys[-1] if keys else None,
              "keys_sha256": hashlib.sha256("\n".join(keys).encode()).hexdigest()}
    with atomic_write(writer.url + ".stats.npy", "wb") as f:
        f.write(shard_stats_bytes(stats))
    with atomic_write(writer.url + ".json", "w") as f:
        json.dump(record, f, sort_keys=True)
    writer.close()
    total.update(skipped)
    for reason, n in skipped.items():
        log.info("%s: skipped %d sample(s): %s", mask_url(writer.url), n, reason)
