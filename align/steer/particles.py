"""Batched particles shared by the inference-time samplers (FK steering, best-of-N, guidance, RLG).

Particles are one batch, grouped by prompt (prompt-major: rows ``p * K .. p * K + K - 1`` belong
to prompt ``p``), so that model calls, resampling and rewards are whole-batch tensor operations.
Every sampler runs the toolkit's one chain (:func:`align.core.chain.run_chain`) with its own
hooks; this module holds what they share: counting model evaluations honestly (for matched
compute comparisons), decoding and scoring in chunks of bounded size, and the seeded random
streams.

Seeds follow ``align sample``, whose image k of every prompt uses seed ``seed + k``: particle k of
every prompt draws its initial noise and step noise from its own generator seeded ``seed + k``
(:func:`particle_noise`), and the state is float32 with only the model's input cast to the model
dtype, as in :func:`align.steer.generate.generate`.  So a sampler whose steering does nothing
(best-of-N, FK at lambda = 0, RL guidance at w = 0) gives bitwise the images ``align sample``
gives with the same seed, and no particle depends on the batch it was drawn in.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field

import torch
from torch import Tensor

from align.core.chain import seeded_generators
from align.core.denoisers import index_conditioning, repeat_conditioning
from align.core.errors import AlignError
from align.core.sampling import DenoiserFn, Generators, SamplingSchedule, guided_prediction

Conditioning = Mapping[str, Tensor]
#: reward on decoded samples: (images [B, ...], prompts or None) -> scores [B]
RewardFn = Callable[[Tensor, "list[str] | None"], Tensor]
DecodeFn = Callable[[Tensor], Tensor]


@dataclass
class EvalCounts:
    """What a sampler evaluated, for compute-matched comparisons.

    Attributes:
        model_calls: denoiser invocations.
        model_rows: rows pushed through the denoiser (a classifier-free-guidance pair counts 2).
        decode_rows: samples decoded (intermediate and final).
        reward_rows: samples scored by the reward.
        reward_grad_rows: samples whose reward gradient was taken (decode + reward backward).
    """

    model_calls: int = 0
    model_rows: int = 0
    decode_rows: int = 0
    reward_rows: int = 0
    reward_grad_rows: int = 0

    def to_dict(self) -> dict[str, int]:
        return asdict(self)


@dataclass
class ResamplingEvent:
    """One step at which FK potentials were applied.

    ``ancestors[p, k]`` is the index (within prompt ``p``) of the particle, before this step's
    resampling, that particle ``k`` descends from (the identity where ``resampled[p]`` is False).
    ``ess`` is each prompt's effective sample size before resampling and ``rewards`` the
    intermediate rewards of the particles before resampling.
    """

    step: int
    ancestors: Tensor
    resampled: Tensor
    ess: Tensor
    rewards: Tensor

    @property
    def relative_ess(self) -> Tensor:
        """ESS / K per prompt [P] (1: all particles count equally, 1/K: one particle holds the weight)."""
        return self.ess / self.ancestors.shape[-1]


@dataclass
class SteeringResult:
    """Final particles of an inference-time sampler, grouped by prompt.

    Attributes:
        samples: final samples (latents) [P * K, ...], prompt-major.
        images: the decoded samples (``decode_fn`` outputs), or the samples when there is no decoder.
        rewards: final rewards [P, K] (None when no reward was given).
        log_weights: normalised log-weights [P, K] (FK; None for unweighted samplers).
        ancestry: the FK resampling events, in step order.
        counts: model, decode and reward evaluations.
        final_relative_ess: ESS / K of each prompt's final weights [P], before any final
            resampling (FK; None for unweighted samplers).  Near 1/K the weighted output rests on
            a single particle.
    """

    samples: Tensor
    images: Tensor | None
    rewards: Tensor | None
    log_weights: Tensor | None = None
    ancestry: list[ResamplingEvent] = field(default_factory=list)
    counts: EvalCounts = field(default_factory=EvalCounts)
    final_relative_ess: Tensor | None = None

    @property
    def relative_ess(self) -> Tensor | None:
        """ESS / K before resampling at each FK event [len(ancestry), P] (steps: ``event.step``), or None."""
        if not self.ancestry:
            return None
        return torch.stack([e.relative_ess for e in self.ancestry])

    @property
    def num_prompts(self) -> int:
        return self.rewards.shape[0] if self.rewards is not None else 1

    def best_indices(self) -> Tensor:
        """Flat index (into ``samples``) of the highest-reward particle of each prompt [P]."""
        if self.rewards is None:
            raise AlignError("this result has no rewards; pass a reward to select the best sample")
        p, k = self.rewards.shape
        return self.rewards.argmax(-1) + torch.arange(p, device=self.rewards.device) * k

    def best_rewards(self) -> Tensor:
        return self.rewards.amax(-1)


def auxiliary_generator(seed: int, device: torch.device | str = "cpu") -> torch.Generator:
    """The stream of a run's auxiliary draws (resampling, x0 samples), derived from its seed."""
    return torch.Generator(device=device).manual_seed((seed * 6364136223846793005 + 1442695040888963407) % 2**63)


def particle_noise(
    seed: int | None, generator: Generators, num_prompts: int, per_prompt: int
) -> tuple[Generators, torch.Generator]:
    """(noise of the particles, auxiliary generator) for one sampling run.

    With ``generator`` None, particle k of every prompt draws its initial and step noise from a
    generator of its own seeded ``seed + k`` (``seed`` None: a random seed), the convention of
    ``align sample``.  A ``generator`` given explicitly is used as diffusers pipelines use it: one
    generator draws the whole batch's noise (the samples then depend on the batch layout), a
    sequence holds one generator per particle (prompt-major).  Auxiliary draws use a separate
    stream derived from the seed (from the first generator's seed when generators are given).
    """
    if generator is None:
        if seed is None:
            seed = torch.Generator().seed() % 2**62
        noise = seeded_generators([seed + k for _ in range(num_prompts) for k in range(per_prompt)])
        return noise, auxiliary_generator(seed)
    if isinstance(generator, torch.Generator):
        return generator, auxiliary_generator(generator.initial_seed(), generator.device)
    if len(generator) != num_prompts * per_prompt:
        raise AlignError(
            f"got {len(generator)} generators for {num_prompts} prompt(s) x {per_prompt} samples; pass one "
            "generator, one per sample (prompt-major), or none (the config's seed)"
        )
    return generator, auxiliary_generator(generator[0].initial_seed(), generator[0].device)


class Predictor:
    """Model outputs of all particles at a step: CFG in one batched call, optional chunking, counted.

    ``cond``/``uncond`` hold one row per particle.  ``model_dtype`` casts the denoiser's input (for
    half-precision models) while the sampler arithmetic stays in the latents' dtype.
    """

    def __init__(
        self,
        denoiser: DenoiserFn,
        schedule: SamplingSchedule,
        cond: Conditioning,
        uncond: Conditioning | None,
        guidance_scale: float,
        counts: EvalCounts,
        *,
        chunk_size: int | None = None,
        model_dtype: torch.dtype | None = None,
    ):
        self.denoiser = denoiser
        self.schedule = schedule
        self.cond = dict(cond)
        self.uncond = None if uncond is None or guidance_scale == 1.0 else dict(uncond)
        self.guidance_scale = guidance_scale
        self.counts = counts
        self.chunk_size = chunk_size
        self.model_dtype = model_dtype

    def _evaluate(self, x: Tensor, t: Tensor, rows: slice | None) -> Tensor:
        """Model output for the particles ``rows`` (None: all); subclasses change what is evaluated."""
        cond = self.cond if rows is None else index_conditioning(self.cond, rows)
        uncond = self.uncond
        if uncond is not None and rows is not None:
            uncond = index_conditioning(uncond, rows)
        self.counts.model_calls += 1
        self.counts.model_rows += x.shape[0] * (1 if uncond is None else 2)
        return guided_prediction(self.denoiser, x, t, cond, uncond, self.guidance_scale)

    def __call__(self, i: int, x: Tensor) -> Tensor:
        t = self.schedule.model_timestep(i, x.shape[0], x.device)
        inp = x if self.model_dtype is None else x.to(self.model_dtype)
        n = x.shape[0]
        if self.chunk_size is None or self.chunk_size >= n:
            return self._evaluate(inp, t, None).to(x.dtype)
        outs = []
        for start in range(0, n, self.chunk_size):
            rows = slice(start, min(start + self.chunk_size, n))
            outs.append(self._evaluate(inp[rows], t[rows], rows))
        return torch.cat(outs).to(x.dtype)


class RewardEvaluator:
    """Decodes samples and scores them in chunks of at most ``chunk_size`` rows, counting both.

    ``prompts`` has one entry per particle (or is None).  Scores come back as float64 [N].
    """

    def __init__(
        self,
        reward_fn: RewardFn,
        decode_fn: DecodeFn | None,
        prompts: Sequence[str] | None,
        counts: EvalCounts,
        chunk_size: int | None = None,
    ):
        self.reward_fn = reward_fn
        self.decode_fn = decode_fn
        self.prompts = None if prompts is None else list(prompts)
        self.counts = counts
        self.chunk_size = chunk_size

    def _chunks(self, n: int) -> list[slice]:
        step = self.chunk_size or max(n, 1)
        return [slice(s, min(s + step, n)) for s in range(0, n, step)]

    def _decode(self, x: Tensor) -> Tensor:
        if self.decode_fn is None:
            return x
        self.counts.decode_rows += x.shape[0]
        return self.decode_fn(x)

    def _score(self, images: Tensor, rows: slice, prompts: list[str] | None) -> Tensor:
        self.counts.reward_rows += images.shape[0]
        chunk_prompts = None if prompts is None else prompts[rows]
        scores = self.reward_fn(images, chunk_prompts)
        if not isinstance(scores, Tensor) or scores.shape != (images.shape[0],):
            got = tuple(scores.shape) if isinstance(scores, Tensor) else type(scores).__name__
            raise AlignError(f"the reward returned {got}; expected a tensor of shape [{images.shape[0]}]")
        return scores

    def scores(self, x0: Tensor, prompts: list[str] | None = None) -> Tensor:
        """Rewards of decoded ``x0`` [N] (no gradient).  ``prompts`` overrides the particles' prompts."""
        prompts = self.prompts if prompts is None else prompts
        with torch.no_grad():
            out = [self._score(self._decode(x0[r]), r, prompts).double() for r in self._chunks(x0.shape[0])]
        return torch.cat(out)

    def scores_and_images(self, x0: Tensor) -> tuple[Tensor, Tensor]:
        """Rewards [N] and decoded images of the final samples (no gradient)."""
        scores, images = [], []
        with torch.no_grad():
            for r in self._chunks(x0.shape[0]):
                img = self._decode(x0[r])
                scores.append(self._score(img, r, self.prompts).double())
                images.append(img)
        return torch.cat(scores), torch.cat(images)

    def images(self, x0: Tensor) -> Tensor:
        with torch.no_grad():
            return torch.cat([self._decode(x0[r]) for r in self._chunks(x0.shape[0])])

    def value_and_grad(self, x0: Tensor) -> tuple[Tensor, Tensor]:
        """Rewards [N] and their gradient with respect to ``x0``, chunk by chunk (memory bounded)."""
        scores, grads = [], []
        for r in self._chunks(x0.shape[0]):
            with torch.enable_grad():
                leaf = x0[r].detach().requires_grad_(True)
                s = self._score(self._decode(leaf), r, self.prompts)
                (grad,) = torch.autograd.grad(s.sum(), leaf, allow_unused=True)
            if grad is None:
                raise AlignError(
                    "the reward has no gradient with respect to the samples; gradient guidance and "
                    "gradient-guided proposals need a differentiable reward"
                )
            self.counts.reward_grad_rows += leaf.shape[0]
            scores.append(s.detach().double())
            grads.append(grad)
        return torch.cat(scores), torch.cat(grads)


@dataclass
class ParticleSetup:
    """Everything a particle sampler needs, built once from the user's arguments."""

    schedule: SamplingSchedule
    predictor: Predictor
    rewards: RewardEvaluator | None
    num_prompts: int
    per_prompt: int
    sample_shape: tuple[int, ...]
    device: torch.device
    dtype: torch.dtype
    counts: EvalCounts

    @property
    def num_particles(self) -> int:
        return self.num_prompts * self.per_prompt

    def noise(self, seed: int | None, generator: Generators = None) -> tuple[Generators, torch.Generator]:
        """(particle noise, auxiliary generator): see :func:`particle_noise`."""
        return particle_noise(seed, generator, self.num_prompts, self.per_prompt)

    def initial_noise(self, noise: Generators) -> Tensor:
        shape = (self.num_particles, *self.sample_shape)
        return self.schedule.initial_noise(shape, noise, self.device, self.dtype)


def prepare_particles(
    denoiser: DenoiserFn,
    schedule: SamplingSchedule,
    per_prompt: int,
    *,
    sample_shape: Sequence[int],
    reward_fn: RewardFn | None = None,
    cond: Conditioning | None = None,
    uncond: Conditioning | None = None,
    guidance_scale: float = 1.0,
    num_prompts: int | None = None,
    prompts: Sequence[str] | None = None,
    decode_fn: DecodeFn | None = None,
    chunk_size: int | None = None,
    model_chunk_size: int | None = None,
    device: torch.device | str | None = None,
    dtype: torch.dtype = torch.float32,
    model_dtype: torch.dtype | None = None,
) -> ParticleSetup:
    """Check the inputs and expand per-prompt conditioning to ``per_prompt`` particles each.

    Args:
        denoiser: any callable ``(x_t, timestep [B], cond) -> model output``.
        schedule: the sampler.
        per_prompt: particles (samples) per prompt.
        sample_shape: shape of one sample, e.g. (4, 64, 64) latents or (2,) for a toy.
        reward_fn: ``(decoded samples, prompts or None) -> scores [B]`` (None: nothing is scored).
        cond, uncond: per-prompt conditioning (one row per prompt); ``uncond`` with
            ``guidance_scale`` != 1 turns on classifier-free guidance (one batched call per step).
        num_prompts: number of prompts when there is no conditioning (toy models).
        prompts: prompt strings passed to the reward (one per prompt).
        decode_fn: latents -> what the reward scores (e.g. ``DiffusionModel.decode``); None: identity.
        chunk_size: samples decoded and scored at once (None: all).
        model_chunk_size: samples per denoiser call (None: all).
        device, dtype: where and in which precision the samples live (sampler arithmetic).
        model_dtype: dtype the denoiser's input is cast to (half-precision models).
    """
    cond = dict(cond or {})
    rows = {v.shape[0] for v in cond.values()} | ({len(prompts)} if prompts is not None else set())
    if num_prompts is not None:
        rows.add(num_prompts)
    if len(rows) > 1:
        raise AlignError(
            f"conditioning, prompts and num_prompts disagree on the number of prompts ({sorted(rows)}); "
            "give one conditioning row and one prompt per prompt"
        )
    p = rows.pop() if rows else 1
    if p < 1:
        raise AlignError(f"num_prompts={p!r} must be at least 1")
    if uncond is not None and set(uncond) != set(cond):
        raise AlignError(f"uncond keys {sorted(uncond)} differ from cond keys {sorted(cond)}")
    if device is None:
        first = next(iter(cond.values()), None)
        device = first.device if first is not None else torch.device("cpu")
    counts = EvalCounts()
    predictor = Predictor(
        denoiser,
        schedule,
        repeat_conditioning(cond, per_prompt),
        None if uncond is None else repeat_conditioning(uncond, per_prompt),
        guidance_scale,
        counts,
        chunk_size=model_chunk_size,
        model_dtype=model_dtype,
    )
    particle_prompts = None if prompts is None else [q for q in prompts for _ in range(per_prompt)]
    rewards = None
    if reward_fn is not None:
        rewards = RewardEvaluator(reward_fn, decode_fn, particle_prompts, counts, chunk_size)
    return ParticleSetup(
        schedule=schedule,
        predictor=predictor,
        rewards=rewards,
        num_prompts=p,
        per_prompt=per_prompt,
        sample_shape=tuple(int(s) for s in sample_shape),
        device=torch.device(device),
        dtype=dtype,
        counts=counts,
    )


def group_view(values: Tensor, num_prompts: int) -> Tensor:
    """[P * K] -> [P, K]."""
    return values.view(num_prompts, -1)


def check_reward_fn(reward_fn: object) -> None:
    if not callable(reward_fn):
        raise AlignError(f"reward_fn={reward_fn!r} is not callable; pass a function (images, prompts) -> scores [B]")
