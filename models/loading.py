"""The sampling pipeline from trained weights: export files or run directories, no trainer.

Every export file (and every checkpoint) says which stage it holds, so users pass the weights
in any order: `--weights clip.safetensors prior.safetensors runs/decoder up*.safetensors`. A
run directory is read in place: its latest complete checkpoint's EMA shards are merged in
memory. Each stage's spec (`models/stages/`) builds its module and says where it goes.

The CLIP is a `clip` stage's weights when one is given; otherwise the open_clip model the
stages' `clip:` sections name (e.g. Karlo's `ViT-L-14-quickgelu` with `pretrained: openai`,
after `unclip import`). Either way it speaks the stages' embedding convention (`clip.embeddings`:
unit-norm, or raw as Karlo's stages read them).
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any, Iterable

from models import stages
from models.clip import ClipAdapter, load_clip_from_config
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
    """One stage from an export file (a path or a URL: `s3://bucket/prior.safetensors`) or a
    run directory, in eval mode on `device`."""
    weights = read_weights(path)
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
    if len(found["decoder"]) != 1:
        raise WeightsError(f"--weights: need exactly one decoder (got {len(found['decoder'])}: {_sources(found['decoder'])})")
    if len(found["clip"]) > 1:
        raise WeightsError(f"--weights: at most one clip (got {len(found['clip'])}: {_sources(found['clip'])})")
    if len(found["prior"]) > 1:
        raise WeightsError(f"--weights: at most one prior (got {len(found['prior'])}: {_sources(found['prior'])})")
    conditioned = found["decoder"] + (found["prior"] if use_prior else [])
    clip = found["clip"][0].module if found["clip"] else clip_of_stages(conditioned, device)
    clip.normalize = _convention(conditioned) == "unit"
    prior = found["prior"][0].module if found["prior"] and use_prior else None
    upsamplers = sorted((s.module for s in found["upsampler"]), key=lambda up: up.cfg.lowres_size)
    return UnCLIPPipeline(clip, prior, found["decoder"][0].module, upsamplers)


def clip_of_stages(loaded: list[LoadedStage], device: str = "cpu") -> ClipAdapter:
    """The CLIP that the stages' `clip:` sections name (they must name the same one, with
    weights: a random CLIP would embed nothing the stages know)."""
    sections = {s.source: s.cfg.clip for s in loaded}
    first = next(iter(sections.values()))
    differ = [src for src, c in sections.items() if (c.name, c.pretrained) != (first.name, first.pretrained)]
    if differ:
        raise WeightsError(f"--weights: the stages name different CLIPs ({', '.join(f'{k}: {v.name} {v.pretrained}' for k, v in sections.items())})")
    if first.pretrained is None:
        raise WeightsError(
            f"--weights: no clip weights given and {_sources(loaded)} name(s) CLIP {first.name} without "
            "`clip.pretrained`: add a clip stage's export to --weights"
        )
    try:
        return load_clip_from_config(first, device)
    except (OSError, ValueError, RuntimeError) as err:
        raise WeightsError(f"clip {first.name} ({first.pretrained}), named by {_sources(loaded)}: {err}") from None


def _convention(loaded: list[LoadedStage]) -> str:
    """The embeddings (`unit` or `raw`) the stages read; they must agree."""
    kinds = {s.source: s.cfg.clip.embeddings for s in loaded}
    if len(set(kinds.values())) > 1:
        raise WeightsError(f"--weights: the stages read different CLIP embeddings ({', '.join(f'{k}: {v}' for k, v in kinds.items())})")
    return next(iter(kinds.values()))


def _sources(loaded: list[LoadedStage]) -> str:
    return ", ".join(s.source for s in loaded) or "none"
