"""`unclip import --from diffusers DIR --out WEIGHTS_DIR [--configs DIR] [--set KEY=VALUE ...]`:
released weights in diffusers' `UnCLIPPipeline` layout (Karlo's) -> unclip stage weights.

WEIGHTS_DIR gets, for the prior, the decoder and the upsampler, an `unclip export` file
(`<stage>.safetensors`, which `unclip sample --weights` reads and `unclip train --init-from`
fine-tunes from) and the stage's job config (`<stage>.yaml`): the architecture read from DIR,
everything the folder does not say (training, sampling steps and guidance, the CLIP) from
`--configs` (default `configs/karlo/`), then `--set` (applied to every stage config that has
the key's section, e.g. `clip.*` to the prior and the decoder). The CLIP the stages name must
have the folder's text-encoder architecture; its weights are open_clip's (`clip.pretrained`,
OpenAI's for Karlo), which `unclip sample` loads when no clip weights are given.
Everything is read and checked before anything is written; WEIGHTS_DIR appears whole or not at all.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

from launch.cli import EXIT_OK, EXIT_RUNTIME, EXIT_USAGE

KARLO_CONFIGS = Path(__file__).resolve().parents[1] / "configs" / "karlo"


def _has_section(raw: dict[str, Any], key: str) -> bool:
    node: Any = raw
    for part in key.split(".")[:-1]:
        node = node.get(part) if isinstance(node, dict) else None
    return isinstance(node, dict)


def stage_bases(configs: Path, overrides: list[str]) -> dict[str, dict[str, Any]]:
    """Each stage's config file (with its `base:` files), with every `--set` applied to the
    stages whose config has the key's section (`clip.name`: the prior and the decoder;
    `model.unet.dropout`: the decoder and the upsampler; `train.steps`: all three)."""
    from launch.config_files import apply_override, load_raw
    from launch.import_diffusers import STAGES
    from models.config import ConfigError

    raws = {stage: load_raw(Path(configs) / f"{stage}.yaml") for stage in STAGES}
    for assignment in overrides:
        key = assignment.partition("=")[0].strip()
        targets = [stage for stage, raw in raws.items() if _has_section(raw, key)]
        if not targets:
            raise ConfigError(f"--set {assignment}: no stage config in {configs} has the section of {key!r}")
        for stage in targets:
            apply_override(raws[stage], assignment)
    return raws


def check_clip(folder: Path, stage: str, clip_name: str) -> None:
    """FolderError unless the folder's text encoder is open_clip architecture `clip_name`."""
    from launch.diffusers_folder import FolderError
    from launch.import_diffusers import clip_mismatch

    problems = clip_mismatch(folder, clip_name)
    if problems:
        raise FolderError(
            f"{folder}/text_encoder is not the CLIP the {stage} config names (clip.name {clip_name}): "
            + "; ".join(problems) + " (--set clip.name=... to the folder's CLIP)"
        )


def imported_jobs(folder: Path, configs: Path, overrides: list[str]) -> list[tuple[Any, Any]]:
    """`(job config, ImportedStage)` of each stage, every check done (nothing written)."""
    from launch.config_files import build_job
    from launch.diffusers_folder import read_model_index
    from launch.import_diffusers import COMPONENTS, read_unclip_folder
    from models.config import deep_merge

    raws = stage_bases(configs, overrides)
    read_model_index(folder, "UnCLIPPipeline", COMPONENTS)
    for stage, raw in raws.items():  # the cheap check first, before any weights are read
        if isinstance(raw.get("clip"), dict) and raw["clip"].get("name"):
            check_clip(folder, stage, raw["clip"]["name"])
    stages = read_unclip_folder(folder, {stage: raw.get("model", {}) for stage, raw in raws.items()})
    out = []
    for stage in stages:
        raw = deep_merge(raws[stage.stage], {"model": stage.model})
        if isinstance(raw.get("data"), dict) and "image_size" in stage.model:  # it trains on the folder's size
            raw["data"]["image_size"] = stage.model["image_size"]
        job = build_job(raw, source=f"{configs}/{stage.stage}.yaml")
        if getattr(job, "clip", None) is not None:
            check_clip(folder, stage.stage, job.clip.name)
        out.append((job, stage))
    return out


def header(stage: str, folder: Path, configs: Path, out: Path) -> str:
    return (
        f"# Written by `unclip import --from diffusers {folder}`: the architecture and weights of its\n"
        f"# {stage}, every other setting from {configs}/{stage}.yaml. Fine-tune on your own shards with\n"
        f"#   unclip train --config {out}/{stage}.yaml --init-from {out}/{stage}.safetensors \\\n"
        f"#     --set 'data.sources=[{{shards: ..., embeddings: ...}}]'\n"
    )


def write_weights_dir(out: Path, jobs: list[tuple[Any, Any]], folder: Path, configs: Path) -> list[Path]:
    """`<stage>.safetensors` and `<stage>.yaml` for each stage, into `out` atomically."""
    from launch.config_files import dump_config
    from launch.diffusers_folder import new_folder
    from models.config import config_to_dict
    from models.weights import StageWeights, write_export

    with new_folder(out, f"--out {out}") as tmp:
        for job, stage in jobs:
            weights = StageWeights(stage.stage, 0, config_to_dict(job), stage.state, str(folder))
            write_export(weights, tmp / f"{stage.stage}.safetensors")
            (tmp / f"{stage.stage}.yaml").write_text(header(stage.stage, folder, configs, out) + dump_config(job))
    return sorted(out.iterdir())


def main(args: argparse.Namespace) -> int:
    from launch.diffusers_folder import FolderError
    from models.config import ConfigError

    folder, out, configs = Path(args.folder), Path(args.out), Path(args.configs or KARLO_CONFIGS)
    try:
        jobs = imported_jobs(folder, configs, args.overrides)
        written = write_weights_dir(out, jobs, folder, configs)
    except (FolderError, ConfigError, FileExistsError, ValueError) as err:  # Unmappable is a ValueError
        print(f"unclip import: {err}", file=sys.stderr)
        return EXIT_USAGE
    except OSError as err:
        print(f"unclip import: {err}", file=sys.stderr)
        return EXIT_RUNTIME
    for job, stage in jobs:
        params = sum(v.numel() for v in stage.state.values())
        clip = getattr(job, "clip", None)
        reads = f", reads CLIP {clip.name} ({clip.pretrained}, {clip.embeddings} embeddings)" if clip is not None else ""
        print(f"unclip import: {stage.stage}: {params:,} values in {len(stage.state)} tensors{reads}")
    for path in written:
        print(path)
    return EXIT_OK
