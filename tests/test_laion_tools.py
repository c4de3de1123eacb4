"""The field's own data tools, for real: img2dataset downloads from a local HTTP server (dead
links included) into shards that `unclip precompute` and training read as they are;
clip-retrieval's own writer makes a folder the prior trains on; our clip-retrieval export is
read back by embedding-reader, row for row. The tools run in their own virtual environment
(tests/laion_tools); training runs are real `unclip train` processes."""

from __future__ import annotations

import collections
import functools
import http.server
import io
import json
import os
import socket
import subprocess
import threading
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import yaml

from data_pipeline import shapes
from data_pipeline.config import DataConfig, SourceConfig
from data_pipeline.embeddings import IMG_EMB, TXT_EMB
from data_pipeline.stats import SkipCounter
from data_pipeline.stream import build_loader
from data_pipeline.tario import iter_tar
from tests.laion_tools import run, tools_python
from tests.helpers import TINY_DECODER, TINY_PRIOR, explain, latest_step, losses, merged, train, unclip, write_job

pytestmark = pytest.mark.slow

IMAGES, DEAD, PER_SHARD = 30, 3, 10  # + one refused connection, one file that is not an image


@pytest.fixture(scope="session")
def tools():
    return tools_python()


class _Quiet(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args):
        pass


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]  # nothing listens there once closed


@pytest.fixture(scope="module")
def downloaded(tools, tmp_path_factory):
    """img2dataset's webdataset output of 35 URLs served from 127.0.0.1."""
    root = tmp_path_factory.mktemp("img2dataset")
    site = root / "site"
    site.mkdir()
    rows = []
    for i in range(IMAGES):
        attrs = shapes.attributes(0, i)
        shapes.render(attrs, 40).save(site / f"img{i}.jpg", format="JPEG")
        rows.append((f"img{i}.jpg", attrs.caption))
    (site / "page.jpg").write_text("<html>not an image</html>")
    srv = http.server.ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(_Quiet, directory=str(site)))
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    base = f"http://127.0.0.1:{srv.server_port}"
    urls = [f"{base}/{name}" for name, _ in rows] + [f"{base}/missing{i}.jpg" for i in range(DEAD)]
    urls += [f"http://127.0.0.1:{_closed_port()}/refused.jpg", f"{base}/page.jpg"]
    captions = [c for _, c in rows] + [f"dead link {i}" for i in range(DEAD + 2)]
    pq.write_table(pa.table({"url": urls, "caption": captions}), root / "urls.parquet")
    out = root / "shards"
    cmd = [str(tools.parent / "img2dataset"), "--url_list", str(root / "urls.parquet"), "--input_format", "parquet",
           "--url_col", "url", "--caption_col", "caption", "--output_format", "webdataset", "--output_folder", str(out),
           "--image_size", "32", "--resize_mode", "center_crop", "--number_sample_per_shard", str(PER_SHARD),
           "--processes_count", "1", "--thread_count", "4", "--timeout", "5", "--retries", "0",
           "--enable_wandb", "False", "--distributor", "multiprocessing"]
    try:
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    finally:
        srv.shutdown()
        srv.server_close()
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return out, dict(zip(urls, captions))


def precompute_job(path: Path) -> Path:
    return write_job(path, {"stage": "precompute", "clip": {"name": "unclip-tiny"}, "batch_size": 16,
                            "text_encodings": True, "num_workers": 0, "device": "cpu"})


@pytest.fixture(scope="module")
def embedded(downloaded, tmp_path_factory):
    """`unclip precompute --format clip-retrieval` over img2dataset's shards, as a user runs it."""
    shards, _ = downloaded
    root = tmp_path_factory.mktemp("embedded")
    tars = sorted(p.name for p in shards.glob("*.tar"))
    done = unclip("precompute", "--config", str(precompute_job(root / "pre.yaml")), "--shards",
                  f"{shards}/{{{tars[0][:-4]}..{tars[-1][:-4]}}}.tar", "--out", str(root / "emb"),
                  "--format", "clip-retrieval", timeout=300)
    assert done.returncode == 0, explain(done)
    return root / "emb", [str(shards / t) for t in tars], done


def stored(emb: Path, tars: list[str]) -> list[tuple[str, str, np.ndarray, np.ndarray]]:
    """(key, caption, image_embed, text_embed) of every embedding shard, in shard order."""
    out = []
    for tar in tars:
        for s in iter_tar(str(emb / os.path.basename(tar)), SkipCounter()):
            out.append((s.key, s.fields["txt"].decode(), np.load(io.BytesIO(s.fields[IMG_EMB])),
                        np.load(io.BytesIO(s.fields[TXT_EMB]))))
    return out


def test_img2dataset_shards_are_counted_and_their_failed_downloads_reported(downloaded, embedded):
    shards, captions = downloaded
    emb, tars, precompute = embedded
    assert len(tars) == 4 and not (shards / "sizes.json").exists()
    stats = [json.loads(p.read_text()) for p in sorted(shards.glob("*_stats.json"))]
    failed = sum(s["failed_to_download"] for s in stats)
    assert (sum(s["successes"] for s in stats), failed, sum(s["failed_to_resize"] for s in stats)) == (IMAGES, DEAD + 1, 1)
    # img2dataset's failures are reported as such (not as bad samples of ours), from its own files
    assert f"{IMAGES} samples in 4 counted shard(s) (img2dataset: {failed} URL(s) failed to download, 1 failed " \
           "to resize" in precompute.stdout
    rows = stored(emb, tars)
    assert len(rows) == IMAGES and json.loads((emb / "sizes.json").read_text()) == {
        os.path.basename(t): s["successes"] for t, s in zip(tars, stats)}
    assert sorted(c for _, c, _, _ in rows) == sorted(captions[u] for u in captions if "/img" in u)
    # the preflight counts them from img2dataset's _stats.json and finds the embeddings aligned
    config = write_job(emb.parent / "decoder.yaml", decoder_job(tars, emb))
    done = unclip("check", "--config", str(config), timeout=120)
    assert done.returncode == 0, explain(done)
    assert f"4 shard(s), {IMAGES} samples in 4 counted shard(s) (img2dataset: {failed} URL(s) failed" in done.stdout
    assert f"4 embedding shard(s) aligned with the image shards, {IMAGES} samples, CLIP unclip-tiny" in done.stdout


def decoder_job(tars: list[str], emb: Path) -> dict:
    model = {**TINY_DECODER["model"], "image_embed_dim": 64, "text_width": 64, "max_text_len": 32}
    return merged(TINY_DECODER, model=model, clip={"name": "unclip-tiny"},
                  data={"sources": [{"shards": tars, "embeddings": str(emb)}], "image_size": 8, "num_workers": 0,
                        "shuffle_buffer": 8},
                  train={"steps": 4, "micro_batch_size": 4, "log_every": 1, "seed": 0},
                  deepspeed={"zero_stage": 2, "timeout_s": 60}, checkpoint={"every_steps": 4, "keep_last": 1})


def test_decoder_trains_on_img2dataset_shards_directly(embedded, tmp_path):
    emb, tars, _ = embedded
    config = write_job(tmp_path / "decoder.yaml", decoder_job(tars, emb))
    done = train(config, tmp_path / "run", nproc=1)
    assert done.returncode == 0, explain(done)
    assert sorted(losses(tmp_path / "run")) == [1, 2, 3, 4]


READ_BACK = """
import json, sys
import numpy as np
from embedding_reader import EmbeddingReader
root, out = sys.argv[1], sys.argv[2]
got = {}
for kind in ("img_emb", "text_emb"):
    reader = EmbeddingReader(f"{root}/{kind}", file_format="parquet_npy", metadata_folder=f"{root}/metadata",
                             meta_columns=["key", "caption"])
    rows, meta = [], []
    for embeddings, frame in reader(batch_size=7, start=0, end=reader.count, show_progress=False):
        rows.append(embeddings)
        meta += list(zip(frame["key"], frame["caption"]))
    got[kind] = np.concatenate(rows)
    got[kind + "_meta"] = meta
np.savez(out, img=got["img_emb"], txt=got["text_emb"])
json.dump({"img": got["img_emb_meta"], "txt": got["text_emb_meta"], "dim": reader.dimension}, open(out + ".json", "w"))
"""


def test_embedding_reader_reads_our_clip_retrieval_export_row_for_row(tools, embedded, tmp_path):
    emb, tars, _ = embedded
    assert sorted(os.listdir(emb / "img_emb")) == ["img_emb_0.npy", "img_emb_1.npy", "img_emb_2.npy", "img_emb_3.npy"]
    run(tools, READ_BACK, str(emb), str(tmp_path / "read"))
    arrays, meta = np.load(tmp_path / "read.npz"), json.loads((tmp_path / "read.json").read_text())
    rows = stored(emb, tars)
    assert meta["dim"] == 64 and len(meta["img"]) == len(rows) == IMAGES
    assert [tuple(m) for m in meta["img"]] == [tuple(m) for m in meta["txt"]] == [(k, c) for k, c, _, _ in rows]
    np.testing.assert_array_equal(arrays["img"], np.stack([r[2] for r in rows]))
    np.testing.assert_array_equal(arrays["txt"], np.stack([r[3] for r in rows]))


WRITE_WITH_CLIP_RETRIEVAL = """
import importlib.util, json, sys
import numpy as np
# clip-retrieval's own writer module, from the installed package (its package __init__ would
# import its whole inference and serving stack, which is not installed: see requirements.txt)
location = importlib.util.find_spec("clip_retrieval").submodule_search_locations[0]
spec = importlib.util.spec_from_file_location("clip_retrieval_writer", location + "/clip_inference/writer.py")
writer_module = importlib.util.module_from_spec(spec)
spec.loader.exec_module(writer_module)
src, out = sys.argv[1], sys.argv[2]
data, meta = np.load(src + ".npz"), json.load(open(src + ".json"))
parts = 2
bounds = np.linspace(0, len(meta), parts + 1).astype(int)
for part in range(parts):
    writer = writer_module.NumpyWriter(part, out, enable_text=True, enable_image=True, enable_metadata=True,
                                       output_partition_count=parts)
    lo, hi = bounds[part], bounds[part + 1]
    for start in range(lo, hi, 4):  # batches as its ClipMapper hands them to the writer
        end = min(start + 4, hi)
        writer({"image_embs": data["img"][start:end], "text_embs": data["txt"][start:end],
                "image_filename": [m["key"] for m in meta[start:end]], "text": [m["caption"] for m in meta[start:end]],
                "metadata": [json.dumps(m) for m in meta[start:end]]})
    writer.flush()
"""


def test_prior_trains_on_clip_retrievals_own_output_and_resumes_at_another_world_size(tools, downloaded, embedded,
                                                                                       tmp_path):
    shards, _ = downloaded
    emb, tars, _ = embedded
    # what clip-retrieval's inference hands its writer for img2dataset's webdataset: unit-norm
    # fp16 embeddings, the sample's key as image_filename, its caption, its json as metadata
    rows = stored(emb, tars)
    metadata = {s.key: json.loads(s.fields["json"]) for t in tars for s in iter_tar(t, SkipCounter())}
    np.savez(tmp_path / "batches.npz", img=np.stack([r[2] for r in rows]), txt=np.stack([r[3] for r in rows]))
    (tmp_path / "batches.json").write_text(json.dumps([metadata[k] for k, _, _, _ in rows]))
    folder = tmp_path / "clip-retrieval"
    run(tools, WRITE_WITH_CLIP_RETRIEVAL, str(tmp_path / "batches"), str(folder))
    assert sorted(os.listdir(folder / "metadata")) == ["metadata_0.parquet", "metadata_1.parquet"]
    data = DataConfig(sources=[SourceConfig(shards=str(folder), format="clip-retrieval")], resampled=False,
                      num_workers=0, shuffle_buffer=4)
    seen = collections.Counter()
    truth = {k: (c, i, t) for k, c, i, t in rows}
    for batch in build_loader(data, batch_size=5, want={"image_embed", "text_embed", "caption"}):
        for j, key in enumerate(batch["key"]):  # img2dataset's keys, carried through clip-retrieval
            caption, image_embed, _ = truth[key]
            assert batch["caption"][j] == caption
            np.testing.assert_array_equal(batch["image_embed"][j].numpy(), image_embed.astype(np.float32))
            seen[key] += 1
    assert seen == collections.Counter(truth.keys())
    # 2 ranks, a checkpoint by time only (every step here: all ranks agree, or one would hang in
    # the save), then resumed on 1 rank: the data position of both old ranks is carried over
    model = {**TINY_PRIOR["model"], "embed_dim": 64, "use_text_encodings": False}
    job = merged(TINY_PRIOR, model=model, clip={"name": "unclip-tiny"},
                 data={"sources": [{"shards": str(folder), "format": "clip-retrieval"}], "num_workers": 0,
                       "resampled": False, "shuffle_buffer": 4},
                 train={"steps": 3, "micro_batch_size": 4, "log_every": 1, "seed": 0},
                 checkpoint={"every_steps": None, "every_minutes": 1e-4, "keep_last": 5})
    config = write_job(tmp_path / "prior.yaml", job)
    first = train(config, tmp_path / "run", nproc=2)
    assert first.returncode == 0, explain(first)
    assert sorted(p.name for p in (tmp_path / "run" / "checkpoints").glob("step_*")) == [
        "step_0000001", "step_0000002", "step_0000003"]
    job["train"].update(steps=6, micro_batch_size=8)
    config.write_text(yaml.safe_dump(job))
    second = train(config, tmp_path / "run", nproc=1)
    assert second.returncode == 0, explain(second)
    assert "data position of 2 rank(s) x 1 worker(s) carried over" in second.stdout
    assert min(losses(tmp_path / "run")) == 1 and latest_step(tmp_path / "run") == 6
