"""FK steering as a diffusers pipeline, for SD 1.x/2.x, SDXL, SD3 and FLUX.

>>> from pipelines import FKSteeringPipeline
>>> pipe = FKSteeringPipeline.from_pretrained("stable-diffusion-v1-5/stable-diffusion-v1-5")
>>> # or, reusing a loaded pipeline's components: FKSteeringPipeline.from_pipe(sd_pipe)
>>> out = pipe("a red circle", reward="brightness", num_particles=8, lambda_=10.0)
>>> out.best_images[0], out.rewards, out.ancestry, out.final_relative_ess

``__call__`` takes every :class:`align.steer.fk_config.FKConfig` field as a keyword (or a whole
``config``); passing a :class:`BestOfNConfig` or :class:`GradientGuidanceConfig` as ``config``
runs that baseline on the same inputs instead (best-of-N with N = num_samples is the
matched-compute baseline of FK with the same number of particles).

Seeds: without a ``generator``, particle k of every prompt draws its noise from seed
``config.seed + k``, the seeds of ``align sample --seed`` (image k of every prompt), so FK at
lambda = 0 and best-of-N reproduce those images bitwise.  A ``generator`` is used as diffusers
pipelines use one: it draws the whole batch's noise.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from diffusers.utils import BaseOutput

from align.core.errors import AlignError
from align.steer.fk import IntermediateFn, fk_sample
from align.steer.fk_config import FKConfig
from align.steer.guidance import best_of_n, gradient_guidance
from align.steer.guidance_config import BestOfNConfig, GradientGuidanceConfig
from align.steer.particles import EvalCounts, ResamplingEvent, SteeringResult

from .base import SteeringPipelineBase, as_generator

SteeringConfig = FKConfig | BestOfNConfig | GradientGuidanceConfig


@dataclass
class FKSteeringPipelineOutput(BaseOutput):
    """Output of :class:`FKSteeringPipeline`.

    Attributes:
        images: every final particle, prompt-major (``num_prompts * num_particles``), in ``output_type``.
        best_images: the highest-reward particle of each prompt.
        rewards: final rewards [num_prompts, num_particles].
        log_weights: normalised FK log-weights [num_prompts, num_particles] (None for the baselines).
        ancestry: the resampling events (step, ancestors [P, K], resampled, ess, intermediate rewards).
        counts: model, decode and reward evaluations.
        relative_ess: ESS / num_particles before resampling at each event of ``ancestry``
            [len(ancestry), num_prompts] (None for the baselines).
        final_relative_ess: ESS / num_particles of the final weights [num_prompts], before any final
            resampling (None for the baselines); FK warns when it is below ``ess_warning``.
    """

    images: Any
    best_images: Any
    rewards: torch.Tensor
    log_weights: torch.Tensor | None
    ancestry: list[ResamplingEvent]
    counts: EvalCounts
    relative_ess: torch.Tensor | None = None
    final_relative_ess: torch.Tensor | None = None


def resolve_reward(reward) -> Callable:
    """A reward name or {name: weight} mapping -> rewards.Reward; a callable is used as it is."""
    if isinstance(reward, (str, Mapping)):
        from rewards import build_reward

        return build_reward(reward)
    if not callable(reward):
        raise AlignError(
            f"reward={reward!r} must be a reward name, a {{name: weight}} mapping, a rewards.Reward or a "
            "callable (images, prompts) -> scores"
        )
    return reward


def apply_overrides(config, overrides: dict[str, Any]):
    """``dataclasses.replace`` with an error naming unknown fields (validation reruns)."""
    if not overrides:
        return config
    fields = {f.name for f in dataclasses.fields(config)}
    unknown = sorted(set(overrides) - fields)
    if unknown:
        raise AlignError(
            f"unknown argument(s) {unknown} for {type(config).__name__}; accepted: {', '.join(sorted(fields))}"
        )
    return dataclasses.replace(config, **overrides)


class FKSteeringPipeline(SteeringPipelineBase):
    """Feynman-Kac steering (and its baselines) on any supported family; see the module docstring."""

    @torch.no_grad()
    def __call__(
        self,
        prompt: str | Sequence[str],
        reward,
        *,
        config: SteeringConfig | None = None,
        negative_prompt: str | Sequence[str] | None = None,
        num_inference_steps: int = 100,
        guidance_scale: float | None = None,
        sampler: str = "auto",
        eta: float = 1.0,
        height: int | None = None,
        width: int | None = None,
        generator: torch.Generator | None = None,
        output_type: str = "pil",
        max_sequence_length: int | None = None,
        intermediate_fn: IntermediateFn | None = None,
        step_callback: Callable[[int, torch.Tensor], None] | None = None,
        **config_fields: Any,
    ) -> FKSteeringPipelineOutput:
        """Steer generation of ``prompt`` (one or several) towards high ``reward``.

        Args:
            prompt: a prompt or a list of prompts; each gets its own group of particles.
            reward: a reward name (``rewards.build_reward``), ``{name: weight}``, a ``rewards.Reward`` or a
                callable ``(images [B, 3, H, W] in [0, 1], prompts) -> scores [B]``.
            config: FKConfig (default), or BestOfNConfig / GradientGuidanceConfig to run a baseline.
            num_inference_steps: sampler steps (FK's paper default: 100 with resampling in [20, 80]).
            guidance_scale: classifier-free guidance (FLUX: the distilled guidance); None: the family default.
            sampler: 'auto' (DDIM for UNet families, flow matching for SD3/FLUX), 'ddim', 'ddpm' or 'flow'.
            eta: sampler stochasticity (1.0: DDIM eta=1 as in the paper; for flow models the SDE step).
            generator: None: the config's ``seed`` (particle k of every prompt from seed + k, as
                ``align sample``); a generator: the whole batch's noise from it (diffusers' convention).
            output_type: 'pil', 'np', 'pt' (tensor in [0, 1]) or 'latent'.
            step_callback: ``step_callback(i, x0_hat)`` after each step with the latent x0-predictions of
                the current particles (for FK: after that step's resampling).
            config_fields: any field of the config, e.g. ``num_particles=8, lambda_=5.0``.
        """
        config = apply_overrides(config if config is not None else FKConfig(), config_fields)
        prompts = self._prompts(prompt)
        reward_fn = resolve_reward(reward)
        if isinstance(config, GradientGuidanceConfig) or (isinstance(config, FKConfig) and config.proposal == "gradient"):
            from rewards import Reward, require_differentiable

            if isinstance(reward_fn, Reward):
                require_differentiable(reward_fn, "gradient guidance")
        model, scale, cfg, height, width = self._prepare(guidance_scale, height, width)
        pc = self._encode(model, prompts, negative_prompt, cfg, height, width, max_sequence_length)
        schedule = model.schedule(num_inference_steps, sampler=sampler, eta=eta, height=height, width=width)
        inputs = dict(
            sample_shape=model.latent_shape(1, height, width)[1:], cond=pc.cond, uncond=pc.uncond,
            guidance_scale=scale if cfg else 1.0, prompts=prompts, decode_fn=model.decode,
            generator=as_generator(generator), device=model.device, dtype=torch.float32,
            model_dtype=model.dtype, progress=self._show_progress,
        )
        if isinstance(config, FKConfig):
            result = fk_sample(
                model.denoiser, schedule, reward_fn, config, intermediate_fn=intermediate_fn,
                step_callback=step_callback, **inputs,
            )
        elif isinstance(config, BestOfNConfig):
            result = best_of_n(model.denoiser, schedule, reward_fn, config, step_callback=step_callback, **inputs)
        elif isinstance(config, GradientGuidanceConfig):
            result = gradient_guidance(model.denoiser, schedule, reward_fn, config, step_callback=step_callback, **inputs)
        else:
            raise AlignError(
                f"config={type(config).__name__} is not supported; accepted: FKConfig, BestOfNConfig, GradientGuidanceConfig"
            )
        self.maybe_free_model_hooks()
        return self._output(result, output_type)

    def _output(self, result: SteeringResult, output_type: str) -> FKSteeringPipelineOutput:
        best = result.best_indices()
        return FKSteeringPipelineOutput(
            images=self._postprocess(result.images, result.samples, output_type),
            best_images=self._postprocess(result.images[best], result.samples[best], output_type),
            rewards=result.rewards,
            log_weights=result.log_weights,
            ancestry=result.ancestry,
            counts=result.counts,
            relative_ess=result.relative_ess,
            final_relative_ess=result.final_relative_ess,
        )
