"""The one adapter over open_clip: load any architecture, encode text and images."""

from __future__ import annotations

from typing import Optional

from models.config import config_dataclass


@config_dataclass
class ClipConfig:
    """`name`: an open_clip architecture (e.g. `ViT-L-14`) or a registered tiny one;
    `pretrained`: None (random weights), an open_clip pretrained tag, or a local file path."""

    name: str = "ViT-B-32"
    pretrained: Optional[str] = None
