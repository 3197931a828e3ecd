"""Sampling with gradients: the chain that reward backpropagation differentiates through.

:func:`sample_with_grad` runs the toolkit's one sampling chain (:func:`align.core.chain.run_chain`)
on any denoiser callable, with a ``predict`` hook that decides which steps carry gradients.
Steps before the plan's first grad step run under ``torch.no_grad``; grad-enabled steps wrap each
(CFG-batched) model call in non-reentrant activation checkpointing, so only the step's input
latent is kept and memory stays nearly flat as the number of grad steps grows.  The scheduler's
update itself is cheap affine arithmetic and is kept in the graph, so gradients also flow along
the chain.  The state stays in ``x_T``'s dtype (float32 in the trainer); only the model's input
is cast to ``model_dtype``.

Options from the literature:

* ``detach_denoiser_input`` (DRTune): the latent fed to the model is detached; gradients still
  flow through the scheduler update.
* ``reference_denoiser``: the frozen model (e.g. LoRA disabled) evaluated on the grad-enabled
  steps; the mean squared difference of predictions is returned as a KL-style regulariser
  (DRaFT+).
* ``plan.stop_step`` (ReFL): the chain stops at that step and returns its x0-prediction.
* ``plan.renoised_copies`` (DRaFT-LV): the final sample is re-noised to the last step's level
  that many times and each copy gets one grad-enabled call.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import Tensor
from torch.utils.checkpoint import checkpoint

from align.core.chain import model_output, run_chain
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


class _GradientSteps:
    """The chain's ``predict`` for reward backprop: which steps carry gradients, and how.

    Steps before ``plan.first_grad_step`` run under ``torch.no_grad``; later ones run with
    gradients (checkpointed, DRTune's detached input, the reference model's regulariser).
    """

    def __init__(
        self,
        denoiser: DenoiserFn,
        schedule: SamplingSchedule,
        cond: Conditioning,
        uncond: Conditioning | None,
        guidance_scale: float,
        plan: TruncationPlan,
        *,
        gradient_checkpointing: bool,
        detach_denoiser_input: bool,
        reference_denoiser: DenoiserFn | None,
        model_dtype: torch.dtype | None,
        batch_size: int,
    ):
        self.denoiser, self.schedule, self.plan = denoiser, schedule, plan
        self.cond, self.uncond, self.guidance_scale = cond, uncond, guidance_scale
        self.gradient_checkpointing = gradient_checkpointing
        self.detach_denoiser_input = detach_denoiser_input
        self.reference_denoiser = reference_denoiser
        self.model_dtype = model_dtype
        self.batch_size = batch_size
        self.model_calls = self.grad_calls = 0
        self.regularizer: Tensor | None = None

    def __call__(self, i: int, x: Tensor) -> Tensor:
        if i < self.plan.first_grad_step:
            self.model_calls += 1
            with torch.no_grad():
                return model_output(self.denoiser, self.schedule, i, x, self.cond, self.uncond, self.guidance_scale,
                                    self.model_dtype)
        return self.grad_call(i, x)

    def grad_call(self, i: int, x: Tensor) -> Tensor:
        """A grad-enabled model call at step ``i``; ``x`` may hold several copies of the batch (DRaFT-LV)."""
        copies = x.shape[0] // self.batch_size
        cond = self.cond if copies == 1 else _repeat_batch(self.cond, copies)
        uncond = self.uncond if self.uncond is None or copies == 1 else _repeat_batch(self.uncond, copies)
        t = self.schedule.model_timestep(i, x.shape[0], x.device)
        model_in = x.detach() if self.detach_denoiser_input else x
        if self.model_dtype is not None:
            model_in = model_in.to(self.model_dtype)
        args = (self.denoiser, model_in, t, cond, uncond, self.guidance_scale)
        if self.gradient_checkpointing:
            out = checkpoint(guided_prediction, *args, use_reentrant=False)
        else:
            out = guided_prediction(*args)
        if self.reference_denoiser is not None:
            with torch.no_grad():
                ref = guided_prediction(self.reference_denoiser, model_in.detach(), *args[2:])
            term = ((out.float() - ref.float()) ** 2).mean()
            self.regularizer = term if self.regularizer is None else self.regularizer + term
        self.model_calls += 1
        self.grad_calls += 1
        return out.to(x.dtype)


def _repeat_batch(cond: Conditioning, copies: int) -> dict[str, Tensor]:
    """The conditioning of ``copies`` stacked copies of the batch ([c; c; ...])."""
    return {k: v.repeat(copies, *[1] * (v.ndim - 1)) for k, v in cond.items()}


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
    model_dtype: torch.dtype | None = None,
) -> BackpropSample:
    """Sample from ``x_T`` with gradients on the plan's steps; see the module docstring.

    ``generator`` (one, or one per batch row) supplies the sampler noise and DRaFT-LV's
    re-noising noise, so a run is reproducible regardless of which steps carry gradients.
    The state stays in ``x_T``'s dtype (float32 in the trainer); ``model_dtype`` is the dtype the
    denoiser's input is cast to (None: not cast).
    """
    if plan.num_steps != schedule.num_steps:
        raise ValueError(f"plan has {plan.num_steps} steps but the schedule has {schedule.num_steps}")
    steps = _GradientSteps(
        denoiser, schedule, cond, uncond, guidance_scale, plan, gradient_checkpointing=gradient_checkpointing,
        detach_denoiser_input=detach_denoiser_input, reference_denoiser=reference_denoiser, model_dtype=model_dtype,
        batch_size=x_T.shape[0],
    )
    x0_list: list[Tensor] = []

    def on_step(i: int, x0_hat: Tensor) -> None:
        if keep_x0_predictions:
            x0_list.append(x0_hat)
        if step_callback is not None:
            step_callback(i, x0_hat)

    x = run_chain(schedule, steps, x_T, generator, stop_step=plan.stop_step, step_callback=on_step)
    outputs = [x]
    if plan.renoised_copies:
        # DRaFT-LV: re-noise the detached final sample to the last step's level n times and
        # give each copy one grad-enabled call; their x0-predictions join the scored batch.
        last = plan.num_steps - 1
        clean = x.detach()
        copies = plan.renoised_copies
        noise = torch.cat([randn(clean.shape, generator, clean.device, clean.dtype) for _ in range(copies)])
        noisy = schedule.add_noise(clean.repeat(copies, *[1] * (clean.ndim - 1)), noise, last)
        x0_hat, _ = schedule.predict(last, noisy, steps.grad_call(last, noisy))
        outputs.append(x0_hat)
    latents = torch.cat(outputs) if len(outputs) > 1 else outputs[0]
    regularizer = x_T.new_zeros((), dtype=torch.float32)
    if steps.regularizer is not None:
        regularizer = steps.regularizer / steps.grad_calls
    return BackpropSample(latents, regularizer, steps.model_calls, steps.grad_calls, x0_list)
