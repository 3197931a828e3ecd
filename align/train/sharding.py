"""Sharded full fine-tuning: the denoiser's weights, gradients and optimiser state split over processes.

LoRA runs keep the trainer's light path (every process holds the model, one flat all-reduce of the
adapter gradients per step).  Full fine-tuning of large denoisers (SDXL, SD3.5, FLUX) shards the
denoiser with FSDP2 (``torch.distributed.fsdp.fully_shard``, the API accelerate's FSDP2 plugin
calls): each of its blocks is one unit whose parameters are all-gathered just before the block runs
and freed after it, gradients are reduce-scattered (averaged) in the backward pass, and every
process keeps only its shard of the fp32 master weights, gradients and Adam moments.  The frozen
parts (VAE, text encoders, reward models) are not sharded and stay in the run's weight dtype.

Why the trainer applies FSDP2 itself instead of ``accelerator.prepare(model)``: accelerate 1.15
enables FSDP only for GPU-like distributed types (not for CPU / gloo runs), and its FSDP2 prepare
wraps a model's own ``forward``; the trainer calls the denoiser many times per step through the
sampling chain and needs one code path that runs (and is tested) on the CPU as on GPUs.  A run
launched with an accelerate FSDP config (``distributed_type: FSDP``, ``fsdp_version: 2``) takes
its ``fsdp_reshard_after_forward`` and ``fsdp_offload_params`` from that config.

FSDP requires every process to make the same sequence of forward calls on the sharded denoiser
(each unit's all-gather is a collective).  The trainer guarantees it: the backprop objective draws
one truncation plan per micro-batch from a seed shared by all processes; the policy-gradient
objective gives every process the same number of rollout rows (the rollout size must divide into
batch_size x gradient_accumulation_steps x processes), hence the same number of chunks, sampling
steps and trained steps; DiffusionNFT's rollouts are laid out the same way (the rollout size must
divide into batch_size x processes x optimizer_steps_per_rollout) and every micro-step runs the old
and the trained weights on batch_size rows; Diffusion-DPO's offline micro-steps take batch_size pairs
per process from one global batch (incomplete ones dropped), its online rollouts split evenly (the
rollout size must divide into batch_size x processes) and every process pairs the gathered rollout,
so all run the same number of micro-steps; a non-finite loss on any process skips the step on all of
them; sample grids and the monitor run on every process (only the main one writes).

Copies of the trained weights (the EMA, DiffusionNFT's old policy, Diffusion-DPO's frozen reference)
are sharded like the parameters (clones of their DTensor shards); swapping one in reshards the units
(:func:`reshard`), checkpoints gather them whole onto the main process (:func:`gather_copy`) and
resume splits them back (:func:`load_copy_`).

DeepSpeed ZeRO-2/3 launch configs are recognised and checked (:func:`check_deepspeed_config`), but
training under them is refused for now (:func:`prepare_deepspeed` says why); FSDP2 shards the same state.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from align.core.errors import ConfigError

logger = logging.getLogger("align")

#: the values of TrainConfig.sharding
SHARDING = ("auto", "none", "fsdp", "deepspeed")
#: ModuleList attributes whose elements are FSDP units: diffusers UNets' down/up blocks with their resnets and
#: attention transformers (and those transformers' blocks), SD3 / FLUX transformer blocks
UNIT_LISTS = ("down_blocks", "up_blocks", "resnets", "attentions", "transformer_blocks", "single_transformer_blocks")
#: single-module attributes that are FSDP units (the UNet's middle block)
UNIT_ATTRIBUTES = ("mid_block",)
#: accelerate's name of the distributed type -> the sharding it launches
LAUNCHED_SHARDING = {"FSDP": "fsdp", "DEEPSPEED": "deepspeed"}


@dataclass(frozen=True)
class FSDPSettings:
    """What :func:`shard_denoiser` needs: the compute dtype and accelerate's FSDP options."""

    param_dtype: torch.dtype = torch.float32
    reshard_after_forward: bool = True
    offload_params: bool = False


def resolve_sharding(requested: str, distributed_type: str, num_processes: int, lora_enabled: bool) -> str:
    """The sharding a run uses: 'none', 'fsdp' or 'deepspeed'.

    ``requested`` is TrainConfig.sharding; ``distributed_type`` is accelerate's (``"FSDP"``,
    ``"DEEPSPEED"``, ``"MULTI_GPU"``, ``"MULTI_CPU"``, ``"NO"``...).  'auto' follows the accelerate
    launch config; LoRA always takes the light path (and refuses an FSDP / DeepSpeed launch).  FSDP
    over one process has nothing to shard and runs the plain path.
    """
    launched = LAUNCHED_SHARDING.get(distributed_type, "none")
    if lora_enabled and launched != "none":
        # accelerate's FSDP2 / DeepSpeed prepare wants the model with the optimiser; LoRA keeps its light path
        raise ConfigError(
            f"a LoRA run launched with an accelerate {distributed_type} config: LoRA trains unsharded (every process "
            "holds the model; one all-reduce of the adapter gradients); launch it with a plain multi-GPU config "
            "(accelerate launch -m align train ...), or set lora.enabled=false to shard full fine-tuning"
        )
    if requested == "auto":
        requested = launched
    if requested == "deepspeed" and launched != "deepspeed":
        raise ConfigError(
            f"sharding='deepspeed' needs a run launched with an accelerate DeepSpeed config (accelerate launch "
            f"--config_file examples/accelerate/deepspeed_zero2_1node_8gpu.yaml ...); this run's accelerate "
            f"distributed type is {distributed_type!r}. Accepted here: 'auto', 'none', 'fsdp'"
        )
    if requested != launched and launched != "none":
        raise ConfigError(
            f"sharding={requested!r} but the run was launched with an accelerate {distributed_type} config; "
            f"set sharding='auto' (or {launched!r}), or launch with a plain multi-GPU config"
        )
    if requested == "fsdp" and num_processes == 1:
        logger.info("sharding='fsdp' with one process: nothing to shard, the denoiser is trained unsharded")
        return "none"
    return requested


def fsdp_settings(accelerator, param_dtype: torch.dtype) -> FSDPSettings:
    """FSDP options from the accelerate launch config when it is an FSDP one (FSDP2 only), else the defaults."""
    plugin = getattr(accelerator.state, "fsdp_plugin", None)
    if plugin is None:
        return FSDPSettings(param_dtype=param_dtype)
    if getattr(plugin, "fsdp_version", 1) != 2:
        raise ConfigError(
            f"the accelerate FSDP config sets fsdp_version={plugin.fsdp_version}; accepted: 2 (FSDP2, fully_shard: "
            "the sampling chain calls the denoiser's blocks many times per step, which FSDP1's flat parameters "
            "do not support without a wrapper forward). See examples/accelerate/fsdp2_1node_8gpu.yaml"
        )
    reshard = plugin.reshard_after_forward
    offload = plugin.cpu_offload
    return FSDPSettings(
        param_dtype=param_dtype,
        reshard_after_forward=bool(reshard) if isinstance(reshard, bool) else True,
        offload_params=offload is not None and type(offload).__name__ == "CPUOffloadPolicy",
    )


def wrap_units(module: nn.Module) -> list[nn.Module]:
    """The denoiser's blocks that become FSDP units, innermost first (a unit's sub-units precede it)."""
    units: list[nn.Module] = []

    def visit(m: nn.Module) -> None:
        for name, child in m.named_children():
            if name in UNIT_LISTS and isinstance(child, nn.ModuleList):
                for block in child:
                    visit(block)
                    units.append(block)
            elif name in UNIT_ATTRIBUTES and child is not None:
                visit(child)
                units.append(child)
            else:
                visit(child)

    visit(module)
    return units


def shard_denoiser(module: nn.Module, settings: FSDPSettings) -> int:
    """Apply FSDP2 to ``module`` in place: each block of :func:`wrap_units`, then the rest as the root unit.

    The trainable weights become fp32 master shards (cast unit by unit, so at most one unit exists in
    fp32 unsharded); the forward computes in ``settings.param_dtype`` and gradients are reduced in fp32.
    Returns the number of units (root included).  Needs an initialised process group.
    """
    from torch.distributed.fsdp import CPUOffloadPolicy, MixedPrecisionPolicy, OffloadPolicy, fully_shard
    from torch.distributed.tensor import DTensor

    mp = MixedPrecisionPolicy(param_dtype=settings.param_dtype, reduce_dtype=torch.float32)
    offload = CPUOffloadPolicy() if settings.offload_params else OffloadPolicy()
    units = [*wrap_units(module), module]
    for unit in units:
        for p in unit.parameters():
            if not isinstance(p, DTensor) and p.dtype != torch.float32:
                p.data = p.data.float()
        # the root too reshards after each forward: a no_grad call (a rollout, a sample grid) has no backward
        # whose end would free it, and its next use may follow an optimiser step
        fully_shard(unit, mp_policy=mp, offload_policy=offload, reshard_after_forward=settings.reshard_after_forward)
    return len(units)


def is_sharded(t: Tensor) -> bool:
    from torch.distributed.tensor import DTensor

    return isinstance(t, DTensor)


def full_tensor(t: Tensor) -> Tensor:
    """The whole tensor of a shard (a collective: every process must call it), or ``t`` itself."""
    return t.full_tensor() if is_sharded(t) else t


def shard_like(full: Tensor, like: Tensor) -> Tensor:
    """This process's local shard of the main process's ``full`` as ``like`` (a DTensor) splits it; a collective
    (the other processes pass any tensor of the full shape: only the main process's values are sent)."""
    from torch.distributed.tensor import distribute_tensor

    return distribute_tensor(full.to(like.device, like.dtype), like.device_mesh, like.placements, src_data_rank=0).to_local()


def gather_copy(names: Sequence[str], copy: Sequence[Tensor], is_main: bool) -> dict[str, Tensor]:
    """{name: full tensor on the CPU} of a copy of the trained weights (the EMA, DiffusionNFT's old policy) on the
    main process, {} elsewhere.  Sharded tensors are gathered one at a time, a collective every process joins (a
    process holds one gathered tensor at a time, the main process the whole copy)."""
    full = {}
    for name, t in zip(names, copy, strict=True):
        whole = full_tensor(t.detach())
        if is_main:
            full[name] = whole.cpu()
    return full


def load_copy_(copy: Tensor, full: Tensor | None) -> None:
    """Load a checkpointed full tensor into one tensor of a weight copy, in place: a sharded one receives its shard of
    the main process's ``full`` (a collective; the other processes pass None), a plain one copies ``full``."""
    with torch.no_grad():
        if is_sharded(copy):
            source = full if full is not None else torch.empty(copy.shape, dtype=copy.dtype)
            copy.to_local().copy_(shard_like(source, copy))
        else:
            copy.copy_(full.to(copy.device, copy.dtype))


def reshard(module: nn.Module) -> None:
    """Free the gathered weights of every FSDP unit of ``module``, so its next forward gathers the shards again.

    Needed after writing into the sharded parameters between forwards (swapping a weight copy in or out): with
    ``reshard_after_forward=False`` a unit keeps its gathered weights after a no_grad forward and would reuse them."""
    from torch.distributed.fsdp import FSDPModule

    for m in module.modules():
        if isinstance(m, FSDPModule):
            m.reshard()


def clip_grad_norm(params: list[nn.Parameter], max_norm: float) -> float:
    """Clip the global gradient norm of sharded (or plain) parameters; returns the norm before clipping.

    Every process gets the same norm (the squared norms of the shards are summed across processes).
    """
    grads = [p.grad for p in params if p.grad is not None]
    if not grads:
        return 0.0
    total = torch.nn.utils.get_total_norm(grads, 2.0)
    total = float(full_tensor(total))
    if max_norm < float("inf") and total > max_norm:
        coef = max_norm / (total + 1e-6)
        with torch.no_grad():
            for g in grads:
                g.mul_(coef)
    return total


def full_model_state(module: nn.Module) -> dict[str, Tensor]:
    """The denoiser's full state dict on the CPU on the main process ({} elsewhere); every process must call it."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    return get_model_state_dict(module, options=StateDictOptions(full_state_dict=True, cpu_offload=True))


def full_optimizer_state(module: nn.Module, optimizer: torch.optim.Optimizer) -> dict[str, Any]:
    """The optimiser's full state keyed by parameter name, on the main process ({} elsewhere); a collective."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict

    return get_optimizer_state_dict(module, optimizer, options=StateDictOptions(full_state_dict=True, cpu_offload=True))


def load_full_state(
    module: nn.Module, optimizer: torch.optim.Optimizer | None, model_state: Mapping[str, Tensor],
    optimizer_state: Mapping[str, Any] | None,
) -> None:
    """Load full (unsharded) model and optimiser states, held by the main process only (the others pass empty
    ones), into the sharded denoiser: each process receives its shards. Every process must call it."""
    from torch.distributed.checkpoint.state_dict import (
        StateDictOptions,
        set_model_state_dict,
        set_optimizer_state_dict,
    )

    options = StateDictOptions(full_state_dict=True, broadcast_from_rank0=True)
    set_model_state_dict(module, dict(model_state), options=options)
    if optimizer is not None:
        set_optimizer_state_dict(module, optimizer, dict(optimizer_state or {}), options=options)


def save_full_denoiser(module: nn.Module, state: Mapping[str, Tensor], directory) -> None:
    """Write a gathered denoiser in diffusers' format (config.json + safetensors, sharded past 10 GB) into
    ``directory``, as ``module.save_pretrained`` would for the unsharded module; loads with ``from_pretrained``."""
    from huggingface_hub import save_torch_state_dict

    module.save_config(directory)
    save_torch_state_dict(
        {k: v.contiguous() for k, v in state.items()}, directory,
        filename_pattern="diffusion_pytorch_model{suffix}.safetensors", max_shard_size="10GB",
    )


def check_deepspeed_config(ds_config: Mapping[str, Any], *, max_grad_norm: float, ema: bool) -> int:
    """Check an accelerate DeepSpeed config against what the trainer does; returns its ZeRO stage (2 or 3).

    The trainer accumulates micro-steps and clips gradients itself, so the DeepSpeed config must leave
    both to it (accumulation 1, clipping equal to the method's max_grad_norm or 'auto'); fp16 is refused
    (use bf16), and so is an EMA (it would need the partitioned weights).
    """
    zero = ds_config.get("zero_optimization") or {}
    stage = int(zero.get("stage", 0))
    if stage not in (2, 3):
        raise ConfigError(f"DeepSpeed zero_stage={stage}; accepted: 2 or 3 (examples/accelerate/deepspeed_zero*.yaml)")
    accumulation = ds_config.get("gradient_accumulation_steps", "auto")
    if accumulation not in ("auto", 1, "1"):
        raise ConfigError(
            f"the DeepSpeed config sets gradient_accumulation_steps={accumulation}; the trainer accumulates "
            "micro-steps itself: set it to 1 there and gradient_accumulation_steps in the train config"
        )
    clipping = ds_config.get("gradient_clipping", "auto")
    if clipping != "auto" and float(clipping) != float(max_grad_norm or 0.0):
        raise ConfigError(
            f"the DeepSpeed config sets gradient_clipping={clipping} but the method's max_grad_norm is {max_grad_norm}; "
            "accepted: the same value, or 'auto'"
        )
    if (ds_config.get("fp16") or {}).get("enabled") in (True, "true"):
        raise ConfigError("the DeepSpeed config enables fp16; accepted: bf16 (mixed_precision: bf16) or none")
    if ema:
        raise ConfigError("ema_decay > 0 with sharding='deepspeed'; accepted: ema_decay=0, or sharding='fsdp'")
    return stage


def prepare_deepspeed(trainer) -> None:
    """Validate the DeepSpeed launch config, then refuse: the trainer does not drive DeepSpeed's engine yet.

    DeepSpeed's engine owns the backward pass, accumulation, clipping and the optimiser step, which the
    trainer's one loop does itself for every method; wiring it in could not be run here (accelerate 1.15
    runs a DeepSpeed launch on the CPU as single processes, and no GPU was available), so it is refused
    rather than shipped untested.  FSDP2 (``sharding='fsdp'``) shards the same state.
    """
    plugin = trainer.accelerator.state.deepspeed_plugin
    method = trainer.method
    check_deepspeed_config(plugin.deepspeed_config, max_grad_norm=method.max_grad_norm,
                           ema=trainer.config.ema_decay > 0)
    raise ConfigError(
        "sharding='deepspeed': the trainer does not drive DeepSpeed's engine yet (it owns the backward pass, "
        "accumulation and the optimiser step, which the trainer's loop does itself); shard with FSDP2 instead: "
        "accelerate launch --config_file examples/accelerate/fsdp2_1node_8gpu.yaml -m align train ..."
    )


#: what the messages of a failed collective contain (gloo and NCCL raise plain RuntimeErrors on some paths)
_COLLECTIVE_FAILURES = ("Connection closed by peer", "Connection reset by peer", "Timed out", "timed out", "Timeout",
                        "NCCL", "gloo", "ProcessGroup", "c10d")


def is_distributed_failure(exc: BaseException) -> bool:
    """Whether ``exc`` is a collective that failed: a peer process died, or it did not answer in time."""
    import torch.distributed as dist

    if isinstance(exc, getattr(dist, "DistError", ())):
        return True
    return isinstance(exc, RuntimeError) and any(marker in str(exc) for marker in _COLLECTIVE_FAILURES)


def unit_sizes(module: nn.Module) -> list[int]:
    """Parameters each FSDP unit gathers at once: a unit's own (those not in a sub-unit), the root's last."""
    units = [*wrap_units(module), module]
    owned: set[int] = set()
    sizes = []
    for unit in units:  # innermost first: a unit's sub-units have already taken theirs
        params = [p for p in unit.parameters() if id(p) not in owned]
        owned.update(id(p) for p in params)
        sizes.append(sum(p.numel() for p in params))
    return sizes


#: the sharded layouts ``align plan`` predicts (TrainConfig.sharding's fsdp, and deepspeed by ZeRO stage)
PLAN_SHARDING = ("none", "fsdp", "zero2", "zero3")


@dataclass(frozen=True)
class ShardedMemory:
    """Bytes per process of a sharded full fine-tuning of ``numel`` weights (see :func:`sharded_memory`)."""

    weights: float
    gradients: float
    optimizer_state: float
    optimizer_temporary: float
    gathered_forward: float
    gathered_backward: float


def sharded_memory(numel: int, processes: int, compute_bytes: int, sharding: str, largest_unit: int) -> ShardedMemory:
    """Per-process memory of the denoiser's weights, gradients and AdamW state under ``sharding``.

    fsdp (the trainer's FSDP2): fp32 master weights, fp32 gradients and the two fp32 Adam moments, each
    divided by the processes; while a block runs its weights are gathered in the compute dtype (it and the
    next, prefetched), and in its backward its unsharded gradient plus the fp32 copy that is reduce-scattered.
    zero2: compute-dtype weights replicated, fp32 master weights, gradients and Adam state partitioned.
    zero3: the compute-dtype weights partitioned too, gathered per block as FSDP does.
    """
    n, p, c = float(numel), float(processes), float(compute_bytes)
    master = 4.0 * n / p
    adam = 8.0 * n / p
    gathered = 2.0 * largest_unit * c
    if sharding == "fsdp":
        return ShardedMemory(master, 4.0 * n / p, adam, master, gathered, gathered + largest_unit * (c + 4.0))
    extra_master = master if c < 4 else 0.0  # fp32 training keeps no separate master copy
    if sharding == "zero2":
        return ShardedMemory(c * n + extra_master, c * n / p, adam, master, 0.0, 0.0)
    if sharding == "zero3":
        return ShardedMemory(c * n / p + extra_master, c * n / p, adam, master, gathered, gathered + largest_unit * c)
    raise ConfigError(f"sharding={sharding!r}; accepted: {', '.join(PLAN_SHARDING[1:])}")
