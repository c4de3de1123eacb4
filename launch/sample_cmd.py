"""`unclip sample`: text->image, variations, interpolation and text diffs from exported weights.

Writes PNGs (and a GIF for interpolations) under `--out` and prints their paths.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
from PIL import Image, UnidentifiedImageError

from launch.cli import EXIT_OK, EXIT_RUNTIME, EXIT_USAGE
from models.images import from_pil, to_pil
from models.loading import load_pipeline

PROMPT_BATCH = 16


def read_image(path: str) -> torch.Tensor:
    """An image file as `[3, H, W]` in [-1, 1]."""
    try:
        with Image.open(path) as img:
            return from_pil(img)
    except (OSError, UnidentifiedImageError) as err:
        raise ValueError(f"cannot read image {path}: {err}") from None


def _save(images: torch.Tensor, out: Path, stem: str) -> list[Path]:
    out.mkdir(parents=True, exist_ok=True)
    paths = []
    for i, img in enumerate(to_pil(images)):
        path = out / f"{stem}_{i:03d}.png"
        img.save(path)
        paths.append(path)
    return paths


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


def _text_to_image(pipe, args, out: Path) -> list[Path]:
    from tqdm import tqdm

    prompts = [p for p in _prompts(args) for _ in range(args.n)]
    paths: list[Path] = []
    options = dict(decoder_guidance=args.guidance, steps=args.steps, sampler=args.sampler)
    batches = range(0, len(prompts), PROMPT_BATCH)
    for start in tqdm(batches, unit="batch", disable=len(batches) == 1 or not sys.stderr.isatty()):
        chunk = prompts[start : start + PROMPT_BATCH]
        images = pipe.text_to_image(chunk, seed=args.seed + start, **options)
        for offset, img in enumerate(to_pil(images)):
            path = out / f"prompt_{start + offset:04d}.png"
            img.save(path)
            paths.append(path)
    (out / "prompts.txt").write_text("".join(f"prompt_{i:04d}.png\t{p}\n" for i, p in enumerate(prompts)))
    return paths


def _interpolate(pipe, args, out: Path) -> list[Path]:
    frames = pipe.interpolate(read_image(args.interpolate[0]), read_image(args.interpolate[1]),
                              args.frames, seed=args.seed, steps=args.steps)
    paths = _save(frames, out, "frame")
    gif = out / "interpolation.gif"
    pil = to_pil(frames)
    pil[0].save(gif, save_all=True, append_images=pil[1:], duration=200, loop=0)
    return paths + [gif]


def run(args: argparse.Namespace) -> list[Path]:
    if args.text_diff and not (args.from_text and args.to_text):
        raise ValueError("--text-diff needs --from TEXT and --to TEXT")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    pipe = load_pipeline(args.weights)
    if args.prompt is not None or args.prompts is not None:
        return _text_to_image(pipe, args, out)
    if args.variations:
        image = read_image(args.variations)[None]
        return _save(pipe.variations(image, n=args.n, seed=args.seed, steps=args.steps), out, "variation")
    if args.interpolate:
        return _interpolate(pipe, args, out)
    image = read_image(args.text_diff)
    images = pipe.text_diff(image, args.from_text, args.to_text, seed=args.seed, steps=args.steps)
    return _save(images, out, "text_diff")


def main(args: argparse.Namespace) -> int:
    try:
        paths = run(args)
    except ValueError as err:  # bad input, WeightsError included
        print(f"unclip sample: {err}", file=sys.stderr)
        return EXIT_USAGE
    except OSError as err:
        print(f"unclip sample: {err}", file=sys.stderr)
        return EXIT_RUNTIME
    for path in paths:
        print(path)
    return EXIT_OK
