"""data_pipeline/precompute.py: embeddings are CLIP's, aligned by key, resumable and idempotent."""

from __future__ import annotations

import io
import json
import os

import numpy as np
import pytest
import torch

from data_pipeline.config import PrecomputeConfig
from data_pipeline.decode import decode_image
from data_pipeline.embeddings import IMG_EMB, TXT_EMB, TXT_ENC, read_manifest
from data_pipeline.precompute import run_precompute
from data_pipeline.shards import write_shards
from data_pipeline.stats import SkipCounter
from data_pipeline.tario import TarWriter, iter_tar
from models.clip import ClipConfig, load_clip


@pytest.fixture(scope="module")
def clip():
    torch.manual_seed(0)
    return load_clip("unclip-tiny")


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    root = tmp_path_factory.mktemp("images")
    return write_shards("shapes", str(root), per_shard=4, count=14, size=40).shards


def cfg(**kw):
    base = dict(clip=ClipConfig(name="unclip-tiny"), batch_size=3, num_workers=0, text_encodings=True, device="cpu")
    base.update(kw)
    return PrecomputeConfig(**base)


def load_npy(data):
    return np.load(io.BytesIO(data), allow_pickle=False)


def outputs(folder):
    return {name: open(os.path.join(folder, name), "rb").read() for name in sorted(os.listdir(folder))}


def test_embeddings_match_clip_and_keep_the_shard_order(clip, shards, tmp_path):
    summary = run_precompute(cfg(), shards=shards, out=str(tmp_path), clip=clip, progress=False)
    assert (summary.samples, summary.shards_written, summary.skipped) == (14, 4, {})
    manifest = read_manifest(str(tmp_path))
    assert (manifest.embed_dim, manifest.text_width, manifest.context_length) == (64, 64, 32)
    assert json.loads((tmp_path / "sizes.json").read_text()) == {
        "shard-000000.tar": 4, "shard-000001.tar": 4, "shard-000002.tar": 4, "shard-000003.tar": 2}
    for shard in shards:
        images = list(iter_tar(shard, SkipCounter()))
        embeds = list(iter_tar(str(tmp_path / os.path.basename(shard)), SkipCounter()))
        assert [s.key for s in embeds] == [s.key for s in images]
        pixels = torch.stack([decode_image(s.fields["png"], clip.image_size) for s in images])
        captions = [s.fields["txt"].decode() for s in images]
        image_embed = clip.encode_image(pixels)
        text_embed, text_encodings, text_mask = clip.encode_text(captions)
        for i, e in enumerate(embeds):
            assert e.fields["txt"].decode() == captions[i]
            assert load_npy(e.fields[IMG_EMB]).dtype == np.float16
            np.testing.assert_allclose(load_npy(e.fields[IMG_EMB]), image_embed[i].numpy(), atol=2e-3)
            np.testing.assert_allclose(load_npy(e.fields[TXT_EMB]), text_embed[i].numpy(), atol=2e-3)
            enc = load_npy(e.fields[TXT_ENC])
            assert enc.shape == (int(text_mask[i].sum()), 64)
            np.testing.assert_allclose(enc, text_encodings[i, : enc.shape[0]].numpy(), atol=1e-2, rtol=1e-3)


class Killed(Exception):
    pass


def test_killed_and_restarted_equals_uninterrupted(clip, shards, tmp_path):
    clean, resumed = str(tmp_path / "clean"), str(tmp_path / "resumed")
    run_precompute(cfg(), shards=shards, out=clean, clip=clip, progress=False)

    def kill(n):
        if n == 3:  # mid-way through the second shard
            raise Killed

    with pytest.raises(Killed):
        run_precompute(cfg(), shards=shards, out=resumed, clip=clip, progress=False, on_batch=kill)
    done = sorted(os.listdir(resumed))
    assert done == ["embeddings.json", "shard-000000.tar", "shard-000000.tar.json"]  # nothing half-written
    # (an interrupted job writes neither sizes.json nor _SUCCESS)
    (tmp_path / "resumed" / "shard-000001.tar.tmp-deadbeef").write_bytes(b"left by a SIGKILL")
    summary = run_precompute(cfg(), shards=shards, out=resumed, clip=clip, progress=False)
    assert (summary.shards_already_done, summary.shards_written, summary.samples) == (1, 3, 10)
    assert outputs(resumed) == outputs(clean)
    again = run_precompute(cfg(), shards=shards, out=resumed, clip=clip, progress=False)
    assert (again.shards_written, again.samples) == (0, 0)  # idempotent


def test_ranks_split_the_shards_and_together_equal_one_run(clip, shards, tmp_path):
    one, two = str(tmp_path / "one"), str(tmp_path / "two")
    run_precompute(cfg(), shards=shards, out=one, clip=clip, progress=False)
    a = run_precompute(cfg(), shards=shards, out=two, rank=0, world_size=2, clip=clip, progress=False)
    assert not os.path.exists(os.path.join(two, "_SUCCESS"))  # half the shards are still missing
    b = run_precompute(cfg(), shards=shards, out=two, rank=1, world_size=2, clip=clip, progress=False)
    assert (a.shards_written, b.shards_written) == (2, 2) and a.samples + b.samples == 14
    assert os.path.exists(os.path.join(two, "_SUCCESS"))
    assert outputs(two) == outputs(one)


@pytest.mark.slow
def test_loader_workers_give_identical_output(clip, shards, tmp_path):
    run_precompute(cfg(), shards=shards, out=str(tmp_path / "a"), clip=clip, progress=False)
    run_precompute(cfg(num_workers=2), shards=shards, out=str(tmp_path / "b"), clip=clip, progress=False)
    assert outputs(tmp_path / "a") == outputs(tmp_path / "b")


def test_bad_samples_are_skipped_and_summarised(clip, tmp_path):
    good = write_shards("shapes", str(tmp_path / "img"), per_shard=10, count=3, size=32).shards[0]
    bad = str(tmp_path / "img" / "bad-000000.tar")
    with TarWriter(bad) as w:
        for s in iter_tar(good, SkipCounter()):
            w.write(s.key, s.fields)
        w.write("garbage", {"png": b"\x89PNG not really", "txt": b"x"})
        w.write("nocaption", {"png": next(iter_tar(good, SkipCounter())).fields["png"]})
    summary = run_precompute(cfg(), shards=[bad], out=str(tmp_path / "emb"), clip=clip, progress=False)
    assert summary.samples == 3
    assert summary.skipped == {"undecodable_image": 1, "missing_caption": 1}
    assert json.loads((tmp_path / "emb" / "bad-000000.tar.json").read_text()) == {
        "count": 3, "skipped": {"missing_caption": 1, "undecodable_image": 1}}


def test_refuses_to_mix_clips_and_bad_arguments(clip, shards, tmp_path):
    run_precompute(cfg(text_encodings=False), shards=shards[:1], out=str(tmp_path), clip=clip, progress=False)
    with pytest.raises(ValueError, match="another setup"):
        run_precompute(cfg(text_encodings=True), shards=shards[:1], out=str(tmp_path), clip=clip, progress=False)
    with pytest.raises(ValueError, match="shards"):
        run_precompute(cfg(), shards=[], out=str(tmp_path), clip=clip)
    with pytest.raises(ValueError, match="out"):
        run_precompute(cfg(), shards=shards, out="", clip=clip)


KILL_SCRIPT = """
import sys, time
from data_pipeline.config import PrecomputeConfig
from data_pipeline.precompute import run_precompute
from models.clip import ClipConfig
cfg = PrecomputeConfig(clip=ClipConfig(name="unclip-tiny"), batch_size=3, num_workers=0, text_encodings=True,
                       device="cpu")
def slow(n):
    print("batch", n, flush=True)
    time.sleep(0.3)
run_precompute(cfg, shards=sys.argv[1].split(","), out=sys.argv[2], progress=False, on_batch=slow)
"""


@pytest.mark.slow
def test_sigkill_mid_run_then_restart_equals_uninterrupted(clip, shards, tmp_path):
    import signal
    import subprocess
    import sys

    clean, killed = str(tmp_path / "clean"), str(tmp_path / "killed")
    script = tmp_path / "job.py"
    script.write_text("import torch\ntorch.manual_seed(0)\n" + KILL_SCRIPT)  # same random CLIP as below
    proc = subprocess.Popen([sys.executable, str(script), ",".join(shards), killed], stdout=subprocess.PIPE,
                            text=True, cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    for line in proc.stdout:
        if line.strip() == "batch 3":  # inside the second shard
            proc.send_signal(signal.SIGKILL)
            break
    proc.wait(timeout=60)
    left = sorted(os.listdir(killed))
    assert "shard-000000.tar" in left and "shard-000003.tar" not in left and "_SUCCESS" not in left
    torch.manual_seed(0)
    run_precompute(cfg(), shards=shards, out=killed, clip=load_clip("unclip-tiny"), progress=False)
    torch.manual_seed(0)
    run_precompute(cfg(), shards=shards, out=clean, clip=load_clip("unclip-tiny"), progress=False)
    assert outputs(killed) == outputs(clean)
