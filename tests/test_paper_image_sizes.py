"""The paper-size image models have the paper's parameter counts (built on the meta device).

Figures: unCLIP (Ramesh et al. 2022) Table 3: decoder 3.5B, 64->256 upsampler 700M, 256->1024
upsampler 300M. The decoder's 3.5B is GLIDE's model, "roughly 2.3 billion parameters for the
visual part" plus a text transformer of "roughly 1.2 billion parameters" (Nichol et al. 2021,
sec. 4); ours reads frozen CLIP text encodings instead of training that transformer (see
configs/paper/decoder.yaml), so it is compared with 3.5B - 1.2B.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import yaml

from models.config import build_config
from models.decoder import Decoder, DecoderConfig, Upsampler, UpsamplerConfig

ROOT = Path(__file__).resolve().parents[1]
PAPER_DECODER = 3.5e9
GLIDE_TEXT_TRANSFORMER = 1.2e9


def _model_section(path: Path) -> dict:
    return yaml.safe_load(path.read_text())["model"]


def _count(model_cls, cfg) -> int:
    with torch.device("meta"):
        model = model_cls(cfg)
    return sum(p.numel() for p in model.parameters())


@pytest.mark.parametrize(
    "name, model_cls, cfg_cls, expected",
    [
        ("decoder", Decoder, DecoderConfig, PAPER_DECODER - GLIDE_TEXT_TRANSFORMER),
        ("upsampler_256", Upsampler, UpsamplerConfig, 700e6),
        ("upsampler_1024", Upsampler, UpsamplerConfig, 300e6),
    ],
)
def test_paper_parameter_counts(name, model_cls, cfg_cls, expected):
    path = ROOT / "configs" / "paper" / f"{name}.yaml"
    cfg = build_config(cfg_cls, _model_section(path), source=str(path))
    n = _count(model_cls, cfg)
    assert abs(n - expected) / expected < 0.15, f"{name}: {n / 1e6:.0f}M parameters, paper {expected / 1e6:.0f}M"


@pytest.mark.parametrize(
    "name, stage, cfg_cls",
    [
        ("paper/decoder", "decoder", DecoderConfig),
        ("paper/upsampler_256", "upsampler", UpsamplerConfig),
        ("paper/upsampler_1024", "upsampler", UpsamplerConfig),
        ("demo/decoder", "decoder", DecoderConfig),
        ("demo/upsampler", "upsampler", UpsamplerConfig),
    ],
)
def test_image_configs_validate_and_chain(name, stage, cfg_cls):
    path = ROOT / "configs" / f"{name}.yaml"
    data = yaml.safe_load(path.read_text())
    assert data["stage"] == stage
    cfg = build_config(cfg_cls, data["model"], source=str(path))
    assert isinstance(cfg, cfg_cls)


def test_image_stages_chain_in_size():
    def load(name, cls):
        return build_config(cls, _model_section(ROOT / "configs" / f"{name}.yaml"))

    decoder = load("paper/decoder", DecoderConfig)
    up1, up2 = load("paper/upsampler_256", UpsamplerConfig), load("paper/upsampler_1024", UpsamplerConfig)
    assert decoder.image_size == up1.lowres_size and up1.image_size == up2.lowres_size
    assert load("paper/upsampler_1024", UpsamplerConfig).image_size == 1024
    # the demo: a 32 px decoder and one upsampler to 64 px
    assert load("demo/decoder", DecoderConfig).image_size == load("demo/upsampler", UpsamplerConfig).lowres_size == 32
    assert load("demo/upsampler", UpsamplerConfig).image_size == 64
