"""Embedding shards: their layout, and the three ways of reading embeddings.

Layout (written by `unclip precompute`): for image shard `.../NAME.tar`, the embedding
shard `EMB/NAME.tar` holds, per key and in the image shard's order,
`{key}.img_emb.npy` [D] fp16, `{key}.txt_emb.npy` [D] fp16, `{key}.txt` (the caption) and
optionally `{key}.txt_enc.npy` [n_tokens, W] fp16 (the per-token text encodings, trimmed
after the last real token; the mask is a prefix of n_tokens). `EMB/embeddings.json`
records the CLIP model and D, W, L; `EMB/sizes.json` the per-shard counts.

Readers:
- `iter_joined`: image shard + embedding shard merged by key (the decoder's input);
- `iter_tar` on the embedding shard alone (the prior's input: no image bytes move);
- `iter_clip_retrieval`: clip-retrieval / LAION folders (`img_emb/img_emb_{i}.npy`,
  `text_emb/text_emb_{i}.npy`, `metadata/metadata_{i}.parquet`), read in row chunks.
"""

from __future__ import annotations

import collections
import dataclasses
import io
import json
import re
from typing import Iterator, Optional

import numpy as np

from data_pipeline.decode import encode_npy
from data_pipeline.io import atomic_write, exists, join_url, list_dir, mask_url, open_url, read_bytes, url_basename
from data_pipeline.stats import SkipCounter
from data_pipeline.tario import DEFAULT_MAX_MEMBER_BYTES, RawSample, iter_tar

MANIFEST = "embeddings.json"
SHARD_INDEX = "shards.json"  # every embedding shard's record, merged by precompute
IMG_EMB, TXT_EMB, TXT_ENC = "img_emb.npy", "txt_emb.npy", "txt_enc.npy"
JOIN_LOOKAHEAD = 4096  # embedding records held while looking for an image's key


@dataclasses.dataclass
class EmbeddingManifest:
    clip_name: str
    clip_pretrained: Optional[str]
    embed_dim: int
    text_width: int
    context_length: int
    text_encodings: bool
    # "unit" (L2-normalised) or "raw" (CLIP's outputs as they are: Karlo's stages read these)
    embeddings: str = "unit"

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self), indent=1, sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> "EmbeddingManifest":
        data = json.loads(text)
        # a manifest written before a field with a default existed holds that default
        optional = {f.name: f.default for f in dataclasses.fields(cls) if f.default is not dataclasses.MISSING}
        return cls(**{f.name: data[f.name] if f.name not in optional else data.get(f.name, optional[f.name]) for f in dataclasses.fields(cls)})


def write_manifest(folder: str, manifest: EmbeddingManifest) -> None:
    with atomic_write(join_url(folder, MANIFEST), "w") as f:
        f.write(manifest.to_json())


def read_manifest(folder: str) -> Optional[EmbeddingManifest]:
    url = join_url(folder, MANIFEST)
    if not exists(url):
        return None
    try:
        return EmbeddingManifest.from_json(read_bytes(url).decode())
    except (ValueError, KeyError, TypeError) as err:
        raise ValueError(f"{mask_url(url)} is not a valid embeddings manifest: {err}") from None


def convention_problem(manifest: EmbeddingManifest, embeddings: str, *, folder: str, key: str) -> Optional[str]:
    """Why the embeddings in `folder` (described by `manifest`) cannot feed a stage that reads
    `embeddings` (`unit` or `raw`, its config's `key`), or None. Unit-norm and raw CLIP
    embeddings have the same shapes, so nothing downstream would notice: a raw-reading stage
    (Karlo's) would see vectors ~10x too short, a unit-reading one vectors of the wrong norm."""
    if manifest.embeddings == embeddings:
        return None
    return (f"{mask_url(folder)} holds {manifest.embeddings} CLIP embeddings (its {MANIFEST}), but {key} is "
            f"{embeddings!r}: precompute again with clip.embeddings: {embeddings}, or use the stage config made for them")


def embedding_fields(caption: str, image_embed: np.ndarray, text_embed: np.ndarray,
                     text_encodings: Optional[np.ndarray] = None, text_mask: Optional[np.ndarray] = None) -> dict[str, bytes]:
    """The members of one embedding-shard sample (fp16; encodings trimmed to real tokens)."""
    fields = {IMG_EMB: encode_npy(image_embed.astype(np.float16)), TXT_EMB: encode_npy(text_embed.astype(np.float16)),
              "txt": caption.encode("utf-8")}
    if text_encodings is not None:
        n = int(text_mask.sum()) if text_mask is not None else text_encodings.shape[0]
        fields[TXT_ENC] = encode_npy(text_encodings[:n].astype(np.float16))
    return fields


def embedding_shard_url(embeddings: str, image_shard: str) -> str:
    """The embedding shard aligned with `image_shard`: same file name under `embeddings`."""
    return join_url(embeddings, url_basename(image_shard))


def iter_joined(image_shard: str, embeddings: str, skips: SkipCounter, *,
                max_member_bytes: int = DEFAULT_MAX_MEMBER_BYTES) -> Iterator[RawSample]:
    """Samples of `image_shard` with their embedding members merged in, matched by key.

    Both shards are in the same order (precompute keeps it; it may have dropped samples),
    so this is a merge join holding at most JOIN_LOOKAHEAD embedding records. An image
    without embeddings is yielded without them (the decoder reports `missing_embedding`).
    """
    emb_iter = iter_tar(embedding_shard_url(embeddings, image_shard), skips, max_member_bytes=max_member_bytes)
    pending: "collections.OrderedDict[str, dict[str, bytes]]" = collections.OrderedDict()
    exhausted = False
    for sample in iter_tar(image_shard, skips, max_member_bytes=max_member_bytes):
        while sample.key not in pending and not exhausted and len(pending) < JOIN_LOOKAHEAD:
            nxt = next(emb_iter, None)
            if nxt is None:
                exhausted = True
            else:
                pending[nxt.key] = nxt.fields
        if sample.key in pending:
            while True:  # records before the match belong to no later image: drop them
                key, fields = pending.popitem(last=False)
                if key == sample.key:
                    break
            sample.fields = {**fields, **sample.fields}
        elif len(pending) >= JOIN_LOOKAHEAD:
            pending.popitem(last=False)  # badly misaligned shards: keep memory bounded
        yield sample


# ---------------------------------------------------------------- clip-retrieval / LAION

_INDEX = re.compile(r"^img_emb_(\d+)\.npy$")


def clip_retrieval_parts(root: str) -> list[str]:
    """The part ids (`0`, `1`, ... as in `img_emb_0.npy`) of a clip-retrieval folder, sorted."""
    parts = [m.group(1) for name in list_dir(join_url(root, "img_emb")) if (m := _INDEX.match(name))]
    if not parts:
        raise FileNotFoundError(f"{mask_url(root)}: no img_emb/img_emb_*.npy files (clip-retrieval layout)")
    return sorted(parts, key=int)


class NpyRows:
    """Row-chunked reading of a 2-D .npy over fsspec (seek + read; never loads it whole)."""

    def __init__(self, url: str):
        self.url = url
        self.f = open_url(url)
        version = np.lib.format.read_magic(self.f)
        readers = {(1, 0): np.lib.format.read_array_header_1_0, (2, 0): np.lib.format.read_array_header_2_0}
        if version not in readers:
            raise ValueError(f"{mask_url(url)}: unsupported .npy format version {version}")
        shape, fortran, dtype = readers[version](self.f)
        if fortran or len(shape) != 2 or dtype.hasobject:
            raise ValueError(f"{mask_url(url)}: expected a C-order 2-D numeric array, got shape {shape}")
        self.rows, self.dim, self.dtype = shape[0], shape[1], dtype
        self.data_start = self.f.tell()

    def read(self, start: int, count: int) -> np.ndarray:
        count = max(0, min(count, self.rows - start))
        self.f.seek(self.data_start + start * self.dim * self.dtype.itemsize)
        buf = self.f.read(count * self.dim * self.dtype.itemsize)
        if len(buf) != count * self.dim * self.dtype.itemsize:
            raise EOFError(f"{mask_url(self.url)} ends before row {start + count}")
        return np.frombuffer(buf, dtype=self.dtype).reshape(count, self.dim)

    def close(self) -> None:
        self.f.close()


def iter_clip_retrieval(root: str, part: str, skips: SkipCounter, *, start: int = 0, want_text: bool = True,
                        chunk: int = 4096) -> Iterator[RawSample]:
    """Rows of part `part` from row `start`: fields `img_emb` / `txt_emb` (arrays) and `txt`.

    Captions and keys come from `metadata/metadata_{part}.parquet` when present: columns
    `caption`, and `key` (img2dataset's, carried by clip-retrieval from the webdataset) or
    `image_path`; without them a row's key is `{part}_{row:09d}`.
    """
    where = f"{mask_url(root)} part {part}"
    try:
        img = NpyRows(join_url(root, f"img_emb/img_emb_{part}.npy"))
        txt = NpyRows(join_url(root, f"text_emb/text_emb_{part}.npy")) if want_text else None
        captions, keys = _read_metadata(join_url(root, f"metadata/metadata_{part}.parquet"))
    except (OSError, ValueError, EOFError) as err:
        skips.skip("unreadable_source", f"{where} ({type(err).__name__}: {err})")
        return
    try:
        if txt is not None and txt.rows != img.rows:
            skips.skip("unreadable_source", f"{where}: {img.rows} image rows but {txt.rows} text rows")
            return
        if captions is not None and len(captions) != img.rows or keys is not None and len(keys) != img.rows:
            skips.skip("unreadable_source", f"{where}: {img.rows} rows but metadata for {len(captions or keys)}")
            return
        for begin in range(start, img.rows, chunk):
            img_rows = img.read(begin, chunk)
            txt_rows = txt.read(begin, chunk) if txt is not None else None
            for i in range(img_rows.shape[0]):
                row = begin + i
                fields: dict = {"img_emb": img_rows[i]}
                if txt_rows is not None:
                    fields["txt_emb"] = txt_rows[i]
                if captions is not None and captions[row] is not None:
                    fields["txt"] = str(captions[row]).encode("utf-8")
                key = str(keys[row]) if keys is not None and keys[row] is not None else f"{part}_{row:09d}"
                yield RawSample(key, fields, root, row)
    except (OSError, EOFError) as err:
        skips.skip("truncated_tar", f"{where} ({type(err).__name__})")
    finally:
        img.close()
        if txt is not None:
            txt.close()


def _read_metadata(url: str) -> tuple[Optional[list], Optional[list]]:
    """(captions, keys) of a part's metadata parquet; None for what it does not have."""
    if not exists(url):
        return None, None
    import pyarrow.parquet as pq

    parquet = pq.ParquetFile(io.BytesIO(read_bytes(url)))
    names = parquet.schema_arrow.names
    key_column = next((c for c in ("key", "image_path") if c in names), None)
    columns = [c for c in ("caption", key_column) if c in names]
    table = parquet.read(columns=columns) if columns else None
    captions = table.column("caption").to_pylist() if "caption" in columns else None
    keys = table.column(key_column).to_pylist() if key_column else None
    return captions, keys
