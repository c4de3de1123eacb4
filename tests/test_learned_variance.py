"""Learned variance (improved DDPM): the likelihood terms against their closed forms, the
hybrid loss and its stop-gradient, and DDPM/DDIM over respaced steps with a learned `v`."""

from __future__ import annotations

import math

import pytest
import torch
from torch.distributions import Normal, kl_divergence

from models.decoder import Decoder, DecoderConfig, Upsampler, UpsamplerConfig
from models.diffusion import DiffusionConfig, GaussianDiffusion
from models.likelihood import discretized_gaussian_log_likelihood, normal_kl
from models.unet import UNetConfig

TINY_UNET = UNetConfig(base_channels=8, channel_mults=(1, 2), num_res_blocks=1, attention_resolutions=(4,), head_channels=8, norm_groups=4)


# ------------------------------------------------------------------ closed forms
def test_normal_kl_matches_torch_distributions():
    g = torch.Generator().manual_seed(0)
    m1, m2 = torch.randn(50, generator=g, dtype=torch.float64), torch.randn(50, generator=g, dtype=torch.float64)
    lv1, lv2 = torch.randn(50, generator=g, dtype=torch.float64), torch.randn(50, generator=g, dtype=torch.float64)
    expected = kl_divergence(Normal(m1, (0.5 * lv1).exp()), Normal(m2, (0.5 * lv2).exp()))
    torch.testing.assert_close(normal_kl(m1, lv1, m2, lv2), expected)
    assert normal_kl(m1, lv1, m1, lv1).abs().max() < 1e-12  # KL(p || p) = 0


def test_discretized_likelihood_is_the_bin_integral_and_sums_to_one():
    levels = torch.linspace(-1, 1, 256, dtype=torch.float64)
    for mean, log_scale in [(0.0, -1.0), (0.3, -4.0), (-0.97, -2.5), (0.999, -6.0), (2.0, 0.5)]:
        means = torch.full_like(levels, mean)
        log_scales = torch.full_like(levels, log_scale)
        logp = discretized_gaussian_log_likelihood(levels, means, log_scales)
        assert logp.exp().sum().item() == pytest.approx(1.0, abs=1e-9)
        normal = Normal(torch.tensor(mean, dtype=torch.float64), torch.tensor(math.exp(log_scale), dtype=torch.float64))
        half = 1 / 255
        inner = normal.cdf(levels[1:-1] + half) - normal.cdf(levels[1:-1] - half)
        expected = torch.cat([normal.cdf(levels[:1] + half), inner, 1 - normal.cdf(levels[-1:] - half)])
        keep = expected > 1e-10  # the bins whose mass float64 CDF differences still resolve
        torch.testing.assert_close(logp[keep], expected[keep].log(), rtol=1e-6, atol=1e-8)


def test_discretized_likelihood_is_finite_and_exact_far_in_the_tails():
    # 40 standard deviations from the mean: the CDF difference underflows, the mirrored
    # tail does not; the edge bins use log_ndtr directly.
    x = torch.tensor([0.2, -1.0, 1.0], dtype=torch.float64)
    means = torch.tensor([-0.2, 0.6, -0.6], dtype=torch.float64)
    log_scales = torch.full_like(x, math.log(0.01))
    logp = discretized_gaussian_log_likelihood(x, means, log_scales)
    assert torch.isfinite(logp).all()
    # edge bins: log P(Z < (x - mean + half) / s) and log P(Z > (x - mean - half) / s)
    s, half = 0.01, 1 / 255
    assert logp[1].item() == pytest.approx(torch.special.log_ndtr(torch.tensor((-1.6 + half) / s, dtype=torch.float64)).item(), rel=1e-9)
    assert logp[2].item() == pytest.approx(torch.special.log_ndtr(torch.tensor(-(1.6 - half) / s, dtype=torch.float64)).item(), rel=1e-9)


# ------------------------------------------------------------------ learned variance on the full chain
def test_v_interpolates_between_posterior_and_beta():
    d = GaussianDiffusion(100, "cosine", learn_sigma=True)
    t = torch.tensor([0, 1, 50, 99])
    like = torch.zeros(4, 3, 2, 2)
    low = d.model_log_variance(like - 1, t)
    high = d.model_log_variance(like + 1, t)
    mid = d.model_log_variance(like, t)
    torch.testing.assert_close(low[:, 0, 0, 0], d.posterior_log_variance_clipped[t])
    torch.testing.assert_close(high[:, 0, 0, 0], d.betas[t].log())
    torch.testing.assert_close(mid, (low + high) / 2)


def test_vlb_is_zero_for_the_true_posterior_and_the_decoder_nll_at_t0():
    d = GaussianDiffusion(100, "cosine", objective="eps", learn_sigma=True)
    g = torch.Generator().manual_seed(1)
    x0 = torch.randint(0, 256, (4, 3, 4, 4), generator=g).float() / 127.5 - 1
    noise = torch.randn(x0.shape, generator=g)
    t = torch.tensor([5, 40, 99, 0])
    x_t = d.q_sample(x0, t, noise)
    v = -torch.ones_like(x0)  # the posterior's (clipped) variance
    bits = d.vlb_terms(x0, x_t, t, noise, v)  # eps = the true noise: the model mean is the posterior mean
    assert bits[:3].abs().max() < 1e-4
    mean, _, log_var = d.q_posterior(x0, x_t, t)
    nll = -discretized_gaussian_log_likelihood(x0[3:], mean[3:], 0.5 * log_var[3:].expand_as(x0[3:]))
    assert bits[3].item() == pytest.approx(nll.mean().item() / math.log(2), rel=1e-5)


def test_hybrid_loss_value_and_stop_gradient():
    d = GaussianDiffusion(100, "cosine", objective="eps", learn_sigma=True, vlb_weight=0.001)
    g = torch.Generator().manual_seed(2)
    x0 = torch.rand(3, 2, 4, 4, generator=g) * 2 - 1
    noise = torch.randn(x0.shape, generator=g)
    t = torch.tensor([0, 30, 77])
    out = torch.randn(3, 4, 4, 4, generator=g, requires_grad=True)
    loss = d.loss(lambda x_t, t_: out, x0, t=t, noise=noise)
    prediction, v = out.detach().chunk(2, dim=1)
    mse = (prediction - noise).pow(2).flatten(1).mean(1)
    vlb = d.vlb_terms(x0, d.q_sample(x0, t, noise), t, prediction, v)
    assert loss.item() == pytest.approx((mse + 0.001 * 100 * vlb).mean().item(), rel=1e-6)
    loss.backward()
    # the mean's gradient is the MSE's alone; the variance's comes from the VLB term
    mse_grad = 2 * (prediction - noise) / prediction[0].numel() / 3
    torch.testing.assert_close(out.grad[:, :2], mse_grad)
    assert out.grad[:, 2:].abs().sum() > 0


def test_vlb_training_learns_the_posterior_variance_of_a_perfect_mean():
    # Data concentrated on one point: with the true x0 as the mean the reverse step's best
    # variance is exactly the posterior's, i.e. v -> -1 wherever the two bounds differ.
    d = GaussianDiffusion(20, "cosine", objective="x0", learn_sigma=True, vlb_weight=1.0)
    x0 = torch.full((32, 1, 2, 2), 0.25)
    v = torch.zeros(20, requires_grad=True)
    opt = torch.optim.Adam([v], lr=0.1)
    g = torch.Generator().manual_seed(0)
    for _ in range(80):
        t = torch.randint(1, 20, (32,), generator=g)

        def model(x_t, t_):
            return torch.cat([x0, v[t_].reshape(-1, 1, 1, 1).expand_as(x0)], dim=1)

        opt.zero_grad()
        d.loss(model, x0, t=t, generator=g).backward()
        opt.step()
    gap = d.log_betas - d.posterior_log_variance_clipped
    learnable = (gap > 0.05) & (torch.arange(20) > 0)
    assert learnable.sum() >= 10
    assert v.detach()[learnable].max() < -0.8


# ------------------------------------------------------------------ respaced steps
def test_respaced_variances_on_the_full_chain_are_the_schedules():
    d = GaussianDiffusion(50, "cosine")
    like = torch.zeros(1, dtype=torch.float64)
    for t in (1, 10, 49):
        beta, post = d.respaced_step_variances(t, t - 1, like)
        # a_t / a_(t-1) of the float32 table: 1 - that ratio is beta_t to float32 precision
        assert beta.item() == pytest.approx(d.betas[t].item(), rel=1e-4)
        assert post.item() == pytest.approx(d.posterior_variance[t].item(), rel=1e-4)


def test_respaced_betas_rebuild_the_cumulative_products():
    # improved-diffusion's SpacedDiffusion: prod_(i <= k) (1 - beta'_i) = alphas_cumprod[t_k]
    d = GaussianDiffusion(1000, "cosine")
    steps = sorted(d.respaced_timesteps(25))
    like = torch.zeros(1, dtype=torch.float64)
    product, prev = 1.0, -1
    for step in steps:
        a, a_prev = d._alpha_cumprod_at(step, like), d._alpha_cumprod_at(prev, like)
        beta = 1 - a / a_prev if prev >= 0 else 1 - a
        if prev >= 0:
            b, post = d.respaced_step_variances(step, prev, like)
            assert b.item() == pytest.approx(beta.item())
            # the posterior variance of the respaced chain never exceeds its beta
            assert 0 < post.item() <= b.item()
        product *= 1 - beta.item()
        assert product == pytest.approx(d.alphas_cumprod[step].item(), rel=1e-9)
        prev = step


def _model_with_v(v_value: float, channels: int = 2):
    def model_fn(x_t, t, **_):
        prediction = torch.tanh(x_t) * 0.3 + (t.float() / 1000).reshape(-1, 1, 1, 1)
        return torch.cat([prediction, torch.full_like(x_t, v_value)], dim=1)

    return model_fn


def test_ddpm_with_v_minus_one_is_the_fixed_small_variance_sampler():
    learned = GaussianDiffusion(100, "cosine", learn_sigma=True)
    fixed = GaussianDiffusion(100, "cosine")
    noise = torch.randn(2, 2, 4, 4, generator=torch.Generator().manual_seed(0))
    a = learned.sample(_model_with_v(-1.0), noise.shape, steps=10, sampler="ddpm", noise=noise, generator=torch.Generator().manual_seed(5))
    b = fixed.sample(lambda x, t: _model_with_v(0.0)(x, t)[:, :2], noise.shape, steps=10, sampler="ddpm", noise=noise, generator=torch.Generator().manual_seed(5))
    torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


def test_ddpm_step_with_learned_v_uses_the_respaced_beta_interpolation():
    d = GaussianDiffusion(100, "cosine", learn_sigma=True)
    x, x0 = torch.randn(2, 3, 2, 2), torch.rand(2, 3, 2, 2) * 2 - 1
    v = torch.rand(2, 3, 2, 2) * 2 - 1
    beta, post = d.respaced_step_variances(60, 40, x)
    a, a_prev = d.alphas_cumprod[60], d.alphas_cumprod[40]
    mean = (a_prev.sqrt() * beta / (1 - a)) * x0 + ((1 - beta).sqrt() * (1 - a_prev) / (1 - a)) * x
    frac = (v + 1) / 2
    std = torch.exp(0.5 * (frac * beta.log() + (1 - frac) * post.log()))
    step = d._ddpm_step(x, x0, 60, 40, torch.Generator().manual_seed(9), v)
    noise = torch.randn(x.shape, generator=torch.Generator().manual_seed(9))
    torch.testing.assert_close(step, mean + std * noise)


def test_ddim_ignores_the_learned_variance():
    learned = GaussianDiffusion(100, "cosine", learn_sigma=True)
    noise = torch.randn(2, 2, 4, 4, generator=torch.Generator().manual_seed(0))
    a = learned.sample(_model_with_v(0.7), noise.shape, steps=8, sampler="ddim", noise=noise)
    b = learned.sample(_model_with_v(-0.4), noise.shape, steps=8, sampler="ddim", noise=noise)
    torch.testing.assert_close(a, b)


def test_guidance_guides_the_prediction_and_keeps_the_conditional_variance():
    d = GaussianDiffusion(100, learn_sigma=True)

    def model_fn(x_t, t, null_cond=None):
        pred = torch.where(null_cond[:, None, None, None], torch.zeros_like(x_t), torch.ones_like(x_t))
        var = torch.where(null_cond[:, None, None, None], -torch.ones_like(x_t), 0.5 * torch.ones_like(x_t))
        return torch.cat([pred, var], dim=1)

    out = d.guided_prediction(model_fn, torch.zeros(2, 3, 2, 2), torch.tensor([5, 5]), guidance_scale=3.0)
    assert torch.equal(out[:, :3], torch.full((2, 3, 2, 2), 3.0))
    assert torch.equal(out[:, 3:], torch.full((2, 3, 2, 2), 0.5))


# ------------------------------------------------------------------ the stages
def test_decoder_and_upsampler_with_learned_sigma_train_and_sample():
    diffusion = DiffusionConfig(timesteps=50, learn_sigma=True, sampler="ddpm", sample_steps=4, clip_x0="static")
    decoder = Decoder(DecoderConfig(image_size=8, image_embed_dim=8, text_width=8, context_dim=8, max_text_len=4, unet=TINY_UNET, diffusion=diffusion))
    assert decoder.unet.conv_out.out_channels == 6
    images = torch.rand(2, 3, 8, 8) * 2 - 1
    embed = torch.nn.functional.normalize(torch.randn(2, 8), dim=-1)
    loss = decoder.loss(images, embed, torch.randn(2, 4, 8), torch.ones(2, 4, dtype=torch.bool))
    loss.backward()
    assert torch.isfinite(loss) and decoder.unet.conv_out.weight.grad.abs().sum() > 0
    assert decoder.sample(embed, guidance_scale=2.0).shape == (2, 3, 8, 8)
    up = Upsampler(UpsamplerConfig(lowres_size=4, image_size=8, unet=TINY_UNET, diffusion=diffusion))
    assert up.unet.conv_out.out_channels == 6
    up.loss(images).backward()
    assert up.sample(images[:, :, ::2, ::2]).shape == (2, 3, 8, 8)
