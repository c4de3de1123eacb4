"""Trained weights on disk, read without the trainer: `unclip export` files and the EMA of a
run directory's latest complete checkpoint.

This module is the file contract between training, which writes these files
(`trainer/checkpoint.py`, `trainer/export.py`), and sampling, which reads them
(`models/loading.py`). Reading never unpickles (safetensors and JSON only) and needs neither
DeepSpeed nor the trainer.

    RUN_DIR/checkpoints/latest                    "step_0000123", replaced after meta.json
    RUN_DIR/checkpoints/step_0000123/meta.json    written last: stage, step, config, world
                                                  size, parameter shapes, every file's size
        rank_00000.safetensors                    rank 0's EMA shard (`ema/model.<name>`), ...
        buffers.safetensors                       the model's persistent buffers
        (DeepSpeed's ZeRO shards, the per-rank RNG and data states: the trainer's alone)

The EMA is sharded like ZeRO-3 shards parameters: rank r of W holds elements
`[r * p, (r + 1) * p)` of each flattened parameter, `p = ceil(numel / W)`, zero padded.
An export file is one safetensors state dict of the whole model, whose metadata says
`format`, `stage`, `step`, `weights` ("ema") and the job's `config` (JSON). It may live in an
object store (`s3://bucket/prior.safetensors`, any fsspec URL): fsspec's backend finds the
endpoint and credentials where its own tools do (`AWS_ENDPOINT_URL`, `AWS_PROFILE`, fsspec's
config); run directories are filesystem paths. Local paths never go through fsspec.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import logging
import math
import re
import tempfile
from pathlib import Path
from typing import Any, Iterable, Iterator, Mapping, Optional, Union

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from torch import Tensor

log = logging.getLogger("unclip.checkpoint")

LATEST = "latest"
META = "meta.json"
BUFFERS = "buffers.safetensors"
EXPORT_FORMAT = "unclip-export-1"
STEP_DIR = re.compile(r"^step_(\d{7,})$")


class WeightsError(ValueError):
    """Weights that cannot be read or used; the message names the file and why."""


PathOrURL = Union[str, Path]


def is_url(path: PathOrURL) -> bool:
    """A URL (`s3://bucket/key`, `gs://`, `https://`) rather than a filesystem path."""
    return "://" in str(path)


def step_dir_name(step: int) -> str:
    return f"step_{step:07d}"


def rank_file(rank: int, suffix: str) -> str:
    return f"rank_{rank:05d}.{suffix}"


# ------------------------------------------------------------------ EMA shards
def shard_bounds(numel: int, rank: int, world_size: int) -> tuple[int, int]:
    """[start, stop) of `rank`'s slice of a flattened tensor of `numel` elements (padded)."""
    size = math.ceil(numel / world_size)
    return rank * size, (rank + 1) * size


def cut_shard(full: Tensor, rank: int, world_size: int) -> Tensor:
    """`rank`'s zero-padded fp32 slice of `full` (any shape), on `full`'s device."""
    flat = full.detach().reshape(-1).float()
    start, stop = shard_bounds(flat.numel(), rank, world_size)
    out = torch.zeros(stop - start, dtype=torch.float32, device=flat.device)
    piece = flat[start:stop]
    out[: piece.numel()] = piece
    return out


def merge_shards(shards: list[Tensor], shape: Iterable[int]) -> Tensor:
    """Full tensor of `shape` from every rank's slice, in rank order."""
    shape = tuple(shape)
    numel = math.prod(shape)
    return torch.cat([s.reshape(-1) for s in shards])[:numel].reshape(shape).clone()


def merged_state(shards_by_rank: list[Mapping[str, Tensor]], shapes: Mapping[str, Iterable[int]]) -> dict[str, Tensor]:
    """Consolidated full EMA tensors from every rank's shards."""
    return {name: merge_shards([s[name] for s in shards_by_rank], shape) for name, shape in shapes.items()}


# ------------------------------------------------------------------ checkpoints (read side)
def sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def validate(step_dir: Path) -> Optional[str]:
    """None if `step_dir` is a complete checkpoint, else why not."""
    meta_path = step_dir / META
    if not meta_path.is_file():
        return "no meta.json (the save did not finish)"
    try:
        meta = json.loads(meta_path.read_text())
    except (OSError, json.JSONDecodeError) as err:
        return f"unreadable meta.json ({err})"
    if not meta.get("complete"):
        return "meta.json does not mark it complete"
    for name, info in meta.get("files", {}).items():
        path = step_dir / name
        if not path.is_file():
            return f"missing file {name}"
        if path.stat().st_size != info["size"]:
            return f"{name} has {path.stat().st_size} bytes, expected {info['size']}"
        if "sha256" in info and sha256(path) != info["sha256"]:
            return f"{name} does not match its sha256"
    return None


def read_meta(step_dir: Path) -> dict[str, Any]:
    return json.loads((step_dir / META).read_text())


def step_dirs(root: Path) -> list[Path]:
    """The `step_*` directories under a checkpoints folder, oldest first."""
    if not root.is_dir():
        return []
    dirs = [p for p in root.iterdir() if p.is_dir() and STEP_DIR.match(p.name)]
    return sorted(dirs, key=lambda p: int(STEP_DIR.match(p.name).group(1)))


def find_latest(root: Path) -> Optional[Path]:
    """The newest complete checkpoint under `root`: `latest` if it is good, else the newest
    good one (incomplete ones are skipped with a warning)."""
    named = None
    latest = root / LATEST
    if latest.is_file():
        named = root / latest.read_text().strip()
        problem = validate(named)
        if problem is None:
            return named
        log.warning("checkpoint %s named by %s is unusable: %s; looking for an older one", named, latest, problem)
    for step_dir in reversed(step_dirs(root)):
        if step_dir == named:
            continue
        problem = validate(step_dir)
        if problem is None:
            return step_dir
        log.warning("ignoring incomplete checkpoint %s: %s", step_dir, problem)
    return None


def resolve_checkpoint(path: Path) -> Path:
    """A run directory (its latest complete checkpoint), its checkpoints folder, or one checkpoint."""
    path = Path(path)
    if (path / META).is_file():
        problem = validate(path)
        if problem:
            raise WeightsError(f"{path} is not a complete checkpoint: {problem}")
        return path
    root = path / "checkpoints" if (path / "checkpoints").is_dir() else path
    found = find_latest(root)
    if found is None:
        raise WeightsError(f"no complete checkpoint under {root}")
    return found


@dataclasses.dataclass
class StageWeights:
    """One stage's trained weights: `state` is the model's full state dict (EMA parameters
    and persistent buffers), `config` the job's config as saved (a plain dict)."""

    stage: str
    step: int
    config: dict[str, Any]
    state: dict[str, Tensor]
    source: str


def read_checkpoint_ema(path: Path) -> StageWeights:
    """The consolidated EMA weights (and buffers) of a run's latest complete checkpoint (or of
    the checkpoint `path`), merged from every rank's shards in memory."""
    step_dir = resolve_checkpoint(path)
    meta = read_meta(step_dir)
    shards = []
    for rank in range(meta["world_size"]):
        tensors = load_file(step_dir / rank_file(rank, "safetensors"))
        shards.append({k.removeprefix("ema/model."): v for k, v in tensors.items() if k.startswith("ema/model.")})
    weights = merged_state(shards, meta["param_shapes"])
    buffers = load_file(step_dir / BUFFERS)
    return StageWeights(meta["stage"], int(meta["step"]), meta["config"], {**buffers, **weights}, str(step_dir))


# ------------------------------------------------------------------ export files
def write_export(weights: StageWeights, out: PathOrURL, dtype: torch.dtype = torch.float32) -> dict[str, str]:
    """Write `weights` as an export file (floating tensors as `dtype`) to a path or a URL,
    atomically: a reader never sees part of one; its metadata."""
    state = {k: (v.to(dtype) if v.is_floating_point() else v).contiguous() for k, v in weights.state.items()}
    info = {
        "format": EXPORT_FORMAT,
        "stage": weights.stage,
        "step": str(weights.step),
        "weights": "ema",
        "config": json.dumps(weights.config),
    }
    local = _local_path(out)
    if local is None:
        _upload(state, info, str(out))
        return info
    local.parent.mkdir(parents=True, exist_ok=True)
    tmp = local.with_name(f".{local.name}.tmp")
    save_file(state, tmp, metadata=info)
    tmp.replace(local)
    return info


def read_export_info(path: Path, where: Optional[str] = None) -> dict[str, Any]:
    """An export file's metadata, with `config` parsed (WeightsError naming `where`, by default
    `path`, if it is not one)."""
    where = where or str(path)
    try:
        with safe_open(str(path), framework="pt") as f:
            info = dict(f.metadata() or {})
    except Exception as err:  # safetensors raises several types on a foreign file
        raise WeightsError(f"{where}: not a safetensors file ({err})") from None
    if info.get("format") != EXPORT_FORMAT:
        raise WeightsError(f"{where}: not an `unclip export` file (no unclip metadata)")
    info["config"] = json.loads(info["config"])
    return info


def read_export(path: Path, where: Optional[str] = None) -> StageWeights:
    where = where or str(path)
    info = read_export_info(path, where)
    return StageWeights(info["stage"], int(info["step"]), info["config"], load_file(str(path)), where)


@dataclasses.dataclass
class StageShapes:
    """What `read_weights` would return, without the tensors: their shapes."""

    stage: str
    step: int
    config: dict[str, Any]
    shapes: dict[str, tuple[int, ...]]
    source: str


def _file_shapes(path: Path) -> dict[str, tuple[int, ...]]:
    with safe_open(str(path), framework="pt") as f:
        return {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}


def read_shapes(path: Path) -> StageShapes:
    """The stage, config and tensor shapes of an export file or of a run's (or checkpoint's)
    latest complete checkpoint, reading headers only (cheap at any model size)."""
    path = Path(path)
    if path.is_file():
        info = read_export_info(path)
        return StageShapes(info["stage"], int(info["step"]), info["config"], _file_shapes(path), str(path))
    if path.is_dir():
        step_dir = resolve_checkpoint(path)
        meta = read_meta(step_dir)
        shapes = {k: tuple(v) for k, v in meta["param_shapes"].items()}
        return StageShapes(meta["stage"], int(meta["step"]), meta["config"], {**_file_shapes(step_dir / BUFFERS), **shapes}, str(step_dir))
    raise WeightsError(f"{path} is neither an exported weights file nor a run directory")


def read_weights(path: PathOrURL) -> StageWeights:
    """An export file (a path or a URL), or the EMA of a run directory / checkpoint directory."""
    local = _local_path(path)
    if local is None:
        return _download(str(path))
    if local.is_file():
        return read_export(local)
    if local.is_dir():
        return read_checkpoint_ema(local)
    raise WeightsError(f"{path} is neither an exported weights file nor a run directory")


# ------------------------------------------------------------------ export files in object stores
def _local_path(path: PathOrURL) -> Optional[Path]:
    """`path` as a filesystem path (`file://` URLs included), None for a remote URL."""
    if not is_url(path):
        return Path(path)
    return Path(str(path).removeprefix("file://")) if str(path).startswith("file://") else None


def _remote(url: str) -> tuple[Any, str]:
    import fsspec  # only remote weights pay for it

    with _backend_errors("open", url):
        return fsspec.core.url_to_fs(url)


@contextlib.contextmanager
def _backend_errors(action: str, url: str) -> Iterator[None]:
    """A storage backend's own exceptions (botocore's, aiohttp's, google-auth's) as one
    OSError naming the URL; a missing object, backend or bucket as WeightsError."""
    try:
        yield
    except FileNotFoundError:
        missing = "no such file" if action == "read" else "its bucket does not exist"
        raise WeightsError(f"cannot {action} {url}: {missing}") from None
    except (ImportError, ValueError) as err:  # no backend for the scheme, a malformed URL
        raise WeightsError(f"cannot {action} {url}: {err}") from None
    except Exception as err:  # noqa: BLE001 - each backend raises its own types
        raise OSError(f"cannot {action} {url}: {type(err).__name__}: {err}") from None


def _upload(state: dict[str, Tensor], info: dict[str, str], url: str) -> None:
    """Serialise to a temporary file, then upload it. An object store's upload appears whole
    or not at all (one PUT, or a multipart upload completed last and aborted on failure), so
    no temporary name is needed there, nor a server-side copy of a multi-GB file."""
    fs, remote = _remote(url)
    with tempfile.TemporaryDirectory(prefix="unclip-export-") as tmp:
        local = Path(tmp) / "export.safetensors"
        save_file(state, local, metadata=info)
        with _backend_errors("write", url):
            fs.put_file(str(local), remote)


def _download(url: str) -> StageWeights:
    """An export file at `url`, through a temporary copy: safetensors maps files, and the
    copy streams in chunks where reading into memory would hold the weights twice."""
    fs, remote = _remote(url)
    with tempfile.TemporaryDirectory(prefix="unclip-weights-") as tmp:
        local = Path(tmp) / "weights.safetensors"
        with _backend_errors("read", url):
            fs.get_file(remote, str(local))
        return read_export(local, where=url)
