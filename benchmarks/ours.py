"""Our side of each row: `models.prior.DiffusionPrior` and `models.decoder.Decoder` built from a
spec, fed the shared inputs, as the trainer runs them (the stage losses call `.loss`)."""

from __future__ import annotations

from models.decoder import Decoder, DecoderConfig
from models.diffusion import DiffusionConfig
from models.prior import DiffusionPrior, DiffusionPriorConfig
from models.unet import UNetConfig

from benchmarks.runtime import Bench, Runtime
from benchmarks.specs import DecoderSpec, PriorSpec, make_decoder_inputs, make_prior_inputs

IMPL = "ours"


def prior_config(spec: PriorSpec) -> DiffusionPriorConfig:
    return DiffusionPriorConfig(
        embed_dim=spec.dim, text_width=spec.dim, max_text_len=spec.text_len, dim=spec.dim, depth=spec.depth,
        heads=spec.heads, dim_head=spec.dim_head, ff_mult=spec.ff_mult, use_text_encodings=True,
        diffusion=DiffusionConfig(timesteps=1000, schedule="cosine", objective="x0", sampler="ddim",
                                  sample_steps=spec.sample_steps),
    )


def decoder_config(spec: DecoderSpec) -> DecoderConfig:
    return DecoderConfig(
        image_size=spec.image_size, channels=3, image_embed_dim=spec.embed_dim, text_width=spec.text_width,
        max_text_len=spec.text_len, use_text_encodings=True, num_image_tokens=4, context_dim=spec.context_dim,
        unet=UNetConfig(
            base_channels=spec.base_channels, channel_mults=spec.channel_mults, num_res_blocks=spec.num_res_blocks,
            attention_resolutions=spec.attention_resolutions, head_channels=spec.head_channels,
            norm_groups=spec.norm_groups,
        ),
        diffusion=DiffusionConfig(timesteps=1000, schedule="cosine", objective="eps", clip_x0="static",
                                  sampler="ddim", sample_steps=spec.sample_steps),
    )


def build_prior(spec: PriorSpec, runtime: Runtime, sample_steps: int | None = None) -> Bench:
    model = DiffusionPrior(prior_config(spec))
    train = make_prior_inputs(spec, spec.batch, runtime.device)
    cond = make_prior_inputs(spec, spec.sample_batch, runtime.device, seed=1)
    steps = sample_steps or spec.sample_steps

    def loss():
        return model.loss(train.image_embed, train.text_embed, train.text_encodings, train.text_mask)

    def sample():
        # one candidate per caption and no guidance, as the peer's p_sample_loop
        return model.sample(cond.text_embed, cond.text_encodings, cond.text_mask, steps=steps, sampler="ddim",
                            eta=0.0, guidance_scale=1.0, candidates=1)

    return Bench(IMPL, model, loss, sample, runtime)


def build_decoder(spec: DecoderSpec, runtime: Runtime, sample_steps: int | None = None) -> Bench:
    model = Decoder(decoder_config(spec))
    train = make_decoder_inputs(spec, spec.batch, runtime.device)
    cond = make_decoder_inputs(spec, spec.sample_batch, runtime.device, seed=1)
    steps = sample_steps or spec.sample_steps

    def loss():
        return model.loss(train.images, train.image_embed, train.text_encodings, train.text_mask)

    def sample():
        return model.sample(cond.image_embed, cond.text_encodings, cond.text_mask, steps=steps, sampler="ddim",
                            eta=0.0, guidance_scale=spec.guidance_scale)

    return Bench(IMPL, model, loss, sample, runtime)
