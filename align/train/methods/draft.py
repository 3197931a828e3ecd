"""DRaFT (Clark et al., "Directly Fine-Tuning Diffusion Models on Differentiable Rewards").

Backpropagate the reward through the sampling chain into LoRA weights.  DRaFT-K keeps
gradients only on the last K steps (K = T is full DRaFT); DRaFT-LV (K = 1) adds re-noised copies
of the final sample to lower the gradient variance.  No official code exists; defaults are the
paper-scale settings reported by reimplementations (50 DDIM steps, CFG 7.5, lr 2e-4, wd 0.1).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from align.core.errors import ConfigError, check_range
from align.train.methods.base import BackpropConfig
from align.train.truncation import FullChain, LastK, LowVarianceLastStep, TruncationPolicy


@dataclass
class DraftConfig(BackpropConfig):
    """DRaFT / DRaFT-K.

    Attributes:
        truncation_steps: K, the number of final steps with gradients (1 <= K <= num_steps; K = num_steps is
            full DRaFT).
    """

    name: ClassVar[str] = "draft"
    truncation_steps: int = 1

    def __post_init__(self) -> None:
        super().__post_init__()
        check_range("truncation_steps", self.truncation_steps, 1, None, integer=True)
        if self.truncation_steps > self.num_steps:
            raise ConfigError(
                f"truncation_steps={self.truncation_steps} exceeds num_steps={self.num_steps}; "
                f"accepted: 1..{self.num_steps}"
            )

    def truncation(self) -> TruncationPolicy:
        if self.truncation_steps == self.num_steps:
            return FullChain()
        return LastK(self.truncation_steps)


@dataclass
class DraftLVConfig(BackpropConfig):
    """DRaFT-LV: K = 1 with ``lv_copies`` re-noised copies of the final sample.

    Attributes:
        lv_copies: n, the number of re-noised copies scored besides the sample itself (public
            reimplementations use 2).
    """

    name: ClassVar[str] = "draft_lv"
    lv_copies: int = 2

    def __post_init__(self) -> None:
        super().__post_init__()
        check_range("lv_copies", self.lv_copies, 1, 64, integer=True)

    def truncation(self) -> TruncationPolicy:
        return LowVarianceLastStep(self.lv_copies)
