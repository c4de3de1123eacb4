"""What the tools that wrote a folder of shards recorded about it: sample counts and failures.

- ours (`unclip shards`, `unclip precompute`): `sizes.json` beside the shards, {name: count};
- img2dataset: per shard `NAME_stats.json` (URLs tried, `successes`, `failed_to_download`,
  `failed_to_resize`, `status_dict` of error messages) and `NAME.parquet` (one row per URL,
  `status`). Its tars hold only the successes: a failed download is not a bad sample of
  ours, and is reported as what it is.

Counting reads these small files, never a shard.
"""

from __future__ import annotations

import collections
import concurrent.futures
import dataclasses
import io
import json
from typing import Optional

from data_pipeline.io import exists, join_url, read_bytes, url_basename, url_dirname
from data_pipeline.shards import SIZES_MANIFEST

READ_THREADS = 16  # small manifest reads at once (object stores reward parallel GETs)


@dataclasses.dataclass
class ShardCount:
    """One shard's sample count (None: no manifest says) and, for img2dataset output, the URLs
    that did not make it into the tar, by failure and by error message."""

    samples: Optional[int]
    source: str = ""  # sizes.json | img2dataset _stats.json | img2dataset parquet
    failed_to_download: int = 0
    failed_to_resize: int = 0
    errors: dict[str, int] = dataclasses.field(default_factory=dict)


@dataclasses.dataclass
class FolderCounts:
    """Counts of a list of shards, with the totals a report needs."""

    shards: dict[str, ShardCount]

    @property
    def samples(self) -> int:
        return sum(c.samples or 0 for c in self.shards.values())

    @property
    def uncounted(self) -> list[str]:
        return [u for u, c in self.shards.items() if c.samples is None]

    @property
    def failed_to_download(self) -> int:
        return sum(c.failed_to_download for c in self.shards.values())

    @property
    def failed_to_resize(self) -> int:
        return sum(c.failed_to_resize for c in self.shards.values())

    def top_errors(self, n: int = 3) -> list[tuple[str, int]]:
        total: collections.Counter = collections.Counter()
        for c in self.shards.values():
            total.update(c.errors)
        return total.most_common(n)

    def summary(self) -> str:
        text = f"{self.samples} samples in {len(self.shards) - len(self.uncounted)} counted shard(s)"
        if self.uncounted:
            text += f", {len(self.uncounted)} shard(s) without a count"
        if self.failed_to_download or self.failed_to_resize:
            errors = "; ".join(f"{msg[:60]!r} x{n}" for msg, n in self.top_errors())
            text += (f" (img2dataset: {self.failed_to_download} URL(s) failed to download, {self.failed_to_resize} "
                     f"failed to resize{': ' + errors if errors else ''})")
        return text


def img2dataset_stem(url: str) -> str:
    name = url_basename(url)
    return name[: -len(".tar")] if name.endswith(".tar") else name


def _sizes_json(folder: str) -> Optional[dict[str, int]]:
    url = join_url(folder, SIZES_MANIFEST)
    try:
        if not exists(url):
            return None
        return {str(k): int(v) for k, v in json.loads(read_bytes(url)).items()}
    except (OSError, ValueError, TypeError, AttributeError):
        return None


def _img2dataset_count(url: str, names: Optional[set[str]]) -> ShardCount:
    folder, stem = url_dirname(url), img2dataset_stem(url)
    stats_name, parquet_name = f"{stem}_stats.json", f"{stem}.parquet"
    if names is None or stats_name in names:
        try:
            stats = json.loads(read_bytes(join_url(folder, stats_name)))
            errors = {k: int(v) for k, v in (stats.get("status_dict") or {}).items() if k != "success"}
            return ShardCount(int(stats["successes"]), "img2dataset _stats.json", int(stats.get("failed_to_download", 0)),
                              int(stats.get("failed_to_resize", 0)), errors)
        except (OSError, ValueError, KeyError, TypeError):
            pass
    if names is None or parquet_name in names:
        try:
            import pyarrow.parquet as pq

            status = pq.read_table(io.BytesIO(read_bytes(join_url(folder, parquet_name))), columns=["status"])
            counts = collections.Counter(status.column("status").to_pylist())
            return ShardCount(counts.get("success", 0), "img2dataset parquet", counts.get("failed_to_download", 0),
                              counts.get("failed_to_resize", 0))
        except (OSError, ValueError, KeyError, TypeError):
            pass
    return ShardCount(None)


def count_shards(urls: list[str], listings: Optional[dict[str, set[str]]] = None) -> FolderCounts:
    """Counts of `urls`: `sizes.json` of their folder, else img2dataset's per-shard files.
    `listings` (folder -> names in it), where known, saves looking for files that are not there."""
    out: dict[str, ShardCount] = {}
    rest = []
    for folder in dict.fromkeys(url_dirname(u) for u in urls):
        names = None if listings is None else listings.get(folder)
        sizes = _sizes_json(folder) if names is None or SIZES_MANIFEST in names else None
        for url in (u for u in urls if url_dirname(u) == folder):
            if sizes is not None and url_basename(url) in sizes:
                out[url] = ShardCount(sizes[url_basename(url)], SIZES_MANIFEST)
            else:
                rest.append((url, names))
    with concurrent.futures.ThreadPoolExecutor(READ_THREADS) as pool:
        for url, count in zip([u for u, _ in rest], pool.map(lambda a: _img2dataset_count(*a), rest)):
            out[url] = count
    return FolderCounts({u: out[u] for u in urls})
