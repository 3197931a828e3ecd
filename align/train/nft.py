"""The math of DiffusionNFT (Zheng et al., "DiffusionNFT: Online Diffusion Reinforcement with Forward Process"), as small pure functions.

DiffusionNFT trains on the forward (noising) process only: rollouts are clean samples x0 of the
"old" policy (any deterministic solver, no CFG), each with a reward; no log-probability of a
sampler step is ever needed, so any solver and any black-box reward serve.

Rewards to optimality probabilities.  A sample's reward becomes an advantage A (the reward minus
its group's mean, over the std of every reward of the rollout plus 1e-4: the official code's
``PerPromptStatTracker(global_std=True)``; the integration computes it with the same group
normalisation as GRPO), clipped to [-c, c] (c = ``advantage_clip``, 5), and then the probability
that the sample is "optimal":

    r = clip(A, -c, c) / (2 c) + 1/2        in [0, 1]        (:func:`optimality_probability`)

Implicit policies.  With v_theta the trained prediction and v_old the old policy's (no gradient),
both at the same x_t,

    v+ = beta v_theta + (1 - beta) v_old        v- = (1 + beta) v_old - beta v_theta

(:func:`implicit_predictions`; note (v+ + v-) / 2 = v_old).  Each is turned into a clean-sample
prediction x0+- and regressed onto the rollout's x0, v+ weighted by r and v- by 1 - r:

    L = c * mean_batch[(r L+ + (1 - r) L-) / beta] + kl_weight * mean_batch(mean_dims((v_theta - v_ref)^2))

with L+- = mean_dims((x0+- - x0)^2) / sg(mean_dims|x0+- - x0|) (the official code's adaptive
weighting, the detached divisor floored at 1e-5; ``adaptive_weighting=False`` keeps the plain
squared error) and v_ref the frozen model's prediction (LoRA off).  The factor c is the official
code's (``policy_loss * adv_clip_max``).  Samples are noised as x_t = alpha x0 + sigma eps at a
level of the rollout sampler's schedule with fresh noise eps.

The fixed point (why it works).  At a fixed x_t, without the adaptive weights, the loss is a
quadratic in the trained prediction whose curvature beta^2 (r + 1 - r) does not depend on r.
Setting its derivative to zero, with D = x0_theta - x0_old and expectations over the rollouts' x0
given x_t:

    E[r (x0_old + beta D - x0)] = E[(1 - r) (x0_old - beta D - x0)]
    =>  beta D = 2 E[r x0 | x_t] - E[x0 | x_t] + (1 - 2 a) x0_old,        a(x_t) = E[r | x_t].

The rollouts are the old policy's own samples, so when the old model is their exact denoiser
(x0_old = E[x0 | x_t]) this is beta D = 2 a (x0_pos - x0_old), where x0_pos = E[r x0 | x_t] / a is
the denoiser of the *positive* distribution pi+(x0) ∝ r(x0) pi_old(x0).  So the optimum is

    x0_theta* = x0_old + (2 / beta) a(x_t) (x0_pos - x0_old),        x0+* = x0_old + 2 a (x0_pos - x0_old):

the trained model moves from the old policy toward the reward-tilted distribution's denoiser, and
where a = 1/2 the implicit positive policy is exactly the tilted one.  This is the form of the
paper's improvement result, v* = v_old + (2 / beta) Delta with Delta = a (v_pos - v_old); the
derivation here is self-contained, and it is what the toy tests check (not the paper's text).
With r = exp(lambda R(x)) for a reward R <= 0, pi+ is the tilt pi_old exp(lambda R) / Z, known in
closed form on the Gaussian-mixture toy, so the stationary point is checked exactly there.  The
adaptive weights depend on x0, so with them the optimum is not this closed form; it still moves
toward pi+ (tested as a direction).

Any parameterisation (the derivation for epsilon / v UNets).  At a fixed level (alpha, sigma) and
fixed x_t, every parameterisation of the model output u (epsilon, VP velocity v = alpha eps -
sigma x0, flow velocity eps - x0, the sample itself) maps to the clean-sample prediction by an
affine map x0(u) = P u + Q x_t (:func:`align.core.sampling.split_prediction`): epsilon
x0 = (x_t - sigma u) / alpha; VP v x0 = alpha x_t - sigma u; flow x0 = (x_t - sigma u) /
(alpha + sigma).  The implicit combinations have weights that sum to one (beta + (1 - beta) = 1,
(1 + beta) - beta = 1), and an affine map commutes with such combinations:

    x0(beta u_theta + (1 - beta) u_old) = beta x0(u_theta) + (1 - beta) x0(u_old).

So forming u+- in the model's own parameterisation and converting, or forming x0+- from the two
x0 predictions, is the same thing, and the x0-space losses above are identical whatever the model
predicts; for the flow family (alpha = 1 - t, sigma = t) it is the official x0+- = x_t - t v+-.
The fixed point transfers too: the per-x_t optimum in x0 maps to the optimum in any output space
by the same affine map.  Only a loss written in the model's own output space would differ (an
x0 error is (sigma / alpha)^2 times the epsilon error that makes it, so an epsilon-space loss
weighs the noise levels differently); the x0-space loss weighs them the same way for every
parameterisation.
:func:`nft_loss` takes the outputs in the model's own parameterisation, combines them there and
converts with ``split_prediction`` (no x0 clipping: clipping is not affine).

The regulariser is in flow-velocity space for every parameterisation: v = eps_hat - x0_hat (what
an SD3 / FLUX transformer predicts; for a UNet it is computed from its (x0_hat, eps_hat)).  A VP
x_t divided by alpha + sigma is the flow-path sample at t = sigma / (alpha + sigma) with the same
(x0, eps), so this is the official regulariser at the corresponding flow time.

The old policy is a soft copy of the trained one, updated once per rollout (epoch):
old <- d old + (1 - d) theta with d = min(rate * max(step - delay, 0), d_max), d = 0 before ``delay``
(:func:`old_policy_decay`, :func:`soft_update_`; official defaults rate 0.001, d_max 0.5; OCR
delay 75, rate 0.0075, d_max 0.999).

Checked against NVlabs/DiffusionNFT@24af555 (``scripts/train_nft_sd3.py``, ``config/nft.py``).
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

import torch
from torch import Tensor

from align.core.errors import check_range
from align.core.sampling import split_prediction

#: floor of the detached divisor of the adaptive weighting (the official code's 1e-5)
ADAPTIVE_WEIGHT_FLOOR = 1e-5


def optimality_probability(advantages: Tensor, advantage_clip: float) -> Tensor:
    """r = clip(A, -c, c) / (2 c) + 1/2 in [0, 1]: 0 at A <= -c, 1/2 at A = 0, 1 at A >= c."""
    check_range("advantage_clip", advantage_clip, 0.0, None, low_inclusive=False)
    return advantages.clamp(-advantage_clip, advantage_clip) / (2 * advantage_clip) + 0.5


def implicit_predictions(theta: Tensor, old: Tensor, beta: float) -> tuple[Tensor, Tensor]:
    """(u+, u-) = (beta u_theta + (1 - beta) u_old, (1 + beta) u_old - beta u_theta), u_old detached.

    Written as u_old +- beta (u_theta - u_old), so u+ = u_theta exactly at beta = 1.
    """
    old = old.detach()
    step = beta * (theta - old)
    return old + step, old - step


def x0_regression_error(x0_pred: Tensor, x0: Tensor, adaptive: bool = True) -> Tensor:
    """Per-sample mean over the non-batch dims of (x0_pred - x0)^2, [B].

    ``adaptive``: divided by the detached per-sample mean |x0_pred - x0| (floored at
    :data:`ADAPTIVE_WEIGHT_FLOOR`), so every sample's loss has the scale of its own error.
    """
    diff = x0_pred - x0
    dims = tuple(range(1, diff.ndim))
    error = diff.pow(2).mean(dims)
    if adaptive:
        scale = diff.detach().abs().mean(dims).clamp_min(ADAPTIVE_WEIGHT_FLOOR)
        error = error / scale
    return error


def _levels(level: float | Tensor, like: Tensor) -> float | Tensor:
    """A noise level as a number or a per-sample tensor broadcast over ``like`` [B, ...]."""
    if isinstance(level, Tensor) and level.ndim > 0:
        return level.to(like).reshape(-1, *([1] * (like.ndim - 1)))
    return float(level)


def _compute_dtype(*tensors: Tensor) -> torch.dtype:
    """At least float32 (half-precision model outputs are upcast for the loss)."""
    dtype = torch.float32
    for t in tensors:
        dtype = torch.promote_types(dtype, t.dtype)
    return dtype


@dataclass(frozen=True)
class NFTLoss:
    """The DiffusionNFT loss of a batch and its per-sample parts ([B] each).

    Attributes:
        total: the scalar to minimise: policy_scale * mean(policy) + kl_weight * mean(regulariser).
        policy: (r L+ + (1 - r) L-) / beta per sample.
        positive: L+, the x0 error of the implicit positive prediction.
        negative: L-, the x0 error of the implicit negative prediction.
        regulariser: mean_dims((v_theta - v_ref)^2) in flow-velocity space (zeros without a reference).
    """

    total: Tensor
    policy: Tensor
    positive: Tensor
    negative: Tensor
    regulariser: Tensor


def nft_loss(
    model_output: Tensor,
    old_output: Tensor,
    x_t: Tensor,
    x0: Tensor,
    alpha: float | Tensor,
    sigma: float | Tensor,
    prediction_type: str,
    optimality: Tensor,
    *,
    beta: float,
    policy_scale: float,
    reference_output: Tensor | None = None,
    kl_weight: float = 0.0,
    adaptive_weighting: bool = True,
) -> NFTLoss:
    """The DiffusionNFT loss of one batch at one noise level per sample (see the module docstring).

    Args:
        model_output: the trained model's output at x_t, in its own parameterisation [B, ...].
        old_output: the old policy's output at the same x_t (detached here).
        x_t: alpha x0 + sigma eps, the noised rollout samples.
        x0: the rollout's clean samples (the regression target).
        alpha, sigma: the level of x_t, numbers or per-sample [B].
        prediction_type: "epsilon", "v_prediction", "flow" or "sample" (as the scheduler says).
        optimality: r in [0, 1] per sample [B] (:func:`optimality_probability`).
        beta: the implicit-policy strength (> 0; the official default 1.0, OCR 0.1).
        policy_scale: multiplies the mean policy term (the official code: the advantage clip, 5).
        reference_output: the frozen model's output at x_t (LoRA off); None leaves the regulariser out.
        kl_weight: weight of the flow-velocity regulariser (the official 1e-4).
        adaptive_weighting: the official self-normalised x0 errors (False: plain squared errors, for
            which the fixed point of the module docstring is exact).
    """
    check_range("beta", beta, 0.0, None, low_inclusive=False)
    dtype = _compute_dtype(model_output, x_t)
    model_output, old_output, x_t, x0 = (t.to(dtype) for t in (model_output, old_output, x_t, x0))
    a, s = _levels(alpha, x_t), _levels(sigma, x_t)
    positive_out, negative_out = implicit_predictions(model_output, old_output, beta)
    x0_positive, _ = split_prediction(positive_out, x_t, a, s, prediction_type)
    x0_negative, _ = split_prediction(negative_out, x_t, a, s, prediction_type)
    positive = x0_regression_error(x0_positive, x0, adaptive_weighting)
    negative = x0_regression_error(x0_negative, x0, adaptive_weighting)
    r = optimality.to(dtype)
    policy = (r * positive + (1 - r) * negative) / beta
    total = policy_scale * policy.mean()
    if reference_output is None:
        regulariser = torch.zeros_like(policy)
    else:
        v_theta = flow_velocity(model_output, x_t, a, s, prediction_type)
        v_ref = flow_velocity(reference_output.to(dtype).detach(), x_t, a, s, prediction_type)
        regulariser = (v_theta - v_ref).pow(2).mean(tuple(range(1, x_t.ndim)))
        total = total + kl_weight * regulariser.mean()
    return NFTLoss(total=total, policy=policy, positive=positive, negative=negative, regulariser=regulariser)


def flow_velocity(
    model_output: Tensor, x_t: Tensor, alpha: float | Tensor, sigma: float | Tensor, prediction_type: str
) -> Tensor:
    """The flow-matching velocity eps_hat - x0_hat of a model output in any parameterisation."""
    x0, eps = split_prediction(model_output, x_t, alpha, sigma, prediction_type)
    return eps - x0


def old_policy_decay(step: int, rate: float, maximum: float, delay: int = 0) -> float:
    """d = min(rate * (step - delay), maximum) from ``delay`` on, 0 before it (the official ``return_decay``)."""
    if step < delay:
        return 0.0
    return min(rate * (step - delay), maximum)


@torch.no_grad()
def soft_update_(old: Iterable[Tensor], current: Iterable[Tensor], decay: float) -> None:
    """old <- decay * old + (1 - decay) * current, in place (decay 0 copies ``current`` exactly)."""
    check_range("decay", decay, 0.0, 1.0)
    for o, c in zip(old, current, strict=True):
        if decay == 0.0:
            o.copy_(c)
        else:
            o.lerp_(c.to(o.dtype), 1.0 - decay)
