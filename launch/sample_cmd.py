"""`unclip sample`: text->image, variations, interpolation and text diffs from trained weights.

Checks every input first (options, prompts, images, device, weights: one line and exit 2 on
a bad one), then samples on `--device` (bf16 autocast on CUDA unless `--precision fp32`) and
writes PNGs (and a GIF for interpolations) under `--out`, printing their paths. Imports
nothing from the trainer.
"""

from __future__ import annotations

import argparse
import contextlib
import sys
from pathlib import Path
from typing import Any, Iterator

import torch
from PIL import Image, UnidentifiedImageError

from data_pipeline.io import mask_urls_in
from launch.cli import EXIT_OK, EXIT_RUNTIME, EXIT_USAGE
from launch.url_checks import check_urls
from models.clip import ClipConfig
from models.images import from_pil, to_pil
from models.loading import load_pipeline
from models.pipeline import per_upsampler

PROMPT_BATCH = 16
# prior sampling option -> its flag
PRIOR_FLAGS = {"guidance_scale": "--prior-guidance", "steps": "--prior-steps", "sampler": "--prior-sampler",
               "temperature": "--temperature", "top_k": "--top-k"}
# what the applications decoding from an inverted latent or interpolating fix themselves
FIXED = {"variations": ("sampler",), "interpolate": ("sampler", "guidance"), "text_diff": ("sampler", "guidance")}


def read_image(path: str) -> torch.Tensor:
    """An image file as `[3, H, W]` in [-1, 1] (any size: the pipeline crops it)."""
    try:
        with Image.open(path) as img:
            return from_pil(img)
    except (OSError, UnidentifiedImageError) as err:
        raise ValueError(f"cannot read image {path}: {err}") from None


def mode(args: argparse.Namespace) -> str:
    if args.prompt is not None or args.prompts is not None:
        return "text_to_image"
    return "variations" if args.variations else "interpolate" if args.interpolate else "text_diff"


def check_args(args: argparse.Namespace) -> None:
    """ValueError (one line) for options out of range or not applying to the chosen mode."""
    which = mode(args)
    if which == "text_diff" and not (args.from_text and args.to_text):
        raise ValueError("--text-diff needs --from TEXT and --to TEXT")
    at_least = {"-n": (args.n, 1), "--frames": (args.frames, 2), "--steps": (args.steps, 1),
                "--prior-steps": (args.prior_steps, 1), "--top-k": (args.top_k, 1)}
    for flag, (value, low) in at_least.items():
        if value is not None and value < low:
            raise ValueError(f"{flag} must be >= {low} (got {value})")
    for flag, value in (("--guidance", args.guidance), ("--prior-guidance", args.prior_guidance),
                        ("--temperature", args.temperature)):
        if value is not None and value < 0:
            raise ValueError(f"{flag} must be >= 0 (got {value})")
    if any(s < 1 for s in args.upsampler_steps or ()):
        raise ValueError(f"--upsampler-steps must be >= 1 (got {args.upsampler_steps})")
    if any(not 0 <= v <= 1 for v in args.upsampler_noise_level or ()):
        raise ValueError(f"--upsampler-noise-level must lie in [0, 1] (got {args.upsampler_noise_level})")
    if args.clip_pretrained and not args.clip:
        raise ValueError("--clip-pretrained needs --clip NAME (the open_clip architecture of those weights)")
    if which != "text_to_image":
        given = [PRIOR_FLAGS[k] for k, v in prior_options(args).items() if v is not None]
        if given:
            raise ValueError(f"{', '.join(given)}: the prior only runs for text-to-image (--prompt/--prompts)")
    for option in FIXED.get(which, ()):
        if getattr(args, option) is not None:
            how = "DDIM from the image's inverted latent" if which == "variations" else "deterministic, unguided DDIM"
            raise ValueError(f"--{option}: --{which.replace('_', '-')} decodes with {how}; it cannot be set")


def resolve_device(name: str) -> str:
    """`cpu`, `cuda` or `cuda:N`; ValueError if that device is not here."""
    if name == "cpu":
        return name
    if name != "cuda" and not (name.startswith("cuda:") and name[5:].isdigit()):
        raise ValueError(f"--device: expected cpu, cuda or cuda:N (got {name!r})")
    if not torch.cuda.is_available():
        raise ValueError(f"--device {name}: no CUDA device is available here (torch.cuda.is_available() is false)")
    index = int(name[5:]) if ":" in name else 0
    if index >= torch.cuda.device_count():
        raise ValueError(f"--device {name}: only {torch.cuda.device_count()} CUDA device(s) here")
    return name


@contextlib.contextmanager
def precision(device: str, choice: str) -> Iterator[None]:
    """bf16 autocast on CUDA (and on CPU with `--precision bf16`), else fp32. The diffusion
    state (x_t, schedules, guidance) stays float32 either way: only the networks run in bf16."""
    use_bf16 = choice == "bf16" or (choice == "auto" and device.startswith("cuda"))
    if not use_bf16:
        yield
        return
    with torch.autocast(device_type=device.split(":")[0], dtype=torch.bfloat16):
        yield


def prior_options(args: argparse.Namespace) -> dict[str, Any]:
    return {"guidance_scale": args.prior_guidance, "steps": args.prior_steps, "sampler": args.prior_sampler,
            "temperature": args.temperature, "top_k": args.top_k}


def decode_options(args: argparse.Namespace) -> dict[str, Any]:
    """The decoder's and upsamplers' options common to every mode (unset: their configs)."""
    return {"steps": args.steps, "upsampler_steps": args.upsampler_steps, "upsampler_noise_level": args.upsampler_noise_level}


def _check_prior(pipe, args: argparse.Namespace) -> dict[str, Any]:
    options = {k: v for k, v in prior_options(args).items() if v is not None}
    if pipe.prior is None:
        if options:
            raise ValueError(f"{', '.join(PRIOR_FLAGS[k] for k in options)}: --weights hold no prior")
        return options
    unknown = [PRIOR_FLAGS[k] for k in options if k not in pipe.prior.sampling_options]
    if unknown:
        raise ValueError(f"{', '.join(unknown)}: not an option of the {type(pipe.prior).__name__} in --weights")
    return options


def _check_upsamplers(pipe, args: argparse.Namespace) -> None:
    """The upsampler options fit the upsamplers in --weights (counts, trained noise levels)."""
    count = len(pipe.upsamplers)
    per_upsampler(args.upsampler_steps, count, "--upsampler-steps")
    for i, (up, level) in enumerate(zip(pipe.upsamplers, per_upsampler(args.upsampler_noise_level, count, "--upsampler-noise-level"))):
        trained = up.cfg.noise_aug.max_level if getattr(up, "noise_aug", None) is not None else 0.0
        if level is not None and level > trained:
            raise ValueError(
                f"--upsampler-noise-level {level}: upsampler {i + 1} ({up.cfg.lowres_size}->{up.cfg.image_size}) "
                f"was trained on levels 0..{trained} (model.noise_aug.max_level)"
            )


def _prompts(args: argparse.Namespace) -> list[str]:
    if args.prompt is not None:
        return [args.prompt]
    try:
        lines = Path(args.prompts).read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as err:
        raise ValueError(f"--prompts: cannot read {args.prompts}: {err}") from None
    prompts = [line.strip() for line in lines if line.strip()]
    if not prompts:
        raise ValueError(f"--prompts: {args.prompts} has no prompts (one per line)")
    return prompts


def _save(images: torch.Tensor, out: Path, stem: str) -> list[Path]:
    paths = []
    for i, img in enumerate(to_pil(images)):
        path = out / f"{stem}_{i:03d}.png"
        img.save(path)
        paths.append(path)
    return paths


def _text_to_image(pipe, args, prompts: list[str], prior: dict[str, Any], out: Path) -> list[Path]:
    from tqdm import tqdm

    prompts = [p for p in prompts for _ in range(args.n)]
    options = dict(decode_options(args), decoder_guidance=args.guidance, sampler=args.sampler, prior_options=prior)
    paths: list[Path] = []
    batches = range(0, len(prompts), PROMPT_BATCH)
    for start in tqdm(batches, unit="batch", disable=len(batches) == 1 or not sys.stderr.isatty()):
        images = pipe.text_to_image(prompts[start : start + PROMPT_BATCH], seed=args.seed + start, **options)
        for offset, img in enumerate(to_pil(images)):
            path = out / f"prompt_{start + offset:04d}.png"
            img.save(path)
            paths.append(path)
    (out / "prompts.txt").write_text("".join(f"prompt_{i:04d}.png\t{p}\n" for i, p in enumerate(prompts)))
    return paths


def _sample(pipe, args, inputs: dict[str, Any], out: Path) -> list[Path]:
    which, options = mode(args), decode_options(args)
    if which == "text_to_image":
        return _text_to_image(pipe, args, inputs["prompts"], inputs["prior"], out)
    if which == "variations":
        images = pipe.variations(inputs["images"][0][None], n=args.n, seed=args.seed, decoder_guidance=args.guidance, **options)
        return _save(images, out, "variation")
    if which == "interpolate":
        frames = pipe.interpolate(*inputs["images"], args.frames, seed=args.seed, **options)
        gif = out / "interpolation.gif"
        pil = to_pil(frames)
        pil[0].save(gif, save_all=True, append_images=pil[1:], duration=200, loop=0)
        return _save(frames, out, "frame") + [gif]
    images = pipe.text_diff(inputs["images"][0], args.from_text, args.to_text, seed=args.seed, **options)
    return _save(images, out, "text_diff")


def run(args: argparse.Namespace) -> list[Path]:
    check_args(args)
    which = mode(args)
    inputs: dict[str, Any] = {}
    if which == "text_to_image":
        inputs["prompts"] = _prompts(args)
    else:
        paths = {"variations": [args.variations], "interpolate": args.interpolate, "text_diff": [args.text_diff]}[which]
        inputs["images"] = [read_image(p) for p in paths]
    device = resolve_device(args.device)
    clip = ClipConfig(name=args.clip, pretrained=args.clip_pretrained) if args.clip else None
    pipe = load_pipeline(args.weights, device=device, clip=clip)
    inputs["prior"] = _check_prior(pipe, args)
    _check_upsamplers(pipe, args)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    with precision(device, args.precision):
        return _sample(pipe, args, inputs, out)


def main(args: argparse.Namespace) -> int:
    check_urls("--weights", args.weights)
    try:
        paths = run(args)
    except ValueError as err:  # bad input, WeightsError included
        print(f"unclip sample: {mask_urls_in(str(err))}", file=sys.stderr)
        return EXIT_USAGE
    except OSError as err:  # a failure at run time: disk, an object store (its message names it)
        print(f"unclip sample: {mask_urls_in(str(err))}", file=sys.stderr)
        return EXIT_RUNTIME
    except RuntimeError as err:  # torch's (CUDA out of memory, ...): the type says what failed
        print(f"unclip sample: {type(err).__name__}: {mask_urls_in(str(err))}", file=sys.stderr)
        return EXIT_RUNTIME
    for path in paths:
        print(path)
    return EXIT_OK
