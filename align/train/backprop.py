"""Sampling with gradients: the chain that reward backpropagation differentiates through.

:func:`sample_with_grad` runs the sampler on any denoiser callable.  Steps before the plan's
first grad step run under ``torch.no_grad``; grad-enabled steps wrap each (CFG-batched) model
call in non-reentrant activation checkpointing, so only the step's input latent is kept and
memory stays nearly flat as the number of grad steps grows.  The scheduler's update itself is
cheap affine arithmetic and is kept in the graph, so gradients also flow along the chain.

Options from the literature:

* ``detach_denoiser_input`` (DRTune): the latent fed to the model is detached; gradients still
  flow through the scheduler update.
* ``reference_denoiser``: the frozen model (e.g. LoRA disabled) evaluated on the grad-enabled
  steps; the mean squared difference of predictions is returned as a KL-style regulariser
  (DRaFT+).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import Tensor
from torch.utils.checkpoint import checkpoint

from align.core.sampling import (
    Conditioning,
    DenoiserFn,
    Generators,
    SamplingSchedule,
    guided_prediction,
    randn,
)
from align.train.truncation import TruncationPlan


@dataclass
class BackpropSample:
    """Result of a grad-enabled sampling run.

    Attributes:
        latents: the clean-latent estimates to decode and score, [B * (1 + copies), ...]: the
            chain's output (or ReFL's x0-prediction) first, then DRaFT-LV's re-noised copies.
        regularizer: mean squared difference to the reference predictions (0 without one).
        model_calls: denoiser forward calls, counting a CFG-batched call once.
        grad_calls: how many of those ran with gradients.
        x0_predictions: per-step x0-predictions (detached), when requested.
    """

    latents: Tensor
    regularizer: Tensor
    model_calls: int
    grad_calls: int
    x0_predictions: list[Tensor] = field(default_factory=list)

    @property
    def copies(self) -> int:
        return self.latents.shape[0]


def _predict(
    denoiser: DenoiserFn, x: Tensor, t: Tensor, cond: Conditioning, uncond: Conditioning | None, scale: float
) -> Tensor:
    return guided_prediction(denoiser, x, t, cond, uncond, scale)


def sample_with_grad(
    denoiser: DenoiserFn,
    schedule: SamplingSchedule,
    x_T: Tensor,
    cond: Conditioning,
    uncond: Conditioning | None,
    guidance_scale: float,
    plan: TruncationPlan,
    *,
    generator: Generators = None,
    gradient_checkpointing: bool = True,
    detach_denoiser_input: bool = False,
    reference_denoiser: DenoiserFn | None = None,
    keep_x0_predictions: bool = False,
    step_callback: Callable[[int, Tensor], None] | None = None,
) -> BackpropSample:
    """Sample from ``x_T`` with gradients on the plan's steps; see the module docstring.

    ``generator`` (one, or one per batch row) supplies the sampler noise and DRaFT-LV's
    re-noising noise, so a run is reproducible regardless of which steps carry gradients.
    """
    if plan.num_steps != schedule.num_steps:
        raise ValueError(f"plan has {plan.num_steps} steps but the schedule has {schedule.num_steps}")
    batch = x_T.shape[0]
    x = x_T
    regularizer = x_T.new_zeros((), dtype=torch.float32)
    model_calls = grad_calls = 0
    x0_list: list[Tensor] = []

    def grad_call(i: int, x_in: Tensor) -> Tensor:
        t = schedule.model_timestep(i, x_in.shape[0], x_in.device)
        c = cond if x_in.shape[0] == batch else {k: v.repeat(x_in.shape[0] // batch, *[1] * (v.ndim - 1)) for k, v in cond.items()}
        u = None
        if uncond is not None:
            u = uncond if x_in.shape[0] == batch else {
                k: v.repeat(x_in.shape[0] // batch, *[1] * (v.ndim - 1)) for k, v in uncond.items()
            }
        model_in = x_in.detach() if detach_denoiser_input else x_in
        if gradient_checkpointing:
            out = checkpoint(_predict, denoiser, model_in, t, c, u, guidance_scale, use_reentrant=False)
        else:
            out = _predict(denoiser, model_in, t, c, u, guidance_scale)
        if reference_denoiser is not None:
            nonlocal regularizer
            with torch.no_grad():
                ref = _predict(reference_denoiser, model_in.detach(), t, c, u, guidance_scale)
            regularizer = regularizer + ((out.float() - ref.float()) ** 2).mean()
        return out

    for i in range(plan.last_step + 1):
        t = schedule.model_timestep(i, batch, x.device)
        if i < plan.first_grad_step:
            with torch.no_grad():
                out = _predict(denoiser, x, t, cond, uncond, guidance_scale)
                result = schedule.step(i, x, out, generator=generator)
        else:
            out = grad_call(i, x)
            grad_calls += 1
            result = schedule.step(i, x, out, generator=generator)
        model_calls += 1
        if keep_x0_predictions:
            x0_list.append(result.x0_hat.detach())
        if step_callback is not None:
            step_callback(i, result.x0_hat.detach())
        if plan.stop_step is not None and i == plan.stop_step:
            # ReFL scores the x0-prediction of its single grad-enabled step
            x = result.x0_hat
            break
        x = result.prev_sample

    outputs = [x]
    if plan.renoised_copies:
        # DRaFT-LV: re-noise the detached final sample to the last step's level n times and
        # give each copy one grad-enabled call; their x0-predictions join the scored batch.
        last = plan.num_steps - 1
        clean = x.detach()
        copies = plan.renoised_copies
        noise = torch.cat([randn(clean.shape, generator, clean.device, clean.dtype) for _ in range(copies)])
        noisy = schedule.add_noise(clean.repeat(copies, *[1] * (clean.ndim - 1)), noise, last)
        out = grad_call(last, noisy)
        model_calls += 1
        grad_calls += 1
        x0_hat, _ = schedule.predict(last, noisy, out)
        outputs.append(x0_hat)
    latents = torch.cat(outputs) if len(outputs) > 1 else outputs[0]
    if grad_calls:
        regularizer = regularizer / grad_calls
    return BackpropSample(latents, regularizer, model_calls, grad_calls, x0_list)
