"""Settings shared by every training method, and those shared by the reward-backpropagation methods.

:class:`MethodConfig` holds what every method has (sampling, optimiser, the regulariser toward the
frozen model); each method family adds its own base: :class:`BackpropConfig` (the loss shaping
and truncation window of reward backpropagation) and
:class:`align.train.methods.policy_gradient.PolicyGradientConfig` (rollouts, advantages, the
clipped surrogate).  A family's ``objective`` names the trainer objective that turns a batch into
a loss (:mod:`align.train.objectives`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import Tensor

from align.core.errors import check_choice, check_range
from align.core.models import DEFAULT_DISTILLED_GUIDANCE, check_guidance
from align.train.truncation import TruncationPolicy

LOSSES = ("negative", "hinge", "target")


@dataclass
class MethodConfig:
    """Sampling and optimisation settings common to all training methods.

    Attributes:
        num_steps: sampling steps T of the chain (the chain that is differentiated through, or the rollouts).
        guidance_scale: classifier-free guidance scale while sampling (1 disables CFG). Not used by
            guidance-distilled models (FLUX-dev) unless true_cfg is set.
        distilled_guidance: the guidance value a guidance-distilled model (FLUX-dev) embeds (diffusers'
            FluxPipeline default 3.5); ignored by other models.
        true_cfg: run classifier-free guidance (guidance_scale) on a guidance-distilled model too, on top of
            its distilled guidance, at twice the denoiser compute (diffusers' FluxPipeline never does by default).
        sampler: "auto" (DDIM for UNet models, flow Euler for flow-matching models), "ddim", "ddpm" or "flow".
        eta: DDIM eta / flow-step stochasticity (0 deterministic; 1 ancestral).
        learning_rate: AdamW learning rate.
        weight_decay: AdamW weight decay.
        max_grad_norm: gradient clipping norm (0 disables clipping).
        kl_weight: weight of the regulariser toward the frozen model (the LoRA switched off; needs LoRA).
            Backprop methods: the mean squared difference of the trained and frozen predictions over the
            grad-enabled steps (DRaFT+). Policy-gradient methods: the closed-form KL between the two Gaussian
            transitions of each trained step, per latent dimension.
    """

    num_steps: int = 50
    guidance_scale: float = 7.5
    distilled_guidance: float = DEFAULT_DISTILLED_GUIDANCE
    true_cfg: bool = False
    sampler: str = "auto"
    eta: float = 0.0
    learning_rate: float = 2e-4
    weight_decay: float = 0.1
    max_grad_norm: float = 1.0
    kl_weight: float = 0.0

    def __post_init__(self) -> None:
        check_range("num_steps", self.num_steps, 1, 1000, integer=True)
        check_guidance(self.guidance_scale, self.distilled_guidance, self.true_cfg)
        check_choice("sampler", self.sampler, ("auto", "ddim", "ddpm", "flow"))
        check_range("eta", self.eta, 0.0, None)
        check_range("learning_rate", self.learning_rate, 0.0, 1.0, low_inclusive=False)
        check_range("weight_decay", self.weight_decay, 0.0, None)
        check_range("max_grad_norm", self.max_grad_norm, 0.0, None)
        check_range("kl_weight", self.kl_weight, 0.0, None)

    # -- what each method defines ------------------------------------------------------------
    name: ClassVar[str] = "method"
    #: the trainer objective of the method's family: "backprop" or "policy_gradient"
    objective: ClassVar[str] = "backprop"
    #: whether the method backpropagates the reward into the model (then the reward must be differentiable)
    needs_reward_gradient: ClassVar[bool] = True

    def evaluation_sampling(self, flow: bool = False) -> dict[str, Any]:
        """How the trainer samples its fixed-seed grids and the monitor (``generate`` keyword arguments) on a
        flow-matching model (``flow``) or a UNet model."""
        return {"num_steps": self.num_steps, "sampler": self.sampler, "eta": self.eta}


@dataclass
class BackpropConfig(MethodConfig):
    """Loss shaping and gradient options common to the reward-backprop methods.

    Attributes:
        loss: how the reward becomes a loss: "negative" (-scale * r), "hinge" (scale * relu(target - r), ReFL),
            or "target" (scale * |r - target|, AlignProp's aesthetic loss).
        loss_target: the target of the "hinge" and "target" losses.
        loss_scale: multiplies the loss.
        detach_denoiser_input: stop the gradient at the denoiser's input, keeping it through the scheduler
            update (DRTune).
    """

    loss: str = "negative"
    loss_target: float = 0.0
    loss_scale: float = 1.0
    detach_denoiser_input: bool = False

    def __post_init__(self) -> None:
        super().__post_init__()
        check_choice("loss", self.loss, LOSSES)
        check_range("loss_scale", self.loss_scale, 0.0, None, low_inclusive=False)

    objective: ClassVar[str] = "backprop"

    def truncation(self) -> TruncationPolicy:  # pragma: no cover - every method overrides
        raise NotImplementedError

    def reward_loss(self, rewards: Tensor) -> Tensor:
        """Per-sample loss from per-sample rewards (lower is better)."""
        if self.loss == "negative":
            loss = -rewards
        elif self.loss == "hinge":
            loss = torch.relu(self.loss_target - rewards)
        else:
            loss = (rewards - self.loss_target).abs()
        return self.loss_scale * loss
