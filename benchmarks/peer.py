"""The reference implementation's side of each row: dalle2-pytorch (lucidrains), when installed.

It lives only in the benchmark's environment (`benchmarks/setup.sh`); without it every peer
column says "not installed". Sizes are matched to a spec as follows (RESULTS.md lists the
differences that remain):

- Prior: `DiffusionPriorNetwork(dim, depth, dim_head, heads, ff_mult, max_text_len=text_len)`
  inside `DiffusionPrior(condition_on_text_encodings=True)` (x0 objective, cosine schedule,
  1000 steps), fed precomputed `text_embed` / `image_embed` / `text_encodings` so no CLIP
  runs. `max_text_len` is set to the spec's text length: by default (256) it pads every
  caption to 256 tokens and the transformer runs over 260 instead of 81.
- Decoder: one `Unet(dim=base_channels, dim_mults, num_resnet_blocks=num_res_blocks,
  resnet_groups=norm_groups, self_attn at the same feature-map sizes, attn_dim_head=
  head_channels, cond_dim=context_dim)` conditioned on the image embedding (added to the time
  embedding and as 4 tokens) and the text encodings, inside `Decoder(learned_variance=False)`
  (eps objective with fixed variances, like ours). Its 7x7-cross-embed stem and 1x1 output
  conv are set to the 3x3 convs ours has.
"""

from __future__ import annotations

import functools
from typing import Any, Optional

from tqdm.auto import tqdm as _tqdm

from benchmarks.runtime import Bench, Runtime
from benchmarks.specs import DecoderSpec, PriorSpec, make_decoder_inputs, make_prior_inputs

IMPL = "dalle2-pytorch"
VERSION_WANTED = "1.15.6"


def load() -> Optional[Any]:
    """The `dalle2_pytorch` module, or None when it is not installed (or does not import)."""
    try:
        import dalle2_pytorch
        from dalle2_pytorch import dalle2_pytorch as core
    except Exception:  # noqa: BLE001 - any import failure means "no peer column"
        return None
    # its sampling loops draw a progress bar per step; ours draw none
    core.tqdm = functools.partial(_tqdm, disable=True)
    return dalle2_pytorch


def version() -> str:
    mod = load()
    return "not installed" if mod is None else getattr(mod, "__version__", "?")


def prior_model(spec: PriorSpec, sample_steps: Optional[int] = None) -> Any:
    """Their `DiffusionPrior` at the spec's sizes (also what `trainer_e2e` hands their trainer)."""
    d2 = load()
    net = d2.DiffusionPriorNetwork(
        dim=spec.dim, depth=spec.depth, dim_head=spec.dim_head, heads=spec.heads, ff_mult=spec.ff_mult,
        max_text_len=spec.text_len,
    )
    return d2.DiffusionPrior(
        net, image_embed_dim=spec.dim, timesteps=1000, sample_timesteps=sample_steps or spec.sample_steps,
        text_cond_drop_prob=0.5, image_cond_drop_prob=0.1, condition_on_text_encodings=True,
    )


def build_prior(spec: PriorSpec, runtime: Runtime, sample_steps: Optional[int] = None) -> Bench:
    model = prior_model(spec, sample_steps)
    train = make_prior_inputs(spec, spec.batch, runtime.device)
    cond = make_prior_inputs(spec, spec.sample_batch, runtime.device, seed=1)
    steps = sample_steps or spec.sample_steps

    def loss():
        # DiffusionPrior.forward scales image_embed in place: hand it a copy every step
        return model(text_embed=train.text_embed, image_embed=train.image_embed.clone(),
                     text_encodings=train.text_encodings)

    def sample():
        model.eval()
        try:
            text_cond = {"text_embed": cond.text_embed, "text_encodings": cond.text_encodings}
            return model.p_sample_loop((spec.sample_batch, spec.dim), text_cond=text_cond, timesteps=steps, eta=0.0)
        finally:
            model.train()

    return Bench(IMPL, model, loss, sample, runtime)


def _self_attn_stages(spec: DecoderSpec) -> tuple[bool, ...]:
    sizes = [spec.image_size // 2**level for level in range(len(spec.channel_mults))]
    return tuple(size in spec.attention_resolutions for size in sizes)


def attn_heads(spec: DecoderSpec) -> int:
    """Their self-attention has a fixed head count at every level (ours: channels / head
    channels); match the heads ours uses at its largest (costliest) attention resolution."""
    levels = [i for i, on in enumerate(_self_attn_stages(spec)) if on]
    if not levels:
        return 1
    return max(1, spec.base_channels * spec.channel_mults[levels[0]] // spec.head_channels)


def decoder_model(spec: DecoderSpec, sample_steps: Optional[int] = None) -> Any:
    """Their one-Unet `Decoder` at the spec's sizes (also what `trainer_e2e` hands their trainer)."""
    d2 = load()
    unet = d2.Unet(
        dim=spec.base_channels, image_embed_dim=spec.embed_dim, text_embed_dim=spec.text_width,
        cond_dim=spec.context_dim, num_image_tokens=4, channels=3, dim_mults=spec.channel_mults,
        num_resnet_blocks=spec.num_res_blocks, resnet_groups=spec.norm_groups,
        self_attn=_self_attn_stages(spec), attn_dim_head=spec.head_channels, attn_heads=attn_heads(spec),
        cond_on_text_encodings=True, max_text_len=spec.text_len,
        init_cross_embed=False, init_conv_kernel_size=3, final_conv_kernel_size=3,
    )
    return d2.Decoder(
        unet, image_size=spec.image_size, channels=3, timesteps=1000,
        sample_timesteps=sample_steps or spec.sample_steps, image_cond_drop_prob=0.1, text_cond_drop_prob=0.5,
        learned_variance=False,
    )


def build_decoder(spec: DecoderSpec, runtime: Runtime, sample_steps: Optional[int] = None) -> Bench:
    model = decoder_model(spec, sample_steps)
    train = make_decoder_inputs(spec, spec.batch, runtime.device)
    cond = make_decoder_inputs(spec, spec.sample_batch, runtime.device, seed=1)
    images01 = (train.images + 1) / 2  # it normalises [0, 1] images to [-1, 1] itself

    def loss():
        return model(images01, image_embed=train.image_embed, text_encodings=train.text_encodings)

    def sample():
        return model.sample(image_embed=cond.image_embed, text_encodings=cond.text_encodings,
                            cond_scale=spec.guidance_scale)

    return Bench(IMPL, model, loss, sample, runtime)
