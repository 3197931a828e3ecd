"""Fine-tuning toward a reward on accelerate: one loop for every method.

The same loop runs on one CPU, one GPU, or many GPUs and nodes (``accelerate launch``).  Each
trainer step is one optimiser step; how its micro-steps turn into losses is the method family's
*objective* (:mod:`align.train.objectives`): reward backpropagation samples a batch with gradients
on the method's truncation window, decodes, scores and minimises the shaped reward loss (DRaFT,
DRaFT-LV, AlignProp, ReFL); policy gradient trains a PPO-clipped surrogate over stored rollouts
of a stochastic sampler, scored by any reward, differentiable or not (DDPO, GRPO).  The loop,
optimiser, learning-rate schedule, mixed precision, EMA, checkpoints, exact resume, metrics,
sample grids and the held-out monitor are the same for all.

Reproducibility: every sample's prompt and noise come from a seed derived from the run seed and
the sample's global index, so a run resumed from a checkpoint, or split over processes, draws
exactly what an uninterrupted single-process run draws; an objective's state (a rollout buffer,
running statistics) travels in the checkpoint.  Gradients of the trainable parameters are
averaged across processes by one flat all-reduce (LoRA weights are small), so no DDP wrapper has
to see the many model calls of a sampling chain.  Full fine-tuning over several processes can
shard the denoiser instead (``sharding``: FSDP2 over its blocks, or DeepSpeed ZeRO-2/3, whose engine
the trainer drives; :mod:`align.train.sharding`): gradient synchronisation is then the shards' reduce-
scatter, checkpoints gather the full weights once on the main process, and every process makes
the same sequence of denoiser calls.  A process that dies or hangs makes the others stop with an
error after ``distributed_timeout_s`` instead of waiting forever.
"""

from __future__ import annotations

import json
import logging
import math
import resource
import time
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import torch
from torch import Tensor
from tqdm.auto import tqdm

from align.core.config import save_config, to_dict
from align.core.errors import AlignError, ConfigError, RewardError, check_choice, check_device, check_range
from align.core.lora import LoRAConfig, add_lora, save_lora, trainable_parameters
from align.core.paths import check_output_dir
from align.train.checkpoint import (
    CheckpointManager,
    atomic_directory,
    atomic_write_text,
    rng_state,
    set_rng_state,
)
from align.train.methods import (
    METHODS,
    AlignPropConfig,
    DDPOConfig,
    DiffusionDPOConfig,
    DiffusionNFTConfig,
    DraftConfig,
    DraftLVConfig,
    GRPOConfig,
    MethodConfig,
    ReFLConfig,
)
from align.train.nft import soft_update_
from align.train.objectives import Objective, make_objective
from align.train.sharding import (
    SHARDING,
    check_deepspeed_config,
    check_deepspeed_ema,
    check_zero3_init,
    clip_grad_norm,
    deepspeed_backward,
    deepspeed_full_optimizer_state,
    deepspeed_full_weights,
    discard_gradients,
    engine_config,
    fsdp_settings,
    full_model_state,
    full_optimizer_state,
    gather_copy,
    is_distributed_failure,
    load_copy_,
    load_deepspeed_config,
    load_deepspeed_state,
    load_full_state,
    prepare_deepspeed,
    reshard,
    resolve_sharding,
    save_full_denoiser,
    shard_denoiser,
)

logger = logging.getLogger("align")

LR_SCHEDULES = ("constant", "linear", "cosine")
#: accelerate's mixed-precision names -> the dtype of the frozen weights
PRECISION_DTYPES = {"no": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
MIXED_PRECISION = ("auto", *PRECISION_DTYPES)


@dataclass
class TrainConfig:
    """Configuration of ``align train``.

    Attributes:
        model: 'builtin' (the tiny shapes model shipped with the package), a local diffusers folder, or a hub id.
        method: reward backpropagation: draft (DRaFT / DRaFT-K), draft_lv (DRaFT-LV), alignprop (AlignProp), refl
            (ReFL); policy gradient, for any reward including black-box ones: ddpo (DDPO), grpo (Flow-GRPO, -Fast,
            GRPO-Guard, DanceGRPO, MixGRPO); forward-process RL, any reward: diffusion_nft (DiffusionNFT);
            preference optimisation from a preference data set or from pairs ranked by any reward:
            diffusion_dpo (Diffusion-DPO).
        draft: settings of the draft method.
        draft_lv: settings of the draft_lv method.
        alignprop: settings of the alignprop method.
        refl: settings of the refl method.
        ddpo: settings of the ddpo method.
        grpo: settings of the grpo method.
        diffusion_nft: settings of the diffusion_nft method.
        diffusion_dpo: settings of the diffusion_dpo method.
        reward: a reward name (see `align eval --list-rewards`), or {name: weight, ...} for a weighted sum. Reward
            backpropagation needs a differentiable reward; ddpo and grpo take any.
        prompts: a named prompt set (shapes, simple_animals), a text file with one prompt per line, or a list.
        negative_prompt: negative prompt for classifier-free guidance.
        lora: LoRA adapter settings.
        output_dir: run folder: LoRA, checkpoints, metrics.jsonl, sample grids, config.yaml.
        seed: run seed; every sample's prompt and noise derive from it.
        max_steps: optimiser steps.
        batch_size: images per process per micro-step (ddpo, grpo: also the chunk a rollout is sampled in).
        gradient_accumulation_steps: micro-steps per optimiser step (ddpo, grpo: micro-batches of batch_size samples,
            each trained at every trained step: an optimiser step trains batch_size x gradient_accumulation_steps x
            processes samples of the current rollout).
        lr_schedule: constant, linear (decay to 0) or cosine; it advances once per optimiser step (skipped steps
            included), whatever the number of processes.
        lr_warmup_steps: linear warm-up steps.
        mixed_precision: auto, no, fp16 or bf16 (frozen weights in that dtype, except modules their library keeps in
            fp32; LoRA weights stay fp32; fp16 uses loss scaling). auto: bf16 on a CUDA device that supports it, fp16
            on other CUDA devices, no on the CPU (the dtype rule of every command).
        upcast_vae: always decode in fp32 with autocast off (false: only where diffusers does, when the weights are
            fp16 and the VAE's config sets force_upcast, as SDXL's VAE does).
        gradient_checkpointing: checkpoint every grad-enabled model call and the VAE decoder.
        ema_decay: exponential moving average of the trained weights (0 disables); the saved LoRA uses the EMA.
        height: image height in pixels (default: the model's native size).
        width: image width in pixels (default: the model's native size).
        max_sequence_length: text length for T5-based models (SD3, FLUX); default: the pipeline's.
        checkpoint_every: save a resumable checkpoint every N steps (0: only at the end).
        keep_checkpoints: how many recent checkpoints to keep.
        sample_every: save a grid of samples (fixed prompts and seeds) every N steps (0: only before and after).
        num_samples: images in each sample grid.
        resume: 'latest' or a checkpoint folder to resume from (None: start fresh; refuses a non-empty run folder).
        device: auto, cpu, cuda or cuda:N.
        offline: only use local files (default: the HF_HUB_OFFLINE environment variable).
        allow_pickle: allow loading pickle checkpoints (unsafe with untrusted files).
        report_to: extra trackers through accelerate (tensorboard, wandb) when installed.
        max_nonfinite_steps: stop (with a checkpoint) after this many consecutive steps with a non-finite loss or gradient.
        model_recommendations: apply the settings the model recommends for training (its diffusion_align.json;
            the built-in model's lr 3e-3, 20 steps, CFG 4; for ddpo / grpo lr 1e-2, 8 CFG-free rollout steps, 16
            samples per rollout in one optimiser step of 8 x 2) to the fields you did not set; each is printed at start.
        max_dropped_fraction: with a reward in on_invalid='drop' mode, the largest fraction of a micro-batch's samples
            its transient faults (timeouts, unavailable service, non-finite scores) may drop; a micro-batch that
            loses more skips its step and stops the run with a checkpoint. In [0, 1] (1: never stop for drops).
        monitor_rewards: held-out rewards to evaluate during training ({name: weight} or a name); None disables.
        monitor_prompts: held-out prompts for the monitor (default: the training prompts).
        monitor_every: evaluate the monitor every N steps (0 disables).
        monitor_patience: stop early after this many monitor evaluations in a row in which the training reward
            rose while the held-out reward fell below its best by more than monitor_tolerance (0: never stop).
        monitor_tolerance: allowed drop of the held-out reward below its best before it counts as divergence.
        sharding: how full fine-tuning (lora.enabled=false) splits the denoiser over processes: auto (what the
            accelerate launch config says: FSDP or DeepSpeed, else none), none (every process holds the whole
            model; gradients averaged by one all-reduce), fsdp (FSDP2: each block's weights, gradients and Adam
            state sharded over the processes, fp32 master weights, compute in the mixed-precision dtype; bf16 or
            no, not fp16), deepspeed (DeepSpeed ZeRO-2 or ZeRO-3, from an accelerate DeepSpeed launch config or
            deepspeed_config: fp32 master weights, gradients and Adam state partitioned over the processes, and
            under ZeRO-3 the weights too; bf16 or no, not fp16; EMA under ZeRO-2 only; not DiffusionNFT or
            Diffusion-DPO). Under fsdp every method trains and the weight copies (EMA, DiffusionNFT's old policy,
            Diffusion-DPO's frozen reference) are sharded like the weights. LoRA runs always take the unsharded
            path. See examples/accelerate/.
        deepspeed_config: a DeepSpeed JSON file or an accelerate DeepSpeed YAML (its deepspeed_config section) for a
            run not launched by accelerate's DeepSpeed launcher (torchrun, plain accelerate launch); implies
            sharding=deepspeed. ZeRO stage 2 or 3; the trainer fills in the micro-batch (batch_size), clipping
            (the method's max_grad_norm), bf16 (mixed_precision) and accumulation (it accumulates itself: 1).
        distributed_timeout_s: seconds a collective (gradient reduction, a shard's all-gather, the barrier around a
            checkpoint) may wait for the other processes before the run stops with an error: a process that died or
            hangs ends the run instead of blocking the others forever. Must exceed the longest step and checkpoint.
    """

    model: str = "builtin"
    method: str = "draft"
    draft: DraftConfig = field(default_factory=DraftConfig)
    draft_lv: DraftLVConfig = field(default_factory=DraftLVConfig)
    alignprop: AlignPropConfig = field(default_factory=AlignPropConfig)
    refl: ReFLConfig = field(default_factory=ReFLConfig)
    ddpo: DDPOConfig = field(default_factory=DDPOConfig)
    grpo: GRPOConfig = field(default_factory=GRPOConfig)
    diffusion_nft: DiffusionNFTConfig = field(default_factory=DiffusionNFTConfig)
    diffusion_dpo: DiffusionDPOConfig = field(default_factory=DiffusionDPOConfig)
    reward: str | dict[str, Any] = "brightness"
    prompts: str | list[str] = "shapes"
    negative_prompt: str = ""
    lora: LoRAConfig = field(default_factory=LoRAConfig)
    output_dir: str = "runs/train"
    seed: int = 0
    max_steps: int = 100
    batch_size: int = 2
    gradient_accumulation_steps: int = 1
    lr_schedule: str = "constant"
    lr_warmup_steps: int = 0
    mixed_precision: str = "auto"
    upcast_vae: bool = False
    gradient_checkpointing: bool = True
    ema_decay: float = 0.0
    height: int | None = None
    width: int | None = None
    max_sequence_length: int | None = None
    checkpoint_every: int = 50
    keep_checkpoints: int = 3
    sample_every: int = 50
    num_samples: int = 8
    resume: str | None = None
    device: str = "auto"
    offline: bool | None = None
    allow_pickle: bool = False
    report_to: list[str] = field(default_factory=list)
    max_nonfinite_steps: int = 5
    model_recommendations: bool = True
    max_dropped_fraction: float = 0.5
    monitor_rewards: str | dict[str, Any] | None = None
    monitor_prompts: str | list[str] | None = None
    monitor_every: int = 0
    monitor_patience: int = 0
    monitor_tolerance: float = 0.0
    sharding: str = "auto"
    deepspeed_config: str | None = None
    distributed_timeout_s: float = 1800.0

    #: the fields holding one method's settings each (model recommendations resolve ``method.`` keys against them)
    method_sections: ClassVar[tuple[str, ...]] = tuple(METHODS)

    def __post_init__(self) -> None:
        check_choice("method", self.method, METHODS)
        check_range("seed", self.seed, 0, 2**63 - 1, integer=True)
        check_range("max_steps", self.max_steps, 1, None, integer=True)
        check_range("batch_size", self.batch_size, 1, None, integer=True)
        check_range("gradient_accumulation_steps", self.gradient_accumulation_steps, 1, None, integer=True)
        check_choice("lr_schedule", self.lr_schedule, LR_SCHEDULES)
        check_range("lr_warmup_steps", self.lr_warmup_steps, 0, None, integer=True)
        check_choice("mixed_precision", self.mixed_precision, MIXED_PRECISION)
        check_range("ema_decay", self.ema_decay, 0.0, 1.0, high_inclusive=False)
        for name in ("height", "width", "max_sequence_length"):
            if getattr(self, name) is not None:
                check_range(name, getattr(self, name), 1, None, integer=True)
        check_range("checkpoint_every", self.checkpoint_every, 0, None, integer=True)
        check_range("keep_checkpoints", self.keep_checkpoints, 1, None, integer=True)
        check_range("sample_every", self.sample_every, 0, None, integer=True)
        check_range("num_samples", self.num_samples, 1, 256, integer=True)
        check_range("max_nonfinite_steps", self.max_nonfinite_steps, 1, None, integer=True)
        check_range("max_dropped_fraction", self.max_dropped_fraction, 0.0, 1.0)
        check_range("monitor_every", self.monitor_every, 0, None, integer=True)
        check_range("monitor_patience", self.monitor_patience, 0, None, integer=True)
        check_range("monitor_tolerance", self.monitor_tolerance, 0.0, None)
        check_device("device", self.device)
        check_choice("sharding", self.sharding, SHARDING)
        check_range("distributed_timeout_s", self.distributed_timeout_s, 0.0, None, low_inclusive=False)
        if self.sharding in ("fsdp", "deepspeed") and self.lora.enabled:
            raise ConfigError(
                f"sharding={self.sharding!r} shards full fine-tuning; LoRA weights are small and always train "
                "unsharded (one all-reduce of their gradients). Set lora.enabled=false, or sharding=auto"
            )
        deepspeed = self.sharding == "deepspeed" or self.deepspeed_config is not None
        if (self.sharding == "fsdp" or deepspeed) and self.mixed_precision == "fp16":
            raise ConfigError(
                f"sharding={'deepspeed' if deepspeed else 'fsdp'!r} with mixed_precision='fp16': fp16 needs a loss "
                "scaler over sharded gradients, which the trainer does not run; accepted: bf16 (fp32 master weights, "
                "bf16 compute) or no"
            )
        if self.deepspeed_config is not None:
            if self.lora.enabled:
                raise ConfigError("deepspeed_config shards full fine-tuning; LoRA always trains unsharded. Set "
                                  "lora.enabled=false, or drop deepspeed_config")
            if self.sharding not in ("auto", "deepspeed"):
                raise ConfigError(f"sharding={self.sharding!r} with deepspeed_config set; accepted: 'auto' or 'deepspeed'")
            stage = check_deepspeed_config(load_deepspeed_config(self.deepspeed_config),
                                           max_grad_norm=self.method_config.max_grad_norm)
            check_deepspeed_ema(stage, self.ema_decay)
        check_output_dir("output_dir", self.output_dir)
        if self.method_config.kl_weight > 0 and not self.lora.enabled:
            raise ConfigError(
                f"{self.method}.kl_weight={self.method_config.kl_weight} needs LoRA (the frozen model is the "
                "adapter switched off); set lora.enabled=true or kl_weight=0"
            )

    @property
    def method_config(self) -> MethodConfig:
        return getattr(self, self.method)


def resolve_mixed_precision(mixed_precision: str, device: str) -> str:
    """accelerate's precision name for ``mixed_precision``; "auto" follows the dtype rule of every command
    (:func:`align.core.models.resolve_dtype`)."""
    if mixed_precision != "auto":
        return mixed_precision
    from align.core.models import resolve_dtype

    dtype = resolve_dtype("auto", device)
    return next(name for name, d in PRECISION_DTYPES.items() if d == dtype)


def _peak_memory_mb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0  # Linux: KiB


def _lr_lambda(schedule: str, warmup: int, total: int):
    def factor(step: int) -> float:
        if warmup and step < warmup:
            return (step + 1) / warmup
        if schedule == "constant":
            return 1.0
        progress = min(1.0, (step - warmup) / max(1, total - warmup))
        if schedule == "linear":
            return 1.0 - progress
        return 0.5 * (1.0 + math.cos(math.pi * progress))

    return factor


@dataclass
class TrainResult:
    """Where a finished run wrote its outputs and its headline figures."""

    output_dir: Path
    lora_dir: Path | None
    steps: int
    skipped_steps: int
    first_reward: float | None
    last_reward: float | None
    stopped_early: str | None = None
    already_finished: bool = False


class Trainer:
    """Fine-tuning of one model with one method and reward (any method: the objective differs).

    ``model`` and ``reward`` may be given pre-built (tests, notebooks); otherwise they are loaded
    from the config.  ``progress``: show a progress bar (a string: the bar's description).  Call
    :meth:`train`.
    """

    #: the dropped fraction of the samples that passed max_dropped_fraction (set by the objective)
    dropped_over_limit: float | None = None
    #: how the method turns a micro-step into a loss (set up by :meth:`setup`)
    objective: Objective

    def __init__(self, config: TrainConfig, *, model=None, reward=None, accelerator=None, progress: bool | str = True):
        self.config = config
        self.method = config.method_config
        self._given_model = model
        self._given_reward = reward
        self._accelerator = accelerator
        self.progress = progress
        self.output_dir = Path(config.output_dir)
        self._setup_done = False

    # ------------------------------------------------------------------ set-up
    def setup(self) -> None:
        if self._setup_done:
            return
        from accelerate import Accelerator
        from accelerate.utils import InitProcessGroupKwargs, set_seed

        cfg = self.config
        if self._accelerator is None:
            from accelerate.state import AcceleratorState

            # AcceleratorState is process-global: let a second Trainer in the same process (a
            # notebook, a test) choose another precision; the distributed state is kept.
            AcceleratorState._reset_state(reset_partial_state=False)
            trackers = [t for t in cfg.report_to if _tracker_available(t)]
            self._accelerator = Accelerator(
                mixed_precision=resolve_mixed_precision(cfg.mixed_precision, cfg.device),
                cpu=cfg.device == "cpu",
                log_with=trackers or None,
                project_dir=str(self.output_dir),
                # every collective (gloo, NCCL) waits at most this long for a dead or hung process
                kwargs_handlers=[InitProcessGroupKwargs(timeout=timedelta(seconds=cfg.distributed_timeout_s))],
            )
        acc = self.accelerator = self._accelerator
        set_seed(cfg.seed, device_specific=False)
        self.is_main = acc.is_main_process
        self.num_processes = acc.num_processes
        self.rank = acc.process_index
        self.sharding = resolve_sharding(cfg.sharding, acc.distributed_type.name, self.num_processes, cfg.lora.enabled,
                                         deepspeed_config=cfg.deepspeed_config is not None)
        if self.sharding != "none" and acc.mixed_precision == "fp16":
            raise ConfigError(
                f"sharding={self.sharding!r} with mixed_precision='fp16' (from the accelerate config or auto); "
                "accepted: bf16 (fp32 master weights, bf16 compute) or no"
            )

        if cfg.resume is None and (self.output_dir / "checkpoints").is_dir():
            if CheckpointManager(self.output_dir).complete():
                raise AlignError(
                    f"output_dir={str(self.output_dir)!r} already holds checkpoints; pass resume=latest to continue "
                    "that run, or choose another output_dir"
                )

        # the frozen weights take the dtype autocast computes in; add_lora then adds fp32 LoRA weights
        weight_dtype = PRECISION_DTYPES[acc.mixed_precision]
        device = acc.device if cfg.device in ("auto", "cpu") else torch.device(cfg.device)
        if self._given_model is not None:
            self.model = self._given_model
            self.model.upcast_vae = cfg.upcast_vae
            self.model.cast(weight_dtype)
            self.model.pipe.to(device)
        else:
            from align.core.models import load_model

            self.model = load_model(
                cfg.model, dtype=weight_dtype, device=device, offline=cfg.offline, allow_pickle=cfg.allow_pickle,
                upcast_vae=cfg.upcast_vae,
            )
        model = self.model
        cfg = self._apply_model_recommendations()
        model.distilled_guidance = self.method.distilled_guidance
        # the classifier-free guidance scale actually sampled with (1 for a guidance-distilled model
        # unless the method asks for true CFG)
        self.guidance_scale = model.cfg_scale(self.method.guidance_scale, true_cfg=self.method.true_cfg)
        self.params = add_lora(model, cfg.lora)
        if not cfg.lora.enabled and self.sharding == "none" and weight_dtype != torch.float32:
            # FSDP and DeepSpeed keep fp32 master weights; the unsharded path steps the weights in their own dtype
            logger.warning(
                "full fine-tuning without sharding steps the denoiser's %s weights directly (no fp32 master copy): "
                "an update smaller than 2^-8 of a weight is rounded away. For fp32 weights set mixed_precision=no; "
                "FSDP / DeepSpeed runs keep fp32 master weights", str(weight_dtype).removeprefix("torch.")
            )
        if cfg.gradient_checkpointing is False and hasattr(model.module, "disable_gradient_checkpointing"):
            model.module.disable_gradient_checkpointing()
        self.param_names = _named_trainable(model)
        if self.sharding == "fsdp":
            units = shard_denoiser(model.module, fsdp_settings(acc, weight_dtype))
            self.params = [p for p in model.module.parameters() if p.requires_grad]  # the sharded ones
            logger.info("FSDP2: the denoiser is sharded over %d processes in %d units", self.num_processes, units)

        from rewards import build_reward

        self.reward = self._given_reward if self._given_reward is not None else build_reward(cfg.reward)
        self.reward.to(device)
        # The trainer decides what a failed or non-finite score does: with the reward's default
        # (raise) the whole step is skipped and counted; with on_invalid="drop" only the bad
        # samples are left out of the loss.
        self.drop_invalid_samples = getattr(self.reward, "on_invalid", "raise") == "drop"
        if hasattr(self.reward, "on_invalid"):
            self.reward.on_invalid = "drop"
        self.monitor = build_reward(cfg.monitor_rewards) if cfg.monitor_rewards is not None else None

        from align.core.prompts import load_prompts

        self.prompts = load_prompts(cfg.prompts)
        self.monitor_prompts = load_prompts(cfg.monitor_prompts) if cfg.monitor_prompts is not None else self.prompts
        self.height, self.width = (cfg.height, cfg.width) if cfg.height and cfg.width else model.default_resolution()
        if (cfg.height is None) != (cfg.width is None):
            native = model.default_resolution()
            self.height, self.width = cfg.height or native[0], cfg.width or native[1]
        model.check_resolution(self.height, self.width)
        self.objective = make_objective(self)
        describe = getattr(self.objective, "describe", None)
        if describe is not None:
            logger.info(describe())
            if self.progress and self.is_main:
                tqdm.write(describe())

        self.optimizer = torch.optim.AdamW(
            self.params, lr=self.method.learning_rate, weight_decay=self.method.weight_decay
        )
        self.lr_scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, _lr_lambda(cfg.lr_schedule, cfg.lr_warmup_steps, cfg.max_steps)
        )
        # The scheduler is not prepared: accelerate's AcceleratedScheduler steps it num_processes times
        # per call (it assumes the per-process batch, not the global one, defines a step) and not at all
        # after a skipped fp16 step.  Here it steps exactly once per optimiser step, on every process.
        self.engine = None
        if self.sharding == "none":
            self.optimizer = acc.prepare(self.optimizer)
        elif self.sharding == "deepspeed":
            if cfg.deepspeed_config is None:  # an accelerate DeepSpeed launch
                plugin = acc.state.deepspeed_plugin
                check_zero3_init(getattr(plugin, "zero3_init_flag", False))
                ds_config = plugin.deepspeed_config
            else:
                ds_config = load_deepspeed_config(cfg.deepspeed_config)
            ds_config = engine_config(ds_config, batch_size=cfg.batch_size, max_grad_norm=self.method.max_grad_norm,
                                      bf16=acc.mixed_precision == "bf16")
            check_deepspeed_ema(ds_config["zero_optimization"]["stage"], cfg.ema_decay)
            self.engine = prepare_deepspeed(model.module, self.optimizer, ds_config, cfg.distributed_timeout_s)
            logger.info("DeepSpeed ZeRO-%d over %d processes", self.engine.zero_optimization_stage(), self.num_processes)
        # the EMA is kept in fp32 whatever the weights' dtype: a bf16 EMA would round away each step's (1 - decay)
        # share of the change (bf16 resolves 2^-8 relative)
        self.ema = [p.detach().float().clone() for p in self.params] if cfg.ema_decay > 0 else None
        self.checkpoints = CheckpointManager(self.output_dir, keep=cfg.keep_checkpoints)
        self.step = 0
        self.skipped = 0
        self.consecutive_bad = 0
        self.monitor_best: float | None = None
        self.monitor_strikes = 0
        self.last_train_reward: float | None = None
        self._setup_done = True

    def _apply_model_recommendations(self) -> TrainConfig:
        """Fill the fields the user left unset with the model's recommended training settings (printed)."""
        from align.core.model_notes import apply_recommended

        notes = self.model.notes
        config, applied = apply_recommended(self.config, notes, "train")
        if applied:
            self.config, self.method = config, config.method_config
            message = (
                f"using {notes.name}'s recommended settings: {', '.join(applied)} (set these fields to choose "
                "others; model_recommendations=false ignores them)"
            )
            logger.info(message)
            if self.progress and self.is_main:
                tqdm.write(message)
        return self.config

    @property
    def schedule(self):
        """The method's sampling schedule (the objective's)."""
        return self.objective.schedule

    # ------------------------------------------------------------------ shared by the objectives
    def encode(self, prompts: Sequence[str]):
        """Encode a batch of prompts (with the negative prompt for CFG); with gradients when the text encoder trains."""
        guidance = self.guidance_scale != 1.0
        neg = self.config.negative_prompt or None
        with torch.set_grad_enabled(self.config.lora.text_encoder and torch.is_grad_enabled()):
            return self.model.encode_prompts(
                prompts, guidance=guidance, negative_prompt=neg, height=self.height, width=self.width,
                max_sequence_length=self.config.max_sequence_length,
            )

    # ------------------------------------------------------------------ one optimiser step
    def _all_reduce_grads(self) -> None:
        if self.num_processes == 1 or self.sharding != "none":
            return  # a sharded run's gradients were reduce-scattered in the backward pass
        grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in self.params]
        flat = torch.cat([g.reshape(-1).float() for g in grads])
        flat = self.accelerator.reduce(flat, reduction="mean")
        offset = 0
        for p, g in zip(self.params, grads):
            n = g.numel()
            p.grad = flat[offset : offset + n].view_as(g).to(g.dtype)
            offset += n

    def _any_process(self, flag: bool) -> bool:
        if self.num_processes == 1:
            return flag
        t = torch.tensor([1.0 if flag else 0.0], device=self.accelerator.device)
        return bool(self.accelerator.reduce(t, reduction="sum").item() > 0)

    def train_step(self) -> dict[str, float]:
        """One optimiser step (with accumulation); returns its metrics."""
        cfg, acc = self.config, self.accelerator
        start = time.perf_counter()
        if acc.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(acc.device)
        step = self.step
        if self.engine is None:
            self.optimizer.zero_grad(set_to_none=True)
        agg: dict[str, list[float]] = {}
        bad = False
        losses = []
        micro_steps = self.objective.micro_steps(step)
        for micro in range(micro_steps):
            loss, metrics = self.objective.loss(step, micro)
            for k, v in metrics.items():
                agg.setdefault(k, []).append(v)
            finite = bool(torch.isfinite(loss.detach()))
            if self._any_process(not finite):
                bad = True
                break
            if self.engine is not None:  # DeepSpeed reduces the gradients at the last micro-step
                self.engine.set_gradient_accumulation_boundary(micro == micro_steps - 1)
                deepspeed_backward(self.engine, loss / micro_steps)
            else:
                acc.backward(loss / micro_steps)
            losses.append(float(loss.detach()))
        grad_norm = float("nan")
        skipped = bad
        if bad:
            if self.engine is not None and losses:
                discard_gradients(self.engine)  # those of the micro-steps before the bad one
        elif self.engine is not None:
            # ZeRO clips at max_grad_norm, and skips a step whose gradient norm is not finite (dropping its gradients)
            self.engine.step()  # ZeRO-2 then copies the new master weights into the module's (whole) weights
            grad_norm = float(self.engine.get_global_grad_norm())
            skipped = not self.engine.was_step_applied()
        else:
            self._all_reduce_grads()
            max_norm = self.method.max_grad_norm or float("inf")
            if self.sharding == "fsdp":
                grad_norm = clip_grad_norm(self.params, max_norm)
            else:
                grad_norm = float(acc.clip_grad_norm_(self.params, max_norm))
            if not math.isfinite(grad_norm) and cfg.mixed_precision != "fp16":
                skipped = True
            else:
                # under fp16 the loss scaler skips steps with inf/nan gradients itself
                self.optimizer.step()
                skipped = bool(getattr(self.optimizer, "step_was_skipped", False))
        if not skipped and self.ema is not None:
            with torch.no_grad():
                soft_update_(self.ema, [p.detach() for p in self.params], cfg.ema_decay)
        if self.engine is None:
            self.optimizer.zero_grad(set_to_none=True)
        lr = float(self.lr_scheduler.get_last_lr()[0])  # the rate this step used
        with warnings.catch_warnings():
            # the schedule counts optimiser steps, skipped ones too (deliberately); torch warns when
            # the first of them was skipped, as if the order of the two calls were wrong
            warnings.filterwarnings("ignore", message=r"Detected call of `lr_scheduler.step\(\)` before")
            self.lr_scheduler.step()
        if skipped:
            self.skipped += 1
            self.consecutive_bad += 1
        else:
            self.consecutive_bad = 0
        self.step += 1
        out = {k: float(np.mean(v)) for k, v in agg.items()}
        out.update(
            step=self.step,
            loss=float(np.mean(losses)) if losses else float("nan"),
            grad_norm=grad_norm,
            lr=lr,
            step_time_s=time.perf_counter() - start,
            peak_memory_mb=_peak_memory_mb(acc.device),
            skipped=int(skipped),
            skipped_total=self.skipped,
        )
        return out

    # ------------------------------------------------------------------ checkpoints
    def _trainable_state(self) -> dict[str, Tensor]:
        """{name: full weight} of the trainable parameters; sharded ones are gathered (a collective: every
        process calls it; the full weights land on the main process only)."""
        if self.sharding == "fsdp":
            full = full_model_state(self.model.module)
            return {f"denoiser.{k}": v for k, v in full.items() if f"denoiser.{k}" in self._trainable_names}
        if self.sharding == "deepspeed":
            return deepspeed_full_weights(self.param_names, self.params, self.is_main)
        return {name: p.detach() for name, p in zip(self.param_names, self.params)}

    def _full_optimizer_state(self) -> dict[str, Any] | None:
        """The sharded optimiser's full state keyed by parameter name on the main process (None elsewhere); a
        collective."""
        if self.sharding == "fsdp":
            return full_optimizer_state(self.model.module, self.optimizer)
        return deepspeed_full_optimizer_state(self.engine, self.param_names, self.params, self.is_main)

    @property
    def sharded(self) -> bool:
        """Whether the denoiser is sharded over the processes (FSDP or DeepSpeed): its weights and optimiser state
        are gathered for a checkpoint and set from one on resume by collectives, and under FSDP and ZeRO-3 every
        process must make the same sequence of denoiser calls (a shard's all-gather is a collective)."""
        return self.sharding != "none"

    @property
    def _trainable_names(self) -> set[str]:
        return set(self.param_names)

    def _weight_copies(self) -> dict[str, list[Tensor]]:
        """The copies of the trained weights a checkpoint holds, by key prefix: the EMA ("ema") and the objective's
        (DiffusionNFT's old policy: "objective.old"); one tensor per trainable parameter, sharded like it under FSDP."""
        copies = {"ema": self.ema} if self.ema is not None else {}
        copies.update({f"objective.{k}": v for k, v in self.objective.weight_copies().items()})
        return copies

    def _copies_state(self) -> dict[str, Tensor]:
        """{"<prefix>.<name>": full weight} of every weight copy on the main process; gathered from the shards under
        FSDP (a collective every process joins)."""
        state: dict[str, Tensor] = {}
        for prefix, copy in self._weight_copies().items():
            full = gather_copy(self.param_names, copy, self.is_main)
            state.update({f"{prefix}.{name}": w for name, w in full.items()})
        return state

    def save_checkpoint(self) -> Path | None:
        """Write a resumable checkpoint of the current step (main process only; all processes wait).

        Under sharding every process first takes part in gathering the full weights, the weight copies (EMA,
        DiffusionNFT's old policy) and the optimiser state (onto the main process, on the CPU); with several
        processes each also gives its rows of a rollout in use (the objective's state); only the main process
        writes.
        """
        path = None
        sharded = self.sharded
        trainable = self._trainable_state()
        copies = self._copies_state()
        optimizer = self._full_optimizer_state() if sharded else None
        objective_tensors, objective_state = self.objective.state_dict()  # a collective (a rollout's rows gathered)
        if self.is_main:
            extra = dict(copies)
            extra.update({f"reward.{k}": v for k, v in _reward_state(self.reward).items()})
            extra.update({f"objective.{k}": v for k, v in objective_tensors.items()})
            path = self.checkpoints.save(
                self.step,
                trainable,
                optimizer=optimizer if sharded else self.optimizer.state_dict(),
                lr_scheduler=self.lr_scheduler.state_dict(),
                rng=rng_state(),
                extra=extra,
                state={
                    "skipped": self.skipped,
                    "consecutive_bad": self.consecutive_bad,
                    "monitor_best": self.monitor_best,
                    "monitor_strikes": self.monitor_strikes,
                    "method": self.config.method,
                    "model": self.config.model,
                    "objective": objective_state,
                    "sharding": self.sharding,
                },
            )
        self.accelerator.wait_for_everyone()
        return path

    def resume(self, which: str = "latest") -> int:
        """Restore weights, optimiser, scheduler, RNG and counters; returns the step resumed at."""
        if self.is_main:
            self.checkpoints.clean_partial()
        self.accelerator.wait_for_everyone()
        sharded = self.sharded
        # under sharding only the main process reads the full weights and optimiser state; it sends each
        # process its shards (one full copy in CPU memory, not one per process)
        copies = self._weight_copies()
        ckpt = self.checkpoints.load(None if which == "latest" else which, weights=self.is_main or not sharded,
                                     copies=tuple(f"{prefix}." for prefix in copies))
        missing = set(self.param_names) - set(ckpt.trainable) if (self.is_main or not sharded) else set()
        if (self._any_process(bool(missing)) if sharded else missing):
            if not missing:
                raise AlignError(f"checkpoint {str(ckpt.path)!r} does not match this model (the main process says why)")
            raise AlignError(
                f"checkpoint {str(ckpt.path)!r} does not match this model's trainable weights (missing "
                f"{sorted(missing)[0]!r}...); resume with the same model, method and lora settings"
            )
        saved_sharding = ckpt.state.get("sharding", "none")
        if saved_sharding != self.sharding:
            raise AlignError(
                f"checkpoint {str(ckpt.path)!r} was written with sharding={saved_sharding!r} and this run uses "
                f"sharding={self.sharding!r}: their optimiser states are laid out differently; resume with the same "
                "sharding"
            )
        if self.sharding == "fsdp":
            prefix = "denoiser."
            load_full_state(
                self.model.module, self.optimizer,
                {k[len(prefix):]: v for k, v in ckpt.trainable.items() if k.startswith(prefix)}, ckpt.optimizer,
            )
        elif self.sharding == "deepspeed":
            load_deepspeed_state(self.engine, self.param_names, self.params, ckpt.trainable, ckpt.optimizer)
        with torch.no_grad():
            if not sharded:
                for name, p in zip(self.param_names, self.params):
                    p.copy_(ckpt.trainable[name].to(p.device, p.dtype))
        for prefix, copy in copies.items():  # sharded: the main process's full copy, into each process's shard or copy
            for name, w in zip(self.param_names, copy):
                if f"{prefix}.{name}" in ckpt.extra_keys:
                    load_copy_(w, ckpt.extra.get(f"{prefix}.{name}"), replicated=self.sharding == "deepspeed")
        reward_state = {k[len("reward.") :]: v for k, v in ckpt.extra.items() if k.startswith("reward.")}
        if reward_state:
            self.reward.load_state_dict(reward_state, strict=False)
        objective_tensors = {k[len("objective.") :]: v for k, v in ckpt.extra.items() if k.startswith("objective.")}
        self.objective.load_state_dict(objective_tensors, ckpt.state.get("objective") or {})
        if ckpt.optimizer is not None and not sharded:
            self.optimizer.load_state_dict(ckpt.optimizer)
        if ckpt.lr_scheduler is not None:
            self.lr_scheduler.load_state_dict(ckpt.lr_scheduler)
        if ckpt.rng is not None:
            set_rng_state(ckpt.rng)
        self.step = ckpt.step
        self.skipped = int(ckpt.state.get("skipped", 0))
        self.consecutive_bad = int(ckpt.state.get("consecutive_bad", 0))
        self.monitor_best = ckpt.state.get("monitor_best")
        self.monitor_strikes = int(ckpt.state.get("monitor_strikes", 0))
        return self.step

    def save_lora(self, directory: Path | None = None) -> Path | None:
        """Save the (EMA, when enabled) LoRA in diffusers' format, atomically; main process only.

        With full fine-tuning (lora.enabled=false) the whole denoiser is saved with save_pretrained.
        """
        # a LoRA goes to lora/; full fine-tuning saves the whole denoiser (unet/ or transformer/)
        default = "lora" if self.config.lora.enabled else ("transformer" if self.model.is_flow else "unet")
        target = Path(directory) if directory is not None else self.output_dir / default
        path = None
        if self.sharded:
            with self.swapped(self.ema):  # collectives; the weights land on the main process
                if self.sharding == "fsdp":
                    full = full_model_state(self.model.module)
                elif self.ema is not None:  # ZeRO-2: the EMA is whole on every process
                    full = {n.removeprefix("denoiser."): e.detach().cpu() for n, e in zip(self.param_names, self.ema)}
                else:  # the fp32 master weights
                    full = {k.removeprefix("denoiser."): v for k, v in self._trainable_state().items()}
            if self.is_main:
                path = atomic_directory(target, lambda tmp: save_full_denoiser(self.model.module, full, tmp))
        elif self.is_main:
            with self.swapped(self.ema):
                if self.config.lora.enabled:
                    path = atomic_directory(target, lambda tmp: save_lora(self.model, tmp))
                else:
                    path = atomic_directory(
                        target, lambda tmp: self.model.module.save_pretrained(tmp, safe_serialization=True)
                    )
        self.accelerator.wait_for_everyone()
        return path

    def swapped(self, weights: list[Tensor] | None) -> _swapped:
        """Context manager: ``weights``, a copy of the trainable parameters (the EMA, DiffusionNFT's old policy,
        Diffusion-DPO's frozen reference; sharded like them under FSDP), loaded into them for its duration."""
        return _swapped(self.params, weights, self.model.module if self.sharding == "fsdp" else None)

    # ------------------------------------------------------------------ evaluation
    def evaluation_images(self, prompts: Sequence[str], seeds: Sequence[int]) -> Tensor:
        from align.steer.generate import generate

        with self.swapped(self.ema):
            return generate(
                self.model, prompts, seeds, guidance_scale=self.guidance_scale, height=self.height, width=self.width,
                negative_prompt=self.config.negative_prompt or None, max_sequence_length=self.config.max_sequence_length,
                **self.method.evaluation_sampling(self.model.is_flow),
            )

    def _sample_grid(self, tag: str) -> dict[str, float]:
        """Sample grid for fixed prompts and seeds; returns the training reward of those images."""
        from align.core.images import save_png

        n = self.config.num_samples
        prompts = [self.prompts[i % len(self.prompts)] for i in range(n)]
        seeds = [10_000 + i for i in range(n)]
        images = self.evaluation_images(prompts, seeds)
        if self.is_main:
            save_png(images, self.output_dir / "samples" / f"{tag}.png", scale=max(1, 256 // images.shape[-1]))
        self.reward.eval()
        with torch.no_grad():
            scores = self.reward.score(images, prompts)
        return {"eval_reward_mean": float(scores.scores[scores.valid].mean())}

    def _monitor(self) -> dict[str, float]:
        """Held-out rewards on held-out prompts beside the training reward; early-stop bookkeeping."""
        cfg = self.config
        n = max(cfg.num_samples, 4)
        prompts = [self.monitor_prompts[i % len(self.monitor_prompts)] for i in range(n)]
        images = self.evaluation_images(prompts, [20_000 + i for i in range(n)])
        self.reward.eval()
        self.monitor.eval()
        with torch.no_grad():
            train = self.reward.score(images, prompts)
            held = self.monitor.score(images, prompts)
        out = {
            "monitor/train_reward": float(train.scores[train.valid].mean()),
            "monitor/heldout_reward": float(held.scores[held.valid].mean()),
        }
        for k, v in held.info.items():
            out[f"monitor/{k}"] = float(v.float().mean())
        heldout, train_r = out["monitor/heldout_reward"], out["monitor/train_reward"]
        if self.monitor_best is None or heldout > self.monitor_best:
            self.monitor_best = heldout
        rising = self.last_train_reward is None or train_r >= self.last_train_reward
        if heldout < self.monitor_best - cfg.monitor_tolerance and rising:
            self.monitor_strikes += 1
        else:
            self.monitor_strikes = 0
        self.last_train_reward = train_r
        return out

    # ------------------------------------------------------------------ the loop
    @property
    def _samples_here(self) -> bool:
        """Whether this process samples the grids: the main one; every one under sharding (FSDP and ZeRO-3's
        denoiser runs only when all processes call it; only the main one writes)."""
        return self.is_main or self.sharded

    def _log(self, metrics: dict[str, float]) -> None:
        if self.is_main:
            with open(self.output_dir / "metrics.jsonl", "a", encoding="utf-8") as fh:
                fh.write(json.dumps(metrics) + "\n")
        if self.accelerator.trackers:
            self.accelerator.log(metrics, step=int(metrics.get("step", self.step)))

    def _truncate_metrics(self, step: int) -> None:
        """On resume, drop metric lines after the checkpoint's step (they will be written again)."""
        path = self.output_dir / "metrics.jsonl"
        if not self.is_main or not path.is_file():
            return
        kept = [line for line in path.read_text().splitlines() if line.strip() and json.loads(line).get("step", 0) <= step]
        atomic_write_text(path, "".join(line + "\n" for line in kept))

    def _logged_first_reward(self) -> float | None:
        """The run's first held-out reward (step 0 of metrics.jsonl), for a resumed run's before/after figure."""
        path = self.output_dir / "metrics.jsonl"
        if not path.is_file():
            return None
        for line in path.read_text().splitlines():
            record = json.loads(line) if line.strip() else {}
            if record.get("step") == 0 and "eval_reward_mean" in record:
                return float(record["eval_reward_mean"])
        return None

    def _finished_result(self, step: int) -> TrainResult:
        """Resuming a run that already reached max_steps: nothing is trained, sampled, logged or saved again."""
        summary = _read_json(self.output_dir / "summary.json") or {}
        lora_dir = summary.get("lora_dir")
        message = (
            f"the run in {str(self.output_dir)!r} already finished at step {step} (max_steps={self.config.max_steps}); "
            "nothing to do. Raise max_steps to train it further."
        )
        logger.info(message)
        return TrainResult(
            self.output_dir, Path(lora_dir) if lora_dir else None, step, self.skipped,
            summary.get("first_eval_reward", self._logged_first_reward()), summary.get("last_eval_reward"),
            summary.get("stopped_early"), already_finished=True,
        )

    def train(self) -> TrainResult:
        """Run (or resume) the training loop to ``max_steps``.

        Over several processes, a collective that fails (another process died, or did not answer within
        ``distributed_timeout_s``) stops this process with an :class:`AlignError` saying so.
        """
        try:
            return self._train()
        except Exception as exc:
            if getattr(self, "num_processes", 1) > 1 and is_distributed_failure(exc):
                raise AlignError(
                    f"process {self.rank} of {self.num_processes} stopped at step {getattr(self, 'step', 0)}: a collective with the "
                    f"other processes failed ({_first_line(exc)}); another process died, or did not answer within "
                    f"distributed_timeout_s={self.config.distributed_timeout_s:g} s (its own log says why). Resume "
                    "from the last checkpoint with resume=latest."
                ) from exc
            raise

    def _train(self) -> TrainResult:
        self.setup()
        cfg = self.config
        if self.is_main:
            self.output_dir.mkdir(parents=True, exist_ok=True)
            save_config(cfg, self.output_dir / "config.yaml")
        first_reward = None
        if cfg.resume:
            start = self.resume(cfg.resume)
            if start >= cfg.max_steps:
                return self._finished_result(start)
            self._truncate_metrics(start)
            first_reward = self._logged_first_reward()
        if self.accelerator.log_with:
            self.accelerator.init_trackers("diffusion-align", config=_flat(to_dict(cfg)))
        if self.step == 0 and self._samples_here:
            first = self._sample_grid("step-00000000")
            first_reward = first["eval_reward_mean"]
            self._log({"step": 0, **first})
        stopped = None
        bar = tqdm(
            total=cfg.max_steps, initial=self.step, disable=not (self.progress and self.is_main),
            desc=self.progress if isinstance(self.progress, str) else f"{cfg.method} training",
            dynamic_ncols=True,
        )
        last_reward = None
        while self.step < cfg.max_steps:
            metrics = self.train_step()
            bar.update(1)
            bar.set_postfix(reward=f"{metrics.get('reward_mean', float('nan')):.4f}", loss=f"{metrics['loss']:.4f}")
            if self._any_process(self.dropped_over_limit is not None):
                self._log(metrics)
                path = self.save_checkpoint()
                dropped = ("a batch's samples on another process" if self.dropped_over_limit is None
                           else f"{self.dropped_over_limit:.0%} of a batch's samples")
                raise RewardError(
                    f"stopping at step {self.step}: reward {self.reward.name!r} dropped {dropped}, more than "
                    f"max_dropped_fraction={cfg.max_dropped_fraction} (its warnings above say why: timeouts, "
                    f"an unavailable service, non-finite scores); the step was skipped and the weights of the last "
                    f"step within the limit are saved in {str(path)!r}. Fix the reward's service, or raise "
                    "max_dropped_fraction to train through more drops."
                )
            if self.consecutive_bad >= cfg.max_nonfinite_steps:
                self._log(metrics)
                path = self.save_checkpoint()
                raise AlignError(
                    f"stopping at step {self.step}: {self.consecutive_bad} consecutive steps had a non-finite loss or "
                    f"gradient, or a failed reward (max_nonfinite_steps={cfg.max_nonfinite_steps}; reward errors are "
                    f"logged above); the weights of the last good step are saved in {str(path)!r}. Lower the learning "
                    "rate, use bf16 instead of fp16, or check the reward."
                )
            if cfg.sample_every and self.step % cfg.sample_every == 0 and self.step < cfg.max_steps and self._samples_here:
                metrics.update(self._sample_grid(f"step-{self.step:08d}"))
            if self.monitor is not None and cfg.monitor_every and self.step % cfg.monitor_every == 0:
                metrics.update(self._monitor())
                metrics["monitor/strikes"] = self.monitor_strikes
            self._log(metrics)
            if cfg.checkpoint_every and self.step % cfg.checkpoint_every == 0 and self.step < cfg.max_steps:
                self.save_checkpoint()
            if cfg.monitor_patience and self.monitor_strikes >= cfg.monitor_patience:
                stopped = (
                    f"held-out reward fell below its best ({self.monitor_best:.4f}) by more than "
                    f"{cfg.monitor_tolerance} for {self.monitor_strikes} evaluations while the training reward rose"
                )
                break
        bar.close()
        if self._samples_here:
            final = self._sample_grid(f"step-{self.step:08d}")
            last_reward = final["eval_reward_mean"]
            self._log({"step": self.step, **final})
        self.save_checkpoint()
        lora_dir = self.save_lora()
        result = TrainResult(self.output_dir, lora_dir, self.step, self.skipped, first_reward, last_reward, stopped)
        if self.is_main:
            summary = {
                "steps": self.step, "skipped_steps": self.skipped, "first_eval_reward": first_reward,
                "last_eval_reward": last_reward, "stopped_early": stopped, "lora_dir": str(lora_dir) if lora_dir else None,
            }
            atomic_write_text(self.output_dir / "summary.json", json.dumps(summary, indent=2))
        if self.accelerator.trackers:
            self.accelerator.end_training()
        return result


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0][:300] if text else type(exc).__name__


def _read_json(path: Path) -> dict[str, Any] | None:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


class _swapped:
    """Context manager: temporarily load a copy of the weights (EMA, old policy, frozen reference) into the parameters
    (no-op for None).  ``sharded_module``: the FSDP-sharded module of the parameters, resharded after each copy so
    its next forward gathers the swapped shards (see :func:`align.train.sharding.reshard`)."""

    def __init__(self, params: list[torch.nn.Parameter], weights: list[Tensor] | None,
                 sharded_module: torch.nn.Module | None = None):
        self.params, self.weights, self.module, self.saved = params, weights, sharded_module, None

    def _load(self, weights: list[Tensor]) -> None:
        with torch.no_grad():
            for p, w in zip(self.params, weights, strict=True):
                p.copy_(w)
        if self.module is not None:
            reshard(self.module)

    def __enter__(self):
        if self.weights is not None:
            self.saved = [p.detach().clone() for p in self.params]
            self._load(self.weights)

    def __exit__(self, *exc):
        if self.saved is not None:
            self._load(self.saved)
            self.saved = None


def _reward_state(reward) -> dict[str, Tensor]:
    """The reward's buffers (e.g. running normalisation statistics), not its frozen model weights."""
    params = {name for name, _ in reward.named_parameters()}
    return {k: v for k, v in reward.state_dict().items() if k not in params}


def _named_trainable(model) -> list[str]:
    from align.core.lora import text_encoders

    names = [f"denoiser.{n}" for n, p in model.module.named_parameters() if p.requires_grad]
    for i, enc in enumerate(text_encoders(model.pipe)):
        names += [f"text_encoder{i}.{n}" for n, p in enc.named_parameters() if p.requires_grad]
    if len(names) != len(trainable_parameters(model)):
        raise RuntimeError("trainable parameter names and parameters disagree")
    return names


def _tracker_available(name: str) -> bool:
    import importlib.util

    module = {"tensorboard": "tensorboard", "wandb": "wandb"}.get(name)
    if module is None:
        raise ConfigError(f"report_to contains {name!r}; accepted: 'tensorboard', 'wandb'")
    if importlib.util.find_spec(module) is None:
        import warnings

        warnings.warn(f"report_to={name!r} is not installed (pip install diffusion-align[tracking]); skipping it", stacklevel=2)
        return False
    return True


def _flat(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(_flat(v, key + "."))
        elif isinstance(v, (list, tuple)):
            out[key] = ",".join(map(str, v))
        else:
            out[key] = v
    return out
