"""Differentiable image statistics: cheap rewards for demos, tests and sanity checks."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from align.core.errors import AlignError

from ..base import Reward
from ..registry import register_reward

# ITU-R BT.601 luma weights
LUMA = (0.299, 0.587, 0.114)


@register_reward("brightness")
class Brightness(Reward):
    """Mean luma of the image, in [0, 1]."""

    name = "brightness"

    def _score(self, images: Tensor, prompts: list[str]) -> Tensor:
        w = images.new_tensor(LUMA).view(1, 3, 1, 1)
        return (images * w).sum(1).mean((1, 2))


@register_reward("darkness")
class Darkness(Reward):
    """1 - mean luma."""

    name = "darkness"

    def _score(self, images: Tensor, prompts: list[str]) -> Tensor:
        w = images.new_tensor(LUMA).view(1, 3, 1, 1)
        return 1.0 - (images * w).sum(1).mean((1, 2))


@register_reward("saturation")
class Saturation(Reward):
    """Mean colourfulness: per-pixel (max channel - min channel), averaged; in [0, 1]."""

    name = "saturation"

    def _score(self, images: Tensor, prompts: list[str]) -> Tensor:
        return (images.amax(1) - images.amin(1)).mean((1, 2))


@register_reward("colorfulness")
class Colorfulness(Reward):
    """Hasler and Suesstrunk's colourfulness on [0, 1] pixels: sigma_rgyb + 0.3 * mu_rgyb.

    With rg = R - G and yb = (R + G) / 2 - B per pixel, sigma_rgyb = sqrt(var(rg) + var(yb)) and
    mu_rgyb = sqrt(mean(rg)^2 + mean(yb)^2) over the image.  0 for any grey image.
    """

    name = "colorfulness"
    #: keeps the square roots differentiable at grey images
    eps = 1e-12

    def _score(self, images: Tensor, prompts: list[str]) -> Tensor:
        r, g, b = images.unbind(1)
        rg = (r - g).flatten(1)
        yb = (0.5 * (r + g) - b).flatten(1)
        spread = (rg.var(1, correction=0) + yb.var(1, correction=0) + self.eps).sqrt()
        offset = (rg.mean(1) ** 2 + yb.mean(1) ** 2 + self.eps).sqrt()
        return spread + 0.3 * offset


@register_reward("target_color")
class TargetColor(Reward):
    """Minus the mean squared distance of pixels to a target RGB colour (0 is best)."""

    name = "target_color"

    def __init__(self, color: Sequence[float] = (1.0, 0.0, 0.0), **kwargs):
        super().__init__(**kwargs)
        color = tuple(float(c) for c in color)
        if len(color) != 3 or not all(0.0 <= c <= 1.0 for c in color):
            raise AlignError(f"target_color color={color!r} must be three numbers in [0, 1] (RGB)")
        self.register_buffer("color", torch.tensor(color).view(1, 3, 1, 1), persistent=False)

    def _score(self, images: Tensor, prompts: list[str]) -> Tensor:
        return -((images - self.color) ** 2).mean((1, 2, 3))
