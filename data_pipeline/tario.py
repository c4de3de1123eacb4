"""Reading and writing webdataset tar shards safely.

Reading never extracts to disk and never trusts the archive: unsafe member names, links,
zero-byte and oversized members, duplicated keys and truncation are skipped and counted,
and memory stays bounded by the per-member byte limit. Writing is deterministic (fixed
mtime/owner), so re-running a job produces byte-identical shards.
"""

from __future__ import annotations

import dataclasses
import posixpath
import tarfile
import zlib
from typing import Iterator, Optional

from data_pipeline.io import atomic_write, mask_url, open_url
from data_pipeline.stats import SkipCounter
from data_pipeline.tarstream import DIRECTORY, REGULAR, TarFormatError, TarStream

DEFAULT_MAX_MEMBER_BYTES = 64 * 2**20


@dataclasses.dataclass
class RawSample:
    """One sample's undecoded members: `fields` maps extension (`jpg`, `txt`, `img_emb.npy`)
    to bytes. `index` is its position among the samples read from `shard`."""

    key: str
    fields: dict[str, bytes]
    shard: str = ""
    index: int = 0


def split_key(name: str) -> tuple[str, str]:
    """webdataset's convention: `dir/abc.seg.jpg` -> key `dir/abc`, extension `seg.jpg`."""
    directory, base = posixpath.split(name)
    stem, _, ext = base.partition(".")
    return posixpath.join(directory, stem) if directory else stem, ext.lower()


def is_safe_member_name(name: str) -> bool:
    if not name or "\x00" in name or "\\" in name or name.startswith("/"):
        return False
    if len(name) > 1 and name[1] == ":":  # a Windows drive
        return False
    return ".." not in name.split("/")


def iter_tar(url: str, skips: SkipCounter, *, max_member_bytes: int = DEFAULT_MAX_MEMBER_BYTES) -> Iterator[RawSample]:
    """Stream the samples of the tar at `url` in file order, skipping and counting bad ones.

    Members sharing a key must be adjacent (webdataset's rule); a key seen again later in
    the same shard is a duplicate and is dropped.
    """
    where = mask_url(url)
    try:
        stream = open_url(url)
    except Exception as err:  # noqa: BLE001 - any failure to open is a skipped source
        skips.skip("unreadable_source", f"{where} ({type(err).__name__})")
        return
    seen: set[str] = set()
    current: Optional[RawSample] = None
    current_dup = False
    index = 0
    tar = None
    try:
        with stream:
            tar = TarStream(stream)
            for member in tar.members():
                if member.kind == DIRECTORY:
                    continue
                name = member.name
                if member.kind != REGULAR or not is_safe_member_name(name):
                    skips.skip("unsafe_member_name", f"{where}: member {name[:80]!r}")
                    continue
                key, ext = split_key(name)
                if current is not None and key != current.key:
                    if not current_dup:
                        yield current
                        index += 1
                    current, current_dup = None, False
                if current is None:
                    current = RawSample(key, {}, url, index)
                    if key in seen:
                        skips.skip("duplicate_key", f"{where}: key {key[:80]!r}")
                        current_dup = True
                    seen.add(key)
                if current_dup:
                    continue
                if member.size == 0:
                    skips.skip("empty_file", f"{where}: {name[:80]!r}")
                    continue
                if member.size > max_member_bytes:
                    skips.skip("member_too_large", f"{where}: {name[:80]!r} ({member.size} bytes)")
                    continue
                if ext in current.fields:
                    skips.skip("duplicate_key", f"{where}: {name[:80]!r} twice")
                    current_dup = True
                    continue
                current.fields[ext] = tar.read()
    except (TarFormatError, EOFError, OSError, zlib.error) as err:
        reason = "truncated_tar" if tar is not None and tar.members_read else "unreadable_source"
        skips.skip(reason, f"{where} ({type(err).__name__})")
        return  # the sample in progress may be incomplete: drop it
    if current is not None and not current_dup:
        yield current


_HEADER_TAIL = (b"0000644\0" + b"0000000\0" * 2, b"00000000000\0", b"        0" + b"\0" * 100 + tarfile.GNU_MAGIC
                + b"\0" * 247)  # owner names, device numbers, prefix: empty


def member_header(name: str, size: int) -> bytes:
    """The 512-byte header tarfile writes (GNU format, mode 644, owner 0, mtime 0) for a
    regular member, built directly: tarfile's TarInfo.tobuf costs ~50 us per member."""
    raw = name.encode("utf-8")
    if len(raw) > 100 or size >= 8**11:  # long names / huge sizes: let tarfile do GNU extensions
        info = tarfile.TarInfo(name)
        info.size, info.mtime, info.mode, info.uid, info.gid, info.uname, info.gname = size, 0, 0o644, 0, 0, "", ""
        return info.tobuf(tarfile.GNU_FORMAT, "utf-8", "surrogateescape")
    buf = bytearray(raw.ljust(100, b"\0") + _HEADER_TAIL[0] + b"%011o\0" % size + _HEADER_TAIL[1] + _HEADER_TAIL[2])
    buf[148:156] = b"%06o\0 " % sum(buf)  # checksum computed with the field as 8 spaces
    return bytes(buf)


class TarWriter:
    """Write samples to a tar at `url`, atomically (temporary name, renamed on close).

    Output is byte-identical to tarfile's GNU format with fixed mode/owner/mtime, so the
    same samples always give the same file."""

    def __init__(self, url: str):
        self.url = url
        self._ctx = atomic_write(url, "wb")
        self._file = self._ctx.__enter__()
        self._offset = 0
        self.count = 0
        self.keys: list[str] = []  # in the order written
        self.size: Optional[int] = None  # bytes, once finished

    def write(self, key: str, fields: dict[str, bytes]) -> None:
        if "." in posixpath.basename(key) or not is_safe_member_name(key):
            raise ValueError(f"sample key {key!r} must be a relative name without dots")
        chunks = []
        for ext, data in fields.items():
            chunks += [member_header(f"{key}.{ext}", len(data)), data, b"\0" * (-len(data) % tarfile.BLOCKSIZE)]
        blob = b"".join(chunks)
        self._file.write(blob)
        self._offset += len(blob)
        self.count += 1
        self.keys.append(key)

    def _finish_archive(self) -> None:
        end = self._offset + 2 * tarfile.BLOCKSIZE
        self._file.write(b"\0" * (2 * tarfile.BLOCKSIZE + (-end % tarfile.RECORDSIZE)))
        self.size = end + (-end % tarfile.RECORDSIZE)  # the finished file's bytes

    def finish(self) -> None:
        """Write the archive's end (its size is then known); `close` renames it into place."""
        if self.size is None:
            self._finish_archive()

    def close(self) -> None:
        self.finish()
        self._ctx.__exit__(None, None, None)

    def abort(self) -> None:
        """Drop the partial file (nothing appears under the final name)."""
        try:
            self._ctx.__exit__(RuntimeError, RuntimeError("aborted"), None)
        except RuntimeError:
            pass

    def __enter__(self) -> "TarWriter":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.close()
        else:
            self.abort()
