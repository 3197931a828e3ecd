"""The math of Diffusion-DPO (Wallace et al., "Diffusion Model Alignment Using Direct Preference Optimization"), as small pure functions.

A preference pair (x0_w preferred to x0_l, same prompt) is noised with the *same* timestep and the
*same* noise (:func:`noised_pairs`); the trained model and the frozen reference (the same network
with its LoRA disabled: no second copy in memory) each predict both, and their denoising errors
(per-sample mean squared error against the regression target of the model's parameterisation,
:func:`denoising_target`) enter

    L = -log sigmoid(-beta / 2 * ((e_model(w) - e_model(l)) - (e_ref(w) - e_ref(l))))

(:func:`dpo_loss`).  The loss falls when the trained model denoises the winner better, relative to
the reference, than the loser.  The logged "implicit accuracy" is the fraction of pairs whose
logit -beta / 2 (...) is positive.

Small beta: with x = (e_model(w) - e_model(l)) - (e_ref(w) - e_ref(l)), dL/dtheta =
sigmoid(beta x / 2) (beta / 2) dx/dtheta, and dx/dtheta = d e_model(w)/dtheta - d e_model(l)/dtheta
(the reference has no gradient).  So 4 / beta * dL/dtheta = 2 sigmoid(beta x / 2) dx/dtheta ->
dx/dtheta as beta -> 0 at fixed theta (relative error beta x / 4 + O(beta^3)); where the model equals
the reference (x = 0) it is exact for every beta.  DPO starts as "lower the winner's denoising loss,
raise the loser's", with weight beta / 4.

beta is the strength of the implicit KL to the reference, on the scale of the per-element errors,
which differs between families: :data:`DPO_BETA`.  The "-beta / 2" form is the original's
(SalesforceAIResearch/DiffusionDPO ``train.py``); diffusers' SD LoRA script writes
logsigmoid(beta' (e_ref - e_model)) with beta' = beta / 2 (its default 2500 is the original 5000).

Timesteps: the original draws t uniformly from the 1000 training steps (UNet models); Flow-GRPO's
SD3 DPO (``scripts/train_sd3_dpo.py``) indexes the flow scheduler's training sigmas with a
logit-normal(0, 1) draw (:func:`sample_training_levels`).  ``noisiest`` narrows the draw to the noisiest
levels: with a few-step deterministic sampler an image's layout and colours are fixed there, and on the
built-in model uniform timesteps made the held-out rise of a brightness preference depend on the run
(0.6x-4.9x the seed spread online) where the noisiest 30 % gave 4.8x-14.9x (tests/test_dpo_training.py).

SDXL's added conditions carry each image's original size and crop (:func:`sdxl_time_ids`), recorded by
the data preparation (:mod:`align.train.preference_data`).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from align.core.errors import AlignError, check_choice, check_range
from align.core.sampling import PREDICTION_TYPES

#: beta per model family (the -beta/2 form).  sd, sdxl: the original launchers (5000).  sd3: Flow-GRPO's SD3.5-M
#: DPO config (100; flow-velocity errors).  flux: no published config; 2000 is what Flow-GRPO's author advised
#: after a FLUX LoRA run at 500 spiked (yifan123/flow_grpo issue #47), unverified.
DPO_BETA: dict[str, float] = {"sd": 5000.0, "sdxl": 5000.0, "sd3": 100.0, "flux": 2000.0}
#: how training timesteps are drawn: uniform over the training steps, or logit-normal(0, 1) (SD3 training)
TIMESTEP_WEIGHTINGS: tuple[str, ...] = ("uniform", "logit_normal")


def dpo_beta(family: str) -> float:
    """The default beta of a model family ("sd", "sdxl", "sd3", "flux")."""
    check_choice("family", family, DPO_BETA)
    return DPO_BETA[family]


def _rows(level: float | Tensor, like: Tensor) -> float | Tensor:
    if isinstance(level, Tensor) and level.ndim > 0:
        return level.to(like).reshape(-1, *([1] * (like.ndim - 1)))
    return float(level)


def denoising_target(
    x0: Tensor, noise: Tensor, alpha: float | Tensor, sigma: float | Tensor, prediction_type: str
) -> Tensor:
    """What a model of ``prediction_type`` regresses onto at x_t = alpha x0 + sigma noise.

    epsilon: noise; v_prediction: alpha noise - sigma x0; flow: noise - x0; sample: x0 (the inverse of
    :func:`align.core.sampling.split_prediction`).  ``alpha``, ``sigma``: numbers or per-sample [B].
    """
    a, s = _rows(alpha, x0), _rows(sigma, x0)
    if prediction_type == "epsilon":
        return noise
    if prediction_type == "v_prediction":
        return a * noise - s * x0
    if prediction_type == "flow":
        return noise - x0
    if prediction_type == "sample":
        return x0
    raise AlignError(f"prediction_type={prediction_type!r} is not supported; accepted: {PREDICTION_TYPES}")


def noised_pairs(
    x0_winners: Tensor, x0_losers: Tensor, noise: Tensor, alpha: float | Tensor, sigma: float | Tensor
) -> Tensor:
    """[winners; losers] noised with the same noise and the same level per pair: [2P, ...].

    ``noise`` [P, ...] and ``alpha``, ``sigma`` (numbers or [P]) are each used for both images of a pair.
    """
    if x0_winners.shape != x0_losers.shape or noise.shape != x0_winners.shape:
        raise AlignError(
            f"winners {tuple(x0_winners.shape)}, losers {tuple(x0_losers.shape)} and noise {tuple(noise.shape)} "
            "must have the same shape"
        )
    a, s = _rows(alpha, noise), _rows(sigma, noise)
    return torch.cat([a * x0_winners + s * noise, a * x0_losers + s * noise])


def denoising_errors(prediction: Tensor, target: Tensor) -> Tensor:
    """Per-sample mean over the non-batch dims of (prediction - target)^2, [B], in at least float32."""
    dtype = torch.promote_types(torch.promote_types(prediction.dtype, target.dtype), torch.float32)
    diff = prediction.to(dtype) - target.to(dtype)
    return diff.pow(2).mean(tuple(range(1, diff.ndim)))


@dataclass(frozen=True)
class DPOLoss:
    """The Diffusion-DPO loss of a batch of pairs and its parts ([P] each).

    Attributes:
        loss: -log sigmoid(logits) per pair (average it for the batch loss).
        logits: -beta / 2 ((model_winner - model_loser) - (reference_winner - reference_loser)).
        model_winner, model_loser, reference_winner, reference_loser: the four denoising errors.
    """

    loss: Tensor
    logits: Tensor
    model_winner: Tensor
    model_loser: Tensor
    reference_winner: Tensor
    reference_loser: Tensor

    @property
    def implicit_accuracy(self) -> float:
        """Fraction of pairs the model ranks right relative to the reference (logit > 0)."""
        return float((self.logits > 0).double().mean())


def dpo_loss_from_errors(
    model_winner: Tensor, model_loser: Tensor, reference_winner: Tensor, reference_loser: Tensor, beta: float
) -> DPOLoss:
    """The DPO loss from the four per-pair denoising errors (the reference's are detached)."""
    check_range("beta", beta, 0.0, None, low_inclusive=False)
    reference_winner, reference_loser = reference_winner.detach(), reference_loser.detach()
    logits = -0.5 * beta * ((model_winner - model_loser) - (reference_winner - reference_loser))
    loss = -torch.nn.functional.logsigmoid(logits)
    return DPOLoss(loss, logits, model_winner, model_loser, reference_winner, reference_loser)


def dpo_loss(model_prediction: Tensor, reference_prediction: Tensor, target: Tensor, beta: float) -> DPOLoss:
    """The DPO loss from the two predictions of a [winners; losers] batch (:func:`noised_pairs` order).

    ``reference_prediction`` is the frozen model's output on the same inputs (the integration runs the
    network with its LoRA disabled under no_grad); ``target`` is :func:`denoising_target` of the batch.
    """
    if model_prediction.shape[0] % 2 or model_prediction.shape != reference_prediction.shape:
        raise AlignError(
            f"model {tuple(model_prediction.shape)} and reference {tuple(reference_prediction.shape)} predictions "
            "must have the same shape with an even batch ([winners; losers])"
        )
    model_w, model_l = denoising_errors(model_prediction, target).chunk(2)
    ref_w, ref_l = denoising_errors(reference_prediction, target).chunk(2)
    return dpo_loss_from_errors(model_w, model_l, ref_w, ref_l, beta)


@dataclass(frozen=True)
class TrainingLevels:
    """Training noise levels: the timesteps the denoiser is given, and x_t = alpha x0 + sigma eps ([n] each)."""

    timesteps: Tensor
    alphas: Tensor
    sigmas: Tensor


def sample_training_levels(
    scheduler, n: int, generator: torch.Generator | None = None, weighting: str = "uniform", noisiest: float = 1.0
) -> TrainingLevels:
    """Draw ``n`` training levels from a diffusers scheduler's training schedule (float64 levels).

    VP schedulers (those with ``alphas_cumprod``: DDPM, DDIM, ...): timesteps in [0, num_train_timesteps), alpha = sqrt(alphas_cumprod[t]).
    Flow matching: the scheduler's training sigmas (as built from its config, before any
    ``set_timesteps``: shifted by ``shift`` unless the schedule is shifted per resolution), alpha =
    1 - sigma, timestep = sigma * num_train_timesteps.  ``weighting``: "uniform" over the training steps,
    or "logit_normal" (u = sigmoid(N(0, 1)) indexes them, as diffusers' SD3 / FLUX training scripts do).
    ``noisiest``: draw only among the noisiest round(noisiest x steps) training levels (at least one; 1: all of
    them, the original; the same draws as before for 1), with the same weighting over them.  A deterministic
    sampler with few steps fixes an image's global layout and colours at the noisy levels, so a preference
    about them is learned there (the built-in model: :mod:`align.builtin.shapes`).
    """
    check_range("n", n, 1, None, integer=True)
    check_choice("weighting", weighting, TIMESTEP_WEIGHTINGS)
    check_range("noisiest", noisiest, 0.0, 1.0, low_inclusive=False)
    steps = int(scheduler.config.num_train_timesteps)
    kept = max(1, round(noisiest * steps))
    if weighting == "uniform":
        rank = torch.randint(0, kept, (n,), generator=generator)
    else:
        u = torch.sigmoid(torch.randn(n, generator=generator, dtype=torch.float64))
        rank = (u * kept).long().clamp_max(kept - 1)
    name = type(scheduler).__name__
    if name == "FlowMatchEulerDiscreteScheduler":
        fresh = type(scheduler).from_config(scheduler.config)
        index = rank  # the training sigmas fall from 1: the noisiest come first
        sigmas = fresh.sigmas.double()[index]
        timesteps = fresh.timesteps[index]
        return TrainingLevels(timesteps, 1.0 - sigmas, sigmas)
    if hasattr(scheduler, "alphas_cumprod"):
        index = rank + (steps - kept)  # timesteps rise with the noise: the noisiest come last
        acp = scheduler.alphas_cumprod.double()[index]
        return TrainingLevels(index, acp.sqrt(), (1.0 - acp).sqrt())
    raise AlignError(
        f"scheduler {name} is not supported for training levels; accepted: a scheduler with alphas_cumprod "
        "(DDPM, DDIM, Euler, ...) or FlowMatchEulerDiscreteScheduler"
    )


def sdxl_time_ids(original_sizes: Tensor, crops_top_left: Tensor, target_size: tuple[int, int]) -> Tensor:
    """SDXL's added time ids per image: (original h, w, crop top, left, target h, w), [n, 6].

    ``original_sizes`` and ``crops_top_left`` are [n, 2] (height, width) and (top, left) in pixels, as
    :mod:`align.train.preference_data` records them; the order is diffusers' ``_get_add_time_ids``.
    """
    if original_sizes.shape != crops_top_left.shape or original_sizes.ndim != 2 or original_sizes.shape[1] != 2:
        raise AlignError(
            f"original_sizes {tuple(original_sizes.shape)} and crops_top_left {tuple(crops_top_left.shape)} must "
            "both be [n, 2]"
        )
    target = torch.tensor(target_size, dtype=original_sizes.dtype).expand(original_sizes.shape[0], 2)
    return torch.cat([original_sizes, crops_top_left, target], dim=1)
