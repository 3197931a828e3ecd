"""Differentiable sampler steps for Gaussian-path diffusion models.

Every supported sampler (DDIM with any eta, DDPM, flow-matching Euler and its stochastic
variant) is written in one form.  A noisy sample at step ``i`` is

    x_t = alpha_i * x0 + sigma_i * eps

(VP models: alpha = sqrt(alphas_cumprod), sigma = sqrt(1 - alphas_cumprod); flow-matching
models: alpha = 1 - sigma).  The model output is turned into predictions (x0_hat, eps_hat) and
one step is the affine map

    x_next = c_x0 * x0_hat + c_eps * eps_hat + c_xt * x_t + noise_std * z,   z ~ N(0, I)

with per-step coefficients precomputed from a diffusers scheduler.  Everything is plain torch
arithmetic, so gradients flow through it, and the Gaussian transition (mean, std) is exposed for
samplers that reweight particles.

The generalised DDIM step for a path (alpha, sigma) uses the posterior noise level

    c = eta * (sigma_s / sigma_t) * sqrt(sigma_t^2 - (alpha_t * sigma_s / alpha_s)^2)

which is DDIM's sigma_t(eta) for VP paths and, for flow matching, gives the exact
deterministic Euler step at eta = 0 and the ancestral (DDPM-like) step at eta = 1.

The flow reverse SDE with the ODE's marginals (Flow-GRPO, DanceGRPO) is one more way to fill the
rows (:func:`flow_sde_row`, :meth:`SamplingSchedule.flow_sde`), and rows are per step, so a
schedule with stochastic steps in a window and deterministic ones elsewhere (MixGRPO,
Flow-GRPO-Fast) is :meth:`SamplingSchedule.mixed`.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, replace
from typing import Literal

import torch
from torch import Tensor

from align.core.errors import AlignError, ConfigError, check_choice, check_range

PredictionType = Literal["epsilon", "v_prediction", "flow", "sample"]
SamplerKind = Literal["ddim", "ddpm", "flow"]

PREDICTION_TYPES: tuple[str, ...] = ("epsilon", "v_prediction", "flow", "sample")
#: diffusion coefficient g of the flow reverse SDE: Flow-GRPO's a*sqrt(sigma/(1-sigma)) or DanceGRPO's constant a
SDE_NOISE: tuple[str, ...] = ("flow_grpo", "constant")
SUPPORTED_SCHEDULERS: tuple[str, ...] = ("DDIMScheduler", "DDPMScheduler", "FlowMatchEulerDiscreteScheduler")

Conditioning = Mapping[str, Tensor]
DenoiserFn = Callable[[Tensor, Tensor, Conditioning], Tensor]


def split_prediction(
    model_output: Tensor, x_t: Tensor, alpha: float | Tensor, sigma: float | Tensor, prediction_type: str
) -> tuple[Tensor, Tensor]:
    """Convert a model output at level (alpha, sigma) into (x0_hat, eps_hat).

    ``v_prediction`` is the VP velocity alpha * eps - sigma * x0; ``flow`` is the
    flow-matching velocity eps - x0 (for x_t = alpha x0 + sigma eps with any alpha, sigma).
    """
    if prediction_type == "epsilon":
        eps = model_output
        x0 = (x_t - sigma * eps) / alpha
    elif prediction_type == "v_prediction":
        # x0 = alpha x_t - sigma v, eps = sigma x_t + alpha v (valid on VP paths, alpha^2 + sigma^2 = 1)
        x0 = alpha * x_t - sigma * model_output
        eps = sigma * x_t + alpha * model_output
    elif prediction_type == "flow":
        # x_t = alpha x0 + sigma (v + x0)  =>  x0 = (x_t - sigma v) / (alpha + sigma)
        x0 = (x_t - sigma * model_output) / (alpha + sigma)
        eps = model_output + x0
    elif prediction_type == "sample":
        x0 = model_output
        eps = (x_t - alpha * x0) / sigma
    else:
        raise AlignError(f"prediction_type={prediction_type!r} is not supported; accepted: {PREDICTION_TYPES}")
    return x0, eps


def posterior_noise_std(alpha_t: float, sigma_t: float, alpha_s: float, sigma_s: float, eta: float) -> float:
    """Noise std of the generalised DDIM step from level t to the less noisy level s."""
    if sigma_t <= 0.0 or eta == 0.0:
        return 0.0
    inner = sigma_t**2 - (alpha_t * sigma_s / alpha_s) ** 2
    return eta * (sigma_s / sigma_t) * math.sqrt(max(inner, 0.0))


def flow_sde_row(
    sigma: float, sigma_next: float, noise_level: float, noise: str = "flow_grpo", sigma_cap: float | None = None
) -> tuple[float, float, float, float]:
    """(c_x0, c_eps, c_xt, std) of one step of the flow reverse SDE with the ODE's marginals.

    The path is x_t = (1 - t) x0 + t eps with velocity v = eps - x0, and the reverse SDE with
    diffusion g has drift v - (g^2 / 2) * score, where score = -eps / t.  One Euler-Maruyama step
    from t = ``sigma`` to ``sigma_next`` (dt = sigma_next - sigma < 0) is

        mean = x_t + dt * (v + g^2 / (2 t) * eps_hat),   std = g * sqrt(-dt),

    i.e. c_x0 = -dt, c_eps = dt * (1 + g^2 / (2 t)), c_xt = 1.  ``noise`` chooses g:
    ``"flow_grpo"``: g = a * sqrt(t / (1 - t)) (Flow-GRPO; at t = 1 the denominator uses
    1 - ``sigma_cap``, the next step's level, as Flow-GRPO does with ``sigmas[1]``);
    ``"constant"``: g = a (DanceGRPO's eta).  a = ``noise_level`` > 0.
    """
    check_choice("sde_noise", noise, SDE_NOISE)
    if not noise_level > 0:
        raise ConfigError(f"noise_level={noise_level!r} must be > 0 (the SDE's noise scale a; a = 0 is the ODE)")
    if not 0.0 < sigma <= 1.0 or not 0.0 <= sigma_next < sigma:
        raise AlignError(f"a flow SDE step needs 1 >= sigma > sigma_next >= 0; got sigma={sigma}, sigma_next={sigma_next}")
    if noise == "constant":
        g = noise_level
    else:
        denominator = 1.0 - (sigma if sigma < 1.0 else (sigma_next if sigma_cap is None else sigma_cap))
        g = noise_level * math.sqrt(sigma / denominator)
    dt = sigma_next - sigma
    return -dt, dt * (1.0 + g * g / (2.0 * sigma)), 1.0, g * math.sqrt(-dt)


@dataclass(frozen=True)
class StepResult:
    """One sampler step: the next sample, its Gaussian transition and the predictions used."""

    prev_sample: Tensor
    mean: Tensor
    noise_std: float
    x0_hat: Tensor
    eps_hat: Tensor


Generators = torch.Generator | Sequence[torch.Generator] | None


def randn(shape: Sequence[int], generator: Generators, device=None, dtype=torch.float32) -> Tensor:
    """Standard normal noise of ``shape``.

    ``generator`` may be one generator for the whole batch or a sequence with one generator
    per batch row; per-row generators make every sample's noise independent of the batch it
    is drawn in (so a run split over processes draws the same noise as one process).
    Noise is drawn in float32 on the generator's device, then moved.
    """
    shape = tuple(shape)
    if isinstance(generator, Sequence):
        if len(generator) != shape[0]:
            raise AlignError(f"got {len(generator)} generators for a batch of {shape[0]}; pass one per row")
        rows = [torch.randn(shape[1:], generator=g, device=g.device, dtype=torch.float32) for g in generator]
        noise = torch.stack(rows).to(device=device)
    else:
        gen_device = generator.device if generator is not None else device
        noise = torch.randn(shape, generator=generator, device=gen_device, dtype=torch.float32).to(device)
    return noise.to(dtype=dtype)


@dataclass(frozen=True)
class SamplingSchedule:
    """Per-step levels and step coefficients of a sampler, built from a diffusers scheduler.

    Index ``i`` runs over sampling steps 0..T-1 from noisiest to cleanest.  ``alphas[i]`` and
    ``sigmas[i]`` are the level of the input x_t of step ``i``; ``next_alphas[i]``,
    ``next_sigmas[i]`` the level its output lands on (for DDIM these follow diffusers'
    ``t - num_train_timesteps // T`` rule, which is not always the next step's level).
    """

    kind: SamplerKind
    prediction_type: str
    timesteps: Tensor
    alphas: tuple[float, ...]
    sigmas: tuple[float, ...]
    next_alphas: tuple[float, ...]
    next_sigmas: tuple[float, ...]
    coef_x0: tuple[float, ...]
    coef_eps: tuple[float, ...]
    coef_xt: tuple[float, ...]
    noise_stds: tuple[float, ...]
    eta: float = 0.0
    clip_sample_range: float | None = None
    init_noise_sigma: float = 1.0

    def __len__(self) -> int:
        return len(self.alphas)

    @property
    def num_steps(self) -> int:
        return len(self.alphas)

    @property
    def is_stochastic(self) -> bool:
        """True when some step before the last adds noise (needed for particle resampling)."""
        return any(s > 0 for s in self.noise_stds[:-1])

    @property
    def stochastic_steps(self) -> tuple[int, ...]:
        """The steps that add noise (std > 0): those with a Gaussian transition density."""
        return tuple(i for i, s in enumerate(self.noise_stds) if s > 0)

    def flow_sde(self, noise_level: float, noise: str = "flow_grpo") -> SamplingSchedule:
        """This flow schedule's levels with every step replaced by the reverse-SDE step of
        :func:`flow_sde_row` (Flow-GRPO's sampler at ``noise="flow_grpo"``, DanceGRPO's at ``"constant"``).

        Its marginals are the ODE's (up to discretisation), so a flow model samples the same
        distribution, now with a Gaussian density per step (what policy-gradient methods need).
        """
        if self.kind != "flow":
            raise AlignError(f"flow_sde needs a flow-matching schedule; this one is {self.kind!r} (use DDIM eta > 0)")
        cap = self.next_sigmas[0]
        rows = [flow_sde_row(s, n, noise_level, noise, cap) for s, n in zip(self.sigmas, self.next_sigmas)]
        c_x0, c_eps, c_xt, stds = (tuple(col) for col in zip(*rows))
        return replace(self, coef_x0=c_x0, coef_eps=c_eps, coef_xt=c_xt, noise_stds=stds, eta=float(noise_level))

    def mixed(self, other: SamplingSchedule, steps: Iterable[int]) -> SamplingSchedule:
        """This schedule with the rows of ``other`` at ``steps`` (e.g. SDE steps in a window, ODE steps elsewhere).

        Both must share timesteps and levels (the same scheduler and number of steps).
        """
        if (self.num_steps != other.num_steps or self.sigmas != other.sigmas or self.alphas != other.alphas
                or self.next_sigmas != other.next_sigmas or not torch.equal(self.timesteps.cpu(), other.timesteps.cpu())):
            raise AlignError("mixed schedules need the same timesteps and levels (same scheduler and num_steps)")
        chosen = set(steps)
        bad = sorted(i for i in chosen if not 0 <= i < self.num_steps)
        if bad:
            raise AlignError(f"steps {bad} are outside 0..{self.num_steps - 1}")

        def pick(mine: tuple[float, ...], theirs: tuple[float, ...]) -> tuple[float, ...]:
            return tuple(theirs[i] if i in chosen else mine[i] for i in range(self.num_steps))

        return replace(
            self,
            coef_x0=pick(self.coef_x0, other.coef_x0),
            coef_eps=pick(self.coef_eps, other.coef_eps),
            coef_xt=pick(self.coef_xt, other.coef_xt),
            noise_stds=pick(self.noise_stds, other.noise_stds),
            eta=other.eta if chosen else self.eta,
        )

    def model_timestep(self, i: int, batch_size: int, device: torch.device | str) -> Tensor:
        """The timestep the denoiser expects at step ``i``, as a [B] tensor."""
        return self.timesteps[i].to(device).expand(batch_size)

    def predict(self, i: int, x_t: Tensor, model_output: Tensor) -> tuple[Tensor, Tensor]:
        """(x0_hat, eps_hat) at step ``i``, with diffusers' x0 clipping when configured."""
        x0, eps = split_prediction(model_output, x_t, self.alphas[i], self.sigmas[i], self.prediction_type)
        if self.clip_sample_range is not None:
            x0 = x0.clamp(-self.clip_sample_range, self.clip_sample_range)
        return x0, eps

    def transition(self, i: int, x_t: Tensor, model_output: Tensor) -> StepResult:
        """The Gaussian transition of step ``i`` without drawing noise (prev_sample = mean)."""
        x0, eps = self.predict(i, x_t, model_output)
        mean = self.coef_x0[i] * x0 + self.coef_eps[i] * eps
        if self.coef_xt[i] != 0.0:
            mean = mean + self.coef_xt[i] * x_t
        return StepResult(prev_sample=mean, mean=mean, noise_std=self.noise_stds[i], x0_hat=x0, eps_hat=eps)

    def step(
        self,
        i: int,
        x_t: Tensor,
        model_output: Tensor,
        *,
        generator: Generators = None,
        noise: Tensor | None = None,
    ) -> StepResult:
        """Take step ``i``: x_t -> x_next, drawing noise from ``generator`` (or using ``noise``).

        ``generator``: one generator, or one per batch row (see :func:`randn`).
        """
        out = self.transition(i, x_t, model_output)
        std = self.noise_stds[i]
        if std == 0.0:
            return out
        if noise is None:
            noise = randn(x_t.shape, generator, x_t.device, x_t.dtype)
        return StepResult(out.mean + std * noise, out.mean, std, out.x0_hat, out.eps_hat)

    def add_noise(self, x0: Tensor, noise: Tensor, i: int) -> Tensor:
        """Noise a clean sample to the input level of step ``i``."""
        return self.alphas[i] * x0 + self.sigmas[i] * noise

    def initial_noise(self, shape: Sequence[int], generator: Generators, device, dtype=torch.float32) -> Tensor:
        """x_T for a batch of shape ``shape`` (one generator, or one per row)."""
        return randn(shape, generator, device, dtype) * self.init_noise_sigma

    @classmethod
    def from_scheduler(
        cls,
        scheduler,
        num_steps: int,
        *,
        eta: float | None = None,
        mu: float | None = None,
        sigmas: list[float] | None = None,
        device: torch.device | str | None = None,
    ) -> SamplingSchedule:
        """Build the schedule of ``num_steps`` steps for a diffusers scheduler.

        Accepted schedulers: DDIMScheduler (``eta`` >= 0, default 0), DDPMScheduler (``eta`` not
        used: the DDPM posterior), FlowMatchEulerDiscreteScheduler (``eta`` = 0: Euler ODE; > 0:
        the stochastic step above).  ``mu`` is the resolution shift of dynamically shifted flow
        schedules (FLUX) and ``sigmas`` a custom flow sigma list (FLUX pipelines pass
        ``linspace(1, 1/T, T)``).  The scheduler's own state is changed by ``set_timesteps``.
        """
        name = type(scheduler).__name__
        check_range("num_steps", num_steps, 1, None, integer=True)
        if eta is not None:
            check_range("eta", eta, 0.0, None)
        config = scheduler.config
        if getattr(config, "thresholding", False):
            raise AlignError(
                f"{name} has thresholding=True, which this sampler does not differentiate through; "
                "load the scheduler with thresholding=False"
            )
        if name == "DDIMScheduler":
            return cls._from_vp(scheduler, num_steps, "ddim", 0.0 if eta is None else float(eta), device)
        if name == "DDPMScheduler":
            if eta not in (None, 1.0):
                raise AlignError(
                    f"eta={eta!r} does not apply to DDPMScheduler (its steps are the DDPM posterior, eta=1); "
                    "use sampler 'ddim' to choose eta"
                )
            return cls._from_vp(scheduler, num_steps, "ddpm", 1.0, device)
        if name == "FlowMatchEulerDiscreteScheduler":
            return cls._from_flow(scheduler, num_steps, 0.0 if eta is None else float(eta), mu, sigmas, device)
        raise AlignError(
            f"scheduler {name} is not supported for differentiable sampling; accepted: "
            f"{', '.join(SUPPORTED_SCHEDULERS)}. For a UNet model choose sampler='ddim' or 'ddpm' "
            "(converted from the model's scheduler config)."
        )

    @classmethod
    def _from_vp(cls, scheduler, num_steps: int, kind: SamplerKind, eta: float, device) -> SamplingSchedule:
        config = scheduler.config
        prediction_type = config.prediction_type
        if prediction_type not in ("epsilon", "v_prediction", "sample"):
            raise AlignError(
                f"prediction_type={prediction_type!r} of {type(scheduler).__name__} is not supported; "
                "accepted: 'epsilon', 'v_prediction', 'sample'"
            )
        if kind == "ddpm" and config.variance_type not in ("fixed_small", "fixed_small_log", "fixed_large"):
            raise AlignError(
                f"DDPMScheduler variance_type={config.variance_type!r} is not supported; accepted: "
                "'fixed_small', 'fixed_small_log', 'fixed_large'"
            )
        scheduler.set_timesteps(num_steps)
        timesteps = scheduler.timesteps.clone()
        acp = scheduler.alphas_cumprod.double()
        if kind == "ddim":
            final = float(scheduler.final_alpha_cumprod)
        else:
            final = 1.0
        stride = config.num_train_timesteps // num_steps
        rows = []  # (alpha_t, sigma_t, alpha_s, sigma_s, c_x0, c_eps, c_xt, noise_std) per step
        for i, t in enumerate(timesteps.tolist()):
            a_t = float(acp[t])
            if kind == "ddim":
                prev_t = t - stride
            else:
                prev_t = int(timesteps[i + 1]) if i + 1 < len(timesteps) else -1
            a_prev = float(acp[prev_t]) if prev_t >= 0 else final
            alpha_t, sigma_t = math.sqrt(a_t), math.sqrt(1.0 - a_t)
            alpha_s, sigma_s = math.sqrt(a_prev), math.sqrt(1.0 - a_prev)
            if kind == "ddim":
                std = posterior_noise_std(alpha_t, sigma_t, alpha_s, sigma_s, eta)
                coefs = (alpha_s, math.sqrt(max(sigma_s**2 - std**2, 0.0)), 0.0)
            else:
                # DDPM posterior q(x_prev | x_t, x0): mean = a * x0 + b * x_t (Ho et al. eq. 7)
                beta_t = 1.0 - a_t / a_prev
                coefs = (
                    math.sqrt(a_prev) * beta_t / (1.0 - a_t),
                    0.0,
                    math.sqrt(a_t / a_prev) * (1.0 - a_prev) / (1.0 - a_t),
                )
                if t == 0:
                    std = 0.0  # diffusers adds no noise on a step taken from t = 0
                elif config.variance_type == "fixed_large":
                    std = math.sqrt(beta_t)
                else:
                    std = math.sqrt(max((1.0 - a_prev) / (1.0 - a_t) * beta_t, 1e-20))
            rows.append((alpha_t, sigma_t, alpha_s, sigma_s, *coefs, std))
        clip = float(config.clip_sample_range) if getattr(config, "clip_sample", False) else None
        init_sigma = float(getattr(scheduler, "init_noise_sigma", 1.0))
        return cls._from_rows(kind, prediction_type, timesteps, rows, eta, clip, init_sigma, device)

    @classmethod
    def _from_rows(cls, kind, prediction_type, timesteps, rows, eta, clip, init_sigma, device) -> SamplingSchedule:
        alphas, sigmas, n_alphas, n_sigmas, c_x0, c_eps, c_xt, stds = (tuple(col) for col in zip(*rows))
        return cls(
            kind=kind,
            prediction_type=prediction_type,
            timesteps=timesteps.to(device) if device is not None else timesteps,
            alphas=alphas,
            sigmas=sigmas,
            next_alphas=n_alphas,
            next_sigmas=n_sigmas,
            coef_x0=c_x0,
            coef_eps=c_eps,
            coef_xt=c_xt,
            noise_stds=stds,
            eta=eta,
            clip_sample_range=clip,
            init_noise_sigma=init_sigma,
        )

    @classmethod
    def _from_flow(
        cls, scheduler, num_steps: int, eta: float, mu: float | None, custom_sigmas, device
    ) -> SamplingSchedule:
        config = scheduler.config
        kwargs = {} if custom_sigmas is None else {"sigmas": list(custom_sigmas)}
        if getattr(config, "use_dynamic_shifting", False):
            if mu is None:
                raise AlignError(
                    "this flow-matching scheduler shifts its schedule by resolution (use_dynamic_shifting); "
                    "pass mu (the pipeline computes it from the image size)"
                )
            kwargs["mu"] = mu
        scheduler.set_timesteps(num_steps, **kwargs)
        if getattr(config, "invert_sigmas", False):
            raise AlignError("FlowMatchEulerDiscreteScheduler with invert_sigmas=True is not supported")
        sig = [float(s) for s in scheduler.sigmas.double().tolist()]
        rows = []
        for i in range(num_steps):
            sigma_t, sigma_s = sig[i], sig[i + 1]
            alpha_t, alpha_s = 1.0 - sigma_t, 1.0 - sigma_s
            std = posterior_noise_std(alpha_t, sigma_t, alpha_s, sigma_s, eta) if alpha_s > 0 else 0.0
            rows.append((alpha_t, sigma_t, alpha_s, sigma_s, alpha_s, math.sqrt(max(sigma_s**2 - std**2, 0.0)), 0.0, std))
        return cls._from_rows("flow", "flow", scheduler.timesteps.clone(), rows, eta, None, 1.0, device)


def guided_prediction(
    denoiser: DenoiserFn,
    x_t: Tensor,
    timestep: Tensor,
    cond: Conditioning,
    uncond: Conditioning | None,
    guidance_scale: float,
) -> Tensor:
    """Classifier-free guidance in one batched forward: u + g (c - u).

    With ``uncond`` None or ``guidance_scale`` == 1 the conditional prediction is returned from a
    single un-doubled forward.
    """
    if uncond is None or guidance_scale == 1.0:
        return denoiser(x_t, timestep, cond)
    both = {k: torch.cat([uncond[k], cond[k]]) for k in cond}
    out = denoiser(torch.cat([x_t, x_t]), torch.cat([timestep, timestep]), both)
    out_uncond, out_cond = out.chunk(2)
    return out_uncond + guidance_scale * (out_cond - out_uncond)
