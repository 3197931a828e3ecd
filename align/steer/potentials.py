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

so that the product of all potentials along any path is exp(lambda r(x0)).  Every potential is
therefore consistent: as the number of particles k -> infinity the weighted particles target
p(x0) exp(lambda r(x0)) / Z, p being the sampler's own law.  They are not equally good at a
practical k.  Resampling moves the particles towards the sampler's law tilted by the product of
the potentials seen so far; the final weights exp(lambda r(x0) - sum log G) must undo whatever
that product overshoots, and cannot bring back the particles it resampled away.  With n potential
steps and intermediate rewards close to the final one, the product before the final correction is

* ``difference``: exp(lambda r_n), the target's own tilt (the product telescopes);
* ``immediate``, ``max``: about exp(n lambda r);
* ``sum``: about exp(n (n + 1) / 2 lambda r), exp(10 lambda r) with the paper's n = 4.

Measured (``bench/fk_potentials.py``, tables in BENCHMARKS.md): a 1-D Gaussian mixture with its
exact denoiser, 500 DDIM steps (eta 1), potentials at 20/40/60/80% of the steps, means over 4
seeds.  The sampler's own k -> infinity limit misses the exact tilted mean by -0.013, -0.014
and -0.026 at lambda 1, 2, 4 (time discretisation).

* Linear reward r(x) = x (the x0-prediction's reward is then the exact look-ahead
  E[r(x0) | x_t]).  ``difference`` converges at practical k at every tilt: at lambda 2 the bias
  of the mean is -0.054, -0.017, -0.010 at k = 16, 64, 256 (the limit is -0.014) and ESS/k stays
  at 0.61-0.39 up to k = 4096.  ``max`` and ``immediate`` converge at lambda 1 and 2 (max: -0.065,
  -0.032, -0.013), but their ESS/k falls with lambda and k (max at lambda 4: 0.28 at k = 16, 0.007
  at k = 4096, where its bias has a seed spread of 0.043 against difference's 0.013).  ``sum``
  does not converge at practical k: at lambda 2 its bias grows from +0.015 (k = 16) to +0.098
  (k = 4096) and its variance falls to 0.58 of the target's, as ESS/k falls from 0.37 to 0.005:
  its weights degenerate.
* Quadratic reward r(x) = -x^2 / 2 at lambda 4 (the x0-prediction's reward is not the
  look-ahead).  ``max`` is the best: bias -0.005 +- 0.002 from k = 64 on (the limit is -0.006)
  and ESS/k at least 0.34 at every k; ``difference`` converges too (ESS/k 0.44 -> 0.24); ``sum``'s ESS/k falls from 0.33 to 0.03
  and its seed spread at k = 4096 is 14 times max's.

Which to use: ``max`` stays the default (the paper's, chosen on image rewards, and the best of
the four on the quadratic reward); prefer ``difference`` for strong tilts when the intermediate
reward is a good look-ahead (a reward nearly linear in the image); do not use ``sum``, kept for
comparison with the paper.  A low final ESS (``SteeringResult.log_weights``) is the symptom to
watch for with any of them.
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
