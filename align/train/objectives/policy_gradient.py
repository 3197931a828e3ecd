"""The policy-gradient objective (DDPO, GRPO): rollouts, advantages, and a clipped surrogate over stored steps.

When the current rollout is used up (``inner_epochs`` passes of minibatches), the objective
samples a new one: ``rollout_size`` samples over all processes with the method's stochastic
schedule (DDIM eta > 0, or the flow reverse SDE on its stochastic steps and the ODE elsewhere),
recording each stochastic step's input, output and log-probability without gradients
(:func:`align.train.rollout.sample_trajectory`).  The images are scored in chunks as they come,
in a worker thread while the next chunk is sampled (``overlap_reward``), with any reward: no
gradient is needed.  Rewards are gathered from every process and turned into advantages
(GRPO: within each group; DDPO: per-prompt running statistics), identical on every process.

Each optimiser step then trains one minibatch of the rollout; its micro-steps are
``batch_size`` samples at one trained step each: the step is recomputed with gradients (one
CFG-batched model call), its per-dimension log-probability compared with the stored one, and the
PPO-clipped surrogate (plus the optional closed-form KL to the frozen model) averaged.  Memory is
that of one model call's forward and backward, whatever the number of sampling steps.

Layout and reproducibility.  A rollout's positions 0..R-1 are the training order of its first
pass; position p lies on process (p // batch_size) % processes, so every process samples the
rows it trains and a rollout chunk is exactly a first-pass micro-batch (same rows, same batch
shape: on-policy importance ratios are exactly 1).  Which sample sits at a position, its prompt
(one per group), its noise, the stochastic steps of the rollout and each sample's trained steps
all come from seeds of (run seed, rollout, ...), so a resumed run or a run over more processes
draws the same samples (later passes reshuffle within each process).  The objective's state
(the rollout in use, every process's rows of it gathered, and DDPO's per-prompt statistics) is
checkpointed, so resume is exact; each process takes its own rows back by sample id.
"""

from __future__ import annotations

import time
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from align.core.chain import model_output
from align.core.errors import AlignError, ConfigError
from align.core.lora import adapters_disabled
from align.core.sampling import SamplingSchedule
from align.train.objectives.backprop import reward_metrics
from align.train.objectives.base import Objective
from align.train.policy_gradient import (
    PerPromptStatTracker,
    clipped_surrogate,
    gaussian_kl,
    gaussian_log_density,
    group_advantages,
    guard_log_ratio,
    per_dimension,
)
from align.train.rollout import sample_trajectory, step_outputs, transition_means
from align.train.seeds import seeded
from align.train.stochastic_steps import AllSteps

#: first seed part of everything a rollout draws (the backprop objective's seeds start with the step)
ROLLOUT_SEED = 0x5EED05
#: second seed part, per kind of draw
_ORDER, _STEPS, _PROMPT, _NOISE, _INITIAL, _TIMESTEPS, _SHUFFLE = range(1, 8)
#: the std of DDPO's advantages without the per-prompt tracker gets ddpo-pytorch's 1e-8
_DDPO_EPS = 1e-8


@dataclass
class RolloutBuffer:
    """This process's share of one rollout: what the training pass needs (no gradients).

    ``x_in``, ``x_next`` [n, K, ...] and ``log_probs`` [n, K] are per local row and stochastic step;
    ``means`` [n, K, ...] only for GRPO-Guard; ``advantages`` [n] are already normalised.
    """

    index: int
    steps: tuple[int, ...]
    sample_ids: Tensor
    prompts: list[str]
    x_in: Tensor
    x_next: Tensor
    log_probs: Tensor
    advantages: Tensor
    means: Tensor | None = None
    x0: Tensor | None = None  # the chains' outputs [n, ...], kept on request (DiffusionNFT trains on them)
    rewards: Tensor | None = None  # every reward of the rollout (all processes) by sample id [R] (online DPO pairs them)
    reward_valid: Tensor | None = None  # [R]
    failed: bool = False
    metrics: dict[str, float] = field(default_factory=dict)
    timing: dict[str, float] = field(default_factory=dict)  # of the collection (logged once, not checkpointed)

    _TENSORS = ("sample_ids", "x_in", "x_next", "log_probs", "advantages", "means", "x0", "rewards", "reward_valid")
    #: the tensors with one row per local sample (each process holds its own rows; the others are the rollout's)
    ROWS = ("sample_ids", "x_in", "x_next", "log_probs", "advantages", "means", "x0")

    def tensors(self) -> dict[str, Tensor]:
        return {k: getattr(self, k) for k in self._TENSORS if getattr(self, k) is not None}

    def meta(self) -> dict[str, Any]:
        return {"index": self.index, "steps": list(self.steps), "prompts": self.prompts, "failed": self.failed,
                "metrics": self.metrics}

    @classmethod
    def restore(cls, tensors: dict[str, Tensor], meta: dict[str, Any]) -> RolloutBuffer:
        return cls(
            index=int(meta["index"]), steps=tuple(int(s) for s in meta["steps"]), prompts=list(meta["prompts"]),
            failed=bool(meta["failed"]), metrics=dict(meta["metrics"]),
            **{k: tensors[k] for k in cls._TENSORS if k in tensors},
        )


class PolicyGradientObjective(Objective):
    """DDPO and GRPO on the trainer's loop; see the module docstring."""

    #: whether a rollout keeps each sample's clean output x0 (the forward-process objectives train on it)
    keeps_x0: bool = False

    def __init__(self, trainer):
        super().__init__(trainer)
        t, m, cfg, model = trainer, trainer.method, trainer.config, trainer.model
        self.method = m
        kwargs = {"height": t.height, "width": t.width}
        if m.sampler == "ddpm":
            base = stochastic = model.schedule(m.num_steps, sampler="ddpm", **kwargs)
        elif model.is_flow:
            base = model.schedule(m.num_steps, sampler=m.sampler, eta=0.0, **kwargs)
            stochastic = base.flow_sde(m.noise_level, m.sde_noise)
        else:
            if m.eta == 0.0:
                raise ConfigError(
                    f"{m.name}.eta=0 samples this {model.family} model deterministically (DDIM): its steps have no "
                    f"transition probability to train; accepted: eta > 0 (DDPO: 1.0)"
                )
            base = model.schedule(m.num_steps, sampler=m.sampler, eta=0.0, **kwargs)
            stochastic = model.schedule(m.num_steps, sampler=m.sampler, eta=m.eta, **kwargs)
        self.base, self.schedule = base, stochastic
        self.policy = m.stochastic_step_policy()
        if base is stochastic and not isinstance(self.policy, AllSteps):
            raise ConfigError(
                f"{m.name}.sde_steps={getattr(m, 'sde_steps', 'all')!r} needs deterministic steps outside the window, "
                "which sampler='ddpm' has not; accepted with ddpm: sde_steps=all (or sampler=ddim)"
            )
        self.candidates = tuple(i for i in m.candidate_steps(model.is_flow) if stochastic.noise_stds[i] > 0)
        if not self.candidates:
            raise AlignError(f"{m.name}: no sampling step of this schedule adds noise, so there is nothing to train")
        # validates window sizes against the steps that can be stochastic; K is the same for every rollout
        self.num_stochastic = len(self.policy.steps(self.candidates, 0, seeded(0)))
        self.trained_steps = m.trained_steps(self.num_stochastic)

        self.rollout_size = m.rollout_size
        self.group_size = m.samples_per_prompt
        self.minibatch = cfg.batch_size * cfg.gradient_accumulation_steps * t.num_processes
        if self.rollout_size % self.minibatch:
            raise AlignError(
                f"{m.name}: a rollout of {self.rollout_size} samples does not split into optimiser steps of "
                f"batch_size x gradient_accumulation_steps x processes = {cfg.batch_size} x "
                f"{cfg.gradient_accumulation_steps} x {t.num_processes} = {self.minibatch} samples; choose sizes whose "
                f"product divides {self.rollout_size} (or change the rollout size)"
            )
        self.minibatches = self.rollout_size // self.minibatch
        self.micro_batches = cfg.gradient_accumulation_steps  # per optimiser step
        self.steps_per_rollout = m.inner_epochs * self.minibatches
        self.positions = [p for p in range(self.rollout_size) if (p // cfg.batch_size) % t.num_processes == t.rank]
        self.tracker = (
            PerPromptStatTracker(m.tracker_buffer_size, m.tracker_min_count) if getattr(m, "per_prompt_stats", False)
            else None
        )
        self.buffer: RolloutBuffer | None = None
        self._schedules: dict[tuple[int, ...], SamplingSchedule] = {}
        self._cond_key: tuple | None = None
        self._cond = None
        self._executor: ThreadPoolExecutor | None = None

    def _refuse_sharded_copy(self, what: str) -> None:
        """A copy of the trained weights (``what``) is sharded like them under FSDP, but DeepSpeed's partitioned
        weights have no such copy here: refused with what is accepted."""
        sharding = getattr(self.trainer, "sharding", "none")
        if sharding not in ("none", "fsdp"):
            raise ConfigError(
                f"{self.trainer.method.name} with sharding={sharding!r}: {what} is a copy of the trained weights, not "
                "partitioned by DeepSpeed; accepted: LoRA (lora.enabled=true), or full fine-tuning with sharding=none "
                "or fsdp"
            )

    def _init_clean_rollouts(self, schedule: SamplingSchedule, rollout_size: int, group_size: int,
                             steps_per_rollout: int, micro_batches: int) -> None:
        """The rollout layout of an objective that trains on the clean samples only (no sampler step is trained:
        DiffusionNFT, online Diffusion-DPO): any ``schedule``, deterministic or not, and no stochastic-step policy."""
        t = self.trainer
        self.method = t.method
        self.schedule = self.base = schedule
        self.policy = AllSteps()
        self.candidates = ()
        self.num_stochastic = 0
        self.rollout_size, self.group_size = rollout_size, group_size
        self.steps_per_rollout, self.micro_batches = steps_per_rollout, micro_batches
        self.minibatches = steps_per_rollout
        self.minibatch = t.config.batch_size * t.num_processes * micro_batches
        self.positions = [p for p in range(rollout_size) if (p // t.config.batch_size) % t.num_processes == t.rank]
        self.tracker = None
        self.buffer = None
        self._schedules = {}
        self._cond_key = self._cond = None
        self._executor = None

    def describe(self) -> str:
        """What one rollout trains, in words (printed when training starts)."""
        m = self.method
        return (
            f"{m.name}: rollouts of {self.rollout_size} samples ({self.rollout_size // self.group_size} prompts x "
            f"{self.group_size}), {self.num_stochastic} stochastic step(s) of {m.num_steps}, {self.trained_steps} "
            f"trained per sample; {self.steps_per_rollout} optimiser step(s) per rollout "
            f"({m.inner_epochs} pass(es) x {self.minibatches} minibatch(es) of {self.minibatch})"
        )

    @property
    def keeps_means(self) -> bool:
        """Whether a rollout keeps each transition's mean (GRPO-Guard's ratio normalisation needs them)."""
        return bool(getattr(self.method, "ratio_norm", False))

    # ------------------------------------------------------------------ sizes
    def micro_steps(self, step: int) -> int:
        return self.trainer.config.gradient_accumulation_steps * self.trained_steps

    def rollout_schedule(self, steps: tuple[int, ...]) -> SamplingSchedule:
        """The schedule with ``steps`` stochastic and the others deterministic."""
        if steps not in self._schedules:
            if set(steps) == set(self.schedule.stochastic_steps):
                self._schedules[steps] = self.schedule
            else:
                self._schedules[steps] = self.base.mixed(self.schedule, steps)
        return self._schedules[steps]

    # ------------------------------------------------------------------ what a rollout draws
    def _seed(self, *parts: int) -> torch.Generator:
        return seeded(self.trainer.config.seed, ROLLOUT_SEED, *parts)

    def sample_order(self, rollout: int) -> Tensor:
        """Sample id at each position of the rollout's first pass."""
        return torch.randperm(self.rollout_size, generator=self._seed(rollout, _ORDER))

    def prompt_of(self, rollout: int, sample: int) -> str:
        prompts = self.trainer.prompts
        g = self._seed(rollout, _PROMPT, sample // self.group_size)
        return prompts[int(torch.randint(len(prompts), (), generator=g))]

    def stochastic_steps(self, rollout: int) -> tuple[int, ...]:
        return self.policy.steps(self.candidates, rollout, self._seed(rollout, _STEPS))

    # ------------------------------------------------------------------ collecting a rollout
    def _score(self, images: Tensor, prompts: list[str], busy: list[float]):
        start = time.perf_counter()
        with torch.no_grad():
            out = self.trainer.reward.score(images, prompts)
        busy[0] += time.perf_counter() - start
        return out

    def collect(self, rollout: int) -> RolloutBuffer:
        """Sample, score and normalise rollout number ``rollout`` (this process's share)."""
        t, m, cfg, model = self.trainer, self.method, self.trainer.config, self.trainer.model
        start = time.perf_counter()
        steps = self.stochastic_steps(rollout)
        schedule = self.rollout_schedule(steps)
        order = self.sample_order(rollout)
        ids = order[self.positions]
        b = cfg.batch_size
        busy = [0.0]
        if getattr(m, "overlap_reward", True) and self._executor is None:
            self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="reward")
        t.reward.train()  # running reward normalisation updates its statistics in train mode only
        pending: list[Future] = []
        trajectories, prompts = [], []
        for chunk in range(0, len(ids), b):
            chunk_ids = [int(s) for s in ids[chunk : chunk + b]]
            chunk_prompts = [self.prompt_of(rollout, s) for s in chunk_ids]
            noise = [self._seed(rollout, _NOISE, s) for s in chunk_ids]
            if getattr(m, "same_initial_noise", False):
                initial = [self._seed(rollout, _INITIAL, s // self.group_size) for s in chunk_ids]
            else:
                initial = noise  # x_T, then the step noise, from the sample's own generator
            with torch.no_grad():
                pc = t.encode(chunk_prompts)
                x_T = schedule.initial_noise(model.latent_shape(len(chunk_ids), t.height, t.width), initial, model.device)

                def predict(i: int, x: Tensor, cond=pc.cond, uncond=pc.uncond) -> Tensor:
                    return model_output(model.denoiser, schedule, i, x, cond, uncond, t.guidance_scale, model.dtype)

                with t.accelerator.autocast():
                    trajectory = sample_trajectory(schedule, predict, x_T, noise, keep_means=self.keeps_means)
                    images = model.decode(trajectory.x0).float()
            trajectories.append(trajectory)
            prompts += chunk_prompts
            if self._executor is not None:
                pending.append(self._executor.submit(self._score, images, chunk_prompts, busy))
            else:
                done: Future = Future()
                done.set_result(self._score(images, chunk_prompts, busy))
                pending.append(done)
        sampled = time.perf_counter()
        outputs = [f.result() for f in pending]  # a reward's crash is raised here
        waited = time.perf_counter() - sampled
        scores = torch.cat([o.scores.detach().double().cpu() for o in outputs])
        valid = torch.cat([o.valid.cpu() for o in outputs])
        info = {  # a chunk whose samples were all dropped has no info: NaN there, as the reward does within a call
            k: torch.cat([o.info[k].double().cpu() if k in o.info else torch.full((o.scores.shape[0],), float("nan"))
                          for o in outputs])
            for k in dict.fromkeys(k for o in outputs for k in o.info)
        }

        # every process sees every reward (in sample-id order), so advantages agree everywhere
        glob_scores, glob_valid, glob_info = self._gather(ids, scores, valid, info)
        if self.tracker is not None:
            all_prompts = [self.prompt_of(rollout, s) for s in range(self.rollout_size)]
            advantages = self.tracker.update(all_prompts, glob_scores, glob_valid)
        elif self.group_size > 1:
            groups = torch.arange(self.rollout_size) // self.group_size
            advantages = group_advantages(glob_scores, groups, glob_valid, global_std=getattr(m, "global_std", False))
        else:
            advantages = group_advantages(glob_scores, torch.zeros(self.rollout_size, dtype=torch.long), glob_valid,
                                          eps=_DDPO_EPS)
        metrics = reward_metrics(_Scored(glob_scores, glob_info), glob_valid)
        dropped = metrics["reward/dropped_fraction"]
        failed = not bool(glob_valid.any())
        if t.drop_invalid_samples and dropped > cfg.max_dropped_fraction:
            t.dropped_over_limit = dropped  # train() stops the run after this (skipped) step
            failed = True
        elif not t.drop_invalid_samples and dropped > 0:
            failed = True  # the reward's default (raise): a rollout with a failed score is skipped and counted
        metrics.update({
            "rollout": rollout,
            "rollout/stochastic_steps": len(steps),
            "rollout/first_stochastic_step": steps[0] if steps else -1,
            "rollout/advantage_abs_mean": float(advantages[glob_valid].abs().mean()) if bool(glob_valid.any()) else 0.0,
        })
        cat = torch.cat
        buffer = RolloutBuffer(
            index=rollout, steps=steps, sample_ids=ids.clone(), prompts=prompts,
            x_in=cat([tr.x_in for tr in trajectories]).cpu(), x_next=cat([tr.x_next for tr in trajectories]).cpu(),
            log_probs=cat([tr.log_probs for tr in trajectories]).cpu(), advantages=advantages[ids].clone(),
            means=cat([tr.means for tr in trajectories]).cpu() if self.keeps_means else None,
            x0=cat([tr.x0 for tr in trajectories]).cpu() if self.keeps_x0 else None,
            rewards=glob_scores.clone(), reward_valid=glob_valid.clone(), failed=failed, metrics=metrics,
            timing={"rollout/sampling_s": sampled - start, "rollout/reward_wait_s": waited,
                    "rollout/reward_busy_s": busy[0]},
        )
        return buffer

    def _gather(self, ids: Tensor, scores: Tensor, valid: Tensor, info: dict[str, Tensor]):
        """Rewards, validity and info of the whole rollout, indexed by sample id (all processes)."""
        t = self.trainer
        columns = [scores, valid.double(), *info.values()]
        local = torch.stack(columns, 1)
        if t.num_processes > 1:
            acc = t.accelerator
            gathered_ids = acc.gather(ids.to(acc.device)).cpu()
            gathered = acc.gather(local.to(acc.device)).cpu()
        else:
            gathered_ids, gathered = ids, local
        table = torch.empty(self.rollout_size, local.shape[1], dtype=torch.float64)
        table[gathered_ids] = gathered
        glob_info = {k: table[:, 2 + j] for j, k in enumerate(info)}
        return table[:, 0], table[:, 1].bool(), glob_info

    # ------------------------------------------------------------------ the training pass
    def _rows(self, rollout: int, epoch: int, minibatch: int, micro_batch: int) -> list[int]:
        """Local rows of a micro-batch: the first pass in rollout order, later passes reshuffled per process."""
        b, a = self.trainer.config.batch_size, self.micro_batches
        n = len(self.positions)
        order = torch.arange(n) if epoch == 0 else torch.randperm(
            n, generator=self._seed(rollout, _SHUFFLE, epoch, self.trainer.rank))
        start = minibatch * a * b + micro_batch * b
        return [int(r) for r in order[start : start + b]]

    def _slot_steps(self, rollout: int, epoch: int, sample: int) -> Tensor:
        """The positions (among the rollout's stochastic steps) a sample trains, in training order."""
        return torch.randperm(self.num_stochastic, generator=self._seed(rollout, _TIMESTEPS, epoch, sample))

    def _rollout_buffer(self, rollout: int, metrics: dict[str, float]):
        """The buffer of rollout ``rollout``, sampled on its first use (its timing then added to ``metrics``), with its
        metrics added to ``metrics``."""
        if self.buffer is None or self.buffer.index != rollout:
            self.buffer = self.collect(rollout)
            metrics.update(self.buffer.timing)
        metrics.update(self.buffer.metrics)
        return self.buffer

    def _conditioning(self, key: tuple, prompts: list[str]):
        # a trained text encoder must be run again for every backward pass
        if self.trainer.config.lora.text_encoder or key != self._cond_key:
            self._cond_key, self._cond = key, self.trainer.encode(prompts)
        return self._cond

    def loss(self, step: int, micro: int) -> tuple[Tensor, dict[str, float]]:
        t, m, model = self.trainer, self.method, self.trainer.model
        rollout, j = divmod(step, self.steps_per_rollout)
        epoch, minibatch = divmod(j, self.minibatches)
        micro_batch, slot = divmod(micro, self.trained_steps)
        metrics: dict[str, float] = {}
        buf = self._rollout_buffer(rollout, metrics)
        if buf.failed:
            return torch.tensor(float("nan")), metrics
        rows = self._rows(rollout, epoch, minibatch, micro_batch)
        ks = [int(self._slot_steps(rollout, epoch, int(buf.sample_ids[r]))[slot]) for r in rows]
        steps = [buf.steps[k] for k in ks]
        schedule = self.rollout_schedule(buf.steps)
        index = (torch.tensor(rows), torch.tensor(ks))
        device = model.device
        x_in, x_next = buf.x_in[index].to(device), buf.x_next[index].to(device)
        old = buf.log_probs[index].to(device)
        pc = self._conditioning((rollout, epoch, minibatch, micro_batch), [buf.prompts[r] for r in rows])
        std = torch.tensor([schedule.noise_stds[i] for i in steps], dtype=torch.float64, device=device)
        with t.accelerator.autocast():
            out = step_outputs(model.denoiser, schedule, steps, x_in, pc.cond, pc.uncond, t.guidance_scale, model.dtype)
            mean = transition_means(schedule, steps, x_in, out)
        new = per_dimension(gaussian_log_density(x_next, mean, std), x_next)
        log_ratio = new - old
        if m.ratio_norm:
            log_ratio = guard_log_ratio(log_ratio, mean, buf.means[index].to(device), std)
        advantages = buf.advantages[rows].to(device).clamp(-m.advantage_clip, m.advantage_clip)
        per_sample, ratio = clipped_surrogate(log_ratio, advantages, m.clip_range)
        if m.ratio_norm:
            dt = torch.tensor([schedule.sigmas[i] - schedule.next_sigmas[i] for i in steps], dtype=torch.float64,
                              device=device)
            per_sample = per_sample / dt
        if m.kl_weight > 0:
            with torch.no_grad(), adapters_disabled(model), t.accelerator.autocast():
                ref_out = step_outputs(model.denoiser, schedule, steps, x_in, pc.cond, pc.uncond, t.guidance_scale,
                                       model.dtype)
                ref_mean = transition_means(schedule, steps, x_in, ref_out)
            kl = per_dimension(gaussian_kl(mean, ref_mean, std), x_next)
            per_sample = per_sample + m.kl_weight * kl
            metrics["pg/kl"] = float(kl.detach().mean())
        deviation = (ratio.detach() - 1).abs()
        metrics.update({
            "pg/clip_fraction": float((deviation > m.clip_range).double().mean()),
            "pg/approx_kl": float(0.5 * ((new - old).detach() ** 2).mean()),
            "pg/ratio_mean": float(ratio.detach().mean()),
            "pg/ratio_max_deviation": float(deviation.max()),
        })
        return per_sample.mean().float(), metrics

    # ------------------------------------------------------------------ checkpoint state
    def state_dict(self) -> tuple[dict[str, Tensor], dict[str, Any]]:
        """The rollout in use (every process's rows, gathered: a collective every process joins) and the tracker."""
        tensors: dict[str, Tensor] = {}
        state: dict[str, Any] = {"buffer": None, "tracker": None}
        if self.buffer is not None and self.buffer.index * self.steps_per_rollout + self.steps_per_rollout > self.trainer.step:
            # a rollout still in use (a finished one is not needed to resume)
            tensors = {f"buffer.{k}": self._all_rows(v) if k in RolloutBuffer.ROWS else v
                       for k, v in self.buffer.tensors().items()}
            state["buffer"] = self.buffer.meta()
        if self.tracker is not None:
            state["tracker"] = self.tracker.state_dict()
        return tensors, state

    def _all_rows(self, local: Tensor) -> Tensor:
        """Every process's rows of a rollout tensor, in process order (all processes hold as many rows)."""
        acc = self.trainer.accelerator
        return acc.gather(local.to(acc.device)).cpu() if self.trainer.num_processes > 1 else local

    def load_state_dict(self, tensors: dict[str, Tensor], state: dict[str, Any]) -> None:
        if state.get("buffer") is not None:
            buffered = {k[len("buffer."):]: v for k, v in tensors.items() if k.startswith("buffer.")}
            meta = state["buffer"]
            index = int(meta["index"])
            # this process's rows of the checkpointed rollout, found by sample id, in the order collect() lays them out
            mine = [int(s) for s in self.sample_order(index)[self.positions]]
            row_of = {int(s): r for r, s in enumerate(buffered["sample_ids"])}
            if any(s not in row_of for s in mine):
                raise AlignError(
                    f"the checkpoint's rollout {index} holds {len(row_of)} of its {self.rollout_size} samples, not "
                    "this process's (a checkpoint written by a multi-process run before rollouts were gathered); "
                    "resume from a checkpoint at the end of a rollout"
                )
            rows = torch.tensor([row_of[s] for s in mine], dtype=torch.long)
            local = {k: v[rows] if k in RolloutBuffer.ROWS else v for k, v in buffered.items()}
            prompts = [self.prompt_of(index, s) for s in mine]
            self.buffer = RolloutBuffer.restore(local, {**meta, "prompts": prompts})
        if self.tracker is not None and state.get("tracker") is not None:
            self.tracker.load_state_dict(state["tracker"])


@dataclass
class _Scored:
    """The gathered rewards in the shape :func:`reward_metrics` reads."""

    scores: Tensor
    info: dict[str, Tensor]
