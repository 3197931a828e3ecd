"""Settings shared by the policy-gradient methods (DDPO, GRPO): rollouts, the clipped surrogate, the stochastic sampler.

A policy-gradient method needs no reward gradient: it samples *rollouts* with a stochastic
sampler, scores them with any reward (black-box ones included), turns the rewards into
advantages, and maximises the PPO-clipped importance-weighted log-probability of the sampled
transitions (:mod:`align.train.policy_gradient`), recomputing the trained steps with gradients
in micro-batches (:mod:`align.train.objectives.policy_gradient`).

Sizes.  A rollout has ``rollout_size`` samples (over all processes).  One trainer step is one
optimiser step on batch_size x gradient_accumulation_steps x processes of them, each with its
trained steps (``timestep_fraction`` of its stochastic steps), so a rollout serves
``inner_epochs * rollout_size / (batch_size * gradient_accumulation_steps * processes)`` optimiser
steps before the next one is sampled; that division must be exact.  Micro-batches hold
batch_size samples at one trained step each, so memory does not grow with the number of steps.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

from align.core.errors import ConfigError, check_choice, check_range
from align.core.sampling import SDE_NOISE
from align.train.methods.base import MethodConfig
from align.train.stochastic_steps import AllSteps, StochasticStepPolicy


@dataclass
class PolicyGradientConfig(MethodConfig):
    """Rollout, advantage and surrogate settings common to the policy-gradient methods.

    Attributes:
        clip_range: PPO clip range eps of the importance ratio of per-dimension log-probabilities (the papers'
            1e-4: the ratio of a per-dimension mean moves about 1/D as far as the ratio of the density).
        advantage_clip: advantages are clamped to [-advantage_clip, advantage_clip] (5 in every paper's code).
        inner_epochs: passes of optimiser steps over each rollout (1: on-policy except for the minibatches after the
            first). From the second pass on, samples are reshuffled within each process's share of the rollout.
        timestep_fraction: fraction of each sample's stochastic steps trained per pass, drawn at random per sample
            (at least one).
        noise_level: a, the noise scale of the flow reverse SDE on flow-matching models: g = a sqrt(t / (1 - t))
            (Flow-GRPO) or g = a (sde_noise=constant, DanceGRPO's eta). Must be > 0. UNet models use eta (DDIM).
        sde_noise: "flow_grpo" (g = a sqrt(t / (1 - t))) or "constant" (g = a).
        eval_num_steps: sampling steps of the evaluation grids and the monitor (flow models: the ODE; UNet models: DDIM
            with eta, as in the rollouts); None: num_steps. Fewer steps while training than at evaluation is
            Flow-GRPO's "denoising reduction".
        ratio_norm: GRPO-Guard's ratio normalisation: the log-ratio becomes (log-ratio + b) * std, centred and free
            of the 1/std scale that makes low-noise steps dominate, and each step's loss is divided by its |dt|
            (the change of the noise level sigma over the step).
        overlap_reward: score each rollout chunk in a worker thread while the next chunk is sampled (a remote or
            CPU-bound black-box reward then costs little besides sampling); the scores are the same either way.
    """

    learning_rate: float = 3e-4
    weight_decay: float = 1e-4
    clip_range: float = 1e-4
    advantage_clip: float = 5.0
    inner_epochs: int = 1
    timestep_fraction: float = 1.0
    noise_level: float = 0.7
    sde_noise: str = "flow_grpo"
    eval_num_steps: int | None = None
    ratio_norm: bool = False
    overlap_reward: bool = True

    def __post_init__(self) -> None:
        super().__post_init__()
        check_range("clip_range", self.clip_range, 0.0, 1.0, low_inclusive=False)
        check_range("advantage_clip", self.advantage_clip, 0.0, None, low_inclusive=False)
        check_range("inner_epochs", self.inner_epochs, 1, 100, integer=True)
        check_range("timestep_fraction", self.timestep_fraction, 0.0, 1.0, low_inclusive=False)
        check_range("noise_level", self.noise_level, 0.0, None, low_inclusive=False)
        check_choice("sde_noise", self.sde_noise, SDE_NOISE)
        if self.eval_num_steps is not None:
            check_range("eval_num_steps", self.eval_num_steps, 1, 1000, integer=True)
        if self.sampler == "ddim" and self.eta == 0.0:
            raise ConfigError(
                f"{self.name}.eta=0 with sampler='ddim' samples deterministically: its steps have no transition "
                f"probability to train; accepted: eta > 0 (DDPO: 1.0), or sampler='ddpm'"
            )

    objective: ClassVar[str] = "policy_gradient"
    needs_reward_gradient: ClassVar[bool] = False

    # -- what each policy-gradient method defines -----------------------------------------------
    @property
    def rollout_size(self) -> int:  # pragma: no cover - every method overrides
        """Samples per rollout, over all processes."""
        raise NotImplementedError

    @property
    def samples_per_prompt(self) -> int:
        """Samples that share a prompt within a rollout (1: every sample draws its own prompt)."""
        return 1

    def candidate_steps(self, flow: bool = False) -> tuple[int, ...]:
        """The steps that may be stochastic (of these, those whose sampler step adds noise): DDPO's every step on UNet
        models; on flow models every step but the last, whose SDE step would leave noise in the image (the ODE's last
        step lands on the prediction)."""
        return tuple(range(self.num_steps - 1 if flow else self.num_steps))

    def stochastic_step_policy(self) -> StochasticStepPolicy:
        """Which candidates are stochastic in each rollout (DDPO: all of them)."""
        return AllSteps()

    def evaluation_sampling(self, flow: bool = False) -> dict[str, Any]:
        """eval_num_steps of the policy's own sampler family: the flow ODE on flow models (the SDE's marginals are
        the ODE's, Flow-GRPO evaluates so), DDIM with the method's eta (or DDPM) on UNet models: a few discrete
        DDIM steps at eta 1 and at eta 0 sample different distributions, and what a policy learns under one need
        not carry over to the other (the tests measure it)."""
        eta = 0.0 if flow else (None if self.sampler == "ddpm" else self.eta)
        return {"num_steps": self.eval_num_steps or self.num_steps, "sampler": self.sampler, "eta": eta}

    def trained_steps(self, stochastic_steps: int) -> int:
        """How many of a sample's ``stochastic_steps`` are trained per pass (at least one)."""
        return max(1, int(stochastic_steps * self.timestep_fraction))
