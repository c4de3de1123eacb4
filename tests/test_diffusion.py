"""The Gaussian diffusion core: schedules, identities, posterior, loss, sampling, guidance."""

import math

import pytest
import torch
from torch import nn

from models.diffusion import DiffusionConfig, GaussianDiffusion, cosine_betas, linear_betas


def _t(batch, timesteps=1000, seed=0):
    return torch.randint(0, timesteps, (batch,), generator=torch.Generator().manual_seed(seed))


# ------------------------------------------------------------------ schedules
def test_linear_schedule_endpoints_and_rescaling():
    betas = linear_betas(1000)
    assert betas[0].item() == pytest.approx(1e-4)
    assert betas[-1].item() == pytest.approx(0.02)
    short = linear_betas(250)  # scaled by 1000/250 so the total noise stays comparable
    assert short[0].item() == pytest.approx(4e-4)
    assert short[-1].item() == pytest.approx(0.08)


def test_cosine_schedule_matches_closed_form_and_clips():
    T, s = 1000, 0.008
    betas = cosine_betas(T)
    f = lambda t: math.cos((t / T + s) / (1 + s) * math.pi / 2) ** 2
    assert betas[0].item() == pytest.approx(1 - f(1) / f(0), rel=1e-9)
    assert betas.max().item() == pytest.approx(0.999)  # the last betas are clipped
    ac = torch.cumprod(1 - betas, 0)
    assert ac[499].item() == pytest.approx(f(500) / f(0), rel=1e-6)


@pytest.mark.parametrize("schedule", ["linear", "cosine"])
def test_buffers_are_monotone(schedule):
    d = GaussianDiffusion(1000, schedule)
    assert d.betas.shape == (1000,) and d.alphas_cumprod.shape == (1000,)
    assert torch.all(d.alphas_cumprod[1:] < d.alphas_cumprod[:-1])
    assert 0 < d.alphas_cumprod[-1] < 1e-3


# ------------------------------------------------------------------ identities
@pytest.mark.parametrize("shape", [(16, 32), (4, 3, 8, 8)])
@pytest.mark.parametrize("schedule", ["linear", "cosine"])
def test_parameterisation_identities(shape, schedule):
    d = GaussianDiffusion(1000, schedule)
    g = torch.Generator().manual_seed(0)
    x0 = torch.randn(shape, generator=g, dtype=torch.float64)
    noise = torch.randn(shape, generator=g, dtype=torch.float64)
    t = _t(shape[0])
    x_t = d.q_sample(x0, t, noise)
    torch.testing.assert_close(d.predict_start_from_noise(x_t, t, noise), x0, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(d.predict_noise_from_start(x_t, t, x0), noise, rtol=1e-4, atol=1e-4)
    v = d.calculate_v(x0, t, noise)
    torch.testing.assert_close(d.predict_start_from_v(x_t, t, v), x0, rtol=1e-4, atol=1e-4)


def test_q_sample_has_the_right_marginal():
    d = GaussianDiffusion(1000, "cosine")
    x0 = torch.full((20000, 1), 2.0)
    t = torch.full((20000,), 300, dtype=torch.long)
    x_t = d.q_sample(x0, t)
    a = d.alphas_cumprod[300].item()
    assert x_t.mean().item() == pytest.approx(2.0 * math.sqrt(a), abs=0.03)
    assert x_t.var().item() == pytest.approx(1 - a, rel=0.05)


def test_posterior_matches_closed_form():
    d = GaussianDiffusion(1000, "linear")
    g = torch.Generator().manual_seed(1)
    x0, x_t = torch.randn(8, 5, generator=g), torch.randn(8, 5, generator=g)
    t = torch.tensor([0, 1, 2, 10, 100, 500, 998, 999])
    mean, var, log_var = d.q_posterior(x0, x_t, t)
    betas = linear_betas(1000)
    ac = torch.cumprod(1 - betas, 0)
    for i, step in enumerate(t.tolist()):
        a, b = ac[step].item(), betas[step].item()
        a_prev = ac[step - 1].item() if step > 0 else 1.0
        # Ho et al. 2020, eq. 7
        exp_mean = (math.sqrt(a_prev) * b / (1 - a)) * x0[i] + (math.sqrt(1 - b) * (1 - a_prev) / (1 - a)) * x_t[i]
        exp_var = (1 - a_prev) / (1 - a) * b
        torch.testing.assert_close(mean[i], exp_mean.float(), rtol=1e-4, atol=1e-5)
        assert var[i].item() == pytest.approx(exp_var, rel=1e-4, abs=1e-12)
        if step > 0:
            assert log_var[i].item() == pytest.approx(math.log(exp_var), rel=1e-4)
    assert var.shape == (8, 1) and torch.isfinite(log_var).all()


def test_x_t_dtype_follows_input():
    d = GaussianDiffusion(100)
    x0 = torch.randn(2, 3, dtype=torch.bfloat16)
    assert d.q_sample(x0, torch.tensor([3, 50])).dtype == torch.bfloat16


# ------------------------------------------------------------------ loss
@pytest.mark.parametrize("objective", ["eps", "x0", "v"])
def test_loss_is_zero_for_the_oracle(objective):
    d = GaussianDiffusion(1000, "cosine", objective)
    g = torch.Generator().manual_seed(0)
    x0 = torch.randn(6, 4, generator=g)
    noise = torch.randn(6, 4, generator=g)
    t = _t(6)
    target = {"eps": noise, "x0": x0, "v": d.calculate_v(x0, t, noise)}[objective]
    assert d.loss(lambda x, tt: target, x0, t=t, noise=noise).item() < 1e-10
    assert d.loss(lambda x, tt: target + 1.0, x0, t=t, noise=noise).item() == pytest.approx(1.0, rel=1e-5)


def test_min_snr_weights():
    d = GaussianDiffusion(1000, "cosine", "eps", loss_weighting="min_snr", min_snr_gamma=5.0)
    t = torch.tensor([1, 500, 999])
    snr = d.snr(t)
    w = d.loss_weights(t)
    torch.testing.assert_close(w, torch.minimum(snr, torch.tensor(5.0)) / snr)
    assert w[0] < 1 and w[-1] == pytest.approx(1.0)  # low noise is down-weighted only


def test_loss_passes_condition():
    d = GaussianDiffusion(10, objective="x0")
    seen = {}

    def model_fn(x, t, *, label):
        seen["label"] = label
        return torch.zeros_like(x)

    d.loss(model_fn, torch.ones(3, 2), cond={"label": torch.arange(3)})
    assert torch.equal(seen["label"], torch.arange(3))


# ------------------------------------------------------------------ guidance
def _cond_model():
    net = nn.Linear(3, 2)

    def model_fn(x, t, *, label, null_cond=None):
        label = label.clone().float()
        if null_cond is not None:
            label[null_cond] = 0.0
        return net(torch.cat([x, label[:, None]], dim=1))

    return model_fn


def test_guidance_scale_one_equals_conditional_prediction():
    d = GaussianDiffusion(100)
    model_fn = _cond_model()
    x, t, label = torch.randn(4, 2), torch.tensor([1, 2, 3, 4]), torch.tensor([1, 2, 1, 2])
    cond = model_fn(x, t, label=label, null_cond=torch.zeros(4, dtype=torch.bool))
    uncond = model_fn(x, t, label=label, null_cond=torch.ones(4, dtype=torch.bool))
    torch.testing.assert_close(d.guided_prediction(model_fn, x, t, {"label": label}, 1.0), cond)
    torch.testing.assert_close(d.guided_prediction(model_fn, x, t, {"label": label}, 0.0), uncond)
    torch.testing.assert_close(
        d.guided_prediction(model_fn, x, t, {"label": label}, 3.0), uncond + 3.0 * (cond - uncond)
    )


def test_guidance_batches_both_passes_in_one_forward():
    d = GaussianDiffusion(100)
    calls = []

    def model_fn(x, t, *, label, null_cond=None):
        calls.append(x.shape[0])
        return torch.zeros_like(x)

    d.sample(model_fn, (3, 2), cond={"label": torch.zeros(3)}, steps=5, guidance_scale=4.0)
    assert calls == [6] * 5


# ------------------------------------------------------------------ sampling
def test_respacing():
    d = GaussianDiffusion(1000)
    ts = d.respaced_timesteps(64)
    assert len(ts) == 64 and ts[0] == 999 and ts[-1] == 0
    assert all(a > b for a, b in zip(ts, ts[1:]))
    assert d.respaced_timesteps(1000) == list(range(999, -1, -1))


def test_ddpm_full_chain_step_equals_q_posterior():
    d = GaussianDiffusion(50, "linear")
    g = torch.Generator().manual_seed(0)
    x_t, x0 = torch.randn(4, 3, generator=g), torch.randn(4, 3, generator=g)
    mean, var, _ = d.q_posterior(x0, x_t, torch.full((4,), 20))
    step = d._ddpm_step(x_t, x0, 20, 19, torch.Generator().manual_seed(3))
    noise = torch.randn(x_t.shape, generator=torch.Generator().manual_seed(3))
    torch.testing.assert_close(step, mean + var.sqrt() * noise)
    # a respaced step (20 -> 10) is the posterior of the chain whose beta is 1 - a_20 / a_10
    a, a_prev = d.alphas_cumprod[20].item(), d.alphas_cumprod[10].item()
    beta = 1 - a / a_prev
    exp_mean = (math.sqrt(a_prev) * beta / (1 - a)) * x0 + (math.sqrt(1 - beta) * (1 - a_prev) / (1 - a)) * x_t
    step = d._ddpm_step(x_t, x0, 20, 10, torch.Generator().manual_seed(3))
    torch.testing.assert_close(step, exp_mean + math.sqrt(beta * (1 - a_prev) / (1 - a)) * noise)


def test_dynamic_threshold():
    x0 = torch.tensor([[0.5, -0.5, 0.2, 0.1], [4.0, -2.0, 1.0, 0.0]])
    out = GaussianDiffusion.clip_start(x0, "dynamic", percentile=1.0)
    torch.testing.assert_close(out[0], x0[0])  # within [-1, 1]: untouched
    torch.testing.assert_close(out[1], x0[1] / 4.0)
    assert GaussianDiffusion.clip_start(x0, "static").abs().max() == 1.0


def test_sampling_is_reproducible_with_a_generator():
    d = GaussianDiffusion(100)
    model_fn = lambda x, t: 0.5 * x
    a = d.sample(model_fn, (2, 3), steps=10, sampler="ddpm", generator=torch.Generator().manual_seed(7))
    b = d.sample(model_fn, (2, 3), steps=10, sampler="ddpm", generator=torch.Generator().manual_seed(7))
    torch.testing.assert_close(a, b)


def _toy_data(n, generator):
    """Two Gaussian blobs in 2-D, at (+2, +2) and (-2, -2), std 0.3."""
    centers = torch.tensor([[2.0, 2.0], [-2.0, -2.0]])
    which = torch.randint(0, 2, (n,), generator=generator)
    return centers[which] + 0.3 * torch.randn(n, 2, generator=generator)


class _ToyDenoiser(nn.Module):
    def __init__(self, timesteps):
        super().__init__()
        self.timesteps = timesteps
        self.net = nn.Sequential(nn.Linear(2 + 16, 128), nn.SiLU(), nn.Linear(128, 128), nn.SiLU(), nn.Linear(128, 2))

    def forward(self, x, t):
        freqs = torch.arange(8, dtype=torch.float32)
        angles = (t.float() / self.timesteps)[:, None] * (2.0 ** freqs)[None] * math.pi
        return self.net(torch.cat([x, angles.sin(), angles.cos()], dim=1))


# eps with the cosine schedule is left out on purpose: at its last step a_t ~ 1e-7, so x0 from
# an eps prediction amplifies the model's error ~100x unless x0 is clipped (as images are).
@pytest.mark.parametrize("schedule,objective", [("linear", "eps"), ("cosine", "v"), ("cosine", "x0")])
def test_tiny_denoiser_samples_land_on_the_data(schedule, objective):
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(0)
    d = GaussianDiffusion(200, schedule, objective)
    model = _ToyDenoiser(200)
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    for _ in range(600):
        loss = d.loss(model, _toy_data(256, g), generator=g)
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.eval()
    for sampler, steps in [("ddpm", 200), ("ddim", 50)]:
        samples = d.sample(model, (1000, 2), steps=steps, sampler=sampler, generator=torch.Generator().manual_seed(1))
        # distance to the nearest blob centre: data is at 0.3 * sqrt(2) ~ 0.38 on average
        dist = torch.minimum((samples - 2.0).norm(dim=1), (samples + 2.0).norm(dim=1))
        assert dist.median().item() < 0.6, (sampler, dist.median().item())
        # both modes are represented (no collapse)
        frac_pos = (samples.sum(dim=1) > 0).float().mean().item()
        assert 0.3 < frac_pos < 0.7, (sampler, frac_pos)


def test_config_validates_sample_steps():
    with pytest.raises(ValueError, match="sample_steps"):
        DiffusionConfig(timesteps=10, sample_steps=20)
    d = GaussianDiffusion.from_config(DiffusionConfig(timesteps=10, sample_steps=5, objective="v"))
    assert d.objective == "v" and d.timesteps == 10


def test_schedule_buffers_survive_a_bf16_cast():
    d = GaussianDiffusion(1000).to(torch.bfloat16)
    assert d.sqrt_recipm1_alphas_cumprod.dtype == torch.float32
    torch.testing.assert_close(d.alphas_cumprod, GaussianDiffusion(1000).alphas_cumprod)
