"""models.images: tensor <-> pixels conversions and the grid layouts."""

import numpy as np
import pytest
import torch
from PIL import Image

from models.images import from_pil, from_uint8, grid, grid_of_rows, to_pil, to_uint8


def test_conversions_round_trip_and_clamp():
    pixels = np.random.default_rng(0).integers(0, 256, (2, 5, 7, 3), dtype=np.uint8)
    images = from_uint8(pixels)
    assert images.shape == (2, 3, 5, 7) and images.dtype == torch.float32
    assert images.min() >= -1 and images.max() <= 1
    assert np.array_equal(to_uint8(images), pixels)
    assert np.array_equal(np.asarray(to_pil(images)[1]), pixels[1])
    assert torch.equal(from_pil(Image.fromarray(pixels[0])), images[0])
    assert torch.equal(from_pil(Image.fromarray(pixels[0]).convert("L")), from_pil(Image.fromarray(pixels[0]).convert("L").convert("RGB")))
    odd = torch.tensor([float("nan"), 5.0, -5.0]).view(1, 3, 1, 1)
    assert to_uint8(odd).tolist() == [[[[128, 255, 0]]]]
    with pytest.raises(ValueError, match=r"\[batch, 3, height, width\]"):
        to_uint8(images[0])


def test_captioned_grid_places_images_and_captions():
    images = torch.stack([torch.full((3, 32, 32), -1.0), torch.full((3, 32, 32), 1.0), torch.zeros(3, 32, 32)])
    captions = ["black", "white", "a caption long enough to wrap under the image"]
    pixels = np.asarray(grid(images, captions=captions, pad=4, min_cell=128).convert("RGB"))
    # 32 px images are enlarged 4x to 128; 2 columns, pad 4
    assert pixels.shape[1] == 2 * (128 + 4) + 4
    assert (pixels[4 + 64, 4 + 64] == 0).all() and (pixels[4 + 64, 4 + 132 + 64] == 255).all()
    caption_band = pixels[4 + 128 : 4 + 128 + 12, 4 : 4 + 128]
    assert (caption_band < 128).any()  # text was drawn under the first image
    with pytest.raises(ValueError, match="2 captions for 3 images"):
        grid(images, captions=["a", "b"])


def test_grid_of_rows_layout():
    rows = [torch.full((3, 3, 2, 2), -1.0), torch.full((3, 3, 2, 2), 1.0)]
    rows[1][1, 0] = -1.0  # second sample: no red
    img = np.asarray(grid_of_rows(rows))
    assert img.shape == (4, 6, 3)
    assert (img[:2] == 0).all() and (img[2:, :2] == 255).all()
    assert (img[2:, 2:4, 0] == 0).all() and (img[2:, 2:4, 1:] == 255).all()
