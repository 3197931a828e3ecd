"""DiffusionNFT (Zheng et al., "DiffusionNFT: Online Diffusion Reinforcement with Forward Process").

Online reinforcement on the forward process: each rollout samples ``group_size`` images for each of
``rollout_prompts`` prompts with the *old* policy (any solver, deterministic by default, no CFG),
scores them with any reward (black-box allowed: no reward gradient, no sampler log-probability),
turns the rewards into optimality probabilities r in [0, 1], and regresses the implicit positive
and negative policies onto the rollout's clean samples at noise levels of the rollout's schedule,
weighted by r and 1 - r; a small flow-velocity regulariser ties the model to the frozen one (LoRA
off).  The old policy follows the trained one softly, once per rollout.  The math, its fixed point
and its form for epsilon / v UNets are in :mod:`align.train.nft`.

Defaults are the official SD3.5-medium configs (NVlabs/DiffusionNFT ``config/nft.py``, ``base.py``):
10 rollout steps (their deterministic 2nd-order DPM solver; here the core's deterministic sampler),
40-step evaluation, CFG 1, beta 1.0, advantages clipped to 5 with the rollout-wide std
(``global_std``), group 24 x 48 groups, 9 of the 10 levels trained per sample
(``timestep_fraction`` 0.99), lr 3e-4, AdamW weight decay 1e-4, gradient clipping 1.0, regulariser
weight 1e-4, old-policy decay min(0.001 step, 0.5), one optimiser step per rollout, LoRA r32 / alpha
64 (set in ``lora``).  OCR: ``beta=0.1 optimizer_steps_per_rollout=2 old_decay_delay=75
old_decay_rate=0.0075 old_decay_max=0.999``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

from align.core.errors import ConfigError, check_range
from align.train.methods.base import MethodConfig
from align.train.nft import old_policy_decay


@dataclass
class DiffusionNFTConfig(MethodConfig):
    """DiffusionNFT.

    Attributes:
        num_steps: sampling steps of the rollouts (10); their noise levels are the ones trained at.
        eval_num_steps: sampling steps of the evaluation grids (deterministic); None: num_steps.
        beta: strength of the implicit policies v+- = v_old +- beta (v_theta - v_old) (> 0; 1.0; OCR and
            multi-reward: 0.1). The trained model's optimum is v_old + (2 / beta) Delta (Delta: the pull toward
            the reward-weighted samples, :mod:`align.train.nft`), so a smaller beta moves it further, like a
            larger guidance scale.
        advantage_clip: c: advantages are clipped to [-c, c] and mapped to r = A / (2 c) + 1/2; the policy
            loss is also multiplied by c, as in the official code (5).
        global_std: normalise a sample's reward minus its group's mean by the std of every reward of the
            rollout (the official default) instead of its group's.
        group_size: samples per prompt in a rollout (at least 2: the group mean is the baseline).
        rollout_prompts: prompts (groups) per rollout, over all processes.
        timestep_fraction: fraction of the rollout schedule's noise levels each sample is trained at, drawn
            per sample (0.99 of 10: 9).
        adaptive_weighting: divide each x0 error by its detached per-sample mean absolute error (the official
            self-normalisation); False: plain squared x0 errors.
        old_decay_rate: the old policy's soft update after each rollout is old <- d old + (1 - d) theta with
            d = min(old_decay_rate * (step - old_decay_delay), old_decay_max) (official: 0.001; OCR 0.0075).
        old_decay_max: the largest d (official: 0.5; OCR 0.999); below 1, or the old policy never moves.
        old_decay_delay: optimiser steps before which d = 0, the old policy a copy of the trained one (0; OCR 75).
        optimizer_steps_per_rollout: optimiser steps taken on each rollout (1; OCR 2).
        overlap_reward: score each rollout chunk in a worker thread while the next chunk is sampled (as the
            policy-gradient methods); the scores are the same either way.
        kl_weight: weight of the regulariser mean((v_theta - v_ref)^2) toward the frozen model (LoRA off), in
            flow-velocity space whatever the model predicts (the official 1e-4).
    """

    name: ClassVar[str] = "diffusion_nft"
    #: the trainer objective that will run it (registered with the integration)
    objective: ClassVar[str] = "diffusion_nft"
    needs_reward_gradient: ClassVar[bool] = False

    num_steps: int = 10
    eval_num_steps: int | None = 40
    guidance_scale: float = 1.0
    eta: float = 0.0
    learning_rate: float = 3e-4
    weight_decay: float = 1e-4
    max_grad_norm: float = 1.0
    kl_weight: float = 1e-4
    beta: float = 1.0
    advantage_clip: float = 5.0
    global_std: bool = True
    group_size: int = 24
    rollout_prompts: int = 48
    timestep_fraction: float = 0.99
    adaptive_weighting: bool = True
    old_decay_rate: float = 0.001
    old_decay_max: float = 0.5
    old_decay_delay: int = 0
    optimizer_steps_per_rollout: int = 1
    overlap_reward: bool = True

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.eval_num_steps is not None:
            check_range("eval_num_steps", self.eval_num_steps, 1, 1000, integer=True)
        check_range("beta", self.beta, 0.0, None, low_inclusive=False)
        check_range("advantage_clip", self.advantage_clip, 0.0, None, low_inclusive=False)
        check_range("group_size", self.group_size, 1, None, integer=True)
        if self.group_size < 2:
            raise ConfigError(
                f"{self.name}.group_size={self.group_size} gives groups of one sample, whose advantage is always 0 "
                "(no baseline to compare with); accepted: 2 or more"
            )
        check_range("rollout_prompts", self.rollout_prompts, 1, None, integer=True)
        check_range("timestep_fraction", self.timestep_fraction, 0.0, 1.0, low_inclusive=False)
        check_range("old_decay_rate", self.old_decay_rate, 0.0, None)
        check_range("old_decay_max", self.old_decay_max, 0.0, 1.0, high_inclusive=False)
        check_range("old_decay_delay", self.old_decay_delay, 0, None, integer=True)
        check_range("optimizer_steps_per_rollout", self.optimizer_steps_per_rollout, 1, None, integer=True)

    @property
    def rollout_size(self) -> int:
        """Samples per rollout, over all processes."""
        return self.group_size * self.rollout_prompts

    def evaluation_sampling(self, flow: bool = False) -> dict[str, Any]:
        """eval_num_steps of the rollout sampler (deterministic by default)."""
        return {"num_steps": self.eval_num_steps or self.num_steps, "sampler": self.sampler, "eta": self.eta}

    @property
    def trained_steps(self) -> int:
        """Noise levels each sample is trained at per rollout (at least one)."""
        return max(1, int(self.num_steps * self.timestep_fraction))

    def old_decay(self, step: int) -> float:
        """The decay d of the old policy's soft update after optimiser step ``step``."""
        return old_policy_decay(step, self.old_decay_rate, self.old_decay_max, self.old_decay_delay)
