"""fsspec plumbing: URL lists and brace patterns, masked URLs, retried opens, atomic writes.

Every byte the data pipeline reads or writes goes through `open_url`/`atomic_write`, so a
`memory://`, `s3://`, `gs://`, `http(s)://` or local path behaves the same everywhere.
"""

from __future__ import annotations

import base64
import contextlib
import http.client
import io
import logging
import posixpath
import re
import time
import urllib.error
import urllib.request
import uuid
from typing import IO, Callable, Iterator, Optional, TypeVar, Union
from urllib.parse import parse_qsl, unquote, urlencode, urlsplit, urlunsplit

import braceexpand
import fsspec

log = logging.getLogger(__name__)
T = TypeVar("T")

URLSpec = Union[str, list[str], tuple[str, ...]]

# Query parameters that carry secrets in presigned/cloud URLs.
_SECRET_PARAMS = re.compile(r"(sig|signature|token|key|secret|password|credential|auth)", re.IGNORECASE)


def mask_url(url: str) -> str:
    """`url` safe to print: user:password and secret-looking query values become `***`."""
    try:
        parts = urlsplit(url)
    except ValueError:
        return "<unprintable url>"
    netloc = parts.netloc
    if "@" in netloc:
        netloc = "***@" + netloc.rsplit("@", 1)[1]
    query = parts.query
    if query:
        pairs = parse_qsl(query, keep_blank_values=True)
        query = urlencode([(k, "***" if _SECRET_PARAMS.search(k) else v) for k, v in pairs], safe="*")
    return urlunsplit((parts.scheme, netloc, parts.path, query, parts.fragment))


def expand_urls(spec: URLSpec) -> list[str]:
    """Expand a URL, a brace pattern (`shard-{000..009}.tar`), a `::`-separated list, or a
    list of any of those into a flat list of URLs (order kept, duplicates removed)."""
    items = [spec] if isinstance(spec, str) else list(spec)
    urls: list[str] = []
    for item in items:
        for part in str(item).split("::"):
            part = part.strip()
            if part:
                urls.extend(braceexpand.braceexpand(part))
    return list(dict.fromkeys(urls))


def join_url(base: str, name: str) -> str:
    """`base/name` for any fsspec URL (local paths included)."""
    return base.rstrip("/") + "/" + name


def url_basename(url: str) -> str:
    return posixpath.basename(urlsplit(url).path if "://" in url else url.replace("\\", "/"))


def url_dirname(url: str) -> str:
    return url.rsplit("/", 1)[0] if "/" in url else "."


def with_retries(fn: Callable[[], T], what: str, *, attempts: int = 4, base_delay: float = 0.5) -> T:
    """Call `fn`, retrying transient I/O errors with exponential backoff.

    FileNotFoundError and PermissionError are final (retrying cannot help).
    """
    for attempt in range(attempts):
        try:
            return fn()
        except (FileNotFoundError, PermissionError, IsADirectoryError, NotADirectoryError, ValueError, TypeError):
            raise
        except Exception as err:  # noqa: BLE001 - cloud clients raise their own transient types
            if attempt == attempts - 1:
                raise
            delay = base_delay * 2**attempt
            log.warning("%s failed (%s: %s); retry %d/%d in %.1fs", what, type(err).__name__,
                        _mask_in_text(str(err)), attempt + 1, attempts - 1, delay)
            time.sleep(delay)
    raise AssertionError("unreachable")


_URL_IN_TEXT = re.compile(r"[a-zA-Z][a-zA-Z0-9+.-]*://[^\s'\"]+")


def _mask_in_text(text: str) -> str:
    """Mask every URL inside an error message (exceptions often quote the URL)."""
    return _URL_IN_TEXT.sub(lambda m: mask_url(m.group(0)), text)


def open_url(url: str, mode: str = "rb", **kwargs) -> IO[bytes]:
    """Open `url` for reading or writing. http(s) reads use `HTTPReader` (retries with
    backoff, resumes with Range requests); everything else goes through fsspec."""
    if _is_http(url):
        if mode != "rb":
            raise ValueError(f"{mask_url(url)}: http(s) URLs are read-only")
        return io.BufferedReader(HTTPReader(url, **kwargs), buffer_size=1 << 20)
    return with_retries(lambda: fsspec.open(url, mode, **kwargs).open(), f"open {mask_url(url)}")


def read_bytes(url: str) -> bytes:
    def read() -> bytes:
        with open_url(url) as f:
            return f.read()

    return with_retries(read, f"read {mask_url(url)}")


def _is_http(url: str) -> bool:
    return url.startswith(("http://", "https://"))


class HTTPReader(io.RawIOBase):
    """A streaming HTTP(S) GET over the standard library.

    Transient failures (connection errors, timeouts, 5xx, 429) are retried with exponential
    backoff; a connection dropped mid-body reopens with `Range: bytes=pos-` (or, on servers
    without ranges, re-reads and discards up to `pos`). Credentials in the URL become a
    Basic auth header and never appear in messages.
    """

    def __init__(self, url: str, *, timeout: float = 60.0, attempts: int = 5, base_delay: float = 0.5):
        parts = urlsplit(url)
        self._auth = None
        if parts.username is not None:
            token = f"{unquote(parts.username)}:{unquote(parts.password or '')}".encode()
            self._auth = "Basic " + base64.b64encode(token).decode()
            parts = parts._replace(netloc=parts.netloc.rsplit("@", 1)[1])
        self._url, self.masked = urlunsplit(parts), mask_url(url)
        self.timeout, self.attempts, self.base_delay = timeout, attempts, base_delay
        self.pos = 0
        self._resp = None
        self._expected: Optional[int] = None
        with_retries(self._connect, f"GET {self.masked}", attempts=attempts, base_delay=base_delay)

    def _connect(self) -> None:
        headers = {"User-Agent": "unclip-data-pipeline"}
        if self._auth:
            headers["Authorization"] = self._auth
        if self.pos:
            headers["Range"] = f"bytes={self.pos}-"
        try:
            resp = urllib.request.urlopen(urllib.request.Request(self._url, headers=headers), timeout=self.timeout)
        except urllib.error.HTTPError as err:
            if err.code in (401, 403):
                raise PermissionError(f"GET {self.masked}: HTTP {err.code}") from None
            if err.code == 404 or 400 <= err.code < 500 and err.code != 429:
                raise FileNotFoundError(f"GET {self.masked}: HTTP {err.code}") from None
            raise ConnectionError(f"GET {self.masked}: HTTP {err.code}") from None
        except urllib.error.URLError as err:
            raise ConnectionError(f"GET {self.masked}: {_mask_in_text(str(err.reason))}") from None
        if self.pos and resp.status != 206:
            remaining = self.pos  # no range support: skip what we already have
            while remaining:
                chunk = resp.read(min(remaining, 1 << 20))
                if not chunk:
                    raise ConnectionError(f"GET {self.masked}: body shorter on retry")
                remaining -= len(chunk)
        length = resp.headers.get("Content-Length")
        start = self.pos if resp.status == 206 else 0
        self._expected = start + int(length) if length and length.isdigit() else None
        self._resp = resp

    def readable(self) -> bool:
        return True

    def readinto(self, buf) -> int:
        for attempt in range(self.attempts):
            try:
                n = self._resp.readinto(buf)
                if n == 0 and len(buf) and self._expected is not None and self.pos < self._expected:
                    # http.client reports a connection cut short as a clean end of body
                    raise http.client.IncompleteRead(b"", self._expected - self.pos)
                self.pos += n
                return n
            except (OSError, http.client.HTTPException) as err:
                if attempt == self.attempts - 1:
                    raise ConnectionError(f"GET {self.masked}: {type(err).__name__} after {self.attempts} tries") from None
                time.sleep(self.base_delay * 2**attempt)
                with contextlib.suppress(Exception):
                    self._resp.close()
                with_retries(self._connect, f"GET {self.masked}", attempts=self.attempts, base_delay=self.base_delay)
        return 0

    def close(self) -> None:
        if self._resp is not None:
            with contextlib.suppress(Exception):
                self._resp.close()
        super().close()


def exists(url: str) -> bool:
    if _is_http(url):
        try:
            open_url(url).close()  # a GET we close at once; HEAD is not universally allowed
            return True
        except FileNotFoundError:
            return False
    fs, path = fsspec.core.url_to_fs(url)
    return with_retries(lambda: fs.exists(path), f"stat {mask_url(url)}")


def makedirs(url: str) -> None:
    fs, path = fsspec.core.url_to_fs(url)
    fs.makedirs(path, exist_ok=True)


def list_dir(url: str) -> list[str]:
    """Names (not paths) of the entries in folder `url`; empty if it does not exist."""
    fs, path = fsspec.core.url_to_fs(url)
    if not fs.exists(path):
        return []
    return sorted(posixpath.basename(p.rstrip("/")) for p in fs.ls(path, detail=False))


def remove(url: str) -> None:
    fs, path = fsspec.core.url_to_fs(url)
    if fs.exists(path):
        fs.rm(path)


@contextlib.contextmanager
def atomic_write(url: str, mode: str = "wb") -> Iterator[IO]:
    """Write to a temporary sibling of `url` and rename it into place only on success, so a
    reader (or a restarted job) never sees a half-written file under the final name."""
    fs, path = fsspec.core.url_to_fs(url)
    tmp = f"{path}.tmp-{uuid.uuid4().hex[:8]}"
    parent = posixpath.dirname(path)
    if parent:
        fs.makedirs(parent, exist_ok=True)
    try:
        with fs.open(tmp, mode) as f:
            yield f
        fs.mv(tmp, path)
    except BaseException:
        with contextlib.suppress(Exception):
            if fs.exists(tmp):
                fs.rm(tmp)
        raise
