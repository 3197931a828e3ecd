"""Truncation policies: which sampling steps carry gradients in reward backpropagation.

A policy draws a :class:`TruncationPlan` for each sampled batch.  Steps before
``first_grad_step`` run without gradients (their outputs are constants to the optimiser);
steps from ``first_grad_step`` on run with gradients (each model call checkpointed).

* :class:`FullChain`: every step (DRaFT, full backprop).
* :class:`LastK`: the last K steps (DRaFT-K; K = 1 is already strong).
* :class:`RandomCutoff`: AlignProp's randomised truncation: the first grad step is drawn per
  batch from a gaussian / uniform distribution or fixed.  (AlignProp detaches model outputs
  before the cut-off but not the latent chain; since x_T has no parameters, the parameter
  gradient is the same as cutting the chain there, which is what we do.)
* :class:`RandomLateStep`: ReFL: one grad-enabled call at a random late step, whose
  x0-prediction is the sample that is scored; later steps are skipped.
* :class:`LowVarianceLastStep`: DRaFT-LV: the last step with gradients plus ``copies``
  re-noised copies of the (detached) final sample, each given one grad-enabled call.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Protocol

import torch

from align.core.errors import AlignError, check_choice, check_range


@dataclass(frozen=True)
class TruncationPlan:
    """Where gradients flow for one batch.

    Attributes:
        num_steps: total sampling steps T.
        first_grad_step: index of the first step run with gradients (0..T-1).
        stop_step: if set, the x0-prediction of this (grad-enabled) step is the output and the
            remaining steps are skipped (ReFL).
        renoised_copies: extra re-noised grad-enabled calls at the last step (DRaFT-LV).
    """

    num_steps: int
    first_grad_step: int
    stop_step: int | None = None
    renoised_copies: int = 0

    def __post_init__(self) -> None:
        if not 0 <= self.first_grad_step < self.num_steps:
            raise AlignError(
                f"first_grad_step={self.first_grad_step} is outside the chain of {self.num_steps} steps; "
                f"accepted: 0..{self.num_steps - 1}"
            )
        if self.stop_step is not None and not self.first_grad_step <= self.stop_step < self.num_steps:
            raise AlignError(f"stop_step={self.stop_step} must lie in [{self.first_grad_step}, {self.num_steps - 1}]")

    @property
    def grad_steps(self) -> int:
        """Number of grad-enabled model calls along the chain (not counting re-noised copies)."""
        last = self.stop_step if self.stop_step is not None else self.num_steps - 1
        return last - self.first_grad_step + 1

    @property
    def last_step(self) -> int:
        return self.stop_step if self.stop_step is not None else self.num_steps - 1


class TruncationPolicy(Protocol):
    def plan(self, num_steps: int, generator: torch.Generator | None = None) -> TruncationPlan: ...


def _check_k(k: int, num_steps: int) -> None:
    if k > num_steps:
        raise AlignError(f"truncation_steps={k} exceeds num_steps={num_steps}; accepted: 1..{num_steps}")


@dataclass(frozen=True)
class FullChain:
    """Backpropagate through every step."""

    def plan(self, num_steps: int, generator: torch.Generator | None = None) -> TruncationPlan:
        return TruncationPlan(num_steps, 0)


@dataclass(frozen=True)
class LastK:
    """Backpropagate through the last ``k`` steps (DRaFT-K)."""

    k: int = 1

    def __post_init__(self) -> None:
        check_range("truncation_steps", self.k, 1, None, integer=True)

    def plan(self, num_steps: int, generator: torch.Generator | None = None) -> TruncationPlan:
        _check_k(self.k, num_steps)
        return TruncationPlan(num_steps, num_steps - self.k)


def _uniform(generator: torch.Generator | None) -> float:
    return float(torch.rand((), generator=generator))


@dataclass(frozen=True)
class RandomCutoff:
    """AlignProp's randomised truncation: the first grad step is drawn per batch.

    The cut-off is given as a fraction of the chain (the paper's "step 42 of 50" is 0.84) so
    that one setting works for any number of steps.

    Attributes:
        distribution: "gaussian" (mean, std), "uniform" (on [low, high]) or "fixed" (mean).
        mean: mean cut-off as a fraction of the steps.
        std: standard deviation (gaussian), as a fraction of the steps.
        low: smallest allowed cut-off fraction.
        high: largest allowed cut-off fraction (at least one grad step is always kept).
    """

    distribution: str = "gaussian"
    mean: float = 0.84
    std: float = 0.1
    low: float = 0.0
    high: float = 1.0

    def __post_init__(self) -> None:
        check_choice("cutoff_distribution", self.distribution, ("gaussian", "uniform", "fixed"))
        check_range("cutoff_mean", self.mean, 0.0, 1.0)
        check_range("cutoff_std", self.std, 0.0, None)
        check_range("cutoff_low", self.low, 0.0, 1.0)
        check_range("cutoff_high", self.high, self.low, 1.0)

    def plan(self, num_steps: int, generator: torch.Generator | None = None) -> TruncationPlan:
        if self.distribution == "fixed":
            frac = self.mean
        elif self.distribution == "uniform":
            frac = self.low + (self.high - self.low) * _uniform(generator)
        else:
            frac = self.mean + self.std * float(torch.randn((), generator=generator))
        frac = min(max(frac, self.low), self.high)
        first = min(int(math.floor(frac * num_steps + 0.5)), num_steps - 1)
        return TruncationPlan(num_steps, first)


@dataclass(frozen=True)
class RandomLateStep:
    """ReFL: one grad-enabled call at a step drawn uniformly from [low, high] (fractions of T).

    The paper's "a random step in [30, 39] of 40" is low = 0.75, high = 0.975.
    """

    low: float = 0.75
    high: float = 0.975

    def __post_init__(self) -> None:
        check_range("refl_low", self.low, 0.0, 1.0, high_inclusive=False)
        check_range("refl_high", self.high, self.low, 1.0, high_inclusive=False)

    def plan(self, num_steps: int, generator: torch.Generator | None = None) -> TruncationPlan:
        lo = min(int(math.floor(self.low * num_steps + 0.5)), num_steps - 1)
        hi = min(max(int(math.floor(self.high * num_steps + 0.5)), lo), num_steps - 1)
        step = lo + int(torch.randint(0, hi - lo + 1, (), generator=generator))
        return TruncationPlan(num_steps, step, stop_step=step)


@dataclass(frozen=True)
class LowVarianceLastStep:
    """DRaFT-LV: K = 1 plus ``copies`` re-noised copies of the final sample (the paper's n; 2 in practice)."""

    copies: int = 2

    def __post_init__(self) -> None:
        check_range("lv_copies", self.copies, 1, 64, integer=True)

    def plan(self, num_steps: int, generator: torch.Generator | None = None) -> TruncationPlan:
        return TruncationPlan(num_steps, num_steps - 1, renoised_copies=self.copies)
