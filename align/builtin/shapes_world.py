"""The synthetic world of the built-in model: coloured shapes on coloured backgrounds.

A scene is one flat shape (circle, square or triangle) of one palette colour on a background
of another.  Its prompt follows one grammar, ``"a red circle on a blue background"``.  This
module renders scenes (antialiased, with random position and size), parses and samples
prompts, and classifies images back into scenes, so that a model trained on these images can
be judged on whether it follows its prompt.

The classifier reads the background colour from the image border, the foreground colour from
the pixels farthest from it, and the shape by matching the foreground's soft mask against a
circle, a square and a triangle fitted to the mask's bounding box (best intersection over
union).  It is exact on rendered images and tolerant of the noise and blur of generated ones.
:func:`prompt_following` samples a model on shapes prompts and scores it with the classifier.
"""

from __future__ import annotations

import math
import random
from collections.abc import Sequence
from typing import NamedTuple

import torch
from torch import Tensor

from align.core.errors import AlignError, check_range

#: palette: colour name -> RGB in [0, 1]; colours are far apart so that nearest-colour reading is robust
COLORS: dict[str, tuple[float, float, float]] = {
    "red": (0.90, 0.10, 0.10),
    "yellow": (0.95, 0.85, 0.10),
    "green": (0.10, 0.70, 0.20),
    "cyan": (0.10, 0.80, 0.85),
    "blue": (0.10, 0.25, 0.90),
    "purple": (0.55, 0.15, 0.75),
    "white": (0.95, 0.95, 0.95),
    "black": (0.08, 0.08, 0.08),
}
SHAPES: tuple[str, ...] = ("circle", "square", "triangle")
#: what :func:`classify` reports when it finds no foreground
NONE = "none"

#: every word the prompts use (the built-in model's tokenizer vocabulary)
VOCABULARY: tuple[str, ...] = ("a", "on", "background", *SHAPES, *COLORS)

#: shape half-extent as a fraction of the image width, and the smallest border margin
SIZE_RANGE = (0.18, 0.32)
MARGIN = 0.04


class Scene(NamedTuple):
    """One shape of colour ``color`` on a ``background`` colour."""

    shape: str
    color: str
    background: str

    @property
    def prompt(self) -> str:
        return f"a {self.color} {self.shape} on a {self.background} background"


def all_scenes() -> list[Scene]:
    """Every valid scene (foreground colour differs from the background), in a fixed order."""
    return [
        Scene(shape, fg, bg)
        for shape in SHAPES
        for fg in COLORS
        for bg in COLORS
        if fg != bg
    ]


#: scenes never shown in training: each colour and shape appears in training, these combinations do not
HELDOUT_SCENES: tuple[Scene, ...] = (
    Scene("circle", "red", "blue"),
    Scene("circle", "cyan", "black"),
    Scene("circle", "white", "purple"),
    Scene("square", "yellow", "green"),
    Scene("square", "purple", "white"),
    Scene("square", "black", "red"),
    Scene("triangle", "blue", "yellow"),
    Scene("triangle", "green", "cyan"),
)
TRAIN_SCENES: tuple[Scene, ...] = tuple(s for s in all_scenes() if s not in HELDOUT_SCENES)
TRAIN_PROMPTS: tuple[str, ...] = tuple(s.prompt for s in TRAIN_SCENES)
HELDOUT_PROMPTS: tuple[str, ...] = tuple(s.prompt for s in HELDOUT_SCENES)

#: prompts for demos and evaluation: varied shapes and colours, all seen in training
DEFAULT_PROMPTS: tuple[str, ...] = tuple(
    s.prompt
    for s in (
        Scene("circle", "red", "white"),
        Scene("square", "blue", "yellow"),
        Scene("triangle", "green", "black"),
        Scene("circle", "yellow", "purple"),
        Scene("square", "white", "cyan"),
        Scene("triangle", "purple", "green"),
        Scene("circle", "black", "yellow"),
        Scene("triangle", "cyan", "red"),
    )
)


def parse_prompt(prompt: str) -> Scene:
    """The scene a prompt of the form ``"a <colour> <shape> on a <colour> background"`` describes."""
    words = prompt.lower().split() if isinstance(prompt, str) else []
    if (
        len(words) != 7
        or words[0] != "a"
        or words[3:5] != ["on", "a"]
        or words[6] != "background"
        or words[1] not in COLORS
        or words[2] not in SHAPES
        or words[5] not in COLORS
    ):
        raise AlignError(
            f"prompt={prompt!r} is not a shapes prompt; accepted: 'a <colour> <shape> on a <colour> background' "
            f"with colours {', '.join(COLORS)} and shapes {', '.join(SHAPES)}"
        )
    if words[1] == words[5]:
        raise AlignError(f"prompt={prompt!r} has the same colour for shape and background; they must differ")
    return Scene(words[2], words[1], words[5])


def sample_scenes(n: int, seed: int = 0, *, heldout: bool = False) -> list[Scene]:
    """``n`` scenes drawn uniformly (seeded) from the training scenes, or from the held-out ones."""
    check_range("n", n, 0, None, integer=True)
    pool = HELDOUT_SCENES if heldout else TRAIN_SCENES
    rng = random.Random(seed)
    return [rng.choice(pool) for _ in range(n)]


def sample_prompts(n: int, seed: int = 0, *, heldout: bool = False) -> list[str]:
    """Prompts of :func:`sample_scenes`."""
    return [s.prompt for s in sample_scenes(n, seed, heldout=heldout)]


def _rgb(names: Sequence[str]) -> Tensor:
    return torch.tensor([COLORS[c] for c in names], dtype=torch.float32)


def shape_coverage(shape: str, cx: Tensor, cy: Tensor, rx: Tensor, ry: Tensor, size: int) -> Tensor:
    """Antialiased coverage in [0, 1], [B, size, size], of shapes in boxes centred (cx, cy), half-sides (rx, ry).

    Coordinates are fractions of the image side, y pointing down; triangles point up.  The
    coverage of a pixel is its centre's signed distance to the outline, clamped to one pixel.
    """
    check_range("size", size, 1, None, integer=True)
    grid = (torch.arange(size, dtype=torch.float32) + 0.5) / size
    x = grid.view(1, 1, size) - cx.view(-1, 1, 1)
    y = grid.view(1, size, 1) - cy.view(-1, 1, 1)
    rx, ry = rx.view(-1, 1, 1), ry.view(-1, 1, 1)
    if shape == "circle":
        dist = (torch.sqrt((x / rx) ** 2 + (y / ry) ** 2) - 1.0) * torch.minimum(rx, ry)
    elif shape == "square":
        dist = torch.maximum(x.abs() - rx, y.abs() - ry)
    elif shape == "triangle":
        # apex (0, -ry), base corners (+-rx, ry); distance to the two slanted sides and the base
        norm = torch.sqrt(4 * ry**2 + rx**2)
        side = (2 * ry * x.abs() - rx * y - rx * ry) / norm
        dist = torch.maximum(side, y - ry)
    else:
        raise AlignError(f"shape={shape!r} is not supported; accepted: {', '.join(SHAPES)}")
    return (0.5 - dist * size).clamp(0.0, 1.0)


def render(
    scenes: Sequence[Scene | str],
    size: int = 64,
    seed: int = 0,
    *,
    generator: torch.Generator | None = None,
) -> Tensor:
    """Images [B, 3, size, size] in [0, 1] of ``scenes`` (Scene or prompt), at random positions and sizes.

    Half-extents are drawn from :data:`SIZE_RANGE` (fractions of the side) and centres so that the
    shape keeps a :data:`MARGIN` from the border.  Randomness comes from ``generator`` if given,
    else from ``seed``.
    """
    scenes = [parse_prompt(s) if isinstance(s, str) else Scene(*s) for s in scenes]
    if not scenes:
        raise AlignError("scenes=[] is empty; pass at least one scene or prompt")
    for s in scenes:
        if s.shape not in SHAPES or s.color not in COLORS or s.background not in COLORS:
            raise AlignError(f"scene={tuple(s)!r} is not in the vocabulary; shapes {SHAPES}, colours {tuple(COLORS)}")
    if generator is None:
        generator = torch.Generator().manual_seed(seed)
    b = len(scenes)
    u = torch.rand(3, b, generator=generator)
    lo, hi = SIZE_RANGE
    radius = lo + (hi - lo) * u[0]
    free = 1.0 - 2 * (radius + MARGIN)
    cx = radius + MARGIN + free * u[1]
    cy = radius + MARGIN + free * u[2]
    coverage = torch.empty(b, size, size)
    for shape in SHAPES:
        idx = torch.tensor([i for i, s in enumerate(scenes) if s.shape == shape], dtype=torch.long)
        if len(idx):
            coverage[idx] = shape_coverage(shape, cx[idx], cy[idx], radius[idx], radius[idx], size)
    fg = _rgb([s.color for s in scenes]).view(b, 3, 1, 1)
    bg = _rgb([s.background for s in scenes]).view(b, 3, 1, 1)
    return bg + coverage.unsqueeze(1) * (fg - bg)


def _nearest_color(rgb: Tensor) -> list[str]:
    names = list(COLORS)
    return [names[i] for i in torch.cdist(rgb, _rgb(names)).argmin(dim=1).tolist()]


#: a pixel belongs to the foreground when it is at least this far (RGB distance) from the background
_FOREGROUND_DISTANCE = 0.25
#: fewer foreground pixels than this fraction of the image means "no shape"
_MIN_AREA = 0.005


def classify(images: Tensor) -> list[Scene]:
    """Read (shape, colour, background) from images [B, 3, H, W] in [0, 1].

    An image without a visible foreground classifies as ``Scene("none", "none", background)``.
    """
    if not isinstance(images, Tensor) or images.ndim != 4 or images.shape[1] != 3:
        shape = tuple(images.shape) if isinstance(images, Tensor) else type(images).__name__
        raise AlignError(f"images of shape {shape} are not supported; accepted: [B, 3, H, W] in [0, 1]")
    images = images.detach().float().cpu().clamp(0, 1)
    b, _, h, w = images.shape
    band = max(1, min(h, w) // 32)
    border = torch.cat(
        [
            images[:, :, :band].flatten(2),
            images[:, :, -band:].flatten(2),
            images[:, :, :, :band].flatten(2),
            images[:, :, :, -band:].flatten(2),
        ],
        dim=2,
    )
    bg_rgb = border.median(dim=2).values  # [B, 3]
    backgrounds = _nearest_color(bg_rgb)
    diff = images - bg_rgb.view(b, 3, 1, 1)
    dist = diff.norm(dim=1).flatten(1)  # [B, H*W]
    results = []
    for i in range(b):
        far = dist[i] > _FOREGROUND_DISTANCE
        if far.float().mean() < _MIN_AREA:
            results.append(Scene(NONE, NONE, backgrounds[i]))
            continue
        # the foreground colour is read from its inner pixels: the farther half of the far ones
        d = dist[i][far]
        core = far.clone()
        core[far] = d >= d.median()
        fg_rgb = images[i].flatten(1)[:, core].median(dim=1).values
        # soft mask: each pixel's position between background and foreground colour
        axis = fg_rgb - bg_rgb[i]
        mask = (diff[i].flatten(1).T @ axis / axis.dot(axis).clamp_min(1e-6)).clamp(0, 1).view(h, w)
        results.append(Scene(_match_shape(mask), _nearest_color(fg_rgb.view(1, 3))[0], backgrounds[i]))
    return results


def _match_shape(mask: Tensor) -> str:
    """The shape whose outline, fitted to the mask's bounding box, overlaps the soft mask best."""
    h, w = mask.shape
    # a 3x3 median drops isolated specks (noise) before the box is measured
    neighbours = torch.nn.functional.unfold(mask[None, None], 3, padding=1)[0]
    solid = neighbours.median(dim=0).values.view(h, w) > 0.5
    rows = solid.any(dim=1).nonzero().flatten()
    cols = solid.any(dim=0).nonzero().flatten()
    if len(rows) == 0:
        return NONE
    top, bottom = rows[0].item() / h, (rows[-1].item() + 1) / h
    left, right = cols[0].item() / w, (cols[-1].item() + 1) / w
    box = [torch.tensor([v]) for v in ((left + right) / 2, (top + bottom) / 2, (right - left) / 2, (bottom - top) / 2)]
    if h != w:
        mask = torch.nn.functional.interpolate(mask[None, None], size=(max(h, w),) * 2, mode="bilinear")[0, 0]
    best, best_iou = NONE, -math.inf
    for shape in SHAPES:
        template = shape_coverage(shape, *box, size=mask.shape[0])[0]
        iou = torch.minimum(mask, template).sum() / torch.maximum(mask, template).sum()
        if iou > best_iou:
            best, best_iou = shape, iou.item()
    return best


def agreement(scenes: Sequence[Scene], predicted: Sequence[Scene]) -> dict[str, float]:
    """Fraction of ``predicted`` matching ``scenes`` on shape, colour, background and all three."""
    if len(scenes) != len(predicted) or not scenes:
        raise AlignError(f"scenes ({len(scenes)}) and predicted ({len(predicted)}) must be equally long and non-empty")
    n = len(scenes)
    return {
        "shape": sum(a.shape == b.shape for a, b in zip(scenes, predicted)) / n,
        "color": sum(a.color == b.color for a, b in zip(scenes, predicted)) / n,
        "background": sum(a.background == b.background for a, b in zip(scenes, predicted)) / n,
        "all": sum(tuple(a) == tuple(b) for a, b in zip(scenes, predicted)) / n,
    }


class PromptFollowing(NamedTuple):
    """How well a model's samples follow shapes prompts (see :func:`prompt_following`)."""

    accuracy: dict[str, float]
    expected: list[Scene]
    predicted: list[Scene]
    images: Tensor


def prompt_following(
    model,
    prompts: Sequence[str],
    *,
    num_steps: int = 20,
    guidance_scale: float = 5.0,
    seed: int = 0,
    batch_size: int = 32,
) -> PromptFollowing:
    """Sample one image per prompt with ``model`` (a :class:`align.core.models.DiffusionModel`) and classify it.

    The samples come from the toolkit's own loop (:func:`align.steer.generate.generate`): the model's
    deterministic DDIM schedule of ``num_steps`` steps with classifier-free guidance
    ``guidance_scale``; image ``i`` is drawn with seed ``seed + i``.
    """
    from align.steer.generate import generate

    scenes = [parse_prompt(p) for p in prompts]
    if not scenes:
        raise AlignError("prompts=[] is empty; pass at least one shapes prompt")
    images = generate(
        model, [s.prompt for s in scenes], [seed + i for i in range(len(scenes))],
        num_steps=num_steps, guidance_scale=guidance_scale, batch_size=batch_size,
    )
    predicted = classify(images)
    return PromptFollowing(agreement(scenes, predicted), scenes, predicted, images)
