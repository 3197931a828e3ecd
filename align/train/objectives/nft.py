"""The DiffusionNFT objective: rollouts of the old policy, then regression on the forward process.

Each rollout is collected by the policy-gradient objective's machinery (the same sample layout,
seeds, reward worker, gathered group advantages; :class:`PolicyGradientObjective`), with the
*old* policy's weights swapped in and the method's sampler, deterministic by default (no
transition is recorded: only each chain's clean output x0 is kept).  The advantages (reward
minus the group mean, over the rollout-wide std by default) become optimality probabilities r
(:func:`align.train.nft.optimality_probability`).

The rollout then serves ``optimizer_steps_per_rollout`` optimiser steps; each takes its share of
the rollout in micro-batches of ``batch_size`` samples, every sample trained at ``trained_steps``
noise levels of the rollout's schedule (drawn per sample, one level per micro-step): x_t = alpha x0
+ sigma eps with fresh seeded noise, the trained, old and (``kl_weight`` > 0) reference outputs at
x_t, and :func:`align.train.nft.nft_loss`.  Memory is one model call's forward and backward.

Weights.  The old policy is a copy of the trainable parameters only (LoRA: the adapter weights;
full fine-tuning: a second copy of the denoiser's weights, sharded like them under FSDP: each process
keeps its shard), swapped in for its forward passes under no_grad.  It starts equal to the trained
weights and follows them once per rollout, before the next rollout is sampled: old <- d old + (1 - d) theta with d = ``old_decay(step)`` at the
optimiser step reached.  The reference is the model with its LoRA disabled (no copy; the trainer
requires LoRA when ``kl_weight`` > 0, since a frozen copy of a fully fine-tuned denoiser would cost
a third copy of its weights).  The old weights (gathered whole onto the main process under FSDP,
and split back into shards on resume, as the EMA is) and the rollout in use are checkpointed, so a
resumed run continues exactly.  Invalid samples (a reward fault in drop mode) get advantage 0,
so r = 1/2: they pull the model toward the old policy only.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from align.core.errors import ConfigError
from align.core.lora import adapters_disabled
from align.core.sampling import randn
from align.train.nft import nft_loss, optimality_probability, soft_update_
from align.train.objectives.policy_gradient import PolicyGradientObjective, RolloutBuffer
from align.train.rollout import step_outputs

#: seed parts of the forward process's draws (after the rollout's own, see objectives/policy_gradient.py)
_LEVELS, _FORWARD_NOISE = 101, 102


class DiffusionNFTObjective(PolicyGradientObjective):
    """DiffusionNFT on the trainer's loop; see the module docstring."""

    keeps_x0 = True

    def __init__(self, trainer):  # noqa: D107 - the sizes of a rollout, then the old policy's weights
        super(PolicyGradientObjective, self).__init__(trainer)
        t, m, cfg, model = trainer, trainer.method, trainer.config, trainer.model
        schedule = model.schedule(m.num_steps, sampler=m.sampler, eta=m.eta, height=t.height, width=t.width)
        per_pass = cfg.batch_size * t.num_processes
        if m.rollout_size % (per_pass * m.optimizer_steps_per_rollout):
            raise ConfigError(
                f"{m.name}: a rollout of {m.rollout_size} samples (group_size x rollout_prompts) does not split "
                f"into {m.optimizer_steps_per_rollout} optimiser step(s) of micro-batches of batch_size x processes "
                f"= {cfg.batch_size} x {t.num_processes}; choose sizes whose product divides {m.rollout_size}"
            )
        if cfg.gradient_accumulation_steps != 1:
            raise ConfigError(
                f"gradient_accumulation_steps={cfg.gradient_accumulation_steps} does not apply to {m.name}: an "
                "optimiser step takes its share of the rollout (rollout size / optimizer_steps_per_rollout) in "
                "micro-batches of batch_size; accepted: 1"
            )
        micro_batches = m.rollout_size // (per_pass * m.optimizer_steps_per_rollout)
        self._init_clean_rollouts(schedule, m.rollout_size, m.group_size, m.optimizer_steps_per_rollout, micro_batches)
        self.trained_steps = m.trained_steps
        self._refuse_sharded_copy("the old policy")
        # the old policy: a copy of the trainable parameters (of this process's shards under FSDP), and the last
        # rollout it was brought up to date for
        self.old = [p.detach().clone() for p in t.params]
        self.old_rollout = 0

    def describe(self) -> str:
        m = self.method
        return (
            f"{m.name}: rollouts of {self.rollout_size} samples ({self.rollout_size // self.group_size} prompts x "
            f"{self.group_size}) with the old policy, {m.num_steps} {self.schedule.kind} steps; each sample trained "
            f"at {self.trained_steps} noise level(s); {self.steps_per_rollout} optimiser step(s) per rollout of "
            f"{self.micro_batches} micro-batch(es) x {self.trained_steps} level(s)"
        )

    def micro_steps(self, step: int) -> int:
        return self.micro_batches * self.trained_steps

    # ------------------------------------------------------------------ the old policy
    def _old_weights(self):
        return self.trainer.swapped(self.old)

    def _update_old_policy(self, rollout: int) -> float:
        """Soft-update the old policy once per finished rollout up to ``rollout`` (returns the last decay)."""
        decay = 0.0
        while self.old_rollout < rollout:
            self.old_rollout += 1
            decay = self.method.old_decay(self.old_rollout * self.steps_per_rollout)
            soft_update_(self.old, [p.detach() for p in self.trainer.params], decay)
        return decay

    def collect(self, rollout: int) -> RolloutBuffer:
        """Bring the old policy up to date, then sample and score the rollout with its weights."""
        decay = self._update_old_policy(rollout)
        with self._old_weights():
            buffer = super().collect(rollout)
        buffer.metrics["nft/old_decay"] = decay
        return buffer

    # ------------------------------------------------------------------ the training pass
    def level_order(self, rollout: int, sample: int) -> Tensor:
        """The rollout schedule's levels a sample trains at, in training order (the first ``trained_steps``)."""
        return torch.randperm(self.schedule.num_steps, generator=self._seed(rollout, _LEVELS, sample))

    def loss(self, step: int, micro: int) -> tuple[Tensor, dict[str, float]]:
        t, m, model = self.trainer, self.method, self.trainer.model
        rollout, j = divmod(step, self.steps_per_rollout)
        micro_batch, slot = divmod(micro, self.trained_steps)
        metrics: dict[str, float] = {}
        buf = self._rollout_buffer(rollout, metrics)
        if buf.failed:
            return torch.tensor(float("nan")), metrics
        rows = self._rows(rollout, 0, j, micro_batch)
        samples = [int(buf.sample_ids[r]) for r in rows]
        levels = [int(self.level_order(rollout, s)[slot]) for s in samples]
        schedule, device = self.schedule, model.device
        x0 = buf.x0[rows].to(device)
        eps = torch.cat([randn((1, *x0.shape[1:]), self._seed(rollout, _FORWARD_NOISE, s, slot), device)
                         for s in samples])
        alpha = torch.tensor([schedule.alphas[i] for i in levels], dtype=torch.float64, device=device)
        sigma = torch.tensor([schedule.sigmas[i] for i in levels], dtype=torch.float64, device=device)
        shape = (-1, *([1] * (x0.ndim - 1)))
        x_t = (alpha.view(shape) * x0.double() + sigma.view(shape) * eps.double()).float()
        r = optimality_probability(buf.advantages[rows].to(device), m.advantage_clip)
        pc = self._conditioning((rollout, j, micro_batch), [buf.prompts[i] for i in rows])

        def output() -> Tensor:
            return step_outputs(model.denoiser, schedule, levels, x_t, pc.cond, pc.uncond, t.guidance_scale,
                                model.dtype)

        with torch.no_grad(), t.accelerator.autocast():
            with self._old_weights():
                old = output()
            reference = None
            if m.kl_weight > 0:
                with adapters_disabled(model):
                    reference = output()
        with t.accelerator.autocast():
            trained = output()
        result = nft_loss(
            trained, old, x_t, x0, alpha, sigma, schedule.prediction_type, r, beta=m.beta,
            policy_scale=m.advantage_clip, reference_output=reference, kl_weight=m.kl_weight,
            adaptive_weighting=m.adaptive_weighting,
        )
        metrics.update({
            "nft/positive_error": float(result.positive.detach().mean()),
            "nft/negative_error": float(result.negative.detach().mean()),
            "nft/optimality_mean": float(r.mean()),
        })
        if m.kl_weight > 0:
            metrics["nft/regulariser"] = float(result.regulariser.detach().mean())
        return result.total.float(), metrics

    # ------------------------------------------------------------------ checkpoint state
    def weight_copies(self) -> dict[str, list[Tensor]]:
        """The old policy's weights: the trainer checkpoints them (gathered under FSDP) and restores them."""
        return {"old": self.old}

    def state_dict(self) -> tuple[dict[str, Tensor], dict[str, Any]]:
        tensors, state = super().state_dict()
        state["old_rollout"] = self.old_rollout
        return tensors, state

    def load_state_dict(self, tensors: dict[str, Tensor], state: dict[str, Any]) -> None:
        super().load_state_dict(tensors, state)
        if "old_rollout" in state:  # the old weights themselves are restored by the trainer (weight_copies)
            self.old_rollout = int(state["old_rollout"])
