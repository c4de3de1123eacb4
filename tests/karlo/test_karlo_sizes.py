"""configs/karlo/ at Karlo's sizes, on the meta device (no memory, no weights): the
parameter counts Karlo publishes (prior 1B, decoder 900M, super-resolution 700M + 700M), and
the architecture diffusers' own classes build from Karlo's conversion script's configs
mapping onto exactly these configs, with the same parameter counts."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from launch.config_files import load_config
from models.config import config_to_dict, deep_merge
from models.decoder import Decoder
from models.prior import DiffusionPrior
from models.upsampler import Upsampler

KARLO = Path(__file__).resolve().parents[2] / "configs" / "karlo"

# diffusers' scripts/convert_kakao_brain_unclip_to_diffusers.py: the prior uses
# PriorTransformer's defaults; the decoder and the super-resolution UNets these configs.
DECODER_CONFIG = dict(
    sample_size=64, layers_per_block=3, block_out_channels=(320, 640, 960, 1280), in_channels=3, out_channels=6,
    down_block_types=("ResnetDownsampleBlock2D", "SimpleCrossAttnDownBlock2D", "SimpleCrossAttnDownBlock2D", "SimpleCrossAttnDownBlock2D"),
    up_block_types=("SimpleCrossAttnUpBlock2D", "SimpleCrossAttnUpBlock2D", "SimpleCrossAttnUpBlock2D", "ResnetUpsampleBlock2D"),
    mid_block_type="UNetMidBlock2DSimpleCrossAttn", cross_attention_dim=1536, class_embed_type="identity",
    attention_head_dim=64, resnet_time_scale_shift="scale_shift",
)
SUPER_RES_CONFIG = dict(
    sample_size=256, layers_per_block=3, block_out_channels=(320, 640, 960, 1280), in_channels=6, out_channels=3,
    down_block_types=("ResnetDownsampleBlock2D",) * 4, up_block_types=("ResnetUpsampleBlock2D",) * 4, add_attention=False,
)
SCHEDULERS = {
    "prior": dict(variance_type="fixed_small_log", prediction_type="sample", clip_sample_range=5.0),
    "decoder": dict(variance_type="learned_range", prediction_type="epsilon"),
    "upsampler": dict(variance_type="fixed_small_log", prediction_type="epsilon"),
}


def _params(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


@pytest.fixture(scope="module")
def ours() -> dict[str, torch.nn.Module]:
    jobs = {stage: load_config(KARLO / f"{stage}.yaml") for stage in ("prior", "decoder", "upsampler")}
    with torch.device("meta"):
        return {
            "prior": DiffusionPrior(jobs["prior"].model),
            "decoder": Decoder(jobs["decoder"].model),
            "upsampler": Upsampler(jobs["upsampler"].model),
        }


def test_karlo_configs_have_karlos_parameter_counts(ours):
    assert _params(ours["prior"]) == pytest.approx(1.0e9, rel=0.05)
    assert _params(ours["decoder"]) == pytest.approx(900e6, rel=0.05)
    assert _params(ours["upsampler"].unet) == pytest.approx(700e6, rel=0.05)
    assert _params(ours["upsampler"].last_step_unet) == _params(ours["upsampler"].unet)
    # fine-tuning trains the first-steps UNet; the GAN-tuned last-step UNet stays frozen
    trainable = sum(p.numel() for p in ours["upsampler"].parameters() if p.requires_grad)
    assert trainable == _params(ours["upsampler"].unet)


def test_diffusers_karlo_architecture_imports_as_these_configs(ours):
    pytest.importorskip("diffusers", reason="diffusers is in the test extra: pip install -e '.[test]'")
    from diffusers import PriorTransformer, UnCLIPScheduler, UNet2DConditionModel, UNet2DModel
    from diffusers.pipelines.deprecated.unclip import UnCLIPTextProjModel

    from models.interop import diffusers_unclip as du

    with torch.device("meta"):
        prior = PriorTransformer()
        decoder = UNet2DConditionModel(**DECODER_CONFIG)
        text_proj = UnCLIPTextProjModel(time_embed_dim=1280, cross_attention_dim=1536)
        super_res = UNet2DModel(**SUPER_RES_CONFIG)
    schedulers = {stage: dict(UnCLIPScheduler(**kw).config) for stage, kw in SCHEDULERS.items()}
    imported = {
        "prior": du.prior_from_diffusers_config(dict(prior.config), schedulers["prior"]),
        "decoder": du.decoder_from_diffusers_config(dict(decoder.config), dict(text_proj.config), schedulers["decoder"], 77),
        "upsampler": du.upsampler_from_diffusers_config(dict(super_res.config), dict(super_res.config), schedulers["upsampler"], 64),
    }
    for stage, model in ours.items():
        shipped = config_to_dict(model.cfg)
        assert config_to_dict(type(model.cfg)(**deep_merge(shipped, imported[stage]))) == shipped, stage
    # same networks: diffusers keeps Karlo's CLIP statistics as parameters, unclip as buffers
    assert _params(prior) == _params(ours["prior"]) + 2 * 768
    assert _params(decoder) + _params(text_proj) == _params(ours["decoder"])
    assert _params(super_res) == _params(ours["upsampler"].unet)
