"""The unCLIP sampling chain and its applications (Ramesh et al. 2022, sec. 3).

    caption --CLIP text--> text embedding --prior--> image embedding --decoder--> 64px
            --upsampler 1--> 256px --upsampler 2--> 1024px

Applications: text-to-image; variations of an image (decode its CLIP image embedding from
its DDIM-inverted latent with DDIM eta > 0, or from fresh noise); interpolations between two
images (slerp between their image embeddings, the same random decoder noise for every frame,
as in the paper's Figure 4); text diffs (move an image's embedding towards the normalised
difference of two captions' text embeddings, by slerp, decoding from the image's inverted
latent).

Inversion and interpolation are deterministic maps of the embedding: DDIM with eta 0 and no
guidance at every stage, whatever the stages are configured to sample with (a DDPM decoder
would give different frames for the same image; inverting under guidance does not invert the
unguided DDIM map that reconstructs the image). Input images of any size and aspect are
cropped by the one policy of `models/images.py` (shorter side scaled, centre square), as the
training data and the CLIP precompute were.

Every application takes a `seed`: all noise comes from one `torch.Generator` on the models'
device seeded with it, and each stage's starting noise x_T is drawn explicitly, so the same
seed gives the same images on the same device. With `prior=None` the caption's CLIP text
embedding is fed to the decoder as if it were an image embedding (the paper's "decoder
conditioned on the text embedding" baseline, sec. 5.1).

The CLIP adapter needs `encode_text(list[str]) -> (text_embed [B, D], text_encodings
[B, L, W], text_mask [B, L])` and `encode_image(images [B, 3, H, W] in [-1, 1]) -> [B, D]`;
a prior is anything with the `Prior` interface (both priors, and `CaptionOnly`).
"""

from __future__ import annotations

from typing import Any, Mapping, Optional, Protocol, Sequence, Union

import torch
import torch.nn.functional as F
from torch import Tensor

from models.decoder import Decoder, Upsampler
from models.images import resize_center_crop_tensor

Weight = Union[float, Sequence[float], Tensor]
PerUpsampler = Union[None, int, float, str, Sequence[Any]]


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


class Prior(Protocol):
    """What the pipeline asks of a prior: unit-norm image embeddings `[B, D]` for captions.

    `options` are the prior's own sampling settings (unset ones come from its config), named
    in `sampling_options`: the diffusion prior's steps, sampler, eta, candidates; the
    autoregressive prior's temperature, top-k, dot-product quantile; guidance for both.
    """

    sampling_options: tuple[str, ...]

    def sample(
        self, text_embed: Tensor, text_encodings: Optional[Tensor] = None, text_mask: Optional[Tensor] = None, *,
        generator: Optional[torch.Generator] = None, **options: Any,
    ) -> Tensor: ...


def check_prior_options(prior: Prior, options: Mapping[str, Any]) -> dict[str, Any]:
    """The set `options` (None values dropped), or ValueError naming those this prior lacks."""
    unknown = sorted(set(options) - set(prior.sampling_options))
    if unknown:
        raise ValueError(
            f"prior sampling option(s) {', '.join(unknown)} do not apply to the {type(prior).__name__} "
            f"(its options: {', '.join(prior.sampling_options)})"
        )
    return {k: v for k, v in options.items() if v is not None}


class UnCLIPPipeline:
    """CLIP + prior (or None) + decoder + upsamplers (in order, each one's `lowres_size` equal
    to the previous stage's `image_size`). Images in and out are `[batch, 3, H, W]` in [-1, 1]."""

    def __init__(
        self, clip: Any, prior: Optional[Prior], decoder: Decoder, upsamplers: Sequence[Upsampler] = ()
    ) -> None:
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
        _check_widths(clip, prior, decoder)

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
        """Unit-norm CLIP image embeddings `[B, D]` of `images` `[B, 3, H, W]` (or `[3, H, W]`)
        of any size, cropped to the CLIP's input square by the precompute's policy."""
        if images.ndim == 3:
            images = images[None]
        size = getattr(self.clip, "image_size", None)
        if size is not None:
            images = resize_center_crop_tensor(images.to(self.device, torch.float32), int(size))
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
        upsampler_steps: PerUpsampler = None,
        upsampler_sampler: PerUpsampler = None,
        upsampler_eta: PerUpsampler = None,
        upsampler_noise_level: PerUpsampler = None,
        generator: Optional[torch.Generator] = None,
        decoder_noise: Optional[Tensor] = None,
        share_noise: bool = False,
        text_embed: Optional[Tensor] = None,
    ) -> Tensor:
        """Image embeddings `[B, D]` -> images `[B, 3, S, S]` in [-1, 1], S the last stage's size.

        Runs the decoder (`decoder_guidance`, `steps`, `sampler`, `eta` override its configured
        values), then each upsampler: `upsampler_*` is one value for every upsampler or one per
        upsampler (in resolution order; None: its configured value); `upsampler_noise_level` is
        the noise augmentation level of those trained with it. `decoder_noise` fixes the
        decoder's x_T; `share_noise` gives every row the same noise at every stage
        (interpolation frames). `text_embed` `[B, D]` reaches decoders that read the
        caption's CLIP embedding (Karlo's)."""
        batch = image_embed.shape[0]
        generator = generator if generator is not None else self.generator(0)
        image_embed = image_embed.to(self.device)
        per_up = {
            name: per_upsampler(value, len(self.upsamplers), name)
            for name, value in (("upsampler_steps", upsampler_steps), ("upsampler_sampler", upsampler_sampler),
                                ("upsampler_eta", upsampler_eta), ("upsampler_noise_level", upsampler_noise_level))
        }  # fmt: skip

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
            **({"text_embed": text_embed.to(self.device)} if text_embed is not None and cfg.use_text_embed else {}),
        )
        for i, up in enumerate(self.upsamplers):
            size = up.cfg.image_size
            noise = start_noise(up.cfg.channels, size)
            shared_aug = share_noise and getattr(up, "noise_aug", None) is not None
            images = up.sample(
                images,
                steps=per_up["upsampler_steps"][i],
                sampler=per_up["upsampler_sampler"][i],
                eta=per_up["upsampler_eta"][i],
                noise_level=per_up["upsampler_noise_level"][i],
                lowres_noise=start_noise(up.cfg.channels, size) if shared_aug else None,
                noise=noise,
                generator=generator,
            )
        return images.clamp(-1, 1)

    # ------------------------------------------------------------------ applications
    @torch.no_grad()
    def text_to_image(
        self,
        prompts: Sequence[str],
        *,
        prior_options: Mapping[str, Any] = {},
        decoder_guidance: Optional[float] = None,
        steps: Optional[int] = None,
        sampler: Optional[str] = None,
        seed: int = 0,
        **decode_kwargs: Any,
    ) -> Tensor:
        """One image `[len(prompts), 3, S, S]` per caption. `prior_options` go to the prior
        (see `Prior`); `steps`/`sampler`/`decoder_guidance` override the decoder's configured
        values, and the other `decode` arguments pass through."""
        generator = self.generator(seed)
        text_embed, encodings, mask = self.encode_text(prompts)
        if self.prior is None:
            image_embed = text_embed  # the decoder-only baseline: text embedding as image embedding
        else:
            options = check_prior_options(self.prior, prior_options)
            image_embed = self.prior.sample(text_embed, encodings, mask, generator=generator, **options)
        return self.decode(
            image_embed,
            encodings,
            mask,
            decoder_guidance=decoder_guidance,
            steps=steps,
            sampler=sampler,
            generator=generator,
            text_embed=text_embed,
            **decode_kwargs,
        )

    @torch.no_grad()
    def invert(self, images: Tensor, image_embed: Optional[Tensor] = None, *, steps: Optional[int] = None) -> Tensor:
        """The decoder's DDIM latent x_T `[B, C, s, s]` of `images` `[B, 3, H, W]` (cropped to
        the decoder's size s by the training data's policy), conditioned on their CLIP
        embeddings, without guidance (unCLIP sec. 3: with the image embedding it forms the
        "bipartite latent" that unguided DDIM eta 0 decodes back to the image)."""
        if images.ndim == 3:
            images = images[None]
        images = images.to(self.device, torch.float32)
        image_embed = self.encode_image(images) if image_embed is None else image_embed.to(self.device)
        images = resize_center_crop_tensor(images, self.decoder.cfg.image_size)
        return self.decoder.invert(images.clamp(-1, 1), image_embed, guidance_scale=1.0, steps=steps)

    @torch.no_grad()
    def variations(
        self,
        images: Tensor,
        *,
        n: int = 4,
        seed: int = 0,
        invert: bool = True,
        eta: Optional[float] = None,
        **decode_kwargs: Any,
    ) -> Tensor:
        """`n` variations of each image: `[B * n, 3, S, S]`, image-major (rows `i*n .. i*n+n-1`
        vary image `i`), decoded from the image's CLIP embedding. `invert` (the paper's way,
        sec. 3.1): start from the image's DDIM-inverted x_T and sample with DDIM eta > 0
        (default 1; eta 0 would reconstruct the image); otherwise each variation starts from
        its own random x_T."""
        if n < 1:
            raise ValueError(f"variations: n must be >= 1, got {n}")
        generator = self.generator(seed)
        image_embed = self.encode_image(images)
        if invert:
            x_t = self.invert(images, image_embed, steps=decode_kwargs.get("steps"))
            decode_kwargs.update(decoder_noise=x_t.repeat_interleave(n, dim=0), sampler="ddim")
            eta = 1.0 if eta is None else eta
        return self.decode(image_embed.repeat_interleave(n, dim=0), generator=generator, eta=eta, **decode_kwargs)

    @torch.no_grad()
    def interpolate(
        self, image_a: Tensor, image_b: Tensor, frames: int = 5, *, seed: int = 0, **decode_kwargs: Any
    ) -> Tensor:
        """`frames` images `[frames, 3, S, S]` from `image_a` to `image_b` (each `[3, H, W]` or
        `[1, 3, H, W]`): slerp between their CLIP image embeddings at evenly spaced weights
        0..1, every frame decoded from the same noise by deterministic DDIM (eta 0) without
        guidance at every stage, so equal embeddings give equal frames. `decode_kwargs`: the
        stages' `steps`, `upsampler_steps`, `upsampler_noise_level`."""
        if frames < 2:
            raise ValueError(f"interpolate: frames must be >= 2, got {frames}")
        embeds = self.encode_image(torch.cat([_batch_of_one(image_a), _batch_of_one(image_b)]))
        weights = torch.linspace(0, 1, frames, device=self.device)
        frames = slerp(embeds[0], embeds[1], weights)
        deterministic = _deterministic("interpolate", decode_kwargs)
        return self.decode(frames, generator=self.generator(seed), share_noise=True, **deterministic)

    @torch.no_grad()
    def text_diff(
        self,
        image: Tensor,
        from_text: str,
        to_text: str,
        amounts: Sequence[float] = (0.0, 0.25, 0.5),
        *,
        seed: int = 0,
        invert: bool = True,
        **decode_kwargs: Any,
    ) -> Tensor:
        """Edit `image` (`[3, H, W]` or `[1, 3, H, W]`) towards `to_text` and away from
        `from_text`: `z = slerp(z_image, normalize(z_to - z_from), amount)` for each amount,
        all decoded from one x_T. Returns `[len(amounts), 3, S, S]` (paper: amounts up to
        0.25..0.5). `invert` (the paper's way, sec. 3.3): x_T is the image's DDIM inversion and
        decoding is unguided DDIM eta 0 at every stage, so amount 0 reconstructs the image;
        otherwise x_T is random and the stages sample as configured (or as `decode_kwargs` say)."""
        image = _batch_of_one(image)
        image_embed = self.encode_image(image)
        text_embed, _, _ = self.encode_text([from_text, to_text])
        diff = F.normalize(text_embed[1] - text_embed[0], dim=-1)
        embeds = slerp(image_embed[0], diff, torch.as_tensor(list(amounts), dtype=torch.float32))
        if invert:
            x_t = self.invert(image, image_embed, steps=decode_kwargs.get("steps"))
            decode_kwargs = _deterministic("text_diff", decode_kwargs)
            decode_kwargs["decoder_noise"] = x_t.expand(len(embeds), -1, -1, -1)
        return self.decode(embeds, generator=self.generator(seed), share_noise=True, **decode_kwargs)


class CaptionOnly:
    """Stands in for the prior in the paper's caption-only ablation (sec. 5.1, the first row of
    its decoder-conditioning figure): the decoder gets the caption and no CLIP embedding. The
    paper passes a zero vector; this decoder's "no embedding" is its learned null image
    embedding, the one classifier-free-guidance dropout trained it on."""

    sampling_options: tuple[str, ...] = ()

    def __init__(self, decoder: Decoder) -> None:
        self.decoder = decoder

    @torch.no_grad()
    def sample(
        self, text_embed: Tensor, text_encodings: Optional[Tensor] = None, text_mask: Optional[Tensor] = None, *,
        generator: Optional[torch.Generator] = None,
    ) -> Tensor:
        """The null image embedding `[B, D]` for each of the `B` captions of `text_embed`."""
        null = self.decoder.null_image_embed.detach().to(text_embed)
        return null.expand(text_embed.shape[0], -1)


def _check_widths(clip: Any, prior: Optional[Prior], decoder: Decoder) -> None:
    """ValueError unless the CLIP's embedding and text widths are those the prior and the
    decoder were built for (the chain's contracts, checked before anything samples)."""
    dim = decoder.cfg.image_embed_dim
    widths = {"embed_dim": getattr(clip, "embed_dim", None), "text_width": getattr(clip, "text_width", None)}
    if widths["embed_dim"] is not None and widths["embed_dim"] != dim:
        raise ValueError(f"CLIP embed_dim ({widths['embed_dim']}) differs from decoder.image_embed_dim ({dim})")
    prior_cfg = getattr(prior, "cfg", None)
    if prior_cfg is not None and prior_cfg.embed_dim != dim:
        raise ValueError(f"prior embed_dim ({prior_cfg.embed_dim}) differs from decoder.image_embed_dim ({dim})")
    for name, cfg in (("prior", prior_cfg), ("decoder", decoder.cfg)):
        width = widths["text_width"]
        if cfg is not None and cfg.use_text_encodings and width is not None and cfg.text_width != width:
            raise ValueError(f"CLIP text_width ({width}) differs from {name} text_width ({cfg.text_width})")


# what interpolation and decoding from an inverted latent fix: deterministic, unguided DDIM
DETERMINISTIC = {"sampler": "ddim", "eta": 0.0, "decoder_guidance": 1.0, "upsampler_sampler": "ddim", "upsampler_eta": 0.0}


def _deterministic(application: str, decode_kwargs: Mapping[str, Any]) -> dict[str, Any]:
    """`decode_kwargs` with `DETERMINISTIC`; ValueError naming any of those set otherwise."""
    clash = sorted(k for k, v in decode_kwargs.items() if k in DETERMINISTIC and v is not None and v != DETERMINISTIC[k])
    if clash:
        raise ValueError(
            f"{application} decodes with deterministic DDIM (eta 0) and no guidance at every stage; "
            f"{', '.join(clash)} cannot be set for it"
        )
    return {**decode_kwargs, **DETERMINISTIC}


def per_upsampler(value: PerUpsampler, count: int, name: str) -> list[Any]:
    """One value per upsampler: None (each its configured value), one value for all, or a
    sequence of `count` values (ValueError otherwise)."""
    if value is None or isinstance(value, (int, float, str)):
        return [value] * count
    values = list(value)
    if len(values) == 1:
        return values * count
    if len(values) != count:
        raise ValueError(f"{name}: {len(values)} values for {count} upsampler(s); give one, or one per upsampler")
    return values


def _batch_of_one(image: Tensor) -> Tensor:
    if image.ndim == 3:
        return image[None]
    if image.ndim == 4 and image.shape[0] == 1:
        return image
    raise ValueError(f"expected one image [3, H, W] or [1, 3, H, W], got shape {tuple(image.shape)}")
