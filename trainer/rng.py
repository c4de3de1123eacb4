"""Every random-number state a rank uses, captured and restored for exact resume.

Python's and NumPy's states go to JSON; torch's CPU (and CUDA) states and the stage's own
`torch.Generator` go to tensors, so no checkpoint file ever needs pickle to be read.
"""

from __future__ import annotations

import random
from typing import Any, Optional

import numpy as np
import torch
from torch import Tensor


def capture(generator: Optional[torch.Generator] = None) -> tuple[dict[str, Any], dict[str, Tensor]]:
    """(JSON-safe states, tensor states) of python, numpy, torch (CPU, CUDA) and `generator`."""
    version, internal, gauss = random.getstate()
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    plain = {
        "python": [version, list(internal), gauss],
        "numpy": [kind, keys.tolist(), int(pos), int(has_gauss), float(cached)],
    }
    tensors = {"rng/torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        tensors["rng/cuda"] = torch.cuda.get_rng_state()
    if generator is not None:
        tensors["rng/generator"] = generator.get_state()
    return plain, tensors


def restore(plain: dict[str, Any], tensors: dict[str, Tensor], generator: Optional[torch.Generator] = None) -> None:
    version, internal, gauss = plain["python"]
    random.setstate((version, tuple(internal), gauss))
    kind, keys, pos, has_gauss, cached = plain["numpy"]
    np.random.set_state((kind, np.asarray(keys, dtype=np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(tensors["rng/torch"])
    if "rng/cuda" in tensors and torch.cuda.is_available():
        torch.cuda.set_rng_state(tensors["rng/cuda"])
    if generator is not None and "rng/generator" in tensors:
        generator.set_state(tensors["rng/generator"])


def seed_everything(seed: int, generator: Optional[torch.Generator] = None) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)
    if generator is not None:
        generator.manual_seed(seed)
