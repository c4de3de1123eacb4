"""The unCLIP sampling chain and its applications (Ramesh et al. 2022, sec. 3).

    caption --CLIP text--> text embedding --prior--> image embedding --decoder--> 64px
            --upsampler 1--> 256px --upsampler 2--> 1024px

Applications: text-to-image; variations of an image (decode its CLIP image embedding with
fresh noise); interpolations between two images (slerp between their image embeddings, the
same decoder noise for every frame); text diffs (move an image's embedding towards the
normalised difference of two captions' text embeddings, by slerp).

Every application takes a `seed`: all noise comes from one `torch.Generator` on the models'
device seeded with it, and each stage's starting noise x_T is drawn explicitly, so the same
seed gives the same images on the same device. With `prior=None` the caption's CLIP text
embedding is fed to the decoder as if it were an image embedding (the paper's "decoder
conditioned on the text embedding" baseline, sec. 5.1).

The CLIP adapter needs `encode_text(list[str]) -> (text_embed [B, D], text_encodings
[B, L, W], text_mask [B, L])` and `encode_image(images [B, 3, H, W] in [-1, 1]) -> [B, D]`;
priors need `sample(text_embed, text_encodings, text_mask, *, guidance_scale, generator, ...)`.
"""

from __future__ import annotations

import inspect
from typing import Any, Optional, Sequence, Union

import torch
import torch.nn.functional as F
from torch import Tensor

from models.decoder import Decoder, Upsampler

Weight = Union[float, Sequence[float], Tensor]


def slerp(a: Tensor, b: Tensor, weight: Weight) -> Tensor:
    """Spherical interpolation from direction `a` (weight 0) to `b` (weight 1), unit norm.

    `a`, `b`: `[..., D]` (normalised here); `weight`: a float or a tensor/sequence that
    broadcasts against `[...]` (e.g. `[frames]` with `a`, `b` of shape `[D]` or `[1, D]`).
    Returns `[..., D]` broadcast over the weights. Nearly parallel inputs fall back to a
    normalised linear interpolation, where slerp's `sin(omega)` denominator vanishes."""
    a, b = F.normalize(a.float(), dim=-1), F.normalize(b.float(), dim=-1)
    w = torch.as_tensor(weight, dtype=torch.float32, device=a.device)
    if w.ndim > 0 and a.ndim == 1:
        a, b = a.expand(*w.shape, a.shape[-1]), b.expand(*w.shape, b.shape[-1])
    w = w[..., None]
    dot = (a * b).sum(dim=-1, keepdim=True).clamp(-1.0, 1.0)
    omega = torch.arccos(dot)
    sin_omega = torch.sin(omega)
    near = sin_omega < 1e-6
    safe = torch.where(near, torch.ones_like(sin_omega), sin_omega)
    spherical = (torch.sin((1 - w) * omega) * a + torch.sin(w * omega) * b) / safe
    linear = (1 - w) * a + w * b
    return F.normalize(torch.where(near, linear, spherical), dim=-1)


def _accepted(fn: Any, kwargs: dict[str, Any]) -> dict[str, Any]:
    """The keyword arguments `fn` accepts, minus the unset ones (priors differ in options)."""
    params = inspect.signature(fn).parameters
    takes_any = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values())
    return {k: v for k, v in kwargs.items() if v is not None and (takes_any or k in params)}


class UnCLIPPipeline:
    """CLIP + prior (or None) + decoder + upsamplers (in order, each one's `lowres_size` equal
    to the previous stage's `image_size`). Images in and out are `[batch, 3, H, W]` in [-1, 1]."""

    def __init__(self, clip: Any, prior: Any, decoder: Decoder, upsamplers: Sequence[Upsampler] = ()) -> None:
        self.clip, self.prior, self.decoder = clip, prior, decoder
        self.upsamplers = list(upsamplers)
        size = decoder.cfg.image_size
        for i, up in enumerate(self.upsamplers):
            if up.cfg.lowres_size != size:
                raise ValueError(
                    f"upsamplers[{i}].lowres_size ({up.cfg.lowres_size}) must equal the previous stage's "
                    f"image_size ({size})"
                )
            size = up.cfg.image_size
        self.image_size = size
        if getattr(clip, "embed_dim", decoder.cfg.image_embed_dim) != decoder.cfg.image_embed_dim:
            raise ValueError(
                f"CLIP embed_dim ({clip.embed_dim}) differs from decoder.image_embed_dim ({decoder.cfg.image_embed_dim})"
            )

    @property
    def device(self) -> torch.device:
        return next(self.decoder.parameters()).device

    def generator(self, seed: int) -> torch.Generator:
        return torch.Generator(device=self.device).manual_seed(int(seed))

    def _noise(self, batch: int, channels: int, size: int, generator: torch.Generator) -> Tensor:
        return torch.randn((batch, channels, size, size), generator=generator, device=self.device)

    # ------------------------------------------------------------------ the chain
    @torch.no_grad()
    def encode_text(self, prompts: Sequence[str]) -> tuple[Tensor, Tensor, Tensor]:
        """CLIP text embedding `[B, D]`, encodings `[B, L, W]` and mask `[B, L]`, on the device,
        with the encodings cut to the decoder's `max_text_len`."""
        if isinstance(prompts, str):
            raise TypeError("prompts must be a list of strings, got a single str")
        text_embed, encodings, mask = self.clip.encode_text(list(prompts))
        limit = self.decoder.cfg.max_text_len
        return text_embed.to(self.device), encodings[:, :limit].to(self.device), mask[:, :limit].to(self.device)

    @torch.no_grad()
    def encode_image(self, images: Tensor) -> Tensor:
        """Unit-norm CLIP image embeddings `[B, D]` of `images` `[B, 3, H, W]` (or `[3, H, W]`)."""
        if images.ndim == 3:
            images = images[None]
        return self.clip.encode_image(images).to(self.device)

    @torch.no_grad()
    def decode(
        self,
        image_embed: Tensor,
        text_encodings: Optional[Tensor] = None,
        text_mask: Optional[Tensor] = None,
        *,
        decoder_guidance: Optional[float] = None,
        steps: Optional[int] = None,
        sampler: Optional[str] = None,
        eta: Optional[float] = None,
        upsampler_steps: Optional[int] = None,
        generator: Optional[torch.Generator] = None,
        decoder_noise: Optional[Tensor] = None,
        share_noise: bool = False,
    ) -> Tensor:
        """Image embeddings `[B, D]` -> images `[B, 3, S, S]` in [-1, 1], S the last stage's size.

        Runs the decoder, then each upsampler (with its own configured steps unless
        `upsampler_steps` is given). `decoder_noise` fixes the decoder's x_T; `share_noise`
        gives every row the same x_T at every stage (interpolation frames)."""
        batch = image_embed.shape[0]
        generator = generator if generator is not None else self.generator(0)
        image_embed = image_embed.to(self.device)

        def start_noise(channels: int, size: int) -> Tensor:
            noise = self._noise(1 if share_noise else batch, channels, size, generator)
            return noise.expand(batch, -1, -1, -1).contiguous() if share_noise else noise

        cfg = self.decoder.cfg
        if decoder_noise is None:
            decoder_noise = start_noise(cfg.channels, cfg.image_size)
        images = self.decoder.sample(
            image_embed,
            text_encodings,
            text_mask,
            guidance_scale=decoder_guidance,
            steps=steps,
            sampler=sampler,
            eta=eta,
            noise=decoder_noise.to(self.device),
            generator=generator,
        )
        for up in self.upsamplers:
            images = up.sample(
                images,
                steps=upsampler_steps,
                noise=start_noise(up.cfg.channels, up.cfg.image_size),
                generator=generator,
            )
        return images.clamp(-1, 1)

    # ------------------------------------------------------------------ applications
    @torch.no_grad()
    def text_to_image(
        self,
        prompts: Sequence[str],
        *,
        prior_guidance: Optional[float] = None,
        decoder_guidance: Optional[float] = None,
        steps: Optional[int] = None,
        sampler: Optional[str] = None,
        seed: int = 0,
        **decode_kwargs: Any,
    ) -> Tensor:
        """One image `[len(prompts), 3, S, S]` per caption. `steps`/`sampler` override the
        prior's (where it has them) and the decoder's configured values."""
        generator = self.generator(seed)
        text_embed, encodings, mask = self.encode_text(prompts)
        if self.prior is None:
            image_embed = text_embed  # the decoder-only baseline: text embedding as image embedding
        else:
            options = dict(guidance_scale=prior_guidance, steps=steps, sampler=sampler, generator=generator)
            image_embed = self.prior.sample(text_embed, encodings, mask, **_accepted(self.prior.sample, options))
        return self.decode(
            image_embed,
            encodings,
            mask,
            decoder_guidance=decoder_guidance,
            steps=steps,
            sampler=sampler,
            generator=generator,
            **decode_kwargs,
        )

    @torch.no_grad()
    def variations(self, images: Tensor, *, n: int = 4, seed: int = 0, **decode_kwargs: Any) -> Tensor:
        """`n` variations of each image: `[B * n, 3, S, S]`, image-major (rows `i*n .. i*n+n-1`
        vary image `i`), each decoded from the image's CLIP embedding with its own noise."""
        if n < 1:
            raise ValueError(f"variations: n must be >= 1, got {n}")
        image_embed = self.encode_image(images).repeat_interleave(n, dim=0)
        return self.decode(image_embed, generator=self.generator(seed), **decode_kwargs)

    @torch.no_grad()
    def interpolate(
        self, image_a: Tensor, image_b: Tensor, steps: int = 5, *, seed: int = 0, **decode_kwargs: Any
    ) -> Tensor:
        """`steps` frames `[steps, 3, S, S]` from `image_a` to `image_b` (each `[3, H, W]` or
        `[1, 3, H, W]`): slerp between their CLIP image embeddings at evenly spaced weights
        0..1, every frame decoded from the same noise (deterministic with the default DDIM,
        eta 0; per-step noise of DDPM or eta > 0 still differs between frames)."""
        if steps < 2:
            raise ValueError(f"interpolate: steps (frames) must be >= 2, got {steps}")
        embeds = self.encode_image(torch.cat([_batch_of_one(image_a), _batch_of_one(image_b)]))
        weights = torch.linspace(0, 1, steps, device=self.device)
        frames = slerp(embeds[0], embeds[1], weights)
        return self.decode(frames, generator=self.generator(seed), share_noise=True, **decode_kwargs)

    @torch.no_grad()
    def text_diff(
        self,
        image: Tensor,
        from_text: str,
        to_text: str,
        amounts: Sequence[float] = (0.0, 0.25, 0.5),
        *,
        seed: int = 0,
        **decode_kwargs: Any,
    ) -> Tensor:
        """Edit `image` (`[3, H, W]` or `[1, 3, H, W]`) towards `to_text` and away from
        `from_text`: `z = slerp(z_image, normalize(z_to - z_from), amount)` for each amount,
        decoded from the same noise. Returns `[len(amounts), 3, S, S]` (paper: amounts in
        [0.25, 0.5])."""
        image_embed = self.encode_image(_batch_of_one(image))[0]
        text_embed, _, _ = self.encode_text([from_text, to_text])
        diff = F.normalize(text_embed[1] - text_embed[0], dim=-1)
        embeds = slerp(image_embed, diff, torch.as_tensor(list(amounts), dtype=torch.float32))
        return self.decode(embeds, generator=self.generator(seed), share_noise=True, **decode_kwargs)


def _batch_of_one(image: Tensor) -> Tensor:
    if image.ndim == 3:
        return image[None]
    if image.ndim == 4 and image.shape[0] == 1:
        return image
    raise ValueError(f"expected one image [3, H, W] or [1, 3, H, W], got shape {tuple(image.shape)}")
