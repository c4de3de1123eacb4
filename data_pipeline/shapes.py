"""The embedded demo dataset: one coloured shape on a dark background, with a caption.

Every sample is a pure function of (seed, index): its attributes (colour, shape, size,
position) and a little jitter come from a generator seeded with both, and it renders with
PIL at any resolution. So the demo needs no download, and `attributes_for_key(key)` gives
any sample's ground truth from its key alone (the demo's checker uses it, and `measure`
reads colour/size/position back from pixels).
"""

from __future__ import annotations

import dataclasses
import math
import random
from typing import Iterator, Optional

import numpy as np
from PIL import Image, ImageDraw

# Far apart in RGB (pairwise distance > 110), none close to the background.
COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (230, 25, 25),
    "orange": (250, 140, 0),
    "yellow": (240, 240, 50),
    "green": (30, 190, 50),
    "cyan": (30, 220, 230),
    "blue": (40, 60, 245),
    "purple": (190, 40, 220),
    "white": (245, 245, 245),
}
SHAPES = ("circle", "square", "triangle", "star")
SIZES = {"small": 0.14, "large": 0.27}  # radius as a fraction of the image side
POSITIONS = {  # centre (x, y) as fractions of the side; y grows downwards
    "left": (0.29, 0.5),
    "right": (0.71, 0.5),
    "top": (0.5, 0.29),
    "bottom": (0.5, 0.71),
    "center": (0.5, 0.5),
}
_POSITION_PHRASE = {"left": "on the left", "right": "on the right", "top": "at the top",
                    "bottom": "at the bottom", "center": "in the center"}
BACKGROUND = (18, 18, 22)
# Colour/shape pairs never drawn when `exclude_held_out` is set, so a demo can prompt for
# compositions the models never saw.
HELD_OUT_PAIRS = frozenset({("red", "star"), ("blue", "triangle"), ("yellow", "square"), ("green", "circle")})
KEY_PREFIX = "shapes"


@dataclasses.dataclass(frozen=True)
class ShapeAttributes:
    colour: str
    shape: str
    size: str
    position: str

    @property
    def caption(self) -> str:
        return f"a {self.size} {self.colour} {self.shape} {_POSITION_PHRASE[self.position]}"


def make_key(seed: int, index: int) -> str:
    return f"{KEY_PREFIX}_{seed}_{index:08d}"


def parse_key(key: str) -> tuple[int, int]:
    """(seed, index) of a key made by `make_key`; ValueError otherwise."""
    parts = key.rsplit("/", 1)[-1].split("_")
    if len(parts) != 3 or parts[0] != KEY_PREFIX:
        raise ValueError(f"{key!r} is not a shapes-dataset key ({KEY_PREFIX}_<seed>_<index>)")
    return int(parts[1]), int(parts[2])


def _rng(seed: int, index: int) -> random.Random:
    return random.Random(f"{seed}:{index}")


def attributes(seed: int, index: int, exclude_held_out: bool = False) -> ShapeAttributes:
    rng = _rng(seed, index)
    while True:
        attrs = ShapeAttributes(rng.choice(list(COLOURS)), rng.choice(SHAPES), rng.choice(list(SIZES)),
                                rng.choice(list(POSITIONS)))
        if not (exclude_held_out and (attrs.colour, attrs.shape) in HELD_OUT_PAIRS):
            return attrs


def attributes_for_key(key: str, exclude_held_out: bool = False) -> ShapeAttributes:
    """Ground truth of the sample named `key` (as written by `unclip shards --source shapes`)."""
    seed, index = parse_key(key)
    return attributes(seed, index, exclude_held_out)


def render(attrs: ShapeAttributes, size: int, jitter_seed: Optional[int] = None) -> Image.Image:
    """Draw `attrs` on a `size`x`size` RGB image; `jitter_seed` moves/scales/rotates slightly.

    Drawn at 4x and downsampled so edges are antialiased at every resolution.
    """
    jit = random.Random(jitter_seed) if jitter_seed is not None else None
    scale = 4
    side = size * scale
    cx, cy = POSITIONS[attrs.position]
    radius = SIZES[attrs.size]
    angle = 0.0
    if jit is not None:
        cx, cy = cx + jit.uniform(-0.03, 0.03), cy + jit.uniform(-0.03, 0.03)
        radius *= jit.uniform(0.9, 1.1)
        angle = jit.uniform(-0.25, 0.25)
    img = Image.new("RGB", (side, side), BACKGROUND)
    draw = ImageDraw.Draw(img)
    points = _outline(attrs.shape, cx * side, cy * side, radius * side, angle)
    fill = COLOURS[attrs.colour]
    if points is None:
        r = radius * side
        draw.ellipse([cx * side - r, cy * side - r, cx * side + r, cy * side + r], fill=fill)
    else:
        draw.polygon(points, fill=fill)
    return img.resize((size, size), Image.Resampling.LANCZOS)


def _outline(shape: str, x: float, y: float, r: float, angle: float) -> Optional[list[tuple[float, float]]]:
    """Polygon vertices of `shape` centred at (x, y) with circumradius r; None for a circle."""
    if shape == "circle":
        return None
    if shape == "square":
        radii, count, start = [r * 0.9 * math.sqrt(2)], 4, math.pi / 4  # side 1.8 r
    elif shape == "triangle":
        radii, count, start = [r * 1.1], 3, -math.pi / 2
    elif shape == "star":
        radii, count, start = [r * 1.15, r * 0.48], 10, -math.pi / 2
    else:
        raise ValueError(f"unknown shape {shape!r} (known: {SHAPES})")
    pts = []
    for i in range(count):
        a = start + angle + 2 * math.pi * i / count
        rad = radii[i % len(radii)]
        pts.append((x + rad * math.cos(a), y + rad * math.sin(a)))
    return pts


def sample(seed: int, index: int, size: int, exclude_held_out: bool = False) -> tuple[str, Image.Image, str, ShapeAttributes]:
    """(key, image, caption, attributes) of sample `index` of the dataset drawn with `seed`."""
    attrs = attributes(seed, index, exclude_held_out)
    return make_key(seed, index), render(attrs, size, jitter_seed=random.Random(f"{seed}:{index}:jitter").getrandbits(32)), attrs.caption, attrs


def generate(count: int, size: int = 64, seed: int = 0, exclude_held_out: bool = False) -> Iterator[tuple[str, Image.Image, str, ShapeAttributes]]:
    for index in range(count):
        yield sample(seed, index, size, exclude_held_out)


def measure(image: Image.Image | np.ndarray) -> dict[str, str]:
    """Read colour, size and position back from pixels (the demo's independent checker).

    Foreground = pixels far from the background; colour = palette entry nearest their mean
    (using only the inner pixels, not the antialiased rim); size from the covered area;
    position from the centroid. Returns {} when no foreground is found.
    """
    arr = np.asarray(image.convert("RGB") if isinstance(image, Image.Image) else image).astype(np.float32)
    side = arr.shape[0]
    dist = np.linalg.norm(arr - np.array(BACKGROUND, np.float32), axis=-1)
    fg = dist > 60
    if fg.sum() < 2:
        return {}
    strong = dist > np.percentile(dist[fg], 50)
    mean = arr[strong].mean(0)
    colour = min(COLOURS, key=lambda c: float(np.linalg.norm(mean - np.array(COLOURS[c]))))
    ys, xs = np.nonzero(fg)
    cx, cy = xs.mean() / side + 0.5 / side, ys.mean() / side + 0.5 / side
    position = min(POSITIONS, key=lambda p: (POSITIONS[p][0] - cx) ** 2 + (POSITIONS[p][1] - cy) ** 2)
    # Area of a unit-radius shape ranges 1.3 (star) .. 3.24 (square); threshold in between.
    radius_est = math.sqrt(fg.sum() / (side * side) / 2.2)
    size = "large" if radius_est > (SIZES["small"] + SIZES["large"]) / 2 else "small"
    return {"colour": colour, "size": size, "position": position}
