"""Stochastic-step policies: which sampling steps of a policy-gradient rollout are stochastic.

A rollout samples with a schedule whose chosen steps are stochastic (DDIM eta > 0, or the flow
reverse SDE) and whose other steps are deterministic (DDIM eta = 0, the flow ODE).  Only the
stochastic steps have a Gaussian transition density, so only they are stored and trained.  A
policy picks them among ``candidates`` (the steps that may be stochastic: all steps but the last
for GRPO, whose Gaussian is so sharp near the image that its log-density is dominated by rounding,
as Flow-GRPO's code notes) once per rollout, shared by every sample of the rollout:

* :class:`AllSteps`: every candidate (DDPO, Flow-GRPO, DanceGRPO).
* :class:`RandomSubset`: ``size`` candidates drawn without replacement.
* :class:`RandomWindow`: ``size`` consecutive candidates starting uniformly in
  ``[low, high - size]`` (Flow-GRPO-Fast: one or two SDE steps, ODE elsewhere).
* :class:`SlidingWindow`: ``size`` consecutive candidates starting at
  ``stride * (rollout // shift_every)``, moving from noise toward the image as training goes on
  (MixGRPO's progressive window); at the end it stays, or with ``roll_back`` starts over.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

import torch

from align.core.errors import ConfigError, check_range

STOCHASTIC_STEP_POLICIES = ("all", "random", "window", "sliding")


class StochasticStepPolicy(Protocol):
    def steps(self, candidates: Sequence[int], rollout: int, generator: torch.Generator) -> tuple[int, ...]:
        """The stochastic steps of rollout number ``rollout`` (ascending)."""


def _check_size(size: int, candidates: Sequence[int]) -> None:
    if size > len(candidates):
        raise ConfigError(
            f"sde_window_size={size} is larger than the {len(candidates)} steps that can be stochastic; "
            f"accepted: 1..{len(candidates)}"
        )


@dataclass(frozen=True)
class AllSteps:
    """Every candidate step is stochastic."""

    def steps(self, candidates: Sequence[int], rollout: int, generator: torch.Generator) -> tuple[int, ...]:
        return tuple(sorted(candidates))


@dataclass(frozen=True)
class RandomSubset:
    """``size`` candidates drawn without replacement, once per rollout."""

    size: int

    def __post_init__(self) -> None:
        check_range("sde_window_size", self.size, 1, None, integer=True)

    def steps(self, candidates: Sequence[int], rollout: int, generator: torch.Generator) -> tuple[int, ...]:
        _check_size(self.size, candidates)
        order = torch.randperm(len(candidates), generator=generator)[: self.size]
        return tuple(sorted(candidates[int(k)] for k in order))


@dataclass(frozen=True)
class RandomWindow:
    """``size`` consecutive candidates; the first drawn uniformly from ``[low, high - size]``.

    ``low``/``high`` index the candidates (``high`` exclusive; None: the last candidate + 1).
    """

    size: int
    low: int = 0
    high: int | None = None

    def __post_init__(self) -> None:
        check_range("sde_window_size", self.size, 1, None, integer=True)
        check_range("sde_window_range[0]", self.low, 0, None, integer=True)
        if self.high is not None and self.high - self.low < self.size:
            raise ConfigError(
                f"sde_window_range=[{self.low}, {self.high}] holds {self.high - self.low} steps, fewer than "
                f"sde_window_size={self.size}; accepted: high - low >= sde_window_size"
            )

    def steps(self, candidates: Sequence[int], rollout: int, generator: torch.Generator) -> tuple[int, ...]:
        _check_size(self.size, candidates)
        high = len(candidates) if self.high is None else self.high
        if high > len(candidates):
            raise ConfigError(
                f"sde_window_range ends at {high}, past the {len(candidates)} steps that can be stochastic; "
                f"accepted: 0 <= low < high <= {len(candidates)}"
            )
        start = self.low + int(torch.randint(high - self.size - self.low + 1, (), generator=generator))
        return tuple(candidates[start : start + self.size])


@dataclass(frozen=True)
class SlidingWindow:
    """``size`` consecutive candidates from ``stride * (rollout // shift_every)`` (MixGRPO's progressive window).

    Past the end the window stays on the last ``size`` candidates, or with ``roll_back`` starts
    again from the first.
    """

    size: int
    shift_every: int = 25
    stride: int = 1
    roll_back: bool = False

    def __post_init__(self) -> None:
        check_range("sde_window_size", self.size, 1, None, integer=True)
        check_range("sde_window_shift_every", self.shift_every, 1, None, integer=True)
        check_range("sde_window_stride", self.stride, 0, None, integer=True)

    def start(self, rollout: int, num_candidates: int) -> int:
        positions = num_candidates - self.size + 1  # where a window may start
        start = self.stride * (rollout // self.shift_every)
        return start % positions if self.roll_back else min(start, positions - 1)

    def steps(self, candidates: Sequence[int], rollout: int, generator: torch.Generator) -> tuple[int, ...]:
        _check_size(self.size, candidates)
        start = self.start(rollout, len(candidates))
        return tuple(candidates[start : start + self.size])
