"""data_pipeline/embeddings.py: joined image+embedding streams, embedding-only streams, and the
clip-retrieval / LAION layout, with bad embeddings skipped and counted."""

from __future__ import annotations

import collections
import io
import os
import shutil

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from data_pipeline.config import DataConfig, PrecomputeConfig, SourceConfig
from data_pipeline.decode import encode_npy
from data_pipeline.embeddings import IMG_EMB, TXT_EMB, iter_clip_retrieval, iter_joined
from data_pipeline.precompute import run_precompute
from data_pipeline.shards import write_shards
from data_pipeline.stats import SkipCounter
from data_pipeline.stream import build_loader
from data_pipeline.tario import TarWriter, iter_tar
from models.clip import ClipConfig, load_clip


@pytest.fixture(scope="module")
def clip():
    torch.manual_seed(0)
    return load_clip("unclip-tiny")


@pytest.fixture(scope="module")
def dataset(clip, tmp_path_factory):
    root = tmp_path_factory.mktemp("data")
    shards = write_shards("shapes", str(root / "img"), per_shard=5, count=12, size=32).shards
    cfg = PrecomputeConfig(clip=ClipConfig(name="unclip-tiny"), batch_size=4, num_workers=0, text_encodings=True)
    run_precompute(cfg, shards=shards, out=str(root / "emb"), clip=clip, progress=False)
    return root, shards


def stored(root):
    """{key: (image_embed, text_embed)} straight from the embedding shards."""
    out = {}
    for name in sorted(os.listdir(root / "emb")):
        if name.endswith(".tar"):
            for s in iter_tar(str(root / "emb" / name), SkipCounter()):
                out[s.key] = tuple(np.load(io.BytesIO(s.fields[f]), allow_pickle=False).astype(np.float32)
                                   for f in (IMG_EMB, TXT_EMB))
    return out


def test_decoder_stream_joins_images_and_embeddings_by_key(clip, dataset):
    root, shards = dataset
    data = DataConfig(sources=[SourceConfig(shards=shards, embeddings=str(root / "emb"))], resampled=False,
                      shuffle_buffer=5, num_workers=0, image_size=32)
    loader = build_loader(data, batch_size=4, want={"image", "image_embed", "text_embed", "text_mask", "tokens"},
                          tokenizer=clip.tokenize)
    truth, seen = stored(root), []
    for batch in loader:
        assert batch["text_encodings"].shape[1:] == (32, 64) and batch["text_mask"].dtype == torch.bool
        assert torch.equal(batch["text_mask"], batch["tokens"] != 0)
        assert torch.all(batch["text_encodings"][~batch["text_mask"]] == 0)
        for i, key in enumerate(batch["key"]):
            assert torch.equal(batch["image_embed"][i], torch.from_numpy(truth[key][0]))
            assert torch.equal(batch["text_embed"][i], torch.from_numpy(truth[key][1]))
        # the image in the batch is the one that was embedded
        torch.testing.assert_close(clip.encode_image(batch["image"]), batch["image_embed"], atol=3e-3, rtol=0)
        seen += batch["key"]
    assert sorted(seen) == sorted(truth) and len(seen) == 12


def test_prior_stream_reads_embeddings_alone(dataset, tmp_path):
    root, shards = dataset
    emb = tmp_path / "emb"
    shutil.copytree(root / "emb", emb)
    data = DataConfig(sources=[SourceConfig(shards=[str(tmp_path / "gone" / os.path.basename(s)) for s in shards],
                                            embeddings=str(emb))], resampled=False, num_workers=0)
    loader = build_loader(data, batch_size=5, want={"image_embed", "text_embed", "caption"})
    truth = stored(root)
    keys = [k for batch in loader for k in batch["key"]]  # image shards do not exist: never opened
    assert sorted(keys) == sorted(truth)
    assert loader.samples_per_epoch == 12 and loader.skipped == {}


def test_bad_embeddings_are_skipped_by_reason(dataset, tmp_path):
    root, shards = dataset
    emb = tmp_path / "emb"
    shutil.copytree(root / "emb", emb)
    name = os.path.basename(shards[0])
    samples = list(iter_tar(str(emb / name), SkipCounter()))
    with TarWriter(str(emb / name)) as w:
        for i, s in enumerate(samples):
            fields = dict(s.fields)
            if i == 0:
                del fields[IMG_EMB]
            elif i == 1:
                fields[TXT_EMB] = encode_npy(np.full(64, np.nan, np.float16))
            elif i == 2:
                fields[IMG_EMB] = encode_npy(np.zeros(32, np.float16))
            elif i == 3:
                fields[IMG_EMB] = b"\x93NUMPY garbage"
            w.write(s.key, fields)
    data = DataConfig(sources=[SourceConfig(shards=shards, embeddings=str(emb))], resampled=False, num_workers=0,
                      image_size=32)
    loader = build_loader(data, batch_size=4, want={"image", "image_embed", "text_embed"})
    keys = [k for batch in loader for k in batch["key"]]
    assert len(keys) == 8
    assert loader.skipped == {"missing_embedding": 1, "nan_embedding": 1, "embedding_dim_mismatch": 1,
                              "bad_embedding": 1}


def test_join_survives_missing_and_extra_embedding_records(tmp_path):
    with TarWriter(str(tmp_path / "img.tar")) as w:
        for k in "abcde":
            w.write(k, {"txt": k.encode()})
    os.mkdir(tmp_path / "emb")
    with TarWriter(str(tmp_path / "emb" / "img.tar")) as w:
        for k in ["a", "x", "c", "d", "e", "z"]:  # b missing, x and z not in the image shard
            w.write(k, {IMG_EMB: k.encode()})
    joined = list(iter_joined(str(tmp_path / "img.tar"), str(tmp_path / "emb"), SkipCounter()))
    assert [(s.key, s.fields.get(IMG_EMB)) for s in joined] == [
        ("a", b"a"), ("b", None), ("c", b"c"), ("d", b"d"), ("e", b"e")]


def write_clip_retrieval(root, parts=(5, 3), dim=16, seed=0):
    """A small folder in clip-retrieval's layout; returns {key: (img, txt, caption)}."""
    rng = np.random.default_rng(seed)
    for sub in ("img_emb", "text_emb", "metadata"):
        os.makedirs(root / sub, exist_ok=True)
    truth = {}
    for part, rows in enumerate(parts):
        img = rng.standard_normal((rows, dim)).astype(np.float16)
        txt = rng.standard_normal((rows, dim)).astype(np.float16)
        captions = [f"part {part} row {r}" for r in range(rows)]
        np.save(root / "img_emb" / f"img_emb_{part}.npy", img)
        np.save(root / "text_emb" / f"text_emb_{part}.npy", txt)
        pq.write_table(pa.table({"caption": captions, "url": ["http://x"] * rows}),
                       root / "metadata" / f"metadata_{part}.parquet")
        for r in range(rows):
            truth[f"{part}_{r:09d}"] = (img[r].astype(np.float32), txt[r].astype(np.float32), captions[r])
    return truth


def test_clip_retrieval_folder_streams_for_the_prior(tmp_path):
    truth = write_clip_retrieval(tmp_path)
    data = DataConfig(sources=[SourceConfig(shards=str(tmp_path), format="clip-retrieval")], resampled=False,
                      num_workers=0, shuffle_buffer=3)
    loader = build_loader(data, batch_size=3, want={"image_embed", "text_embed", "caption"})
    seen = collections.Counter()
    for batch in loader:
        for i, key in enumerate(batch["key"]):
            img, txt, caption = truth[key]
            assert torch.equal(batch["image_embed"][i], torch.from_numpy(img))
            assert torch.equal(batch["text_embed"][i], torch.from_numpy(txt))
            assert batch["caption"][i] == caption
            seen[key] += 1
    assert set(seen) == set(truth) and max(seen.values()) == 1
    with pytest.raises(ValueError, match="clip-retrieval folder has no"):
        build_loader(data, batch_size=3, want={"image", "image_embed"})


def test_clip_retrieval_reads_from_a_row_and_in_chunks(tmp_path):
    truth = write_clip_retrieval(tmp_path, parts=(11,))
    rows = list(iter_clip_retrieval(str(tmp_path), "0", SkipCounter(), start=4, chunk=3))
    assert [r.key for r in rows] == [f"0_{i:09d}" for i in range(4, 11)]
    assert all(np.array_equal(r.fields["img_emb"].astype(np.float32), truth[r.key][0]) for r in rows)
    os.remove(tmp_path / "text_emb" / "text_emb_0.npy")
    skips = SkipCounter()
    assert list(iter_clip_retrieval(str(tmp_path), "0", skips)) == []
    assert skips.as_dict() == {"unreadable_source": 1}
