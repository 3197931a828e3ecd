"""Inference-time baselines without particles: best-of-N and reward-gradient guidance.

Both take the same arguments as :func:`align.steer.fk.fk_sample` (any denoiser callable and schedule)
and return a :class:`~align.steer.particles.SteeringResult` with evaluation counts, so that methods can
be compared at matched compute.  Both run :func:`align.core.chain.run_chain` with the particle
samplers' seeds (sample k of every prompt from seed ``seed + k``); gradient guidance adds a
``shift`` hook that moves each guided step's x0-prediction up the reward gradient.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from torch import Tensor

from align.core.chain import MeanShift, StepCallback, run_chain
from align.core.sampling import DenoiserFn, Generators, SamplingSchedule, StepResult
from align.steer.guidance_config import BestOfNConfig, GradientGuidanceConfig
from align.steer.particles import (
    ParticleSetup,
    RewardFn,
    SteeringResult,
    check_reward_fn,
    group_view,
    prepare_particles,
)

__all__ = ["BestOfNConfig", "GradientGuidanceConfig", "best_of_n", "gradient_guidance"]


def _sample_and_score(
    denoiser: DenoiserFn,
    schedule: SamplingSchedule,
    reward_fn: RewardFn,
    config: BestOfNConfig | GradientGuidanceConfig,
    generator: Generators,
    progress: bool,
    inputs: dict[str, Any],
    description: str,
    make_shift: Callable[[ParticleSetup], MeanShift] | None = None,
    step_callback: StepCallback | None = None,
) -> SteeringResult:
    check_reward_fn(reward_fn)
    setup = prepare_particles(
        denoiser, schedule, config.num_samples, reward_fn=reward_fn, chunk_size=config.chunk_size,
        model_chunk_size=config.model_chunk_size, **inputs,
    )
    noise, _ = setup.noise(config.seed, generator)
    x = run_chain(schedule, setup.predictor, setup.initial_noise(noise), noise,
                  shift=None if make_shift is None else make_shift(setup), step_callback=step_callback,
                  progress=progress, description=description)
    scores, images = setup.rewards.scores_and_images(x)
    return SteeringResult(samples=x, images=images, rewards=group_view(scores, setup.num_prompts), counts=setup.counts)


def best_of_n(
    denoiser: DenoiserFn,
    schedule: SamplingSchedule,
    reward_fn: RewardFn,
    config: BestOfNConfig | None = None,
    *,
    generator: Generators = None,
    progress: bool = False,
    step_callback: StepCallback | None = None,
    **inputs: Any,
) -> SteeringResult:
    """Sample ``num_samples`` per prompt in one batch and score them; ``best_indices()`` picks the winners.

    ``inputs`` are the keywords of :func:`align.steer.particles.prepare_particles` (``sample_shape``,
    ``cond``, ``uncond``, ``guidance_scale``, ``prompts``, ``decode_fn``, ...), as for
    :func:`align.steer.fk.fk_sample`; ``generator`` as there (None: ``config.seed``, sample k of every
    prompt from seed + k).  Under the same seed the samples are exactly those of FK steering with
    lambda = 0 and of :func:`align.steer.generate.generate` with seeds seed, seed + 1, ...
    """
    config = config or BestOfNConfig()
    return _sample_and_score(denoiser, schedule, reward_fn, config, generator, progress, inputs, "best-of-N",
                             step_callback=step_callback)


def gradient_guidance(
    denoiser: DenoiserFn,
    schedule: SamplingSchedule,
    reward_fn: RewardFn,
    config: GradientGuidanceConfig | None = None,
    *,
    generator: Generators = None,
    progress: bool = False,
    step_callback: StepCallback | None = None,
    **inputs: Any,
) -> SteeringResult:
    """Sample with the x0-prediction pushed up the reward gradient at every guided step.

    ``inputs`` and ``step_callback`` as for :func:`best_of_n`.
    """
    config = config or GradientGuidanceConfig()

    def make_shift(setup: ParticleSetup) -> MeanShift:
        end = schedule.num_steps - 1 if config.end_step is None else config.end_step
        guided = range(config.start_step, end + 1)

        def shift(i: int, step: StepResult) -> Tensor | None:
            # moving x0_hat by scale * grad (eps_hat kept) moves the step's mean by coef_x0[i] times that
            if config.scale == 0.0 or i not in guided:
                return None
            _, grad = setup.rewards.value_and_grad(step.x0_hat.detach())
            return schedule.coef_x0[i] * (config.scale * grad)

        return shift

    return _sample_and_score(denoiser, schedule, reward_fn, config, generator, progress, inputs,
                             "gradient guidance", make_shift, step_callback)
