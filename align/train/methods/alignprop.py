"""AlignProp (Prabhudesai et al., "Aligning Text-to-Image Diffusion Models with Reward Backpropagation").

Backpropagation through DDIM (eta = 1 in the public code) with a randomised truncation window:
the first grad-enabled step is drawn per batch (gaussian, mean 42 of 50 steps, std 5).  Paper
defaults: lr 1e-3, AdamW weight decay 1e-4, gradient clipping 1.0, CFG 5.0, 50 steps, LoRA rank 4
on the attention projections.  The paper's aesthetic loss is |r - 10| (loss="target",
loss_target=10); the default here maximises the reward directly, which suits any reward scale.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from align.train.methods.base import BackpropConfig
from align.train.truncation import RandomCutoff, TruncationPolicy


@dataclass
class AlignPropConfig(BackpropConfig):
    """AlignProp.

    Attributes:
        cutoff_distribution: how the first grad step is drawn: "gaussian", "uniform" or "fixed".
        cutoff_mean: mean cut-off as a fraction of the steps (the paper's 42 of 50 = 0.84).
        cutoff_std: its standard deviation as a fraction of the steps (5 of 50 = 0.1).
        cutoff_low: smallest cut-off fraction (uniform lower bound; clamp for gaussian).
        cutoff_high: largest cut-off fraction (at least one grad step is always kept).
    """

    name: ClassVar[str] = "alignprop"
    guidance_scale: float = 5.0
    eta: float = 1.0
    learning_rate: float = 1e-3
    weight_decay: float = 1e-4
    cutoff_distribution: str = "gaussian"
    cutoff_mean: float = 0.84
    cutoff_std: float = 0.1
    cutoff_low: float = 0.0
    cutoff_high: float = 1.0

    def __post_init__(self) -> None:
        super().__post_init__()
        self.truncation()  # validates the cut-off fields

    def truncation(self) -> TruncationPolicy:
        return RandomCutoff(
            self.cutoff_distribution, self.cutoff_mean, self.cutoff_std, self.cutoff_low, self.cutoff_high
        )
