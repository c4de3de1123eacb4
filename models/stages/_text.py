"""The caption conditions a batch carries, as the priors and the decoder take them."""

from __future__ import annotations

from typing import Optional

from torch import Tensor

from models.stages import Batch


def text_conditions(batch: Batch) -> dict[str, Optional[Tensor]]:
    """`text_encodings` `[B, L, W]` and `text_mask` `[B, L]` (bool) when the batch has them
    (the stage reads them), else None for both."""
    if "text_encodings" not in batch:
        return {"text_encodings": None, "text_mask": None}
    return {"text_encodings": batch["text_encodings"], "text_mask": batch["text_mask"].bool()}
