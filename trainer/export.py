"""Consolidated weights of a run: merge the EMA shards of the latest complete checkpoint into
one safetensors file that loads with plain PyTorch (no DeepSpeed, any number of devices).

The file's metadata carries the job's stage and config, so `load_exported` rebuilds the
model by itself. For the `clip` stage the tensors are exactly open_clip's state dict, so
`models.clip.load_clip(name, pretrained=<file>)` loads them too.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Optional, Union

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save, save_file
from torch import Tensor, nn

from models.config import build_config
from trainer.checkpoint import Checkpoints, CheckpointError, rank_file, read_meta, validate
from trainer.config import TRAIN_JOBS
from trainer.ema import merged_state


def resolve_checkpoint(path: Path) -> Path:
    """A run directory (its latest complete checkpoint) or one checkpoint directory."""
    path = Path(path)
    if (path / "meta.json").is_file():
        problem = validate(path)
        if problem:
            raise CheckpointError(f"{path} is not a complete checkpoint: {problem}")
        return path
    root = path / "checkpoints" if (path / "checkpoints").is_dir() else path
    found = Checkpoints(root, 0, 1, keep_last=1).find_latest()
    if found is None:
        raise CheckpointError(f"no complete checkpoint under {root}")
    return found


def consolidated_ema(step_dir: Path) -> tuple[dict[str, Tensor], dict[str, Any]]:
    """Full EMA weights (and the model's buffers) of a checkpoint, keyed like the model's
    state dict; and the checkpoint's meta."""
    meta = read_meta(step_dir)
    shards = []
    for rank in range(meta["world_size"]):
        tensors = load_file(step_dir / rank_file(rank, "safetensors"))
        shards.append({k.removeprefix("ema/model."): v for k, v in tensors.items() if k.startswith("ema/model.")})
    weights = merged_state(shards, meta["param_shapes"])
    buffers = load_file(step_dir / "buffers.safetensors")
    return {**buffers, **weights}, meta


def export(run_or_checkpoint: Path, out: Union[str, Path], dtype: torch.dtype = torch.float32) -> dict[str, Any]:
    """Write the EMA weights of the latest complete checkpoint to `out` (safetensors): a path,
    or any fsspec URL (`s3://bucket/weights/prior.safetensors`)."""
    step_dir = resolve_checkpoint(run_or_checkpoint)
    weights, meta = consolidated_ema(step_dir)
    weights = {k: (v.to(dtype) if v.is_floating_point() else v).contiguous() for k, v in weights.items()}
    info = {
        "format": "unclip-export-1",
        "stage": meta["stage"],
        "step": str(meta["step"]),
        "weights": "ema",
        "config": json.dumps(meta["config"]),
    }
    _write(weights, info, out)
    return {"checkpoint": str(step_dir), "tensors": len(weights), "parameters": sum(v.numel() for v in weights.values()), **info}


def _write(weights: dict[str, Tensor], info: dict[str, str], out: Union[str, Path]) -> None:
    if "://" in str(out):  # an object store: the serialised file, uploaded whole, appears at once
        from data_pipeline.io import atomic_write

        with atomic_write(str(out)) as f:
            f.write(save(weights, metadata=info))
        return
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.tmp")
    save_file(weights, tmp, metadata=info)
    tmp.replace(out)


def read_export_info(path: Path) -> dict[str, Any]:
    with safe_open(str(path), framework="pt") as f:
        info = dict(f.metadata() or {})
    if info.get("format") != "unclip-export-1":
        raise ValueError(f"{path}: not an `unclip export` file (no unclip metadata)")
    info["config"] = json.loads(info["config"])
    return info


def load_exported(path: Path, device: str = "cpu", job_cls: Optional[type] = None) -> tuple[nn.Module, Any]:
    """(model in eval mode with the exported weights, its job config) from an export file."""
    from trainer.stages import get_stage

    info = read_export_info(path)
    stage = info["stage"]
    job = build_config(job_cls or TRAIN_JOBS[stage], info["config"], source=str(path))
    model = get_stage(stage).build(job)
    missing, unexpected = model.load_state_dict(load_file(path), strict=False)
    missing = [k for k in missing if k in dict(model.state_dict())]
    if missing or unexpected:
        raise ValueError(f"{path}: weights do not match the {stage} model (missing {missing[:5]}, unexpected {unexpected[:5]})")
    return model.to(device).eval(), job
