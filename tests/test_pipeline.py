"""The sampling pipeline: slerp, seeds, every application's output size and range."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from models.decoder import Decoder, DecoderConfig, Upsampler, UpsamplerConfig
from models.diffusion import DiffusionConfig
from models.pipeline import UnCLIPPipeline, slerp
from models.prior import DiffusionPrior, DiffusionPriorConfig
from models.unet import UNetConfig


D, W, L = 16, 12, 6
UNET = dict(base_channels=8, channel_mults=(1, 2), num_res_blocks=1, head_channels=8, norm_groups=4)
FAST = DiffusionConfig(timesteps=100, sample_steps=2, clip_x0="static")


class StubClip:
    """Deterministic stand-in with the CLIP adapter's interface (random projections)."""

    embed_dim, text_width, context_length, image_size = D, W, L, 8

    def __init__(self) -> None:
        gen = torch.Generator().manual_seed(0)
        self.image_proj = torch.randn(3 * 8 * 8, D, generator=gen)
        self.char_table = torch.randn(256, W, generator=gen)
        self.text_proj = torch.randn(W, D, generator=gen)

    def encode_text(self, texts):
        encodings, masks = [], []
        for text in texts:
            codes = torch.tensor([ord(c) % 256 for c in text[:L]] or [0])
            enc = torch.zeros(L, W)
            enc[: len(codes)] = self.char_table[codes].cumsum(0)
            encodings.append(enc)
            masks.append(torch.arange(L) < len(codes))
        encodings, masks = torch.stack(encodings), torch.stack(masks)
        embed = (encodings * masks[..., None]).sum(1) @ self.text_proj
        return F.normalize(embed, dim=-1), encodings, masks

    def encode_image(self, images):
        small = F.interpolate(images.float(), size=(8, 8), mode="bilinear", align_corners=False)
        return F.normalize(small.flatten(1) @ self.image_proj, dim=-1)


def _randomise(model: torch.nn.Module, seed: int) -> torch.nn.Module:
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=gen) * 0.1)
    return model.eval()


def _pipeline(with_prior: bool = True, upsamplers: int = 2) -> UnCLIPPipeline:
    decoder = Decoder(
        DecoderConfig(
            image_size=8, image_embed_dim=D, text_width=W, max_text_len=L, context_dim=16,
            unet=UNetConfig(**UNET, attention_resolutions=(4,)), diffusion=FAST,
        )
    )  # fmt: skip
    ups = [
        Upsampler(UpsamplerConfig(lowres_size=8 * 2**i, image_size=16 * 2**i, unet=UNetConfig(**UNET, attention_resolutions=()), diffusion=FAST))
        for i in range(upsamplers)
    ]  # fmt: skip
    prior = None
    if with_prior:
        prior = DiffusionPrior(
            DiffusionPriorConfig(
                embed_dim=D, text_width=W, max_text_len=L, dim=32, depth=1, heads=2, dim_head=16,
                diffusion=DiffusionConfig(timesteps=100, sample_steps=3, objective="x0"),
            )
        ).eval()  # fmt: skip
    return UnCLIPPipeline(StubClip(), prior, _randomise(decoder, 1), [_randomise(u, 2 + i) for i, u in enumerate(ups)])


@pytest.fixture(scope="module")
def pipe() -> UnCLIPPipeline:
    """The whole chain, 8 -> 16 -> 32 px."""
    return _pipeline()


@pytest.fixture(scope="module")
def small() -> UnCLIPPipeline:
    """Decoder only: random upsamplers saturate, which would hide differences between inputs."""
    return _pipeline(upsamplers=0)


def _images(batch: int, seed: int, size: int = 16) -> torch.Tensor:
    return torch.rand(batch, 3, size, size, generator=torch.Generator().manual_seed(seed)) * 2 - 1


def _in_range(images: torch.Tensor, batch: int, size: int) -> bool:
    return images.shape == (batch, 3, size, size) and images.min() >= -1 and images.max() <= 1


# ------------------------------------------------------------------------------- slerp
def test_slerp_endpoints_norm_and_angles():
    gen = torch.Generator().manual_seed(0)
    a, b = torch.randn(5, 32, generator=gen), torch.randn(5, 32, generator=gen)
    torch.testing.assert_close(slerp(a, b, 0.0), F.normalize(a, dim=-1))
    torch.testing.assert_close(slerp(a, b, 1.0), F.normalize(b, dim=-1))
    mid = slerp(a, b, 0.5)
    torch.testing.assert_close(mid.norm(dim=-1), torch.ones(5))
    an, bn = F.normalize(a, dim=-1), F.normalize(b, dim=-1)
    torch.testing.assert_close((mid * an).sum(-1), (mid * bn).sum(-1))  # the midpoint bisects the angle
    # constant angular speed: angle(a, slerp(w)) = w * angle(a, b)
    total = torch.arccos((an * bn).sum(-1))
    torch.testing.assert_close(torch.arccos((slerp(a, b, 0.3) * an).sum(-1)), 0.3 * total, atol=1e-4, rtol=1e-4)


def test_slerp_weight_vectors_and_parallel_inputs():
    a, b = torch.randn(32), torch.randn(32)
    frames = slerp(a, b, torch.linspace(0, 1, 7))
    assert frames.shape == (7, 32)
    torch.testing.assert_close(frames.norm(dim=-1), torch.ones(7))
    same = slerp(a, 2 * a, torch.tensor([0.0, 0.5, 1.0]))
    assert torch.isfinite(same).all()
    torch.testing.assert_close(same, F.normalize(a, dim=-1).expand(3, -1))


# ------------------------------------------------------------------------------- applications
def test_text_to_image_is_reproducible_by_seed(pipe):
    prompts = ["a red square", "a blue circle"]
    a = pipe.text_to_image(prompts, seed=0, decoder_guidance=2.0, prior_options={"guidance_scale": 2.0})
    b = pipe.text_to_image(prompts, seed=0, decoder_guidance=2.0, prior_options={"guidance_scale": 2.0})
    c = pipe.text_to_image(prompts, seed=1, decoder_guidance=2.0, prior_options={"guidance_scale": 2.0})
    assert _in_range(a, 2, 32) and pipe.image_size == 32
    assert torch.equal(a, b) and not torch.equal(a, c)


def test_decoder_only_baseline_and_decoder_alone():
    no_prior = _pipeline(with_prior=False, upsamplers=0)
    out = no_prior.text_to_image(["a red square"], seed=0, steps=2, sampler="ddpm")
    assert _in_range(out, 1, 8)
    # the baseline decodes the text embedding as the image embedding
    text_embed, enc, mask = no_prior.encode_text(["a red square"])
    again = no_prior.decode(text_embed, enc, mask, steps=2, sampler="ddpm", generator=no_prior.generator(0))
    assert torch.equal(out, again)


def test_variations_differ_per_variation(pipe, small):
    images = _images(2, seed=0)
    assert _in_range(pipe.variations(images, n=2, seed=0), 4, 32)
    for invert in (True, False):
        out = small.variations(images, n=3, seed=0, invert=invert)
        assert _in_range(out, 6, 8)
        assert not torch.equal(out[0], out[1]) and not torch.equal(out[3], out[4])
        assert torch.equal(out, small.variations(images, n=3, seed=0, invert=invert))
    # from the inverted latent with eta 0, DDIM is deterministic: every "variation" is the same
    same = small.variations(images, n=2, seed=0, eta=0.0)
    torch.testing.assert_close(same[0], same[1], atol=1e-5, rtol=1e-5)


def test_interpolation_shares_noise_across_frames(pipe, small):
    a, b = _images(1, seed=0)[0], _images(1, seed=1)
    assert _in_range(pipe.interpolate(a, b, 3, seed=0), 3, 32)
    frames = small.interpolate(a, b, 4, seed=0)
    assert _in_range(frames, 4, 8)
    # frames and sampling steps are separate options
    assert torch.equal(small.interpolate(a, b, frames=4, seed=0, steps=2), frames)
    assert not torch.equal(small.interpolate(a, b, frames=4, seed=0, steps=1), frames)
    assert not torch.allclose(frames[0], frames[-1])
    # one embedding and one noise for every frame: interpolating an image with itself is constant
    still = small.interpolate(a, a, 3, seed=0)
    torch.testing.assert_close(still[1:], still[:1].expand(2, -1, -1, -1), atol=1e-5, rtol=1e-5)
    # frame 0 is image a whatever the other end
    torch.testing.assert_close(small.interpolate(a, _images(1, seed=2), 2, seed=0)[0], frames[0], atol=1e-5, rtol=1e-5)


def test_text_diff_amounts(pipe, small):
    image = _images(1, seed=0)
    texts = ("a photo of a cat", "an anime drawing of a cat")
    assert _in_range(pipe.text_diff(image, *texts, [0.25, 0.5], seed=0), 2, 32)
    out = small.text_diff(image, *texts, [0.0, 0.25, 0.5], seed=0)
    assert _in_range(out, 3, 8)
    assert not torch.allclose(out[0], out[2])
    # amount 0 is the image's own embedding from the image's inverted latent: the edit text is irrelevant
    other = small.text_diff(image, "a dog", "a red bus", [0.0], seed=1)
    torch.testing.assert_close(other[0], out[0], atol=1e-3, rtol=1e-3)  # batch 1 vs 3: float rounding
    # without inversion, amount 0 is decoded from the same random noise as interpolation frame 0
    random_start = small.text_diff(image, *texts, [0.0, 0.5], seed=0, invert=False)
    torch.testing.assert_close(
        random_start[0], small.interpolate(image, _images(1, seed=5), 2, seed=0)[0], atol=1e-5, rtol=1e-5
    )


def test_stages_must_chain():
    decoder = Decoder(DecoderConfig(image_size=8, image_embed_dim=D, text_width=W, max_text_len=L, context_dim=16, unet=UNetConfig(**UNET, attention_resolutions=())))
    wrong = Upsampler(UpsamplerConfig(lowres_size=16, image_size=32, unet=UNetConfig(**UNET, attention_resolutions=())))
    with pytest.raises(ValueError, match="lowres_size"):
        UnCLIPPipeline(StubClip(), None, decoder, [wrong])


def test_with_the_real_tiny_clip():
    from models.clip import load_clip

    clip = load_clip("unclip-tiny")
    decoder = Decoder(
        DecoderConfig(
            image_size=8, image_embed_dim=clip.embed_dim, text_width=clip.text_width, max_text_len=clip.context_length,
            context_dim=16, unet=UNetConfig(**UNET, attention_resolutions=(4,)), diffusion=FAST,
        )
    )  # fmt: skip
    pipe = UnCLIPPipeline(clip, None, _randomise(decoder, 0))
    out = pipe.text_to_image(["a red square on white"], seed=0)
    assert _in_range(out, 1, 8)
    assert _in_range(pipe.variations(_images(1, seed=0, size=32), n=2, seed=0), 2, 8)
