"""Small image utilities: grids, PNG/GIF writing (imageio), tensor <-> uint8."""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from torch import Tensor


def to_uint8(images: Tensor) -> np.ndarray:
    """[B, 3, H, W] in [0, 1] -> uint8 array [B, H, W, 3]."""
    arr = images.detach().float().clamp(0, 1).mul(255).round().to(torch.uint8)
    return arr.permute(0, 2, 3, 1).cpu().numpy()


def make_grid(images: Tensor, ncols: int | None = None, padding: int = 2, pad_value: int = 255) -> np.ndarray:
    """Tile a batch into one uint8 image [H', W', 3] with ``ncols`` columns."""
    arr = to_uint8(images)
    n, h, w, c = arr.shape
    ncols = ncols or max(1, math.ceil(math.sqrt(n)))
    nrows = math.ceil(n / ncols)
    grid = np.full((nrows * (h + padding) + padding, ncols * (w + padding) + padding, c), pad_value, np.uint8)
    for k in range(n):
        r, col = divmod(k, ncols)
        y, x = padding + r * (h + padding), padding + col * (w + padding)
        grid[y : y + h, x : x + w] = arr[k]
    return grid


def upscale(image: np.ndarray, factor: int) -> np.ndarray:
    """Nearest-neighbour upscaling, so that tiny images stay crisp in reports."""
    return image.repeat(factor, axis=0).repeat(factor, axis=1) if factor > 1 else image


def save_png(image: np.ndarray | Tensor, path: str | Path, scale: int = 1) -> Path:
    import imageio.v3 as iio

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    if isinstance(image, Tensor):
        image = make_grid(image)
    iio.imwrite(path, upscale(image, scale))
    return path


def save_grid(images: Tensor, path: str | Path, ncols: int, min_tile: int = 128) -> Path:
    """A grid of ``images`` [N, 3, H, W] with ``ncols`` columns, tiles enlarged (nearest) to at least
    ``min_tile`` pixels wide so that small models' images can be seen."""
    return save_png(make_grid(images, ncols=ncols), path, scale=max(1, min_tile // images.shape[-1]))


def save_gif(frames: Sequence[np.ndarray], path: str | Path, fps: float = 6.0, scale: int = 1) -> Path:
    """Animated GIF (looping) from uint8 frames of equal shape."""
    import imageio.v3 as iio

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    iio.imwrite(path, np.stack([upscale(f, scale) for f in frames]), duration=1000.0 / fps, loop=0)
    return path
