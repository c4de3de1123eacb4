"""Decoding one raw sample's members: images, captions, embeddings. No pickle, ever.

Each decoder raises `Skip(reason)` on bad data; the stream catches it and counts the reason.
"""

from __future__ import annotations

import io
import warnings
from typing import Optional, Union

import numpy as np
import torch
from PIL import Image

from models.images import from_uint8, resize_center_crop

IMAGE_EXTS = ("jpg", "jpeg", "png", "webp")
CAPTION_EXTS = ("txt",)
DEFAULT_MAX_CAPTION_BYTES = 16 * 1024
# PIL's own default is ~89M pixels; a 1024 px training set needs far less, and a tighter
# limit bounds each worker's memory against decompression bombs.
DEFAULT_MAX_IMAGE_PIXELS = 64 * 2**20


class Skip(Exception):
    """This sample is skipped for `reason` (one of data_pipeline.stats.REASONS)."""

    def __init__(self, reason: str, detail: str = ""):
        super().__init__(reason, detail)
        self.reason = reason
        self.detail = detail


def find_image(fields: dict[str, bytes]) -> Optional[bytes]:
    for ext in IMAGE_EXTS:
        if ext in fields:
            return fields[ext]
    return None


def decode_caption(fields: dict[str, bytes], max_bytes: int = DEFAULT_MAX_CAPTION_BYTES) -> str:
    data = fields.get("txt")
    if data is None:
        raise Skip("missing_caption")
    if len(data) > max_bytes:
        raise Skip("caption_too_long", f"{len(data)} bytes")
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError:
        raise Skip("caption_not_utf8") from None
    text = " ".join(text.split())
    if not text:
        raise Skip("missing_caption", "blank")
    return text


def open_image(data: Optional[bytes], max_pixels: int = DEFAULT_MAX_IMAGE_PIXELS, min_size: int = 0,
               draft_size: Optional[int] = None) -> Image.Image:
    """Decode image bytes to RGB; refuses (Skip) bombs, garbage, truncation and tiny images.

    The pixel limit is checked from the header, before any pixel is decoded. `draft_size`
    lets JPEG decode at 1/2, 1/4 or 1/8 scale for free while staying >= that size.
    """
    if data is None:
        raise Skip("missing_image")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            img = Image.open(io.BytesIO(data))
            width, height = img.size
            if width * height > max_pixels:
                raise Skip("image_too_large", f"{width}x{height}")
            if min(width, height) < max(min_size, 1):
                raise Skip("image_too_small", f"{width}x{height}")
            if draft_size is not None:
                img.draft("RGB", (draft_size, draft_size))
            img = img.convert("RGB")
            img.load()
    except Skip:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning):
        raise Skip("image_too_large") from None
    except Exception as err:  # noqa: BLE001 - PIL raises many types on corrupt data
        raise Skip("undecodable_image", type(err).__name__) from None
    return img


def image_to_uint8(img: Image.Image) -> np.ndarray:
    """RGB PIL image -> uint8 array [H, W, 3]; batches are converted to float in one step
    (`models.images.from_uint8`)."""
    return np.asarray(img, dtype=np.uint8)


def decode_image_uint8(data: Optional[bytes], size: Optional[int], max_pixels: int = DEFAULT_MAX_IMAGE_PIXELS) -> np.ndarray:
    """Image bytes -> uint8 array [size, size, 3] (native size if `size` is None)."""
    img = open_image(data, max_pixels, draft_size=size)
    if size is not None:
        img = resize_center_crop(img, size)
    return image_to_uint8(img)


def decode_image(data: Optional[bytes], size: Optional[int], max_pixels: int = DEFAULT_MAX_IMAGE_PIXELS) -> torch.Tensor:
    """Image bytes -> FloatTensor [3, size, size] in [-1, 1] (native size if `size` is None)."""
    return from_uint8(decode_image_uint8(data, size, max_pixels))


def decode_npy(data: Union[bytes, np.ndarray, None], *, expect_dim: Optional[int] = None,
               missing: str = "missing_embedding") -> np.ndarray:
    """A `.npy` member (or an array already read) -> array, checked for NaN/inf and its
    trailing dimension. Pickled object arrays are refused."""
    if data is None:
        raise Skip(missing)
    if isinstance(data, np.ndarray):
        arr = data
    else:
        try:
            arr = np.load(io.BytesIO(data), allow_pickle=False)
        except Exception as err:  # noqa: BLE001 - malformed headers raise several types
            raise Skip("bad_embedding", type(err).__name__) from None
    if arr.dtype.kind not in "fiub":
        raise Skip("bad_embedding", f"dtype {arr.dtype}")
    if expect_dim is not None and (arr.ndim == 0 or arr.shape[-1] != expect_dim):
        raise Skip("embedding_dim_mismatch", f"shape {arr.shape}, expected last dim {expect_dim}")
    if arr.dtype.kind == "f" and not np.isfinite(arr).all():
        raise Skip("nan_embedding")
    return arr


def encode_npy(arr: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, np.ascontiguousarray(arr), allow_pickle=False)
    return buf.getvalue()
