"""Image files: conversion to uint8, grids, and PNG writes that never leave a half-written file."""

from __future__ import annotations

import math
import io

import numpy as np
from PIL import Image

from ldm_jax import storage


def to_uint8(images) -> np.ndarray:
    """[..., H, W, 3] floats in [-1, 1] -> uint8 in [0, 255]."""
    x = np.asarray(images, dtype=np.float32)
    return np.clip(np.round((x + 1.0) * 127.5), 0, 255).astype(np.uint8)


def make_grid(images: np.ndarray, ncol: int | None = None, pad: int = 2, pad_value: int = 255) -> np.ndarray:
    """Tiles uint8 [N, H, W, C] into one [rows*(H+pad)+pad, cols*(W+pad)+pad, C] image."""
    n, h, w, c = images.shape
    ncol = ncol or math.ceil(math.sqrt(n))
    nrow = math.ceil(n / ncol)
    grid = np.full((nrow * (h + pad) + pad, ncol * (w + pad) + pad, c), pad_value, dtype=np.uint8)
    for i, img in enumerate(images):
        r, col = divmod(i, ncol)
        y, x = pad + r * (h + pad), pad + col * (w + pad)
        grid[y : y + h, x : x + w] = img
    return grid


def save_png(path: str, image: np.ndarray, upscale: int = 1) -> None:
    """Writes uint8 [H, W, 3] to ``path`` (a local path or a ``gs://`` URL) atomically: whole or not at all."""
    img = Image.fromarray(image)
    if upscale > 1:
        img = img.resize((img.width * upscale, img.height * upscale), Image.Resampling.NEAREST)
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    storage.write_bytes(path, buf.getvalue())


def load_image(path: str, size: int = 0, what: str = "--init_image") -> np.ndarray:
    """An RGB image file as float32 [size, size, 3] in [-1, 1] (resized with Lanczos when its size differs; at its
    own size when ``size`` is 0)."""
    storage.check(path, what)
    if not storage.isfile(path):  # local or gs://
        raise FileNotFoundError(f"{what}={path!r}: no such file")
    with Image.open(io.BytesIO(storage.read_bytes(path))) as im:
        im = im.convert("RGB")
        if size and im.size != (size, size):
            im = im.resize((size, size), Image.LANCZOS)
        return np.asarray(im, np.float32) / 127.5 - 1.0


def load_mask(path: str, size: int, what: str = "--mask_image") -> np.ndarray:
    """A mask file as float32 [size, size, 1]: 1 where the image is to be repainted (white), 0 where kept (black).

    Resized with nearest-neighbour and thresholded at mid-grey (as diffusers binarises masks).
    """
    storage.check(path, what)
    if not storage.isfile(path):  # local or gs://
        raise FileNotFoundError(f"{what}={path!r}: no such file")
    with Image.open(io.BytesIO(storage.read_bytes(path))) as im:
        im = im.convert("L").resize((size, size), Image.NEAREST)
        mask = (np.asarray(im, np.float32) >= 128).astype(np.float32)[..., None]
    if not mask.any():
        raise ValueError(f"{what}={path!r}: the mask is all black at {size}x{size}: nothing to repaint")
    return mask
