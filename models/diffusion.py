"""Gaussian diffusion: noise schedules, the forward process, the parameterisation identities,
the training loss and DDPM/DDIM sampling with classifier-free guidance.

One implementation serves the prior (tensors `[batch, dim]`), the decoder and the upsamplers
(tensors `[batch, channels, height, width]`): every helper takes tensors of any rank whose first
dimension is the batch, and `t`, a LongTensor `[batch]` of timesteps in `[0, timesteps)`.

Notation: `x_t = sqrt(a_t) * x_0 + sqrt(1 - a_t) * eps`, with `a_t = alphas_cumprod[t]`.

The denoiser protocol: `model_fn(x_t, t, **cond) -> prediction` with the prediction's meaning
set by `objective` (`eps`: the noise, `x0`: the clean input, `v`: `sqrt(a) eps - sqrt(1-a) x0`).
For classifier-free guidance `model_fn` also accepts `null_cond`, a BoolTensor `[batch]`: rows
where it is True must be predicted with the model's learned "no condition" inputs.

Learned variance (`learn_sigma`, Nichol & Dhariwal 2021, "Improved DDPM", sec. 3.1): the model
outputs twice the channels, `[prediction, v]` along dim 1, with `v` in [-1, 1] interpolating
the reverse step's log variance between the posterior's (`frac = 0`) and `beta_t`'s
(`frac = 1`), `frac = (v + 1) / 2`. It trains with the hybrid loss `L_simple + lambda L_vlb`,
the VLB term seeing the mean through a stop-gradient so that only `v` learns from it. DDPM
sampling uses the learned variance over respaced steps (interpolating the respaced chain's own
beta and posterior variance, as improved-diffusion's `SpacedDiffusion` does); DDIM ignores it.
"""

from __future__ import annotations

import math
from typing import Any, Callable, Literal, Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from models.layers import FullPrecisionBuffers
from models.likelihood import discretized_gaussian_log_likelihood, normal_kl
from models.config import (
    NonNegativeFloat,
    PositiveFloat,
    PositiveInt,
    Probability,
    config_dataclass,
)

Schedule = Literal["cosine", "linear"]
Objective = Literal["eps", "x0", "v"]
ModelFn = Callable[..., Tensor]


@config_dataclass
class DiffusionConfig:
    """Diffusion process of one stage; sampling fields are defaults that callers may override."""

    timesteps: PositiveInt = 1000
    schedule: Schedule = "cosine"
    objective: Objective = "eps"
    loss_weighting: Literal["none", "min_snr"] = "none"
    min_snr_gamma: PositiveFloat = 5.0
    sampler: Literal["ddim", "ddpm"] = "ddim"
    sample_steps: PositiveInt = 64
    eta: NonNegativeFloat = 0.0
    guidance_scale: NonNegativeFloat = 1.0
    clip_x0: Literal["none", "static", "dynamic"] = "none"
    # `static` clamps x0 to [-clip_range, clip_range] (Karlo's prior: 5, in its standardised space)
    clip_range: PositiveFloat = 1.0
    dynamic_threshold_percentile: Probability = 0.995
    # Improved DDPM's learned variance: the model outputs [prediction, v] (2x the channels)
    # and trains with L_simple + vlb_weight * L_vlb (the paper's lambda = 0.001).
    learn_sigma: bool = False
    vlb_weight: NonNegativeFloat = 0.001

    def __post_init__(self) -> None:
        if self.sample_steps > self.timesteps:
            raise ValueError(
                f"sample_steps ({self.sample_steps}) must be <= timesteps ({self.timesteps})"
            )


def linear_betas(timesteps: int) -> Tensor:
    """Ho et al. 2020: 1e-4 .. 0.02 over 1000 steps, scaled by 1000/timesteps for other lengths."""
    scale = 1000 / timesteps
    return torch.linspace(scale * 1e-4, scale * 0.02, timesteps, dtype=torch.float64)


def cosine_betas(timesteps: int, s: float = 0.008) -> Tensor:
    """Nichol & Dhariwal 2021: alphas_cumprod follows cos^2, betas clipped at 0.999."""
    x = torch.linspace(0, timesteps, timesteps + 1, dtype=torch.float64)
    alphas_cumprod = torch.cos(((x / timesteps) + s) / (1 + s) * math.pi * 0.5) ** 2
    alphas_cumprod = alphas_cumprod / alphas_cumprod[0]
    betas = 1 - (alphas_cumprod[1:] / alphas_cumprod[:-1])
    return betas.clamp(0, 0.999)


def _extract(buffer: Tensor, t: Tensor, like: Tensor) -> Tensor:
    """`buffer[t]` shaped `[batch, 1, ..., 1]` to broadcast against `like`."""
    out = buffer.gather(0, t.to(buffer.device).long())
    dtype = torch.float64 if like.dtype == torch.float64 else torch.float32
    return out.to(device=like.device, dtype=dtype).reshape(-1, *([1] * (like.ndim - 1)))


class GaussianDiffusion(FullPrecisionBuffers):
    """The diffusion process shared by every stage; holds only schedule buffers (no weights).

    The buffers stay float32 when the owning model is cast to bf16/fp16 for mixed precision:
    in bf16, `sqrt_recipm1_alphas_cumprod` would keep ~3 significant digits.
    """

    def __init__(
        self,
        timesteps: int = 1000,
        schedule: Schedule = "cosine",
        objective: Objective = "eps",
        loss_weighting: Literal["none", "min_snr"] = "none",
        min_snr_gamma: float = 5.0,
        learn_sigma: bool = False,
        vlb_weight: float = 0.001,
    ) -> None:
        super().__init__()
        if schedule not in ("cosine", "linear"):
            raise ValueError(f"schedule must be 'cosine' or 'linear', got {schedule!r}")
        if objective not in ("eps", "x0", "v"):
            raise ValueError(f"objective must be 'eps', 'x0' or 'v', got {objective!r}")
        if loss_weighting not in ("none", "min_snr"):
            raise ValueError(f"loss_weighting must be 'none' or 'min_snr', got {loss_weighting!r}")
        self.timesteps = int(timesteps)
        self.schedule = schedule
        self.objective = objective
        self.loss_weighting = loss_weighting
        self.min_snr_gamma = float(min_snr_gamma)
        self.learn_sigma = bool(learn_sigma)
        self.vlb_weight = float(vlb_weight)

        # Everything is derived in float64 and stored in float32: the products of
        # 1000 factors lose digits in float32, the stored values do not need them.
        betas = linear_betas(timesteps) if schedule == "linear" else cosine_betas(timesteps)
        alphas_cumprod = torch.cumprod(1.0 - betas, dim=0)
        alphas_cumprod_prev = F.pad(alphas_cumprod[:-1], (1, 0), value=1.0)
        posterior_variance = betas * (1 - alphas_cumprod_prev) / (1 - alphas_cumprod)
        buffers = {
            "betas": betas,
            "alphas_cumprod": alphas_cumprod,
            "alphas_cumprod_prev": alphas_cumprod_prev,
            "sqrt_alphas_cumprod": alphas_cumprod.sqrt(),
            "sqrt_one_minus_alphas_cumprod": (1 - alphas_cumprod).sqrt(),
            "sqrt_recip_alphas_cumprod": (1 / alphas_cumprod).sqrt(),
            "sqrt_recipm1_alphas_cumprod": (1 / alphas_cumprod - 1).sqrt(),
            "posterior_variance": posterior_variance,
            # the variance is 0 at t=0; clip the log so it stays finite
            "posterior_log_variance_clipped": torch.log(
                torch.cat([posterior_variance[1:2], posterior_variance[1:]])
            ),
            "log_betas": torch.log(betas),
            "posterior_mean_coef1": betas * alphas_cumprod_prev.sqrt() / (1 - alphas_cumprod),
            "posterior_mean_coef2": (1 - alphas_cumprod_prev) * (1 - betas).sqrt() / (1 - alphas_cumprod),
        }
        for name, value in buffers.items():
            self.register_buffer(name, value.float(), persistent=False)

    @classmethod
    def from_config(cls, cfg: DiffusionConfig) -> "GaussianDiffusion":
        return cls(
            cfg.timesteps, cfg.schedule, cfg.objective, cfg.loss_weighting, cfg.min_snr_gamma, cfg.learn_sigma, cfg.vlb_weight
        )

    # ----------------------------------------------------------------- identities
    def q_sample(self, x_start: Tensor, t: Tensor, noise: Optional[Tensor] = None) -> Tensor:
        """Draw `x_t ~ q(x_t | x_0)`; same shape and dtype as `x_start`."""
        noise = torch.randn_like(x_start) if noise is None else noise
        x_t = (
            _extract(self.sqrt_alphas_cumprod, t, x_start) * x_start
            + _extract(self.sqrt_one_minus_alphas_cumprod, t, x_start) * noise
        )
        return x_t.to(x_start.dtype)

    def q_posterior(self, x_start: Tensor, x_t: Tensor, t: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """Mean, variance and clipped log-variance of `q(x_{t-1} | x_t, x_0)`.

        Mean has the shape of `x_t`; variance and log-variance are `[batch, 1, ..., 1]`.
        """
        mean = (
            _extract(self.posterior_mean_coef1, t, x_t) * x_start
            + _extract(self.posterior_mean_coef2, t, x_t) * x_t
        )
        variance = _extract(self.posterior_variance, t, x_t)
        log_variance = _extract(self.posterior_log_variance_clipped, t, x_t)
        return mean, variance, log_variance

    def predict_start_from_noise(self, x_t: Tensor, t: Tensor, noise: Tensor) -> Tensor:
        """`x_0 = (x_t - sqrt(1 - a) eps) / sqrt(a)`."""
        return (
            _extract(self.sqrt_recip_alphas_cumprod, t, x_t) * x_t
            - _extract(self.sqrt_recipm1_alphas_cumprod, t, x_t) * noise
        )

    def predict_noise_from_start(self, x_t: Tensor, t: Tensor, x0: Tensor) -> Tensor:
        """`eps = (x_t / sqrt(a) - x_0) / sqrt(1/a - 1)`."""
        return (_extract(self.sqrt_recip_alphas_cumprod, t, x_t) * x_t - x0) / _extract(
            self.sqrt_recipm1_alphas_cumprod, t, x_t
        )

    def calculate_v(self, x_start: Tensor, t: Tensor, noise: Tensor) -> Tensor:
        """Velocity target of Salimans & Ho 2022: `v = sqrt(a) eps - sqrt(1 - a) x_0`."""
        return (
            _extract(self.sqrt_alphas_cumprod, t, x_start) * noise
            - _extract(self.sqrt_one_minus_alphas_cumprod, t, x_start) * x_start
        )

    def predict_start_from_v(self, x_t: Tensor, t: Tensor, v: Tensor) -> Tensor:
        """`x_0 = sqrt(a) x_t - sqrt(1 - a) v`."""
        return (
            _extract(self.sqrt_alphas_cumprod, t, x_t) * x_t
            - _extract(self.sqrt_one_minus_alphas_cumprod, t, x_t) * v
        )

    def predict_start(self, x_t: Tensor, t: Tensor, model_output: Tensor) -> Tensor:
        """The clean input implied by a model output under this process's objective."""
        if self.objective == "eps":
            return self.predict_start_from_noise(x_t, t, model_output)
        if self.objective == "v":
            return self.predict_start_from_v(x_t, t, model_output)
        return model_output

    # ----------------------------------------------------------------- learned variance
    def split_output(self, model_output: Tensor) -> tuple[Tensor, Optional[Tensor]]:
        """`(prediction, v)`: with `learn_sigma` the two halves of dim 1 (`v` as float32),
        else `(model_output, None)`."""
        if not self.learn_sigma:
            return model_output, None
        if model_output.shape[1] % 2:
            raise ValueError(
                f"learn_sigma: the model must output 2x the channels [prediction, v] along dim 1, got {tuple(model_output.shape)}"
            )
        prediction, v = model_output.chunk(2, dim=1)
        return prediction, v.float()

    @staticmethod
    def interpolate_log_variance(v: Tensor, min_log: Tensor, max_log: Tensor) -> Tensor:
        """Improved DDPM eq. 15: `frac * max_log + (1 - frac) * min_log`, `frac = (v + 1) / 2`."""
        frac = (v + 1) / 2
        return frac * max_log + (1 - frac) * min_log

    def model_log_variance(self, v: Tensor, t: Tensor) -> Tensor:
        """Log variance of `p(x_{t-1} | x_t)` for the learned `v` (shaped like x_t) on the full
        chain: between the clipped posterior log variance and `log beta_t`."""
        min_log = _extract(self.posterior_log_variance_clipped, t, v)
        max_log = _extract(self.log_betas, t, v)
        return self.interpolate_log_variance(v, min_log, max_log)

    def vlb_terms(self, x_start: Tensor, x_t: Tensor, t: Tensor, prediction: Tensor, v: Tensor) -> Tensor:
        """The VLB term `L_t` of each sample in bits per dimension, `[batch]`: the KL from the
        true posterior `q(x_{t-1} | x_t, x_0)` to the model's step for t > 0, and the
        discretized decoder NLL `-log p(x_0 | x_1)` at t = 0 (data in [-1, 1], 256 levels).
        The model's mean comes from `prediction` (its x0 unclipped), its variance from `v`."""
        x_start, x_t, v = x_start.float(), x_t.float(), v.float()
        true_mean, _, true_log_variance = self.q_posterior(x_start, x_t, t)
        model_mean, _, _ = self.q_posterior(self.predict_start(x_t, t, prediction.float()), x_t, t)
        model_log_variance = self.model_log_variance(v, t)
        kl = normal_kl(true_mean, true_log_variance, model_mean, model_log_variance)
        nll = -discretized_gaussian_log_likelihood(x_start, model_mean, 0.5 * model_log_variance)
        at_zero = (t == 0).to(x_start.device).reshape(-1, *([1] * (x_start.ndim - 1)))
        per_dim = torch.where(at_zero, nll, kl)
        return per_dim.flatten(1).mean(dim=1) / math.log(2.0)

    # ----------------------------------------------------------------- training
    def snr(self, t: Tensor) -> Tensor:
        """Signal-to-noise ratio `a / (1 - a)` at timesteps `t`, `[batch]`."""
        a = self.alphas_cumprod.gather(0, t.to(self.alphas_cumprod.device))
        return a / (1 - a)

    def loss_weights(self, t: Tensor) -> Tensor:
        """Per-sample loss weights `[batch]`.

        `min_snr` is Hang et al. 2023 ("Efficient Diffusion Training via Min-SNR Weighting"):
        the x0-space weight `min(snr, gamma)`, expressed for the objective in use (divided by
        `snr` for eps and by `snr + 1` for v), so that low-noise steps stop dominating.
        """
        if self.loss_weighting == "none":
            return torch.ones(t.shape, device=t.device)
        snr = self.snr(t)
        clipped = snr.clamp(max=self.min_snr_gamma)
        if self.objective == "eps":
            return (clipped / snr).to(t.device)
        if self.objective == "v":
            return (clipped / (snr + 1)).to(t.device)
        return clipped.to(t.device)

    def loss(
        self,
        model_fn: ModelFn,
        x_start: Tensor,
        *,
        cond: Optional[dict[str, Any]] = None,
        t: Optional[Tensor] = None,
        noise: Optional[Tensor] = None,
        generator: Optional[torch.Generator] = None,
    ) -> Tensor:
        """Mean (optionally weighted) MSE between the model output and the objective's target;
        with `learn_sigma` plus `vlb_weight * timesteps * L_t` (bits per dimension), the
        uniform-t estimate of `lambda L_vlb`, computed with the prediction detached.

        `x_start`: `[batch, ...]`; `cond` is passed to `model_fn` as keyword arguments.
        `t` and `noise` are drawn uniformly / from N(0, I) unless given. Returns a scalar
        in float32 whatever the model's dtype.
        """
        batch = x_start.shape[0]
        if t is None:
            t = torch.randint(0, self.timesteps, (batch,), device=x_start.device, generator=generator)
        if noise is None:
            noise = torch.randn(x_start.shape, device=x_start.device, dtype=x_start.dtype, generator=generator)
        x_t = self.q_sample(x_start, t, noise)
        prediction, v = self.split_output(model_fn(x_t, t, **(cond or {})))
        if self.objective == "eps":
            target = noise
        elif self.objective == "x0":
            target = x_start
        else:
            target = self.calculate_v(x_start, t, noise)
        per_sample = (prediction.float() - target.float()).pow(2).flatten(1).mean(dim=1)
        per_sample = per_sample * self.loss_weights(t)
        if v is not None:
            # the stop-gradient of improved DDPM: L_vlb trains the variance, L_simple the mean
            vlb = self.vlb_terms(x_start, x_t, t, prediction.detach(), v)
            per_sample = per_sample + self.vlb_weight * self.timesteps * vlb
        return per_sample.mean()

    # ----------------------------------------------------------------- sampling
    def respaced_timesteps(self, steps: int) -> list[int]:
        """`steps` timesteps from `timesteps - 1` down to 0, evenly spaced (descending):
        `round(k (T - 1) / (steps - 1))` in float64, ties to even, the spacing of Karlo and of
        diffusers' `UnCLIPScheduler`, so both sample at the same timesteps for every `steps`."""
        if not 1 <= steps <= self.timesteps:
            raise ValueError(f"steps must be in [1, {self.timesteps}], got {steps}")
        if steps == 1:
            return [self.timesteps - 1]
        ratio = (self.timesteps - 1) / (steps - 1)
        ts = (torch.arange(steps, dtype=torch.float64) * ratio).round().long()
        return sorted(set(ts.tolist()), reverse=True)

    def guided_prediction(
        self,
        model_fn: ModelFn,
        x_t: Tensor,
        t: Tensor,
        cond: Optional[dict[str, Any]] = None,
        guidance_scale: float = 1.0,
    ) -> Tensor:
        """Classifier-free guidance: `uncond + scale * (cond - uncond)`.

        Both passes run as one forward of batch `2 * batch` (conditional rows first); tensors
        in `cond` whose first dimension is the batch are repeated, other values passed as is.
        With scale 1 only the conditional pass runs. With `learn_sigma` only the prediction is
        guided; the variance channels are the conditional pass's (as GLIDE and Karlo sample).
        """
        cond = cond or {}
        if guidance_scale == 1.0:
            return model_fn(x_t, t, **cond)
        batch = x_t.shape[0]
        doubled = {
            k: torch.cat([v, v]) if isinstance(v, Tensor) and v.ndim > 0 and v.shape[0] == batch else v
            for k, v in cond.items()
        }
        null_cond = torch.arange(2 * batch, device=x_t.device) >= batch
        out = model_fn(torch.cat([x_t, x_t]), torch.cat([t, t]), null_cond=null_cond, **doubled)
        # combined in float32: under bf16 autocast the extrapolation would lose the difference
        conditional, unconditional = out.to(torch.promote_types(out.dtype, torch.float32)).chunk(2)
        cond_pred, v = self.split_output(conditional)
        uncond_pred, _ = self.split_output(unconditional)
        guided = uncond_pred + guidance_scale * (cond_pred - uncond_pred)
        return guided if v is None else torch.cat([guided, v.to(guided.dtype)], dim=1)

    @staticmethod
    def clip_start(x0: Tensor, mode: str, percentile: float = 0.995, clip_range: float = 1.0) -> Tensor:
        """`static`: clamp to [-clip_range, clip_range]. `dynamic` (Saharia et al. 2022, Imagen):
        per sample, s = max(1, the `percentile` quantile of |x0|); clamp to [-s, s], divide by s."""
        if mode == "none":
            return x0
        if mode == "static":
            return x0.clamp(-clip_range, clip_range)
        if mode == "dynamic":
            s = torch.quantile(x0.detach().float().abs().flatten(1), percentile, dim=1).clamp(min=1.0)
            s = s.to(x0.dtype).reshape(-1, *([1] * (x0.ndim - 1)))
            return x0.clamp(-s, s) / s
        raise ValueError(f"clip mode must be 'none', 'static' or 'dynamic', got {mode!r}")

    def _alpha_cumprod_at(self, t: int, like: Tensor) -> Tensor:
        value = self.alphas_cumprod[t] if t >= 0 else torch.ones((), device=self.alphas_cumprod.device)
        dtype = torch.float64 if like.dtype == torch.float64 else torch.float32
        return value.to(device=like.device, dtype=dtype)

    @torch.no_grad()
    def sample(
        self,
        model_fn: ModelFn,
        shape: tuple[int, ...],
        *,
        cond: Optional[dict[str, Any]] = None,
        steps: int = 64,
        sampler: Literal["ddim", "ddpm"] = "ddim",
        eta: float = 0.0,
        guidance_scale: float = 1.0,
        clip_x0: str = "none",
        dynamic_threshold_percentile: float = 0.995,
        clip_range: float = 1.0,
        noise: Optional[Tensor] = None,
        generator: Optional[torch.Generator] = None,
        device: Optional[torch.device] = None,
        dtype: torch.dtype = torch.float32,
        progress: Optional[Callable[[int, int], None]] = None,
    ) -> Tensor:
        """Run the reverse process over `steps` respaced timesteps; returns x_0 `[*shape]`.

        `ddim` (Song et al. 2021) with `eta` (0: deterministic, 1: as noisy as DDPM);
        `ddpm`: ancestral sampling from the posterior between consecutive respaced steps, which
        equals `q_posterior` when `steps == timesteps`; with `learn_sigma` its variance is the
        learned interpolation between that posterior's and the respaced beta. `noise` fixes x_T (e.g. to share decoder
        noise across interpolation frames); `generator` makes every draw reproducible.
        `progress(i, n)` is called after each step.
        """
        if sampler not in ("ddim", "ddpm"):
            raise ValueError(f"sampler must be 'ddim' or 'ddpm', got {sampler!r}")
        device = device or self.betas.device
        x = noise.to(device=device, dtype=dtype) if noise is not None else torch.randn(
            shape, device=device, dtype=dtype, generator=generator
        )
        timesteps = self.respaced_timesteps(steps)
        for i, step in enumerate(timesteps):
            prev = timesteps[i + 1] if i + 1 < len(timesteps) else -1
            t = torch.full((x.shape[0],), step, device=device, dtype=torch.long)
            prediction, v = self.split_output(self.guided_prediction(model_fn, x, t, cond, guidance_scale))
            x0 = self.predict_start(x, t, prediction.to(x.dtype))
            x0 = self.clip_start(x0, clip_x0, dynamic_threshold_percentile, clip_range)
            if sampler == "ddim":
                x = self._ddim_step(x, x0, t, step, prev, eta, generator)
            else:
                x = self._ddpm_step(x, x0, step, prev, generator, v)
            if progress is not None:
                progress(i + 1, len(timesteps))
        return x

    def _ddim_step(self, x, x0, t, step, prev, eta, generator):
        a, a_prev = self._alpha_cumprod_at(step, x), self._alpha_cumprod_at(prev, x)
        eps = self.predict_noise_from_start(x, t, x0)
        sigma = eta * ((1 - a_prev) / (1 - a) * (1 - a / a_prev)).clamp(min=0).sqrt()
        direction = (1 - a_prev - sigma**2).clamp(min=0).sqrt() * eps
        x_prev = a_prev.sqrt() * x0 + direction
        if prev >= 0 and eta > 0:
            x_prev = x_prev + sigma * torch.randn(x.shape, device=x.device, dtype=x.dtype, generator=generator)
        return x_prev.to(x.dtype)

    def respaced_step_variances(self, step: int, prev: int, like: Tensor) -> tuple[Tensor, Tensor]:
        """`(beta, posterior variance)` of the respaced chain's step `step -> prev` (prev >= 0):
        `beta = 1 - a_step / a_prev` and `beta (1 - a_prev) / (1 - a_step)`, the bounds that a
        learned `v` interpolates between (in log space)."""
        a, a_prev = self._alpha_cumprod_at(step, like), self._alpha_cumprod_at(prev, like)
        beta = 1 - a / a_prev
        return beta, beta * (1 - a_prev) / (1 - a)

    def _ddpm_step(self, x, x0, step, prev, generator, v=None):
        if prev < 0:
            return x0
        # posterior q(x_prev | x_t, x0) of the respaced chain: its beta is 1 - a_t / a_prev
        a, a_prev = self._alpha_cumprod_at(step, x), self._alpha_cumprod_at(prev, x)
        beta, variance = self.respaced_step_variances(step, prev, x)
        mean = (a_prev.sqrt() * beta / (1 - a)) * x0 + ((1 - beta).sqrt() * (1 - a_prev) / (1 - a)) * x
        noise = torch.randn(x.shape, device=x.device, dtype=x.dtype, generator=generator)
        if v is None:
            return (mean + variance.sqrt() * noise).to(x.dtype)
        log_variance = self.interpolate_log_variance(v.to(mean.dtype), variance.log(), beta.log())
        return (mean + torch.exp(0.5 * log_variance) * noise).to(x.dtype)
