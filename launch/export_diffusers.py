"""unclip's prior, decoder and upsampler (and the CLIP they read) -> a folder that
`diffusers.UnCLIPPipeline.from_pretrained` loads and samples from.

Every stage is mapped before anything is written: a stage whose architecture diffusers
cannot express raises `Unmappable` listing each setting that does not map, and the folder is
left untouched. The CLIP's text tower becomes `text_encoder/` (a `CLIPTextModelWithProjection`)
and OpenAI's BPE `tokenizer/`; only CLIPs with open_clip's own text transformer map.

`export_runs` is `unclip export --format diffusers`: the stages from run directories (their
latest checkpoint's EMA) or export files, in any order, like `unclip sample --weights`.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from torch import Tensor

from launch.diffusers_folder import check_empty, new_folder, write_clip_tokenizer, write_component
from models import stages
from models.clip import load_clip_from_config
from models.interop import diffusers_unclip as du
from models.interop.diffusers_unet import Unmappable
from models.interop.hf_clip_text import hf_text_config, to_hf
from models.weights import read_weights

DIFFUSERS_VERSION = "0.42.1"  # the version the export is tested with
MODEL_INDEX = {
    "_class_name": "UnCLIPPipeline",
    "_diffusers_version": DIFFUSERS_VERSION,
    "decoder": ["diffusers", "UNet2DConditionModel"],
    "decoder_scheduler": ["diffusers", "UnCLIPScheduler"],
    "prior": ["diffusers", "PriorTransformer"],
    "prior_scheduler": ["diffusers", "UnCLIPScheduler"],
    "super_res_first": ["diffusers", "UNet2DModel"],
    "super_res_last": ["diffusers", "UNet2DModel"],
    "super_res_scheduler": ["diffusers", "UnCLIPScheduler"],
    "text_encoder": ["transformers", "CLIPTextModelWithProjection"],
    # diffusers >= 0.3x resolves neither ["unclip", ...] (Karlo's folder) nor ["diffusers", ...]
    # (what its own save_pretrained writes) since the class moved under pipelines.deprecated;
    # a module path resolves once the pipeline class is imported, which loading it does.
    "text_proj": ["diffusers.pipelines.deprecated.unclip.text_proj", "UnCLIPTextProjModel"],
    "tokenizer": ["transformers", "CLIPTokenizer"],
}


def clip_text_encoder(clip: Any) -> tuple[dict[str, Any], dict[str, Tensor]]:
    """`(config.json, weights)` of a `CLIPTextModelWithProjection` equal to `clip`'s text
    tower (`clip`: a `models.clip.ClipAdapter`)."""
    import open_clip

    cfg = open_clip.get_model_config(clip.name) or {}
    text_cfg = dict(cfg.get("text_cfg", {}))
    problems = [f"text_cfg.{k}={text_cfg[k]!r}" for k in ("hf_model_name", "embed_cls", "ls_init_value", "no_causal_mask", "proj_bias") if text_cfg.get(k)]
    if text_cfg.get("pool_type", "argmax") != "argmax" or text_cfg.get("proj_type", "linear") != "linear":
        problems.append("text_cfg pooling/projection other than argmax/linear")
    if not text_cfg:
        problems.append(f"open_clip has no config for {clip.name!r}")
    if problems:
        raise Unmappable(f"clip {clip.name}", problems + ["(CLIPTextModelWithProjection is OpenAI's text transformer)"])
    state = {k: v.detach().float().cpu() for k, v in clip.model.state_dict().items() if not k.startswith("visual.")}
    return hf_text_config(int(cfg["embed_dim"]), text_cfg, bool(cfg.get("quick_gelu", False))), to_hf(state)


def _components(prior, decoder, upsampler, clip, known=()) -> dict[str, tuple[dict[str, Any], dict[str, Tensor] | None, str]]:
    """name -> (config, state or None for schedulers, weights file name); raises Unmappable
    with every problem of every stage at once (after the `known` ones; `clip` None: none
    to map, which is one of them)."""
    problems: list[str] = list(known)
    out: dict[str, tuple] = {}

    def attempt(fn, *args):
        try:
            return fn(*args)
        except Unmappable as err:
            problems.extend(f"{err.where}: {p}" for p in err.problems)
            return None

    mapped = attempt(du.prior_to_diffusers, prior[1], prior[0])
    if mapped:
        out["prior"] = (mapped[0], mapped[1], "diffusion_pytorch_model")
    mapped = attempt(du.decoder_to_diffusers, decoder[1], decoder[0])
    if mapped:
        out["decoder"] = (mapped[0], mapped[1], "diffusion_pytorch_model")
        out["text_proj"] = (mapped[2], mapped[3], "diffusion_pytorch_model")
    mapped = attempt(du.upsampler_to_diffusers, upsampler[1], upsampler[0])
    if mapped:
        out["super_res_first"] = (mapped[0], mapped[1], "diffusion_pytorch_model")
        out["super_res_last"] = (mapped[0], mapped[2], "diffusion_pytorch_model")
    for name, cfg in (("prior", prior[0]), ("decoder", decoder[0]), ("super_res", upsampler[0])):
        sched = attempt(du.scheduler_from_diffusion, cfg.diffusion, f"{name} diffusion")
        if sched:
            out[f"{name}_scheduler"] = ({**sched, "_diffusers_version": DIFFUSERS_VERSION}, None, "")
    mapped = attempt(clip_text_encoder, clip) if clip is not None else None
    if mapped:
        out["text_encoder"] = (mapped[0], mapped[1], "model")
    problems += _cross_checks(prior[0], decoder[0], upsampler[0], clip)
    if problems:
        raise Unmappable("export --format diffusers", problems)
    return out


def _cross_checks(prior, decoder, upsampler, clip) -> list[str]:
    """What the pipeline assumes across stages: one embedding size, one text length, the
    upsampler reading the decoder's images."""
    problems = []
    dim = getattr(clip, "embed_dim", prior.embed_dim)
    if not prior.embed_dim == decoder.image_embed_dim == dim:
        problems.append(f"embedding sizes differ: prior {prior.embed_dim}, decoder {decoder.image_embed_dim}, CLIP {dim}")
    context = getattr(clip, "context_length", prior.max_text_len)
    if not prior.max_text_len == decoder.max_text_len == context:
        problems.append(f"text lengths differ: prior {prior.max_text_len}, decoder {decoder.max_text_len}, CLIP {context} (the pipeline pads to the tokenizer's)")
    if upsampler.lowres_size != decoder.image_size:
        problems.append(f"upsampler.lowres_size {upsampler.lowres_size} != decoder.image_size {decoder.image_size}")
    if getattr(clip, "normalize", False):
        problems.append("the CLIP is loaded with unit-norm embeddings; the pipeline feeds the stages raw ones (clip.embeddings: raw)")
    return problems


def write_unclip_folder(out: str | Path, prior: tuple, decoder: tuple, upsampler: tuple, clip: Any, problems=()) -> Path:
    """Write the pipeline folder `out` from `(config, state dict)` pairs of the three stages
    and the CLIP adapter; atomically (a temporary folder renamed into place). `problems`
    already found are reported with the mapping's own."""
    out = Path(out)
    check_empty(out, str(out))
    components = _components(prior, decoder, upsampler, clip, problems)
    with new_folder(out, str(out)) as tmp:
        for name, (config, state, weights_name) in components.items():
            config = dict(config)
            if state is not None and name != "text_encoder":
                config.setdefault("_diffusers_version", DIFFUSERS_VERSION)
            write_component(tmp, name, config, state, weights_name=weights_name or "diffusion_pytorch_model")
        write_clip_tokenizer(tmp, prior[0].max_text_len)
        (tmp / "model_index.json").write_text(json.dumps(MODEL_INDEX, indent=2) + "\n")
    return out


def _read_stages(paths: list[str | Path]) -> dict[str, list[tuple[Any, Any]]]:
    """role -> [(the stage's config sections, its StageWeights)] of every path."""
    found: dict[str, list[tuple[Any, Any]]] = {"clip": [], "prior": [], "decoder": [], "upsampler": []}
    for path in paths:
        weights = read_weights(Path(path))
        spec = stages.get(weights.stage)
        found[spec.role].append((spec.stage_config(weights.config, source=weights.source), weights))
    return found


def _pipeline_problems(found: dict[str, list[tuple[Any, Any]]]) -> list[str]:
    """What keeps these stages from being one UnCLIPPipeline, before any mapping."""
    problems = []
    for role in ("prior", "decoder", "upsampler", "clip"):
        got = found[role]
        if role == "clip" and len(got) <= 1 or role != "clip" and len(got) == 1:
            continue
        sources = ", ".join(w.source for _, w in got) or "none"
        need = "at most one" if role == "clip" else "exactly one"
        extra = " (UnCLIPPipeline has one super-resolution stage)" if role == "upsampler" and len(got) > 1 else ""
        problems.append(f"{role}: need {need}, got {len(got)} ({sources}){extra}")
    for cfg, weights in found["prior"]:
        if cfg.model.kind != "diffusion":
            problems.append(f"{weights.source}: model.kind={cfg.model.kind!r} (PriorTransformer is a diffusion prior)")
    return problems


def _clip(found: dict[str, list[tuple[Any, Any]]]) -> tuple[Any, list[str]]:
    """The CLIP adapter (the clip stage given, else the open_clip model the decoder's config
    names; speaking the decoder's embedding convention), or None and why there is none."""
    decoder_cfg, decoder = found["decoder"][0]
    if found["clip"]:
        cfg, weights = found["clip"][0]
        clip = stages.get("clip").load_for_sampling(cfg, weights.state, where=weights.source)
    elif decoder_cfg.clip.pretrained is None:
        return None, [f"{decoder.source}: clip {decoder_cfg.clip.name} has no weights (clip.pretrained unset): "
                      "pass the clip stage's run or export too"]
    else:
        clip = load_clip_from_config(decoder_cfg.clip)
    clip.normalize = decoder_cfg.clip.embeddings == "unit"
    return clip, []


def export_runs(paths: list[str | Path], out: str | Path) -> Path:
    """`unclip export --format diffusers`: the pipeline folder `out` from the runs or export
    files of a prior, a decoder, an upsampler (and optionally a clip); Unmappable naming every
    problem, with nothing written, when they do not make one UnCLIPPipeline."""
    found = _read_stages(paths)
    problems = _pipeline_problems(found)
    if problems:
        raise Unmappable("export --format diffusers", problems)
    (prior_cfg, prior), (decoder_cfg, decoder), (up_cfg, up) = (found[r][0] for r in ("prior", "decoder", "upsampler"))
    clip, problems = _clip(found)
    stages_ = [(prior_cfg.model, prior.state), (decoder_cfg.model, decoder.state), (up_cfg.model, up.state)]
    return write_unclip_folder(out, *stages_, clip, problems)
