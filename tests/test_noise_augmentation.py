"""Noise conditioning augmentation of the upsamplers' low-res input (CDM / Imagen)."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from models.config import ConfigError, build_config
from models.decoder import Upsampler, UpsamplerConfig
from models.noise_augmentation import NoiseAugConfig, NoiseAugmentation, signal_and_noise
from models.unet import UNetConfig


UNET = UNetConfig(base_channels=8, channel_mults=(1, 2), num_res_blocks=1, attention_resolutions=(), norm_groups=4)


def _upsampler(max_level: float = 0.5, sample_level: float = 0.2, seed: int = 0) -> Upsampler:
    model = Upsampler(UpsamplerConfig(
        lowres_size=8, image_size=16, unet=UNET, noise_aug=NoiseAugConfig(max_level=max_level, sample_level=sample_level),
    ))  # fmt: skip
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():  # random weights: a fresh UNet's zero output layer would hide every input
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=gen) * 0.1)
    return model


def _images(batch: int, size: int, seed: int = 0) -> torch.Tensor:
    coarse = torch.rand(batch, 3, size // 4, size // 4, generator=torch.Generator().manual_seed(seed)) * 2 - 1
    return F.interpolate(coarse, size=(size, size), mode="bilinear", align_corners=False)


def test_levels_follow_the_continuous_cosine_schedule():
    levels = torch.tensor([0.0, 0.1, 0.2, 0.5, 1.0])
    signal, noise = signal_and_noise(levels)
    offset = 0.008 / 1.008 * math.pi / 2
    alpha = torch.cos((levels.double() + 0.008) / 1.008 * math.pi / 2) ** 2 / math.cos(offset) ** 2
    torch.testing.assert_close(signal.double(), alpha.clamp(0, 1).sqrt(), atol=1e-6, rtol=0)
    torch.testing.assert_close(signal**2 + noise**2, torch.ones(5))  # variance preserving
    assert signal[0] == 1 and noise[0] == 0 and noise[-1] > 0.9999  # level 0: the clean input
    torch.testing.assert_close(noise[1:4], torch.tensor([0.1671, 0.3183, 0.7114]), atol=1e-3, rtol=0)


def test_augment_adds_noise_of_the_levels_std():
    aug = NoiseAugmentation(NoiseAugConfig(max_level=1.0), width=8)
    image = _images(1, 16).expand(2000, -1, -1, -1)
    level = torch.full((2000,), 0.3)
    out = aug.augment(image, level, torch.Generator().manual_seed(0))
    signal, noise = signal_and_noise(level[:1])
    residual = out - signal * image
    # 2000 x 768 Gaussian draws: the std is known to ~0.1%, the mean to ~1e-4 per pixel
    assert abs(residual.std().item() - noise.item()) < 0.01 * noise.item()
    torch.testing.assert_close(out.mean(0), signal * image[0], atol=0.05, rtol=0)
    drawn = aug.draw_levels(20000, torch.device("cpu"), torch.Generator().manual_seed(1))
    assert drawn.min() >= 0 and drawn.max() <= 1.0 and abs(drawn.mean().item() - 0.5) < 5 * (1 / math.sqrt(12 * 20000))


def test_off_by_default_with_the_same_weights_as_before():
    plain = Upsampler(UpsamplerConfig(lowres_size=8, image_size=16, unet=UNET))
    assert plain.noise_aug is None and not any("noise_aug" in k or "cond_proj" in k for k in plain.state_dict())
    lowres = _images(2, 8)
    with pytest.raises(ValueError, match="without noise augmentation"):
        plain.sample(lowres, steps=2, noise_level=0.2)
    with pytest.raises(ValueError, match="noise_level"):
        plain(_images(2, 16), torch.zeros(2, dtype=torch.long), lowres_cond=_images(2, 16), noise_level=torch.zeros(2))
    with pytest.raises(ConfigError, match="sample_level"):
        build_config(UpsamplerConfig, {"lowres_size": 8, "image_size": 16, "noise_aug": {"max_level": 0.1, "sample_level": 0.3}})


def test_the_training_loss_noises_the_condition_and_conditions_on_that_level():
    """Replaying the loss's draws by hand gives the same number: the low-res image is noised by
    the drawn level, and the model is told that level; the level pathway gets gradients."""
    model = _upsampler().train()
    images = _images(4, 16, seed=1)
    loss = model.loss(images, torch.Generator().manual_seed(5))
    replay = torch.Generator().manual_seed(5)
    lowres_cond = model.upsample_lowres(model.make_lowres(images, replay))
    level = model.noise_aug.draw_levels(4, images.device, replay)
    assert 0 < level.min() and level.max() < 0.5
    noised = model.noise_aug.augment(lowres_cond, level, replay)
    expected = model.diffusion.loss(model, images, cond={"lowres_cond": noised, "noise_level": level}, generator=replay)
    torch.testing.assert_close(loss, expected)
    loss.backward()
    assert model.noise_aug.mlp[0].weight.grad.abs().sum() > 0


def test_sampling_noises_the_input_at_the_chosen_level_and_conditions_on_it():
    model = _upsampler().eval()
    lowres = _images(2, 8)
    x = _images(2, 16, seed=2)
    t = torch.full((2,), 500)
    cond = model.upsample_lowres(lowres)
    at = lambda s: model(x, t, lowres_cond=cond, noise_level=torch.full((2,), s))  # noqa: E731
    assert (at(0.0) - at(0.4)).abs().amax() > 1e-3  # the level itself is an input

    def sample(level=None, seed=0):
        return model.sample(lowres, steps=3, generator=torch.Generator().manual_seed(seed), noise_level=level)

    default, same, other = sample(), sample(0.2), sample(0.4)
    assert torch.equal(default, same) and not torch.equal(default, other)  # default: cfg.sample_level
    assert torch.equal(sample(0.3, seed=1), sample(0.3, seed=1))
    # level 0 is the clean input: the same as conditioning on it directly (after the same
    # draw of augmentation noise, which every level makes, so seeds mean the same at any level)
    gen = torch.Generator().manual_seed(0)
    torch.randn((2, 3, 16, 16), generator=gen)
    clean = model.diffusion.sample(
        model, (2, 3, 16, 16), cond={"lowres_cond": cond, "noise_level": torch.zeros(2)}, steps=3,
        sampler=model.cfg.diffusion.sampler, generator=gen, clip_x0=model.cfg.diffusion.clip_x0,
    ).clamp(-1, 1)
    torch.testing.assert_close(sample(0.0), clean)
    with pytest.raises(ValueError, match="outside the levels"):
        sample(0.6)
