"""Images between tensors and pixels: the one place that converts, crops and lays out grids.

Tensors are `[batch, 3, H, W]` float in [-1, 1] (what every stage reads and writes); pixels
are uint8 `[batch, H, W, 3]` or PIL RGB images. Nothing here reads or writes files: callers
open and save (`Image.open`, `grid(...).save(path)`).

The crop policy is defined once, here, for training data and sampling inputs alike: scale the
shorter side to the target size and cut the centred square (`resize_center_crop` on PIL images,
used by the data loader and the CLIP precompute; `resize_center_crop_tensor` on tensors, used
by the sampling pipeline and the CLIP adapter). Never squash: a CLIP or a decoder sees a
sampling input exactly as it saw its training images.
"""

from __future__ import annotations

import math
import textwrap
from typing import Optional, Sequence, Union

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageDraw, ImageFont
from torch import Tensor

Pixels = Union[np.ndarray, Tensor]


def to_uint8(images: Tensor) -> np.ndarray:
    """`[B, 3, H, W]` in [-1, 1] -> uint8 `[B, H, W, 3]` (NaN as mid-grey, values clamped)."""
    if images.ndim != 4 or images.shape[1] != 3:
        raise ValueError(f"images must be [batch, 3, height, width], got shape {tuple(images.shape)}")
    x = torch.nan_to_num(images.detach().float(), nan=0.0).clamp(-1, 1)
    return ((x + 1) * 127.5).round().to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()


def to_pil(images: Tensor) -> list[Image.Image]:
    """`[B, 3, H, W]` in [-1, 1] -> B PIL RGB images."""
    return [Image.fromarray(a) for a in to_uint8(images)]


def from_uint8(images: Pixels) -> Tensor:
    """uint8 `[B, H, W, 3]` (or one `[H, W, 3]`) -> float32 `[B, 3, H, W]` (or `[3, H, W]`) in [-1, 1].

    On the CPU this runs in numpy: torch's multi-threaded elementwise kernels are slower than
    one thread for batch-sized arrays on a busy machine. On an accelerator it runs there.
    """
    if isinstance(images, Tensor) and images.device.type != "cpu":
        x = images.permute(0, 3, 1, 2) if images.ndim == 4 else images.permute(2, 0, 1)
        return x.to(torch.float32, memory_format=torch.contiguous_format).div_(127.5).sub_(1.0)
    arr = images.numpy() if isinstance(images, Tensor) else images
    arr = np.moveaxis(arr, -1, -3).astype(np.float32)
    arr *= 1 / 127.5
    arr -= 1.0
    return torch.from_numpy(arr)


def from_pil(image: Image.Image) -> Tensor:
    """A PIL image (any mode) -> float32 `[3, H, W]` in [-1, 1]."""
    return from_uint8(np.asarray(image.convert("RGB"), dtype=np.uint8))


def crop_geometry(width: int, height: int, size: int) -> tuple[int, int, int, int]:
    """The crop policy: `(new_width, new_height, left, top)`: resize to `new_*` (shorter side
    `size`, aspect kept), then cut the `size` x `size` square at `(left, top)`, centred."""
    scale = size / min(width, height)
    new_w, new_h = max(size, round(width * scale)), max(size, round(height * scale))
    return new_w, new_h, (new_w - size) // 2, (new_h - size) // 2


def resize_center_crop(img: Image.Image, size: int) -> Image.Image:
    """A PIL image -> `size` x `size` by `crop_geometry` (bicubic; `reducing_gap` box-reduces
    big downscales first, which is fast and alias-free)."""
    new_w, new_h, left, top = crop_geometry(*img.size, size)
    if (new_w, new_h) != img.size:
        img = img.resize((new_w, new_h), Image.Resampling.BICUBIC, reducing_gap=3.0)
    if (new_w, new_h) != (size, size):
        img = img.crop((left, top, left + size, top + size))
    return img


def resize_center_crop_tensor(images: Tensor, size: int) -> Tensor:
    """`[batch, C, H, W]` -> `[batch, C, size, size]` by `crop_geometry` (bicubic, antialiased,
    clamped to [-1, 1] only where it resized); unchanged when already `size` x `size`."""
    if images.ndim != 4:
        raise ValueError(f"images must be [batch, channels, height, width], got shape {tuple(images.shape)}")
    height, width = images.shape[-2:]
    new_w, new_h, left, top = crop_geometry(width, height, size)
    if (new_h, new_w) != (height, width):
        images = F.interpolate(images.float(), size=(new_h, new_w), mode="bicubic", antialias=True, align_corners=False)
        images = images.clamp(-1, 1)
    return images[..., top : top + size, left : left + size]


def grid(
    images: Tensor,
    columns: Optional[int] = None,
    captions: Optional[Sequence[str]] = None,
    *,
    pad: int = 0,
    min_cell: int = 0,
) -> Image.Image:
    """`images` `[B, 3, H, W]` in [-1, 1] laid out row-major in `columns` (default ~sqrt(B)).

    `pad` px of white between and around cells; cells narrower than `min_cell` px are enlarged
    (nearest neighbour, whole factors) so a caption fits; each caption is wrapped under its image.
    """
    pixels = to_uint8(images)
    batch, height, width, _ = pixels.shape
    if captions is not None and len(captions) != batch:
        raise ValueError(f"grid: {len(captions)} captions for {batch} images")
    scale = max(1, math.ceil(min_cell / width)) if min_cell else 1
    cell_w, cell_h = width * scale, height * scale
    font = ImageFont.load_default()
    line_h = _text_size(font, "Ag")[1] + 2
    chars = max(4, int(cell_w / max(1, _text_size(font, "abcdefghij")[0] / 10)))
    wrapped = [textwrap.wrap(c, chars)[:4] for c in captions] if captions is not None else [[] for _ in range(batch)]
    text_h = line_h * max((len(lines) for lines in wrapped), default=0) + (4 if captions else 0)
    columns = columns or math.ceil(math.sqrt(batch))
    rows = math.ceil(batch / columns)
    canvas = Image.new("RGB", (columns * (cell_w + pad) + pad, rows * (cell_h + text_h + pad) + pad), "white")
    draw = ImageDraw.Draw(canvas)
    for i in range(batch):
        x = pad + (i % columns) * (cell_w + pad)
        y = pad + (i // columns) * (cell_h + text_h + pad)
        tile = Image.fromarray(pixels[i])
        canvas.paste(tile if scale == 1 else tile.resize((cell_w, cell_h), Image.NEAREST), (x, y))
        for j, line in enumerate(wrapped[i]):
            draw.text((x, y + cell_h + 2 + j * line_h), line, fill="black", font=font)
    return canvas


def grid_of_rows(rows: Sequence[Tensor]) -> Image.Image:
    """Rows of images, each `[n_i, 3, H, W]` in [-1, 1] (same H, W), one row each, cut to the
    shortest row, no padding: a training run's sample grid (inputs, samples, references)."""
    n = min(r.shape[0] for r in rows)
    return grid(torch.cat([r[:n].float() for r in rows]), columns=n)


def _text_size(font: ImageFont.ImageFont, text: str) -> tuple[int, int]:
    left, top, right, bottom = font.getbbox(text)
    return right - left, bottom - top
