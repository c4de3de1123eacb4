"""The paper-size prior configs build models of the paper's size (on the meta device: no memory).

unCLIP (Ramesh et al. 2022) gives the priors' shapes in Appendix C / Table 3 and labels both
"1B". The diffusion prior is a width-2048, 24-block transformer: 12 * 2048^2 * 24 = 1.21B in
its blocks alone. Our AR prior is the paper's latent decoder (width 1664, 24 blocks: 0.80B),
conditioned on frozen CLIP text encodings instead of the paper's separately trained text
encoder. So each count is checked within 15% of the size its published shape implies, and
against the table's one-significant-figure label "1B" (0.5B <= n < 1.5B).
"""

from pathlib import Path

import pytest
import torch
import yaml

from models.config import build_config
from models.prior import ARPrior, ARPriorConfig, DiffusionPrior, DiffusionPriorConfig

ROOT = Path(__file__).resolve().parents[1]


def blocks_size(width: int, depth: int) -> int:
    """Parameters of `depth` transformer blocks of `width` with a 4x MLP (weights only)."""
    return 12 * width * width * depth


@pytest.mark.parametrize(
    "path, cfg_cls, model_cls, width, depth, heads",
    [
        ("configs/paper/prior.yaml", DiffusionPriorConfig, DiffusionPrior, 2048, 24, 32),
        ("configs/paper/prior_ar.yaml", ARPriorConfig, ARPrior, 1664, 24, 26),
    ],
)
def test_paper_prior_has_the_papers_size(path, cfg_cls, model_cls, width, depth, heads):
    job = yaml.safe_load((ROOT / path).read_text())
    assert job["stage"] == "prior"
    cfg = build_config(cfg_cls, job["model"], path)
    assert (cfg.dim, cfg.depth, cfg.heads, cfg.embed_dim) == (width, depth, heads, 1024)
    assert cfg.heads * cfg.dim_head == cfg.dim
    with torch.device("meta"):
        model = model_cls(cfg)
    count = sum(p.numel() for p in model.parameters())
    expected = blocks_size(width, depth)
    assert abs(count - expected) / expected < 0.15, (count, expected)
    assert 0.5e9 <= count < 1.5e9, count  # Table 3: "1B"
