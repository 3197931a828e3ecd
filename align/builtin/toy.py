"""An analytic diffusion model: a Gaussian mixture with its exact denoiser, and closed-form tilts.

Data x0 ~ sum_m pi_m N(mu_m, diag(s_m^2)) in d dimensions.  Noised with x_t = alpha x0 + sigma eps
(any Gaussian path: VP or flow matching), x_t is again a mixture, so the exact posterior means
E[x0 | x_t] and E[eps | x_t] are closed-form; :class:`MixtureDenoiser` returns them as the epsilon,
v or flow-velocity prediction a diffusers scheduler expects, at the scheduler's own timesteps.
It is a denoiser callable like any model adapter, so every sampler runs on it unchanged.

Rewards whose tilted target p(x) exp(lambda r(x)) / Z is again a Gaussian mixture:

* :class:`LinearReward` r(x) = a . x: each component's mean moves by lambda s_m^2 a and its weight
  is multiplied by exp(lambda a . mu_m + lambda^2 a . (s_m^2 a) / 2).
* :class:`QuadraticReward` r(x) = -|x - c|^2 / 2: each component narrows to precision
  1/s_m^2 + lambda, centred between mu_m and c.

Samples are tensors [B, d].  An optional conditioning entry ``offset`` [B, d] shifts the mixture
per row (a stand-in for prompts).  The module also has the statistics used by the analytic tests.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

from align.core.errors import AlignError


@dataclass(frozen=True)
class GaussianMixture:
    """Mixture of axis-aligned Gaussians: weights [M], means [M, d], stds [M, d] (float64)."""

    weights: Tensor
    means: Tensor
    stds: Tensor

    @classmethod
    def create(cls, weights, means, stds) -> GaussianMixture:
        w = torch.as_tensor(weights, dtype=torch.float64)
        mu = torch.as_tensor(means, dtype=torch.float64)
        if mu.ndim == 1:
            mu = mu.unsqueeze(-1)
        s = torch.as_tensor(stds, dtype=torch.float64)
        s = s.unsqueeze(-1).expand_as(mu).clone() if s.ndim == 1 else s.expand_as(mu).clone()
        if w.ndim != 1 or w.shape[0] != mu.shape[0] or (w < 0).any() or not (s > 0).all():
            raise AlignError("a mixture needs M non-negative weights, means [M, d] and positive stds [M, d]")
        return cls(w / w.sum(), mu, s)

    @property
    def dim(self) -> int:
        return self.means.shape[1]

    def mean(self) -> Tensor:
        return (self.weights[:, None] * self.means).sum(0)

    def variance(self) -> Tensor:
        """Per-coordinate variance [d]."""
        second = (self.weights[:, None] * (self.stds**2 + self.means**2)).sum(0)
        return second - self.mean() ** 2

    def sample(self, n: int, generator: torch.Generator | None = None) -> Tensor:
        comp = torch.multinomial(self.weights, n, replacement=True, generator=generator)
        z = torch.randn(n, self.dim, generator=generator, dtype=torch.float64)
        return self.means[comp] + self.stds[comp] * z

    def cdf(self, x: Tensor, coord: int = 0) -> Tensor:
        """Marginal CDF of coordinate ``coord`` at points ``x``."""
        x = torch.as_tensor(x, dtype=torch.float64)
        z = (x[..., None] - self.means[:, coord]) / self.stds[:, coord]
        return (self.weights * 0.5 * (1 + torch.erf(z / math.sqrt(2)))).sum(-1)

    def posterior(self, x_t: Tensor, alpha: Tensor, sigma: Tensor) -> tuple[Tensor, Tensor]:
        """(E[x0 | x_t], E[eps | x_t]) for x_t = alpha x0 + sigma eps; alpha, sigma per row [B]."""
        # component-major layout [M, B, d]: the reductions over the few components stay elementwise
        x = x_t.double()
        a = alpha.double().view(1, -1, 1)
        s = sigma.double().view(1, -1, 1)
        means, var0 = self.means[:, None, :], self.stds[:, None, :] ** 2
        var = a**2 * var0 + s**2  # variance of x_t given the component
        resid = x - a * means
        log_resp = torch.log(self.weights)[:, None] - 0.5 * (resid**2 / var + torch.log(2 * math.pi * var)).sum(-1)
        resp = torch.exp(log_resp - torch.logsumexp(log_resp, 0))[..., None]
        x0 = (resp * (means + a * var0 * resid / var)).sum(0)
        eps = (resp * (s * resid / var)).sum(0)
        return x0, eps


class LinearReward:
    """r(x) = a . x (differentiable); ``reward(x, prompts)`` accepts [B, d] samples."""

    differentiable = True
    name = "linear"

    def __init__(self, direction):
        self.direction = torch.as_tensor(direction, dtype=torch.float64)

    def __call__(self, x: Tensor, prompts=None) -> Tensor:
        return x.flatten(1) @ self.direction.to(x)

    def tilt(self, mixture: GaussianMixture, lam: float) -> GaussianMixture:
        a = self.direction
        var = mixture.stds**2
        log_w = torch.log(mixture.weights) + lam * (mixture.means @ a) + 0.5 * lam**2 * (var * a**2).sum(-1)
        return GaussianMixture(torch.softmax(log_w, 0), mixture.means + lam * var * a, mixture.stds.clone())


class QuadraticReward:
    """r(x) = -|x - c|^2 / 2 (differentiable); tilts exist in closed form for lambda >= 0."""

    differentiable = True
    name = "quadratic"

    def __init__(self, center):
        self.center = torch.as_tensor(center, dtype=torch.float64)

    def __call__(self, x: Tensor, prompts=None) -> Tensor:
        return -0.5 * ((x.flatten(1) - self.center.to(x)) ** 2).sum(-1)

    def tilt(self, mixture: GaussianMixture, lam: float) -> GaussianMixture:
        if lam < 0:
            raise AlignError(f"lambda={lam!r}: the quadratic tilt exists for lambda >= 0 only")
        c, var = self.center, mixture.stds**2
        new_var = 1.0 / (1.0 / var + lam)
        new_mean = new_var * (mixture.means / var + lam * c)
        # integral of N(x; mu, var) exp(-lam |x - c|^2 / 2) over x, per component (up to a constant)
        log_w = torch.log(mixture.weights) + 0.5 * (torch.log(new_var / var) - lam * new_var / var * (mixture.means - c) ** 2).sum(-1)
        return GaussianMixture(torch.softmax(log_w, 0), new_mean, new_var.sqrt())


class MixtureDenoiser:
    """The exact denoiser of a :class:`GaussianMixture` at a diffusers scheduler's timesteps.

    VP schedulers (DDIM, DDPM): alpha = sqrt(alphas_cumprod[t]); the output follows the
    scheduler's ``prediction_type`` (epsilon, v_prediction, sample).  Flow matching
    (FlowMatchEulerDiscreteScheduler): sigma = t / num_train_timesteps, alpha = 1 - sigma, and the
    output is the velocity eps - x0.  ``cond['offset']`` [B, d] shifts the mixture per row.
    """

    def __init__(self, mixture: GaussianMixture, scheduler):
        self.mixture = mixture
        name = type(scheduler).__name__
        if name == "FlowMatchEulerDiscreteScheduler":
            self.prediction_type = "flow"
            self._acp = None
            self._train_steps = float(scheduler.config.num_train_timesteps)
        elif hasattr(scheduler, "alphas_cumprod"):
            self.prediction_type = scheduler.config.prediction_type
            self._acp = scheduler.alphas_cumprod.double()
        else:
            raise AlignError(f"scheduler {name} is not supported by the toy denoiser; use DDIM, DDPM or flow matching")
        self.calls = 0
        self.rows = 0

    def levels(self, timestep: Tensor) -> tuple[Tensor, Tensor]:
        if self._acp is None:
            sigma = timestep.double() / self._train_steps
            return 1.0 - sigma, sigma
        acp = self._acp[timestep.long().cpu()].to(timestep.device)
        return acp.sqrt(), (1 - acp).sqrt()

    def __call__(self, x_t: Tensor, timestep: Tensor, cond=None) -> Tensor:
        self.calls += 1
        self.rows += x_t.shape[0]
        alpha, sigma = self.levels(timestep)
        offset = None if not cond or "offset" not in cond else cond["offset"].double()
        x = x_t.double() if offset is None else x_t.double() - alpha[:, None] * offset
        x0, eps = self.mixture.posterior(x, alpha, sigma)
        if offset is not None:
            x0 = x0 + offset
        a, s = alpha[:, None], sigma[:, None]
        out = {"epsilon": eps, "sample": x0, "v_prediction": a * eps - s * x0, "flow": eps - x0}[self.prediction_type]
        return out.to(x_t.dtype)


def toy_scheduler(kind: str = "ddim", prediction_type: str = "epsilon"):
    """A diffusers scheduler for the toy: DDPM's linear betas (alpha_T ~ 0.006) or flow matching (sigma_0 = 1)."""
    from diffusers import DDIMScheduler, DDPMScheduler, FlowMatchEulerDiscreteScheduler

    if kind == "flow":
        return FlowMatchEulerDiscreteScheduler(shift=1.0)
    common = dict(beta_schedule="linear", beta_start=1e-4, beta_end=0.02, clip_sample=False, prediction_type=prediction_type)
    if kind == "ddpm":
        return DDPMScheduler(**common)
    if kind == "ddim":
        return DDIMScheduler(**common, set_alpha_to_one=True)
    raise AlignError(f"kind={kind!r} is not supported; accepted: 'ddim', 'ddpm', 'flow'")


def energy_distance_test(
    x: Tensor, y: Tensor, permutations: int = 200, generator: torch.Generator | None = None
) -> tuple[float, float]:
    """Two-sample energy-distance test of samples x [n, d] and y [m, d]: (statistic, p-value).

    The p-value is the permutation estimate (1 + #{permuted >= observed}) / (1 + permutations).
    """
    z = torch.cat([x, y]).double()
    n = x.shape[0]
    dist = torch.cdist(z, z)

    def stat(idx: Tensor) -> Tensor:
        a, b = idx[:n], idx[n:]
        return 2 * dist[a][:, b].mean() - dist[a][:, a].mean() - dist[b][:, b].mean()

    observed = stat(torch.arange(z.shape[0]))
    count = sum(int(stat(torch.randperm(z.shape[0], generator=generator)) >= observed) for _ in range(permutations))
    return float(observed), (1 + count) / (1 + permutations)


def weighted_law_moments(samples: Tensor, log_weights: Tensor) -> tuple[float, float]:
    """Mean and variance of one particle per group picked by its weight (1-D particles).

    ``samples`` and ``log_weights`` are [G, K] (G groups of K weighted particles, log-weights
    normalised per group, as FK returns them).  The groups are independent runs of the same
    sampler, so the law pools them with equal weight: its mean is the average of the groups'
    self-normalised weighted means, its variance the average weighted second moment minus the
    squared mean.
    """
    w = log_weights.exp()
    x = samples.double()
    mean = (w * x).sum(-1).mean()
    second = (w * x * x).sum(-1).mean()
    return float(mean), float(second - mean * mean)
