"""The sampling pipeline from trained weights: export files or run directories, no trainer.

Every export file (and every checkpoint) says which stage it holds, so users pass the weights
in any order: `--weights clip.safetensors prior.safetensors runs/decoder up*.safetensors`. A
run directory is read in place: its latest complete checkpoint's EMA shards are merged in
memory. A folder that is neither (`unclip demo`'s output folder, a folder of exports, a root of
run directories) stands for the stages in it (`weight_paths`). Each stage's spec
(`models/stages/`) builds its module and says where it goes.

The CLIP is a `clip` stage's weights, or a pretrained open_clip model named by the caller
(`clip=ClipConfig(name, pretrained)`: an open_clip tag or a local file), or else the one the
stages' `clip` sections name, if they name pretrained weights (e.g. Karlo's
`ViT-L-14-quickgelu` with `pretrained: openai`, after `unclip import`). Either way it speaks
the stages' embedding convention (`clip.embeddings`: unit-norm, or raw as Karlo's stages read
them).
"""

from __future__ import annotations

import dataclasses
import logging
import os
from pathlib import Path
from typing import Any, Iterable, Optional

from models import stages
from models.clip import ClipAdapter, ClipConfig, load_clip_from_config
from models.config import ConfigError
from models.pipeline import UnCLIPPipeline
from models.stages import StageSpec
from models.weights import META, WeightsError, is_url, read_export_info, read_weights

log = logging.getLogger("unclip.loading")


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


def is_run_dir(path: Path) -> bool:
    """A run directory, its checkpoints folder, or one checkpoint (what `read_weights` reads in place)."""
    return (path / "checkpoints").is_dir() or (path / META).is_file() or (path / "latest").is_file()


def _exports_in(folder: Path) -> list[Path]:
    found = []
    for path in sorted(folder.glob("*.safetensors")):
        try:
            read_export_info(path)
        except WeightsError:
            continue  # another tool's safetensors file
        found.append(path)
    return found


def weight_paths(paths: Iterable[str | Path]) -> list[str | Path]:
    """`--weights` as stage paths: export files and run directories as they are; any other
    folder stands for the export files in it, else those in its `weights/` (the demo's output
    folder), else the run directories under it (a run root). WeightsError names a path that
    holds none or does not exist."""
    out: list[str | Path] = []
    for given in paths:
        if is_url(given) and not str(given).startswith("file://"):
            out.append(str(given))  # an object store's export file: read as it is
            continue
        path = Path(str(given).removeprefix("file://"))
        if path.is_file() or (path.is_dir() and is_run_dir(path)):
            out.append(path)
        elif path.is_dir():
            inner = _exports_in(path) or (_exports_in(path / "weights") if (path / "weights").is_dir() else [])
            inner = inner or sorted(d for d in path.iterdir() if d.is_dir() and is_run_dir(d))
            if not inner:
                raise WeightsError(
                    f"{path}: no `unclip export` files (*.safetensors), weights/ folder or run directories in it"
                )
            out.extend(inner)
        else:
            raise WeightsError(f"{path}: no such file or directory")
    return out


def load_pipeline(
    paths: Iterable[str | Path], device: str = "cpu", use_prior: bool = True, clip: Optional[ClipConfig] = None
) -> UnCLIPPipeline:
    """CLIP, prior, decoder and upsamplers from their weights (`paths` as `weight_paths`
    expands them); upsamplers are chained by resolution. `clip` names a pretrained open_clip
    model to use instead of a `clip` stage's weights. With `use_prior=False` the pipeline is the
    decoder-only baseline."""
    found: dict[str, list[LoadedStage]] = {"clip": [], "prior": [], "decoder": [], "upsampler": []}
    for path in weight_paths(paths):
        loaded = load_stage(path, device)
        found[loaded.spec.role].append(loaded)
    if len(found["decoder"]) != 1:
        raise WeightsError(f"--weights: need exactly one decoder (got {len(found['decoder'])}: {_sources(found['decoder'])})")
    for role in ("clip", "prior"):
        if len(found[role]) > 1:
            raise WeightsError(f"--weights: at most one {role} (got {len(found[role])}: {_sources(found[role])})")
    decoder = found["decoder"][0]
    conditioned = found["decoder"] + (found["prior"] if use_prior else [])
    encoder = _clip(found["clip"], clip, conditioned, device)
    encoder.normalize = _convention(conditioned) == "unit"
    for stage in conditioned:
        trained_on = getattr(getattr(stage.cfg, "clip", None), "name", None)
        if trained_on is not None and trained_on != getattr(encoder, "name", trained_on):
            log.warning(
                "%s was trained on embeddings of CLIP %s (its clip.name); sampling encodes with %s",
                stage.source, trained_on, encoder.name,
            )
    prior = found["prior"][0].module if found["prior"] and use_prior else None
    upsamplers = sorted((s.module for s in found["upsampler"]), key=lambda up: up.cfg.lowres_size)
    try:
        return UnCLIPPipeline(encoder, prior, decoder.module, upsamplers)
    except ValueError as err:
        raise WeightsError(f"--weights: {err}") from None


def _clip(loaded: list[LoadedStage], named: Optional[ClipConfig], stages_: list[LoadedStage], device: str) -> ClipAdapter:
    """The pipeline's CLIP: the `clip` stage given, else the one named, else the stages' own."""
    if loaded and named is not None:
        raise WeightsError(f"--clip {named.name} and a clip stage in --weights ({loaded[0].source}): give one of them")
    if loaded:
        return loaded[0].module
    where = "--clip"
    if named is None:
        named = clip_of_stages(stages_)
        where = f"clip {named.name} ({named.pretrained}), named by {_sources(stages_)}"
        log.warning("no clip stage in --weights: encoding with the stages' CLIP %s (%s)", named.name, named.pretrained)
    elif not named.pretrained:
        log.warning("--clip %s without --clip-pretrained: random weights (seeded, so they match a precompute's)", named.name)
    try:
        return load_clip_from_config(named, device=device)
    except FileNotFoundError as err:
        raise WeightsError(f"{where}-pretrained: {err}" if where == "--clip" else f"{where}: {err}") from None
    except (OSError, ValueError, RuntimeError) as err:
        raise WeightsError(f"{where}: {err}") from None


def clip_of_stages(loaded: list[LoadedStage]) -> ClipConfig:
    """The CLIP that the stages' `clip:` sections name (they must name the same one, with
    weights here: a random CLIP would embed nothing the stages know)."""
    sections = {s.source: s.cfg.clip for s in loaded}
    first = next(iter(sections.values()))
    if any((c.name, c.pretrained) != (first.name, first.pretrained) for c in sections.values()):
        named = ", ".join(f"{k}: {v.name} {v.pretrained}" for k, v in sections.items())
        raise WeightsError(f"--weights: the stages name different CLIPs ({named})")
    if not first.pretrained:
        raise WeightsError(
            f"--weights: no CLIP: add the clip stage's export or run directory, or name a pretrained open_clip "
            f"model with --clip NAME --clip-pretrained TAG|FILE (the stages were trained on embeddings of {first.name})"
        )
    if not _looks_like_tag(first.pretrained) and not os.path.isfile(first.pretrained):
        raise WeightsError(
            f"--weights: no CLIP: the stages' clip.pretrained ({first.pretrained}) is not a file here; "
            "add the clip stage's weights or pass --clip NAME --clip-pretrained TAG|FILE"
        )
    return first


def _convention(loaded: list[LoadedStage]) -> str:
    """The embeddings (`unit` or `raw`) the stages read; they must agree."""
    kinds = {s.source: s.cfg.clip.embeddings for s in loaded}
    if len(set(kinds.values())) > 1:
        raise WeightsError(f"--weights: the stages read different CLIP embeddings ({', '.join(f'{k}: {v}' for k, v in kinds.items())})")
    return next(iter(kinds.values()))


def _looks_like_tag(pretrained: str) -> bool:
    """An open_clip pretrained tag (`laion2b_s32b_b79k`), not a path."""
    return os.sep not in pretrained and not pretrained.endswith((".pt", ".pth", ".bin", ".safetensors"))


def _sources(loaded: list[LoadedStage]) -> str:
    return ", ".join(s.source for s in loaded) or "none"
