"""The demo's independent judge: does a generated image show what its prompt says?

It uses none of the trained models. Colour, size and position come from the pixels
(`data_pipeline.shapes.measure`); the shape is found by template matching against the
ground-truth renderer: the foreground mask is compared (IoU) with masks of every shape drawn
at the measured centroid over a small grid of radii and rotations, and the best match wins.
Two-object scenes are judged one half of the image at a time (the layouts put one object in
each half); background noise is the spread of the pixels away from every object.
"""

from __future__ import annotations

from functools import lru_cache
from typing import Iterable, Optional, Sequence

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
                    # clamped: a centroid on the image's edge with the offset would cut the window short
                    top = min(max(side - cy + dy * max(1, side // 32), 0), side)
                    left = side - cx
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


def attribute_counts(images: Iterable[Image.Image], attribute: str) -> dict[str, int]:
    """How many images show each value of `attribute` ("shape", "colour", "size", "position");
    "none" counts images where no object was found."""
    counts: dict[str, int] = {}
    for img in images:
        value = classify_shape(img) if attribute == "shape" else shapes.measure(img).get(attribute)
        counts[value or "none"] = counts.get(value or "none", 0) + 1
    return counts


def total_variation(counts: dict[str, int], expected: dict[str, float]) -> float:
    """Total variation distance (in [0, 1]) between the empirical distribution of `counts` and
    the distribution `expected` (probabilities over values)."""
    n = sum(counts.values())
    if n == 0:
        raise ValueError("total_variation: no samples")
    values = set(counts) | set(expected)
    return 0.5 * sum(abs(counts.get(v, 0) / n - expected.get(v, 0.0)) for v in values)


def _half(image: Image.Image, position: str) -> Image.Image:
    """`image` with every pixel outside the half that holds `position` set to the background."""
    arr = np.array(image.convert("RGB"))
    side = arr.shape[0]
    cut = side // 2
    keep = {"left": np.s_[:, :cut], "right": np.s_[:, cut:], "top": np.s_[:cut, :], "bottom": np.s_[cut:, :]}[position]
    out = np.empty_like(arr)
    out[...] = shapes.BACKGROUND
    out[keep] = arr[keep]
    return Image.fromarray(out)


def judge_binding(image: Image.Image, scene: shapes.Scene) -> dict[str, bool]:
    """For a two-object scene: whether each object's half shows its colour, its shape, and both
    (the colour bound to the right shape) for both objects."""
    found = []
    for obj in scene.objects:
        half = _half(image, obj.position)
        found.append((shapes.measure(half).get("colour") == obj.colour, classify_shape(half) == obj.shape))
    return {"colours": all(c for c, _ in found), "shapes": all(s for _, s in found),
            "bound": all(c and s for c, s in found)}


def binding_accuracy(images: Sequence[Image.Image], scenes: Sequence[shapes.Scene]) -> dict[str, float]:
    """Fraction of two-object images with both colours right, both shapes right, and both objects
    right in colour and shape together ("bound")."""
    results = [judge_binding(img, scene) for img, scene in zip(images, scenes)]
    if not results:
        raise ValueError("binding_accuracy: no images to judge")
    out: dict[str, float] = {key: float(np.mean([r[key] for r in results])) for key in results[0]}
    out["count"] = len(results)
    return out


def _dilate(mask: np.ndarray, radius: int) -> np.ndarray:
    padded = np.pad(mask, radius)
    side_y, side_x = mask.shape
    out = np.zeros_like(mask)
    for dy in range(2 * radius + 1):
        for dx in range(2 * radius + 1):
            out |= padded[dy : dy + side_y, dx : dx + side_x]
    return out


def background_noise(images: Iterable[Image.Image]) -> float:
    """Mean over images of the standard deviation (levels of 255, per channel, averaged) of the
    background pixels: those more than 1/16 of the side away from anything far from the
    background colour, so an object's soft rim does not count as noise (all pixels where
    there are too few such)."""
    stds = []
    for img in images:
        arr = np.asarray(img.convert("RGB"), dtype=np.float32)
        dist = np.linalg.norm(arr - np.asarray(shapes.BACKGROUND, np.float32), axis=-1)
        near = _dilate(dist > _FOREGROUND_DISTANCE, max(1, arr.shape[0] // 16))
        # an image that is foreground nearly everywhere (speckle all over) is judged whole
        background = arr[~near] if (~near).sum() >= 16 else arr.reshape(-1, 3)
        stds.append(float(background.std(0).mean()))
    if not stds:
        raise ValueError("background_noise: no images")
    return float(np.mean(stds))
