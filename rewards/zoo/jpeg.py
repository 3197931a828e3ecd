"""JPEG compressibility and incompressibility (DDPO, Black et al. 2023).

The image is quantised to uint8 (``round(255 x)``), encoded by PIL as JPEG at quality 95, and
the file size is measured in kB (1 kB = 1000 bytes).  Compressibility is ``-size``,
incompressibility ``+size``.  Black-box: no gradient (use them for steering and evaluation).
"""

from __future__ import annotations

import io

import torch
from torch import Tensor

from align.core.errors import check_range

from ..base import Reward
from ..registry import register_reward

JPEG_QUALITY = 95


def to_uint8_images(images: Tensor) -> list:
    """[B, 3, H, W] in [0, 1] -> list of PIL RGB images (``round(255 x)``)."""
    from PIL import Image

    array = (images.detach().float() * 255).round().clamp(0, 255).to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()
    return [Image.fromarray(a) for a in array]


def jpeg_size_kb(images: Tensor, quality: int = JPEG_QUALITY) -> Tensor:
    """JPEG file size in kB of each image of [B, 3, H, W] in [0, 1], as float32 [B] on the images' device."""
    sizes = []
    for image in to_uint8_images(images):
        buffer = io.BytesIO()
        image.save(buffer, format="JPEG", quality=quality)
        sizes.append(buffer.tell() / 1000)
    return torch.tensor(sizes, dtype=torch.float32, device=images.device)


class _JpegSize(Reward):
    differentiable = False
    sign = 1.0

    def __init__(self, *, quality: int = JPEG_QUALITY, **kwargs):
        super().__init__(**kwargs)
        check_range("quality", quality, 1, 95, integer=True)
        self.quality = quality

    def _score(self, images: Tensor, prompts: list[str]) -> Tensor:
        return self.sign * jpeg_size_kb(images, self.quality)


@register_reward("jpeg_compressibility")
class JpegCompressibility(_JpegSize):
    """Minus the JPEG size in kB (quality 95): smaller files score higher."""

    name = "jpeg_compressibility"
    sign = -1.0


@register_reward("jpeg_incompressibility")
class JpegIncompressibility(_JpegSize):
    """The JPEG size in kB (quality 95): larger files score higher."""

    name = "jpeg_incompressibility"
    sign = 1.0
