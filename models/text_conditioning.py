"""The caption as transformer tokens for the priors, and their classifier-free-guidance dropout.

Both priors condition on the same inputs (CLIP's per-token text encodings with a padding mask,
and the CLIP text embedding) and drop them the same way; this module holds that shared part.
"""

from __future__ import annotations

import math
from typing import Any, Optional

import torch
from torch import Tensor, nn


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


class TextConditioning(nn.Module):
    """The caption as model tokens: per-token text encodings (projected, with learned positions)
    and the CLIP text embedding (one token), each with a learned null token that classifier-free
    guidance swaps in for dropped rows.

    A dropped caption becomes one valid null token followed by padding, so the unconditional
    prediction does not depend on how long the batch's captions were padded.
    """

    def __init__(self, embed_dim: int, text_width: int, max_text_len: int, dim: int, use_text_encodings: bool) -> None:
        super().__init__()
        self.use_text_encodings = use_text_encodings
        # CLIP embeddings are unit-norm: sqrt(D) gives their entries unit variance.
        self.embed_scale = math.sqrt(embed_dim)
        self.text_embed_proj = nn.Linear(embed_dim, dim)
        self.null_embed_token = nn.Parameter(torch.randn(dim) * 0.02)
        if use_text_encodings:
            self.text_proj = nn.Linear(text_width, dim)
            self.text_pos = nn.Parameter(torch.randn(max_text_len, dim) * 0.02)
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
