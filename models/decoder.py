"""The decoder: CLIP image embedding -> 64px image (unCLIP sec. 2.1).

GLIDE's text-conditional UNet, with the CLIP image embedding projected and added to the
timestep embedding and projected into `num_image_tokens` extra context tokens that sit in
front of the caption's text encodings. Classifier-free guidance is learned by replacing the
image embedding with a learned null embedding `image_embed_drop` of the time and dropping the
caption `text_drop` of the time (a learned null text token, or with `null_text: empty_caption`
the empty caption's CLIP outputs, stands in for it).

Karlo's decoder (diffusers' `UnCLIPTextProjModel` + `UNet2DConditionModel`) is this model with
`clip_embeddings: raw`, `null_text: empty_caption`, `use_text_embed` (the CLIP text embedding
also projected into the timestep embedding), `context_norm: text_tokens` and learned sigma.

The upsamplers live in `models/upsampler.py` (importable from here too).
"""

from __future__ import annotations

import math
from typing import Literal, Optional

import torch
import torch.nn.functional as F
from einops import rearrange
from pydantic import Field
from torch import Tensor, nn

from models.config import PositiveInt, Probability, config_dataclass
from models.diffusion import DiffusionConfig, GaussianDiffusion
from models.embedding_space import ClipEmbeddings
from models.image_stage import check_divisible, check_images, eval_mode, image_diffusion, out_channels, sample_kwargs
from models.text_conditioning import NullCaption, NullText
from models.unet import UNet, UNetConfig
from models.upsampler import Upsampler, UpsamplerConfig  # noqa: F401  (the stages import both from here)


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
    diffusion: DiffusionConfig = Field(default_factory=image_diffusion)
    # width of the context tokens (image tokens and projected text encodings) that every
    # attention layer reads; GLIDE's text transformer is 2048 wide
    context_dim: PositiveInt = 512
    # `unit`: unit-norm CLIP embeddings, scaled by sqrt(D); `raw` (Karlo): as CLIP outputs them
    clip_embeddings: ClipEmbeddings = "unit"
    # what replaces a dropped caption: a learned null token, or the empty caption's CLIP outputs
    null_text: NullText = "learned"
    # Karlo / diffusers' UnCLIPTextProjModel: the CLIP text embedding is projected and added to
    # the timestep embedding too (the batch then needs `text_embed`)
    use_text_embed: bool = False
    # LayerNorm over every context token, or only over the projected text encodings (Karlo)
    context_norm: Literal["all_tokens", "text_tokens"] = "all_tokens"

    def __post_init__(self) -> None:
        check_divisible(self.image_size, self.unet, "image_size")
        if self.use_text_embed and self.null_text != "empty_caption":
            raise ValueError(
                "use_text_embed needs null_text: empty_caption (the empty caption's CLIP embedding is "
                "what a dropped caption's text embedding becomes)"
            )


class Decoder(nn.Module):
    """CLIP image embedding `[batch, image_embed_dim]` (+ the caption) -> image."""

    def __init__(self, cfg: DecoderConfig) -> None:
        super().__init__()
        self.cfg = cfg
        dim, width = cfg.image_embed_dim, cfg.context_dim
        self.unet = UNet(
            cfg.unet, cfg.channels, out_channels(cfg), cond_dim=dim, context_dim=width, image_size=cfg.image_size
        )
        self.image_to_tokens = nn.Linear(dim, cfg.num_image_tokens * width)
        self.text_proj = nn.Linear(cfg.text_width, width) if cfg.use_text_encodings else None
        self.context_norm = nn.LayerNorm(width)
        # CLIP embeddings are unit-norm; the null embedding starts on the same sphere
        self.null_image_embed = nn.Parameter(F.normalize(torch.randn(dim), dim=0))
        if cfg.null_text == "learned":
            self.null_text_token = nn.Parameter(torch.randn(width) * 0.02)
        else:
            self.null_caption = NullCaption(dim, cfg.text_width, cfg.max_text_len)
        self.text_embed_proj = nn.Linear(dim, 4 * cfg.unet.base_channels) if cfg.use_text_embed else None
        # unit-norm CLIP embeddings have entries of size 1/sqrt(D); scale them to unit variance
        self.embed_scale = math.sqrt(dim) if cfg.clip_embeddings == "unit" else 1.0
        self.diffusion = GaussianDiffusion.from_config(cfg.diffusion)

    def draw_cond_drop(
        self, batch: int, device: torch.device | str = "cpu", generator: Optional[torch.Generator] = None
    ) -> dict[str, Tensor]:
        """CFG dropout masks, BoolTensors `[batch]` (True = dropped): `image_embed` with
        probability `cfg.image_embed_drop`, `text` with `cfg.text_drop`, independently."""
        gen_device = generator.device if generator is not None else device
        u = torch.rand(2, batch, generator=generator, device=gen_device).to(device)
        return {"image_embed": u[0] < self.cfg.image_embed_drop, "text": u[1] < self.cfg.text_drop}

    def _check_conditions(self, batch: int, image_embed: Tensor, text_embed, text_encodings, text_mask) -> None:
        cfg = self.cfg
        if image_embed.shape != (batch, cfg.image_embed_dim):
            raise ValueError(
                f"Decoder: image_embed must be [batch, image_embed_dim] = [{batch}, {cfg.image_embed_dim}], "
                f"got {tuple(image_embed.shape)}"
            )
        if text_embed is not None and text_embed.shape != (batch, cfg.image_embed_dim):
            raise ValueError(f"Decoder: text_embed must be [{batch}, {cfg.image_embed_dim}], got {tuple(text_embed.shape)}")
        if text_encodings is None or not cfg.use_text_encodings:
            return
        if text_encodings.ndim != 3 or text_encodings.shape[0] != batch or text_encodings.shape[2] != cfg.text_width:
            raise ValueError(
                f"Decoder: text_encodings must be [{batch}, tokens, text_width={cfg.text_width}], "
                f"got {tuple(text_encodings.shape)}"
            )
        if text_encodings.shape[1] > cfg.max_text_len:
            raise ValueError(f"Decoder: {text_encodings.shape[1]} text tokens exceed max_text_len ({cfg.max_text_len})")
        if text_mask is not None and text_mask.shape != text_encodings.shape[:2]:
            raise ValueError(
                f"Decoder: text_mask must be [batch, tokens] = {tuple(text_encodings.shape[:2])}, got {tuple(text_mask.shape)}"
            )

    def _image_tokens(self, image_embed: Tensor) -> Tensor:
        """`[batch, num_image_tokens, context_dim]`: the projection, split token-major."""
        return rearrange(self.image_to_tokens(image_embed), "b (n d) -> b n d", n=self.cfg.num_image_tokens)

    def _context(self, image_embed: Tensor, text_encodings, text_mask, drop_text: Tensor) -> tuple[Tensor, Tensor]:
        """Context tokens `[batch, image_tokens (+ 1) + text_tokens, context_dim]` and their
        mask: the image tokens, the learned null text token (real only where the text is
        dropped or absent; not with the empty caption, which stands in the text itself), then
        the projected text encodings (real where `text_mask` and not dropped)."""
        batch, device = image_embed.shape[0], image_embed.device
        image_tokens = self._image_tokens(image_embed)
        parts, masks = [image_tokens], [torch.ones(image_tokens.shape[:2], dtype=torch.bool, device=device)]
        learned_null = self.cfg.null_text == "learned"
        if learned_null:
            parts.append(self.null_text_token.to(image_tokens.dtype).expand(batch, 1, -1))
        if text_encodings is not None and self.text_proj is not None:
            real = torch.ones(text_encodings.shape[:2], dtype=torch.bool, device=device)
            if text_mask is not None:
                real = text_mask.to(device=device, dtype=torch.bool)
            if learned_null:
                real = real & ~drop_text[:, None]
                masks.append(~real.any(dim=1, keepdim=True))
            text_tokens = self.text_proj(text_encodings.to(image_tokens.dtype))
            if self.cfg.context_norm == "text_tokens":
                text_tokens = self.context_norm(text_tokens)
            parts.append(text_tokens)
            masks.append(real)
        elif learned_null:
            masks.append(torch.ones(batch, 1, dtype=torch.bool, device=device))
        context = torch.cat(parts, dim=1)
        if self.cfg.context_norm == "all_tokens":
            context = self.context_norm(context)
        return context, torch.cat(masks, dim=1)

    def forward(
        self,
        x_t: Tensor,
        t: Tensor,
        *,
        image_embed: Tensor,
        text_encodings: Optional[Tensor] = None,
        text_mask: Optional[Tensor] = None,
        text_embed: Optional[Tensor] = None,
        null_cond: Optional[Tensor] = None,
        cond_drop: Optional[dict[str, Tensor]] = None,
    ) -> Tensor:
        """Predict the objective for `x_t` `[batch, channels, size, size]` at timesteps `t` `[batch]`.

        `image_embed`: `[batch, image_embed_dim]`; `text_encodings`: `[batch, tokens, text_width]`
        with `text_mask` `[batch, tokens]` (True = real token); `text_embed`: `[batch,
        image_embed_dim]` (read with `use_text_embed`). With the empty caption as null text an
        absent caption is the empty caption. `null_cond` `[batch]`: rows that use the null
        conditioning (guidance's unconditional pass). `cond_drop`: explicit per-condition
        dropout masks (see `draw_cond_drop`); drawn here when neither is given and the module
        is training."""
        batch = x_t.shape[0]
        self._check_conditions(batch, image_embed, text_embed, text_encodings, text_mask)
        if null_cond is not None:
            null_cond = null_cond.to(device=x_t.device, dtype=torch.bool)
            cond_drop = {"image_embed": null_cond, "text": null_cond}
        elif cond_drop is None and self.training:
            cond_drop = self.draw_cond_drop(batch, x_t.device)
        no_drop = torch.zeros(batch, dtype=torch.bool, device=x_t.device)
        drop_image = (cond_drop or {}).get("image_embed", no_drop).to(x_t.device)
        drop_text = (cond_drop or {}).get("text", no_drop).to(x_t.device)
        if not self.cfg.use_text_encodings:
            text_encodings = text_mask = None
        if self.cfg.null_text == "empty_caption":
            if self.cfg.use_text_encodings and text_encodings is None:
                text_encodings, text_mask = self.null_caption.encodings_for(batch, x_t.device)
            text_embed, text_encodings, text_mask = self.null_caption.substitute(drop_text, text_embed, text_encodings, text_mask)

        dtype = self.image_to_tokens.weight.dtype
        image_embed = torch.where(drop_image[:, None], self.null_image_embed.to(dtype), image_embed.to(dtype))
        image_embed = image_embed * self.embed_scale
        context, context_mask = self._context(image_embed, text_encodings, text_mask, drop_text)
        cond_emb = None
        if self.text_embed_proj is not None:
            cond_emb = self.text_embed_proj(text_embed.to(dtype) * self.embed_scale)
        return self.unet(x_t, t, cond=image_embed, cond_emb=cond_emb, context=context, context_mask=context_mask)

    def _cond(self, image_embed, text_encodings, text_mask, text_embed) -> dict:
        cond = {"image_embed": image_embed}
        if text_encodings is not None:
            cond.update(text_encodings=text_encodings, text_mask=text_mask)
        if text_embed is not None:
            cond["text_embed"] = text_embed
        return cond

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
        text_embed: Optional[Tensor] = None,
    ) -> Tensor:
        """Diffusion loss (scalar) on `images` `[batch, channels, image_size, image_size]` in [-1, 1].
        `t` `[batch]` and `noise` (like `images`) are drawn unless given."""
        check_images(images, self.cfg.channels, self.cfg.image_size, "Decoder.loss: images")
        cond = self._cond(image_embed, text_encodings, text_mask, text_embed)
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
        text_embed: Optional[Tensor] = None,
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
        cond = self._cond(image_embed, text_encodings, text_mask, text_embed)
        with eval_mode(self):
            out = self.diffusion.sample(
                self,
                shape,
                cond=cond,
                noise=noise,
                generator=generator,
                device=image_embed.device,
                **sample_kwargs(self.cfg.diffusion, steps, sampler, eta, guidance_scale),
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
        text_embed: Optional[Tensor] = None,
        guidance_scale: Optional[float] = None,
        steps: Optional[int] = None,
    ) -> Tensor:
        """DDIM inversion (Dhariwal & Nichol 2021, appendix F; unCLIP sec. 3): the x_T
        `[batch, channels, image_size, image_size]` from which DDIM with eta 0 over the same
        `steps` decodes approximately `images` (in [-1, 1], at image_size). Unguided unless
        `guidance_scale` is given (not the configured sampling guidance: the unguided DDIM map
        is the one that reconstructs the image). Runs the deterministic DDIM update backwards,
        from t = 0 up to t = T - 1, with each step's prediction made at the level it starts from."""
        check_images(images, self.cfg.channels, self.cfg.image_size, "Decoder.invert: images")
        opts = sample_kwargs(self.cfg.diffusion, steps, None, None, 1.0 if guidance_scale is None else guidance_scale)
        with eval_mode(self):
            return ddim_invert(
                self.diffusion,
                self,
                images,
                cond=self._cond(image_embed, text_encodings, text_mask, text_embed),
                steps=opts["steps"],
                guidance_scale=opts["guidance_scale"],
                clip_x0=opts["clip_x0"],
                dynamic_threshold_percentile=opts["dynamic_threshold_percentile"],
                clip_range=opts["clip_range"],
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
    clip_range: float = 1.0,
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
        prediction, _ = diffusion.split_output(diffusion.guided_prediction(model_fn, x, t, cond, guidance_scale))
        x0 = diffusion.predict_start(x, t, prediction.float())
        x0 = diffusion.clip_start(x0, clip_x0, dynamic_threshold_percentile, clip_range)
        eps = diffusion.predict_noise_from_start(x, t, x0)
        a_next = diffusion.alphas_cumprod[level].to(x.device)
        x = a_next.sqrt() * x0 + (1 - a_next).sqrt() * eps
    return x
