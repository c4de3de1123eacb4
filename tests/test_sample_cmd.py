"""`unclip sample` as a user runs it: every option reaches its stage, every form of `--weights`
loads, a pretrained open_clip file stands in for a clip stage, and every bad input is one line
and exit 2 before any work.

The weights are real `unclip export` files of tiny stages (random weights, the real tiny CLIP
`unclip-tiny`), written with the export format's own writer.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from launch.cli import main
from models import stages
from models.clip import load_clip
from models.config import config_to_dict
from models.images import from_pil
from models.loading import load_pipeline
from models.weights import StageWeights, write_export

D, W, CONTEXT = 64, 64, 32  # unclip-tiny's embedding and text widths, context length
UNET = {"base_channels": 8, "channel_mults": [1, 2], "num_res_blocks": 1, "head_channels": 8, "norm_groups": 4}
FAST = {"timesteps": 100, "sample_steps": 2, "objective": "x0"}
CONFIGS = {
    "prior": {"stage": "prior", "clip": {"name": "unclip-tiny"}, "model": {
        "embed_dim": D, "text_width": W, "max_text_len": CONTEXT, "dim": 32, "depth": 1, "heads": 2, "dim_head": 16,
        "diffusion": FAST}},
    "prior_ar": {"stage": "prior", "clip": {"name": "unclip-tiny"}, "model": {
        "kind": "autoregressive", "embed_dim": D, "text_width": W, "max_text_len": CONTEXT, "dim": 32, "depth": 1,
        "heads": 2, "dim_head": 16, "num_buckets": 16, "dot_buckets": 8, "max_components": 4}},
    "decoder": {"stage": "decoder", "clip": {"name": "unclip-tiny"}, "model": {
        "image_size": 8, "image_embed_dim": D, "text_width": W, "max_text_len": CONTEXT, "context_dim": 16,
        "unet": {**UNET, "attention_resolutions": [4]}, "diffusion": {**FAST, "sampler": "ddpm", "guidance_scale": 3.0}}},
    "upsampler": {"stage": "upsampler", "model": {
        "lowres_size": 8, "image_size": 16, "unet": {**UNET, "attention_resolutions": []}, "diffusion": FAST,
        "noise_aug": {"max_level": 0.5, "sample_level": 0.2}}},
}


def _export(name: str, out: Path) -> Path:
    data = CONFIGS[name]
    spec = stages.get(data["stage"])
    cfg = spec.stage_config(data)
    torch.manual_seed(len(name))
    model = spec.build(cfg)
    # random weights everywhere (zero-initialised output layers would hide every input), large
    # enough that every option visibly changes the 8-bit images; x0 objectives keep them unsaturated
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn_like(p) * 0.3)
    if data["model"].get("kind") == "autoregressive":
        x = F.normalize(torch.randn(256, D, generator=torch.Generator().manual_seed(1)), dim=-1)
        model.fit_pca(x, F.normalize(x + torch.randn(256, D, generator=torch.Generator().manual_seed(2)), dim=-1))
    path = out / f"{name}.safetensors"
    write_export(StageWeights(data["stage"], 1, config_to_dict(cfg), model.state_dict(), name), path)
    return path


@pytest.fixture(scope="module")
def weights(tmp_path_factory) -> dict[str, Path]:
    """A demo-like output folder: ROOT/weights/{clip,prior,decoder,upsampler}.safetensors (and
    the autoregressive prior's export in ROOT/other/)."""
    root = tmp_path_factory.mktemp("sample")
    folder = root / "weights"
    folder.mkdir()
    clip = load_clip("unclip-tiny").model
    write_export(StageWeights("clip", 1, {"stage": "clip", "model": {"name": "unclip-tiny"}}, clip.state_dict(), "clip"),
                 folder / "clip.safetensors")
    paths = {name: _export(name, folder) for name in ("prior", "decoder", "upsampler")}
    (root / "other").mkdir()
    paths["prior_ar"] = _export("prior_ar", root / "other")
    paths.update(clip=folder / "clip.safetensors", root=root, folder=folder)
    wide = np.linspace(0, 255, 48 * 32 * 3).reshape(32, 48, 3).astype(np.uint8)
    Image.fromarray(wide).save(root / "wide.png")
    paths["image"] = root / "wide.png"
    return paths


def _sample(weights_args: list, *args: str, out: Path) -> int:
    return main(["sample", "--weights", *map(str, weights_args), *args, "--out", str(out)])


def _pixels(path: Path) -> np.ndarray:
    return np.asarray(Image.open(path))


STAGES = ("clip", "prior", "decoder", "upsampler")


def test_every_option_reaches_its_stage(weights, tmp_path, capsys):
    options = ["--prior-guidance", "2", "--prior-steps", "3", "--prior-sampler", "ddpm", "--guidance", "2",
               "--steps", "3", "--sampler", "ddim", "--upsampler-steps", "1", "--upsampler-noise-level", "0.3"]
    assert _sample([weights[s] for s in STAGES], "--prompt", "a red circle", *options, out=tmp_path / "a") == 0
    printed = capsys.readouterr().out.split()
    assert printed == [str(tmp_path / "a" / "prompt_0000.png")]
    pipe = load_pipeline([weights[s] for s in STAGES])
    expected = pipe.text_to_image(
        ["a red circle"], seed=0, prior_options={"guidance_scale": 2.0, "steps": 3, "sampler": "ddpm"},
        decoder_guidance=2.0, steps=3, sampler="ddim", upsampler_steps=[1], upsampler_noise_level=[0.3],
    )
    np.testing.assert_array_equal(_pixels(Path(printed[0])), np.asarray(pipe_png(expected)))
    # each option changes the image: none is ignored on the way
    other = {"--prior-guidance": "8", "--prior-steps": "1", "--prior-sampler": "ddim", "--guidance": "8",
             "--steps": "1", "--sampler": "ddpm", "--upsampler-steps": "2", "--upsampler-noise-level": "0"}
    for i in range(0, len(options), 2):
        changed = options.copy()
        changed[i + 1] = other[options[i]]
        out = tmp_path / options[i]
        assert _sample([weights[s] for s in STAGES], "--prompt", "a red circle", *changed, out=out) == 0
        assert not np.array_equal(_pixels(out / "prompt_0000.png"), _pixels(Path(printed[0]))), options[i]


def pipe_png(images: torch.Tensor) -> Image.Image:
    from models.images import to_pil

    return to_pil(images)[0]


def test_bf16_autocast_samples_close_to_fp32(weights, tmp_path):
    runs = {p: tmp_path / p for p in ("fp32", "bf16")}
    for choice, out in runs.items():
        assert _sample([weights["folder"]], "--prompt", "a blue square", "--precision", choice, out=out) == 0
    fp32, bf16 = (_pixels(out / "prompt_0000.png").astype(float) for out in runs.values())
    # of 255: the networks ran in bf16 (so not equal), the diffusion state in float32 (so close)
    assert 0 < np.abs(fp32 - bf16).mean() < 4, np.abs(fp32 - bf16).mean()


def test_autoregressive_prior_temperature_top_k_and_guidance(weights, tmp_path, capsys):
    ar = [weights["prior_ar"], weights["clip"], weights["decoder"], weights["upsampler"]]
    runs = {"greedy": ["--temperature", "0"], "topk": ["--temperature", "1", "--top-k", "2", "--prior-guidance", "3"]}
    for name, options in runs.items():
        assert _sample(ar, "--prompt", "a cat", "-n", "2", *options, out=tmp_path / name) == 0
    assert not np.array_equal(_pixels(tmp_path / "greedy" / "prompt_0000.png"), _pixels(tmp_path / "topk" / "prompt_0000.png"))
    capsys.readouterr()
    assert _sample([weights["folder"]], "--prompt", "a cat", "--temperature", "0.5", out=tmp_path / "x") == 2
    assert capsys.readouterr().err.strip() == "unclip sample: --temperature: not an option of the DiffusionPrior in --weights"


def test_weights_as_a_demo_output_folder_and_a_folder_of_exports(weights, tmp_path):
    for form in (weights["root"], weights["folder"]):
        out = tmp_path / form.name
        assert _sample([form], "--prompt", "a red circle", out=out) == 0
    np.testing.assert_array_equal(_pixels(tmp_path / weights["root"].name / "prompt_0000.png"),
                                  _pixels(tmp_path / weights["folder"].name / "prompt_0000.png"))


def test_a_pretrained_open_clip_file_stands_in_for_the_clip_stage(weights, tmp_path):
    stages_only = [weights[s] for s in ("prior", "decoder", "upsampler")]
    assert _sample(stages_only, "--prompt", "a red circle", "--clip", "unclip-tiny", "--clip-pretrained",
                   str(weights["clip"]), out=tmp_path / "file") == 0
    assert _sample([weights["folder"]], "--prompt", "a red circle", out=tmp_path / "stage") == 0
    np.testing.assert_array_equal(_pixels(tmp_path / "file" / "prompt_0000.png"), _pixels(tmp_path / "stage" / "prompt_0000.png"))


def test_image_applications_crop_their_inputs(weights, tmp_path, capsys):
    image = str(weights["image"])
    for mode in (["--variations", image, "-n", "2"], ["--interpolate", image, image, "--frames", "3"],
                 ["--text-diff", image, "--from", "a red circle", "--to", "a blue square"]):
        assert _sample([weights["folder"]], *mode, "--upsampler-noise-level", "0.1", out=tmp_path / mode[0]) == 0
    frames = [_pixels(tmp_path / "--interpolate" / f"frame_{i:03d}.png") for i in range(3)]
    assert frames[0].shape == (16, 16, 3) and all(np.array_equal(frames[0], f) for f in frames[1:])
    # the interpolation of a wide image with itself is the one of its centre square
    wide = from_pil(Image.open(image))
    centre = Image.fromarray(np.asarray(Image.open(image))[:, 8:40])
    centre.save(tmp_path / "centre.png")
    assert wide.shape[-2:] == (32, 48)
    assert _sample([weights["folder"]], "--interpolate", str(tmp_path / "centre.png"), str(tmp_path / "centre.png"),
                   "--frames", "2", "--upsampler-noise-level", "0.1", out=tmp_path / "centre") == 0
    diff = np.abs(_pixels(tmp_path / "centre" / "frame_000.png").astype(int) - frames[0].astype(int))
    assert diff.max() <= 1  # a uint8 rounding of the same floats


BAD = {
    "steps": (["--prompt", "x", "--steps", "0"], "--steps must be >= 1 (got 0)"),
    "n": (["--prompt", "x", "-n", "0"], "-n must be >= 1 (got 0)"),
    "frames": (["--interpolate", "IMG", "IMG", "--frames", "1"], "--frames must be >= 2 (got 1)"),
    "guidance": (["--prompt", "x", "--guidance", "-1"], "--guidance must be >= 0 (got -1.0)"),
    "noise level": (["--prompt", "x", "--upsampler-noise-level", "2"], "--upsampler-noise-level must lie in [0, 1]"),
    "device": (["--prompt", "x", "--device", "tpu"], "--device: expected cpu, cuda or cuda:N (got 'tpu')"),
    "cuda index": (["--prompt", "x", "--device", "cuda:99"], "--device cuda:99: "),
    "interpolate sampler": (["--interpolate", "IMG", "IMG", "--sampler", "ddpm"],
                            "--sampler: --interpolate decodes with deterministic, unguided DDIM; it cannot be set"),
    "text diff guidance": (["--text-diff", "IMG", "--from", "a", "--to", "b", "--guidance", "2"],
                           "--guidance: --text-diff decodes with deterministic, unguided DDIM; it cannot be set"),
    "variations prior": (["--variations", "IMG", "--prior-guidance", "2"],
                         "--prior-guidance: the prior only runs for text-to-image (--prompt/--prompts)"),
    "text diff texts": (["--text-diff", "IMG"], "--text-diff needs --from TEXT and --to TEXT"),
    "clip pretrained alone": (["--prompt", "x", "--clip-pretrained", "f.pt"], "--clip-pretrained needs --clip NAME"),
    "image": (["--variations", "MISSING.png"], "cannot read image MISSING.png"),
    "prompts file": (["--prompts", "MISSING.txt"], "--prompts: cannot read MISSING.txt"),
    "clip twice": (["--prompt", "x", "--clip", "unclip-tiny"], "--clip unclip-tiny and a clip stage in --weights"),
    "clip name": (["--prompt", "x", "--clip", "no-such-clip"], "--clip: clip.name: unknown open_clip architecture"),
    "upsampler steps": (["--prompt", "x", "--upsampler-steps", "1", "2"], "--upsampler-steps: 2 values for 1 upsampler"),
    "upsampler level": (["--prompt", "x", "--upsampler-noise-level", "0.7"],
                        "--upsampler-noise-level 0.7: upsampler 1 (8->16) was trained on levels 0..0.5"),
}


@pytest.mark.parametrize("case", sorted(BAD))
def test_bad_input_is_one_line_and_exit_2_before_any_work(case, weights, tmp_path, capsys):
    args, message = BAD[case]
    args = [str(weights["image"]) if a == "IMG" else a for a in args]
    given = [weights["folder"]] if case != "clip name" else [weights[s] for s in ("prior", "decoder", "upsampler")]
    out = tmp_path / "out"
    assert _sample(given, *args, out=out) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith(f"unclip sample: {message}"), err
    assert not out.exists()  # nothing written


def test_bad_weights_are_one_line_and_exit_2(weights, tmp_path, capsys):
    empty = tmp_path / "empty"
    (empty / "logs").mkdir(parents=True)
    cases = {
        "missing": ([tmp_path / "nope"], "no such file or directory"),
        "empty folder": ([empty], "no `unclip export` files (*.safetensors), weights/ folder or run directories in it"),
        "empty run": ([weights["folder"], tmp_path / "run"], "no complete checkpoint under"),
        "two decoders": ([weights["folder"], weights["decoder"]], "need exactly one decoder (got 2"),
        "no clip": ([weights[s] for s in ("prior", "decoder")], "no CLIP: add the clip stage's export"),
        "missing clip file": ([weights["decoder"], "--clip", "unclip-tiny", "--clip-pretrained", str(tmp_path / "c.pt")],
                              "--clip-pretrained: clip.pretrained: weights file"),
    }
    (tmp_path / "run" / "checkpoints").mkdir(parents=True)
    for name, (given, message) in cases.items():
        assert _sample(given, "--prompt", "x", out=tmp_path / "out") == 2, name
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and message in err, (name, err)
