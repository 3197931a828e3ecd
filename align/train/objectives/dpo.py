"""The Diffusion-DPO objective: preference pairs, shared noise, and the DPO loss against the frozen model.

Pairs (winner, loser, caption) come from one of two sources:

* Offline (``data`` set): :func:`align.train.preference_data.iter_preference_pairs` streams the data set
  (ties dropped, winner first, bad rows an error naming the row or skipped and counted), each image
  prepared (resize, crop, flip) and encoded by the VAE, on the fly or once into the ``latent_cache``
  folder (then shuffled per epoch).  A micro-step takes the next batch_size x processes pairs in
  order (the last incomplete batch of an epoch is dropped, so every process has a full batch),
  each process its own batch_size of them; the data set is read again for the next epoch.  The
  position (epoch, batch) is checkpointed: a resumed run reads on from the same pair.
* Online (``data`` unset): the model's own samples, collected by the policy-gradient objective's
  rollout machinery (same layout, seeds and reward worker; the method's deterministic sampler with
  its CFG), ``group_size`` per prompt, scored by the run's reward (black-box allowed), and paired
  within each group (:func:`align.train.preference_data.pairs_from_rewards`).  The clean latents
  are gathered from every process, so every process holds every pair.  One rollout serves one
  optimiser step: its pairs in micro-batches of batch_size x processes (the last one filled by
  starting over from the first pair; a rollout without a pair is a skipped step).

A micro-step noises the winner and the loser with the same level and the same noise (seeded by
the pair), runs the trained model on both (one batch) and the reference under no_grad, and
returns :func:`align.train.dpo.dpo_loss`.  The reference is the model with its LoRA disabled; with
full fine-tuning it is a frozen copy of the denoiser's weights swapped in for its forward pass
(memory: one more copy of the trained weights, e.g. 3.4 GB for SD 1.5's UNet in fp32; under FSDP it
is sharded like them, each process keeping its shard).  The copy is taken when the trainer is set up,
from the model as loaded, before a resume loads the trained weights: a resumed run's reference is
the original model, as in the uninterrupted run (the copy is not checkpointed).  SDXL pairs carry
each image's original size and crop as its added time ids.

Every process makes the same sequence of denoiser calls (FSDP's all-gathers are collectives): an
offline micro-step is one global batch of batch_size x processes pairs (incomplete ones dropped), so
every process has batch_size pairs and the same number of micro-steps per epoch; an online rollout
gives every process the same number of samples (its size must divide into batch_size x processes
when there are several) and every process pairs the gathered rollout, so all agree on the number of
micro-steps.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from contextlib import contextmanager
from itertools import islice
from typing import Any

import torch
from torch import Tensor

from align.core.errors import AlignError, ConfigError
from align.core.lora import adapters_disabled
from align.core.sampling import randn
from align.train.dpo import denoising_target, dpo_loss, noised_pairs, sample_training_levels, sdxl_time_ids
from align.train.objectives.policy_gradient import PolicyGradientObjective, RolloutBuffer
from align.train.preference_data import (
    ImagePreparation,
    LatentCache,
    LatentPairBatch,
    PreferenceCounts,
    encode_pairs,
    iter_preference_pairs,
    pairs_from_rewards,
)
from align.train.seeds import seeded

#: seed parts of the DPO draws (after the run seed)
_DPO_SEED, _LEVELS, _NOISE, _EMPTY, _EPOCH = 0xD90, 1, 2, 3, 4


class DiffusionDPOObjective(PolicyGradientObjective):
    """Diffusion-DPO on the trainer's loop; see the module docstring."""

    keeps_x0 = True

    def __init__(self, trainer):  # noqa: D107 - the pair source, the reference
        super(PolicyGradientObjective, self).__init__(trainer)
        t, m, cfg, model = trainer, trainer.method, trainer.config, trainer.model
        self.method = m
        self.beta = m.beta_for(model.family)
        self.weighting = m.timestep_weighting_for(model.family)
        self.training_scheduler = model.make_scheduler(m.sampler)
        schedule = model.schedule(m.num_steps, sampler=m.sampler, eta=m.eta, height=t.height, width=t.width)
        if not cfg.lora.enabled:
            self._refuse_sharded_copy("the frozen reference")
        # the frozen reference of full fine-tuning (LoRA: the adapters switched off, no copy); this process's shards
        # under FSDP. Taken from the model as loaded, before any resume, so it stays the original model
        self.frozen = None if cfg.lora.enabled else [p.detach().clone() for p in t.params]
        self.resolution = m.resolution or t.height
        self.counts = PreferenceCounts()
        self.epoch = self.index = self.consumed = 0
        self._batches: Iterator[LatentPairBatch] | None = None
        self.cache: LatentCache | None = None
        if m.online:
            rollout_size, per_chunk = m.group_size * m.rollout_prompts, cfg.batch_size * t.num_processes
            if t.num_processes > 1 and rollout_size % per_chunk:
                # uneven shares would gather latents of different sizes and, sharded, make different numbers of
                # (collective) denoiser calls
                raise ConfigError(
                    f"{m.name}: an online rollout of {rollout_size} samples (group_size x rollout_prompts) does not "
                    f"split evenly over batch_size x processes = {cfg.batch_size} x {t.num_processes}; choose sizes "
                    f"whose product divides {rollout_size}"
                )
            # one optimiser step per rollout; its micro-steps depend on how many pairs the rollout makes
            self._init_clean_rollouts(schedule, rollout_size, m.group_size, 1, 1)
            self.pairs: tuple[Tensor, Tensor] | None = None
            self.x0_all: Tensor | None = None
        else:
            self.schedule = schedule
            self._prepare = ImagePreparation(self.resolution, m.random_crop, m.hflip, seed=cfg.seed)
            if m.latent_cache is not None:
                self.cache = LatentCache.build_or_load(
                    m.latent_cache, self._fingerprint(), lambda: encode_pairs(self._pairs(), self._prepare, self._encode),
                    counts=self.counts,
                )
                self.counts = self.cache.counts
                if len(self.cache) < cfg.batch_size * t.num_processes:
                    raise AlignError(f"{m.name}: {m.data} has {len(self.cache)} usable pairs ({self.counts.summary()}); "
                                     f"a micro-step needs batch_size x processes = {cfg.batch_size * t.num_processes}")
            else:
                next(iter(self._pairs()), None)  # checks the columns (and the first rows) now, not mid-run
                self.counts = PreferenceCounts()

    def describe(self) -> str:
        m, cfg, t = self.method, self.trainer.config, self.trainer
        if m.online:
            source = (f"online pairs ({m.pairing}) from rollouts of {self.rollout_size} samples "
                      f"({m.rollout_prompts} prompts x {m.group_size}), {m.num_steps} {self.schedule.kind} steps")
        else:
            cached = f", latent cache {m.latent_cache} ({len(self.cache)} pairs)" if self.cache is not None else ""
            source = f"pairs from {m.data}{cached}"
        noisiest = f" (the noisiest {m.noisiest_fraction:.0%})" if m.noisiest_fraction < 1 else ""
        return (f"{m.name}: {source}; beta {self.beta:g}, {self.weighting} timesteps{noisiest}; micro-batches of "
                f"{cfg.batch_size} x {t.num_processes} pairs; reference: "
                f"{'the LoRA disabled' if self.frozen is None else 'a frozen copy of the trained weights'}")

    # ------------------------------------------------------------------ offline pairs
    def _pairs(self):
        m = self.method
        return iter_preference_pairs(m.data, split=m.data_split, columns=m.columns, on_bad_row=m.on_bad_row,
                                     counts=self.counts)

    def _encode(self, images: Tensor) -> Tensor:
        model = self.trainer.model
        with torch.no_grad():
            return model.encode_images(images.to(model.device)).float().cpu()

    def _fingerprint(self) -> dict[str, Any]:
        m, model = self.method, self.trainer.model
        return {"data": str(m.data), "split": m.data_split, "columns": list(m.columns.required),
                "on_bad_row": m.on_bad_row, "resolution": self.resolution, "random_crop": m.random_crop,
                "hflip": m.hflip, "seed": self.trainer.config.seed, "family": model.family,
                "vae": type(model.pipe.vae).__name__, "latent_channels": model.latent_channels}

    def _epoch_batches(self, epoch: int) -> Iterator[LatentPairBatch]:
        """This process's share of each global micro-batch of ``epoch`` (incomplete last batches dropped)."""
        t, b = self.trainer, self.trainer.config.batch_size
        size = b * t.num_processes
        mine = torch.arange(t.rank * b, (t.rank + 1) * b)
        if self.cache is not None:
            for batch in self.cache.iter_batches(size, generator=self._dpo_seed(_EPOCH, epoch)):
                if len(batch) == size:
                    yield batch.select(mine)
            return
        self.counts = PreferenceCounts()  # counted afresh each pass
        pairs = iter(self._pairs())
        while len(chunk := list(islice(pairs, size))) == size:
            yield next(encode_pairs(chunk[t.rank * b : (t.rank + 1) * b], self._prepare, self._encode, batch_size=b))

    def _next_offline(self) -> LatentPairBatch:
        if self._batches is None:  # first use, or after a resume: read on from the checkpointed position
            self._batches = islice(self._epoch_batches(self.epoch), self.index, None)
        batch = next(self._batches, None)
        if batch is None:
            if self.index == 0:
                raise AlignError(
                    f"{self.method.name}: {self.method.data} has fewer usable pairs than one micro-step needs "
                    f"(batch_size x processes = {self.trainer.config.batch_size * self.trainer.num_processes}): "
                    f"{self.counts.summary()}"
                )
            self.epoch, self.index = self.epoch + 1, 0
            self._batches = self._epoch_batches(self.epoch)
            batch = next(self._batches)
        self.index += 1
        return batch

    # ------------------------------------------------------------------ online pairs
    def collect(self, rollout: int) -> RolloutBuffer:
        """Sample and score a rollout, gather its clean latents from every process, and pair them."""
        t, m = self.trainer, self.method
        buffer = super().collect(rollout)
        x0 = buffer.x0
        if t.num_processes > 1:
            ids = t.accelerator.gather(buffer.sample_ids.to(t.accelerator.device)).cpu()
            gathered = t.accelerator.gather(x0.to(t.accelerator.device)).cpu()
        else:
            ids, gathered = buffer.sample_ids, x0
        self.x0_all = torch.empty_like(gathered)
        self.x0_all[ids] = gathered
        groups = torch.arange(self.rollout_size) // self.group_size
        self.pairs = pairs_from_rewards(buffer.rewards, groups, pairing=m.pairing, valid=buffer.reward_valid,
                                        min_margin=m.min_reward_margin)
        buffer.metrics["dpo/pairs"] = int(self.pairs[0].numel())
        if not self.pairs[0].numel():
            buffer.failed = True  # no two samples of a group differ: nothing to prefer
        return buffer

    def _online(self, step: int) -> RolloutBuffer:
        # one optimiser step per rollout: a checkpoint never falls inside one, so nothing is restored mid-rollout
        if self.buffer is None or self.buffer.index != step:
            self.buffer = self.collect(step)
        return self.buffer

    def micro_steps(self, step: int) -> int:
        if not self.method.online:
            return self.trainer.config.gradient_accumulation_steps
        buf = self._online(step)
        per_micro = self.trainer.config.batch_size * self.trainer.num_processes
        return 1 if buf.failed else math.ceil(int(self.pairs[0].numel()) / per_micro)

    def _online_batch(self, step: int, micro: int) -> tuple[Tensor, Tensor, list[str], Tensor]:
        t, b = self.trainer, self.trainer.config.batch_size
        winners, losers = self.pairs
        n = winners.numel()
        slots = torch.arange(b) + micro * b * t.num_processes + t.rank * b
        picked = slots % n  # the last micro-batch starts over from the first pair
        w, l_ = winners[picked], losers[picked]
        prompts = [self.prompt_of(step, int(s)) for s in w]
        return self.x0_all[w], self.x0_all[l_], prompts, slots

    # ------------------------------------------------------------------ the loss
    def _dpo_seed(self, *parts: int) -> torch.Generator:
        return seeded(self.trainer.config.seed, _DPO_SEED, *parts)

    @contextmanager
    def _reference(self):
        if self.frozen is None:
            with adapters_disabled(self.trainer.model):
                yield
        else:
            with self.trainer.swapped(self.frozen):
                yield

    def loss(self, step: int, micro: int) -> tuple[Tensor, dict[str, float]]:
        t, m, model = self.trainer, self.method, self.trainer.model
        metrics: dict[str, float] = {}
        time_ids = None
        if m.online:
            buf = self._online(step)
            metrics.update(buf.metrics)
            if micro == 0:
                metrics.update(buf.timing)
            if buf.failed:
                return torch.tensor(float("nan")), metrics
            x0_w, x0_l, captions, slots = self._online_batch(step, micro)
            key = step
        else:
            batch = self._next_offline()
            x0_w, x0_l, captions = batch.winners, batch.losers, list(batch.captions)
            slots = torch.arange(len(captions)) + t.rank * len(captions)
            key = self.consumed
            self.consumed += 1
            if model.family == "sdxl":
                target = (self.resolution, self.resolution)
                time_ids = torch.cat([sdxl_time_ids(batch.winner_original_sizes, batch.winner_crops, target),
                                      sdxl_time_ids(batch.loser_original_sizes, batch.loser_crops, target)])
            metrics.update({"dpo/epoch": self.epoch, "data/pairs": self.counts.pairs, "data/ties": self.counts.ties,
                            "data/skipped_rows": self.counts.skipped})
        device = model.device
        gens = [self._dpo_seed(key, micro, int(s)) for s in slots]
        # one level, one noise and one empty-caption draw per pair, seeded by the pair's slot
        levels = [sample_training_levels(self.training_scheduler, 1, g, self.weighting, m.noisiest_fraction)
                  for g in gens]
        timesteps = torch.cat([lv.timesteps for lv in levels]).to(device)
        alpha = torch.cat([lv.alphas for lv in levels]).to(device)
        sigma = torch.cat([lv.sigmas for lv in levels]).to(device)
        noise = torch.cat([randn((1, *x0_w.shape[1:]), g, device) for g in gens])
        captions = ["" if float(torch.rand((), generator=g)) < m.empty_prompt_fraction else c
                    for g, c in zip(gens, captions)]
        x0_w, x0_l = x0_w.to(device).float(), x0_l.to(device).float()
        x_t = noised_pairs(x0_w.double(), x0_l.double(), noise.double(), alpha, sigma).float()
        both = torch.cat([alpha, alpha]), torch.cat([sigma, sigma])
        target = denoising_target(torch.cat([x0_w, x0_l]), torch.cat([noise, noise]), *both, self.schedule.prediction_type)
        with torch.set_grad_enabled(t.config.lora.text_encoder and torch.is_grad_enabled()):
            pc = model.encode_prompts(captions, guidance=False, height=t.height, width=t.width,
                                      max_sequence_length=t.config.max_sequence_length)
        cond = {k: torch.cat([v, v]) for k, v in pc.cond.items()}
        if time_ids is not None:
            cond["time_ids"] = time_ids.to(device=device, dtype=cond["time_ids"].dtype)
        steps_in = torch.cat([timesteps, timesteps])
        inp = x_t.to(model.dtype)
        with torch.no_grad(), t.accelerator.autocast(), self._reference():
            reference = model.denoiser(inp, steps_in, cond)
        with t.accelerator.autocast():
            trained = model.denoiser(inp, steps_in, cond)
        result = dpo_loss(trained.float(), reference.float(), target.float(), self.beta)
        metrics.update({
            "dpo/implicit_accuracy": result.implicit_accuracy,
            "dpo/model_margin": float((result.model_loser - result.model_winner).detach().mean()),
            "dpo/reference_margin": float((result.reference_loser - result.reference_winner).mean()),
        })
        return result.loss.mean(), metrics

    # ------------------------------------------------------------------ checkpoint state
    def state_dict(self) -> tuple[dict[str, Tensor], dict[str, Any]]:
        if self.method.online:
            tensors, state = super().state_dict()
        else:
            tensors, state = {}, {"epoch": self.epoch, "index": self.index, "consumed": self.consumed}
        return tensors, state  # the frozen reference is the loaded model's weights: rebuilt, not checkpointed

    def load_state_dict(self, tensors: dict[str, Tensor], state: dict[str, Any]) -> None:
        if self.method.online:
            super().load_state_dict(tensors, state)
        elif "epoch" in state:
            self.epoch, self.index, self.consumed = int(state["epoch"]), int(state["index"]), int(state["consumed"])
            self._batches = None
