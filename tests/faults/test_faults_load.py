"""A slow, lossy source: an HTTP server on 127.0.0.1 that throttles every response and drops
10% of requests (half answered 503, half cut off mid-body). The loader (2 ranks) and
precompute retry with backoff, complete, and account for every sample: delivered or counted
as skipped. Credentials in the URLs never reach the logs.

The single-failure cases (one 503, one cut) are in tests/test_stream.py::test_flaky_http_is_retried.
"""

from __future__ import annotations

import collections
import functools
import http.server
import logging
import threading
import time

import pytest

from data_pipeline import shapes
from data_pipeline.config import DataConfig, SourceConfig
from data_pipeline.shards import write_shards
from data_pipeline.stream import build_loader
from data_pipeline.tario import TarWriter

pytestmark = pytest.mark.faults

CHUNK, CHUNK_DELAY_S = 1024, 0.002  # <= 0.5 MB/s per connection


class Lossy(http.server.SimpleHTTPRequestHandler):
    """Request n (counted over the server's life) fails if n % 20 == 3 (503) or n % 20 == 13
    (headers promise the whole file, half the body is sent, the connection closes)."""

    lock = threading.Lock()
    count = 0
    outcomes: collections.Counter = collections.Counter()

    def log_message(self, *args):
        pass

    def do_GET(self):
        with self.lock:
            n = Lossy.count
            Lossy.count += 1
        path = self.translate_path(self.path)
        try:
            data = open(path, "rb").read()
        except OSError:
            self.send_error(404)
            return
        if n % 20 == 3:
            self.outcomes["503"] += 1
            self.send_error(503)
            return
        cut = n % 20 == 13
        self.outcomes["cut" if cut else "ok"] += 1
        self.send_response(200)
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        body = data[: len(data) // 2] if cut else data
        for i in range(0, len(body), CHUNK):
            self.wfile.write(body[i : i + CHUNK])
            self.wfile.flush()
            time.sleep(CHUNK_DELAY_S)
        if cut:
            self.close_connection = True


@pytest.fixture
def lossy_server(tmp_path):
    """(folder served, base URL with credentials, total samples, bad samples)."""
    root = tmp_path / "www"
    root.mkdir()
    write_shards("shapes", str(root), per_shard=3, count=48, size=32)
    with TarWriter(str(root / "shard-000016.tar")) as w:  # same folder: a shard with 2 bad samples
        for i in range(4):
            w.write(f"extra{i}", {"png": _png(i), "txt": f"extra {i}".encode()})
        w.write("broken", {"png": b"\x89PNG\r\n\x1a\n not an image", "txt": b"broken"})
        w.write("silent", {"png": _png(9)})
    sizes = root / "sizes.json"
    sizes.write_text(sizes.read_text().replace("}", ', "shard-000016.tar": 6}'))
    Lossy.count = 0
    Lossy.outcomes.clear()
    srv = http.server.ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(Lossy, directory=str(root)))
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    try:
        yield root, f"http://alice:hunter2@127.0.0.1:{srv.server_port}", 48 + 6, 2
    finally:
        srv.shutdown()
        srv.server_close()


def _png(i: int) -> bytes:
    import io

    buf = io.BytesIO()
    shapes.render(shapes.attributes(3, i), 32).save(buf, format="PNG")
    return buf.getvalue()


def test_loader_on_a_lossy_source_delivers_or_counts_every_sample(lossy_server, caplog):
    _, base, total, bad = lossy_server
    urls = f"{base}/shard-{{000000..000016}}.tar"
    cfg = DataConfig(sources=[SourceConfig(shards=urls)], resampled=False, shuffle_buffer=10, num_workers=0,
                     image_size=16)
    delivered, skipped = collections.Counter(), collections.Counter()
    started = time.monotonic()
    with caplog.at_level(logging.INFO):
        for rank in range(2):
            loader = build_loader(cfg, batch_size=5, rank=rank, world_size=2, want={"image", "caption"})
            delivered.update(k for batch in loader for k in batch["key"])
            skipped.update(loader.skipped)
    elapsed = time.monotonic() - started
    assert max(delivered.values()) == 1 and sum(delivered.values()) + sum(skipped.values()) == total
    assert skipped == {"undecodable_image": 1, "missing_caption": 1} and len(delivered) == total - bad
    assert set(delivered) >= {shapes.make_key(0, i) for i in range(48)}
    assert Lossy.outcomes["503"] >= 1 and Lossy.outcomes["cut"] >= 1, Lossy.outcomes  # faults happened
    assert "retry" in caplog.text  # with backoff, logged
    assert "hunter2" not in caplog.text
    print(f"loader: {Lossy.count} requests, {dict(Lossy.outcomes)}, {elapsed:.1f}s")


def test_precompute_on_a_lossy_source_completes_and_accounts_for_every_sample(lossy_server, tmp_path, caplog, capsys):
    import torch

    from data_pipeline.config import PrecomputeConfig
    from data_pipeline.precompute import run_precompute
    from models.clip import ClipConfig, load_clip

    _, base, total, bad = lossy_server
    torch.manual_seed(0)
    clip = load_clip("unclip-tiny")
    cfg = PrecomputeConfig(clip=ClipConfig(name="unclip-tiny"), batch_size=8, num_workers=0, device="cpu")
    out = tmp_path / "emb"
    with caplog.at_level(logging.INFO):
        summary = run_precompute(cfg, shards=f"{base}/shard-{{000000..000016}}.tar", out=str(out), clip=clip,
                                 progress=True)
    assert summary.shards_written == 17 and summary.samples == total - bad
    assert summary.samples + sum(summary.skipped.values()) == total
    assert (out / "_SUCCESS").is_file()
    assert Lossy.outcomes["503"] >= 1 and Lossy.outcomes["cut"] >= 1, Lossy.outcomes
    captured = capsys.readouterr()
    assert "hunter2" not in caplog.text + captured.out + captured.err + summary.summary()
