"""DDPO (Black et al., "Training Diffusion Models with Reinforcement Learning", 2023).

Rollouts with DDIM at eta = 1 (every step stochastic), per-prompt advantage normalisation with a
running tracker, PPO-clipped importance ratios, no KL term.  Defaults are ddpo-pytorch's
``config/base.py`` (50 steps, eta 1, CFG 5 in rollouts and training, lr 3e-4, AdamW weight decay
1e-4, gradient clipping 1, clip range 1e-4, advantages clipped to 5, one inner epoch, every
timestep trained, tracker buffer 16 / min count 16) and the 256 samples per epoch of
``config/dgx.py`` (8 GPUs x 8 x 4; trained as 4 optimiser steps of 64: batch 4 x accumulation 2 on
8 GPUs).  The repository's README notes that base.py's settings are "not meant to achieve good
performance"; its per-reward configs raise the sample count.  On a flow-matching model the
stochastic steps are the flow reverse SDE (noise_level) instead of DDIM.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from align.core.errors import check_range
from align.train.methods.policy_gradient import PolicyGradientConfig


@dataclass
class DDPOConfig(PolicyGradientConfig):
    """DDPO.

    Attributes:
        rollout_samples: samples per rollout over all processes, each with a prompt drawn at random (ddpo-pytorch's
            dgx config: 256).
        per_prompt_stats: normalise rewards with per-prompt running statistics (False: the rollout's mean and std).
        tracker_buffer_size: rewards kept per prompt (across rollouts) for its statistics.
        tracker_min_count: rewards a prompt needs before its own statistics replace the rollout's.
    """

    name: ClassVar[str] = "ddpo"
    guidance_scale: float = 5.0
    eta: float = 1.0
    rollout_samples: int = 256
    per_prompt_stats: bool = True
    tracker_buffer_size: int = 16
    tracker_min_count: int = 16

    def __post_init__(self) -> None:
        super().__post_init__()
        check_range("rollout_samples", self.rollout_samples, 1, None, integer=True)
        check_range("tracker_buffer_size", self.tracker_buffer_size, 1, None, integer=True)
        check_range("tracker_min_count", self.tracker_min_count, 1, self.tracker_buffer_size, integer=True)

    @property
    def rollout_size(self) -> int:
        return self.rollout_samples
