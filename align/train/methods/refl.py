"""ReFL (Xu et al., ImageReward): reward feedback learning at one random late step.

Sample 40 steps; at a random step in [30, 39] make ONE grad-enabled call and score its
x0-prediction; loss relu(2 - r) * 1e-3.  The original uses DDPM and full fine-tuning
(lr 1e-5); DDIM with eta = 1 is the same DDPM posterior, and the default learning rate here
suits LoRA.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from align.train.methods.base import BackpropConfig
from align.train.truncation import RandomLateStep, TruncationPolicy


@dataclass
class ReFLConfig(BackpropConfig):
    """ReFL.

    Attributes:
        refl_low: earliest grad step as a fraction of the steps (the paper's 30 of 40 = 0.75).
        refl_high: latest grad step as a fraction of the steps (39 of 40 = 0.975).
    """

    name: ClassVar[str] = "refl"
    num_steps: int = 40
    eta: float = 1.0
    loss: str = "hinge"
    loss_target: float = 2.0
    loss_scale: float = 1e-3
    learning_rate: float = 1e-4
    weight_decay: float = 1e-2
    refl_low: float = 0.75
    refl_high: float = 0.975

    def __post_init__(self) -> None:
        super().__post_init__()
        self.truncation()

    def truncation(self) -> TruncationPolicy:
        return RandomLateStep(self.refl_low, self.refl_high)
