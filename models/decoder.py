"""The decoder (CLIP image embedding -> 64px image) and the upsamplers (low-res -> high-res).

Decoder (unCLIP sec. 2.1): GLIDE's text-conditional UNet, with the CLIP image embedding
projected and added to the timestep embedding and projected into `num_image_tokens` extra
context tokens that sit in front of the caption's text encodings. Classifier-free guidance is
learned by replacing the image embedding with a learned null embedding `image_embed_drop` of
the time and dropping the caption `text_drop` of the time (a learned null text token then
stands in for it).

Upsamplers (unCLIP sec. 2.1, appendix C): UNets conditioned only on the low-res image, resized
to the output size and concatenated as extra input channels; in training the low-res image is
made from the target by downsampling and a corruption (`models/degradations.py`) so that the
upsampler learns to repair the previous stage's artefacts. No caption, no guidance.
"""

from __future__ import annotations

import math
from contextlib import contextmanager
from typing import Iterator, Literal, Optional

import torch
import torch.nn.functional as F
from pydantic import Field
from torch import Tensor, nn

from models.config import NonNegativeFloat, PositiveInt, Probability, config_dataclass
from models.degradations import BSRConfig, bsr_degrade, random_gaussian_blur
from models.diffusion import DiffusionConfig, GaussianDiffusion
from models.noise_augmentation import NoiseAugConfig, NoiseAugmentation
from models.unet import UNet, UNetConfig


def _image_diffusion() -> DiffusionConfig:
    return DiffusionConfig(timesteps=1000, schedule="cosine", objective="eps", clip_x0="static")


def _check_divisible(image_size: int, unet: UNetConfig, key: str) -> None:
    factor = 2 ** (len(unet.channel_mults) - 1)
    if image_size % factor:
        raise ValueError(
            f"{key} ({image_size}) must be divisible by 2**(len(unet.channel_mults)-1) = {factor}"
        )


@config_dataclass
class DecoderConfig:
    image_size: PositiveInt = 64
    channels: PositiveInt = 3
    image_embed_dim: PositiveInt = 512
    text_width: PositiveInt = 512
    max_text_len: PositiveInt = 77
    use_text_encodings: bool = True
    num_image_tokens: PositiveInt = 4  # the image embedding also becomes this many context tokens
    image_embed_drop: Probability = 0.1
    text_drop: Probability = 0.5
    unet: UNetConfig = Field(default_factory=UNetConfig)
    diffusion: DiffusionConfig = Field(default_factory=_image_diffusion)
    # width of the context tokens (image tokens and projected text encodings) that every
    # attention layer reads; GLIDE's text transformer is 2048 wide
    context_dim: PositiveInt = 512

    def __post_init__(self) -> None:
        _check_divisible(self.image_size, self.unet, "image_size")


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
    diffusion: DiffusionConfig = Field(default_factory=_image_diffusion)
    bsr: BSRConfig = Field(default_factory=BSRConfig)  # used when degradation is "bsr"
    # how the low-res image is resized up to image_size before it is concatenated
    lowres_upsample_mode: Literal["bilinear", "bicubic"] = "bicubic"
    # Paper (appendix C): the upsamplers train on random crops of 1/4 of the image side and
    # sample at full size (they have no attention, so they are translation-equivariant).
    # None: train on whole images.
    train_crop_size: Optional[PositiveInt] = None
    # noise conditioning augmentation of the low-res input (CDM/Imagen; models/noise_augmentation.py)
    noise_aug: NoiseAugConfig = Field(default_factory=NoiseAugConfig)

    def __post_init__(self) -> None:
        if self.image_size <= self.lowres_size:
            raise ValueError(
                f"image_size ({self.image_size}) must be larger than lowres_size ({self.lowres_size}): "
                "an upsampler's output must be larger than its input"
            )
        _check_divisible(self.image_size, self.unet, "image_size")
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
            _check_divisible(self.train_crop_size, self.unet, "train_crop_size")


def _check_images(images: Tensor, channels: int, size: Optional[int], what: str) -> None:
    if images.ndim != 4 or images.shape[1] != channels or (size is not None and images.shape[-2:] != (size, size)):
        side = f"{size}, {size}" if size is not None else "H, W"
        raise ValueError(f"{what} must be [batch, {channels}, {side}], got {tuple(images.shape)}")


@contextmanager
def _eval_mode(module: nn.Module) -> Iterator[None]:
    """Sampling never uses dropout or CFG dropout, whatever mode the trainer left us in."""
    was_training = module.training
    module.eval()
    try:
        yield
    finally:
        module.train(was_training)


def _sample_kwargs(d: DiffusionConfig, steps, sampler, eta, guidance_scale) -> dict:
    return dict(
        steps=d.sample_steps if steps is None else steps,
        sampler=d.sampler if sampler is None else sampler,
        eta=d.eta if eta is None else eta,
        guidance_scale=d.guidance_scale if guidance_scale is None else guidance_scale,
        clip_x0=d.clip_x0,
        dynamic_threshold_percentile=d.dynamic_threshold_percentile,
    )


class Decoder(nn.Module):
    """CLIP image embedding `[batch, image_embed_dim]` (+ caption encodings) -> image."""

    def __init__(self, cfg: DecoderConfig) -> None:
        super().__init__()
        self.cfg = cfg
        dim, width = cfg.image_embed_dim, cfg.context_dim
        self.unet = UNet(
            cfg.unet, cfg.channels, cfg.channels, cond_dim=dim, context_dim=width, image_size=cfg.image_size
        )
        self.image_to_tokens = nn.Linear(dim, cfg.num_image_tokens * width)
        self.text_proj = nn.Linear(cfg.text_width, width) if cfg.use_text_encodings else None
        self.context_norm = nn.LayerNorm(width)
        # CLIP embeddings are unit-norm; the null embedding starts on the same sphere
        self.null_image_embed = nn.Parameter(F.normalize(torch.randn(dim), dim=0))
        self.null_text_token = nn.Parameter(torch.randn(width) * 0.02)
        self.diffusion = GaussianDiffusion.from_config(cfg.diffusion)

    def draw_cond_drop(
        self, batch: int, device: torch.device | str = "cpu", generator: Optional[torch.Generator] = None
    ) -> dict[str, Tensor]:
        """CFG dropout masks, BoolTensors `[batch]` (True = dropped): `image_embed` with
        probability `cfg.image_embed_drop`, `text` with `cfg.text_drop`, independently."""
        gen_device = generator.device if generator is not None else device
        u = torch.rand(2, batch, generator=generator, device=gen_device).to(device)
        return {"image_embed": u[0] < self.cfg.image_embed_drop, "text": u[1] < self.cfg.text_drop}

    def _check_conditions(self, batch: int, image_embed: Tensor, text_encodings, text_mask) -> None:
        if image_embed.shape != (batch, self.cfg.image_embed_dim):
            raise ValueError(
                f"Decoder: image_embed must be [batch, image_embed_dim] = [{batch}, {self.cfg.image_embed_dim}], "
                f"got {tuple(image_embed.shape)}"
            )
        if text_encodings is None or not self.cfg.use_text_encodings:
            return
        if text_encodings.ndim != 3 or text_encodings.shape[0] != batch or text_encodings.shape[2] != self.cfg.text_width:
            raise ValueError(
                f"Decoder: text_encodings must be [{batch}, tokens, text_width={self.cfg.text_width}], "
                f"got {tuple(text_encodings.shape)}"
            )
        if text_encodings.shape[1] > self.cfg.max_text_len:
            raise ValueError(
                f"Decoder: {text_encodings.shape[1]} text tokens exceed max_text_len ({self.cfg.max_text_len})"
            )
        if text_mask is not None and text_mask.shape != text_encodings.shape[:2]:
            raise ValueError(
                f"Decoder: text_mask must be [batch, tokens] = {tuple(text_encodings.shape[:2])}, got {tuple(text_mask.shape)}"
            )

    def _context(self, image_embed: Tensor, text_encodings, text_mask, drop_text: Tensor) -> tuple[Tensor, Tensor]:
        """Context tokens `[batch, image_tokens + 1 + text_tokens, context_dim]` and their mask:
        the image tokens, the null text token (real only where the text is dropped or absent),
        then the projected text encodings (real where `text_mask` and not dropped)."""
        batch, width = image_embed.shape[0], self.cfg.context_dim
        image_tokens = self.image_to_tokens(image_embed).reshape(batch, self.cfg.num_image_tokens, width)
        null_token = self.null_text_token.to(image_tokens.dtype).expand(batch, 1, width)
        parts, masks = [image_tokens, null_token], [image_tokens.new_ones(batch, self.cfg.num_image_tokens, dtype=torch.bool)]
        if text_encodings is not None and self.text_proj is not None:
            real = torch.ones(text_encodings.shape[:2], dtype=torch.bool, device=image_embed.device)
            if text_mask is not None:
                real = text_mask.to(device=image_embed.device, dtype=torch.bool)
            real = real & ~drop_text[:, None]
            masks += [~real.any(dim=1, keepdim=True), real]
            parts.append(self.text_proj(text_encodings.to(image_tokens.dtype)))
        else:
            masks.append(torch.ones(batch, 1, dtype=torch.bool, device=image_embed.device))
        return self.context_norm(torch.cat(parts, dim=1)), torch.cat(masks, dim=1)

    def forward(
        self,
        x_t: Tensor,
        t: Tensor,
        *,
        image_embed: Tensor,
        text_encodings: Optional[Tensor] = None,
        text_mask: Optional[Tensor] = None,
        null_cond: Optional[Tensor] = None,
        cond_drop: Optional[dict[str, Tensor]] = None,
    ) -> Tensor:
        """Predict the objective for `x_t` `[batch, channels, size, size]` at timesteps `t` `[batch]`.

        `image_embed`: `[batch, image_embed_dim]`; `text_encodings`: `[batch, tokens, text_width]`
        with `text_mask` `[batch, tokens]` (True = real token). `null_cond` `[batch]`: rows that
        use the learned null conditioning (guidance's unconditional pass). `cond_drop`: explicit
        per-condition dropout masks (see `draw_cond_drop`); drawn here when neither is given
        and the module is training."""
        batch = x_t.shape[0]
        self._check_conditions(batch, image_embed, text_encodings, text_mask)
        if null_cond is not None:
            null_cond = null_cond.to(device=x_t.device, dtype=torch.bool)
            cond_drop = {"image_embed": null_cond, "text": null_cond}
        elif cond_drop is None and self.training:
            cond_drop = self.draw_cond_drop(batch, x_t.device)
        no_drop = torch.zeros(batch, dtype=torch.bool, device=x_t.device)
        drop_image = (cond_drop or {}).get("image_embed", no_drop).to(x_t.device)
        drop_text = (cond_drop or {}).get("text", no_drop).to(x_t.device)

        dtype = self.image_to_tokens.weight.dtype
        image_embed = torch.where(drop_image[:, None], self.null_image_embed.to(dtype), image_embed.to(dtype))
        # unit-norm CLIP embeddings have entries of size 1/sqrt(D); scale them to unit variance
        image_embed = image_embed * math.sqrt(self.cfg.image_embed_dim)
        context, context_mask = self._context(image_embed, text_encodings, text_mask, drop_text)
        return self.unet(x_t, t, cond=image_embed, context=context, context_mask=context_mask)

    def loss(
        self,
        images: Tensor,
        image_embed: Tensor,
        text_encodings: Optional[Tensor] = None,
        text_mask: Optional[Tensor] = None,
        generator: Optional[torch.Generator] = None,
        *,
        t: Optional[Tensor] = None,
        noise: Optional[Tensor] = None,
    ) -> Tensor:
        """Diffusion loss (scalar) on `images` `[batch, channels, image_size, image_size]` in [-1, 1].
        `t` `[batch]` and `noise` (like `images`) are drawn unless given."""
        _check_images(images, self.cfg.channels, self.cfg.image_size, "Decoder.loss: images")
        cond = {"image_embed": image_embed, "text_encodings": text_encodings, "text_mask": text_mask}
        if self.training:
            cond["cond_drop"] = self.draw_cond_drop(images.shape[0], images.device, generator)
        return self.diffusion.loss(self, images, cond=cond, t=t, noise=noise, generator=generator)

    @torch.no_grad()
    def sample(
        self,
        image_embed: Tensor,
        text_encodings: Optional[Tensor] = None,
        text_mask: Optional[Tensor] = None,
        *,
        guidance_scale: Optional[float] = None,
        steps: Optional[int] = None,
        sampler: Optional[str] = None,
        eta: Optional[float] = None,
        noise: Optional[Tensor] = None,
        generator: Optional[torch.Generator] = None,
    ) -> Tensor:
        """Images `[batch, channels, image_size, image_size]` in [-1, 1] for `image_embed`
        `[batch, image_embed_dim]`; unset options come from `cfg.diffusion`. `noise` fixes x_T."""
        shape = (image_embed.shape[0], self.cfg.channels, self.cfg.image_size, self.cfg.image_size)
        cond = {"image_embed": image_embed}
        if text_encodings is not None:
            cond.update(text_encodings=text_encodings, text_mask=text_mask)
        with _eval_mode(self):
            out = self.diffusion.sample(
                self,
                shape,
                cond=cond,
                noise=noise,
                generator=generator,
                device=image_embed.device,
                **_sample_kwargs(self.cfg.diffusion, steps, sampler, eta, guidance_scale),
            )
        return out.clamp(-1, 1)

    @torch.no_grad()
    def invert(
        self,
        images: Tensor,
        image_embed: Tensor,
        text_encodings: Optional[Tensor] = None,
        text_mask: Optional[Tensor] = None,
        *,
        guidance_scale: Optional[float] = None,
        steps: Optional[int] = None,
    ) -> Tensor:
        """DDIM inversion (Dhariwal & Nichol 2021, appendix F; unCLIP sec. 3): the x_T
        `[batch, channels, image_size, image_size]` from which DDIM with eta 0 over the same
        `steps` decodes approximately `images` (in [-1, 1], at image_size). Unguided unless
        `guidance_scale` is given (not the configured sampling guidance: the unguided DDIM map
        is the one that reconstructs the image). Runs the deterministic DDIM update backwards,
        from t = 0 up to t = T - 1, with each step's prediction made at the level it starts from."""
        _check_images(images, self.cfg.channels, self.cfg.image_size, "Decoder.invert: images")
        opts = _sample_kwargs(self.cfg.diffusion, steps, None, None, 1.0 if guidance_scale is None else guidance_scale)
        cond = {"image_embed": image_embed}
        if text_encodings is not None:
            cond.update(text_encodings=text_encodings, text_mask=text_mask)
        with _eval_mode(self):
            return ddim_invert(
                self.diffusion,
                self,
                images,
                cond=cond,
                steps=opts["steps"],
                guidance_scale=opts["guidance_scale"],
                clip_x0=opts["clip_x0"],
                dynamic_threshold_percentile=opts["dynamic_threshold_percentile"],
            )


def ddim_invert(
    diffusion: GaussianDiffusion,
    model_fn,
    x_start: Tensor,
    *,
    cond: Optional[dict] = None,
    steps: int = 64,
    guidance_scale: float = 1.0,
    clip_x0: str = "none",
    dynamic_threshold_percentile: float = 0.995,
) -> Tensor:
    """Run deterministic DDIM backwards, from `x_start` (level "-1", clean) up to t = T - 1,
    over the same respaced timesteps `diffusion.sample(steps=steps)` uses. Each step predicts
    at the level it starts from (the first at t = 0), so the map is the exact inverse of the
    DDIM update whenever the prediction varies slowly between adjacent levels."""
    levels = sorted(diffusion.respaced_timesteps(steps))
    x = x_start.float()
    for i, level in enumerate(levels):
        at = levels[i - 1] if i > 0 else 0
        t = torch.full((x.shape[0],), at, device=x.device, dtype=torch.long)
        out = diffusion.guided_prediction(model_fn, x, t, cond, guidance_scale)
        x0 = diffusion.clip_start(diffusion.predict_start(x, t, out.float()), clip_x0, dynamic_threshold_percentile)
        eps = diffusion.predict_noise_from_start(x, t, x0)
        a_next = diffusion.alphas_cumprod[level].to(x.device)
        x = a_next.sqrt() * x0 + (1 - a_next).sqrt() * eps
    return x


class Upsampler(nn.Module):
    """Low-res image `[batch, channels, lowres_size, lowres_size]` -> `[batch, channels,
    image_size, image_size]`, a diffusion model conditioned on the resized low-res image."""

    def __init__(self, cfg: UpsamplerConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.noise_aug = NoiseAugmentation(cfg.noise_aug, cfg.unet.base_channels) if cfg.noise_aug.enabled else None
        self.unet = UNet(
            cfg.unet, cfg.channels, cfg.channels, extra_in_channels=cfg.channels, image_size=cfg.image_size,
            cond_dim=self.noise_aug.cond_dim if self.noise_aug is not None else None,
        )
        self.diffusion = GaussianDiffusion.from_config(cfg.diffusion)

    @property
    def scale(self) -> float:
        return self.cfg.image_size / self.cfg.lowres_size

    def upsample_lowres(self, lowres: Tensor, size: Optional[int] = None) -> Tensor:
        """Resize `lowres` to `size` (default `image_size`) with `cfg.lowres_upsample_mode`."""
        size = size or self.cfg.image_size
        return F.interpolate(lowres, size=(size, size), mode=self.cfg.lowres_upsample_mode, align_corners=False).clamp(-1, 1)

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
        null_cond: Optional[Tensor] = None,
    ) -> Tensor:
        """Predict the objective for `x_t` `[batch, channels, H, W]`; `lowres_cond` is the low-res
        image already resized to `[batch, channels, H, W]` (and noised by `noise_level` `[batch]`
        when the upsampler is trained with noise augmentation, which needs the level)."""
        if null_cond is not None and bool(null_cond.any()):
            raise ValueError(
                "Upsampler: null_cond rows requested, but upsamplers are trained without conditioning "
                "dropout; sample them with guidance_scale 1"
            )
        if (noise_level is None) != (self.noise_aug is None):
            raise ValueError("Upsampler: noise_level must be given iff the upsampler has noise_aug (max_level > 0)")
        cond = self.noise_aug(noise_level) if self.noise_aug is not None else None
        return self.unet(x_t, t, extra=lowres_cond, cond=cond)

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
        _check_images(images, self.cfg.channels, self.cfg.image_size, "Upsampler.loss: images")
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
        _check_images(lowres, self.cfg.channels, self.cfg.lowres_size, "Upsampler.sample: lowres")
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
        kwargs = _sample_kwargs(self.cfg.diffusion, steps, sampler, eta, 1.0)
        with _eval_mode(self):
            out = self.diffusion.sample(
                self,
                (lowres.shape[0], self.cfg.channels, size, size),
                cond=cond,
                noise=noise,
                generator=generator,
                device=lowres.device,
                **kwargs,
            )
        return out.clamp(-1, 1)
