"""The embedded demo dataset: coloured shapes on a softly lit dark background, with captions
written the way real ones are.

Every sample is a pure function of (seed, index): its scene (one object, or two side by
side), what its caption says about it, the lighting and a little jitter come from a generator
seeded with both, and it renders with PIL at any resolution. So the demo needs no download,
and `attributes_for_key(key)` gives any sample's ground truth from its key alone (the demo's
checker uses it, and `measure` reads colour/size/position back from pixels).

Captions leave attributes open as real captions do: a fifth of single-object captions omit the
colour, and two fifths each omit the size and the position; then the image shows any value of
the omitted attribute with equal odds, which is what the demo's diversity measure compares
samples against. A fifth of scenes hold two small objects (left/right or top/bottom), so that
attribute binding, the paper's named limitation, can be measured. The colour/shape pairs in
`HELD_OUT_PAIRS` never occur in training data (`exclude_held_out`, the default), so prompts for
them test composition.
"""

from __future__ import annotations

import dataclasses
import math
import random
from typing import Iterable, Iterator, Optional, Union

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
# The lighting: a linear brightness ramp across the background, up to this many levels (of
# 255) either side of BACKGROUND, so real backgrounds are not flat and "background noise" of
# generated images has a real reference.
LIGHT_LEVELS = 8.0
# Colour/shape pairs never drawn when `exclude_held_out` is set, so a demo can prompt for
# compositions the models never saw.
HELD_OUT_PAIRS = frozenset({("red", "star"), ("blue", "triangle"), ("yellow", "square"), ("green", "circle")})
KEY_PREFIX = "shapes"
# What a single-object caption says, each with its own odds (the shape is always named).
SAYS_ODDS = {"colour": 0.8, "size": 0.6, "position": 0.6}
TWO_OBJECT_SHARE = 0.2
TWO_OBJECT_LAYOUTS = (("left", "right"), ("top", "bottom"))
TWO_OBJECT_SAYS_POSITION = 0.5  # two-object captions always name colours, half the time positions
ALL_SAID = ("colour", "size", "position")


@dataclasses.dataclass(frozen=True)
class ShapeAttributes:
    """One object: its colour, shape, size and position (names from the tables above)."""

    colour: str
    shape: str
    size: str
    position: str

    def phrase(self, says: Iterable[str] = ALL_SAID) -> str:
        """"a small red star on the left", naming only the attributes in `says` (and the shape)."""
        says = set(says)
        words = [self.size] * ("size" in says) + [self.colour] * ("colour" in says) + [self.shape]
        article = "an" if words[0][0] in "aeiou" else "a"
        return " ".join([article, *words] + [_POSITION_PHRASE[self.position]] * ("position" in says))

    @property
    def caption(self) -> str:
        return self.phrase()


@dataclasses.dataclass(frozen=True)
class Scene:
    """What one image shows (`objects`) and which attributes its caption names (`says`)."""

    objects: tuple[ShapeAttributes, ...]
    says: tuple[str, ...] = ALL_SAID

    @property
    def caption(self) -> str:
        return " and ".join(o.phrase(self.says) for o in self.objects)

    @property
    def open(self) -> tuple[str, ...]:
        """Attributes the caption leaves open, in ALL_SAID order."""
        return tuple(a for a in ALL_SAID if a not in self.says)

    @property
    def only(self) -> ShapeAttributes:
        """The object of a one-object scene."""
        if len(self.objects) != 1:
            raise ValueError(f"scene {self.caption!r} holds {len(self.objects)} objects, not one")
        return self.objects[0]


Drawable = Union[Scene, ShapeAttributes]


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


def allowed(colour: str, shape: str, exclude_held_out: bool) -> bool:
    return not (exclude_held_out and (colour, shape) in HELD_OUT_PAIRS)


def _pair(rng: random.Random, exclude_held_out: bool, avoid_colour: Optional[str] = None) -> tuple[str, str]:
    while True:
        colour, shape = rng.choice(list(COLOURS)), rng.choice(SHAPES)
        if colour != avoid_colour and allowed(colour, shape, exclude_held_out):
            return colour, shape


def single_object(rng: random.Random, exclude_held_out: bool = True) -> ShapeAttributes:
    """One object with every attribute uniform (held-out pairs redrawn when excluded)."""
    colour, shape = _pair(rng, exclude_held_out)
    return ShapeAttributes(colour, shape, rng.choice(list(SIZES)), rng.choice(list(POSITIONS)))


def two_objects(rng: random.Random, exclude_held_out: bool = True) -> tuple[ShapeAttributes, ShapeAttributes]:
    """Two small objects of different colours at the two ends of a random layout."""
    first, second = rng.choice(TWO_OBJECT_LAYOUTS)
    a = _pair(rng, exclude_held_out)
    b = _pair(rng, exclude_held_out, avoid_colour=a[0])
    return ShapeAttributes(*a, "small", first), ShapeAttributes(*b, "small", second)


def attributes(seed: int, index: int, exclude_held_out: bool = True) -> Scene:
    """The scene of sample `index` of the data set drawn with `seed`."""
    rng = _rng(seed, index)
    if rng.random() < TWO_OBJECT_SHARE:
        objects = list(two_objects(rng, exclude_held_out))
        rng.shuffle(objects)  # captions name either object first
        says = ("colour", "position") if rng.random() < TWO_OBJECT_SAYS_POSITION else ("colour",)
        return Scene(tuple(objects), says)
    obj = single_object(rng, exclude_held_out)
    return Scene((obj,), tuple(a for a in ALL_SAID if rng.random() < SAYS_ODDS[a]))


def attributes_for_key(key: str, exclude_held_out: bool = True) -> Scene:
    """Ground truth of the sample named `key` (as written by `unclip shards --source shapes`)."""
    seed, index = parse_key(key)
    return attributes(seed, index, exclude_held_out)


def _objects(drawable: Drawable) -> tuple[ShapeAttributes, ...]:
    return drawable.objects if isinstance(drawable, Scene) else (drawable,)


def _background(side: int, jit: Optional[random.Random]) -> Image.Image:
    """BACKGROUND lit by a linear ramp of random direction and strength (flat without jitter)."""
    if jit is None:
        return Image.new("RGB", (side, side), BACKGROUND)
    angle, strength = jit.uniform(0, 2 * math.pi), jit.uniform(0.3, 1.0) * LIGHT_LEVELS
    ramp = np.linspace(-1.0, 1.0, side, dtype=np.float32)
    light = strength * (math.cos(angle) * ramp[None, :] + math.sin(angle) * ramp[:, None]) / math.sqrt(2)
    pixels = np.asarray(BACKGROUND, np.float32) + light[..., None]
    return Image.fromarray(np.clip(np.rint(pixels), 0, 255).astype(np.uint8), "RGB")


def render(drawable: Drawable, size: int, jitter_seed: Optional[int] = None) -> Image.Image:
    """Draw a scene (or one object) on a `size`x`size` RGB image.

    `jitter_seed` lights the background and moves/scales/rotates each object slightly; without
    it the background is flat and every object sits exactly at its nominal place. Drawn at 4x
    and downsampled so edges are antialiased at every resolution.
    """
    jit = random.Random(jitter_seed) if jitter_seed is not None else None
    scale = 4
    side = size * scale
    img = _background(side, jit)
    draw = ImageDraw.Draw(img)
    for obj in _objects(drawable):
        cx, cy = POSITIONS[obj.position]
        radius, angle = SIZES[obj.size], 0.0
        if jit is not None:
            cx, cy = cx + jit.uniform(-0.03, 0.03), cy + jit.uniform(-0.03, 0.03)
            radius *= jit.uniform(0.9, 1.1)
            angle = jit.uniform(-0.25, 0.25)
        points = _outline(obj.shape, cx * side, cy * side, radius * side, angle)
        fill = COLOURS[obj.colour]
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


def jitter_seed(seed: int, index: int) -> int:
    return random.Random(f"{seed}:{index}:jitter").getrandbits(32)


def sample(seed: int, index: int, size: int, exclude_held_out: bool = True) -> tuple[str, Image.Image, str, Scene]:
    """(key, image, caption, scene) of sample `index` of the dataset drawn with `seed`."""
    scene = attributes(seed, index, exclude_held_out)
    return make_key(seed, index), render(scene, size, jitter_seed=jitter_seed(seed, index)), scene.caption, scene


def generate(count: int, size: int = 64, seed: int = 0, exclude_held_out: bool = True) -> Iterator[tuple[str, Image.Image, str, Scene]]:
    for index in range(count):
        yield sample(seed, index, size, exclude_held_out)


def measure(image: Image.Image | np.ndarray) -> dict[str, str]:
    """Read colour, size and position of one object back from pixels (the demo's checker).

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
