"""Preflight: what a job's data must satisfy, checked before any GPU is asked for.

Cheap at LAION scale: one listing per shard folder and the manifests the tools wrote
(`sizes.json`, img2dataset's per-shard stats, precompute's `embeddings.json`, `shards.json`
and `stats.json`), never a shard's contents. Every problem is named, none stops the others:

- every shard URL the stage reads is there, and counted (from the manifests);
- epoch mode: at least ranks x loader workers shards per source (else resampling);
- embedding shards aligned with the image shards: none missing, none computed from another
  image shard (a reordered or renamed one), none rewritten since (sizes against precompute's
  records; first keys of a spread of shards: one tar header each), counts equal;
- the CLIP that precompute recorded (model, embedding width D, text width W, context) is the
  one the stage expects; the embedding statistics exist where the stage asks for them.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import json
from typing import Optional

from data_pipeline.config import DataConfig, SourceConfig
from data_pipeline.embed_stats import read_stats
from data_pipeline.embeddings import SHARD_INDEX, NpyRows, read_manifest
from data_pipeline.io import (exists, expand_urls, join_url, list_dir, list_sizes, mask_url, open_url, read_bytes, url_basename,
                              url_dirname)
from data_pipeline.manifests import READ_THREADS, count_shards
from data_pipeline.sources import use_storage_options
from data_pipeline.tario import split_key
from data_pipeline.tarstream import TarFormatError, TarStream
from models.clip import ClipExpectation

EMBED_FIELDS = frozenset({"image_embed", "text_embed", "text_encodings", "text_mask"})
NAMED = 5  # names listed per kind of problem; the rest are counted
KEY_SAMPLE = 64  # embedding shards whose first key is read (one header each), spread evenly


@dataclasses.dataclass
class Report:
    problems: list[str] = dataclasses.field(default_factory=list)
    notes: list[str] = dataclasses.field(default_factory=list)

    def problem(self, text: str) -> None:
        self.problems.append(text)

    def note(self, text: str) -> None:
        self.notes.append(text)

    def extend(self, other: "Report") -> None:
        self.problems += other.problems
        self.notes += other.notes

    def lines(self) -> list[str]:
        return [f"problem: {p}" for p in self.problems] + [f"note: {n}" for n in self.notes]


def named(items: list[str]) -> str:
    head = ", ".join(items[:NAMED])
    return head + (f" and {len(items) - NAMED} more" if len(items) > NAMED else "")


def compare_clip(expect: ClipExpectation, *, name: str, pretrained: Optional[str], embed_dim: int,
                 text_width: Optional[int], context_length: Optional[int], source: str) -> list[str]:
    """How the CLIP described by `source` differs from what the stage expects (empty: it does not)."""
    where = expect.where
    out = []
    if expect.name is not None and name != expect.name:
        out.append(f"{source} is CLIP {name}, but {where.get('name', 'clip.name')} is {expect.name}")
    if expect.pretrained is not None and pretrained is not None and pretrained != expect.pretrained:
        out.append(f"{source} has weights {pretrained!r}, but {where.get('pretrained', 'clip.pretrained')} is "
                   f"{expect.pretrained!r}")
    if embed_dim != expect.embed_dim:
        out.append(f"{source} has embedding width {embed_dim} ({name}), but {where.get('embed_dim', 'model.embed_dim')} "
                   f"is {expect.embed_dim}")
    if expect.text_width is not None and text_width is not None and text_width != expect.text_width:
        out.append(f"{source} has text width {text_width} ({name}), but {where.get('text_width', 'model.text_width')} "
                   f"is {expect.text_width}")
    if expect.max_text_len is not None and context_length is not None and context_length > expect.max_text_len:
        out.append(f"{source} has {context_length}-token text encodings, but "
                   f"{where.get('max_text_len', 'model.max_text_len')} is {expect.max_text_len}")
    return out


def _listing(urls: list[str]) -> tuple[dict[str, dict[str, int]], list[str]]:
    """Folder -> {name: bytes} for listable folders, and the URLs not found there (http(s)
    URLs are looked up one by one, in parallel: there is no listing)."""
    listings: dict[str, dict[str, int]] = {}
    missing, http = [], []
    for url in urls:
        if url.startswith(("http://", "https://")):
            http.append(url)
            continue
        folder = url_dirname(url)
        if folder not in listings:
            try:
                listings[folder] = list_sizes(folder)
            except OSError:
                listings[folder] = {}
        if url_basename(url) not in listings[folder]:
            missing.append(url)
    with concurrent.futures.ThreadPoolExecutor(READ_THREADS) as pool:
        for url, found in zip(http, pool.map(_reachable, http)):
            if not found:
                missing.append(url)
    return listings, missing


def _reachable(url: str) -> bool:
    try:
        return exists(url)
    except OSError:
        return False


def check_data(cfg: DataConfig, *, want: frozenset, world_size: int, expect: Optional[ClipExpectation] = None,
               key_sample: Optional[int] = KEY_SAMPLE) -> Report:
    """Everything wrong with `cfg` for a stage reading the fields `want` on `world_size` ranks.
    `key_sample`: how many embedding shards (spread evenly) have their first keys read (None: all)."""
    report = Report()
    try:  # the sources' endpoints and modes, as the loader will use them
        use_storage_options(cfg)
    except ValueError as err:
        report.problem(str(err))
        return report
    workers = max(1, cfg.num_workers)
    for i, src in enumerate(cfg.sources):
        key = f"data.sources[{i}]"
        if src.format == "clip-retrieval":
            units = _check_clip_retrieval(key, src, want, expect, report)
        else:
            units = _check_webdataset(key, src, want, expect, report, key_sample)
        if units and not cfg.resampled and units < world_size * workers:
            report.problem(f"{key}: {units} shard(s) cannot be split across {world_size} rank(s) x {workers} "
                           f"worker(s) in epoch mode; write more shards, use fewer workers, or set data.resampled: true")
    return report


def _check_webdataset(key: str, src: SourceConfig, want: frozenset, expect: Optional[ClipExpectation],
                      report: Report, key_sample: Optional[int]) -> int:
    urls = expand_urls(src.shards)
    if not urls:
        report.problem(f"{key}.shards: no shard URLs in {src.shards!r}")
        return 0
    embeds_only = bool(want & EMBED_FIELDS) and "image" not in want
    listings, missing = _listing(urls)
    counts = count_shards(urls, {f: set(names) for f, names in listings.items()})
    if missing and not embeds_only:
        report.problem(f"{key}.shards: {len(missing)} of {len(urls)} shard(s) not found: "
                       f"{named([mask_url(u) for u in missing])}")
    elif not embeds_only:
        report.note(f"{key}.shards: {len(urls)} shard(s), {counts.summary()}")
    if not want & EMBED_FIELDS:
        return len(urls)
    if src.embeddings is None:
        report.problem(f"{key}.embeddings: this stage needs {sorted(want & EMBED_FIELDS)}; set it to the folder "
                       f"written by `unclip precompute`")
        return len(urls)
    folder = src.embeddings if isinstance(src.embeddings, str) else src.embeddings[0]
    _check_embeddings(f"{key}.embeddings", folder, urls, listings, counts, want, expect, report, key_sample)
    return len(urls)


def _check_embeddings(key: str, folder: str, urls: list[str], listings: dict, counts, want: frozenset,
                      expect: Optional[ClipExpectation], report: Report, key_sample: Optional[int]) -> None:
    where = mask_url(folder)
    try:
        manifest = read_manifest(folder)
    except (ValueError, OSError) as err:
        report.problem(f"{key}: {err}")
        return
    if manifest is None:
        report.problem(f"{key}: no embeddings.json in {where} (run `unclip precompute` into it)")
        return
    if expect is not None:
        for text in compare_clip(expect, name=manifest.clip_name, pretrained=manifest.clip_pretrained,
                                 embed_dim=manifest.embed_dim, text_width=manifest.text_width,
                                 context_length=manifest.context_length, source=f"{where}/embeddings.json"):
            report.problem(f"{key}: {text}")
    if "text_encodings" in want and not manifest.text_encodings:
        report.problem(f"{key}: {where} has no text encodings (precompute with text_encodings: true)")
    files = list_sizes(folder)
    names = [url_basename(u) for u in urls]
    have = [n for n in names if n in files]
    missing = [n for n in names if n not in files]
    extra = sorted(set(n for n in files if n.endswith(".tar")) - set(names))
    if missing:
        report.problem(f"{key}: no embedding shard for {len(missing)} of {len(names)} image shard(s): {named(missing)} "
                       f"(precompute them, or drop them from the shards)")
    if extra:
        report.note(f"{key}: {len(extra)} embedding shard(s) in {where} have no image shard in this source and are "
                    f"not read: {named(extra)}")
    index = _shard_index(folder, files)
    if index is None:
        report.note(f"{key}: {where} has no {SHARD_INDEX} (written by an older precompute): alignment checked by "
                    f"names only")
    else:
        _check_alignment(key, folder, urls, have, files, index, listings, counts, report, key_sample, "image" in want)
    if expect is not None and expect.wants_stats:
        stats = read_stats(folder)
        if stats is None:
            report.problem(f"{key}: the stage normalises by the embedding statistics, but {where} has no stats.json "
                           f"(precompute again with this version)")
        elif len(stats["image_embed"]["std"]) != expect.embed_dim:
            report.problem(f"{key}: {where}/stats.json is {len(stats['image_embed']['std'])}-d, expected {expect.embed_dim}")
    if not missing:
        total = sum(index[n]["count"] for n in have if n in index) if index else None
        report.note(f"{key}: {len(have)} embedding shard(s) aligned with the image shards"
                    + (f", {total} samples" if total is not None else "")
                    + f", CLIP {manifest.clip_name} (D={manifest.embed_dim}, W={manifest.text_width}, "
                      f"L={manifest.context_length})")


def _shard_index(folder: str, files: dict[str, int]) -> Optional[dict]:
    if SHARD_INDEX not in files:
        return None
    try:
        return json.loads(read_bytes(join_url(folder, SHARD_INDEX)))
    except (OSError, ValueError):
        return None


def first_key(url: str) -> Optional[str]:
    """The key of the first member of the tar at `url`: one header read, not the shard."""
    try:
        with open_url(url) as f:
            for member in TarStream(f).members():
                return split_key(member.name)[0]
    except (OSError, TarFormatError, EOFError):
        return None
    return None


def spot_checked(names: list[str], sample: Optional[int]) -> list[str]:
    """The shards whose first keys are read: all (`sample` None) or `sample` spread evenly."""
    if sample is None or len(names) <= sample:
        return names
    step = (len(names) - 1) / max(sample - 1, 1)
    return list(dict.fromkeys(names[round(i * step)] for i in range(sample)))


def _first_keys(urls: list[str]) -> dict[str, Optional[str]]:
    with concurrent.futures.ThreadPoolExecutor(READ_THREADS) as pool:
        return dict(zip(urls, pool.map(first_key, urls)))


def _check_alignment(key: str, folder: str, urls: list[str], have: list[str], files: dict[str, int], index: dict,
                     listings: dict, counts, report: Report, key_sample: Optional[int], read_images: bool) -> None:
    by_name = dict(zip((url_basename(u) for u in urls), urls))
    unrecorded, moved, rewritten, changed, miscounted = [], [], [], [], []
    # keys: the first key of a spread of embedding shards (and of their image shards, where the
    # stage reads them) against what precompute recorded: finds shards swapped or rewritten
    # whose sizes happen to agree
    sampled = [n for n in spot_checked(have, key_sample) if n in index]
    emb_keys = _first_keys([join_url(folder, n) for n in sampled])
    img_keys = _first_keys([by_name[n] for n in sampled]) if read_images else {}
    for name in sampled:
        record, found = index[name], emb_keys[join_url(folder, name)]
        if record.get("first_key") is not None and found is not None and found != record["first_key"]:
            rewritten.append(f"{name} (first key {found!r}, recorded {record['first_key']!r})")
        found = img_keys.get(by_name[name])
        if record.get("source_first_key") is not None and found is not None and found != record["source_first_key"]:
            changed.append(f"{name} (first key {found!r}, {record['source_first_key']!r} then)")
    for name in have:
        record = index.get(name)
        if record is None:
            unrecorded.append(name)
            continue
        if record.get("source", name) != name:
            moved.append(f"{name} (computed from {record['source']})")
        if record.get("bytes") is not None and record["bytes"] != files[name] and not any(
                r.startswith(f"{name} ") for r in rewritten):
            rewritten.append(f"{name} ({record['bytes']} bytes recorded, {files[name]} now)")
        url = by_name[name]
        image_bytes = listings.get(url_dirname(url), {}).get(name)
        if record.get("source_bytes") is not None and image_bytes is not None and image_bytes != record["source_bytes"] \
                and not any(r.startswith(f"{name} ") for r in changed):
            changed.append(f"{name} ({record['source_bytes']} bytes then, {image_bytes} now)")
        image_count = counts.shards[url].samples
        embedded = record["count"] + sum(record.get("skipped", {}).values())
        if image_count is not None and embedded != image_count:
            miscounted.append(f"{name} ({image_count} samples, {record['count']} embedded + "
                              f"{embedded - record['count']} skipped)")
    where = mask_url(folder)
    for items, text in ((unrecorded, f"not in {where}/{SHARD_INDEX} (precompute did not finish them)"),
                        (moved, "computed from another image shard: reordered or renamed"),
                        (rewritten, "not what precompute wrote there: swapped, reordered or rewritten since"),
                        (changed, "image shard changed since its embeddings were computed"),
                        (miscounted, "counts differ between the image shard and its embeddings")):
        if items:
            report.problem(f"{key}: {len(items)} embedding shard(s) {text}: {named(items)}")


def _check_clip_retrieval(key: str, src: SourceConfig, want: frozenset, expect: Optional[ClipExpectation],
                          report: Report) -> int:
    root = src.shards if isinstance(src.shards, str) else src.shards[0]
    where = mask_url(root)
    lacking = sorted(want & {"image", "text_encodings"})
    if lacking:
        report.problem(f"{key}: a clip-retrieval folder has no {lacking}")
    listing = {sub: set(list_dir(join_url(root, sub))) for sub in ("img_emb", "text_emb", "metadata")}
    parts = sorted((n[len("img_emb_"):-len(".npy")] for n in listing["img_emb"]
                    if n.startswith("img_emb_") and n.endswith(".npy")), key=int)
    if not parts:
        report.problem(f"{key}.shards: {where} has no img_emb/img_emb_*.npy (clip-retrieval layout)")
        return 0
    no_text = [p for p in parts if f"text_emb_{p}.npy" not in listing["text_emb"]]
    no_meta = [p for p in parts if f"metadata_{p}.parquet" not in listing["metadata"]]
    if no_text and "text_embed" in want:
        report.problem(f"{key}: {len(no_text)} part(s) of {where} have no text_emb: {named(no_text)}")
    if no_meta and "caption" in want:
        report.problem(f"{key}: {len(no_meta)} part(s) of {where} have no metadata parquet: {named(no_meta)}")
    try:
        first = NpyRows(join_url(root, f"img_emb/img_emb_{parts[0]}.npy"))
        dim = first.dim
        first.close()
    except (OSError, ValueError) as err:
        report.problem(f"{key}: {where} part {parts[0]}: {err}")
        return len(parts)
    if expect is not None and dim != expect.embed_dim:
        report.problem(f"{key}: {where} has embedding width {dim}, but "
                       f"{expect.where.get('embed_dim', 'model.embed_dim')} is {expect.embed_dim}")
    report.note(f"{key}: clip-retrieval folder {where}: {len(parts)} part(s), D={dim}")
    return len(parts)
