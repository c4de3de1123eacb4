"""`unclip shards`: write webdataset shards from an image folder, a table or the demo set.

Each sample becomes `{key}.{jpg|png|webp}`, `{key}.txt` (caption) and `{key}.json`
(provenance); `sizes.json` beside the shards gives the sample count of each shard.
Unreadable, tiny or caption-less sources are skipped and counted in the report.
"""

from __future__ import annotations

import dataclasses
import io
import json
import os
import re
import time
from typing import Iterator, Optional

from PIL import Image

from data_pipeline import shapes
from data_pipeline.decode import Skip, open_image
from data_pipeline.io import atomic_write, join_url, makedirs, mask_url, read_bytes
from data_pipeline.stats import SkipCounter
from data_pipeline.tario import TarWriter

IMAGE_FORMATS = {"jpg": "JPEG", "png": "PNG", "webp": "WEBP"}
_FOLDER_IMAGE_EXTS = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff")
SIZES_MANIFEST = "sizes.json"


@dataclasses.dataclass
class ShardReport:
    """What `write_shards` did: shard URLs written, samples in them, skips by reason."""

    shards: list[str]
    samples: int
    skipped: dict[str, int]
    seconds: float

    def summary(self) -> str:
        skipped = ", ".join(f"{k}={v}" for k, v in self.skipped.items()) or "none"
        return (f"wrote {self.samples} samples in {len(self.shards)} shards in {self.seconds:.1f}s; "
                f"skipped: {skipped}")


@dataclasses.dataclass
class SourceItem:
    """A sample to write: `load()` returns the image bytes (lazily, so skips are cheap)."""

    key: str
    caption: Optional[str]
    meta: dict
    image: Optional[Image.Image] = None
    path: Optional[str] = None


def parse_source(source: str) -> tuple[str, str]:
    """`shapes` | `folder:DIR` | `table:FILE.csv|.parquet` -> (kind, argument)."""
    if source == "shapes":
        return "shapes", ""
    kind, sep, arg = source.partition(":")
    if not sep or kind not in ("folder", "table") or not arg:
        raise ValueError(f"--source: expected shapes, folder:DIR or table:FILE.csv|.parquet, got {source!r}")
    if kind == "table" and not arg.endswith((".csv", ".parquet")):
        raise ValueError(f"--source: a table must be .csv or .parquet, got {arg!r}")
    return kind, arg


def _safe_key(rel: str) -> str:
    stem = os.path.splitext(rel)[0]
    return re.sub(r"[^A-Za-z0-9_-]+", "_", stem.replace(os.sep, "__").replace("/", "__")).strip("_") or "sample"


def iter_folder(root: str, skips: SkipCounter) -> Iterator[SourceItem]:
    """Images under `root` (recursively, sorted) with captions in `a.txt` beside `a.jpg`."""
    if not os.path.isdir(root):
        raise FileNotFoundError(f"--source folder {root!r} does not exist")
    seen: set[str] = set()
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames.sort()
        for name in sorted(filenames):
            if not name.lower().endswith(_FOLDER_IMAGE_EXTS):
                continue
            path = os.path.join(dirpath, name)
            rel = os.path.relpath(path, root)
            key = _safe_key(rel)
            if key in seen:
                skips.skip("duplicate_key", rel)
                continue
            seen.add(key)
            caption_path = os.path.splitext(path)[0] + ".txt"
            caption = None
            if os.path.isfile(caption_path):
                with open(caption_path, "rb") as f:
                    caption = f.read()
            yield SourceItem(key, caption, {"source": rel}, path=path)


def iter_table(table: str, skips: SkipCounter) -> Iterator[SourceItem]:
    """Rows `path,caption` of a CSV/Parquet table; relative paths are under the table's folder."""
    import pyarrow.csv as pacsv
    import pyarrow.parquet as pq

    try:
        data = io.BytesIO(read_bytes(table))
    except FileNotFoundError:
        raise FileNotFoundError(f"--source table {mask_url(table)!r} does not exist") from None
    tab = pq.read_table(data) if table.endswith(".parquet") else pacsv.read_csv(data)
    missing = {"path", "caption"} - set(tab.column_names)
    if missing:
        raise ValueError(f"--source table {table!r} lacks column(s) {sorted(missing)} (has {tab.column_names})")
    base = os.path.dirname(table)
    paths, captions = tab.column("path").to_pylist(), tab.column("caption").to_pylist()
    for row, (path, caption) in enumerate(zip(paths, captions)):
        if not path:
            skips.skip("missing_image", f"row {row}")
            continue
        full = path if "://" in path or os.path.isabs(path) else os.path.join(base, path)
        text = None if caption is None else str(caption).encode("utf-8")
        yield SourceItem(f"{row:09d}", text, {"source": mask_url(str(path)), "row": row}, path=full)


def iter_shapes(count: int, size: int, seed: int) -> Iterator[SourceItem]:
    for key, img, caption, attrs in shapes.generate(count, size=size, seed=seed):
        yield SourceItem(key, caption.encode(), {"attributes": dataclasses.asdict(attrs), "seed": seed}, image=img)


def _prepare(item: SourceItem, size: Optional[int], min_size: int) -> tuple[Image.Image, str]:
    """Load, check and (for folder/table) downscale one item; raises Skip."""
    if item.caption is None:
        raise Skip("missing_caption")
    if len(item.caption) > 16 * 1024:
        raise Skip("caption_too_long")
    try:
        caption = " ".join(item.caption.decode("utf-8").split())
    except UnicodeDecodeError:
        raise Skip("caption_not_utf8") from None
    if not caption:
        raise Skip("missing_caption", "blank")
    img = item.image
    if img is None:
        try:
            data = read_bytes(item.path)
        except OSError:
            raise Skip("unreadable_source") from None
        if not data:
            raise Skip("empty_file")
        img = open_image(data, min_size=min_size)
        if size is not None and min(img.size) > size:
            scale = size / min(img.size)
            img = img.resize((max(size, round(img.width * scale)), max(size, round(img.height * scale))),
                             Image.Resampling.BICUBIC, reducing_gap=3.0)
    elif min(img.size) < min_size:
        raise Skip("image_too_small")
    return img, caption


def encode_image(img: Image.Image, image_format: str, quality: int) -> bytes:
    buf = io.BytesIO()
    fmt = IMAGE_FORMATS[image_format]
    kwargs = {"quality": quality} if fmt in ("JPEG", "WEBP") else {"optimize": False}
    img.save(buf, format=fmt, **kwargs)
    return buf.getvalue()


def write_shards(
    source: str,
    out_url: str,
    *,
    per_shard: int = 1000,
    count: Optional[int] = None,
    size: Optional[int] = None,
    seed: int = 0,
    image_format: Optional[str] = None,
    quality: int = 95,
    min_size: int = 0,
    prefix: str = "shard",
    progress: bool = False,
) -> ShardReport:
    """Write shards `{out_url}/{prefix}-000000.tar`, ... and `{out_url}/sizes.json`.

    `count`: samples to write (shapes: how many to generate, default 1000; folder/table:
    at most this many). `size`: shapes render side; folder/table images are downscaled so
    their shorter side is at most `size`. `image_format`: jpg|png|webp (default png for
    shapes, jpg otherwise), `quality` for jpg/webp; images whose shorter side is under
    `min_size` are skipped.
    """
    kind, arg = parse_source(source)
    if per_shard < 1:
        raise ValueError(f"--per-shard must be >= 1, got {per_shard}")
    image_format = image_format or ("png" if kind == "shapes" else "jpg")
    if image_format not in IMAGE_FORMATS:
        raise ValueError(f"--image-format must be one of {sorted(IMAGE_FORMATS)}, got {image_format!r}")
    if not 1 <= quality <= 100:
        raise ValueError(f"--quality must be in 1..100, got {quality}")
    skips = SkipCounter()
    if kind == "shapes":
        items = iter_shapes(1000 if count is None else count, size or 64, seed)
    elif kind == "folder":
        items = iter_folder(arg, skips)
    else:
        items = iter_table(arg, skips)
    start = time.perf_counter()
    makedirs(out_url)
    sizes: dict[str, int] = {}
    writer: Optional[TarWriter] = None
    written = 0
    bar = _progress(progress, count)
    try:
        for item in items:
            if count is not None and written >= count:
                break
            try:
                img, caption = _prepare(item, size if kind != "shapes" else None, min_size)
            except Skip as skip:
                skips.skip(skip.reason, item.meta.get("source", item.key))
                continue
            if writer is None:
                writer = TarWriter(join_url(out_url, f"{prefix}-{len(sizes):06d}.tar"))
            meta = dict(item.meta, width=img.width, height=img.height)
            writer.write(item.key, {image_format: encode_image(img, image_format, quality),
                                    "txt": caption.encode("utf-8"),
                                    "json": json.dumps(meta, sort_keys=True).encode()})
            written += 1
            bar.update(1)
            if writer.count == per_shard:
                writer.close()
                sizes[_name(writer.url)] = writer.count
                writer = None
        if writer is not None:
            writer.close()
            sizes[_name(writer.url)] = writer.count
            writer = None
    finally:
        bar.close()
        if writer is not None:
            writer.abort()
    with atomic_write(join_url(out_url, SIZES_MANIFEST), "w") as f:
        json.dump(sizes, f, indent=1, sort_keys=True)
    return ShardReport([join_url(out_url, n) for n in sorted(sizes)], written, skips.as_dict(),
                       time.perf_counter() - start)


def _name(url: str) -> str:
    return url.rstrip("/").rsplit("/", 1)[-1]


def _progress(enabled: bool, total: Optional[int]):
    from tqdm import tqdm

    return tqdm(total=total, unit="sample", disable=not enabled, dynamic_ncols=True)
