"""Torch preprocessing against the reference PIL pipelines, within the documented tolerance."""

import numpy as np
import pytest
import torch
from PIL import Image

from align.core.errors import AlignError
from rewards.preprocess import (
    OPENAI_CLIP_MEAN,
    OPENAI_CLIP_STD,
    PARITY_TOLERANCE,
    ImagePreprocess,
    center_crop,
    pad_to_square,
)

SIZES = [(224, 224), (300, 400), (500, 260), (64, 96), (17, 23), (225, 224), (700, 640)]


def sample_images(height: int, width: int, seed: int = 0) -> dict[str, torch.Tensor]:
    """uint8-exact float images: noise and structured content (edges, gradients)."""
    g = torch.Generator().manual_seed(seed)
    yy, xx = torch.meshgrid(torch.linspace(0, 1, height), torch.linspace(0, 1, width), indexing="ij")
    disk = ((xx - 0.5) ** 2 + (yy - 0.5) ** 2 < 0.1).float()
    cells = (torch.arange(height)[:, None] // max(1, height // 8) + torch.arange(width)[None] // max(1, width // 8)) % 2
    images = {
        "noise": torch.randint(0, 256, (3, height, width), generator=g).float() / 255,
        "gradient": torch.stack([xx, yy, (xx + yy) / 2]),
        "checker": cells.float().expand(3, height, width),
        "disk": torch.stack([disk, 1 - disk, 0.5 * disk]),
    }
    return {k: (v * 255).round() / 255 for k, v in images.items()}


def to_uint8(image: torch.Tensor) -> np.ndarray:
    return (image * 255).round().to(torch.uint8).permute(1, 2, 0).numpy()


@pytest.mark.parametrize("height, width", SIZES)
def test_shortest_side_crop_matches_clip_image_processor(height, width):
    from transformers import CLIPImageProcessorPil

    reference = CLIPImageProcessorPil()  # shortest side 224, bicubic, crop 224, OpenAI CLIP constants
    ours = ImagePreprocess(size=224, crop_size=224)
    images = sample_images(height, width)
    expected = reference(images=[to_uint8(im) for im in images.values()], return_tensors="np")["pixel_values"]
    got = ours(torch.stack(list(images.values()))).double()
    assert got.shape == expected.shape == (len(images), 3, 224, 224)
    diff = (got - torch.from_numpy(np.asarray(expected)).double()).abs()
    for name, d in zip(images, diff):
        assert d.max() <= PARITY_TOLERANCE, (name, float(d.max()))
        assert d.mean() <= 0.01, (name, float(d.mean()))
    if (height, width) in ((224, 224), (225, 224)):  # no resize: exact
        assert diff.max() < 1e-6


def _open_clip_reference(image: torch.Tensor, size: int) -> torch.Tensor:
    """open_clip ResizeMaxSize on a PIL image, then ToTensor and Normalize, without torchvision."""
    pil = Image.fromarray(to_uint8(image))
    w, h = pil.size
    scale = size / max(h, w)
    new_h, new_w = round(h * scale), round(w * scale)
    canvas = Image.new("RGB", (size, size), (0, 0, 0))
    canvas.paste(pil.resize((new_w, new_h), Image.Resampling.BICUBIC), ((size - new_w) // 2, (size - new_h) // 2))
    x = torch.from_numpy(np.array(canvas)).permute(2, 0, 1).double() / 255
    return ((x - torch.tensor(OPENAI_CLIP_MEAN).view(3, 1, 1)) / torch.tensor(OPENAI_CLIP_STD).view(3, 1, 1))[None]


@pytest.mark.parametrize("height, width", [(300, 400), (500, 260), (64, 96), (17, 23)])
def test_longest_side_pad_matches_open_clip_resize_max_size(height, width):
    ours = ImagePreprocess(size=224, resize_mode="longest", crop_size=224)
    images = sample_images(height, width, seed=1)
    got = ours(torch.stack(list(images.values()))).double()
    for (name, image), ours_one in zip(images.items(), got):
        diff = (ours_one - _open_clip_reference(image, 224)[0]).abs()
        assert diff.max() <= PARITY_TOLERANCE, (name, float(diff.max()))


def test_center_crop_and_pad_geometry():
    x = torch.arange(5 * 7, dtype=torch.float64).view(1, 1, 5, 7)
    torch.testing.assert_close(center_crop(x, 3, 3), x[..., 1:4, 2:5])
    padded = center_crop(x, 7, 9)  # larger than the image: zero padding, like transformers
    assert padded.shape[-2:] == (7, 9)
    torch.testing.assert_close(padded[..., 1:6, 1:8], x)
    assert padded.sum() == x.sum()
    square = pad_to_square(x, 8)  # pad 3 rows: 1 above, 2 below; 1 column: 0 left, 1 right
    torch.testing.assert_close(square[..., 1:6, 0:7], x)
    with pytest.raises(AlignError, match="larger than size=4"):
        pad_to_square(x, 4)


def test_gradient_flows_through_preprocessing():
    x = torch.rand(2, 3, 40, 30, dtype=torch.float64, requires_grad=True)
    for mode in ("shortest", "longest"):
        x.grad = None
        ImagePreprocess(size=16, resize_mode=mode, crop_size=16)(x).sum().backward()
        assert torch.isfinite(x.grad).all() and (x.grad.abs().sum((1, 2, 3)) > 0).all()


def test_from_processor_config():
    pre = ImagePreprocess.from_processor_config(
        {"size": {"shortest_edge": 336}, "crop_size": {"height": 336, "width": 336}, "resample": 3,
         "image_mean": [0.5, 0.5, 0.5], "image_std": [0.5, 0.5, 0.5]}
    )
    assert (pre.size, pre.output_size, pre.mean) == (336, 336, (0.5, 0.5, 0.5))
    with pytest.raises(AlignError, match="resample=2"):
        ImagePreprocess.from_processor_config({"resample": 2})
