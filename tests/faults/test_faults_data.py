"""Hostile shards through the loader and precompute: every bad member or sample is skipped and
counted by reason, nothing is written outside the output folder, memory stays bounded, and
the shard reader survives random bytes (hypothesis) without raising or hanging.

Already covered elsewhere (not repeated here): truncated tars, a decompression-bomb PNG, a
10 MB caption, non-UTF-8 captions, undecodable images (tests/test_stream.py::
test_corrupt_inputs_are_skipped_counted_and_the_rest_delivered), a source with nothing
readable (test_source_that_yields_nothing_is_an_error), precompute skips
(tests/test_precompute.py::test_bad_samples_are_skipped_and_summarised).
"""

from __future__ import annotations

import io
import os
import signal
import tarfile
import tracemalloc
import uuid
from contextlib import contextmanager
from pathlib import Path

import fsspec
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from data_pipeline import shapes
from data_pipeline.config import DataConfig, SourceConfig
from data_pipeline.decode import Skip, encode_npy
from data_pipeline.sources import ExampleSpec, to_example
from data_pipeline.stats import SkipCounter
from data_pipeline.stream import EmptySourceError, build_loader
from data_pipeline.tario import RawSample, iter_tar, is_safe_member_name

pytestmark = pytest.mark.faults


def jpeg(i: int, size: int = 16) -> bytes:
    buf = io.BytesIO()
    shapes.render(shapes.attributes(0, i), size).save(buf, format="JPEG")
    return buf.getvalue()


def write_raw_tar(path: Path, members: list, fmt=tarfile.GNU_FORMAT) -> str:
    """A tar written member by member with tarfile, names untouched (tarfile keeps `../` and
    leading `/` in TarInfo names; only `TarFile.add` would sanitise them). Each member is
    (name, data) or a ready TarInfo (links)."""
    with tarfile.open(path, "w", format=fmt) as tf:
        for member in members:
            if isinstance(member, tarfile.TarInfo):
                tf.addfile(member)
                continue
            name, data, *pax = member
            info = tarfile.TarInfo(name)
            info.size = len(data)
            if pax:
                info.pax_headers = pax[0]
            tf.addfile(info, io.BytesIO(data))
    return str(path)


def link(name: str, target: str, kind=tarfile.SYMTYPE) -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.type, info.linkname = kind, target
    return info


def hostile_shard(path: Path) -> tuple[str, list[str], dict[str, int]]:
    """(url, good keys, expected skip counts) of a shard mixing good samples with hostile ones."""
    good = [f"g{i}" for i in range(4)]
    members = []
    for i, key in enumerate(good[:2]):
        members += [(f"{key}.jpg", jpeg(i)), (f"{key}.txt", f"good {i}".encode())]
    members += [
        ("../../etc/evil.txt", b"escape"),  # path traversal
        ("/tmp/abs_evil.jpg", jpeg(9)),  # absolute path
        ("a/../../up.txt", b"escape"),  # traversal in the middle
        link("sym.jpg", "/etc/passwd"),  # symlink
        link("hard.jpg", "/etc/shadow", tarfile.LNKTYPE),  # hard link
        ("paxname.txt", b"escape", {"path": "../pax_evil.txt"}),  # traversal hidden in a pax header
        ("zero.jpg", b""), ("zero.txt", b"zero-byte image"),  # empty member -> sample lacks an image
    ]
    for i, key in enumerate(good[2:], 2):
        members += [(f"{key}.jpg", jpeg(i)), (f"{key}.txt", f"good {i}".encode())]
    members += [("g1.jpg", jpeg(7)), ("g1.txt", b"second g1")]  # a key seen before in this shard
    url = write_raw_tar(path, members, fmt=tarfile.PAX_FORMAT)
    skips = {"unsafe_member_name": 6, "empty_file": 1, "missing_image": 1, "duplicate_key": 1}
    return url, good, skips


def test_hostile_member_names_links_empty_and_duplicates_are_skipped_and_counted(tmp_path):
    url, good, expected = hostile_shard(tmp_path / "hostile-000000.tar")
    loader = build_loader(DataConfig(sources=[SourceConfig(shards=[url])], resampled=False, num_workers=0,
                                     image_size=16), batch_size=3, want={"image", "caption"})
    batches = list(loader)
    keys = [k for b in batches for k in b["key"]]
    assert keys and sorted(keys) == good  # the first g1, never its later duplicate
    captions = {k: c for b in batches for k, c in zip(b["key"], b["caption"])}
    assert captions["g1"] == "good 1"
    assert loader.skipped == expected
    # the reader never extracts: no file appeared anywhere a hostile name points to
    assert sorted(p.name for p in tmp_path.rglob("*")) == ["hostile-000000.tar"]
    assert not Path("/tmp/abs_evil.jpg").exists()


def test_member_name_check():
    for name in ("../x", "a/../../x", "/etc/passwd", "C:/x", "a\\..\\x", "x\x00y", "", ".."):
        assert not is_safe_member_name(name), name
    for name in ("a.jpg", "dir/a.seg.jpg", "a..b.txt", "./a.jpg"):
        assert is_safe_member_name(name), name


def test_precompute_of_a_hostile_shard_writes_only_inside_its_output_folder(tmp_path):
    import torch

    from data_pipeline.config import PrecomputeConfig
    from data_pipeline.precompute import run_precompute
    from models.clip import ClipConfig, load_clip

    torch.manual_seed(0)
    clip = load_clip("unclip-tiny")
    images = tmp_path / "images"
    images.mkdir()
    url, good, expected = hostile_shard(images / "hostile-000000.tar")
    out = tmp_path / "deep" / "out"
    cfg = PrecomputeConfig(clip=ClipConfig(name="unclip-tiny"), batch_size=2, num_workers=0, device="cpu")
    summary = run_precompute(cfg, shards=[url], out=str(out), clip=clip, progress=False)
    assert summary.samples == len(good) and summary.skipped == expected
    written = list(iter_tar(str(out / "hostile-000000.tar"), SkipCounter()))
    assert [s.key for s in written] == good
    outside = sorted(str(p.relative_to(tmp_path)) for p in tmp_path.rglob("*") if out not in p.parents and p != out)
    assert outside == ["deep", "images", "images/hostile-000000.tar"]
    assert sorted(os.listdir(out)) == ["_SUCCESS", "embeddings.json", "hostile-000000.tar",
                                       "hostile-000000.tar.json", "hostile-000000.tar.stats.npy",
                                       "shards.json", "sizes.json", "stats.json"]


def test_a_member_over_the_byte_limit_is_skipped_without_being_read(tmp_path):
    url = write_raw_tar(tmp_path / "big-000000.tar", [
        ("big.jpg", b"\xff" * (16 << 20)), ("big.txt", b"big"), ("ok.txt", b"fine"),
    ])
    skips = SkipCounter()
    tracemalloc.start()
    try:
        samples = list(iter_tar(url, skips, max_member_bytes=64 << 10))
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert [(s.key, sorted(s.fields)) for s in samples] == [("big", ["txt"]), ("ok", ["txt"])]
    assert skips.as_dict() == {"member_too_large": 1}
    assert peak < 4 << 20, f"peak {peak} bytes while skipping a 16 MiB member"  # skipped in 1 MiB reads


def test_oversized_extension_headers_keep_memory_bounded(tmp_path):
    name = "n" * (8 << 20)  # an 8 MiB member name, stored in a GNU long-name header member
    path = write_raw_tar(tmp_path / "longname-000000.tar", [(f"{name}.txt", b"x")])
    skips = SkipCounter()
    tracemalloc.start()
    try:
        list(iter_tar(path, skips, max_member_bytes=64 << 10))
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 4 << 20, f"peak {peak} bytes for a tar whose members are all under 64 KiB of data"


def _negative_size_tar(path: Path) -> str:
    """One member whose size field is GNU base-256 -100000 (bytes 0xff..), then 1 MiB of data."""
    info = tarfile.TarInfo("a.txt")
    info.size = 1
    header = bytearray(info.tobuf(tarfile.GNU_FORMAT))
    header[124:136] = bytes([0xFF] * 9) + (-100000 & 0xFFFFFF).to_bytes(3, "big")
    header[148:156] = b"        "
    header[148:156] = b"%06o\0 " % sum(header)
    path.write_bytes(bytes(header) + b"z" * (1 << 20))
    return str(path)


def test_negative_member_size_is_a_counted_skip(tmp_path):
    skips = SkipCounter()
    samples = list(iter_tar(_negative_size_tar(tmp_path / "neg-000000.tar"), skips, max_member_bytes=64 << 10))
    assert samples == [] and sum(skips.as_dict().values()) == 1


def test_embedding_dimension_mismatch_and_bad_arrays_are_skipped_by_reason():
    spec = ExampleSpec(frozenset({"image_embed", "text_embed", "key"}), None, embed_dim=8, text_width=None,
                       context_length=None)

    def reason(img_emb, txt_emb=np.zeros(8, np.float32)):
        raw = RawSample("k", {"img_emb.npy": img_emb, "txt_emb.npy": encode_npy(txt_emb)})
        try:
            to_example(raw, spec)
        except Skip as skip:
            return skip.reason
        return "ok"

    assert reason(encode_npy(np.zeros(8, np.float32))) == "ok"
    assert reason(encode_npy(np.zeros(16, np.float32))) == "embedding_dim_mismatch"
    assert reason(encode_npy(np.float32(1.0))) == "embedding_dim_mismatch"  # 0-d
    assert reason(encode_npy(np.full(8, np.nan, np.float32))) == "nan_embedding"
    assert reason(b"\x93NUMPY garbage") == "bad_embedding"
    buf = io.BytesIO()
    np.save(buf, np.array([{"a": 1}], dtype=object), allow_pickle=True)  # a pickle inside .npy
    assert reason(buf.getvalue()) == "bad_embedding"
    assert reason(None) == "missing_embedding"


# ---------------------------------------------------------------------------- fuzzing

@contextmanager
def time_limit(seconds: float):
    """Fail (instead of hanging the suite) if the body runs longer than `seconds`."""
    def expire(signum, frame):
        raise TimeoutError(f"shard reader still running after {seconds}s")

    previous = signal.signal(signal.SIGALRM, expire)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


def _valid_tar() -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tf:
        for i, (name, data) in enumerate([("a.txt", b"caption a"), ("a.jpg", jpeg(0, 8)), ("b.txt", b"caption b"),
                                          ("b.jpg", jpeg(1, 8)), ("dir/c.txt", "ü".encode())]):
            info = tarfile.TarInfo(name)
            info.size = len(data)
            if i == 4:
                info.pax_headers = {"comment": "x" * 50}
            tf.addfile(info, io.BytesIO(data))
    return buf.getvalue()


VALID_TAR = _valid_tar()
FUZZ = settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow], derandomize=True)


def _read_all(data: bytes) -> tuple[list[RawSample], SkipCounter]:
    url = f"memory://faults-fuzz/{uuid.uuid4().hex}.tar"
    fs = fsspec.filesystem("memory")
    fs.pipe(url.removeprefix("memory://"), data)
    skips = SkipCounter()
    try:
        with time_limit(10):
            samples = list(iter_tar(url, skips, max_member_bytes=1 << 20))
    finally:
        fs.rm(url.removeprefix("memory://"))
    return samples, skips


def _check(samples: list[RawSample], skips: SkipCounter) -> None:
    for s in samples:
        assert is_safe_member_name(s.key) and all(len(v) <= 1 << 20 for v in s.fields.values())
    assert len({s.key for s in samples}) == len(samples)  # no key delivered twice
    assert all(n > 0 for n in skips.as_dict().values())


@FUZZ
@given(st.binary(max_size=4096))
def test_fuzz_random_bytes_never_raise_or_hang(data):
    _check(*_read_all(data))


@FUZZ
@given(st.lists(st.tuples(st.integers(0, len(VALID_TAR) - 1), st.integers(0, 255)), min_size=1, max_size=12),
       st.integers(0, len(VALID_TAR)))
def test_fuzz_mutated_valid_tar_never_raises_or_hangs(flips, cut):
    data = bytearray(VALID_TAR)
    for pos, value in flips:
        data[pos] = value
    _check(*_read_all(bytes(data[:cut])))


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow], derandomize=True)
@given(st.lists(st.tuples(st.integers(0, len(VALID_TAR) - 1), st.integers(0, 255)), min_size=1, max_size=8))
def test_fuzz_loader_on_mutated_shards_only_skips(flips):
    """Through the whole loader (read, decode, batch): a corrupt shard gives samples and
    counted skips, or the documented EmptySourceError; nothing else escapes."""
    data = bytearray(VALID_TAR)
    for pos, value in flips:
        data[pos] = value
    path = f"faults-fuzz-loader/{uuid.uuid4().hex}.tar"
    fs = fsspec.filesystem("memory")
    fs.pipe(path, bytes(data))
    try:
        loader = build_loader(DataConfig(sources=[SourceConfig(shards=[f"memory://{path}"])], resampled=False,
                                         num_workers=0, image_size=8), batch_size=2, want={"image", "caption"})
        with time_limit(10):
            try:
                keys = [k for b in loader for k in b["key"]]
            except EmptySourceError:
                keys = []
        assert len(keys) == len(set(keys)) <= 3
    finally:
        fs.rm(path)
