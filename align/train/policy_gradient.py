"""The math of policy-gradient fine-tuning (DDPO, GRPO and its variants), as small pure functions.

A stochastic sampling step is a Gaussian transition x_{i+1} ~ N(mean_theta(x_i), std_i^2 I)
(:meth:`align.core.sampling.SamplingSchedule.transition`), so a sampled chain is a trajectory of a
Gaussian policy and the score-function (REINFORCE) estimator applies:

    grad E[r] = E[ r * sum_i grad log p_theta(x_{i+1} | x_i) ].

Per-dimension log-probabilities.  Every public implementation (ddpo-pytorch, flow_grpo,
DanceGRPO, MixGRPO) averages the per-step log-density over the latent dimensions instead of
summing it, so the importance ratio is the geometric mean of the per-dimension ratios and the
clip ranges of the papers are tiny (1e-4).  :func:`gaussian_log_density` is the exact density
(summed); the objective divides by the number of dimensions D to use the papers' clip ranges and
KL weights (:func:`per_dimension`).

Pieces:

* :func:`gaussian_log_density`: log N(x; mean, std^2 I) per sample.
* :func:`gaussian_kl`: the closed-form KL between two Gaussian transitions of equal std.
* :func:`group_advantages`: GRPO's (r - group mean) / (group std + eps).
* :class:`PerPromptStatTracker`: DDPO's running per-prompt reward statistics.
* :func:`clipped_surrogate`: the PPO-clipped objective of the importance ratio.
* :func:`guard_log_ratio`: GRPO-Guard's ratio normalisation.
"""

from __future__ import annotations

import math
from collections import deque
from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import Tensor

from align.core.errors import check_range

#: added to the std of GRPO advantages (Flow-GRPO's 1e-4)
ADVANTAGE_EPS = 1e-4
#: added to the std of DDPO's per-prompt statistics (ddpo-pytorch's 1e-6)
TRACKER_EPS = 1e-6


def _as_rows(std: float | Tensor, like: Tensor) -> Tensor:
    """``std`` as a float64 tensor [B, 1] (a number or one std per sample)."""
    std = torch.as_tensor(std, dtype=torch.float64, device=like.device)
    return std.expand(like.shape[0]).reshape(-1, 1) if std.ndim == 0 else std.reshape(-1, 1).double()


def gaussian_log_density(x: Tensor, mean: Tensor, std: float | Tensor) -> Tensor:
    """log N(x; mean, std^2 I) per sample, [B] in float64, summed over every non-batch dimension.

    ``std`` is one number or one per sample [B] (> 0).  Computed in float64 from the float32 state,
    so the rounding of the density itself never shows in an importance ratio.
    """
    diff = (x.double() - mean.double()).flatten(1)
    s = _as_rows(std, diff)
    dims = diff.shape[1]
    quad = (diff / s).pow(2).sum(1) / 2
    return -quad - dims * torch.log(s[:, 0]) - dims * 0.5 * math.log(2 * math.pi)


def per_dimension(log_density: Tensor, x: Tensor) -> Tensor:
    """A per-sample log-density divided by the number of dimensions of one sample of ``x`` (the papers' scale)."""
    return log_density / x[0].numel()


def gaussian_kl(mean_p: Tensor, mean_q: Tensor, std: float | Tensor) -> Tensor:
    """KL(N(mean_p, std^2 I) || N(mean_q, std^2 I)) = |mean_p - mean_q|^2 / (2 std^2) per sample [B], float64.

    The exact KL between two Gaussian transitions of the same step (the trained and the frozen
    model share the step's std).  Flow-GRPO's code divides by 2 sigma_t^2 without the step's |dt|
    (its KL is |dt| times this one); here the variance is the transition's own.
    """
    diff = (mean_p.double() - mean_q.double()).flatten(1)
    s = _as_rows(std, diff)
    return (diff / s).pow(2).sum(1) / 2


def group_advantages(
    rewards: Tensor,
    groups: Tensor,
    valid: Tensor | None = None,
    *,
    global_std: bool = False,
    eps: float = ADVANTAGE_EPS,
) -> Tensor:
    """GRPO advantages: (r - mean of the sample's group) / (std + eps), float64 [N].

    ``groups`` [N] holds each sample's group id.  The std is the population std of the group
    (``global_std``: of every valid reward, Flow-GRPO's SD3 default).  Invalid samples (``valid``
    False: a reward fault dropped them) get 0 and are left out of the statistics.  A group whose
    valid rewards are all equal carries no signal: its advantages are exactly 0 (never NaN or
    rounding noise divided by eps).
    """
    r = rewards.detach().double()
    ok = torch.ones_like(r, dtype=torch.bool) if valid is None else valid.to(r.device).bool() & torch.isfinite(r)
    out = torch.zeros_like(r)
    if not bool(ok.any()):
        return out
    overall_std = r[ok].std(unbiased=False) if global_std else None
    for g in torch.unique(groups[ok]):
        members = ok & (groups == g)
        values = r[members]
        if bool((values == values[0]).all()):
            continue  # no signal (and 1 sample: no baseline)
        std = overall_std if global_std else values.std(unbiased=False)
        out[members] = (values - values.mean()) / (std + eps)
    return out


class PerPromptStatTracker:
    """DDPO's advantages: rewards normalised by running statistics of their prompt.

    Each prompt keeps its last ``buffer_size`` rewards (across rollouts).  A reward's advantage is
    (r - mean) / (std + 1e-6) with the prompt's statistics once it has ``min_count`` rewards, and
    the current batch's statistics before that (ddpo-pytorch's ``PerPromptStatTracker``).  The
    state (``state_dict``) is JSON-able, so a resumed run continues with the same history.
    """

    def __init__(self, buffer_size: int = 16, min_count: int = 16):
        check_range("tracker_buffer_size", buffer_size, 1, None, integer=True)
        check_range("tracker_min_count", min_count, 1, buffer_size, integer=True)
        self.buffer_size, self.min_count = buffer_size, min_count
        self.history: dict[str, deque[float]] = {}

    def update(self, prompts: Sequence[str], rewards: Tensor, valid: Tensor | None = None) -> Tensor:
        """Add a batch's rewards to the history and return their advantages (float64 [N]; 0 where invalid)."""
        r = rewards.detach().double().cpu()
        ok = torch.ones_like(r, dtype=torch.bool) if valid is None else valid.cpu().bool() & torch.isfinite(r)
        out = torch.zeros_like(r)
        if not bool(ok.any()):
            return out
        batch_mean, batch_std = r[ok].mean(), r[ok].std(unbiased=False) + TRACKER_EPS
        rows: dict[str, list[int]] = {}
        for i, prompt in enumerate(prompts):
            if ok[i]:
                rows.setdefault(prompt, []).append(i)
        for prompt in sorted(rows):
            index = torch.tensor(rows[prompt])
            history = self.history.setdefault(prompt, deque(maxlen=self.buffer_size))
            history.extend(float(v) for v in r[index])
            if len(history) < self.min_count:
                mean, std = batch_mean, batch_std
            else:
                values = torch.tensor(list(history), dtype=torch.float64)
                mean, std = values.mean(), values.std(unbiased=False) + TRACKER_EPS
            out[index] = (r[index] - mean) / std
        return out.to(rewards.device)

    def state_dict(self) -> dict[str, Any]:
        return {"buffer_size": self.buffer_size, "min_count": self.min_count,
                "history": {p: list(h) for p, h in self.history.items()}}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.history = {p: deque(map(float, h), maxlen=self.buffer_size) for p, h in state["history"].items()}


def clipped_surrogate(log_ratio: Tensor, advantages: Tensor, clip_range: float) -> tuple[Tensor, Tensor]:
    """PPO's clipped surrogate loss per sample and the importance ratio.

    loss = max(-A * rho, -A * clip(rho, 1 - eps, 1 + eps)) with rho = exp(log_ratio); its gradient
    is -A * grad rho where the ratio is inside the clip range (or moves the objective the wrong
    way) and 0 elsewhere.  On-policy (rho = 1) it is -A * grad log p: the REINFORCE estimate.
    """
    ratio = torch.exp(log_ratio)
    unclipped = -advantages * ratio
    clipped = -advantages * torch.clamp(ratio, 1.0 - clip_range, 1.0 + clip_range)
    return torch.maximum(unclipped, clipped), ratio


def guard_log_ratio(log_ratio: Tensor, mean_new: Tensor, mean_old: Tensor, std: float | Tensor) -> Tensor:
    """GRPO-Guard's normalised log-ratio (RatioNorm) for per-dimension log-probabilities.

    With x = mean_old + s * z, the per-dimension log-ratio is mean_d(z * delta) / s - b, where
    delta = mean_new - mean_old and b = mean_d(delta^2) / (2 s^2): the -b term drags the ratio
    below 1 and the 1/s scaling makes low-noise steps dominate.  Guard returns
    (log_ratio + b) * s = mean_d(z * delta), zero-mean and free of 1/s (``std`` = s, the step's std).
    """
    diff = (mean_new.double() - mean_old.double()).flatten(1)
    s = _as_rows(std, diff)[:, 0]
    b = diff.pow(2).mean(1) / (2 * s * s)
    return (log_ratio + b) * s
