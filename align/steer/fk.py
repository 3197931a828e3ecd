"""Feynman-Kac (FK) steering: sequential Monte Carlo over a diffusion sampler.

Singhal et al., "A General Framework for Inference-time Scaling and Steering of Diffusion
Models".  K particles per prompt run through any stochastic sampler (a denoiser callable and a
:class:`~align.core.sampling.SamplingSchedule`, so an analytic toy model works as well as a UNet).  At
scheduled steps the particles' intermediate rewards become potentials (:mod:`align.steer.potentials`),
their log-weights are updated and, when needed, the particles are resampled
(:mod:`align.steer.resampling`).  After the last step the final potential makes the product of
potentials along every path equal exp(lambda r(x0)), so the weighted particles target

    p_theta(x0) exp(lambda r(x0)) / Z

exactly only as the number of particles K grows without bound: at practical K the potentials differ
(``max`` and ``difference`` converge like 1/K on the analytic toy, ``sum`` does not; figures in
:mod:`align.steer.potentials` and BENCHMARKS.md).

Differences from the public code, all deliberate: log-space float64 weights (no clamping);
weights carried forward on steps where ESS-adaptive resampling is skipped; four resamplers;
running max/sum statistics that start from the first reward (not 0); several prompts per call;
chunked decoding and scoring; flow-matching models through the SDE step; a clear refusal of
deterministic samplers (resampled copies would stay identical).

FK is the toolkit's one sampling chain (:func:`align.core.chain.run_chain`) with three hooks.
Step ``i`` works on the model output at x_i: potentials are evaluated on the x0-prediction of
that output (no extra model call), particles and their outputs are gathered by the ancestors
(``reweight``), then the sampler step is taken.  Particle k of every prompt draws its noise from
a generator seeded ``seed + k`` (the slot keeps its generator through resampling), so at
lambda = 0 FK gives bitwise the samples of best-of-N and of ``align sample`` with the same seed.
The optional gradient-guided proposal (``shift``) moves the step's mean by

    delta_i = proposal_scale * lambda * std_i^2 * J_{i+1} * grad_x0 r(decode(x0_hat_i)),
    J_{i+1} = alpha_{i+1} / (alpha_{i+1}^2 + sigma_{i+1}^2),

the gradient of the twist exp(lambda r(x0_hat(x_{i+1}))) when the x0-prediction's Jacobian is
approximated by its value for standard-normal data, and multiplies the weight by the exact
ratio of the base to the shifted Gaussian transition densities (``on_noise``).

Health: every resampling event records each prompt's effective sample size (ESS) before
resampling, and the result carries ESS / K of the final weights (``final_relative_ess``, before
any final resampling).  When that falls below ``FKConfig.ess_warning`` a :class:`LowESSWarning`
is issued once per call: the weighted output then rests on a few particles and is close to one
draw; the remedies to try are more particles, a smaller lambda, or the max or difference potential.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor

from align.core.chain import run_chain
from align.core.errors import AlignError
from align.core.sampling import DenoiserFn, Generators, SamplingSchedule, StepResult, randn
from align.steer.fk_config import FKConfig
from align.steer.particles import (
    ParticleSetup,
    ResamplingEvent,
    RewardFn,
    SteeringResult,
    check_reward_fn,
    group_view,
    prepare_particles,
)
from align.steer.potentials import Potential, PotentialState
from align.steer.resampling import effective_sample_size, flat_indices, normalize_log_weights, resample_groups

__all__ = ["FKConfig", "LowESSWarning", "fk_sample", "check_stochastic"]

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
        shape = (x0_hat.shape[0], n, *x0_hat.shape[1:])
        draws = x0_hat.unsqueeze(1) + spread * randn(shape, self.aux, x0_hat.device, x0_hat.dtype)
        prompts = None if self.setup.rewards.prompts is None else [q for q in self.setup.rewards.prompts for _ in range(n)]
        scores = self.setup.rewards.scores(draws.flatten(0, 1), prompts).view(-1, n)
        return _log_mean_exp(scores, self.config.lambda_, dim=1)


class LowESSWarning(UserWarning):
    """FK's final weights rest on few particles (see :attr:`FKConfig.ess_warning`)."""


class _Steering:
    """FK's hooks into the sampling chain: potentials and resampling (``reweight``), the
    gradient-guided proposal (``shift``) and its weight correction (``on_noise``)."""

    def __init__(self, setup: ParticleSetup, config: FKConfig, potential_steps: set[int],
                 intermediate: _IntermediateReward, aux: torch.Generator):
        self.setup, self.config, self.steps = setup, config, potential_steps
        self.intermediate, self.aux = intermediate, aux
        self.lam = config.lambda_
        self.potential = Potential(config.potential, self.lam)
        self.guided = config.proposal == "gradient" and self.lam > 0.0 and config.proposal_scale > 0.0
        self.log_w = torch.zeros(setup.num_prompts, setup.per_prompt, dtype=torch.float64, device=setup.device)
        self.state = PotentialState.initial(setup.num_particles, setup.device)
        self.events: list[ResamplingEvent] = []
        self._grad: Tensor | None = None  # reward gradient at this step's x0-prediction (proposal=gradient)

    def _shifts(self, i: int) -> bool:
        return self.guided and self.setup.schedule.noise_stds[i] > 0.0

    def reweight(self, i: int, x: Tensor, out: Tensor) -> tuple[Tensor, Tensor]:
        """Step ``i``'s potentials on the x0-prediction of ``out``, then resampling; gathers x, out, state."""
        self._grad = None
        at_potential = i in self.steps and self.lam > 0.0
        if not (at_potential or self._shifts(i)):
            return x, out
        x0_hat = self.setup.schedule.predict(i, x, out)[0].detach()
        known = None
        if self._shifts(i):
            known, self._grad = self.setup.rewards.value_and_grad(x0_hat)
        if not at_potential:
            return x, out
        p = self.setup.num_prompts
        r_s = self.intermediate(i, x, x0_hat, known)
        log_g, self.state = self.potential.intermediate(r_s, self.state)
        self.log_w = self.log_w + group_view(log_g, p)
        _check_weights(self.log_w, i)
        ancestors, resampled, ess = resample_groups(self.log_w, self.config.resampler, self.aux,
                                                    self.config.ess_threshold)
        index = flat_indices(ancestors)
        x, out, self.state = x[index], out[index], self.state.select(index)
        if self._grad is not None:
            self._grad = self._grad[index]
        self.log_w = torch.where(resampled.unsqueeze(-1), torch.zeros_like(self.log_w), self.log_w)
        self.events.append(ResamplingEvent(i, ancestors, resampled, ess, group_view(r_s, p)))
        return x, out

    def shift(self, i: int, step: StepResult) -> Tensor | None:
        """The gradient-guided proposal's mean shift delta_i (module docstring), or None."""
        if self._grad is None or not self._shifts(i):
            return None
        schedule = self.setup.schedule
        std, a1, s1 = schedule.noise_stds[i], schedule.next_alphas[i], schedule.next_sigmas[i]
        return (self.config.proposal_scale * self.lam * std**2 * a1 / (a1 * a1 + s1 * s1)) * self._grad

    def on_noise(self, i: int, delta: Tensor, z: Tensor) -> None:
        """Weight correction of the shifted proposal: log N(x; mean, std^2) - log N(x; mean + delta, std^2)."""
        std = self.setup.schedule.noise_stds[i]
        # with x - mean - delta = std * z
        d, zz = delta.flatten(1).double(), z.flatten(1).double()
        self.log_w = self.log_w + group_view(-(zz * d).sum(1) / std - (d * d).sum(1) / (2 * std**2),
                                             self.setup.num_prompts)


def fk_sample(
    denoiser: DenoiserFn,
    schedule: SamplingSchedule,
    reward_fn: RewardFn,
    config: FKConfig | None = None,
    *,
    intermediate_fn: IntermediateFn | None = None,
    generator: Generators = None,
    progress: bool = False,
    step_callback: Callable[[int, Tensor], None] | None = None,
    **inputs: Any,
) -> SteeringResult:
    """Run FK steering and return the final particles, their rewards, weights, ancestry and ESS.

    Args:
        denoiser: any callable ``(x_t, timestep [B], cond) -> model output``.
        schedule: the (stochastic) sampler, e.g. ``SamplingSchedule.from_scheduler(ddim, 100, eta=1.0)``.
        reward_fn: ``(decoded samples, prompts or None) -> scores [B]`` (a :class:`rewards.Reward` works).
        config: :class:`FKConfig` (paper defaults when None).
        intermediate_fn: user intermediate reward for ``config.intermediate_reward='custom'``.
        generator: None (default): particle k of every prompt draws its noise from a generator seeded
            ``config.seed + k``, as image k of ``align sample``; one generator: the whole batch's noise
            from it (diffusers' convention); a sequence: one generator per particle (prompt-major).
            See :func:`align.steer.particles.particle_noise`.
        step_callback: called as ``step_callback(i, x0_hat)`` after step ``i``'s resampling with the
            x0-predictions of the current particles (e.g. to animate the particles denoising).
        inputs: what to sample, the keywords of :func:`align.steer.particles.prepare_particles`:
            ``sample_shape`` (required), per-prompt ``cond``/``uncond`` with ``guidance_scale``,
            ``num_prompts``, ``prompts``, ``decode_fn``, ``device``, ``dtype``, ``model_dtype``.

    Warns:
        LowESSWarning: once per call when a prompt's final ESS / K (before any final resampling) is
            below ``config.ess_warning``.
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
    noise, aux = setup.noise(config.seed, generator)
    lam, p = config.lambda_, setup.num_prompts
    steering = _Steering(setup, config, steps, _IntermediateReward(setup, config, intermediate_fn, aux), aux)
    x = run_chain(
        schedule, setup.predictor, setup.initial_noise(noise), noise, reweight=steering.reweight,
        shift=steering.shift, on_noise=steering.on_noise, step_callback=step_callback, progress=progress,
        description="FK steering",
    )

    final_rewards, images = setup.rewards.scores_and_images(x)
    log_w, events = steering.log_w, steering.events
    if lam > 0.0:
        log_w = log_w + group_view(steering.potential.final(final_rewards, steering.state), p)
        _check_weights(log_w, schedule.num_steps)
    final_ess = effective_sample_size(log_w) / k
    _warn_low_ess(final_ess, config)
    rewards = group_view(final_rewards, p)
    if config.final_resample:
        ancestors, resampled, ess = resample_groups(log_w, config.resampler, aux, 1.0)
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
        final_relative_ess=final_ess,
    )


def _warn_low_ess(relative_ess: Tensor, config: FKConfig) -> None:
    low = (relative_ess < config.ess_warning).nonzero().flatten().tolist()
    if not low:
        return
    shown = 8  # a long prompt list would drown the advice
    figures = ", ".join(f"prompt {j}: {float(relative_ess[j]):.3f}" for j in low[:shown])
    if len(low) > shown:
        figures += f" and {len(low) - shown} more prompts"
    warnings.warn(
        f"FK steering: the final effective sample size per particle (ESS/k) is below ess_warning="
        f"{config.ess_warning} ({figures}; k={config.num_particles}); the weighted output rests on a few "
        f"particles. Raise num_particles, lower lambda_ (now {config.lambda_}), or use potential='max' or "
        "'difference'",
        LowESSWarning,
        stacklevel=3,
    )


def _check_weights(log_w: Tensor, step: int) -> None:
    bad = torch.isnan(log_w).any(-1) | torch.isneginf(log_w).all(-1) | torch.isposinf(log_w).any(-1)
    if bool(bad.any()):
        prompts = bad.nonzero().flatten().tolist()
        raise AlignError(
            f"FK weights became invalid at step {step} for prompts {prompts} (NaN, +inf, or every particle "
            "at zero weight); the reward returned non-finite values or lambda_ is too large for its range"
        )
