"""The reward-backpropagation objective: sample with gradients, decode, score, shaped reward loss.

Each micro-step samples ``batch_size`` images with gradients on the method's truncation window
(:func:`align.train.backprop.sample_with_grad`), decodes them (checkpointed VAE), scores them with
a differentiable reward and returns the mean shaped loss (plus the optional KL-style regulariser).
Sample j of optimiser step ``step`` (j counting over micro-steps, then processes, then the batch)
always gets the same prompt and noise, so a run resumed from a checkpoint, or split over
processes, draws exactly what an uninterrupted single-process run draws.
"""

from __future__ import annotations

import torch
from torch import Tensor

from align.core.lora import adapters_disabled
from align.train.objectives.base import Objective
from align.train.seeds import sample_seed


class BackpropObjective(Objective):
    """DRaFT, DRaFT-LV, AlignProp, ReFL: the reward's gradient through the sampling chain."""

    def __init__(self, trainer):
        super().__init__(trainer)
        from rewards import require_differentiable

        require_differentiable(trainer.reward, trainer.config.method)
        m = trainer.method
        self.schedule = trainer.model.schedule(
            m.num_steps, sampler=m.sampler, eta=m.eta, height=trainer.height, width=trainer.width
        )
        self.policy = m.truncation()

    def sample_batch(self, step: int, micro: int) -> tuple[list[str], list[torch.Generator]]:
        """Prompts and per-sample generators of this process's share of the global batch."""
        t = self.trainer
        cfg = t.config
        prompts, gens = [], []
        per_micro = t.num_processes * cfg.batch_size
        for b in range(cfg.batch_size):
            j = micro * per_micro + t.rank * cfg.batch_size + b
            g = torch.Generator().manual_seed(sample_seed(cfg.seed, step, j))
            prompts.append(t.prompts[int(torch.randint(len(t.prompts), (), generator=g))])
            gens.append(g)
        return prompts, gens

    def loss(self, step: int, micro: int) -> tuple[Tensor, dict[str, float]]:
        """Sample one micro-batch with gradients and return (loss, metrics)."""
        from align.train.backprop import sample_with_grad

        t = self.trainer
        cfg, method, model = t.config, t.method, t.model
        prompts, gens = self.sample_batch(step, micro)
        # one truncation plan per micro-batch, the same on every process
        plan_seed = sample_seed(cfg.seed, step, 2**31 + micro)
        plan = self.policy.plan(self.schedule.num_steps, torch.Generator().manual_seed(plan_seed))
        pc = t.encode(prompts)
        # the sampling state stays float32; only the denoiser's input is cast to the model dtype
        x_T = self.schedule.initial_noise(model.latent_shape(len(prompts), t.height, t.width), gens, model.device)
        reference = None
        if method.kl_weight > 0:
            def reference(x, t_, c):
                with adapters_disabled(model):
                    return model.denoiser(x, t_, c)
        with t.accelerator.autocast():
            result = sample_with_grad(
                model.denoiser, self.schedule, x_T, pc.cond, pc.uncond, t.guidance_scale, plan,
                generator=gens, gradient_checkpointing=cfg.gradient_checkpointing,
                detach_denoiser_input=method.detach_denoiser_input, reference_denoiser=reference,
                model_dtype=model.dtype,
            )
            images = model.decode(result.latents, gradient_checkpointing=cfg.gradient_checkpointing)
        copies = result.latents.shape[0] // len(prompts)
        t.reward.train()  # running reward normalisation updates its statistics in train mode only
        scored = t.reward.score(images.float(), list(prompts) * copies)
        # A reward's bug (RewardCrash) has propagated by now and stops the run; only its transient
        # faults reach this point, as invalid samples.
        valid = scored.valid
        dropped_fraction = float((~valid).sum()) / valid.numel()
        if t.drop_invalid_samples and dropped_fraction > cfg.max_dropped_fraction:
            t.dropped_over_limit = dropped_fraction  # train() stops the run after this (skipped) step
        per_sample = method.reward_loss(scored.scores)
        if bool(valid.any()) and t.dropped_over_limit is None and (t.drop_invalid_samples or bool(valid.all())):
            loss = per_sample[valid].mean()
        else:
            loss = per_sample.new_tensor(float("nan"))  # the step is skipped and counted
        if method.kl_weight > 0:
            loss = loss + method.kl_weight * result.regularizer
        metrics = {"grad_steps": plan.grad_steps, **reward_metrics(scored, valid)}
        if method.kl_weight > 0:
            metrics["kl_regularizer"] = float(result.regularizer.detach())
        return loss, metrics


def reward_metrics(scored, valid: Tensor) -> dict[str, float]:
    """Mean and std of the valid rewards and of each component in ``scored.info``, and what was dropped."""
    rewards = scored.scores.detach()[valid]
    metrics = {
        "reward_mean": float(rewards.mean()) if rewards.numel() else float("nan"),
        "reward_std": float(rewards.std()) if rewards.numel() > 1 else 0.0,
        "invalid_samples": int((~valid).sum()),
        "reward/dropped_fraction": float((~valid).sum()) / valid.numel(),
    }
    for key, values in scored.info.items():
        v = values.detach().float()[valid.to(values.device)]
        if v.numel():
            metrics[f"reward/{key}_mean"] = float(v.mean())
            metrics[f"reward/{key}_std"] = float(v.std()) if v.numel() > 1 else 0.0
    return metrics
