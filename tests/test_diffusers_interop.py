"""unclip <-> diffusers' unCLIP (Karlo's layout), proved against diffusers' own classes.

diffusers' PriorTransformer, UNet2DConditionModel + UnCLIPTextProjModel, UNet2DModel and a
transformers CLIP text encoder are built at tiny sizes with random weights and saved with
`save_pretrained`; unclip imports the folder, and the same inputs must give the same
outputs (max abs difference <= 1e-4 in fp32) model by model, then one whole guided sampling
chain must give `UnCLIPPipeline`'s images from the same seed. Exporting the imported stages
writes a folder diffusers loads and samples identically from, and importing that folder
gives back the same tensors, bit for bit.
"""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

pytest.importorskip("diffusers", reason="diffusers is in the test extra: pip install -e '.[test]'")
pytest.importorskip("transformers", reason="transformers is in the test extra: pip install -e '.[test]'")

from diffusers import PriorTransformer, UnCLIPScheduler, UNet2DConditionModel, UNet2DModel  # noqa: E402
from diffusers.pipelines.deprecated.unclip import UnCLIPPipeline, UnCLIPTextProjModel  # noqa: E402
from transformers import CLIPTextConfig, CLIPTextModelWithProjection, CLIPTokenizer  # noqa: E402

from launch.diffusers_folder import read_component, write_clip_tokenizer  # noqa: E402
from launch.export_diffusers import write_unclip_folder  # noqa: E402
from launch.import_diffusers import read_unclip_folder  # noqa: E402
from models.clip import load_clip  # noqa: E402
from models.decoder import Decoder, DecoderConfig  # noqa: E402
from models.interop.diffusers_unet import Unmappable  # noqa: E402
from models.interop.hf_clip_text import from_hf  # noqa: E402
from models.pipeline import UnCLIPPipeline as OurPipeline  # noqa: E402
from models.unet import UNetConfig  # noqa: E402

DIM = 64  # unclip-tiny-77's CLIP: 64-d embeddings, text width 64, 77 tokens
TOL = 1e-4


def _randomize(module: torch.nn.Module, seed: int) -> None:
    """Random weights everywhere (diffusers zero-initialises several tensors), O(1) signals."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in module.named_parameters():
            if p.ndim >= 2:
                p.copy_(torch.randn(p.shape, generator=g) / math.sqrt(p[0].numel()))
            elif "norm" in name and name.endswith("weight"):
                p.copy_(1 + 0.1 * torch.randn(p.shape, generator=g))
            else:
                p.copy_(0.1 * torch.randn(p.shape, generator=g))
        if isinstance(module, PriorTransformer):
            module.positional_embedding.mul_(0.1)
            module.clip_std.copy_(0.5 + torch.rand(module.clip_std.shape, generator=g))


def _tiny_pipeline(tokenizer_dir: Path) -> UnCLIPPipeline:
    prior = PriorTransformer(num_attention_heads=2, attention_head_dim=16, num_layers=2, embedding_dim=DIM, num_embeddings=77, additional_embeddings=4)
    decoder = UNet2DConditionModel(
        sample_size=8, layers_per_block=2, block_out_channels=(8, 16, 24), in_channels=3, out_channels=6,
        down_block_types=("ResnetDownsampleBlock2D", "SimpleCrossAttnDownBlock2D", "SimpleCrossAttnDownBlock2D"),
        up_block_types=("SimpleCrossAttnUpBlock2D", "SimpleCrossAttnUpBlock2D", "ResnetUpsampleBlock2D"),
        mid_block_type="UNetMidBlock2DSimpleCrossAttn", cross_attention_dim=12, class_embed_type="identity",
        attention_head_dim=8, resnet_time_scale_shift="scale_shift", norm_num_groups=4,
    )
    text_proj = UnCLIPTextProjModel(clip_extra_context_tokens=4, clip_embeddings_dim=DIM, time_embed_dim=32, cross_attention_dim=12)
    super_res = dict(
        sample_size=16, layers_per_block=1, block_out_channels=(8, 16), in_channels=6, out_channels=3, add_attention=False,
        down_block_types=("ResnetDownsampleBlock2D",) * 2, up_block_types=("ResnetUpsampleBlock2D",) * 2, norm_num_groups=4,
    )
    first, last = UNet2DModel(**super_res), UNet2DModel(**super_res)
    text_encoder = CLIPTextModelWithProjection(
        CLIPTextConfig(
            vocab_size=49408, hidden_size=DIM, intermediate_size=2 * DIM, projection_dim=DIM, num_hidden_layers=2,
            num_attention_heads=2, max_position_embeddings=77, hidden_act="gelu", bos_token_id=49406, eos_token_id=49407, pad_token_id=49407,
        )
    )
    for seed, module in enumerate((prior, decoder, text_proj, first, last, text_encoder)):
        _randomize(module, seed)
        module.eval()  # as from_pretrained leaves them (in train mode attention takes another kernel)
    return UnCLIPPipeline(
        prior=prior, decoder=decoder, text_encoder=text_encoder, tokenizer=CLIPTokenizer.from_pretrained(tokenizer_dir / "tokenizer"),
        text_proj=text_proj, super_res_first=first, super_res_last=last,
        prior_scheduler=UnCLIPScheduler(variance_type="fixed_small_log", prediction_type="sample", clip_sample_range=5.0),
        decoder_scheduler=UnCLIPScheduler(variance_type="learned_range", prediction_type="epsilon"),
        super_res_scheduler=UnCLIPScheduler(variance_type="fixed_small_log", prediction_type="epsilon"),
    )


@pytest.fixture(scope="module")
def built(tmp_path_factory) -> tuple[Path, UnCLIPPipeline]:
    """diffusers' pipeline, and the folder its `save_pretrained` wrote. (diffusers 0.42 cannot
    `from_pretrained` that folder: it records text_proj as ["diffusers", "UnCLIPTextProjModel"],
    a name it no longer resolves; unclip's import reads the folder without that index entry.)"""
    root = tmp_path_factory.mktemp("karlo")
    write_clip_tokenizer(root, 77)  # OpenAI's BPE in CLIPTokenizer's files, as unclip exports it
    pipe = _tiny_pipeline(root)
    pipe.save_pretrained(root / "pipe")
    return root / "pipe", pipe


@pytest.fixture(scope="module")
def folder(built) -> Path:
    return built[0]


@pytest.fixture(scope="module")
def theirs(built) -> UnCLIPPipeline:
    return built[1]


@pytest.fixture(scope="module")
def imported(folder):
    return {s.stage: s for s in read_unclip_folder(folder)}


def _clip_of(folder: Path):
    """unclip's CLIP adapter (open_clip, raw embeddings) with the folder's text encoder."""
    config, state = read_component(folder, "text_encoder")
    clip = load_clip("unclip-tiny-77", normalize=False)
    missing, unexpected = clip.model.load_state_dict(from_hf(state), strict=False)
    assert not unexpected and all(k.startswith("visual.") or k == "logit_scale" for k in missing)
    return clip


def _text(theirs: UnCLIPPipeline, prompts: list[str]):
    tokens = theirs.tokenizer(prompts, padding="max_length", max_length=77, truncation=True, return_tensors="pt")
    with torch.no_grad():
        out = theirs.text_encoder(tokens.input_ids)
    return out.text_embeds, out.last_hidden_state, tokens.attention_mask.bool()


PROMPTS = ["", "a red cube on the left", "a small blue ball next to a big green pyramid, at night"]


def test_text_encoder_is_open_clips_text_tower(folder, theirs):
    embed, hidden, mask = _text(theirs, PROMPTS)
    ours_embed, ours_enc, ours_mask = _clip_of(folder).encode_text(PROMPTS)
    assert torch.equal(mask, ours_mask)
    assert (embed - ours_embed).abs().max() <= TOL
    assert ((hidden - ours_enc) * mask[..., None]).abs().max() <= TOL


def test_prior_computes_the_same_function(theirs, imported):
    prior = imported["prior"].build()
    embed, hidden, mask = _text(theirs, PROMPTS)
    g = torch.Generator().manual_seed(0)
    x, t = torch.randn(3, DIM, generator=g), torch.tensor([0, 417, 999])
    with torch.no_grad():
        ref = theirs.prior(x, timestep=t, proj_embedding=embed, encoder_hidden_states=hidden, attention_mask=mask).predicted_image_embedding
        keep = torch.zeros(3, dtype=torch.bool)
        ours = prior(x, t, text_embed=embed, text_encodings=hidden, text_mask=mask, null_cond=keep)
        # encodings trimmed to the longest caption, as embedding shards store them: same outputs
        n = int(mask.sum(1).max())
        trimmed = prior(x, t, text_embed=embed, text_encodings=hidden[:, :n], text_mask=mask[:, :n], null_cond=keep)
        # the unconditional branch: the empty caption, from the folder's text encoder
        null = prior(x, t, text_embed=embed, text_encodings=hidden, text_mask=mask, null_cond=~keep)
        ref_null = theirs.prior(x, timestep=t, proj_embedding=embed[:1].expand(3, -1), encoder_hidden_states=hidden[:1].expand(3, -1, -1), attention_mask=mask[:1].expand(3, -1)).predicted_image_embedding
    assert (ref - ours).abs().max() <= TOL
    assert (ref - trimmed).abs().max() <= TOL
    assert (ref_null - null).abs().max() <= TOL
    assert ref.abs().max() > 0.1  # not a vacuous comparison


def test_decoder_with_its_text_projection_computes_the_same_function(theirs, imported):
    decoder = imported["decoder"].build()
    embed, hidden, mask = _text(theirs, PROMPTS)
    g = torch.Generator().manual_seed(1)
    x, image_embed, t = torch.randn(3, 3, 8, 8, generator=g), torch.randn(3, DIM, generator=g), torch.tensor([0, 250, 999])
    with torch.no_grad():
        # do_classifier_free_guidance stacks [learned null image embedding; image embedding]
        context, time_cond = theirs.text_proj(
            image_embeddings=image_embed, prompt_embeds=torch.cat([embed[:1].expand(3, -1), embed]),
            text_encoder_hidden_states=torch.cat([hidden[:1].expand(3, -1, -1), hidden]), do_classifier_free_guidance=True,
        )
        full_mask = torch.nn.functional.pad(torch.cat([mask[:1].expand(3, -1), mask]), (4, 0), value=True)
        ref = theirs.decoder(sample=torch.cat([x, x]), timestep=torch.cat([t, t]), encoder_hidden_states=context, class_labels=time_cond, attention_mask=full_mask).sample
        null = torch.arange(6) < 3
        ours = decoder(torch.cat([x, x]), torch.cat([t, t]), image_embed=torch.cat([image_embed, image_embed]), text_embed=torch.cat([embed, embed]),
                       text_encodings=torch.cat([hidden, hidden]), text_mask=torch.cat([mask, mask]), null_cond=null)
    assert ref.shape == ours.shape == (6, 6, 8, 8)
    assert (ref - ours).abs().max() <= TOL
    assert ref.abs().max() > 0.1


def test_each_super_resolution_unet_computes_the_same_function(theirs, imported):
    upsampler = imported["upsampler"].build()
    g = torch.Generator().manual_seed(2)
    x, lowres, t = torch.randn(2, 3, 16, 16, generator=g), torch.randn(2, 3, 16, 16, generator=g), torch.tensor([3, 998])
    with torch.no_grad():
        for last, unet in ((False, theirs.super_res_first), (True, theirs.super_res_last)):
            ref = unet(sample=torch.cat([x, lowres], dim=1), timestep=t).sample
            ours = upsampler(x, t, lowres_cond=lowres, last_step=last)
            assert (ref - ours).abs().max() <= TOL
            assert ref.abs().max() > 0.1


def _sample_theirs(pipe: UnCLIPPipeline, seed: int) -> torch.Tensor:
    out = pipe(
        PROMPTS[1:], prior_num_inference_steps=5, decoder_num_inference_steps=5, super_res_num_inference_steps=3,
        prior_guidance_scale=4.0, decoder_guidance_scale=8.0, generator=torch.Generator().manual_seed(seed), output_type="np",
    ).images
    return torch.from_numpy(out).permute(0, 3, 1, 2)


def test_one_sampling_chain_gives_the_pipelines_images(folder, theirs, imported):
    """Same seed, steps and guidance: the same initial noise and per-step noise (one generator
    drawn in the same order), DDPM over the same respaced steps with learned sigma in the
    decoder, fixed_small_log in the prior and super-resolution, the same clipping, the
    last-step UNet: the same images.

    Not to 1e-6: at each stage's final step (t = 0 -> x0) UnCLIPScheduler multiplies x0 by
    beta_0 / (1 - alphas_cumprod[0]), 1 in exact arithmetic but 0.99947 in its float32 table
    (1 - (1 - 4.1e-5) loses 3 digits); unclip returns x0. That moves pixels by up to 2.6e-4
    directly (1.2e-3 measured after it propagates through the super-resolution UNets), where
    a wrong sampling rule moves them by > 0.05 (the DDIM run below)."""
    ours_pipe = OurPipeline(_clip_of(folder), imported["prior"].build(), imported["decoder"].build(), [imported["upsampler"].build()])
    ref = _sample_theirs(theirs, seed=7)

    def ours(**kwargs) -> torch.Tensor:
        out = ours_pipe.text_to_image(
            PROMPTS[1:], prior_options={"guidance_scale": 4.0, "steps": 5}, decoder_guidance=8.0, steps=5, upsampler_steps=3, seed=7, **kwargs
        )
        return ((out + 1) / 2).clamp(0, 1)

    same = ours()
    assert same.shape == ref.shape == (2, 3, 16, 16)
    assert ref.std() > 0.05  # images, not a constant
    assert (same - ref).abs().max() <= 2e-3
    assert (same - ref).abs().mean() <= 5e-4
    assert (ours(sampler="ddim") - ref).abs().max() > 0.05


def test_export_loads_in_diffusers_and_imports_back_bit_exactly(tmp_path, folder, theirs, imported):
    stages = [(imported[s].config, imported[s].state) for s in ("prior", "decoder", "upsampler")]
    out = write_unclip_folder(tmp_path / "exported", *stages, clip=_clip_of(folder))
    exported = UnCLIPPipeline.from_pretrained(out)
    assert torch.equal(_sample_theirs(exported, seed=3), _sample_theirs(theirs, seed=3))
    again = {s.stage: s for s in read_unclip_folder(out)}
    for stage, first in imported.items():
        assert again[stage].model == first.model
        assert set(again[stage].state) == set(first.state)
        for key, value in first.state.items():
            assert torch.equal(again[stage].state[key], value), f"{stage}.{key} changed in the round trip"


def test_export_refuses_a_run_diffusers_cannot_express_and_names_why(tmp_path, folder, imported):
    tiny = UNetConfig(base_channels=8, channel_mults=(1, 2), num_res_blocks=1, attention_resolutions=(4,), head_channels=8, norm_groups=4)
    native = DecoderConfig(image_size=8, image_embed_dim=DIM, text_width=DIM, context_dim=12, unet=tiny)  # unclip's own decoder
    stages = [(imported["prior"].config, imported["prior"].state), (native, Decoder(native).state_dict()),
              (imported["upsampler"].config, imported["upsampler"].state)]
    with pytest.raises(Unmappable) as err:
        write_unclip_folder(tmp_path / "refused", *stages, clip=_clip_of(folder))
    message = str(err.value)
    for setting in ("clip_embeddings='unit'", "null_text='learned'", "use_text_embed=False", "context_norm='all_tokens'"):
        assert setting in message
    assert not (tmp_path / "refused").exists()
