"""Image preprocessing shared by training, in-process embedding and the Triton Python model.

This file depends only on numpy and Pillow on purpose: export copies it next to the
Triton preprocessing model, so the server and the trainer run the very same code.
"""
from __future__ import annotations

import io
from typing import Sequence

import numpy as np
from PIL import Image, ImageOps

# Refuse decompression bombs early: 64 megapixels is far beyond any real photo we resize.
Image.MAX_IMAGE_PIXELS = 64_000_000


class ImageDecodeError(ValueError):
    """The bytes are not an image Pillow can decode."""


def decode_image(data: bytes) -> Image.Image:
    if not data:
        raise ImageDecodeError("empty image bytes")
    try:
        image = Image.open(io.BytesIO(data))
        image.load()
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as exc:
        raise ImageDecodeError(f"cannot decode image: {exc}") from exc
    return ImageOps.exif_transpose(image)


def to_rgb(image: Image.Image, background: Sequence[int]) -> Image.Image:
    """Composite transparency onto `background`; emoji and icons are mostly alpha."""
    if image.mode in ("RGBA", "LA") or (image.mode == "P" and "transparency" in image.info):
        rgba = image.convert("RGBA")
        canvas = Image.new("RGBA", rgba.size, tuple(background) + (255,))
        canvas.alpha_composite(rgba)
        return canvas.convert("RGB")
    return image.convert("RGB")


def letterbox(image: Image.Image, size: int, background: Sequence[int]) -> Image.Image:
    """Resize the longer side to `size` and pad the shorter, keeping the aspect ratio."""
    width, height = image.size
    scale = size / max(width, height)
    new_size = (max(1, round(width * scale)), max(1, round(height * scale)))
    resized = image.resize(new_size, Image.BICUBIC) if new_size != image.size else image
    if resized.size == (size, size):
        return resized
    canvas = Image.new("RGB", (size, size), tuple(background))
    canvas.paste(resized, ((size - new_size[0]) // 2, (size - new_size[1]) // 2))
    return canvas


def image_to_array(
    image: Image.Image,
    size: int,
    mean: Sequence[float],
    std: Sequence[float],
    background: Sequence[int] = (255, 255, 255),
) -> np.ndarray:
    """A decoded image -> float32 [3, size, size], normalised as the card says."""
    rgb = letterbox(to_rgb(image, background), size, background)
    array = np.asarray(rgb, dtype=np.float32) / 255.0
    array = (array - np.asarray(mean, dtype=np.float32)) / np.asarray(std, dtype=np.float32)
    return np.ascontiguousarray(array.transpose(2, 0, 1))


def preprocess_image_bytes(
    data: bytes,
    size: int,
    mean: Sequence[float],
    std: Sequence[float],
    background: Sequence[int] = (255, 255, 255),
) -> np.ndarray:
    return image_to_array(decode_image(data), size, mean, std, background)
