"""The decoder: conditioning pathways, CFG dropout and null conditioning, overfitting, sampling."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from models.decoder import Decoder, DecoderConfig, ddim_invert
from models.diffusion import GaussianDiffusion
from models.unet import UNetConfig


UNET = UNetConfig(
    base_channels=16, channel_mults=(1, 2), num_res_blocks=1, attention_resolutions=(4,), head_channels=8, norm_groups=4
)
B, D, W, L = 4, 16, 12, 6


def _cfg(**kw) -> DecoderConfig:
    base = dict(image_size=8, image_embed_dim=D, text_width=W, max_text_len=L, context_dim=16, unet=UNET)
    return DecoderConfig(**{**base, **kw})


def _randomise(model: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=gen) * 0.1)
    return model


def _conds(batch=B, seed=1):
    gen = torch.Generator().manual_seed(seed)
    embed = F.normalize(torch.randn(batch, D, generator=gen), dim=-1)
    text = torch.randn(batch, L, W, generator=gen)
    mask = torch.arange(L)[None, :] < torch.randint(1, L + 1, (batch, 1), generator=gen)
    x = torch.randn(batch, 3, 8, 8, generator=gen)
    t = torch.randint(0, 1000, (batch,), generator=gen)
    return x, t, embed, text, mask


def test_forward_shapes_with_and_without_text():
    model = _randomise(Decoder(_cfg())).eval()
    x, t, embed, text, mask = _conds()
    assert model(x, t, image_embed=embed, text_encodings=text, text_mask=mask).shape == x.shape
    assert model(x, t, image_embed=embed).shape == x.shape
    no_text = _randomise(Decoder(_cfg(use_text_encodings=False))).eval()
    # text is ignored when the decoder does not use it
    torch.testing.assert_close(
        no_text(x, t, image_embed=embed, text_encodings=text, text_mask=mask), no_text(x, t, image_embed=embed)
    )


def test_image_embed_and_text_both_condition():
    model = _randomise(Decoder(_cfg())).eval()
    x, t, embed, text, mask = _conds()
    ref = model(x, t, image_embed=embed, text_encodings=text, text_mask=mask)
    other_embed = F.normalize(torch.randn(B, D), dim=-1)
    assert not torch.allclose(ref, model(x, t, image_embed=other_embed, text_encodings=text, text_mask=mask))
    assert not torch.allclose(ref, model(x, t, image_embed=embed, text_encodings=text + 1, text_mask=mask))
    # padding tokens are ignored
    padded = torch.where(mask[..., None], text, torch.full_like(text, 100.0))
    torch.testing.assert_close(model(x, t, image_embed=embed, text_encodings=padded, text_mask=mask), ref)


def test_null_cond_uses_the_learned_null_conditioning():
    model = _randomise(Decoder(_cfg())).eval()
    x, t, embed, text, mask = _conds()
    null = torch.ones(B, dtype=torch.bool)
    uncond = model(x, t, image_embed=embed, text_encodings=text, text_mask=mask, null_cond=null)
    cond = model(x, t, image_embed=embed, text_encodings=text, text_mask=mask)
    assert (uncond - cond).abs().amax(dim=(1, 2, 3)).min() > 1e-3  # every row changed
    # null rows do not depend on the conditions at all
    other = model(x, t, image_embed=F.normalize(torch.randn(B, D), dim=-1), text_encodings=-text, text_mask=mask, null_cond=null)
    torch.testing.assert_close(other, uncond, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(model(x, t, image_embed=embed, null_cond=null), uncond, atol=1e-5, rtol=1e-5)
    # mixed rows: the False rows are the conditional prediction
    mixed = model(x, t, image_embed=embed, text_encodings=text, text_mask=mask, null_cond=torch.tensor([True, False] * 2))
    torch.testing.assert_close(mixed[1::2], cond[1::2], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(mixed[0::2], uncond[0::2], atol=1e-5, rtol=1e-5)


def test_training_with_certain_dropout_equals_null_cond():
    model = _randomise(Decoder(_cfg(image_embed_drop=1.0, text_drop=1.0)))
    x, t, embed, text, mask = _conds()
    dropped = model.train()(x, t, image_embed=embed, text_encodings=text, text_mask=mask)
    null = model.eval()(x, t, image_embed=embed, text_encodings=text, text_mask=mask, null_cond=torch.ones(B, dtype=torch.bool))
    torch.testing.assert_close(dropped, null)


def test_cfg_dropout_rates():
    model = Decoder(_cfg(image_embed_drop=0.1, text_drop=0.5))
    n = 40_000
    drop = model.draw_cond_drop(n, "cpu", torch.Generator().manual_seed(0))
    image, text = drop["image_embed"].float(), drop["text"].float()
    assert abs(image.mean().item() - 0.1) < 0.01
    assert abs(text.mean().item() - 0.5) < 0.01
    assert abs((image * text).mean().item() - 0.05) < 0.01  # drawn independently
    again = model.draw_cond_drop(n, "cpu", torch.Generator().manual_seed(0))
    assert torch.equal(again["image_embed"], drop["image_embed"])


def test_overfits_a_fixed_batch():
    torch.manual_seed(0)
    model = Decoder(_cfg(image_embed_drop=0.0, text_drop=0.0)).train()
    gen = torch.Generator().manual_seed(0)
    images = torch.rand(8, 3, 8, 8, generator=gen) * 2 - 1
    _, _, embed, text, mask = _conds(batch=8)
    t = torch.randint(0, 1000, (8,), generator=gen)
    noise = torch.randn(8, 3, 8, 8, generator=gen)
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    losses = []
    for _ in range(60):
        loss = model.loss(images, embed, text, mask, t=t, noise=noise)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0] / 10, (losses[0], losses[-1])


def test_loss_is_reproducible_under_a_generator():
    model = _randomise(Decoder(_cfg())).train()
    x, _, embed, text, mask = _conds()
    images = x.clamp(-1, 1)
    a = model.loss(images, embed, text, mask, generator=torch.Generator().manual_seed(5))
    b = model.loss(images, embed, text, mask, generator=torch.Generator().manual_seed(5))
    c = model.loss(images, embed, text, mask, generator=torch.Generator().manual_seed(6))
    assert a.ndim == 0 and torch.equal(a, b) and not torch.equal(a, c)


@pytest.mark.parametrize("guidance", [1.0, 3.0])
def test_sample_is_in_range_reproducible_and_leaves_mode(guidance):
    model = _randomise(Decoder(_cfg())).train()
    _, _, embed, text, mask = _conds()
    kwargs = dict(guidance_scale=guidance, steps=4)
    a = model.sample(embed, text, mask, generator=torch.Generator().manual_seed(0), **kwargs)
    b = model.sample(embed, text, mask, generator=torch.Generator().manual_seed(0), **kwargs)
    c = model.sample(embed, text, mask, generator=torch.Generator().manual_seed(1), **kwargs)
    assert a.shape == (B, 3, 8, 8) and a.min() >= -1 and a.max() <= 1
    assert torch.equal(a, b) and not torch.equal(a, c)
    assert model.training  # restored after sampling
    # fixed x_T: same image whatever the generator (DDIM, eta 0)
    noise = torch.randn(B, 3, 8, 8)
    d = model.sample(embed, text, mask, noise=noise, generator=torch.Generator().manual_seed(0), **kwargs)
    e = model.sample(embed, text, mask, noise=noise, generator=torch.Generator().manual_seed(1), **kwargs)
    assert torch.equal(d, e)


def test_bad_conditions_name_the_problem():
    model = Decoder(_cfg())
    x, t, embed, text, mask = _conds()
    with pytest.raises(ValueError, match="image_embed"):
        model(x, t, image_embed=embed[:, :5])
    with pytest.raises(ValueError, match="max_text_len"):
        model(x, t, image_embed=embed, text_encodings=torch.randn(B, L + 1, W))
    with pytest.raises(ValueError, match="text_width"):
        model(x, t, image_embed=embed, text_encodings=torch.randn(B, L, W + 1))
    with pytest.raises(ValueError, match="images"):
        model.loss(torch.zeros(B, 3, 16, 16), embed)


@pytest.mark.parametrize("schedule", ["cosine", "linear"])
def test_ddim_inversion_round_trips_under_an_exact_denoiser(schedule):
    # data ~ N(0, s2 I): the exact denoiser is E[eps | x_t] = sqrt(1 - a) x_t / (a s2 + 1 - a)
    s2 = 0.25
    diffusion = GaussianDiffusion(1000, schedule, "eps")

    def denoiser(x, t, **_):
        a = diffusion.alphas_cumprod[t].view(-1, 1, 1, 1)
        return (1 - a).sqrt() * x / (a * s2 + 1 - a)

    x0 = torch.randn(3, 3, 8, 8, generator=torch.Generator().manual_seed(0)) * s2**0.5
    errors = []
    for steps in (25, 250):
        x_t = ddim_invert(diffusion, denoiser, x0, steps=steps)
        back = diffusion.sample(denoiser, x0.shape, noise=x_t, steps=steps, sampler="ddim", eta=0.0)
        errors.append((back - x0).abs().max().item())
    assert errors[1] < 0.05 and errors[1] < errors[0] / 4  # first order in the step size
    assert abs(x_t.std().item() - 1.0) < 0.1  # the latent of Gaussian data is unit noise


def test_decoder_invert_shapes_and_determinism():
    model = _randomise(Decoder(_cfg())).train()
    x, _, embed, text, mask = _conds()
    images = x.clamp(-1, 1)
    a = model.invert(images, embed, text, mask, steps=4)
    assert a.shape == images.shape and torch.isfinite(a).all() and model.training
    assert torch.equal(a, model.invert(images, embed, text, mask, steps=4))
    with pytest.raises(ValueError, match="invert"):
        model.invert(torch.zeros(B, 3, 16, 16), embed)
