"""Embedding shards -> clip-retrieval's layout, for the field's tools (embedding-reader,
autofaiss, clip-retrieval's back end) — `unclip precompute --format clip-retrieval`.

For the i-th input shard of the job (in its shard order) this writes part `i`, zero-padded
the way clip-retrieval pads (`int(log10(parts)) + 1` digits), beside the embedding shards:

    OUT/img_emb/img_emb_{i}.npy          [n, D] float16, in the embedding shard's order
    OUT/text_emb/text_emb_{i}.npy        [n, D] float16
    OUT/metadata/metadata_{i}.parquet    key, caption, image_path (= key, as clip-retrieval
                                         names webdataset samples), shard (the image shard)

Each rank writes the parts of its own shards, atomically; a part already there is skipped,
so the export resumes like the rest of the job, and runs alone on finished embedding shards.
"""

from __future__ import annotations

import io
import math

import numpy as np

from data_pipeline.decode import decode_caption, decode_npy
from data_pipeline.embeddings import IMG_EMB, TXT_EMB, embedding_shard_url
from data_pipeline.io import atomic_write, exists, join_url, makedirs, url_basename
from data_pipeline.stats import SkipCounter
from data_pipeline.tario import iter_tar


def part_name(index: int, parts: int) -> str:
    return str(index).zfill(int(math.log10(max(parts, 1))) + 1)


def part_urls(out: str, part: str) -> dict[str, str]:
    return {"img_emb": join_url(out, f"img_emb/img_emb_{part}.npy"), "text_emb": join_url(out, f"text_emb/text_emb_{part}.npy"),
            "metadata": join_url(out, f"metadata/metadata_{part}.parquet")}


def _npy(rows: list[np.ndarray], dim: int) -> bytes:
    buf = io.BytesIO()
    np.save(buf, np.stack(rows).astype(np.float16) if rows else np.zeros((0, dim), np.float16), allow_pickle=False)
    return buf.getvalue()


def write_part(out: str, image_shard: str, part: str, dim: int) -> int:
    """Write the part of one finished embedding shard (metadata last: it marks the part done)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    keys, captions, images, texts = [], [], [], []
    for sample in iter_tar(embedding_shard_url(out, image_shard), SkipCounter()):
        keys.append(sample.key)
        captions.append(decode_caption(sample.fields))
        images.append(decode_npy(sample.fields[IMG_EMB], expect_dim=dim).reshape(-1))
        texts.append(decode_npy(sample.fields[TXT_EMB], expect_dim=dim).reshape(-1))
    urls = part_urls(out, part)
    for name, rows in (("img_emb", images), ("text_emb", texts)):
        with atomic_write(urls[name]) as f:
            f.write(_npy(rows, dim))
    table = pa.table({"key": keys, "caption": captions, "image_path": keys, "shard": [url_basename(image_shard)] * len(keys)})
    buf = io.BytesIO()
    pq.write_table(table, buf)
    with atomic_write(urls["metadata"]) as f:
        f.write(buf.getvalue())
    return len(keys)


def export_parts(out: str, urls: list[str], mine: list[str], dim: int) -> int:
    """Write the missing parts of this rank's shards `mine` (of the job's `urls`); parts written."""
    for sub in ("img_emb", "text_emb", "metadata"):
        makedirs(join_url(out, sub))
    index = {u: i for i, u in enumerate(urls)}
    written = 0
    for url in mine:
        part = part_name(index[url], len(urls))
        if not exists(part_urls(out, part)["metadata"]):
            write_part(out, url, part, dim)
            written += 1
    return written
