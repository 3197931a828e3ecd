"""Differentiable image preprocessing for reward models, in torch.

Reward models were trained on images prepared by PIL (resize with bicubic filtering, crop or
pad, scale to [0, 1], normalise).  Training images must keep their gradient, so they never go
through Hugging Face image processors (numpy, uint8, no autograd); these functions reproduce
the same geometry in torch:

* :func:`resize_shortest_side` + :func:`center_crop`: CLIP, PickScore, the aesthetic
  predictor, ImageReward (Hugging Face ``CLIPImageProcessor``: the long side becomes
  ``int(size * long / short)``, crop offsets ``(H - h) // 2``).
* :func:`resize_longest_side` + :func:`pad_to_square`: HPSv2 (open_clip ``ResizeMaxSize``:
  the short side becomes ``round(short * size / long)``, zero padding split
  ``pad // 2`` before and the rest after).
* :func:`resize` to ``size x size``, aspect ratio not kept ("stretch"): SigLIP (the aesthetic
  predictor v2.5; Hugging Face processors whose ``size`` is ``{"height", "width"}``).

Resizing uses ``interpolate(mode="bicubic", antialias=True)``, which is PIL's bicubic filter
(a = -0.5, support widened by the downscaling factor), in PIL's order: a horizontal pass, a clamp
to [0, 1] where PIL clips its uint8 intermediate image, a vertical pass, a clamp.  (Without the
intermediate clamp, sharp edges differ by up to 0.38 after normalisation; without antialiasing,
downsampled noise differs by up to 2.4, mean 0.7.)

Measured parity with ``transformers.CLIPImageProcessorPil`` (PIL backend), images quantised to
uint8 before both paths, sizes from 17x23 (upsampling) to 1000x900 (downsampling), float32 and float64, random noise,
smooth gradients, checkerboards and disks (``tests/test_rewards_preprocess.py``): maximum
absolute difference of the normalised pixels 0.017 (about 1.1/255 before normalisation), mean
0.004; identical when no resize is needed.  What remains is PIL's rounding of the intermediate
and final images to 8 bits and its fixed-point filter weights.  ``PARITY_TOLERANCE`` (0.02) is
the documented bound the tests enforce.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import Tensor

from align.core.errors import AlignError, check_choice, check_range

#: OpenAI CLIP normalisation (CLIP, PickScore, HPSv2, the aesthetic predictor, ImageReward)
OPENAI_CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_CLIP_STD = (0.26862954, 0.26130258, 0.27577711)

#: documented bound of |torch - PIL| on normalised pixels (see the module docstring)
PARITY_TOLERANCE = 0.02

ResizeMode = Literal["shortest", "longest", "stretch"]
RESIZE_MODES = ("shortest", "longest", "stretch")


def resize(images: Tensor, height: int, width: int, *, clamp: bool = True) -> Tensor:
    """Antialiased bicubic resize of [B, C, H, W] in [0, 1] (PIL's filter), clamped like uint8 output."""
    if images.shape[-2:] == (height, width):
        return images
    dtype = images.dtype
    # bicubic with antialias is implemented for float32/float64 on every device
    out = images if dtype in (torch.float32, torch.float64) else images.float()
    # PIL resizes in two passes, horizontal first, and clips the intermediate image to uint8:
    # at sharp edges the clip of the first pass's overshoot changes the second pass
    for size in ((out.shape[-2], width), (height, width)):
        if out.shape[-2:] != size:
            out = F.interpolate(out, size=size, mode="bicubic", antialias=True, align_corners=False)
            if clamp:
                out = out.clamp(0.0, 1.0)
    return out.to(dtype)


def shortest_side_size(height: int, width: int, size: int) -> tuple[int, int]:
    """Output (h, w) when the shortest side becomes ``size`` (Hugging Face rounding: truncate the long side)."""
    if width <= height:
        return int(size * height / width), size
    return size, int(size * width / height)


def longest_side_size(height: int, width: int, size: int) -> tuple[int, int]:
    """Output (h, w) when the longest side becomes ``size`` (open_clip rounding: round the short side)."""
    scale = size / max(height, width)
    return round(height * scale), round(width * scale)


def resize_shortest_side(images: Tensor, size: int, *, clamp: bool = True) -> Tensor:
    """Resize so that the shortest side is ``size``, keeping the aspect ratio."""
    return resize(images, *shortest_side_size(images.shape[-2], images.shape[-1], size), clamp=clamp)


def resize_longest_side(images: Tensor, size: int, *, clamp: bool = True) -> Tensor:
    """Resize so that the longest side is ``size``, keeping the aspect ratio."""
    return resize(images, *longest_side_size(images.shape[-2], images.shape[-1], size), clamp=clamp)


def center_crop(images: Tensor, height: int, width: int) -> Tensor:
    """Central crop (offsets ``(H - h) // 2``); zero-pads first where the image is smaller."""
    h, w = images.shape[-2:]
    if h < height or w < width:
        # same placement as transformers' center_crop: pad ceil((new - old) / 2) before
        new_h, new_w = max(h, height), max(w, width)
        top, left = -(-(new_h - h) // 2), -(-(new_w - w) // 2)
        images = F.pad(images, (left, new_w - w - left, top, new_h - h - top))
        h, w = new_h, new_w
    top, left = (h - height) // 2, (w - width) // 2
    return images[..., top : top + height, left : left + width]


def pad_to_square(images: Tensor, size: int, fill: float = 0.0) -> Tensor:
    """Pad [.., h, w] (both <= size) to size x size, ``pad // 2`` before and the rest after."""
    h, w = images.shape[-2:]
    if h > size or w > size:
        raise AlignError(f"pad_to_square: image {h}x{w} is larger than size={size}; resize it first")
    pad_h, pad_w = size - h, size - w
    return F.pad(images, (pad_w // 2, pad_w - pad_w // 2, pad_h // 2, pad_h - pad_h // 2), value=fill)


def normalize(images: Tensor, mean: Sequence[float], std: Sequence[float]) -> Tensor:
    """(images - mean) / std per channel."""
    m = images.new_tensor(mean).view(1, -1, 1, 1)
    s = images.new_tensor(std).view(1, -1, 1, 1)
    return (images - m) / s


@dataclass(frozen=True)
class ImagePreprocess:
    """A reward model's preprocessing: resize, crop or pad, normalise.

    Attributes:
        size: target length of the shortest side ("shortest") or longest side ("longest").
        resize_mode: "shortest" (then center crop), "longest" (then pad to a square) or "stretch"
            (both sides to ``size``, the aspect ratio not kept).
        crop_size: side of the center crop or of the padded square (None: ``size``).
        mean: per-channel normalisation mean.
        std: per-channel normalisation standard deviation.
        fill: value of padded pixels before normalisation (open_clip pads with black, 0).
    """

    size: int = 224
    resize_mode: ResizeMode = "shortest"
    crop_size: int | None = None
    mean: tuple[float, float, float] = OPENAI_CLIP_MEAN
    std: tuple[float, float, float] = OPENAI_CLIP_STD
    fill: float = 0.0

    def __post_init__(self):
        check_range("size", self.size, 1, integer=True)
        check_choice("resize_mode", self.resize_mode, RESIZE_MODES)
        if self.crop_size is not None:
            check_range("crop_size", self.crop_size, 1, integer=True)
        for field_name in ("mean", "std"):
            value = getattr(self, field_name)
            if len(value) != 3:
                raise AlignError(f"{field_name}={value!r} must have 3 values (RGB)")
            object.__setattr__(self, field_name, tuple(float(v) for v in value))
        if min(self.std) <= 0:
            raise AlignError(f"std={self.std!r} must be positive")

    @property
    def output_size(self) -> int:
        return self.crop_size or self.size

    def __call__(self, images: Tensor) -> Tensor:
        """[B, 3, H, W] in [0, 1] -> normalised [B, 3, S, S]; differentiable."""
        side = self.output_size
        if self.resize_mode == "shortest":
            images = center_crop(resize_shortest_side(images, self.size), side, side)
        elif self.resize_mode == "stretch":
            images = resize(images, side, side)
        else:
            images = pad_to_square(resize_longest_side(images, self.size), side, self.fill)
        return normalize(images, self.mean, self.std)

    @classmethod
    def from_processor_config(cls, config: Mapping[str, Any]) -> ImagePreprocess:
        """From a Hugging Face ``preprocessor_config.json`` of a CLIP- or SigLIP-style image processor.

        ``size: {"shortest_edge": s}`` resizes the shortest side (then crops ``crop_size``);
        ``size: {"height": h, "width": w}`` resizes to exactly h x w (square sizes only here).
        """
        size = config.get("size", 224)
        mode = "shortest"
        if isinstance(size, Mapping) and "shortest_edge" not in size:
            if size.get("height") != size.get("width"):
                raise AlignError(f"image processor size={dict(size)!r} is not supported; accepted: a square size")
            mode = "stretch"
        if isinstance(size, Mapping):
            size = size.get("shortest_edge") or size.get("height")
        crop = config.get("crop_size", size) if config.get("do_center_crop", mode == "shortest") else size
        if isinstance(crop, Mapping):
            crop = crop.get("height")
        resample = config.get("resample", 3)
        if resample != 3:  # PIL.Image.BICUBIC
            raise AlignError(f"image processor resample={resample!r} is not supported; accepted: 3 (bicubic)")
        return cls(
            size=int(size),
            resize_mode=mode,
            crop_size=int(crop),
            mean=tuple(config.get("image_mean", OPENAI_CLIP_MEAN)),
            std=tuple(config.get("image_std", OPENAI_CLIP_STD)),
        )

    @classmethod
    def from_pretrained(cls, source: str, *, offline: bool | None = None, revision: str | None = None) -> ImagePreprocess:
        """Read ``preprocessor_config.json`` from a local folder or a hub id."""
        from align.core.paths import is_dir, user_path

        from .loading import resolve_file

        path = user_path(source) / "preprocessor_config.json" if is_dir(source) else None
        if path is None or not path.is_file():
            path = resolve_file(f"{source}/preprocessor_config.json", offline=offline, revision=revision)
        return cls.from_processor_config(json.loads(Path(path).read_text()))
