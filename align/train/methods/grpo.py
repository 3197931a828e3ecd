"""GRPO for diffusion and flow models: Flow-GRPO, Flow-GRPO-Fast, GRPO-Guard, DanceGRPO, MixGRPO.

A group of ``group_size`` samples per prompt; each sample's advantage is its reward normalised
within its group (no value model); PPO-clipped importance ratios; optionally the closed-form KL
of each trained step to the frozen model (the LoRA switched off).

* Flow models (Flow-GRPO): the deterministic flow ODE is replaced by the reverse SDE with the
  same marginals, noise level a (``noise_level``): sigma_t = a sqrt(t / (1 - t)); DanceGRPO's
  constant sigma_t = eta is ``sde_noise=constant``.  UNet models take DDIM steps with ``eta``.
* Where the stochastic steps are (``sde_steps``): ``all`` (every step but the last, which stays
  deterministic: Flow-GRPO never trains it), ``random`` (``sde_window_size`` steps drawn per
  rollout), ``window`` (Flow-GRPO-Fast: ``sde_window_size`` consecutive steps at a random start in
  ``sde_window_range``, ODE elsewhere) or ``sliding`` (MixGRPO: a window that moves
  ``sde_window_stride`` steps toward the image every ``sde_window_shift_every`` rollouts).
* GRPO-Guard: ``ratio_norm=true`` (see :class:`PolicyGradientConfig`).
* DanceGRPO: ``same_initial_noise=true`` (a group shares x_T), ``sde_noise=constant``.

Defaults are Flow-GRPO's SD3.5-medium settings (``config/grpo.py``): 10 sampling steps for
training and 40 for evaluation, CFG 4.5, a = 0.7, group 24, 48 groups per rollout, one inner
epoch, clip range 1e-4, advantages clipped to 5, lr 3e-4, LoRA r32 / alpha 64 (set in ``lora``).
Their KL weight (0.01-0.04 for SD3, 0 for FLUX, Guard, DanceGRPO, MixGRPO and the Fast configs) is
on a KL that leaves the step's |dt| out of the variance; ``kl_weight`` here weighs the exact KL,
so Flow-GRPO's beta corresponds to kl_weight = beta * |dt| (about beta / num_steps); the default
is 0.  Their std is of all rewards for SD3 (``global_std``); the group's std here by default, as in
DanceGRPO and GRPO-Guard.  Variants: Flow-GRPO-Fast ``sde_steps=window sde_window_size=2 clip_range=1e-5
noise_level=0.8``; MixGRPO ``sde_steps=sliding sde_window_size=4 sde_window_shift_every=25
num_steps=25``; GRPO-Guard ``ratio_norm=true clip_range=2e-6 learning_rate=1e-4``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from align.core.errors import ConfigError, check_choice, check_range
from align.train.methods.policy_gradient import PolicyGradientConfig
from align.train.stochastic_steps import (
    STOCHASTIC_STEP_POLICIES,
    AllSteps,
    RandomSubset,
    RandomWindow,
    SlidingWindow,
    StochasticStepPolicy,
)


@dataclass
class GRPOConfig(PolicyGradientConfig):
    """GRPO (Flow-GRPO and its variants).

    Attributes:
        group_size: G, samples per prompt; advantages are normalised within each group (at least 2).
        rollout_prompts: groups (prompts) per rollout over all processes; a rollout has group_size x rollout_prompts
            samples.
        same_initial_noise: the samples of a group share their initial noise x_T (DanceGRPO); their step noise differs.
        global_std: divide by the std of every reward of the rollout instead of the group's (Flow-GRPO's SD3 default).
        sde_steps: which steps are stochastic (and trained): "all" (every step but the last), "random" (sde_window_size
            steps drawn per rollout), "window" (sde_window_size consecutive steps at a random start, Flow-GRPO-Fast)
            or "sliding" (MixGRPO's window moving toward the image as training goes on).
        sde_window_size: stochastic steps of "random", "window" and "sliding" (1..num_steps - 1).
        sde_window_range: [low, high): the steps a "window" may cover (None: every step but the last).
        sde_window_shift_every: "sliding": rollouts between two moves of the window (MixGRPO: 25).
        sde_window_stride: "sliding": steps the window moves each time (MixGRPO: 1; 0 keeps it at the start).
        sde_window_roll_back: "sliding": start again from the first step after the window reaches the last one.
    """

    name: ClassVar[str] = "grpo"
    num_steps: int = 10
    eval_num_steps: int | None = 40
    guidance_scale: float = 4.5
    eta: float = 1.0
    group_size: int = 24
    rollout_prompts: int = 48
    same_initial_noise: bool = False
    global_std: bool = False
    sde_steps: str = "all"
    sde_window_size: int = 2
    sde_window_range: list[int] | None = None
    sde_window_shift_every: int = 25
    sde_window_stride: int = 1
    sde_window_roll_back: bool = False

    def __post_init__(self) -> None:
        super().__post_init__()
        if isinstance(self.group_size, int) and not isinstance(self.group_size, bool) and self.group_size < 2:
            raise ConfigError(
                f"grpo.group_size={self.group_size} gives groups of one sample, whose group-normalised advantage is "
                "always 0 (no baseline to compare with); accepted: 2 or more"
            )
        check_range("group_size", self.group_size, 2, None, integer=True)
        check_range("rollout_prompts", self.rollout_prompts, 1, None, integer=True)
        check_choice("sde_steps", self.sde_steps, STOCHASTIC_STEP_POLICIES)
        check_range("sde_window_size", self.sde_window_size, 1, None, integer=True)
        if self.num_steps < 2:
            raise ConfigError(
                f"grpo.num_steps={self.num_steps} leaves no stochastic step (the last step is deterministic); "
                "accepted: 2 or more"
            )
        if self.sde_steps != "all" and self.sde_window_size > self.num_steps - 1:
            raise ConfigError(
                f"grpo.sde_window_size={self.sde_window_size} is larger than the {self.num_steps - 1} steps that can be "
                f"stochastic (num_steps={self.num_steps}, the last step is deterministic); accepted: "
                f"1..{self.num_steps - 1}"
            )
        if self.sde_window_range is not None:
            low, high = self._window_range()
            if not 0 <= low < high <= self.num_steps - 1:
                raise ConfigError(
                    f"grpo.sde_window_range={self.sde_window_range!r} is not a range of steps that can be stochastic; "
                    f"accepted: [low, high] with 0 <= low < high <= {self.num_steps - 1}"
                )
        self.stochastic_step_policy()  # validates the window fields

    def _window_range(self) -> tuple[int, int]:
        if self.sde_window_range is None:
            return 0, self.num_steps - 1
        if len(self.sde_window_range) != 2:
            raise ConfigError(f"grpo.sde_window_range={self.sde_window_range!r} must be [low, high]")
        return int(self.sde_window_range[0]), int(self.sde_window_range[1])

    @property
    def rollout_size(self) -> int:
        return self.group_size * self.rollout_prompts

    @property
    def samples_per_prompt(self) -> int:
        return self.group_size

    def candidate_steps(self, flow: bool = False) -> tuple[int, ...]:
        """Every step but the last, whose Gaussian is too sharp to train (it stays deterministic)."""
        return tuple(range(self.num_steps - 1))

    def stochastic_step_policy(self) -> StochasticStepPolicy:
        if self.sde_steps == "all":
            return AllSteps()
        if self.sde_steps == "random":
            return RandomSubset(self.sde_window_size)
        if self.sde_steps == "window":
            low, high = self._window_range()
            return RandomWindow(self.sde_window_size, low, high)
        return SlidingWindow(self.sde_window_size, self.sde_window_shift_every, self.sde_window_stride,
                             self.sde_window_roll_back)
