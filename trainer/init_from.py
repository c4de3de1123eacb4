"""`init_from`: the initial weights of a fresh run, from an `unclip export` file (such as
`unclip import` writes) or a run directory (its latest complete checkpoint's EMA).

The weights must be of the job's stage, read the same CLIP's embeddings, and fit the model the
job's config builds tensor for tensor (names and shapes, parameters and persistent buffers);
anything else is refused with one message naming what differs, before any rank starts
(`unclip train` checks the headers) and again when the ranks load. Settings that change no
tensor (dropouts, learning rate, sampling steps, the diffusion's objective) may differ: that
is what fine-tuning changes. The weights also bring the stage's prepared buffers (the empty
caption's CLIP outputs, the raw embeddings' statistics, the PCA), so the preparation is
skipped. A run that has a checkpoint of its own resumes from it and ignores `init_from`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Mapping, Optional

import torch
from torch import nn

from models import stages
from models.config import ConfigError, config_to_dict
from models.stages import load_weights
from models.weights import StageShapes, WeightsError, read_shapes, read_weights
from trainer.checkpoint import config_differences

NAMED = 4  # tensors named per kind of mismatch


def _model_shapes(job: Any) -> dict[str, tuple[int, ...]]:
    with torch.device("meta"):  # names and shapes only, no memory at any size
        model = stages.get(job.stage).build(job)
    return {k: tuple(v.shape) for k, v in model.state_dict().items()}


def mismatch(job: Any, found: StageShapes, expected: Mapping[str, tuple[int, ...]]) -> Optional[str]:
    """Why the weights `found` cannot initialise `job`'s model (tensor shapes `expected`), or None."""
    where = f"init_from {found.source}"
    if found.stage != job.stage:
        return f"{where}: holds {found.stage} weights; this job trains the {job.stage} stage"
    saved_clip, clip = found.config.get("clip"), getattr(job, "clip", None)
    if saved_clip is not None and clip is not None:
        pairs = [(k, saved_clip.get(k), getattr(clip, k)) for k in ("name", "embeddings") if k in saved_clip]
        differ = [f"clip.{k} {a!r} there, {b!r} here" for k, a, b in pairs if a != b]
        if differ:
            return f"{where}: trained on another CLIP's embeddings ({'; '.join(differ)})"
    missing = sorted(set(expected) - set(found.shapes))
    unexpected = sorted(set(found.shapes) - set(expected))
    wrong = sorted(k for k in set(expected) & set(found.shapes) if tuple(found.shapes[k]) != tuple(expected[k]))
    if not (missing or unexpected or wrong):
        return None
    parts = [
        f"{label} {', '.join(names[:NAMED])}{' ...' if len(names) > NAMED else ''} ({len(names)})"
        for label, names in (("missing", missing), ("unexpected", unexpected), ("shapes differ:", wrong)) if names
    ]
    diffs = config_differences(found.config, config_to_dict(job), sections=("model",))
    hint = f"; model settings that differ: {'; '.join(diffs[:NAMED])}" if diffs else ""
    return f"{where}: the weights do not fit this job's {job.stage} model ({'; '.join(parts)}){hint}"


def check_init_from(job: Any) -> None:
    """ConfigError unless `job.init_from` can initialise the job's model (headers only)."""
    try:
        found = read_shapes(Path(job.init_from))
    except (WeightsError, OSError, ValueError) as err:
        raise ConfigError(f"init_from: {err}") from None
    problem = mismatch(job, found, _model_shapes(job))
    if problem:
        raise ConfigError(problem)


def load_init_from(job: Any, model: nn.Module) -> str:
    """Load `job.init_from` into `model` (built from `job`, before DeepSpeed wraps it);
    ConfigError on any mismatch. Returns a line saying what was loaded."""
    try:
        weights = read_weights(Path(job.init_from))
    except (WeightsError, OSError, ValueError) as err:
        raise ConfigError(f"init_from: {err}") from None
    found = StageShapes(weights.stage, weights.step, weights.config, {k: tuple(v.shape) for k, v in weights.state.items()}, weights.source)
    problem = mismatch(job, found, {k: tuple(v.shape) for k, v in model.state_dict().items()})
    if problem:
        raise ConfigError(problem)
    load_weights(model, weights.state, f"init_from {weights.source}")
    return f"initial weights from {weights.source} ({weights.stage}, step {weights.step}, {len(weights.state)} tensors)"
