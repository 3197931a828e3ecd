"""The denoising chain, written once: x_T -> x_0 with hooks where the methods differ.

Every sampler in the toolkit runs :func:`run_chain`: plain sampling (``align sample``), reward
backpropagation (the trainer), best-of-N, gradient guidance, RL guidance and FK steering.  Per
step ``i`` the chain

1. asks ``predict(i, x)`` for the model output (which steps carry gradients, checkpointing,
   classifier-free guidance, a second model: all inside ``predict``);
2. lets ``reweight(i, x, out)`` replace the particles and their outputs (FK: potentials,
   resampling and the gather of particles/outputs);
3. takes the Gaussian transition (:meth:`SamplingSchedule.transition`) and reports the
   x0-prediction to ``step_callback``; at ``stop_step`` it returns that x0-prediction (ReFL);
4. moves the step's mean by ``shift(i, step)`` (gradient guidance, FK's gradient-guided proposal);
5. adds ``std_i * z`` with ``z`` drawn from ``noise`` and passes (shift, z) to ``on_noise``
   (FK's importance-weight correction of a shifted proposal);
6. reports ``on_transition(i, x_i, step, x_{i+1})``: the step's input, its Gaussian transition and
   its output (policy-gradient rollouts record these to compute log-probabilities).

One noise layout: ``noise`` is one generator per sample row (:func:`seeded_generators`), so a
sample depends only on its own seed, never on the batch it is drawn in (one generator for the
whole batch is also accepted: diffusers' convention).  One state dtype: callers keep the state
in float32 (float64 on analytic toys); :func:`model_output` casts only the model's input to the
model dtype and its output back, because a half-precision state accumulates rounding at every
step (on a 28-step flow toy a bfloat16 state drifts about 20 times further from the float32
chain than a float32 state driving a bfloat16 model; tests/test_chain.py measures it).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import Tensor
from tqdm.auto import tqdm

from align.core.sampling import (
    Conditioning,
    DenoiserFn,
    Generators,
    SamplingSchedule,
    StepResult,
    guided_prediction,
    randn,
)

#: (step i, state x_i) -> model output at x_i, in the state's dtype
Predict = Callable[[int, Tensor], Tensor]
#: (step i, x_i, model output) -> (particles, outputs) that continue (FK resampling)
Reweight = Callable[[int, Tensor, Tensor], "tuple[Tensor, Tensor]"]
#: (step i, transition of step i) -> shift added to the step's mean, or None
MeanShift = Callable[[int, StepResult], "Tensor | None"]
#: (step i, mean shift, standard-normal noise z of the step) -> None (after x_{i+1} = mean + shift + std z)
NoiseHook = Callable[[int, Tensor, Tensor], None]
#: (step i, detached x0-prediction of step i) -> None
StepCallback = Callable[[int, Tensor], None]
#: (step i, input x_i, transition of step i, output x_{i+1}) -> None
TransitionHook = Callable[[int, Tensor, StepResult, Tensor], None]


def seeded_generators(seeds: Sequence[int], device: str | torch.device = "cpu") -> list[torch.Generator]:
    """One torch.Generator per seed (on ``device``; CPU generators work for any model device)."""
    return [torch.Generator(device=device).manual_seed(int(s)) for s in seeds]


def model_output(
    denoiser: DenoiserFn,
    schedule: SamplingSchedule,
    i: int,
    x: Tensor,
    cond: Conditioning,
    uncond: Conditioning | None,
    guidance_scale: float,
    model_dtype: torch.dtype | None = None,
) -> Tensor:
    """The (CFG-guided) model output at step ``i``: input cast to ``model_dtype``, output to ``x``'s dtype."""
    t = schedule.model_timestep(i, x.shape[0], x.device)
    inp = x if model_dtype is None else x.to(model_dtype)
    return guided_prediction(denoiser, inp, t, cond, uncond, guidance_scale).to(x.dtype)


def run_chain(
    schedule: SamplingSchedule,
    predict: Predict,
    x_T: Tensor,
    noise: Generators,
    *,
    stop_step: int | None = None,
    reweight: Reweight | None = None,
    shift: MeanShift | None = None,
    on_noise: NoiseHook | None = None,
    step_callback: StepCallback | None = None,
    on_transition: TransitionHook | None = None,
    progress: bool = False,
    description: str = "sampling",
) -> Tensor:
    """Run the sampler from ``x_T``; see the module docstring for the order of the hooks.

    Args:
        schedule: the sampler's steps.
        predict: ``predict(i, x)`` -> model output at step ``i`` (same dtype as ``x``).
        x_T: the initial state (its dtype is the state's dtype throughout).
        noise: one generator per row of ``x_T`` (or one for the batch) for the step noise; a step
            without noise (std 0) draws nothing.
        stop_step: return the x0-prediction of this step instead of continuing (ReFL).
        reweight, shift, on_noise, step_callback, on_transition: the hooks (None: not used).

    Returns:
        x_0 (the last step's output), or the x0-prediction of ``stop_step``.
    """
    x = x_T
    last = schedule.num_steps - 1 if stop_step is None else stop_step
    for i in tqdm(range(last + 1), desc=description, disable=not progress, leave=False):
        out = predict(i, x)
        if reweight is not None:
            x, out = reweight(i, x, out)
        step = schedule.transition(i, x, out)
        if step_callback is not None:
            step_callback(i, step.x0_hat.detach())
        if i == stop_step:
            return step.x0_hat
        mean = step.mean
        delta = None if shift is None else shift(i, step)
        if delta is not None:
            mean = mean + delta
        std = schedule.noise_stds[i]
        x_in = x
        if std == 0.0:
            x = mean
        else:
            z = randn(mean.shape, noise, mean.device, mean.dtype)
            x = mean + std * z
            if delta is not None and on_noise is not None:
                on_noise(i, delta, z)
        if on_transition is not None:
            on_transition(i, x_in, step, x)
    return x
