"""RL guidance as a diffusers pipeline: blend the base model and its LoRA-aligned self with one knob.

>>> from pipelines import RLGuidancePipeline
>>> pipe = RLGuidancePipeline.from_pretrained("stable-diffusion-v1-5/stable-diffusion-v1-5")
>>> pipe.load_lora_weights("path/to/aligned_lora")      # the aligned model = base + this LoRA
>>> out = pipe("a cat", weight=2.0)                      # 0: base, 1: aligned, >1: extrapolate

``from_pipe(pipe)`` on a pipeline that already has the LoRA loaded works too.  Every
:class:`align.steer.rlg_config.RLGConfig` field can be passed as a keyword.  With a LoRA on the text
encoder(s) as well, the base side encodes prompts with those adapters off.

Seeds: without a ``generator``, sample k of every prompt draws its noise from seed
``config.seed + k``, the seeds of ``align sample --seed``, so ``weight=0`` reproduces the base
model's ``align sample`` images bitwise.  A ``generator`` draws the whole batch's noise (diffusers'
convention).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from diffusers.utils import BaseOutput

from align.core.errors import AlignError
from align.steer.particles import EvalCounts, RewardEvaluator
from align.steer.rlg import LoRAPair, rlg_sample
from align.steer.rlg_config import RLGConfig

from .base import SteeringPipelineBase, as_generator, text_adapters_disabled
from .fk_steering import apply_overrides, resolve_reward


@dataclass
class RLGuidancePipelineOutput(BaseOutput):
    """Output of :class:`RLGuidancePipeline`.

    Attributes:
        images: the samples, prompt-major (``num_prompts * num_samples``), in ``output_type``.
        rewards: rewards [num_prompts, num_samples] when a ``reward`` was given, else None.
        counts: model evaluations (rows through the network) and decodes.
    """

    images: Any
    rewards: torch.Tensor | None
    counts: EvalCounts


class RLGuidancePipeline(SteeringPipelineBase):
    """Reinforcement Learning Guidance on any supported family (the LoRA adapter is the aligned model)."""

    @torch.no_grad()
    def __call__(
        self,
        prompt: str | Sequence[str],
        *,
        config: RLGConfig | None = None,
        negative_prompt: str | Sequence[str] | None = None,
        num_inference_steps: int = 50,
        guidance_scale: float | None = None,
        sampler: str = "auto",
        eta: float | None = None,
        height: int | None = None,
        width: int | None = None,
        reward=None,
        generator: torch.Generator | None = None,
        output_type: str = "pil",
        max_sequence_length: int | None = None,
        step_callback: Callable[[int, torch.Tensor], None] | None = None,
        **config_fields: Any,
    ) -> RLGuidancePipelineOutput:
        """Sample with v = v_base + weight (v_aligned - v_base).

        Args:
            prompt: a prompt or a list of prompts.
            config: RLGConfig; its fields can also be passed as keywords (``weight=2.0``, ``num_samples=4``).
            guidance_scale: the base side's CFG (FLUX: distilled guidance); None: the family default.
                The aligned side uses ``aligned_guidance_scale`` (default: the same).
            eta: sampler stochasticity (None: deterministic DDIM / flow Euler).
            reward: optional reward (name, mapping, Reward or callable) to score the outputs.
            generator: None: the config's ``seed`` (sample k of every prompt from seed + k); a
                generator: the whole batch's noise from it (diffusers' convention).
            output_type: 'pil', 'np', 'pt' (tensor in [0, 1]) or 'latent'.
            step_callback: ``step_callback(i, x0_hat)`` after each step with the latent x0-predictions.
        """
        config = apply_overrides(config if config is not None else RLGConfig(), config_fields)
        prompts = self._prompts(prompt)
        model, scale, cfg, height, width = self._prepare(guidance_scale, height, width)
        pair = LoRAPair(model.denoiser, batched=config.batched)
        aligned_scale = config.aligned_guidance_scale
        if model.family == "flux" and aligned_scale is not None:
            raise AlignError(
                f"aligned_guidance_scale={aligned_scale!r} does not apply to FLUX, which has no classifier-free "
                "guidance (guidance_scale is its embedded guidance, shared by both sides)"
            )
        # the aligned side may use classifier-free guidance even when the base side does not
        need_uncond = cfg or (aligned_scale is not None and aligned_scale != 1.0)
        with text_adapters_disabled(model.pipe) as text_lora:
            base = self._encode(model, prompts, negative_prompt, need_uncond, height, width, max_sequence_length)
        aligned = None
        if text_lora:
            aligned = self._encode(model, prompts, negative_prompt, need_uncond, height, width, max_sequence_length)
        schedule = model.schedule(num_inference_steps, sampler=sampler, eta=eta, height=height, width=width)
        result = rlg_sample(
            pair, schedule, config, sample_shape=model.latent_shape(1, height, width)[1:], cond=base.cond,
            uncond=base.uncond, guidance_scale=scale if cfg else 1.0,
            cond_aligned=None if aligned is None else aligned.cond,
            uncond_aligned=None if aligned is None else aligned.uncond,
            generator=as_generator(generator), progress=self._show_progress, step_callback=step_callback,
            device=model.device,
            dtype=torch.float32, model_dtype=model.dtype,
        )
        images = model.decode(result.samples, chunk_size=config.model_chunk_size)
        rewards = None
        if reward is not None:
            per_sample = [p for p in prompts for _ in range(config.num_samples)]
            evaluator = RewardEvaluator(resolve_reward(reward), None, per_sample, result.counts, config.model_chunk_size)
            rewards = evaluator.scores(images).float().view(len(prompts), -1)
        result.counts.decode_rows += images.shape[0]
        self.maybe_free_model_hooks()
        return RLGuidancePipelineOutput(
            images=self._postprocess(images, result.samples, output_type), rewards=rewards, counts=result.counts
        )
