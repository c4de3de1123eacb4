"""The URLs a command was given, checked at its start, before any work: each has an fsspec
backend installed (else one line naming the URL and the package to install, exit 2), the
ones it writes are writable schemes, and run directories are filesystem paths.

Only each URL's scheme is looked at: nothing is listed or fetched, so a check costs an import.
"""

from __future__ import annotations

from typing import Any, Iterator, Optional, Union

from data_pipeline.io import backend_problem, mask_url, url_protocol
from models.config import ConfigError

URLs = Optional[Union[str, list[str], tuple[str, ...]]]


def _one_per_scheme(urls: URLs) -> Iterator[str]:
    """The first URL of each scheme in a URL, a `::`-list or a list of them (braces need no
    expanding: they never change a URL's scheme)."""
    items = [urls] if isinstance(urls, str) else list(urls or [])
    seen: set[str] = set()
    for item in items:
        for url in str(item).split("::"):
            url = url.strip()
            if url and url_protocol(url) not in seen:
                seen.add(url_protocol(url))
                yield url


def check_urls(what: str, urls: URLs, *, write: bool = False) -> None:
    """ConfigError naming `what` (a flag or config key) if a URL in `urls` cannot be used."""
    for url in _one_per_scheme(urls):
        problem = backend_problem(url, write=write)
        if problem:
            raise ConfigError(f"{what}: {problem}")


def check_run_dir(path: Optional[Any], what: str = "--run-dir") -> None:
    """Checkpoints are written with POSIX renames and read back by every rank: a run
    directory is a local or shared-filesystem path (NFS, Lustre, GPFS), never a URL."""
    if path is not None and "://" in str(path):
        raise ConfigError(f"{what} {mask_url(str(path))}: a run directory (checkpoints) must be a local or shared "
                          f"filesystem path, not a URL; data, embeddings and exported weights may live in object stores")


def check_data_sources(job: Any) -> None:
    """The shards and embeddings of every `data.sources` entry of a training job."""
    data = getattr(job, "data", None)
    for i, src in enumerate(data.sources if data is not None else []):
        check_urls(f"data.sources[{i}].shards", src.shards)
        check_urls(f"data.sources[{i}].embeddings", src.embeddings)
