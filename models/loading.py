"""The sampling pipeline from trained weights: export files or run directories, no trainer.

Every export file (and every checkpoint) says which stage it holds, so users pass the weights
in any order: `--weights clip.safetensors prior.safetensors runs/decoder up*.safetensors`. A
run directory is read in place: its latest complete checkpoint's EMA shards are merged in
memory. Each stage's spec (`models/stages/`) builds its module and says where it goes.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any, Iterable

from models import stages
from models.config import ConfigError
from models.pipeline import UnCLIPPipeline
from models.stages import StageSpec
from models.weights import WeightsError, read_weights


@dataclasses.dataclass
class LoadedStage:
    spec: StageSpec
    cfg: Any  # the stage's config sections (`spec.config`)
    module: Any  # what the pipeline calls: a ClipAdapter, a prior, a decoder, an upsampler
    step: int
    source: str


def load_stage(path: str | Path, device: str = "cpu") -> LoadedStage:
    """One stage from an export file or a run directory, in eval mode on `device`."""
    weights = read_weights(Path(path))
    try:
        spec = stages.get(weights.stage)
        cfg = spec.stage_config(weights.config, source=weights.source)
        module = spec.load_for_sampling(cfg, weights.state, device, where=weights.source)
    except (ConfigError, ValueError) as err:
        raise WeightsError(f"{path}: {err}") from None
    return LoadedStage(spec, cfg, module, weights.step, weights.source)


def load_pipeline(paths: Iterable[str | Path], device: str = "cpu", use_prior: bool = True) -> UnCLIPPipeline:
    """CLIP, prior, decoder and upsamplers from their weights; upsamplers are chained by
    resolution. With `use_prior=False` the pipeline is the decoder-only baseline."""
    found: dict[str, list[LoadedStage]] = {"clip": [], "prior": [], "decoder": [], "upsampler": []}
    for path in paths:
        loaded = load_stage(path, device)
        found[loaded.spec.role].append(loaded)
    for role in ("clip", "decoder"):
        if len(found[role]) != 1:
            raise WeightsError(f"--weights: need exactly one {role} (got {len(found[role])}: {_sources(found[role])})")
    if len(found["prior"]) > 1:
        raise WeightsError(f"--weights: at most one prior (got {len(found['prior'])}: {_sources(found['prior'])})")
    prior = found["prior"][0].module if found["prior"] and use_prior else None
    upsamplers = sorted((s.module for s in found["upsampler"]), key=lambda up: up.cfg.lowres_size)
    return UnCLIPPipeline(found["clip"][0].module, prior, found["decoder"][0].module, upsamplers)


def _sources(loaded: list[LoadedStage]) -> str:
    return ", ".join(s.source for s in loaded) or "none"
