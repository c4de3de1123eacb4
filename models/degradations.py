"""Corruptions of the upsamplers' low-res conditioning images, applied only in training.

unCLIP (Ramesh et al. 2022, sec. 2) corrupts the conditioning image "slightly" so that an
upsampler learns to fix the artefacts of the stage below it: Gaussian blur for the first
upsampler, the BSR degradation of Zhang et al. 2021 ("Designing a Practical Degradation Model
for Deep Blind Image Super-Resolution") for the second. Our BSR is a reduced version of theirs:
anisotropic but axis-aligned Gaussian blur (no rotated or generalised kernels), one random
down-and-up resize, white Gaussian noise (no camera-sensor noise), and JPEG compression in pure
torch (YCbCr, 4:2:0 chroma subsampling, 8x8 DCT quantised with the IJG tables scaled by quality,
no entropy coding since it is lossless). Blur, resize and noise come in random order; JPEG is
last, as in BSR.

Images are `[batch, channels, h, w]` in [-1, 1]; every function returns the same shape in
[-1, 1]. Random draws come from `generator` when given (so results are reproducible).
"""

from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import Tensor

from models.config import NonNegativeFloat, PositiveFloat, config_dataclass


@config_dataclass
class BSRConfig:
    """Ranges (low, high) that each image's degradation parameters are drawn from uniformly."""

    blur_sigma: tuple[NonNegativeFloat, NonNegativeFloat] = (0.2, 2.0)  # pixels, drawn per axis
    resize_scale: tuple[PositiveFloat, PositiveFloat] = (0.5, 1.0)  # downsample factor, then back
    noise_std: tuple[NonNegativeFloat, NonNegativeFloat] = (0.0, 0.1)  # in units of the [-1, 1] range
    jpeg_quality: tuple[int, int] = (30, 95)

    def __post_init__(self) -> None:
        for key in ("blur_sigma", "resize_scale", "noise_std", "jpeg_quality"):
            low, high = getattr(self, key)
            if low > high:
                raise ValueError(f"bsr.{key}: low ({low}) must be <= high ({high})")
        if self.resize_scale[1] > 1:
            raise ValueError(f"bsr.resize_scale: a downsampling factor must be <= 1, got {self.resize_scale[1]}")
        if not 1 <= self.jpeg_quality[0] <= self.jpeg_quality[1] <= 100:
            raise ValueError(f"bsr.jpeg_quality must lie in [1, 100], got {self.jpeg_quality}")


def _uniform(low: float, high: float, batch: int, like: Tensor, generator: Optional[torch.Generator]) -> Tensor:
    device = generator.device if generator is not None else like.device
    u = torch.rand(batch, generator=generator, device=device, dtype=torch.float32).to(like.device)
    return low + (high - low) * u


def _randn_like(x: Tensor, generator: Optional[torch.Generator]) -> Tensor:
    device = generator.device if generator is not None else x.device
    return torch.randn(x.shape, generator=generator, device=device, dtype=torch.float32).to(x.device, x.dtype)


# ------------------------------------------------------------------------------- blur
def _gaussian_kernels(sigma: Tensor, radius: int) -> Tensor:
    """Normalised 1-D Gaussians `[batch, 2 * radius + 1]`; sigma 0 gives the identity."""
    x = torch.arange(-radius, radius + 1, device=sigma.device, dtype=torch.float32)
    kernel = torch.exp(-(x**2) / (2 * sigma.float().clamp(min=1e-4)[:, None] ** 2))
    return kernel / kernel.sum(dim=1, keepdim=True)


def gaussian_blur(
    images: Tensor, sigma: Tensor, sigma_y: Optional[Tensor] = None, kernel_size: Optional[int] = None
) -> Tensor:
    """Blur each image with its own Gaussian: `sigma` (`[batch]`, pixels) along x, `sigma_y`
    (default: `sigma`) along y, over an odd `kernel_size` window (default: 3 sigma either side,
    which holds 99.7% of the mass). Reflect padding keeps the border bright."""
    batch, channels, height, width = images.shape
    sigma_y = sigma if sigma_y is None else sigma_y
    if kernel_size is not None and kernel_size % 2 == 0:
        raise ValueError(f"gaussian_blur: kernel_size must be odd, got {kernel_size}")
    radius = kernel_size // 2 if kernel_size else int(math.ceil(3 * float(torch.maximum(sigma, sigma_y).max())))
    # reflect padding needs the radius below the side length
    radius = max(0, min(radius, height - 1, width - 1))
    if radius == 0:
        return images
    kx = _gaussian_kernels(sigma, radius).to(images.dtype)
    ky = _gaussian_kernels(sigma_y, radius).to(images.dtype)
    # one grouped conv over [1, batch*channels, h, w] blurs every image with its own kernel
    flat = rearrange(images, "b c h w -> 1 (b c) h w")
    weight_x = rearrange(kx.repeat_interleave(channels, 0), "n k -> n 1 1 k")
    weight_y = rearrange(ky.repeat_interleave(channels, 0), "n k -> n 1 k 1")
    flat = F.conv2d(F.pad(flat, (radius, radius, 0, 0), mode="reflect"), weight_x, groups=batch * channels)
    flat = F.conv2d(F.pad(flat, (0, 0, radius, radius), mode="reflect"), weight_y, groups=batch * channels)
    return rearrange(flat, "1 (b c) h w -> b c h w", b=batch)


def random_gaussian_blur(
    images: Tensor,
    sigma_range: tuple[float, float],
    generator: Optional[torch.Generator] = None,
    kernel_size: Optional[int] = None,
) -> Tensor:
    """The first upsampler's corruption: isotropic blur with sigma ~ U(sigma_range) per image
    (unCLIP appendix C, after Saharia et al. 2021 (SR3): kernel size 3, sigma 0.6)."""
    sigma = _uniform(*sigma_range, images.shape[0], images, generator)
    return gaussian_blur(images, sigma, kernel_size=kernel_size).clamp(-1, 1)


# ------------------------------------------------------------------------------- JPEG
# IJG (libjpeg) base quantisation tables, quality 50 (JPEG standard, Annex K).
_LUMA_TABLE = [
    [16, 11, 10, 16, 24, 40, 51, 61], [12, 12, 14, 19, 26, 58, 60, 55],
    [14, 13, 16, 24, 40, 57, 69, 56], [14, 17, 22, 29, 51, 87, 80, 62],
    [18, 22, 37, 56, 68, 109, 103, 77], [24, 35, 55, 64, 81, 104, 113, 92],
    [49, 64, 78, 87, 103, 121, 120, 101], [72, 92, 95, 98, 112, 100, 103, 99],
]  # fmt: skip
_CHROMA_TABLE = [
    [17, 18, 24, 47, 99, 99, 99, 99], [18, 21, 26, 66, 99, 99, 99, 99],
    [24, 26, 56, 99, 99, 99, 99, 99], [47, 66, 99, 99, 99, 99, 99, 99],
] + [[99] * 8] * 4  # fmt: skip


def _dct_matrix(device: torch.device) -> Tensor:
    """Orthonormal DCT-II basis `[8, 8]`: coefficients = D @ block @ D.T."""
    n = torch.arange(8, device=device, dtype=torch.float32)
    d = torch.cos((2 * n[None, :] + 1) * n[:, None] * math.pi / 16) * math.sqrt(2 / 8)
    d[0] /= math.sqrt(2)
    return d


def _quant_tables(quality: Tensor, table: list[list[int]]) -> Tensor:
    """IJG quality scaling: `[batch, 8, 8]` quantisation steps for qualities `[batch]` in 1..100."""
    q = quality.float().clamp(1, 100)
    scale = torch.where(q < 50, 5000 / q, 200 - 2 * q)
    base = torch.tensor(table, dtype=torch.float32, device=quality.device)
    return torch.floor((base * scale[:, None, None] + 50) / 100).clamp(1, 255)


def _quantise_blocks(plane: Tensor, steps: Tensor, dct: Tensor) -> Tensor:
    """DCT, quantise and invert `plane` `[batch, h, w]` (h, w multiples of 8; values 0..255)."""
    blocks = rearrange(plane - 128, "b (h i) (w j) -> b h w i j", i=8, j=8)
    coeffs = dct @ blocks @ dct.T
    steps = rearrange(steps, "b i j -> b 1 1 i j")
    coeffs = torch.round(coeffs / steps) * steps
    return rearrange(dct.T @ coeffs @ dct, "b h w i j -> b (h i) (w j)") + 128


def jpeg_compress(images: Tensor, quality: Tensor) -> Tensor:
    """JPEG round trip of each image at its quality (`[batch]`, 1..100); pure torch, deterministic.

    RGB images go through YCbCr with 4:2:0 chroma; other channel counts are coded channel by
    channel as luminance."""
    batch, channels, height, width = images.shape
    dct = _dct_matrix(images.device)
    x = (images.float().clamp(-1, 1) + 1) * 127.5
    # pad to whole 16x16 macroblocks (replicate, as encoders do) and crop afterwards
    pad_h, pad_w = (-height) % 16, (-width) % 16
    x = F.pad(x, (0, pad_w, 0, pad_h), mode="replicate")
    luma_steps = _quant_tables(quality, _LUMA_TABLE)
    if channels != 3:
        planes = [_quantise_blocks(x[:, c], luma_steps, dct) for c in range(channels)]
        out = torch.stack(planes, dim=1)
    else:
        r, g, b = x.unbind(1)
        y = 0.299 * r + 0.587 * g + 0.114 * b
        cb = 128 - 0.168736 * r - 0.331264 * g + 0.5 * b
        cr = 128 + 0.5 * r - 0.418688 * g - 0.081312 * b
        chroma_steps = _quant_tables(quality, _CHROMA_TABLE)
        y = _quantise_blocks(y, luma_steps, dct)
        chroma = F.avg_pool2d(torch.stack([cb, cr], dim=1), 2)
        chroma = torch.stack([_quantise_blocks(p, chroma_steps, dct) for p in chroma.unbind(1)], dim=1)
        cb, cr = F.interpolate(chroma, scale_factor=2.0, mode="nearest").unbind(1)
        out = torch.stack(
            [y + 1.402 * (cr - 128), y - 0.344136 * (cb - 128) - 0.714136 * (cr - 128), y + 1.772 * (cb - 128)],
            dim=1,
        )
    out = torch.round(out.clamp(0, 255))[:, :, :height, :width]  # 8-bit pixels
    return (out / 127.5 - 1).to(images.dtype)


# ------------------------------------------------------------------------------- BSR
def random_resize(images: Tensor, scale: Tensor, generator: Optional[torch.Generator] = None) -> Tensor:
    """Downsample each image by its `scale` (`[batch]`, <= 1) and resize back; the interpolation
    (bilinear, bicubic or area) is drawn once per call."""
    height, width = images.shape[-2:]
    modes = ("bilinear", "bicubic", "area")
    pick = int(_uniform(0, len(modes), 1, images, generator).floor().clamp(max=len(modes) - 1))
    mode = modes[pick]
    out = []
    for image, s in zip(images, scale.tolist()):
        size = (max(1, round(height * s)), max(1, round(width * s)))
        small = F.interpolate(image[None], size=size, mode=mode, **({} if mode == "area" else {"align_corners": False}))
        back = "bicubic" if mode == "area" else mode
        out.append(F.interpolate(small, size=(height, width), mode=back, align_corners=False))
    return torch.cat(out)


def bsr_degrade(images: Tensor, cfg: BSRConfig, generator: Optional[torch.Generator] = None) -> Tensor:
    """The second upsampler's corruption: blur, resize and noise in random order, then JPEG."""
    batch = images.shape[0]

    def blur(x: Tensor) -> Tensor:
        sx = _uniform(*cfg.blur_sigma, batch, x, generator)
        sy = _uniform(*cfg.blur_sigma, batch, x, generator)
        return gaussian_blur(x, sx, sy)

    def resize(x: Tensor) -> Tensor:
        return random_resize(x, _uniform(*cfg.resize_scale, batch, x, generator), generator)

    def noise(x: Tensor) -> Tensor:
        std = _uniform(*cfg.noise_std, batch, x, generator).to(x.dtype)
        return x + std[:, None, None, None] * _randn_like(x, generator)

    ops = (blur, resize, noise)
    device = generator.device if generator is not None else torch.device("cpu")
    order = torch.randperm(len(ops), generator=generator, device=device).tolist()
    x = images
    for i in order:
        x = ops[i](x).clamp(-1, 1)
    quality = _uniform(*cfg.jpeg_quality, batch, x, generator).round()
    return jpeg_compress(x, quality)
