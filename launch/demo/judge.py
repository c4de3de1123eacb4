"""The demo's independent judge: does a generated image show what its prompt says?

It uses none of the trained models. Colour, size and position come from the pixels
(`data_pipeline.shapes.measure`); the shape is found by template matching against the
ground-truth renderer: the foreground mask is compared (IoU) with masks of every shape drawn
at the measured centroid over a small grid of radii and rotations, and the best match wins.
"""

from __future__ import annotations

from functools import lru_cache
from typing import Iterable, Optional

import numpy as np
from PIL import Image, ImageDraw

from data_pipeline import shapes

_FOREGROUND_DISTANCE = 60.0  # as in shapes.measure: RGB distance from the background
_ANGLES = (-0.25, -0.125, 0.0, 0.125, 0.25)  # the renderer's rotation jitter, in radians
_RADII = tuple(np.linspace(0.10, 0.33, 12))  # circumradius as a fraction of the side


def foreground_mask(image: Image.Image | np.ndarray) -> np.ndarray:
    """Boolean `[H, W]`: pixels at least half-way from the background to the shape's colour.

    Half-way rather than a fixed distance: generated images have soft edges, and a fixed
    threshold would grow or shrink the mask with the amount of blur.
    """
    arr = np.asarray(image.convert("RGB") if isinstance(image, Image.Image) else image, dtype=np.float32)
    dist = np.linalg.norm(arr - np.asarray(shapes.BACKGROUND, np.float32), axis=-1)
    rough = dist > _FOREGROUND_DISTANCE
    if not rough.any():
        return rough
    return dist > 0.5 * np.percentile(dist[rough], 90)


@lru_cache(maxsize=4096)
def _template(shape: str, side: int, radius: float, angle: float, supersample: int = 4) -> np.ndarray:
    """Mask of `shape` centred in a `(2 side) x (2 side)` canvas, so any centroid can be cut out."""
    big = 2 * side * supersample
    img = Image.new("L", (big, big), 0)
    r = radius * side * supersample
    c = big / 2
    points = shapes._outline(shape, c, c, r, angle)
    draw = ImageDraw.Draw(img)
    if points is None:
        draw.ellipse([c - r, c - r, c + r, c + r], fill=255)
    else:
        draw.polygon(points, fill=255)
    small = img.resize((2 * side, 2 * side), Image.Resampling.BOX)
    return np.asarray(small) >= 128


def _iou(a: np.ndarray, b: np.ndarray) -> float:
    union = np.logical_or(a, b).sum()
    return float(np.logical_and(a, b).sum() / union) if union else 0.0


def classify_shape(image: Image.Image | np.ndarray) -> Optional[str]:
    """The shape whose rendered mask best overlaps the image's foreground; None if empty."""
    mask = foreground_mask(image)
    side = mask.shape[0]
    if mask.sum() < 3:
        return None
    ys, xs = np.nonzero(mask)
    cy, cx = int(round(ys.mean())), int(round(xs.mean()))
    best, best_iou = None, -1.0
    for shape in shapes.SHAPES:
        for radius in _RADII:
            for angle in _ANGLES:
                tpl = _template(shape, side, float(radius), angle)
                # the template's centre is at (side, side); shift it onto the centroid. Triangles'
                # and stars' centroids are not their circumcentres: search a small offset too.
                for dy in (-1, 0, 1) if shape in ("triangle", "star") else (0,):
                    top, left = side - cy + dy * max(1, side // 32), side - cx
                    window = tpl[top : top + side, left : left + side]
                    iou = _iou(mask, window)
                    if iou > best_iou:
                        best, best_iou = shape, iou
    return best


def judge(image: Image.Image | np.ndarray, expected: shapes.ShapeAttributes) -> dict[str, bool]:
    """Whether colour and shape (and size, position) of `image` match `expected`."""
    measured = shapes.measure(image if isinstance(image, Image.Image) else Image.fromarray(np.asarray(image)))
    shape = classify_shape(image)
    return {
        "colour": measured.get("colour") == expected.colour,
        "shape": shape == expected.shape,
        "size": measured.get("size") == expected.size,
        "position": measured.get("position") == expected.position,
    }


def attribute_accuracy(images: Iterable[Image.Image], expected: Iterable[shapes.ShapeAttributes]) -> dict[str, float]:
    """Fraction of images whose colour / shape / size / position match, and both colour+shape."""
    results = [judge(img, attrs) for img, attrs in zip(images, expected)]
    if not results:
        raise ValueError("attribute_accuracy: no images to judge")
    out = {key: float(np.mean([r[key] for r in results])) for key in results[0]}
    out["colour_and_shape"] = float(np.mean([r["colour"] and r["shape"] for r in results]))
    out["count"] = len(results)
    return out
