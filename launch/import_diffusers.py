"""A diffusers `UnCLIPPipeline` folder (Karlo's released layout) -> unclip's prior, decoder and
upsampler: each stage's `model` config (the architecture read from the folder, merged into a
base such as `configs/karlo/<stage>.yaml`'s, which supplies what the folder does not say:
training dropouts, sampling steps and guidance) and its state dict.

The folder's text encoder is read for one thing: the empty caption's CLIP outputs, which
Karlo and diffusers use as the unconditional caption, and which unclip's stages keep as
frozen buffers (`null_text: empty_caption`). It runs as open_clip's text tower (mapped from
the Hugging Face weights), tokenised by open_clip's copy of OpenAI's BPE; the folder's
tokenizer is checked to be that vocabulary.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from launch.diffusers_folder import FolderError, check_clip_tokenizer, read_component, read_json, read_model_index
from models.config import build_config, config_to_dict, deep_merge
from models.decoder import Decoder, DecoderConfig
from models.interop import diffusers_unclip as du
from models.interop.hf_clip_text import build_text_tower
from models.prior import DiffusionPrior, DiffusionPriorConfig
from models.upsampler import Upsampler, UpsamplerConfig

COMPONENTS = (
    "prior", "prior_scheduler", "decoder", "text_proj", "decoder_scheduler",
    "super_res_first", "super_res_last", "super_res_scheduler", "text_encoder", "tokenizer",
)
STAGES = {"prior": (DiffusionPriorConfig, DiffusionPrior), "decoder": (DecoderConfig, Decoder), "upsampler": (UpsamplerConfig, Upsampler)}


@dataclass
class ImportedStage:
    """One stage: `model` (its config section, a plain dict), `config` (validated) and
    `state` (our state dict, every tensor the model has)."""

    stage: str
    model: dict[str, Any]
    config: Any
    state: dict[str, Tensor]

    def build(self, device: str | torch.device = "cpu") -> nn.Module:
        """The stage's model with these weights, in eval mode."""
        model = STAGES[self.stage][1](self.config)
        model.load_state_dict(self.state, strict=True)
        return model.to(device).eval()


def empty_caption(text_config: dict[str, Any], text_state: dict[str, Tensor]) -> tuple[Tensor, Tensor, Tensor]:
    """The folder's text encoder on "": raw `text_embed [D]`, `text_encodings [L, W]` (zero at
    padding) and `text_mask [L]`, L the encoder's context length."""
    import open_clip

    from models.clip import encode_tokens

    tower = build_text_tower(text_config, text_state)
    tokens = open_clip.tokenizer.SimpleTokenizer(context_length=tower.context_length)([""])
    embed, encodings, mask = encode_tokens(None, tower, tokens)
    return embed[0], encodings[0], mask[0]


def _with_null_caption(state: dict[str, Tensor], prefix: str, null: tuple[Tensor, Tensor, Tensor], max_text_len: int) -> dict[str, Tensor]:
    embed, encodings, mask = null
    if mask[max_text_len:].any():
        raise FolderError(f"the empty caption has more real tokens than the stage's max_text_len ({max_text_len})")
    width = encodings.shape[-1]
    enc = torch.zeros(max_text_len, width)
    keep = torch.zeros(max_text_len, dtype=torch.bool)
    n = min(max_text_len, mask.shape[0])
    enc[:n], keep[:n] = encodings[:n], mask[:n]
    return {**state, f"{prefix}text_embed": embed.clone(), f"{prefix}text_encodings": enc, f"{prefix}text_mask": keep}


def _stage(stage: str, model: dict[str, Any], state: dict[str, Tensor], source: str) -> ImportedStage:
    cfg_cls, model_cls = STAGES[stage]
    config = build_config(cfg_cls, model, source=source)
    with torch.device("meta"):  # the full-size model's tensor names and shapes, no memory
        expected = model_cls(config).state_dict()
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    wrong = sorted(k for k in set(expected) & set(state) if tuple(expected[k].shape) != tuple(state[k].shape))
    if missing or unexpected or wrong:
        raise FolderError(f"{source}: weights do not fit the {stage} (missing {missing[:4]}, unexpected {unexpected[:4]}, shapes differ {wrong[:4]})")
    state = {k: v.to(expected[k].dtype) for k, v in state.items()}
    return ImportedStage(stage, config_to_dict(config), config, state)


def read_unclip_folder(folder: str | Path, bases: dict[str, dict[str, Any]] | None = None) -> list[ImportedStage]:
    """The prior, decoder and upsampler of the `UnCLIPPipeline` in `folder`; `bases[stage]`
    (a `model` section) supplies every setting the folder does not carry. Raises
    `FolderError` or `Unmappable` (naming the file and key) before returning anything."""
    folder, bases = Path(folder), bases or {}
    read_model_index(folder, "UnCLIPPipeline", COMPONENTS)
    check_clip_tokenizer(folder)
    text_cfg, text_state = read_component(folder, "text_encoder")
    null = empty_caption(text_cfg, text_state)
    context = int(text_cfg["max_position_embeddings"])

    prior_cfg, prior_state = read_component(folder, "prior")
    prior_sched, _ = read_component(folder, "prior_scheduler", scheduler=True)
    prior_model = deep_merge(bases.get("prior", {}), du.prior_from_diffusers_config(prior_cfg, prior_sched))
    prior_config = build_config(DiffusionPriorConfig, prior_model, source=f"{folder}/prior")
    state = _with_null_caption(du.prior_from_diffusers(prior_state, prior_config), "text.null_caption.", null, prior_config.max_text_len)
    prior = _stage("prior", prior_model, state, f"{folder}/prior")

    unet_cfg, unet_state = read_component(folder, "decoder")
    proj_cfg, proj_state = read_component(folder, "text_proj")
    dec_sched, _ = read_component(folder, "decoder_scheduler", scheduler=True)
    dec_model = deep_merge(bases.get("decoder", {}), du.decoder_from_diffusers_config(unet_cfg, proj_cfg, dec_sched, context))
    dec_config = build_config(DecoderConfig, dec_model, source=f"{folder}/decoder")
    state = _with_null_caption(du.decoder_from_diffusers(unet_state, proj_state, dec_config), "null_caption.", null, dec_config.max_text_len)
    decoder = _stage("decoder", dec_model, state, f"{folder}/decoder")

    first_cfg, first_state = read_component(folder, "super_res_first")
    last_cfg, last_state = read_component(folder, "super_res_last")
    sr_sched, _ = read_component(folder, "super_res_scheduler", scheduler=True)
    up_model = deep_merge(
        bases.get("upsampler", {}), du.upsampler_from_diffusers_config(first_cfg, last_cfg, sr_sched, dec_config.image_size)
    )
    up_config = build_config(UpsamplerConfig, up_model, source=f"{folder}/super_res_first")
    upsampler = _stage("upsampler", up_model, du.upsampler_from_diffusers(first_state, last_state, up_config), f"{folder}/super_res_first")
    return [prior, decoder, upsampler]


def clip_mismatch(folder: str | Path, clip_name: str) -> list[str]:
    """How open_clip architecture `clip_name`'s text tower differs from the folder's
    `text_encoder/` (width, depth, heads, context, vocabulary, embedding size, activation):
    the CLIP the stages' configs name must be the one that embedded their training data."""
    import dataclasses

    from open_clip.model import CLIPTextCfg

    from models.clip import architecture
    from models.interop.hf_clip_text import open_clip_text_cfg

    embed_dim, text_cfg, quick_gelu = open_clip_text_cfg(read_json(Path(folder) / "text_encoder" / "config.json"))
    arch = architecture(clip_name)
    defaults = {f.name: f.default for f in dataclasses.fields(CLIPTextCfg)}
    ours = {k: arch["text_cfg"].get(k, defaults[k]) for k in text_cfg}
    problems = [f"text {k} {v} in the folder, {ours[k]} in {clip_name}" for k, v in text_cfg.items() if float(v) != float(ours[k])]
    if embed_dim != arch["embed_dim"]:
        problems.append(f"embedding size {embed_dim} in the folder, {arch['embed_dim']} in {clip_name}")
    if quick_gelu != bool(arch.get("quick_gelu", False)):
        act = {True: "QuickGELU", False: "GELU"}
        problems.append(f"activation {act[quick_gelu]} in the folder, {act[bool(arch.get('quick_gelu', False))]} in {clip_name}")
    return problems
