"""Inference-time baselines without particles: best-of-N and reward-gradient guidance.

Both take the same arguments as :func:`align.steer.fk.fk_sample` (any denoiser callable and schedule)
and return a :class:`~align.steer.particles.SteeringResult` with evaluation counts, so that methods can
be compared at matched compute.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor

from align.core.sampling import DenoiserFn, SamplingSchedule
from align.steer.guidance_config import BestOfNConfig, GradientGuidanceConfig
from align.steer.particles import (
    ParticleSetup,
    RewardFn,
    SteeringResult,
    X0Shift,
    check_reward_fn,
    group_view,
    make_generators,
    prepare_particles,
    sample_chain,
)

__all__ = ["BestOfNConfig", "GradientGuidanceConfig", "best_of_n", "gradient_guidance"]


def _sample_and_score(
    denoiser: DenoiserFn,
    schedule: SamplingSchedule,
    reward_fn: RewardFn,
    config: BestOfNConfig | GradientGuidanceConfig,
    generator: torch.Generator | None,
    progress: bool,
    inputs: dict[str, Any],
    description: str,
    make_shift: Callable[[ParticleSetup], X0Shift] | None = None,
) -> SteeringResult:
    check_reward_fn(reward_fn)
    setup = prepare_particles(
        denoiser, schedule, config.num_samples, reward_fn=reward_fn, chunk_size=config.chunk_size,
        model_chunk_size=config.model_chunk_size, **inputs,
    )
    noise_gen, _ = make_generators(config.seed, generator)
    x = sample_chain(schedule, setup.predictor, setup.initial_noise(noise_gen), noise_gen,
                     x0_shift=None if make_shift is None else make_shift(setup), progress=progress,
                     description=description)
    scores, images = setup.rewards.scores_and_images(x)
    return SteeringResult(samples=x, images=images, rewards=group_view(scores, setup.num_prompts), counts=setup.counts)


def best_of_n(
    denoiser: DenoiserFn,
    schedule: SamplingSchedule,
    reward_fn: RewardFn,
    config: BestOfNConfig | None = None,
    *,
    generator: torch.Generator | None = None,
    progress: bool = False,
    **inputs: Any,
) -> SteeringResult:
    """Sample ``num_samples`` per prompt in one batch and score them; ``best_indices()`` picks the winners.

    ``inputs`` are the keywords of :func:`align.steer.particles.prepare_particles` (``sample_shape``,
    ``cond``, ``uncond``, ``guidance_scale``, ``prompts``, ``decode_fn``, ...), as for
    :func:`align.steer.fk.fk_sample`.  Under the same seed the samples are exactly those of FK steering
    with lambda = 0.
    """
    config = config or BestOfNConfig()
    return _sample_and_score(denoiser, schedule, reward_fn, config, generator, progress, inputs, "best-of-N")


def gradient_guidance(
    denoiser: DenoiserFn,
    schedule: SamplingSchedule,
    reward_fn: RewardFn,
    config: GradientGuidanceConfig | None = None,
    *,
    generator: torch.Generator | None = None,
    progress: bool = False,
    **inputs: Any,
) -> SteeringResult:
    """Sample with the x0-prediction pushed up the reward gradient at every guided step.

    ``inputs`` as for :func:`best_of_n`.
    """
    config = config or GradientGuidanceConfig()

    def make_shift(setup: ParticleSetup) -> X0Shift:
        end = schedule.num_steps - 1 if config.end_step is None else config.end_step
        guided = range(config.start_step, end + 1)

        def shift(i: int, x0_hat: Tensor) -> Tensor | None:
            if config.scale == 0.0 or i not in guided:
                return None
            _, grad = setup.rewards.value_and_grad(x0_hat.detach())
            return config.scale * grad

        return shift

    return _sample_and_score(denoiser, schedule, reward_fn, config, generator, progress, inputs,
                             "gradient guidance", make_shift)
