"""Sampling applications as deterministic maps: unguided DDIM inversion, interpolation frames
that depend on the embedding alone, per-stage options, and the one crop policy for inputs."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from models.decoder import Decoder, DecoderConfig, Upsampler, UpsamplerConfig
from models.diffusion import DiffusionConfig
from models.images import from_pil, resize_center_crop, resize_center_crop_tensor
from models.noise_augmentation import NoiseAugConfig
from models.pipeline import UnCLIPPipeline
from models.unet import UNetConfig
from tests.test_pipeline import UNET, D, L, StubClip, W, _randomise


# Stages configured the way that used to break determinism: an ancestral (DDPM) decoder with
# guidance, and a stochastic upsampler with noise augmentation.
NOISY = DiffusionConfig(timesteps=100, sample_steps=3, sampler="ddpm", guidance_scale=3.0, clip_x0="static")


@pytest.fixture(scope="module")
def noisy() -> UnCLIPPipeline:
    decoder = Decoder(DecoderConfig(
        image_size=8, image_embed_dim=D, text_width=W, max_text_len=L, context_dim=16,
        unet=UNetConfig(**UNET, attention_resolutions=(4,)), diffusion=NOISY,
    ))  # fmt: skip
    up = Upsampler(UpsamplerConfig(
        lowres_size=8, image_size=16, unet=UNetConfig(**UNET, attention_resolutions=()),
        diffusion=DiffusionConfig(timesteps=100, sample_steps=2, sampler="ddim", eta=1.0),
        noise_aug=NoiseAugConfig(max_level=0.5, sample_level=0.3),
    ))  # fmt: skip
    return UnCLIPPipeline(StubClip(), None, _randomise(decoder, 1), [_randomise(up, 2)])


def _images(batch: int, size: int = 16, seed: int = 0) -> torch.Tensor:
    return torch.rand(batch, 3, size, size, generator=torch.Generator().manual_seed(seed)) * 2 - 1


def test_interpolating_an_image_with_itself_gives_one_frame_whatever_the_stages_sample_with(noisy):
    a = _images(1)[0]
    frames = noisy.interpolate(a, a, 4, seed=0)
    assert frames.shape == (4, 3, 16, 16)
    torch.testing.assert_close(frames[1:], frames[:1].expand(3, -1, -1, -1), atol=1e-5, rtol=0)
    # it is unguided DDIM with eta 0 at both stages, decoded from one shared noise
    embed = noisy.encode_image(a[None]).expand(4, -1)
    by_hand = noisy.decode(embed, decoder_guidance=1.0, sampler="ddim", eta=0.0, upsampler_sampler="ddim",
                           upsampler_eta=0.0, share_noise=True, generator=noisy.generator(0))
    torch.testing.assert_close(frames, by_hand, atol=1e-5, rtol=0)
    # the same stages decoding as configured differ from row to row: that is what was fixed
    free = noisy.decode(embed, share_noise=True, generator=noisy.generator(0))
    assert (free[1:] - free[:1]).abs().amax() > 1e-2
    for option in ({"sampler": "ddpm"}, {"decoder_guidance": 3.0}, {"upsampler_eta": 1.0}):
        with pytest.raises(ValueError, match="deterministic DDIM"):
            noisy.interpolate(a, a, 2, seed=0, **option)


def test_inversion_is_unguided_whatever_the_configured_guidance(noisy):
    images = _images(2)
    embed = noisy.encode_image(images)
    latent = noisy.invert(images)
    small = resize_center_crop_tensor(images, 8)
    torch.testing.assert_close(latent, noisy.decoder.invert(small, embed, guidance_scale=1.0))
    assert (latent - noisy.decoder.invert(small, embed, guidance_scale=3.0)).abs().amax() > 1e-3


def test_text_diff_from_the_inverted_latent_decodes_unguided_ddim(noisy):
    image = _images(1)
    out = noisy.text_diff(image, "a red square", "a blue circle", [0.0], seed=0)
    embed = noisy.encode_image(image)
    by_hand = noisy.decode(embed, decoder_guidance=1.0, sampler="ddim", eta=0.0, upsampler_sampler="ddim",
                           upsampler_eta=0.0, decoder_noise=noisy.invert(image, embed), share_noise=True,
                           generator=noisy.generator(0))
    torch.testing.assert_close(out, by_hand, atol=1e-4, rtol=0)  # slerp at 0 rounds the embedding
    with pytest.raises(ValueError, match="decoder_guidance"):
        noisy.text_diff(image, "a", "b", [0.0], decoder_guidance=2.0)


def test_per_upsampler_options_and_their_errors(noisy):
    embed = noisy.encode_image(_images(1))
    run = lambda **kw: noisy.decode(embed, generator=noisy.generator(0), **kw)  # noqa: E731
    assert torch.equal(run(upsampler_steps=[1]), run(upsampler_steps=1))
    assert not torch.equal(run(upsampler_steps=1), run(upsampler_steps=2))
    assert not torch.equal(run(upsampler_noise_level=0.1), run(upsampler_noise_level=0.4))
    with pytest.raises(ValueError, match="upsampler_steps: 2 values for 1 upsampler"):
        run(upsampler_steps=[1, 2])
    with pytest.raises(ValueError, match="outside the levels"):
        run(upsampler_noise_level=0.9)


def test_inputs_are_centre_cropped_as_the_training_data_not_squashed(noisy):
    # at the CLIP's and the decoder's size (8): the crop alone, no resampling to blur the borders
    centre = _images(1, size=8, seed=3)
    wide = torch.cat([_images(1, size=8, seed=4)[..., :4], centre, _images(1, size=8, seed=5)[..., :4]], dim=-1)
    assert wide.shape[-2:] == (8, 16)
    torch.testing.assert_close(resize_center_crop_tensor(wide, 8), centre)
    torch.testing.assert_close(noisy.encode_image(wide), noisy.encode_image(centre))
    torch.testing.assert_close(noisy.invert(wide), noisy.invert(centre))
    # the PIL path (training data, CLIP precompute) and the tensor path (sampling) agree
    smooth = (np.add.outer(np.arange(48), np.arange(80)) * 2.5 % 256).astype(np.uint8)
    img = Image.fromarray(np.stack([smooth, smooth[::-1], smooth[:, ::-1]], axis=-1))
    by_pil = from_pil(resize_center_crop(img, 24))
    by_tensor = resize_center_crop_tensor(from_pil(img)[None], 24)[0]
    assert by_pil.shape == by_tensor.shape == (3, 24, 24)
    assert (by_pil - by_tensor).abs().mean() < 0.02
