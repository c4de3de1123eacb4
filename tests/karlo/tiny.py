"""diffusers' unCLIP at tiny sizes with random weights, shared by the Karlo tests: the
pipeline itself (`tiny_pipeline`), unclip's CLIP adapter with its text encoder (`clip_of`), its
text outputs and its images for a seed (`sample_theirs`)."""

from __future__ import annotations

import copy
import math
from pathlib import Path

import torch
from diffusers import PriorTransformer, UnCLIPScheduler, UNet2DConditionModel, UNet2DModel
from diffusers.pipelines.deprecated.unclip import UnCLIPPipeline, UnCLIPTextProjModel
from transformers import CLIPTextConfig, CLIPTextModelWithProjection, CLIPTokenizer

from launch.diffusers_folder import read_component
from models.clip import load_clip
from models.interop.hf_clip_text import from_hf

DIM = 64  # unclip-tiny-77's CLIP: 64-d embeddings, text width 64, 77 tokens
CLIP_NAME = "unclip-tiny-77"
PROMPTS = ["", "a red cube on the left", "a small blue ball next to a big green pyramid, at night"]


def randomize(module: torch.nn.Module, seed: int) -> None:
    """Random weights everywhere (diffusers zero-initialises several tensors), O(1) signals."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in module.named_parameters():
            if p.ndim >= 2:
                p.copy_(torch.randn(p.shape, generator=g) / math.sqrt(p[0].numel()))
            elif "norm" in name and name.endswith("weight"):
                p.copy_(1 + 0.1 * torch.randn(p.shape, generator=g))
            else:
                p.copy_(0.1 * torch.randn(p.shape, generator=g))
        if isinstance(module, PriorTransformer):
            module.positional_embedding.mul_(0.1)
            module.clip_std.copy_(0.5 + torch.rand(module.clip_std.shape, generator=g))


def tiny_pipeline(tokenizer_dir: Path) -> UnCLIPPipeline:
    prior = PriorTransformer(num_attention_heads=2, attention_head_dim=16, num_layers=2, embedding_dim=DIM, num_embeddings=77, additional_embeddings=4)
    decoder = UNet2DConditionModel(
        sample_size=8, layers_per_block=2, block_out_channels=(8, 16, 24), in_channels=3, out_channels=6,
        down_block_types=("ResnetDownsampleBlock2D", "SimpleCrossAttnDownBlock2D", "SimpleCrossAttnDownBlock2D"),
        up_block_types=("SimpleCrossAttnUpBlock2D", "SimpleCrossAttnUpBlock2D", "ResnetUpsampleBlock2D"),
        mid_block_type="UNetMidBlock2DSimpleCrossAttn", cross_attention_dim=12, class_embed_type="identity",
        attention_head_dim=8, resnet_time_scale_shift="scale_shift", norm_num_groups=4,
    )
    text_proj = UnCLIPTextProjModel(clip_extra_context_tokens=4, clip_embeddings_dim=DIM, time_embed_dim=32, cross_attention_dim=12)
    super_res = dict(
        sample_size=16, layers_per_block=1, block_out_channels=(8, 16), in_channels=6, out_channels=3, add_attention=False,
        down_block_types=("ResnetDownsampleBlock2D",) * 2, up_block_types=("ResnetUpsampleBlock2D",) * 2, norm_num_groups=4,
    )
    first, last = UNet2DModel(**super_res), UNet2DModel(**super_res)
    text_encoder = CLIPTextModelWithProjection(
        CLIPTextConfig(
            vocab_size=49408, hidden_size=DIM, intermediate_size=2 * DIM, projection_dim=DIM, num_hidden_layers=2,
            num_attention_heads=2, max_position_embeddings=77, hidden_act="gelu", bos_token_id=49406, eos_token_id=49407, pad_token_id=49407,
        )
    )
    for seed, module in enumerate((prior, decoder, text_proj, first, last, text_encoder)):
        randomize(module, seed)
        module.eval()  # as from_pretrained leaves them (in train mode attention takes another kernel)
    return UnCLIPPipeline(
        prior=prior, decoder=decoder, text_encoder=text_encoder, tokenizer=CLIPTokenizer.from_pretrained(tokenizer_dir / "tokenizer"),
        text_proj=text_proj, super_res_first=first, super_res_last=last,
        prior_scheduler=UnCLIPScheduler(variance_type="fixed_small_log", prediction_type="sample", clip_sample_range=5.0),
        decoder_scheduler=UnCLIPScheduler(variance_type="learned_range", prediction_type="epsilon"),
        super_res_scheduler=UnCLIPScheduler(variance_type="fixed_small_log", prediction_type="epsilon"),
    )


def clip_of(folder: Path):
    """unclip's CLIP adapter (open_clip, raw embeddings) with the folder's text encoder."""
    config, state = read_component(folder, "text_encoder")
    clip = load_clip(CLIP_NAME, normalize=False)
    missing, unexpected = clip.model.load_state_dict(from_hf(state), strict=False)
    assert not unexpected and all(k.startswith("visual.") or k == "logit_scale" for k in missing)
    return clip


def text(theirs: UnCLIPPipeline, prompts: list[str]):
    tokens = theirs.tokenizer(prompts, padding="max_length", max_length=77, truncation=True, return_tensors="pt")
    with torch.no_grad():
        out = theirs.text_encoder(tokens.input_ids)
    return out.text_embeds, out.last_hidden_state, tokens.attention_mask.bool()


def sample_theirs(pipe: UnCLIPPipeline, seed: int, *, steps: int = 5, super_res_steps: int = 3) -> torch.Tensor:
    """diffusers' images `[2, 3, 16, 16]` in [0, 1] for PROMPTS[1:] (Karlo's guidance: 4, 8)."""
    out = pipe(
        PROMPTS[1:], prior_num_inference_steps=steps, decoder_num_inference_steps=steps,
        super_res_num_inference_steps=super_res_steps, prior_guidance_scale=4.0, decoder_guidance_scale=8.0,
        generator=torch.Generator().manual_seed(seed), output_type="np",
    ).images
    return torch.from_numpy(out).permute(0, 3, 1, 2)


def without_final_x0_factor(pipe: UnCLIPPipeline) -> UnCLIPPipeline:
    """`pipe` (same modules) with the one difference unclip keeps (docs/karlo.md) taken out of
    copies of its schedulers: at t = 0 UnCLIPScheduler multiplies x0 by
    betas[0] / (1 - alphas_cumprod[0]), 1 in exact arithmetic, 0.99947 in its float32 table.
    Setting betas[0] to 1 - alphas_cumprod[0] makes that factor exactly 1 and changes nothing
    else (betas[0] is read at t = 0 only, where no noise is added). Random tiny networks can
    amplify the factor's 5e-4 into image differences of 0.2 (seed 3); without it the chains
    agree to 1e-4 for every seed."""
    schedulers = {}
    for name in ("prior_scheduler", "decoder_scheduler", "super_res_scheduler"):
        scheduler = copy.deepcopy(getattr(pipe, name))
        scheduler.betas[0] = 1 - scheduler.alphas_cumprod[0]
        schedulers[name] = scheduler
    return UnCLIPPipeline(**{**pipe.components, **schedulers})
