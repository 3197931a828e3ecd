"""Feynman-Kac potentials in log space, with the exact final correction.

At each scheduled step the particles carry an intermediate reward r_s (by default the reward of
the decoded x0-prediction).  A potential turns the rewards seen along a particle's ancestry into
a log-potential log G_s = lambda * stat_s:

* ``immediate``:  stat_s = r_s
* ``difference``: stat_s = r_s - r_prev (the ancestor's previous intermediate reward; on the
  first scheduled step there is none and stat_s = r_s, so the products telescope to
  exp(lambda r_last))
* ``max``:        stat_s = max(r_1, ..., r_s), the running maximum along the ancestry
* ``sum``:        stat_s = r_1 + ... + r_s, the running sum along the ancestry

(the FK paper's definitions; the running statistic starts from the first reward, never from 0,
so negative rewards are handled correctly, unlike the public code).  After the last sampler step
the final potential is

    log G_final = lambda * r(x0) - sum_s log G_s     (sum over the particle's ancestry)

so that the product of all potentials along any path is exp(lambda r(x0)) and the weighted
particles target p(x0) exp(lambda r(x0)) / Z exactly, whichever intermediate potential is used.
Everything is float64 and per particle; grouping by prompt happens in the weights.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor

from align.core.errors import AlignError, check_choice

#: (history [N], reward [N]) -> (statistic [N], new history [N]); history is NaN before the first step
PotentialFn = Callable[[Tensor, Tensor], tuple[Tensor, Tensor]]

POTENTIALS: dict[str, PotentialFn] = {}


def register_potential(name: str):
    """Register a potential statistic under ``name`` (see :data:`PotentialFn`)."""

    def add(fn: PotentialFn) -> PotentialFn:
        if name in POTENTIALS and POTENTIALS[name] is not fn:
            raise AlignError(f"a potential named {name!r} is already registered")
        POTENTIALS[name] = fn
        return fn

    return add


@register_potential("immediate")
def _immediate(history: Tensor, reward: Tensor) -> tuple[Tensor, Tensor]:
    return reward, reward


@register_potential("difference")
def _difference(history: Tensor, reward: Tensor) -> tuple[Tensor, Tensor]:
    previous = torch.nan_to_num(history, nan=0.0)
    return reward - previous, reward


@register_potential("max")
def _max(history: Tensor, reward: Tensor) -> tuple[Tensor, Tensor]:
    stat = torch.where(torch.isnan(history), reward, torch.maximum(history, reward))
    return stat, stat


@register_potential("sum")
def _sum(history: Tensor, reward: Tensor) -> tuple[Tensor, Tensor]:
    stat = torch.where(torch.isnan(history), reward, history + reward)
    return stat, stat


@dataclass
class PotentialState:
    """Per-particle running statistic and accumulated log-potential, gathered on resampling."""

    history: Tensor
    log_product: Tensor

    @classmethod
    def initial(cls, num_particles: int, device: torch.device | str) -> PotentialState:
        return cls(
            history=torch.full((num_particles,), float("nan"), dtype=torch.float64, device=device),
            log_product=torch.zeros(num_particles, dtype=torch.float64, device=device),
        )

    def select(self, index: Tensor) -> PotentialState:
        return PotentialState(self.history[index], self.log_product[index])


class Potential:
    """A named potential with tilt ``lam`` (lambda >= 0)."""

    def __init__(self, name: str, lam: float):
        check_choice("potential", name, sorted(POTENTIALS))
        self.name = name
        self.lam = float(lam)
        self._fn = POTENTIALS[name]

    def intermediate(self, rewards: Tensor, state: PotentialState) -> tuple[Tensor, PotentialState]:
        """log G_s [N] for intermediate rewards [N], and the updated state."""
        stat, history = self._fn(state.history, rewards.double())
        log_g = self.lam * stat
        return log_g, PotentialState(history, state.log_product + log_g)

    def final(self, rewards: Tensor, state: PotentialState) -> Tensor:
        """log G_final [N]: makes the product along each path exp(lambda r(x0))."""
        return self.lam * rewards.double() - state.log_product
