"""Build an `UnCLIPPipeline` from exported weight files (or run directories), no DeepSpeed.

Each `unclip export` file says in its metadata which stage it holds, so users pass the files
in any order: `--weights clip.safetensors prior.safetensors decoder.safetensors up*.safetensors`.
"""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Iterable

from models.clip import load_clip
from models.pipeline import UnCLIPPipeline


class WeightsError(ValueError):
    """The given weights cannot make a pipeline (missing stage, duplicate, not an export)."""


def _as_export(path: Path, scratch: Path) -> Path:
    """An export file for `path`: the file itself, or a fresh export of a run directory."""
    if path.is_file():
        return path
    if path.is_dir():
        from trainer.export import export

        out = scratch / f"{path.name}.safetensors"
        export(path, out)
        return out
    raise WeightsError(f"--weights: {path} is neither an exported file nor a run directory")


def load_pipeline(paths: Iterable[str | Path], device: str = "cpu", use_prior: bool = True) -> UnCLIPPipeline:
    """Load CLIP, prior, decoder and upsamplers from exported files; upsamplers are chained
    by resolution. With `use_prior=False` the pipeline is the decoder-only baseline."""
    from trainer.export import load_exported, read_export_info

    found: dict[str, list] = {"clip": [], "prior": [], "decoder": [], "upsampler": []}
    with tempfile.TemporaryDirectory() as scratch:
        for raw in paths:
            path = _as_export(Path(raw), Path(scratch))
            try:
                info = read_export_info(path)
            except Exception as err:  # safetensors raises several types on a foreign file
                raise WeightsError(f"--weights: {raw}: {err}") from None
            stage = info["stage"]
            if stage == "clip":
                found["clip"].append(load_clip(info["config"]["model"]["name"], str(path), device=device))
            else:
                found[stage].append(load_exported(path, device=device)[0])
    for stage in ("clip", "decoder"):
        if len(found[stage]) != 1:
            raise WeightsError(f"--weights: need exactly one {stage} export, got {len(found[stage])}")
    if len(found["prior"]) > 1:
        raise WeightsError(f"--weights: at most one prior export, got {len(found['prior'])}")
    prior = found["prior"][0] if found["prior"] and use_prior else None
    upsamplers = sorted(found["upsampler"], key=lambda up: up.cfg.lowres_size)
    return UnCLIPPipeline(found["clip"][0], prior, found["decoder"][0], upsamplers)

