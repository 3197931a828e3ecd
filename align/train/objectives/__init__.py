"""Trainer objectives: one per method family, chosen by the method config's ``objective``.

* ``backprop`` (:class:`BackpropObjective`): sample with gradients through the truncation window,
  decode, score with a differentiable reward, shaped reward loss (DRaFT, DRaFT-LV, AlignProp, ReFL).
* ``policy_gradient`` (:class:`PolicyGradientObjective`): collect rollouts with a stochastic
  sampler, score them with any reward, PPO-clipped surrogate over the stored transitions (DDPO, GRPO).
* ``diffusion_nft`` (:class:`DiffusionNFTObjective`): rollouts of the old policy (same machinery), then
  the implicit positive / negative policies regressed onto the clean samples on the forward process.
* ``diffusion_dpo`` (:class:`DiffusionDPOObjective`): preference pairs (an offline data set, or the
  model's own samples ranked by a reward), the DPO loss against the frozen model.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from align.train.objectives.backprop import BackpropObjective
from align.train.objectives.base import Objective
from align.train.objectives.dpo import DiffusionDPOObjective
from align.train.objectives.nft import DiffusionNFTObjective
from align.train.objectives.policy_gradient import PolicyGradientObjective

if TYPE_CHECKING:  # pragma: no cover
    from align.train.trainer import Trainer

#: objective name (a method config's ``objective``) -> class
OBJECTIVES: dict[str, type[Objective]] = {
    "backprop": BackpropObjective,
    "policy_gradient": PolicyGradientObjective,
    "diffusion_nft": DiffusionNFTObjective,
    "diffusion_dpo": DiffusionDPOObjective,
}


def make_objective(trainer: Trainer) -> Objective:
    """The objective of the trainer's method."""
    return OBJECTIVES[trainer.method.objective](trainer)


__all__ = ["OBJECTIVES", "BackpropObjective", "DiffusionDPOObjective", "DiffusionNFTObjective", "Objective", "PolicyGradientObjective", "make_objective"]
