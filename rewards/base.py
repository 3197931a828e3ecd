"""The reward protocol.

A reward scores a batch of images (float tensor [B, 3, H, W] with values in [0, 1]) with their
prompts and returns a tensor [B].  It declares whether it is ``differentiable`` (its score has a
gradient with respect to the pixels).  Black-box rewards serve steering and evaluation; a
training method that needs gradients refuses them.

Subclasses implement :meth:`Reward._score`; the base class checks the input, evaluates in
chunks of ``chunk_size`` images, moves frozen reward models to the images' device and dtype,
and turns failures into :class:`RewardError` naming the reward.  A non-finite score either
raises (``on_invalid="raise"``, the default) or, with ``on_invalid="drop"``, marks the sample
invalid in :class:`RewardOutput` and counts it in ``dropped`` (it is never silently zero).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Literal

import torch
from torch import Tensor, nn

from align.errors import AlignError, RewardError

OnInvalid = Literal["raise", "drop"]


@dataclass
class RewardOutput:
    """Scores [B], which samples are valid [B] (bool), and per-sample extra information."""

    scores: Tensor
    valid: Tensor
    info: dict[str, Tensor] = field(default_factory=dict)

    @property
    def num_dropped(self) -> int:
        return int((~self.valid).sum())


def normalize_prompts(prompts: str | Sequence[str] | None, batch_size: int, reward: str) -> list[str]:
    """One prompt per image: a single string is repeated; a list must match the batch."""
    if prompts is None:
        return [""] * batch_size
    if isinstance(prompts, str):
        return [prompts] * batch_size
    prompts = list(prompts)
    if len(prompts) != batch_size:
        raise RewardError(f"reward {reward!r}: got {len(prompts)} prompts for {batch_size} images; pass one per image")
    return prompts


def check_images(images: Tensor, reward: str) -> None:
    """Images must be a float tensor [B, 3, H, W] in [0, 1]."""
    if not isinstance(images, Tensor) or images.ndim != 4 or images.shape[1] != 3:
        shape = tuple(images.shape) if isinstance(images, Tensor) else type(images).__name__
        raise RewardError(f"reward {reward!r}: images must be a tensor [B, 3, H, W]; got {shape}")
    if not images.is_floating_point():
        raise RewardError(f"reward {reward!r}: images must be floating point in [0, 1]; got {images.dtype}")
    if images.numel():
        lo, hi = float(images.detach().min()), float(images.detach().max())
        if lo < -1e-3 or hi > 1 + 1e-3:
            raise RewardError(
                f"reward {reward!r}: images must have values in [0, 1]; got range [{lo:.3f}, {hi:.3f}] "
                "(VAE outputs in [-1, 1] need images / 2 + 0.5)"
            )


class Reward(nn.Module):
    """Base class of all rewards: ``reward(images, prompts) -> scores [B]``.

    Attributes:
        name: registry name, used in logs and error messages.
        differentiable: whether gradients of the score reach the pixels.
        chunk_size: images scored per model call (None: the whole batch at once).
        on_invalid: "raise" on a non-finite score (default) or "drop" (mark invalid, count).
    """

    name: str = "reward"
    differentiable: bool = True

    def __init__(self, *, chunk_size: int | None = None, on_invalid: OnInvalid = "raise"):
        super().__init__()
        if chunk_size is not None and (not isinstance(chunk_size, int) or chunk_size < 1):
            raise AlignError(f"chunk_size={chunk_size!r} must be a positive integer or None")
        if on_invalid not in ("raise", "drop"):
            raise AlignError(f"on_invalid={on_invalid!r} is not supported; accepted: 'raise', 'drop'")
        self.chunk_size = chunk_size
        self.on_invalid: OnInvalid = on_invalid
        self.dropped = 0

    # -- subclasses implement this ----------------------------------------------------------
    def _score(self, images: Tensor, prompts: list[str]) -> Tensor | tuple[Tensor, dict[str, Tensor]]:
        """Score one chunk: [b, 3, H, W] in [0, 1] -> [b] (optionally with per-sample info)."""
        raise NotImplementedError

    # -- the protocol -----------------------------------------------------------------------
    def freeze(self) -> Reward:
        """Freeze model weights with requires_grad_(False) (never no_grad: pixels keep their gradient)."""
        self.requires_grad_(False)
        self.eval()
        return self

    def _follow(self, images: Tensor) -> None:
        param = next(self.parameters(), None)
        if param is None:
            return
        if param.device != images.device or param.dtype != images.dtype:
            self.to(device=images.device, dtype=images.dtype)

    def score(self, images: Tensor, prompts: str | Sequence[str] | None = None) -> RewardOutput:
        """Scores with validity mask and info; see the module docstring for failure handling."""
        check_images(images, self.name)
        prompts = normalize_prompts(prompts, images.shape[0], self.name)
        if any(p.requires_grad for p in self.parameters()):
            self.freeze()
        self._follow(images)
        scores, infos = [], []
        step = self.chunk_size or max(images.shape[0], 1)
        for start in range(0, images.shape[0], step):
            chunk, chunk_prompts = images[start : start + step], prompts[start : start + step]
            try:
                out = self._score(chunk, chunk_prompts)
            except RewardError:
                raise
            except Exception as exc:  # a reward model failing must name itself
                raise RewardError(f"reward {self.name!r} failed: {type(exc).__name__}: {exc}") from exc
            out, info = out if isinstance(out, tuple) else (out, {})
            if not isinstance(out, Tensor) or out.shape != (chunk.shape[0],):
                got = tuple(out.shape) if isinstance(out, Tensor) else type(out).__name__
                raise RewardError(f"reward {self.name!r} returned shape {got}; expected [{chunk.shape[0]}]")
            scores.append(out)
            infos.append(info)
        result = torch.cat(scores).float() if len(scores) > 1 else scores[0].float()
        info = {k: torch.cat([i[k] for i in infos]) for k in infos[0]} if infos and infos[0] else {}
        valid = torch.isfinite(result.detach())
        if not bool(valid.all()):
            bad = (~valid).nonzero().flatten().tolist()
            if self.on_invalid == "raise":
                raise RewardError(
                    f"reward {self.name!r} returned a non-finite score for samples {bad}; "
                    "set on_invalid='drop' to skip such samples instead"
                )
            self.dropped += len(bad)
            result = torch.where(valid, result, torch.zeros_like(result).detach())
        return RewardOutput(result, valid, info)

    def forward(self, images: Tensor, prompts: str | Sequence[str] | None = None) -> Tensor:
        return self.score(images, prompts).scores

    def extra_repr(self) -> str:
        return f"name={self.name!r}, differentiable={self.differentiable}"


def require_differentiable(reward: Reward, method: str) -> None:
    """Refuse a black-box reward for a method that backpropagates through it."""
    if not getattr(reward, "differentiable", False):
        raise AlignError(
            f"reward {reward.name!r} is not differentiable, and {method} backpropagates the reward into the "
            "model; use a differentiable reward for training, or use this reward for steering "
            "(align steer) or evaluation (align eval)"
        )
