"""`unclip export`: the EMA weights of a run's latest complete checkpoint, merged from every
rank's shards into one safetensors file that loads with plain PyTorch (no DeepSpeed, any
number of devices).

The file's metadata carries the job's stage and config, so `models.loading.load_stage`
rebuilds the model by itself (the format: `models/weights.py`). For the `clip` stage the
tensors are exactly open_clip's state dict, so `models.clip.load_clip(name, pretrained=<file>)`
loads them too.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from models.weights import read_checkpoint_ema, write_export


def export(run_or_checkpoint: Path, out: Path, dtype: torch.dtype = torch.float32) -> dict[str, Any]:
    """Write the EMA weights of the latest complete checkpoint to `out` (safetensors)."""
    weights = read_checkpoint_ema(Path(run_or_checkpoint))
    info = write_export(weights, Path(out), dtype)
    return {
        "checkpoint": weights.source, "tensors": len(weights.state),
        "parameters": sum(v.numel() for v in weights.state.values()), **info,
    }
