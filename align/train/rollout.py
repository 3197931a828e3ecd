"""Rollouts for policy-gradient training: sampled chains with the Gaussian transitions they took.

:func:`sample_trajectory` runs the toolkit's one sampling chain (:func:`align.core.chain.run_chain`)
without gradients and records, through its ``on_transition`` hook, the input, output, mean and
per-dimension log-probability of every stochastic step.  :func:`transition_means` recomputes the
means of chosen steps with gradients for the training pass, one step per sample, with the chain's
own arithmetic (:meth:`SamplingSchedule.transition` on the rows of each step), so that with the
same weights, inputs and batch shape the recomputed log-probabilities equal the recorded ones
bit for bit (importance ratios of exactly 1 on-policy).

Both take any denoiser callable, so the analytic toy model runs them as well as a UNet.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from align.core.chain import Predict, run_chain
from align.core.sampling import (
    Conditioning,
    DenoiserFn,
    Generators,
    SamplingSchedule,
    StepResult,
    guided_prediction,
)
from align.train.policy_gradient import gaussian_log_density, per_dimension


@dataclass
class Trajectory:
    """A sampled chain and its stochastic transitions (detached).

    Attributes:
        x0: the chain's output [B, ...].
        steps: the stochastic steps, ascending (K of them).
        x_in: each stochastic step's input [B, K, ...].
        x_next: each stochastic step's output [B, K, ...].
        log_probs: per-dimension log-density of each transition, float64 [B, K].
        means: each transition's mean [B, K, ...] (kept on request: GRPO-Guard needs them).
    """

    x0: Tensor
    steps: tuple[int, ...]
    x_in: Tensor
    x_next: Tensor
    log_probs: Tensor
    means: Tensor | None = None


@torch.no_grad()
def sample_trajectory(
    schedule: SamplingSchedule,
    predict: Predict,
    x_T: Tensor,
    noise: Generators,
    *,
    keep_means: bool = False,
) -> Trajectory:
    """Sample from ``x_T`` and record every stochastic step (std > 0) of ``schedule``."""
    steps = schedule.stochastic_steps
    records: dict[int, tuple[Tensor, Tensor, Tensor, Tensor]] = {}

    def record(i: int, x_in: Tensor, step: StepResult, x_next: Tensor) -> None:
        if step.noise_std > 0:
            log_prob = per_dimension(gaussian_log_density(x_next, step.mean, step.noise_std), x_next)
            records[i] = (x_in, x_next, log_prob, step.mean if keep_means else None)

    x0 = run_chain(schedule, predict, x_T, noise, on_transition=record)
    if not steps:
        empty = x_T.new_zeros((x_T.shape[0], 0, *x_T.shape[1:]))
        return Trajectory(x0, (), empty, empty, torch.zeros(x_T.shape[0], 0, dtype=torch.float64), None)
    x_in, x_next, log_probs, means = zip(*(records[i] for i in steps))
    return Trajectory(
        x0, steps, torch.stack(x_in, 1), torch.stack(x_next, 1), torch.stack(log_probs, 1),
        torch.stack(means, 1) if keep_means else None,
    )


def row_timesteps(schedule: SamplingSchedule, steps: Sequence[int], device: torch.device | str) -> Tensor:
    """The denoiser's timestep for each row, row ``r`` at step ``steps[r]`` ([B])."""
    index = torch.as_tensor(list(steps), dtype=torch.long, device=schedule.timesteps.device)
    return schedule.timesteps[index].to(device)


def step_outputs(
    denoiser: DenoiserFn,
    schedule: SamplingSchedule,
    steps: Sequence[int],
    x: Tensor,
    cond: Conditioning,
    uncond: Conditioning | None,
    guidance_scale: float,
    model_dtype: torch.dtype | None = None,
) -> Tensor:
    """The (CFG-guided) model output for rows at different steps, in ``x``'s dtype (as the chain's ``model_output``)."""
    t = row_timesteps(schedule, steps, x.device)
    inp = x if model_dtype is None else x.to(model_dtype)
    return guided_prediction(denoiser, inp, t, cond, uncond, guidance_scale).to(x.dtype)


def transition_means(schedule: SamplingSchedule, steps: Sequence[int], x: Tensor, model_out: Tensor) -> Tensor:
    """The transition mean of each row (row ``r`` at step ``steps[r]``), differentiable in ``model_out``."""
    steps = [int(i) for i in steps]
    if len(set(steps)) == 1:
        return schedule.transition(steps[0], x, model_out).mean
    parts, order = [], []
    for i in sorted(set(steps)):
        rows = [r for r, s in enumerate(steps) if s == i]
        parts.append(schedule.transition(i, x[rows], model_out[rows]).mean)
        order += rows
    inverse = torch.empty(len(order), dtype=torch.long)
    inverse[torch.tensor(order)] = torch.arange(len(order))
    return torch.cat(parts)[inverse.to(x.device)]
