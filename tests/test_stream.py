"""data_pipeline/stream.py: exactly-once epochs, bad data skipped and counted, exact resumption,
mixing, and the same behaviour over local, memory:// and HTTP URLs."""

from __future__ import annotations

import collections
import functools
import http.server
import io
import logging
import struct
import threading
import zlib

import fsspec
import pytest
import torch

from data_pipeline import shapes
from data_pipeline.config import DataConfig, SourceConfig
from data_pipeline.io import expand_urls, mask_url
from data_pipeline.shards import write_shards
from data_pipeline.sources import plan_sources
from data_pipeline.stats import SkipCounter
from data_pipeline.stream import EmptySourceError, SlotStream, build_loader
from data_pipeline.tario import TarWriter, iter_tar


def make_shapes(url, count=40, per_shard=5, seed=0, size=16):
    return write_shards("shapes", url, per_shard=per_shard, count=count, size=size, seed=seed).shards


def config(shards, **kw):
    kw.setdefault("num_workers", 0)
    kw.setdefault("image_size", 16)
    return DataConfig(sources=[SourceConfig(shards=shards)], **kw)


def keys_of(loader):
    return [k for batch in loader for k in batch["key"]]


def test_epoch_mode_splits_exactly_once_across_2_nodes_x_2_workers(tmp_path):
    shards = make_shapes(str(tmp_path), count=43)
    cfg = config(shards, resampled=False, shuffle_buffer=6, num_workers=2)
    plans, _ = plan_sources(cfg, frozenset({"key"}))
    epochs = []
    for epoch in range(2):
        seen = collections.Counter()
        for slot in range(4):  # rank r, worker w -> slot 2r + w
            state = {"epoch": epoch, "block": 0, "emitted": 0, "cursors": [None]}
            stream = SlotStream(plans, slot, 4, seed=0, resampled=False, shuffle_buffer=6, skips=SkipCounter(), state=state)
            seen.update(r.key for r in stream)
        assert set(seen) == {shapes.make_key(0, i) for i in range(43)} and max(seen.values()) == 1
        epochs.append(seen)
    # the shuffle differs between epochs (order within each slot changes)
    orders = []
    for epoch in range(2):
        state = {"epoch": epoch, "block": 0, "emitted": 0, "cursors": [None]}
        orders.append([r.key for r in SlotStream(plans, 0, 4, seed=0, resampled=False, shuffle_buffer=6,
                                                 skips=SkipCounter(), state=state)])
    assert orders[0] != orders[1]


@pytest.mark.slow
def test_folder_round_trip_with_real_workers_exactly_once(tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    for i in range(30):
        img, cap = shapes.render(shapes.attributes(0, i), 20), f"caption {i}"
        img.save(src / f"s{i:03d}.jpg")
        (src / f"s{i:03d}.txt").write_text(cap)
    report = write_shards(f"folder:{src}", str(tmp_path / "out"), per_shard=4)
    cfg = config(report.shards, resampled=False, shuffle_buffer=5, num_workers=2)
    for _epoch in range(2):
        seen = collections.Counter()
        loaders = [build_loader(cfg, batch_size=3, rank=r, world_size=2, want={"image", "caption"}) for r in range(2)]
        for loader in loaders:
            for batch in loader:
                assert batch["image"].shape[1:] == (3, 16, 16)
                assert batch["image"].min() >= -1 and batch["image"].max() <= 1
                assert all(c == f"caption {int(k[1:])}" for k, c in zip(batch["key"], batch["caption"]))
                seen.update(batch["key"])
        assert set(seen) == {f"s{i:03d}" for i in range(30)} and max(seen.values()) == 1
        assert loaders[0].samples_per_epoch == 15


def _jpeg(seed) -> bytes:
    buf = io.BytesIO()
    shapes.render(shapes.attributes(0, seed), 16).save(buf, format="JPEG")
    return buf.getvalue()


def _bomb_png(side=20000) -> bytes:
    """A valid 1-bit PNG of side x side pixels: ~50 KB on disk, 400M pixels decoded."""
    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    raw = zlib.compress(b"\x00" * ((side // 8 + 1) * side), 9)
    ihdr = struct.pack(">IIBBBBB", side, side, 1, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", raw) + chunk(b"IEND", b"")


def write_bad_shards(folder):
    """Two shards: good samples g0..g9 around one of each kind of bad sample; the second
    shard is truncated in the middle of a member. Returns (urls, good keys)."""
    good = []
    with TarWriter(f"{folder}/bad-000000.tar") as w:
        for i in range(6):
            w.write(f"g{i}", {"jpg": _jpeg(i), "txt": f"good {i}".encode()})
            good.append(f"g{i}")
        w.write("garbage", {"jpg": b"\xff\xd8\xff\xe0" + bytes(range(256)) * 4, "txt": b"garbage"})
        w.write("nocaption", {"jpg": _jpeg(1)})
        w.write("noimage", {"txt": b"just text"})
        w.write("latin1", {"jpg": _jpeg(2), "txt": "café".encode("latin-1")})
        w.write("hugecaption", {"jpg": _jpeg(3), "txt": b"word " * (2 * 2**20)})  # 10 MB
        w.write("bomb", {"png": _bomb_png(), "txt": b"bomb"})
    path = f"{folder}/bad-000001.tar"
    with TarWriter(path) as w:
        for i in range(6, 10):
            w.write(f"g{i}", {"jpg": _jpeg(i), "txt": f"good {i}".encode()})
        w.write("lost", {"jpg": b"x" * 5000, "txt": b"lost"})
    data = open(path, "rb").read()
    cut = data.index(b"x" * 5000) + 2000
    with open(path, "wb") as f:
        f.write(data[:cut])
    return [f"{folder}/bad-000000.tar", path], [f"g{i}" for i in range(10)]


def test_corrupt_inputs_are_skipped_counted_and_the_rest_delivered(tmp_path, caplog):
    urls, good = write_bad_shards(tmp_path)
    loader = build_loader(config(urls, resampled=False, shuffle_buffer=4), batch_size=4,
                          want={"image", "caption"}, world_size=1)
    with caplog.at_level(logging.WARNING):
        got = keys_of(loader)
    assert sorted(got) == good
    assert loader.skipped == {"undecodable_image": 1, "missing_caption": 1, "missing_image": 1,
                              "caption_not_utf8": 1, "caption_too_long": 1, "image_too_large": 1,
                              "truncated_tar": 1}
    assert len(caplog.records) <= 10  # one line per reason, not per sample


def test_skips_are_logged_rate_limited(caplog):
    counter = SkipCounter(log_every=100)
    with caplog.at_level(logging.WARNING):
        for _ in range(1000):
            counter.skip("undecodable_image", "x")
    assert counter.as_dict() == {"undecodable_image": 1000}
    assert len(caplog.records) == 11  # the first, then every 100th


def test_source_that_yields_nothing_is_an_error(tmp_path):
    for i in range(2):
        (tmp_path / f"junk-{i}.tar").write_bytes(b"this is not a tar file" * 100)
    urls = [str(tmp_path / f"junk-{i}.tar") for i in range(2)]
    for resampled in (False, True):
        loader = build_loader(config(urls, resampled=resampled), batch_size=2, want={"caption"})
        with pytest.raises(EmptySourceError, match=r"data.sources\[0\]"):
            keys_of(loader)


def _take(iterator, n):
    return [next(iterator)["key"] for _ in range(n)]


@pytest.mark.parametrize("resampled", [False, True])
def test_restored_position_continues_with_unconsumed_samples(tmp_path, resampled):
    shards = make_shapes(str(tmp_path), count=37)
    cfg = config(shards, resampled=resampled, shuffle_buffer=7)
    reference = build_loader(cfg, batch_size=3, want={"caption"})
    it = iter(reference)
    full = _take(it, 18 if resampled else 13)  # 13 batches = the whole epoch of 37
    first = build_loader(cfg, batch_size=3, want={"caption"})
    it = iter(first)
    head = _take(it, 5)
    state = first.state_dict()
    resumed = build_loader(cfg, batch_size=3, want={"caption"}, state=state)
    tail = _take(iter(resumed), len(full) - 5)
    assert head + tail == full
    if not resampled:
        flat = [k for b in head + tail for k in b]
        assert sorted(flat) == sorted(shapes.make_key(0, i) for i in range(37))


@pytest.mark.slow
def test_restored_position_with_workers_is_exact(tmp_path):
    shards = make_shapes(str(tmp_path), count=60)
    cfg = config(shards, resampled=True, shuffle_buffer=5, num_workers=2)
    full = _take(iter(build_loader(cfg, batch_size=2, want={"caption"})), 16)
    first = build_loader(cfg, batch_size=2, want={"caption"})
    head = _take(iter(first), 7)  # an odd count: the next batch is due from the other worker
    tail = _take(iter(build_loader(cfg, batch_size=2, want={"caption"}, state=first.state_dict())), 9)
    assert head + tail == full
    with pytest.raises(ValueError, match="worker"):
        build_loader(config(shards, num_workers=1), batch_size=2, state=first.state_dict())


def test_sources_mix_by_weight(tmp_path):
    a = make_shapes(str(tmp_path / "a"), count=20, seed=1)
    b = make_shapes(str(tmp_path / "b"), count=20, seed=2)
    cfg = DataConfig(sources=[SourceConfig(shards=a, weight=3.0), SourceConfig(shards=b, weight=1.0)],
                     resampled=True, shuffle_buffer=50, num_workers=0)
    it = iter(build_loader(cfg, batch_size=50, want={"caption"}))
    keys = [k for _ in range(16) for k in next(it)["key"]]
    share = sum(k.startswith("shapes_1_") for k in keys) / len(keys)
    assert 0.70 < share < 0.80


def test_tokens_and_images_in_the_batch_contract(tmp_path):
    from models.clip import load_clip

    clip = load_clip("unclip-tiny")
    shards = make_shapes(str(tmp_path), count=8, size=40)
    loader = build_loader(config(shards, resampled=False, image_size=24), batch_size=8,
                          want={"image", "tokens"}, tokenizer=clip.tokenize)
    batch = next(iter(loader))
    assert batch["tokens"].dtype == torch.long and batch["tokens"].shape == (8, clip.context_length)
    assert torch.equal(batch["tokens"], clip.tokenize(batch["caption"]))
    assert batch["image"].shape == (8, 3, 24, 24) and batch["image"].dtype == torch.float32
    assert all(c == shapes.attributes_for_key(k).caption for k, c in zip(batch["key"], batch["caption"]))
    with pytest.raises(ValueError, match="tokenizer"):
        build_loader(config(shards), batch_size=2, want={"tokens"})
    with pytest.raises(ValueError, match="embeddings"):
        build_loader(config(shards), batch_size=2, want={"image_embed"})


def test_memory_urls_and_brace_patterns(tmp_path):
    make_shapes("memory://streamtest/shards", count=12, per_shard=4)
    pattern = "memory://streamtest/shards/shard-{000000..000002}.tar"
    assert len(expand_urls(pattern)) == 3
    loader = build_loader(config(pattern, resampled=False), batch_size=5, want={"image", "caption"})
    assert sorted(keys_of(loader)) == sorted(shapes.make_key(0, i) for i in range(12))
    assert loader.samples_per_epoch == 12


def test_webdataset_reads_our_shards_and_we_read_its(tmp_path):
    """webdataset (the test extra) is the format's reference: each side reads the other's shards."""
    import webdataset as wds

    make_shapes(str(tmp_path / "ours"), count=6, per_shard=3)
    ours = sorted(str(p) for p in (tmp_path / "ours").glob("*.tar"))
    theirs = list(wds.WebDataset(ours, shardshuffle=False, empty_check=False))
    assert [s["__key__"] for s in theirs] == [shapes.make_key(0, i) for i in range(6)]
    assert all(s["txt"] and s["png"].startswith(b"\x89PNG") for s in theirs)
    written = tmp_path / "theirs.tar"
    with wds.TarWriter(str(written)) as sink:
        for s in theirs:
            sink.write({"__key__": s["__key__"], "png": s["png"], "txt": s["txt"], "json": b'{"a": 1}'})
    skips = SkipCounter()
    back = list(iter_tar(str(written), skips))
    assert [r.key for r in back] == [s["__key__"] for s in theirs] and not skips.as_dict()
    assert [r.fields["png"] for r in back] == [s["png"] for s in theirs]
    assert {tuple(sorted(r.fields)) for r in back} == {("json", "png", "txt")}


class _Quiet(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args):
        pass


class _Flaky(_Quiet):
    """Fails the first GET of each file with 503, cuts the second one off mid-body."""

    hits: collections.Counter = collections.Counter()

    def do_GET(self):
        n = self.hits[self.path]
        self.hits[self.path] += 1
        if n == 0:
            self.send_error(503)
            return
        if n == 1:
            data = open(self.translate_path(self.path), "rb").read()
            self.send_response(200)
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data[: len(data) // 2])
            self.wfile.flush()
            self.close_connection = True
            return
        super().do_GET()


@pytest.fixture
def http_root(tmp_path):
    servers = []

    def serve(handler):
        srv = http.server.ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(handler, directory=str(tmp_path)))
        threading.Thread(target=srv.serve_forever, daemon=True).start()
        servers.append(srv)
        return f"http://127.0.0.1:{srv.server_port}"

    yield tmp_path, serve
    for srv in servers:
        srv.shutdown()
        srv.server_close()


def test_http_urls_work_like_local_ones(http_root):
    root, serve = http_root
    make_shapes(str(root), count=10, per_shard=5)
    base = serve(_Quiet)
    loader = build_loader(config(f"{base}/shard-{{000000..000001}}.tar", resampled=False), batch_size=4,
                          want={"image", "caption"})
    assert sorted(keys_of(loader)) == sorted(shapes.make_key(0, i) for i in range(10))
    assert loader.samples_per_epoch == 10 and loader.skipped == {}


def test_flaky_http_is_retried(http_root):
    root, serve = http_root
    make_shapes(str(root), count=6, per_shard=6)
    _Flaky.hits.clear()
    base = serve(_Flaky)
    loader = build_loader(config(f"{base}/shard-000000.tar", resampled=False), batch_size=6, want={"caption"})
    assert sorted(keys_of(loader)) == sorted(shapes.make_key(0, i) for i in range(6))
    assert loader.skipped == {}


def test_credentials_are_masked_in_urls_and_logs(http_root, caplog):
    assert mask_url("https://user:hunter2@host/a.tar?X-Amz-Signature=abc&part=1") == \
        "https://***@host/a.tar?X-Amz-Signature=***&part=1"
    assert mask_url("s3://bucket/key.tar") == "s3://bucket/key.tar"
    _, serve = http_root
    base = serve(_Quiet).replace("http://", "http://alice:hunter2@")
    with caplog.at_level(logging.INFO):
        loader = build_loader(config(f"{base}/missing-000000.tar", resampled=False), batch_size=2, want={"caption"})
        with pytest.raises(EmptySourceError) as err:
            keys_of(loader)
    assert "hunter2" not in caplog.text and "hunter2" not in str(err.value)
    assert loader.skipped == {"unreadable_source": 1}
    root, _ = http_root
    with TarWriter(str(root / "mixed-000000.tar")) as w:
        w.write("good", {"jpg": _jpeg(0), "txt": b"good"})
        w.write("bad", {"jpg": b"\xff\xd8 garbage", "txt": b"bad"})
    caplog.clear()
    with caplog.at_level(logging.DEBUG):
        loader = build_loader(config(f"{base}/mixed-000000.tar", resampled=False), batch_size=2, want={"image"})
        assert keys_of(loader) == ["good"]
    assert loader.skipped == {"undecodable_image": 1} and "bad" in caplog.text and "hunter2" not in caplog.text


@pytest.fixture(autouse=True, scope="module")
def _clean_memory_filesystem():
    """fsspec's memory filesystem is process-global: leave nothing for other test modules."""
    yield
    fs = fsspec.filesystem("memory")
    if fs.exists("/streamtest"):
        fs.rm("/streamtest", recursive=True)


def test_position_saved_right_at_the_end_of_an_epoch_resumes_into_the_next(tmp_path):
    shards = make_shapes(str(tmp_path), count=36)
    cfg = config(shards, resampled=False, shuffle_buffer=6)
    first = build_loader(cfg, batch_size=4, want={"caption"})
    it = iter(first)
    epoch0 = [k for _ in range(9) for k in next(it)["key"]]  # all 36, iterator not yet exhausted
    assert sorted(epoch0) == sorted(shapes.make_key(0, i) for i in range(36))
    resumed = build_loader(cfg, batch_size=4, want={"caption"}, state=first.state_dict())
    epoch1 = keys_of(resumed)
    assert sorted(epoch1) == sorted(epoch0) and epoch1 != epoch0  # a whole new epoch, reshuffled
    assert sorted(keys_of(resumed)) == sorted(epoch0)  # and the one after
