"""Upsamplers and the low-res degradations they train with."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from models.decoder import Upsampler, UpsamplerConfig
from models.degradations import BSRConfig, bsr_degrade, gaussian_blur, jpeg_compress, random_gaussian_blur
from models.unet import UNetConfig


UNET = UNetConfig(base_channels=16, channel_mults=(1, 2), num_res_blocks=1, attention_resolutions=(), norm_groups=4)


def _cfg(**kw) -> UpsamplerConfig:
    return UpsamplerConfig(**{**dict(lowres_size=8, image_size=16, unet=UNET), **kw})


def _images(batch=4, size=16, seed=0) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    # smooth images, like real ones, so that blur and JPEG have something to preserve
    coarse = torch.rand(batch, 3, size // 4, size // 4, generator=gen) * 2 - 1
    return F.interpolate(coarse, size=(size, size), mode="bilinear", align_corners=False)


def _randomise(model: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=gen) * 0.1)
    return model


# ------------------------------------------------------------------------------- degradations
def test_gaussian_blur_identities():
    x = _images(size=16)
    torch.testing.assert_close(gaussian_blur(x, torch.zeros(4)), x)
    const = torch.full((2, 3, 16, 16), 0.3)
    torch.testing.assert_close(gaussian_blur(const, torch.tensor([0.5, 2.0])), const)
    # blur removes high frequencies: per-image variance of a noise image falls
    noise = torch.randn(2, 3, 16, 16, generator=torch.Generator().manual_seed(0))
    blurred = gaussian_blur(noise, torch.tensor([0.5, 2.0]))
    var = blurred.flatten(1).var(dim=1)
    assert var[1] < var[0] < noise.flatten(1).var(dim=1).min()
    # a 3-tap kernel only mixes neighbours: a single bright pixel spreads to its 3x3 window
    dot = torch.zeros(1, 1, 9, 9)
    dot[..., 4, 4] = 1.0
    spread = gaussian_blur(dot, torch.tensor([0.6]), kernel_size=3)[0, 0]
    assert (spread > 0).sum() == 9 and spread[3:6, 3:6].sum().item() == pytest.approx(1.0)
    with pytest.raises(ValueError, match="odd"):
        gaussian_blur(dot, torch.tensor([0.6]), kernel_size=4)
    # each image gets its own sigma: blurring the batch equals blurring images one by one
    torch.testing.assert_close(blurred[1:], gaussian_blur(noise[1:], torch.tensor([2.0])))


def test_jpeg_round_trip():
    grey = _images(batch=2)[:, :1].expand(2, 3, 16, 16).contiguous()
    near = jpeg_compress(grey, torch.tensor([100, 100]))
    assert (near - grey).abs().max() < 4 / 127.5  # quantisation step 1 and 8-bit rounding only
    x = _images(batch=2)
    errors = [(jpeg_compress(x, torch.tensor([q, q])) - x).abs().mean() for q in (95, 50, 10)]
    assert errors[0] < errors[1] < errors[2]
    out = jpeg_compress(x, torch.tensor([30, 80]))
    assert out.shape == x.shape and out.min() >= -1 and out.max() <= 1
    assert torch.equal(out, jpeg_compress(x, torch.tensor([30, 80])))
    # non-multiple-of-8 sizes and single-channel images work too
    odd = _images(batch=1, size=12)[:, :1]
    assert jpeg_compress(odd, torch.tensor([50])).shape == odd.shape


@pytest.mark.parametrize("kind", ["blur", "bsr"])
def test_degradations_keep_shape_range_and_are_reproducible(kind):
    x = _images(batch=6)

    def run(seed):
        gen = torch.Generator().manual_seed(seed)
        return random_gaussian_blur(x, (0.4, 0.6), gen) if kind == "blur" else bsr_degrade(x, BSRConfig(), gen)

    a, b, c = run(0), run(0), run(1)
    assert a.shape == x.shape and a.min() >= -1 and a.max() <= 1
    assert torch.equal(a, b) and not torch.equal(a, c)
    assert not torch.equal(a, x)


def test_bsr_config_validation():
    with pytest.raises(ValueError, match="resize_scale"):
        BSRConfig(resize_scale=(0.5, 1.5))
    with pytest.raises(ValueError, match="blur_sigma"):
        BSRConfig(blur_sigma=(2.0, 1.0))
    with pytest.raises(ValueError, match="jpeg_quality"):
        BSRConfig(jpeg_quality=(0, 90))


# ------------------------------------------------------------------------------- upsampler
def test_make_lowres_downsamples_then_degrades():
    model = Upsampler(_cfg(blur_sigma=(0.0, 0.0)))
    x = _images()
    lowres = model.make_lowres(x)
    assert lowres.shape == (4, 3, 8, 8)
    expected = F.interpolate(x, size=(8, 8), mode="bicubic", align_corners=False, antialias=True).clamp(-1, 1)
    torch.testing.assert_close(lowres, expected)
    bsr = Upsampler(_cfg(degradation="bsr"))
    gen = lambda: torch.Generator().manual_seed(3)  # noqa: E731
    assert torch.equal(bsr.make_lowres(x, gen()), bsr.make_lowres(x, gen()))


def test_forward_and_sample_shapes():
    model = _randomise(Upsampler(_cfg())).eval()
    x = _images()
    lowres_cond = model.upsample_lowres(model.make_lowres(x))
    assert model(x, torch.zeros(4, dtype=torch.long), lowres_cond=lowres_cond).shape == x.shape
    lowres = _images(size=8)
    a = model.sample(lowres, steps=3, generator=torch.Generator().manual_seed(0))
    b = model.sample(lowres, steps=3, generator=torch.Generator().manual_seed(0))
    assert a.shape == (4, 3, 16, 16) and a.min() >= -1 and a.max() <= 1 and torch.equal(a, b)
    # the low-res image conditions the output
    assert not torch.equal(a, model.sample(-lowres, steps=3, generator=torch.Generator().manual_seed(0)))
    with pytest.raises(ValueError, match="lowres"):
        model.sample(_images(size=16))
    with pytest.raises(ValueError, match="guidance"):
        model(x, torch.zeros(4, dtype=torch.long), lowres_cond=lowres_cond, null_cond=torch.ones(4, dtype=torch.bool))


@pytest.mark.parametrize("degradation", ["gaussian_blur", "bsr"])
def test_overfits_a_fixed_batch(degradation):
    torch.manual_seed(0)
    model = Upsampler(_cfg(degradation=degradation)).train()
    images = _images(batch=8, seed=1)
    gen = torch.Generator().manual_seed(0)
    t = torch.randint(0, 1000, (8,), generator=gen)
    noise = torch.randn(8, 3, 16, 16, generator=gen)
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    losses = []
    for step in range(60):
        # a fixed degradation per step keeps the target fixed
        loss = model.loss(images, torch.Generator().manual_seed(step % 2), t=t, noise=noise)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0] / 10, (losses[0], losses[-1])


def test_random_crops_train_at_crop_size():
    model = _randomise(Upsampler(_cfg(image_size=32, lowres_size=16, train_crop_size=16))).train()
    images = _images(size=32)
    cropped = model._random_crop(images, torch.Generator().manual_seed(0))
    assert cropped.shape == (4, 3, 16, 16)
    # every crop is a window of its image on the low-res grid (offsets are even)
    for img, crop in zip(images, cropped):
        windows = img.unfold(1, 16, 2).unfold(2, 16, 2)  # [3, ny, nx, 16, 16]
        assert (windows == crop[:, None, None]).flatten(3).all(dim=3).all(dim=0).any()
    loss = model.loss(images, torch.Generator().manual_seed(0))
    assert loss.ndim == 0 and torch.isfinite(loss)
    with pytest.raises(ValueError, match="train_crop_size"):
        _cfg(image_size=32, lowres_size=16, train_crop_size=15)
