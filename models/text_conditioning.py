"""The caption as transformer tokens for the priors, and their classifier-free-guidance dropout.

Both priors condition on the same inputs (CLIP's per-token text encodings with a padding mask,
and the CLIP text embedding) and drop them the same way; this module holds that shared part.
"""

from __future__ import annotations

import math
from typing import Any, Literal, Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from models.layers import FullPrecisionBuffers

NullText = Literal["learned", "empty_caption"]


def check_text_inputs(
    where: str, batch: int, cfg: Any, text_embed: Tensor, text_encodings: Optional[Tensor], text_mask: Optional[Tensor]
) -> None:
    """Raise ValueError naming `where` and the input unless the shapes fit the prior's `cfg`
    (`embed_dim`, `text_width`, `max_text_len`, `use_text_encodings`)."""
    if text_embed.shape != (batch, cfg.embed_dim):
        raise ValueError(f"{where}: text_embed must be [{batch}, {cfg.embed_dim}], got {tuple(text_embed.shape)}")
    if not cfg.use_text_encodings:
        return
    if text_encodings is None:
        raise ValueError(f"{where}: text_encodings are required (use_text_encodings is true)")
    if text_encodings.ndim != 3 or text_encodings.shape[0] != batch or text_encodings.shape[2] != cfg.text_width:
        raise ValueError(
            f"{where}: text_encodings must be [{batch}, tokens, {cfg.text_width}], got {tuple(text_encodings.shape)}"
        )
    if not 1 <= text_encodings.shape[1] <= cfg.max_text_len:
        raise ValueError(
            f"{where}: text_encodings have {text_encodings.shape[1]} tokens; expected 1..{cfg.max_text_len} (max_text_len)"
        )
    if text_mask is not None and (text_mask.shape != text_encodings.shape[:2] or text_mask.dtype != torch.bool):
        raise ValueError(
            f"{where}: text_mask must be a bool tensor {tuple(text_encodings.shape[:2])}, "
            f"got {text_mask.dtype} {tuple(text_mask.shape)}"
        )


class NullCaption(FullPrecisionBuffers):
    """The empty caption's CLIP outputs, standing in for a dropped (or absent) caption: what
    Karlo trains and samples with instead of learned null tokens (`null_text: empty_caption`).

    Persistent float32 buffers (they are CLIP's outputs, not weights: frozen, saved with the
    model): `text_embed` `[D]`, `text_encodings` `[max_text_len, W]`, `text_mask`
    `[max_text_len]` (True at the empty caption's start and end tokens). Unset (mask all
    False) until `set` fills them: in from the CLIP encoding of "", by import or preparation."""

    def __init__(self, embed_dim: int, text_width: int, max_text_len: int) -> None:
        super().__init__()
        self.register_buffer("text_embed", torch.zeros(embed_dim))
        self.register_buffer("text_encodings", torch.zeros(max_text_len, text_width))
        self.register_buffer("text_mask", torch.zeros(max_text_len, dtype=torch.bool))

    @torch.no_grad()
    def set(self, text_embed: Tensor, text_encodings: Tensor, text_mask: Tensor) -> None:
        """Store CLIP's outputs for "": `[D]`, `[L, W]`, `[L]` (or with a batch dim of 1); L
        may be shorter than max_text_len (the rest is padding) but must hold every real token."""
        text_embed, text_encodings, text_mask = (x.reshape(x.shape[-n:]) for x, n in ((text_embed, 1), (text_encodings, 2), (text_mask, 1)))
        limit = self.text_mask.shape[0]
        if text_mask[limit:].any() or not text_mask.any():
            raise ValueError(f"NullCaption.set: the empty caption must have 1..{limit} real tokens")
        length = min(limit, text_mask.shape[0])
        self.text_embed.copy_(text_embed)
        self.text_encodings.zero_()
        self.text_encodings[:length].copy_(text_encodings[:length])
        self.text_mask.zero_()
        self.text_mask[:length].copy_(text_mask[:length].bool())

    @property
    def length(self) -> int:
        """Tokens up to the empty caption's last real one (a batch must be at least this long;
        on the meta device, where the memory plan runs, all of max_text_len)."""
        if self.text_mask.is_meta:
            return self.text_mask.shape[0]
        return int(self.text_mask.nonzero().max()) + 1

    def substitute(
        self, drop: Tensor, text_embed: Optional[Tensor], text_encodings: Optional[Tensor], text_mask: Optional[Tensor]
    ) -> tuple[Tensor, Optional[Tensor], Optional[Tensor]]:
        """The inputs with rows where `drop` `[B]` is True replaced by the empty caption; an
        absent `text_embed` (None) is the empty caption's for every row, absent encodings stay
        absent. Encodings are padded to hold the empty caption's tokens; a None `text_mask`
        means every token is real. Returns `(text_embed [B, D], text_encodings [B, L', W] or
        None, text_mask [B, L'] or None)`."""
        if not self.text_mask.is_meta and not bool(self.text_mask[0]):
            if text_embed is None or bool(drop.any()):
                raise RuntimeError(
                    "null_text is empty_caption but the empty caption's CLIP encodings were never set "
                    "(import the weights, or run the stage's preparation, which encodes \"\" with its CLIP)"
                )
            return text_embed, text_encodings, text_mask
        batch, device = drop.shape[0], drop.device
        null_embed = self.text_embed.to(device)
        if text_embed is None:
            text_embed = null_embed.expand(batch, -1)
        else:
            text_embed = torch.where(drop[:, None], null_embed.to(text_embed.dtype), text_embed)
        if text_encodings is None:
            return text_embed, None, None
        length = max(text_encodings.shape[1], self.length)
        if text_mask is None:
            text_mask = torch.ones(text_encodings.shape[:2], dtype=torch.bool, device=device)
        pad = length - text_encodings.shape[1]
        text_encodings = F.pad(text_encodings, (0, 0, 0, pad))
        text_mask = F.pad(text_mask.to(device=device, dtype=torch.bool), (0, pad), value=False)
        null_enc = self.text_encodings[:length].to(device=device, dtype=text_encodings.dtype)
        text_encodings = torch.where(drop[:, None, None], null_enc, text_encodings)
        text_mask = torch.where(drop[:, None], self.text_mask[:length].to(device), text_mask)
        return text_embed, text_encodings, text_mask

    def encodings_for(self, batch: int, device: torch.device) -> tuple[Tensor, Tensor]:
        """The empty caption as a batch: encodings `[batch, length, W]`, mask `[batch, length]`."""
        length = self.length
        enc = self.text_encodings[:length].to(device).expand(batch, -1, -1)
        return enc, self.text_mask[:length].to(device).expand(batch, -1)


class TextConditioning(nn.Module):
    """The caption as model tokens: per-token text encodings (projected, with learned positions)
    and the CLIP text embedding (one token), each with a learned null token that classifier-free
    guidance swaps in for dropped rows.

    A dropped caption becomes one valid null token followed by padding, so the unconditional
    prediction does not depend on how long the batch's captions were padded. With
    `null_text="empty_caption"` there are no null tokens: dropped rows get the empty caption's
    CLIP outputs (`NullCaption`) before projection, as Karlo and diffusers' unCLIP do.
    `embed_scale` multiplies the text embedding (default sqrt(D): unit-norm CLIP embeddings
    then have unit-variance entries; 1 for raw CLIP embeddings).
    """

    def __init__(
        self,
        embed_dim: int,
        text_width: int,
        max_text_len: int,
        dim: int,
        use_text_encodings: bool,
        *,
        embed_scale: Optional[float] = None,
        null_text: NullText = "learned",
    ) -> None:
        super().__init__()
        self.use_text_encodings = use_text_encodings
        self.null_text = null_text
        self.embed_scale = math.sqrt(embed_dim) if embed_scale is None else float(embed_scale)
        self.text_embed_proj = nn.Linear(embed_dim, dim)
        learned = null_text == "learned"
        if learned:
            self.null_embed_token = nn.Parameter(torch.randn(dim) * 0.02)
        else:
            self.null_caption = NullCaption(embed_dim, text_width, max_text_len)
        if use_text_encodings:
            self.text_proj = nn.Linear(text_width, dim)
            self.text_pos = nn.Parameter(torch.randn(max_text_len, dim) * 0.02)
            if learned:
                self.null_text_token = nn.Parameter(torch.randn(dim) * 0.02)

    def forward(
        self,
        text_embed: Tensor,
        text_encodings: Optional[Tensor],
        text_mask: Optional[Tensor],
        drop_encodings: Tensor,
        drop_embed: Tensor,
    ) -> tuple[Tensor, Tensor, Tensor]:
        """Returns `(tokens [B, L, dim], keep [B, L] bool, embed_token [B, dim])`; L = 0 without
        text encodings. `drop_*`: `[B]` bool, True where the null token replaces the input."""
        if self.null_text == "empty_caption":
            return self._with_empty_caption(text_embed, text_encodings, text_mask, drop_encodings, drop_embed)
        dtype = self.text_embed_proj.weight.dtype
        batch = text_embed.shape[0]
        embed_token = self.text_embed_proj(text_embed.to(dtype) * self.embed_scale)
        embed_token = torch.where(drop_embed[:, None], self.null_embed_token.to(dtype), embed_token)
        if not self.use_text_encodings:
            empty = embed_token.new_zeros(batch, 0, embed_token.shape[-1])
            return empty, torch.ones(batch, 0, dtype=torch.bool, device=empty.device), embed_token
        length = text_encodings.shape[1]
        tokens = self.text_proj(text_encodings.to(dtype))
        keep = torch.ones(batch, length, dtype=torch.bool, device=tokens.device) if text_mask is None else text_mask
        null_keep = torch.arange(length, device=tokens.device)[None, :] == 0
        tokens = torch.where(drop_encodings[:, None, None], self.null_text_token.to(dtype), tokens)
        keep = torch.where(drop_encodings[:, None], null_keep, keep)
        return tokens + self.text_pos[:length].to(dtype), keep, embed_token

    def _with_empty_caption(self, text_embed, text_encodings, text_mask, drop_encodings, drop_embed):
        dtype = self.text_embed_proj.weight.dtype
        text_embed, _, _ = self.null_caption.substitute(drop_embed, text_embed, None, None)
        embed_token = self.text_embed_proj(text_embed.to(dtype) * self.embed_scale)
        if not self.use_text_encodings:
            empty = embed_token.new_zeros(embed_token.shape[0], 0, embed_token.shape[-1])
            return empty, torch.ones(empty.shape[:2], dtype=torch.bool, device=empty.device), embed_token
        _, text_encodings, keep = self.null_caption.substitute(drop_encodings, None, text_encodings, text_mask)
        tokens = self.text_proj(text_encodings.to(dtype))
        return tokens + self.text_pos[: tokens.shape[1]].to(dtype), keep, embed_token


def resolve_cond_drop(
    module: nn.Module, batch: int, device: torch.device, null_cond: Optional[Tensor], cond_drop: Optional[dict[str, Tensor]]
) -> dict[str, Tensor]:
    """Which rows lose which condition: explicit `cond_drop`, else random draws while training,
    else none; `null_cond` rows lose every condition on top of that."""
    if cond_drop is None:
        if null_cond is None and module.training:
            cond_drop = module.draw_cond_drop(batch, device)
        else:
            cond_drop = {k: torch.zeros(batch, dtype=torch.bool, device=device) for k in module.cond_names}
    if set(cond_drop) != set(module.cond_names) or any(v.shape != (batch,) for v in cond_drop.values()):
        shapes = {k: tuple(v.shape) for k, v in cond_drop.items()}
        raise ValueError(f"cond_drop must map exactly {list(module.cond_names)} to [{batch}] bool masks, got {shapes}")
    cond_drop = {k: v.to(device=device, dtype=torch.bool) for k, v in cond_drop.items()}
    if null_cond is not None:
        if null_cond.shape != (batch,):
            raise ValueError(f"null_cond must be a [{batch}] bool mask, got shape {tuple(null_cond.shape)}")
        null_cond = null_cond.to(device=device, dtype=torch.bool)
        cond_drop = {k: v | null_cond for k, v in cond_drop.items()}
    return cond_drop


def draw_text_drop(
    cfg: Any, batch: int, device: torch.device, generator: Optional[torch.Generator] = None
) -> dict[str, Tensor]:
    """Training-time classifier-free-guidance dropout of a prior's caption conditions:
    `{"text_encodings": [B] bool, "text_embed": [B] bool}` (True = replaced by its null token).

    A row loses both together with probability `cfg.text_drop`: that is the fully
    unconditional input guidance contrasts against, so it is trained at that rate (unCLIP sec.
    2.2 drops "this text conditioning information 10% of the time"). On top of it, each part
    alone is dropped independently with `cfg.text_encodings_drop` / `cfg.text_embed_drop`
    (0 in the paper), so P(both dropped) = text_drop + (1 - text_drop) * e * m."""
    draws = draw_bernoulli(
        {"both": cfg.text_drop, "text_encodings": cfg.text_encodings_drop, "text_embed": cfg.text_embed_drop},
        batch, device, generator,
    )
    return {"text_encodings": draws["both"] | draws["text_encodings"], "text_embed": draws["both"] | draws["text_embed"]}


def draw_bernoulli(
    probs: dict[str, float], batch: int, device: torch.device, generator: Optional[torch.Generator] = None
) -> dict[str, Tensor]:
    """Independent `[batch]` bool masks, True with probability `probs[name]`, on `device`
    (drawn on the generator's device, so a CPU generator works for any model)."""
    gen_device = generator.device if generator is not None else device
    return {
        name: (torch.rand(batch, generator=generator, device=gen_device) < p).to(device)
        for name, p in probs.items()
    }
