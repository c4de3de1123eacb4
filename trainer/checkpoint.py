"""Sharded checkpoints: save, validate, find the latest good one, load, keep the last K.

Layout of `RUN_DIR/checkpoints/`:

    step_0000123/                 one checkpoint
        mp_rank_00_model_states.pt, *optim_states.pt   DeepSpeed's (ZeRO-sharded) states
        rank_00000.safetensors    this rank's EMA shard and torch/generator RNG states
        rank_00000.json           this rank's Python/NumPy RNG and data-loader state
        buffers.safetensors       the model's persistent buffers (rank 0)
        meta.json                 written last: config, step, world size, files + checksums
    latest                        "step_0000123", replaced atomically after meta.json
    universal/step_0000123/       DeepSpeed universal form, made when the world size changes

A checkpoint is complete iff its meta.json exists, says so, and every file it lists has the
recorded size (and, for our own small files, sha256). A crash while saving therefore leaves
an incomplete directory that is ignored with a warning, and `latest` still names the
previous, complete one. The read side of this layout (validation, finding the latest, the EMA
shards) is `models/weights.py`, which sampling shares. DeepSpeed's files are read weights-only (`trainer/safe_load.py`): a
checkpoint directory is data, never code.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Callable, Optional

import torch
from safetensors.torch import load_file, save_file
from torch import Tensor

from models.weights import (
    BUFFERS, LATEST, META, find_latest, rank_file, sha256, step_dir_name, step_dirs, validate,
)
from trainer import distributed as dist

FORMAT = 1
_HASHED = re.compile(r"^(rank_\d+\.(json|safetensors)|buffers\.safetensors)$")
# Config sections that define the trained weights: resuming with any of them changed would
# load weights into a different model.
COMPATIBLE_SECTIONS = ("stage", "model", "clip")


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be written or used; the message says which and why."""


# What a refused load leaves behind: said in every such error, since the user's next step
# (delete the checkpoint? restore it?) depends on it.
_UNTOUCHED = (
    "nothing in it was unpickled, and every checkpoint is left as it is "
    "(restore that file, or move the checkpoint away to resume from an older one)"
)


def atomic_write_text(path: Path, text: str) -> None:
    """Write `text` to `path` so readers see the old or the new content, never a mix."""
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    dir_fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


def config_differences(saved: dict[str, Any], current: dict[str, Any], sections=COMPATIBLE_SECTIONS) -> list[str]:
    """Dotted keys (within `sections`) whose values differ between two config dicts."""
    out: list[str] = []

    def walk(a: Any, b: Any, key: str) -> None:
        if isinstance(a, dict) and isinstance(b, dict):
            for k in sorted(set(a) | set(b)):
                walk(a.get(k), b.get(k), f"{key}.{k}" if key else k)
        elif a != b:
            out.append(f"{key}: checkpoint {a!r}, config {b!r}")

    for section in sections:
        walk(saved.get(section), current.get(section), section)
    return out


def resume_problem(meta: dict[str, Any], config: dict[str, Any], step_dir: Path) -> Optional[str]:
    """Why the job `config` (a plain dict) cannot resume from this checkpoint, or None."""
    diffs = config_differences(meta["config"], config)
    if diffs:
        return (
            f"checkpoint {step_dir} was written by an incompatible job; differing fields:\n  " + "\n  ".join(diffs)
            + "\n(use another run directory, or --no-resume to start over)"
        )
    saved, wanted = meta["zero_stage"], config["deepspeed"]["zero_stage"]
    if (saved == 3) != (wanted == 3):
        return (
            f"checkpoint {step_dir} was written with ZeRO {saved}; DeepSpeed cannot load it under ZeRO {wanted} "
            f"(ZeRO-3 partitions weights differently): keep deepspeed.zero_stage "
            f"{'3' if saved == 3 else 'at 0, 1 or 2'} to resume this run"
        )
    return None


class Checkpoints:
    """The checkpoints of one run, as seen by one rank."""

    def __init__(self, root: Path, rank: int, world_size: int, keep_last: int) -> None:
        self.root = Path(root)
        self.rank, self.world_size = rank, world_size
        self.keep_last = keep_last

    # ------------------------------------------------------------------ finding
    def step_dirs(self) -> list[Path]:
        return step_dirs(self.root)

    def find_latest(self) -> Optional[Path]:
        """The newest complete checkpoint: `latest` if it is good, else the newest good one."""
        return find_latest(self.root)

    # ------------------------------------------------------------------ saving
    def _check_writable(self, step_dir: Path) -> None:
        """All ranks agree that `step_dir` can be written, or all raise the same clear error."""
        problem = ""
        try:
            step_dir.mkdir(parents=True, exist_ok=True)
            probe = step_dir / f".probe_{self.rank}"
            probe.write_text("ok")
            probe.unlink()
        except OSError as err:
            problem = f"rank {self.rank}: {err.strerror or err} ({step_dir})"
        problems = [p for p in dist.all_gather_object(problem) if p]
        if problems:
            raise CheckpointError("cannot write checkpoint: " + "; ".join(problems) + "; the previous checkpoint is intact")

    def save(
        self,
        engine: Any,
        step: int,
        *,
        rank_tensors: dict[str, Tensor],
        rank_state: dict[str, Any],
        buffers: dict[str, Tensor],
        meta: dict[str, Any],
        on_written: Optional[Callable[[], None]] = None,
    ) -> Path:
        """Collective: every rank calls this with its own tensors/state; rank 0 writes meta.json
        and moves `latest` only after every rank has finished writing."""
        started = time.perf_counter()
        step_dir = self.root / step_dir_name(step)
        if self.rank == 0 and step_dir.exists():  # leftover of a save that crashed
            shutil.rmtree(step_dir)
        dist.barrier()
        self._check_writable(step_dir)
        try:
            engine.save_checkpoint(str(self.root), tag=step_dir.name, save_latest=False)
            save_file({k: v.contiguous() for k, v in rank_tensors.items()}, step_dir / rank_file(self.rank, "safetensors"))
            (step_dir / rank_file(self.rank, "json")).write_text(json.dumps(rank_state))
            if self.rank == 0:
                save_file({k: v.contiguous().cpu() for k, v in buffers.items()}, step_dir / BUFFERS)
            _fsync_dir_files(step_dir, self.rank)
        except OSError as err:  # a full disk or a lost mount: `latest` was not moved
            raise CheckpointError(
                f"cannot write checkpoint {step_dir}: rank {self.rank}: {err.strerror or err}; "
                "the previous checkpoint is intact"
            ) from err
        if on_written is not None:
            on_written()
        dist.barrier()  # every rank's files (DeepSpeed's included) are on disk
        if self.rank == 0:
            files = {p.name: self._file_record(p) for p in sorted(step_dir.iterdir()) if p.is_file() and p.name != META}
            meta = {**meta, "format": FORMAT, "complete": True, "files": files, "save_seconds": time.perf_counter() - started}
            atomic_write_text(step_dir / META, json.dumps(meta, indent=1, sort_keys=True))
            atomic_write_text(self.root / LATEST, step_dir.name)
            self.prune()
        dist.barrier()
        return step_dir

    @staticmethod
    def _file_record(path: Path) -> dict[str, Any]:
        record: dict[str, Any] = {"size": path.stat().st_size}
        if _HASHED.match(path.name):  # ours are small; DeepSpeed's shards are checked by size
            record["sha256"] = sha256(path)
        return record

    def prune(self) -> None:
        """Keep the newest `keep_last` complete checkpoints; drop older ones and partial saves
        (called by rank 0 right after a save, when no other save is in progress)."""
        dirs = self.step_dirs()
        complete = [d for d in dirs if validate(d) is None]
        keep = set(complete[-self.keep_last :])
        for d in dirs:
            if d not in keep:
                shutil.rmtree(d, ignore_errors=True)
                shutil.rmtree(self.root / "universal" / d.name, ignore_errors=True)

    # ------------------------------------------------------------------ loading
    def rank_state(self, step_dir: Path, rank: int) -> tuple[dict[str, Any], dict[str, Tensor]]:
        plain = json.loads((step_dir / rank_file(rank, "json")).read_text())
        return plain, load_file(step_dir / rank_file(rank, "safetensors"))

    def load_engine(self, engine: Any, step_dir: Path, *, universal: bool) -> None:
        from trainer.safe_load import UnsafeFileError, weights_only_loads

        root = self.root / "universal" if universal else self.root
        try:
            with weights_only_loads():  # DeepSpeed would unpickle whatever its shard files hold
                path, _ = engine.load_checkpoint(
                    str(root), tag=step_dir.name, load_optimizer_states=True, load_lr_scheduler_states=False
                )
        except UnsafeFileError as err:
            raise CheckpointError(f"cannot resume from {step_dir}: {err}; {_UNTOUCHED}") from None
        if path is None:
            raise CheckpointError(f"DeepSpeed could not load checkpoint {root / step_dir.name}")

    def ensure_universal(self, step_dir: Path) -> None:
        """Collective: rank 0 converts `step_dir` to DeepSpeed's universal form (once)."""
        out = self.root / "universal" / step_dir.name
        error = ""
        if self.rank == 0 and not (out / ".complete").is_file():
            error = convert_to_universal(step_dir, out)
        error = dist.broadcast_object(error)
        if error:
            raise CheckpointError(error)


def convert_to_universal(step_dir: Path, out: Path) -> str:
    """Run DeepSpeed's `ds_to_universal` on `step_dir` into `out`; '' on success, else why not."""
    from trainer.safe_load import REFUSED

    if out.exists():
        shutil.rmtree(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    # DeepSpeed's converter, with every load weights-only (it reads every shard of step_dir)
    cmd = [
        sys.executable, "-m", "trainer.safe_load", "ds_to_universal",
        "--input_folder", str(step_dir), "--output_folder", str(out),
        "--num_extract_workers", "1", "--num_merge_workers", "1", "--inject_missing_state",
    ]
    # the converter runs this very copy of `trainer`, wherever the job was started from
    here = str(Path(__file__).resolve().parents[1])
    path = os.pathsep.join(filter(None, [here, os.environ.get("PYTHONPATH")]))
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": path}
    done = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if done.returncode == REFUSED:
        refused = done.stderr.strip().splitlines()[-1].removeprefix("refused: ")
        return f"cannot convert {step_dir} to a universal checkpoint: {refused}; {_UNTOUCHED}"
    if done.returncode != 0:
        tail = "\n".join((done.stdout + done.stderr).strip().splitlines()[-15:])
        return f"converting {step_dir} to a universal checkpoint failed:\n{tail}"
    # ds_to_universal expects to load from the checkpoint's own tag directory
    for name in os.listdir(step_dir):
        if name.startswith("mp_rank_") and not (out / name).exists():
            shutil.copy2(step_dir / name, out / name)
    (out / ".complete").write_text("ok")
    return ""


def _fsync_dir_files(step_dir: Path, rank: int) -> None:
    for name in (rank_file(rank, "safetensors"), rank_file(rank, "json")):
        path = step_dir / name
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def torch_version_info() -> dict[str, str]:
    import deepspeed

    return {"torch": torch.__version__, "deepspeed": deepspeed.__version__}
