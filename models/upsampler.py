"""The upsamplers (low-res -> high-res image), unCLIP sec. 2.1 and appendix C.

UNets conditioned only on the low-res image, resized to the output size and concatenated as
extra input channels; in training the low-res image is made from the target by downsampling
and a corruption (`models/degradations.py`) so that the upsampler learns to repair the
previous stage's artefacts. No caption, no guidance. Karlo's 64 -> 256 stage adds a second
UNet for the final reverse step (`last_step_unet`).
"""

from __future__ import annotations

from typing import Literal, Optional

import torch
import torch.nn.functional as F
from pydantic import Field
from torch import Tensor, nn

from models.config import NonNegativeFloat, PositiveInt, config_dataclass
from models.degradations import BSRConfig, bsr_degrade, random_gaussian_blur
from models.diffusion import DiffusionConfig, GaussianDiffusion
from models.image_stage import check_divisible, check_images, eval_mode, image_diffusion, out_channels, sample_kwargs
from models.noise_augmentation import NoiseAugConfig, NoiseAugmentation
from models.unet import UNet, UNetConfig


def _upsampler_unet() -> UNetConfig:
    return UNetConfig(attention_resolutions=())  # unCLIP appendix C: "Neither upsampler uses attention"


@config_dataclass
class UpsamplerConfig:
    lowres_size: PositiveInt = 64
    image_size: PositiveInt = 256
    channels: PositiveInt = 3
    # Paper: Gaussian blur for the first upsampler, BSR degradation for the second.
    degradation: Literal["gaussian_blur", "bsr"] = "gaussian_blur"
    blur_sigma: tuple[NonNegativeFloat, NonNegativeFloat] = (0.4, 0.6)
    blur_kernel_size: Optional[PositiveInt] = None  # odd; None: 3 sigma either side (paper: 3)
    unet: UNetConfig = Field(default_factory=_upsampler_unet)
    diffusion: DiffusionConfig = Field(default_factory=image_diffusion)
    bsr: BSRConfig = Field(default_factory=BSRConfig)  # used when degradation is "bsr"
    # how the low-res image is resized up to image_size before it is concatenated
    # (bicubic_antialias: PyTorch's antialiased bicubic, PIL's kernel, which Karlo resizes with)
    lowres_upsample_mode: Literal["bilinear", "bicubic", "bicubic_antialias"] = "bicubic"
    # Paper (appendix C): the upsamplers train on random crops of 1/4 of the image side and
    # sample at full size (they have no attention, so they are translation-equivariant).
    # None: train on whole images.
    train_crop_size: Optional[PositiveInt] = None
    # clamp the resized low-res image to [-1, 1] (bicubic overshoots); Karlo does not
    lowres_clamp: bool = True
    # Karlo's super-resolution: a second UNet of the same shape runs the final reverse step
    # (fine-tuned with GAN and perceptual losses); the diffusion loss trains only `unet`
    last_step_unet: bool = False
    # noise conditioning augmentation of the low-res input (CDM/Imagen; models/noise_augmentation.py)
    noise_aug: NoiseAugConfig = Field(default_factory=NoiseAugConfig)

    def __post_init__(self) -> None:
        if self.image_size <= self.lowres_size:
            raise ValueError(
                f"image_size ({self.image_size}) must be larger than lowres_size ({self.lowres_size}): "
                "an upsampler's output must be larger than its input"
            )
        check_divisible(self.image_size, self.unet, "image_size")
        if self.blur_sigma[0] > self.blur_sigma[1]:
            raise ValueError(f"blur_sigma: low ({self.blur_sigma[0]}) must be <= high ({self.blur_sigma[1]})")
        if self.blur_kernel_size is not None and self.blur_kernel_size % 2 == 0:
            raise ValueError(f"blur_kernel_size must be odd, got {self.blur_kernel_size}")
        if self.train_crop_size is not None:
            scale = self.image_size // self.lowres_size
            if self.image_size % self.lowres_size or self.train_crop_size % scale or self.train_crop_size > self.image_size:
                raise ValueError(
                    f"train_crop_size ({self.train_crop_size}) must be <= image_size and a multiple of "
                    "image_size / lowres_size, which must be a whole number"
                )
            check_divisible(self.train_crop_size, self.unet, "train_crop_size")


class Upsampler(nn.Module):
    """Low-res image `[batch, channels, lowres_size, lowres_size]` -> `[batch, channels,
    image_size, image_size]`, a diffusion model conditioned on the resized low-res image."""

    def __init__(self, cfg: UpsamplerConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.noise_aug = NoiseAugmentation(cfg.noise_aug, cfg.unet.base_channels) if cfg.noise_aug.enabled else None
        cond_dim = self.noise_aug.cond_dim if self.noise_aug is not None else None
        self.unet = UNet(
            cfg.unet, cfg.channels, out_channels(cfg), extra_in_channels=cfg.channels, image_size=cfg.image_size,
            cond_dim=cond_dim,
        )
        self.last_step_unet = None
        if cfg.last_step_unet:
            self.last_step_unet = UNet(
                cfg.unet, cfg.channels, out_channels(cfg), extra_in_channels=cfg.channels, image_size=cfg.image_size,
                cond_dim=cond_dim,
            )
            # trained by Karlo with adversarial and perceptual losses this stage does not have
            self.last_step_unet.requires_grad_(False)
        self.diffusion = GaussianDiffusion.from_config(cfg.diffusion)

    @property
    def scale(self) -> float:
        return self.cfg.image_size / self.cfg.lowres_size

    def upsample_lowres(self, lowres: Tensor, size: Optional[int] = None) -> Tensor:
        """Resize `lowres` to `size` (default `image_size`) with `cfg.lowres_upsample_mode`,
        clamped to [-1, 1] when `cfg.lowres_clamp`."""
        size = size or self.cfg.image_size
        mode = self.cfg.lowres_upsample_mode
        antialias = mode == "bicubic_antialias"
        out = F.interpolate(
            lowres, size=(size, size), mode="bicubic" if antialias else mode, align_corners=False, antialias=antialias
        )
        return out.clamp(-1, 1) if self.cfg.lowres_clamp else out

    def degrade(self, lowres: Tensor, generator: Optional[torch.Generator] = None) -> Tensor:
        """The training corruption of the low-res conditioning image, `cfg.degradation`."""
        if self.cfg.degradation == "bsr":
            return bsr_degrade(lowres, self.cfg.bsr, generator)
        return random_gaussian_blur(lowres, self.cfg.blur_sigma, generator, self.cfg.blur_kernel_size)

    def make_lowres(self, images: Tensor, generator: Optional[torch.Generator] = None) -> Tensor:
        """Training input: `images` downsampled by image_size / lowres_size (antialiased) and degraded."""
        side = round(images.shape[-1] / self.scale)
        small = F.interpolate(images, size=(side, side), mode="bicubic", align_corners=False, antialias=True)
        return self.degrade(small.clamp(-1, 1), generator)

    def _random_crop(self, images: Tensor, generator: Optional[torch.Generator]) -> Tensor:
        crop = self.cfg.train_crop_size
        if crop is None or crop == images.shape[-1]:
            return images
        # offsets on the low-res grid, so the crop's low-res image is an exact downsampling
        step = self.cfg.image_size // self.cfg.lowres_size
        cells = (images.shape[-1] - crop) // step + 1
        gen_device = generator.device if generator is not None else images.device
        offsets = torch.randint(0, cells, (images.shape[0], 2), generator=generator, device=gen_device) * step
        return torch.stack([img[:, y : y + crop, x : x + crop] for img, (y, x) in zip(images, offsets.tolist())])

    def forward(
        self, x_t: Tensor, t: Tensor, *, lowres_cond: Tensor, noise_level: Optional[Tensor] = None,
        null_cond: Optional[Tensor] = None, last_step: bool = False,
    ) -> Tensor:
        """Predict the objective for `x_t` `[batch, channels, H, W]`; `lowres_cond` is the low-res
        image already resized to `[batch, channels, H, W]` (and noised by `noise_level` `[batch]`
        when the upsampler is trained with noise augmentation, which needs the level).
        `last_step` runs `last_step_unet` (where the stage has one), as sampling does for the
        final reverse step."""
        if null_cond is not None and bool(null_cond.any()):
            raise ValueError(
                "Upsampler: null_cond rows requested, but upsamplers are trained without conditioning "
                "dropout; sample them with guidance_scale 1"
            )
        if (noise_level is None) != (self.noise_aug is None):
            raise ValueError("Upsampler: noise_level must be given iff the upsampler has noise_aug (max_level > 0)")
        cond = self.noise_aug(noise_level) if self.noise_aug is not None else None
        unet = self.last_step_unet if last_step and self.last_step_unet is not None else self.unet
        return unet(x_t, t, extra=lowres_cond, cond=cond)

    def loss(
        self,
        images: Tensor,
        generator: Optional[torch.Generator] = None,
        *,
        t: Optional[Tensor] = None,
        noise: Optional[Tensor] = None,
    ) -> Tensor:
        """Diffusion loss (scalar) on high-res `images` `[batch, channels, image_size, image_size]`
        in [-1, 1] (random crops of `train_crop_size` when set); the low-res input is made here.
        `t` `[batch]` and `noise` (shaped like the, possibly cropped, images) are drawn unless given."""
        check_images(images, self.cfg.channels, self.cfg.image_size, "Upsampler.loss: images")
        images = self._random_crop(images, generator)
        cond = {"lowres_cond": self.upsample_lowres(self.make_lowres(images, generator), images.shape[-1])}
        if self.noise_aug is not None:
            level = self.noise_aug.draw_levels(images.shape[0], images.device, generator)
            cond = {"lowres_cond": self.noise_aug.augment(cond["lowres_cond"], level, generator), "noise_level": level}
        return self.diffusion.loss(self, images, cond=cond, t=t, noise=noise, generator=generator)

    @torch.no_grad()
    def sample(
        self,
        lowres: Tensor,
        *,
        steps: Optional[int] = None,
        sampler: Optional[str] = None,
        eta: Optional[float] = None,
        noise: Optional[Tensor] = None,
        generator: Optional[torch.Generator] = None,
        noise_level: Optional[float] = None,
        lowres_noise: Optional[Tensor] = None,
    ) -> Tensor:
        """`lowres` `[batch, channels, lowres_size, lowres_size]` in [-1, 1] -> `[batch, channels,
        image_size, image_size]` in [-1, 1]; unset options come from `cfg.diffusion`. With noise
        augmentation the low-res input is noised by `noise_level` (default
        `cfg.noise_aug.sample_level`; `lowres_noise`, shaped `[batch, channels, image_size,
        image_size]`, fixes that noise) and the model told so; without it only level 0 exists."""
        check_images(lowres, self.cfg.channels, self.cfg.lowres_size, "Upsampler.sample: lowres")
        size = self.cfg.image_size
        cond = {"lowres_cond": self.upsample_lowres(lowres.clamp(-1, 1))}
        if self.noise_aug is not None:
            level = self.noise_aug.levels(lowres.shape[0], lowres.device, noise_level)
            lowres_cond = self.noise_aug.augment(cond["lowres_cond"], level, generator, lowres_noise)
            cond = {"lowres_cond": lowres_cond, "noise_level": level}
        elif noise_level:
            raise ValueError(
                f"noise level {noise_level}: this upsampler was trained without noise augmentation "
                "(noise_aug.max_level 0), so only level 0 applies"
            )
        kwargs = sample_kwargs(self.cfg.diffusion, steps, sampler, eta, 1.0)
        final_t = self.diffusion.respaced_timesteps(kwargs["steps"])[-1]

        def denoise(x_t: Tensor, t: Tensor, **c: Tensor) -> Tensor:
            # the respaced chain's last step, on every row (they share one timestep)
            return self(x_t, t, last_step=int(t[0]) == final_t, **c)

        with eval_mode(self):
            out = self.diffusion.sample(
                denoise,
                (lowres.shape[0], self.cfg.channels, size, size),
                cond=cond,
                noise=noise,
                generator=generator,
                device=lowres.device,
                **kwargs,
            )
        return out.clamp(-1, 1)
