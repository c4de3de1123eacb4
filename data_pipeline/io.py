"""fsspec plumbing: URL lists and brace patterns, masked URLs, retried opens, atomic writes,
backend checks and per-location storage options.

Every byte the data pipeline reads or writes goes through `open_url`/`atomic_write`, so a
`memory://`, `s3://`, `gs://`, `http(s)://` or local path behaves the same everywhere.
Credentials are never ours to handle: fsspec's backends find them where their own tools do
(`AWS_*` variables and profiles, `GOOGLE_APPLICATION_CREDENTIALS`, instance metadata), and
every message we print masks the URLs in it.
"""

from __future__ import annotations

import base64
import contextlib
import http.client
import importlib.util
import io
import logging
import posixpath
import re
import time
import urllib.error
import urllib.request
import uuid
from typing import IO, Any, Callable, Iterator, Mapping, Optional, TypeVar, Union
from urllib.parse import parse_qsl, unquote, urlencode, urlsplit, urlunsplit

import braceexpand
import fsspec
from fsspec.registry import known_implementations

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

    FileNotFoundError, PermissionError and missing or malformed credentials are final
    (retrying cannot help). A cloud client's own exception types (botocore's
    EndpointConnectionError, ...) leave as OSError naming `what`, so callers handle one type.
    """
    for attempt in range(attempts):
        try:
            return fn()
        except (FileNotFoundError, PermissionError, IsADirectoryError, NotADirectoryError, ValueError, TypeError):
            raise
        except Exception as err:  # noqa: BLE001 - cloud clients raise their own transient types
            if attempt == attempts - 1 or _is_final(err):
                raise as_oserror(err, what) from err
            delay = base_delay * 2**attempt
            log.warning("%s failed (%s: %s); retry %d/%d in %.1fs", what, type(err).__name__,
                        mask_urls_in(str(err)), attempt + 1, attempts - 1, delay)
            time.sleep(delay)
    raise AssertionError("unreachable")


# Backend errors no retry can fix: credentials or settings that are missing or malformed.
# Matched by class name so that this module imports no cloud SDK.
_FINAL_BACKEND_ERRORS = frozenset({
    "NoCredentialsError", "PartialCredentialsError", "NoRegionError", "ProfileNotFound", "ParamValidationError",
    "InvalidConfigError", "DefaultCredentialsError", "RefreshError",
})


class StorageError(OSError):
    """A storage backend's own exception, as an OSError; `final`: retrying cannot help."""

    def __init__(self, message: str, final: bool = False):
        super().__init__(message)
        self.final = final


def _is_final(err: BaseException) -> bool:
    if isinstance(err, StorageError):
        return err.final
    return any(cls.__name__ in _FINAL_BACKEND_ERRORS for cls in type(err).__mro__)


def as_oserror(err: BaseException, what: str) -> BaseException:
    """A backend's own exception as a StorageError saying `what` failed, with the URLs in its
    message masked; OSErrors, ValueErrors and TypeErrors (our bugs, bad arguments) unchanged."""
    if isinstance(err, (OSError, ValueError, TypeError)) or not isinstance(err, Exception):
        return err
    return StorageError(f"{what}: {type(err).__name__}: {mask_urls_in(str(err))}", final=_is_final(err))


_URL_IN_TEXT = re.compile(r"[a-zA-Z][a-zA-Z0-9+.-]*://[^\s'\"]+")


def mask_urls_in(text: str) -> str:
    """Mask every URL inside an error message (exceptions often quote the URL)."""
    return _URL_IN_TEXT.sub(lambda m: mask_url(m.group(0)), text)


def open_url(url: str, mode: str = "rb", **kwargs) -> IO[bytes]:
    """Open `url` for reading or writing. http(s) reads use `HTTPReader` (retries with
    backoff, resumes with Range requests); everything else goes through fsspec, with the
    storage options registered for the URL's location (`set_storage_options`) under `kwargs`."""
    if _is_http(url):
        if mode != "rb":
            raise ValueError(f"{mask_url(url)}: http(s) URLs are read-only")
        return io.BufferedReader(HTTPReader(url, **kwargs), buffer_size=1 << 20)
    what = f"open {mask_url(url)}"
    options = {**storage_options(url), **kwargs}
    f = with_retries(lambda: _backend(url, lambda: fsspec.open(url, mode, **options).open()), what)
    return f if _is_local(url) else _OSErrorFile(f, mask_url(url))


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
            raise ConnectionError(f"GET {self.masked}: {mask_urls_in(str(err.reason))}") from None
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
    fs, path = _fs(url)
    return with_retries(lambda: fs.exists(path), f"stat {mask_url(url)}")


def size_of(url: str) -> Optional[int]:
    """The size in bytes of the file at `url` (None for http(s), where it costs a request)."""
    if _is_http(url):
        return None
    fs, path = _fs(url)
    return int(with_retries(lambda: fs.size(path), f"stat {mask_url(url)}"))


def makedirs(url: str) -> None:
    """Folder `url` and its parents, on filesystems; on an object store (no folders there)
    its bucket must exist (MissingBucketError), and is never created."""
    fs, path = _fs(url)
    _make_folder(fs, path, url)


# Object stores whose top level is a bucket (container). Their backends' makedirs creates a
# missing bucket; a mistyped bucket name must fail instead of becoming a new bucket (with
# the account's default region, access policy and billing).
_BUCKET_STORES = frozenset({"s3", "s3a", "gs", "gcs", "az", "abfs", "abfss", "oss"})


class MissingBucketError(ValueError):
    """An object-store URL whose bucket does not exist."""


def _make_folder(fs: Any, path: str, url: str) -> None:
    where = mask_url(url)
    protocols = {fs.protocol} if isinstance(fs.protocol, str) else set(fs.protocol)
    if not protocols & _BUCKET_STORES:
        with_retries(lambda: fs.makedirs(path, exist_ok=True), f"mkdir {where}", attempts=1)
        return
    bucket = path.split("/", 1)[0]
    try:  # one HEAD of the bucket: s3fs's and gcsfs's exists() read a refused probe as "absent"
        with_retries(lambda: fs.info(bucket), f"find the bucket of {where}", attempts=1)
    except FileNotFoundError:
        raise MissingBucketError(f"{where}: bucket {bucket} does not exist; create it first "
                                 f"(unclip never creates buckets: a mistyped name would become a new one)") from None
    except PermissionError:
        pass  # may write objects without reading the bucket's metadata: the write will tell


def list_dir(url: str) -> list[str]:
    """Names (not paths) of the entries in folder `url`; empty if it does not exist."""
    fs, path = _fs(url)

    def ls() -> list[str]:
        if not fs.exists(path):
            return []
        return sorted(posixpath.basename(p.rstrip("/")) for p in fs.ls(path, detail=False))

    return with_retries(ls, f"list {mask_url(url)}", attempts=1)


def list_sizes(url: str) -> dict[str, int]:
    """Name -> size in bytes of the files in folder `url` (one listing; empty if it does not exist)."""
    fs, path = _fs(url)

    def ls() -> dict[str, int]:
        if not fs.exists(path):
            return {}
        entries = fs.ls(path, detail=True)
        return {posixpath.basename(e["name"].rstrip("/")): int(e.get("size") or 0)
                for e in entries if e.get("type", "file") == "file"}

    return with_retries(ls, f"list {mask_url(url)}", attempts=1)


def remove(url: str) -> None:
    fs, path = _fs(url)

    def rm() -> None:
        if fs.exists(path):
            fs.rm(path)

    with_retries(rm, f"remove {mask_url(url)}", attempts=1)


@contextlib.contextmanager
def atomic_write(url: str, mode: str = "wb") -> Iterator[IO]:
    """Write to a temporary sibling of `url` and rename it into place only on success, so a
    reader (or a restarted job) never sees a half-written file under the final name.

    On an object store the rename is a server-side copy: the object appears whole or not at
    all, as with a POSIX rename."""
    fs, path = _fs(url)
    where = mask_url(url)
    tmp = f"{path}.tmp-{uuid.uuid4().hex[:8]}"
    parent = posixpath.dirname(path)
    if parent:
        _make_folder(fs, parent, url_dirname(url))
    f = with_retries(lambda: fs.open(tmp, mode), f"open {where} for writing", attempts=1)
    if not _is_local(url):
        f = _OSErrorFile(f, where)
    try:
        yield f
        with_retries(f.close, f"write {where}", attempts=1)  # an object store uploads here
        with_retries(lambda: fs.mv(tmp, path), f"rename into {where}", attempts=1)
    except BaseException:
        with contextlib.suppress(Exception):
            f.close()
        with contextlib.suppress(Exception):
            if fs.exists(tmp):
                fs.rm(tmp)
        raise


# ------------------------------------------------------------------ backends and options

class MissingBackendError(ValueError):
    """A URL whose fsspec backend is not installed (or whose scheme none knows)."""


def url_protocol(url: str) -> str:
    """The fsspec protocol of `url`: `s3`, `gs`, `https`, ...; `file` for a plain path."""
    protocol, _ = fsspec.core.split_protocol(url)
    return protocol or "file"


def _is_local(url: str) -> bool:
    # these raise OSError themselves, and their files are the hot path of local runs
    return url_protocol(url) in ("file", "local", "memory")


def backend_problem(url: str, *, write: bool = False) -> Optional[str]:
    """Why `url` cannot be used (no fsspec backend installed for its scheme, an unknown
    scheme, or a write to read-only http(s)), in one line naming the URL and what to install;
    None if it can. Imports the backend: a broken install fails here, before any work."""
    protocol, where = url_protocol(url), mask_url(url)
    if protocol == "file":
        return None
    if write and protocol in ("http", "https"):
        return f"{where}: http(s) URLs are read-only; write to a local path or an object store"
    try:
        fsspec.get_filesystem_class(protocol)
    except ValueError:
        return f"{where}: unknown URL scheme {protocol}:// (no fsspec backend provides it)"
    except ImportError as err:
        package = _missing_package(protocol, err)
        return f"{where}: {protocol}:// URLs need the {package} package: pip install {package}"
    return None


def _missing_package(protocol: str, err: ImportError) -> str:
    """The package to install: the backend's own (s3fs, gcsfs, adlfs, ...) when it is absent,
    else the module it failed to import (aiohttp for fsspec's http, paramiko for sftp)."""
    backend = known_implementations.get(protocol, {}).get("class", "").split(".")[0]
    if backend and backend != "fsspec" and importlib.util.find_spec(backend) is None:
        return backend
    cause = err.__cause__ if isinstance(err.__cause__, ImportError) else err
    return (cause.name or backend or protocol).split(".")[0]


def _backend(url: str, fn: Callable[[], T]) -> T:
    """`fn()`, with fsspec's failure to find or import a backend made one clear line."""
    try:
        return fn()
    except (ImportError, ValueError) as err:
        if isinstance(err, ImportError) or str(err).startswith("Protocol not known"):
            problem = backend_problem(url)
            if problem:
                raise MissingBackendError(problem) from None
        raise


def _fs(url: str) -> tuple[Any, str]:
    return _backend(url, lambda: fsspec.core.url_to_fs(url, **storage_options(url)))


# location (a URL without a trailing slash) -> fsspec storage options for every URL under it
_STORAGE_OPTIONS: dict[str, dict[str, Any]] = {}


def set_storage_options(location: str, options: Mapping[str, Any]) -> None:
    """Open every URL under `location` (a folder or file URL) with fsspec `options`, e.g.
    `{"endpoint_url": "https://minio.example:9000"}`, in this process and the data workers it
    forks. The most specific location wins (per-bucket settings, as Hadoop's S3A has); empty
    options remove the entry. Unset locations use the backend's defaults (AWS_ENDPOINT_URL,
    AWS_PROFILE, fsspec's own config)."""
    key = location.rstrip("/")
    if options:
        _STORAGE_OPTIONS[key] = dict(options)
    else:
        _STORAGE_OPTIONS.pop(key, None)


def storage_options(url: str) -> dict[str, Any]:
    """The options `set_storage_options` gave the most specific location holding `url`."""
    best = max((loc for loc in _STORAGE_OPTIONS if url == loc or url.startswith(loc + "/")), key=len, default=None)
    return dict(_STORAGE_OPTIONS[best]) if best is not None else {}


class _OSErrorFile:
    """A remote file whose backend's own exceptions surface as OSError, so that a reader that
    skips a shard cut off mid-read (OSError) does so on every backend, not only on disks."""

    def __init__(self, f: Any, where: str):
        self._f, self._where = f, where

    def _call(self, name: str, *args: Any) -> Any:
        try:
            return getattr(self._f, name)(*args)
        except Exception as err:  # noqa: BLE001 - botocore, aiohttp, google-auth types
            converted = as_oserror(err, f"{name} {self._where}")
            if converted is err:
                raise
            raise converted from err

    def read(self, *args: Any) -> Any:
        return self._call("read", *args)

    def readinto(self, buf: Any) -> int:
        return self._call("readinto", buf)

    def readline(self, *args: Any) -> Any:
        return self._call("readline", *args)

    def write(self, data: Any) -> int:
        return self._call("write", data)

    def seek(self, *args: Any) -> int:
        return self._call("seek", *args)

    def tell(self) -> int:
        return self._call("tell")

    def flush(self) -> None:
        self._call("flush")

    def close(self) -> None:
        self._call("close")

    def __getattr__(self, name: str) -> Any:  # readable, closed, mode, ...
        return getattr(self._f, name)

    def __enter__(self) -> "_OSErrorFile":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

