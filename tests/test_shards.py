"""data_pipeline/shards.py + tario.py: writing shards from every source kind, skipping bad input."""

from __future__ import annotations

import io
import json
import tarfile

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from data_pipeline import shapes
from data_pipeline.shards import parse_source, write_shards
from data_pipeline.stats import SkipCounter
from data_pipeline.tario import TarWriter, iter_tar


def _jpeg(colour, size=(40, 30)) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", size, colour).save(buf, format="JPEG", quality=95)
    return buf.getvalue()


def make_folder(root, n_good=6):
    """n_good good pairs plus one of each bad kind; returns {key: caption} of the good ones."""
    good = {}
    for i in range(n_good):
        sub = root / ("sub" if i % 2 else "")
        sub.mkdir(exist_ok=True)
        (sub / f"img{i}.jpg").write_bytes(_jpeg((20 * i, 100, 200)))
        (sub / f"img{i}.txt").write_text(f"caption number {i}")
        good[("sub__" if i % 2 else "") + f"img{i}"] = f"caption number {i}"
    (root / "nocap.jpg").write_bytes(_jpeg((1, 2, 3)))
    (root / "garbage.jpg").write_bytes(b"\xff\xd8\xff\xe0" + b"not a jpeg at all" * 20)
    (root / "garbage.txt").write_text("x")
    (root / "empty.jpg").write_bytes(b"")
    (root / "empty.txt").write_text("x")
    (root / "tiny.png").write_bytes(_png((4, 4)))
    (root / "tiny.txt").write_text("tiny")
    (root / "latin1.jpg").write_bytes(_jpeg((9, 9, 9)))
    (root / "latin1.txt").write_bytes("café crème".encode("latin-1"))
    return good


def _png(size) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", size, (200, 0, 0)).save(buf, format="PNG")
    return buf.getvalue()


def read_all(url):
    skips = SkipCounter()
    return list(iter_tar(url, skips)), skips


def test_folder_to_shards_skips_and_counts_bad_sources(tmp_path):
    good = make_folder(tmp_path / "src")
    report = write_shards(f"folder:{tmp_path / 'src'}", str(tmp_path / "out"), per_shard=4, min_size=8)
    assert report.samples == len(good) and len(report.shards) == 2
    assert report.skipped == {"missing_caption": 1, "undecodable_image": 1, "empty_file": 1,
                              "image_too_small": 1, "caption_not_utf8": 1}
    got = {}
    for url in report.shards:
        samples, skips = read_all(url)
        assert not skips.as_dict()
        for s in samples:
            assert set(s.fields) == {"jpg", "txt", "json"}
            assert Image.open(io.BytesIO(s.fields["jpg"])).size == (40, 30)
            got[s.key] = s.fields["txt"].decode()
    assert got == good
    sizes = json.loads((tmp_path / "out" / "sizes.json").read_text())
    assert sizes == {"shard-000000.tar": 4, "shard-000001.tar": 2}


def test_shapes_shards_carry_attributes_and_are_byte_identical_on_rerun(tmp_path):
    a = write_shards("shapes", str(tmp_path / "a"), per_shard=7, count=10, size=24, seed=3)
    b = write_shards("shapes", str(tmp_path / "b"), per_shard=7, count=10, size=24, seed=3)
    assert [open(u, "rb").read() for u in a.shards] == [open(u, "rb").read() for u in b.shards]
    samples = [s for url in a.shards for s in read_all(url)[0]]
    assert len(samples) == 10
    for s in samples:
        attrs = shapes.attributes_for_key(s.key)
        assert s.fields["txt"].decode() == attrs.caption
        meta = json.loads(s.fields["json"])["attributes"]
        assert [o["colour"] for o in meta["objects"]] == [o.colour for o in attrs.objects]
        img = Image.open(io.BytesIO(s.fields["png"]))
        assert img.size == (24, 24)


@pytest.mark.parametrize("kind", ["csv", "parquet"])
def test_table_source_with_reencode_and_downscale(tmp_path, kind):
    for i in range(3):
        (tmp_path / f"p{i}.png").write_bytes(_png((120, 80)))
    table = pa.table({"path": ["p0.png", "p1.png", "missing.png", str(tmp_path / "p2.png")],
                      "caption": ["zero", "one", "gone", None]})
    path = tmp_path / f"t.{kind}"
    if kind == "csv":
        path.write_text("path,caption\n" + "\n".join(f"{p},{c or ''}" for p, c in zip(*table.to_pydict().values())))
    else:
        pq.write_table(table, path)
    report = write_shards(f"table:{path}", str(tmp_path / "out"), image_format="webp", quality=80, size=40)
    assert report.samples == 2
    assert report.skipped == {"unreadable_source": 1, "missing_caption": 1}
    samples, _ = read_all(report.shards[0])
    assert [s.fields["txt"] for s in samples] == [b"zero", b"one"]
    assert Image.open(io.BytesIO(samples[0].fields["webp"])).size == (60, 40)


def test_bad_arguments_fail_before_work(tmp_path):
    with pytest.raises(ValueError, match="--source"):
        parse_source("images:/x")
    with pytest.raises(ValueError, match="--image-format"):
        write_shards("shapes", str(tmp_path), image_format="gif")
    with pytest.raises(FileNotFoundError, match="does not exist"):
        write_shards(f"folder:{tmp_path / 'nope'}", str(tmp_path / "o"))


def _raw_tar(members) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return buf.getvalue()


def test_reader_rejects_unsafe_names_empty_and_duplicate_members(tmp_path):
    data = _raw_tar([
        ("a.jpg", b"A"), ("a.txt", b"a"),
        ("../../etc/x.txt", b"evil"), ("/abs/y.txt", b"evil"),
        ("b.jpg", b""), ("b.txt", b"b"),
        ("c.txt", b"c"), ("c.txt", b"c again"),
        ("d.txt", b"d"), ("a.json", b"{}"),  # key `a` again, not adjacent: duplicate
        ("e.txt", b"e"),
    ])
    path = tmp_path / "t.tar"
    path.write_bytes(data)
    samples, skips = read_all(str(path))
    assert [s.key for s in samples] == ["a", "b", "d", "e"]
    assert samples[1].fields == {"txt": b"b"}
    assert skips.as_dict() == {"unsafe_member_name": 2, "empty_file": 1, "duplicate_key": 2}
    assert not (tmp_path / "etc").exists()


def test_reader_keeps_samples_before_truncation(tmp_path):
    data = _raw_tar([(f"k{i}.txt", b"x" * 3000) for i in range(5)])
    path = tmp_path / "t.tar"
    path.write_bytes(data[: 512 * 3 + 6000 + 700])  # cut inside the 3rd member's data
    samples, skips = read_all(str(path))
    assert [s.key for s in samples] == ["k0", "k1"]
    assert skips.as_dict() == {"truncated_tar": 1}
    samples, skips = read_all(str(tmp_path / "missing.tar"))
    assert samples == [] and skips.as_dict() == {"unreadable_source": 1}


def test_member_size_limit_bounds_memory(tmp_path):
    path = tmp_path / "t.tar"
    path.write_bytes(_raw_tar([("a.txt", b"x" * 5000), ("a.jpg", b"j"), ("b.txt", b"ok")]))
    skips = SkipCounter()
    samples = list(iter_tar(str(path), skips, max_member_bytes=4096))
    assert [(s.key, sorted(s.fields)) for s in samples] == [("a", ["jpg"]), ("b", ["txt"])]
    assert skips.as_dict() == {"member_too_large": 1}


def test_writer_is_atomic_and_refuses_bad_keys(tmp_path):
    url = str(tmp_path / "w.tar")
    with pytest.raises(RuntimeError):
        with TarWriter(url) as w:
            w.write("k1", {"txt": b"x"})
            raise RuntimeError("killed")
    assert list(tmp_path.iterdir()) == []  # neither the final name nor a temporary remains
    with TarWriter(url) as w:
        with pytest.raises(ValueError, match="without dots"):
            w.write("a.b", {"txt": b"x"})
        w.write("dir/k", {"txt": b"x", "npy": np.zeros(2).tobytes()})
    assert [s.key for s in read_all(url)[0]] == ["dir/k"]


@pytest.mark.parametrize("fmt", [tarfile.USTAR_FORMAT, tarfile.GNU_FORMAT, tarfile.PAX_FORMAT])
@pytest.mark.parametrize("compress", ["", "gz"])
def test_fast_reader_agrees_with_tarfile(tmp_path, fmt, compress):
    names = ["a.txt", "d" * 90 + "/" + "k" * 60 + ".jpg", "x/y.json"]
    if fmt != tarfile.USTAR_FORMAT:
        names += ["n" * 150 + ".txt", "é" * 5 + ".txt"]
    path = tmp_path / "t.tar"
    with tarfile.open(path, f"w:{compress}", format=fmt) as tar:
        for i, name in enumerate(names):
            info = tarfile.TarInfo(name)
            info.size = 700 * i + 1
            tar.addfile(info, io.BytesIO(bytes([i]) * info.size))
        link = tarfile.TarInfo("link.txt")
        link.type, link.linkname = tarfile.SYMTYPE, "/etc/passwd"
        tar.addfile(link)
    samples, skips = read_all(str(path))
    got = {f"{s.key}.{ext}": data for s in samples for ext, data in s.fields.items()}
    assert got == {name: bytes([i]) * (700 * i + 1) for i, name in enumerate(names)}
    assert skips.as_dict() == {"unsafe_member_name": 1}


def test_fast_reader_rejects_garbage_and_corrupt_headers(tmp_path):
    path = tmp_path / "t.tar"
    path.write_bytes(b"\x00\x01garbage" * 100)
    assert read_all(str(path))[1].as_dict() == {"unreadable_source": 1}
    good = _raw_tar([("a.txt", b"a"), ("b.txt", b"b")])
    corrupt = good[:512 + 512] + b"\xff" * 100 + good[512 + 512 + 100:]  # second header damaged
    path.write_bytes(corrupt)
    samples, skips = read_all(str(path))
    assert samples == [] and skips.as_dict() == {"truncated_tar": 1}


def test_writer_output_is_byte_identical_to_tarfile_gnu(tmp_path):
    samples = [("k1", {"txt": b"hello", "jpg": b"x" * 1000}), ("d" * 95, {"txt": b"a"}),
               ("n" * 120, {"json": b"{}"}), ("é/ü", {"txt": b"u"}), ("big", {"bin": b"z" * 20000})]
    with TarWriter(str(tmp_path / "fast.tar")) as w:
        for key, fields in samples:
            w.write(key, fields)
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.GNU_FORMAT) as tar:
        for key, fields in samples:
            for ext, data in fields.items():
                info = tarfile.TarInfo(f"{key}.{ext}")
                info.size, info.mtime, info.mode, info.uid, info.gid, info.uname, info.gname = len(data), 0, 0o644, 0, 0, "", ""
                tar.addfile(info, io.BytesIO(data))
    assert (tmp_path / "fast.tar").read_bytes() == buf.getvalue()
