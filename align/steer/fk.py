"""Feynman-Kac (FK) steering: sequential Monte Carlo over a diffusion sampler.

Singhal et al., "A General Framework for Inference-time Scaling and Steering of Diffusion
Models".  K particles per prompt run through any stochastic sampler (a denoiser callable and a
:class:`~align.core.sampling.SamplingSchedule`, so an analytic toy model works as well as a UNet).  At
scheduled steps the particles' intermediate rewards become potentials (:mod:`align.steer.potentials`),
their log-weights are updated and, when needed, the particles are resampled
(:mod:`align.steer.resampling`).  After the last step the final potential makes the product of
potentials along every path equal exp(lambda r(x0)), so the weighted particles target

    p_theta(x0) exp(lambda r(x0)) / Z.

Differences from the public code, all deliberate: log-space float64 weights (no clamping);
weights carried forward on steps where ESS-adaptive resampling is skipped; four resamplers;
running max/sum statistics that start from the first reward (not 0); several prompts per call;
chunked decoding and scoring; flow-matching models through the SDE step; a clear refusal of
deterministic samplers (resampled copies would stay identical).

Step ``i`` works on the model output at x_i: potentials are evaluated on the x0-prediction of
that output (no extra model call), particles and their outputs are gathered by the ancestors,
then the sampler step is taken.  The optional gradient-guided proposal shifts the step's mean by

    delta_i = proposal_scale * lambda * std_i^2 * J_{i+1} * grad_x0 r(decode(x0_hat_i)),
    J_{i+1} = alpha_{i+1} / (alpha_{i+1}^2 + sigma_{i+1}^2),

the gradient of the twist exp(lambda r(x0_hat(x_{i+1}))) when the x0-prediction's Jacobian is
approximated by its value for standard-normal data, and multiplies the weight by the exact
ratio of the base to the shifted Gaussian transition densities.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor
from tqdm.auto import tqdm

from align.core.errors import AlignError
from align.core.sampling import DenoiserFn, SamplingSchedule
from align.steer.fk_config import FKConfig
from align.steer.particles import (
    ParticleSetup,
    ResamplingEvent,
    RewardFn,
    SteeringResult,
    check_reward_fn,
    draw_noise,
    group_view,
    make_generators,
    prepare_particles,
)
from align.steer.potentials import Potential, PotentialState
from align.steer.resampling import flat_indices, normalize_log_weights, resample_groups

__all__ = ["FKConfig", "fk_sample", "check_stochastic"]

#: (x_t [N, ...], x0_hat [N, ...], step) -> intermediate rewards [N]
IntermediateFn = Callable[[Tensor, Tensor, int], Tensor]


def check_stochastic(schedule: SamplingSchedule, what: str = "FK steering") -> None:
    """Refuse a deterministic sampler for a method that resamples particles."""
    if schedule.is_stochastic:
        return
    if schedule.kind == "flow":
        use = "eta > 0 (e.g. eta=1.0), which takes the flow-matching SDE step"
    else:
        use = "DDIM with eta > 0 (eta=1.0 as in the FK paper) or the DDPM sampler"
    raise AlignError(
        f"{what} resamples particles, which needs a stochastic sampler, but this {schedule.kind} sampler "
        f"with eta={schedule.eta!r} is deterministic (resampled copies would stay identical); use {use}"
    )


def _log_mean_exp(values: Tensor, lam: float, dim: int) -> Tensor:
    """(1 / lam) log mean exp(lam * values): the soft maximum whose exp(lam * .) is an average."""
    if lam == 0.0:
        return values.mean(dim)
    return (torch.logsumexp(lam * values, dim) - math.log(values.shape[dim])) / lam


class _IntermediateReward:
    """r_s for the particles at step ``i`` from their x0-prediction (config.intermediate_reward)."""

    def __init__(self, setup: ParticleSetup, config: FKConfig, fn: IntermediateFn | None, aux: torch.Generator):
        if config.intermediate_reward == "custom" and fn is None:
            raise AlignError("intermediate_reward='custom' needs intermediate_fn=(x_t, x0_hat, step) -> rewards [N]")
        self.setup, self.config, self.fn, self.aux = setup, config, fn, aux

    def __call__(self, i: int, x: Tensor, x0_hat: Tensor, known: Tensor | None) -> Tensor:
        mode = self.config.intermediate_reward
        if mode == "custom":
            out = self.fn(x, x0_hat, i)
            if not isinstance(out, Tensor) or out.shape != (x.shape[0],):
                raise AlignError(f"intermediate_fn returned {getattr(out, 'shape', type(out))}; expected [{x.shape[0]}]")
            return out.detach().double()
        if mode == "x0":
            return known if known is not None else self.setup.rewards.scores(x0_hat)
        # x0_samples: draws from N(x0_hat, s^2 I) with s^2 = sigma^2 / (alpha^2 + sigma^2), the posterior
        # variance of x0 for standard-normal data, scored and averaged in the exp(lambda r) domain
        n = self.config.intermediate_samples
        a, s = self.setup.schedule.alphas[i], self.setup.schedule.sigmas[i]
        spread = s / math.sqrt(a * a + s * s)
        draws = x0_hat.unsqueeze(1) + spread * draw_noise((x0_hat.shape[0], n, *x0_hat.shape[1:]), x0_hat, self.aux)
        prompts = None if self.setup.rewards.prompts is None else [q for q in self.setup.rewards.prompts for _ in range(n)]
        scores = self.setup.rewards.scores(draws.flatten(0, 1), prompts).view(-1, n)
        return _log_mean_exp(scores, self.config.lambda_, dim=1)


def fk_sample(
    denoiser: DenoiserFn,
    schedule: SamplingSchedule,
    reward_fn: RewardFn,
    config: FKConfig | None = None,
    *,
    intermediate_fn: IntermediateFn | None = None,
    generator: torch.Generator | None = None,
    progress: bool = False,
    step_callback: Callable[[int, Tensor], None] | None = None,
    **inputs: Any,
) -> SteeringResult:
    """Run FK steering and return the final particles, their rewards, weights and ancestry.

    Args:
        denoiser: any callable ``(x_t, timestep [B], cond) -> model output``.
        schedule: the (stochastic) sampler, e.g. ``SamplingSchedule.from_scheduler(ddim, 100, eta=1.0)``.
        reward_fn: ``(decoded samples, prompts or None) -> scores [B]`` (a :class:`rewards.Reward` works).
        config: :class:`FKConfig` (paper defaults when None).
        intermediate_fn: user intermediate reward for ``config.intermediate_reward='custom'``.
        generator: noise generator (defaults to one seeded with ``config.seed``).
        step_callback: called as ``step_callback(i, x0_hat)`` after step ``i``'s resampling with the
            x0-predictions of the current particles (e.g. to animate the particles denoising).
        inputs: what to sample, the keywords of :func:`align.steer.particles.prepare_particles`:
            ``sample_shape`` (required), per-prompt ``cond``/``uncond`` with ``guidance_scale``,
            ``num_prompts``, ``prompts``, ``decode_fn``, ``device``, ``dtype``, ``model_dtype``.
    """
    config = config or FKConfig()
    check_reward_fn(reward_fn)
    steps = set(config.potential_steps(schedule.num_steps))
    check_stochastic(schedule)
    k = config.num_particles
    setup = prepare_particles(
        denoiser, schedule, k, reward_fn=reward_fn, chunk_size=config.chunk_size,
        model_chunk_size=config.model_chunk_size, **inputs,
    )
    noise_gen, aux_gen = make_generators(config.seed, generator)
    lam = config.lambda_
    p, n = setup.num_prompts, setup.num_particles
    potential = Potential(config.potential, lam)
    intermediate = _IntermediateReward(setup, config, intermediate_fn, aux_gen)
    guided = config.proposal == "gradient" and lam > 0.0 and config.proposal_scale > 0.0

    x = setup.initial_noise(noise_gen)
    log_w = torch.zeros(p, k, dtype=torch.float64, device=setup.device)
    state = PotentialState.initial(n, setup.device)
    events: list[ResamplingEvent] = []
    for i in tqdm(range(schedule.num_steps), desc="FK steering", disable=not progress, leave=False):
        out = setup.predictor(i, x)
        std = schedule.noise_stds[i]
        at_potential = i in steps and lam > 0.0
        shift_here = guided and std > 0.0
        known = grad = None
        if at_potential or shift_here:
            x0_hat = schedule.predict(i, x, out)[0].detach()
            if shift_here:
                known, grad = setup.rewards.value_and_grad(x0_hat)
            if at_potential:
                r_s = intermediate(i, x, x0_hat, known)
                log_g, state = potential.intermediate(r_s, state)
                log_w = log_w + group_view(log_g, p)
                _check_weights(log_w, i)
                ancestors, resampled, ess = resample_groups(log_w, config.resampler, aux_gen, config.ess_threshold)
                index = flat_indices(ancestors)
                x, out, state = x[index], out[index], state.select(index)
                if grad is not None:
                    grad = grad[index]
                log_w = torch.where(resampled.unsqueeze(-1), torch.zeros_like(log_w), log_w)
                events.append(ResamplingEvent(i, ancestors, resampled, ess, group_view(r_s, p)))
        if step_callback is not None:
            step_callback(i, schedule.predict(i, x, out)[0].detach())
        mean = schedule.transition(i, x, out).mean
        if std == 0.0:
            x = mean
            continue
        z = draw_noise(mean.shape, mean, noise_gen)
        if not shift_here:
            x = mean + std * z
            continue
        a1, s1 = schedule.next_alphas[i], schedule.next_sigmas[i]
        delta = (config.proposal_scale * lam * std**2 * a1 / (a1 * a1 + s1 * s1)) * grad
        x = mean + delta + std * z
        # log N(x; mean, std^2) - log N(x; mean + delta, std^2), with x - mean - delta = std * z
        d, zz = delta.flatten(1).double(), z.flatten(1).double()
        log_w = log_w + group_view(-(zz * d).sum(1) / std - (d * d).sum(1) / (2 * std**2), p)

    final_rewards, images = setup.rewards.scores_and_images(x)
    if lam > 0.0:
        log_w = log_w + group_view(potential.final(final_rewards, state), p)
        _check_weights(log_w, schedule.num_steps)
    rewards = group_view(final_rewards, p)
    if config.final_resample:
        ancestors, resampled, ess = resample_groups(log_w, config.resampler, aux_gen, 1.0)
        index = flat_indices(ancestors)
        x, images = x[index], images[index]
        events.append(ResamplingEvent(schedule.num_steps, ancestors, resampled, ess, rewards))
        rewards = group_view(final_rewards[index], p)
        log_w = torch.where(resampled.unsqueeze(-1), torch.zeros_like(log_w), log_w)
    return SteeringResult(
        samples=x,
        images=images,
        rewards=rewards,
        log_weights=normalize_log_weights(log_w),
        ancestry=events,
        counts=setup.counts,
    )


def _check_weights(log_w: Tensor, step: int) -> None:
    bad = torch.isnan(log_w).any(-1) | torch.isneginf(log_w).all(-1) | torch.isposinf(log_w).any(-1)
    if bool(bad.any()):
        prompts = bad.nonzero().flatten().tolist()
        raise AlignError(
            f"FK weights became invalid at step {step} for prompts {prompts} (NaN, +inf, or every particle "
            "at zero weight); the reward returned non-finite values or lambda_ is too large for its range"
        )
