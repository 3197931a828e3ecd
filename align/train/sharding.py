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

DeepSpeed ZeRO-2 and ZeRO-3 (``sharding='deepspeed'``) follow the same design: the trainer calls
``deepspeed.initialize`` itself, on the denoiser alone, with its own AdamW (which DeepSpeed's ZeRO
optimiser wraps and steps on the fp32 master partitions, so the trainer's LambdaLR keeps setting the
rate) and the DeepSpeed config from an accelerate DeepSpeed launch or from TrainConfig.deepspeed_config
(for torchrun / plain launches, and the CPU tests); it fills in what it owns (micro-batch, clipping at
max_grad_norm, bf16, accumulation 1: it accumulates itself and marks DeepSpeed's boundary on its last
micro-step).  It keeps calling the denoiser module directly through the sampling chain (ZeRO-3's
gather hooks sit on the module's submodules) and backpropagates through :func:`deepspeed_backward`.
ZeRO-2 keeps the compute-dtype weights whole on every process and partitions the fp32 master weights,
gradients and Adam moments; ZeRO-3 partitions the weights too.  ZeRO skips (and drops) a step whose
gradient norm is not finite, in fp32 as in bf16; a non-finite loss on any process skips the step
before its boundary (:func:`discard_gradients`).  Checkpoints hold the full fp32 master weights and the
full AdamW state keyed by parameter name, gathered with DeepSpeed's ``safe_get_full_*`` and set back
with ``safe_set_full_*`` (:func:`deepspeed_full_weights`, :func:`load_deepspeed_state`), so resume is
exact.  An EMA is kept under ZeRO-2 (whole weights, like the parameters) and refused under ZeRO-3;
DiffusionNFT and Diffusion-DPO (whose old policy / frozen reference would have to follow ZeRO-3's
partitions too), fp16 and offloading are refused.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from align.core.errors import AlignError, ConfigError

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


def resolve_sharding(requested: str, distributed_type: str, num_processes: int, lora_enabled: bool,
                     deepspeed_config: bool = False) -> str:
    """The sharding a run uses: 'none', 'fsdp' or 'deepspeed'.

    ``requested`` is TrainConfig.sharding; ``distributed_type`` is accelerate's (``"FSDP"``,
    ``"DEEPSPEED"``, ``"MULTI_GPU"``, ``"MULTI_CPU"``, ``"NO"``...); ``deepspeed_config``: whether
    TrainConfig.deepspeed_config names a DeepSpeed config (for runs not launched by accelerate's DeepSpeed
    launcher: torchrun, a plain ``accelerate launch``).  'auto' follows the accelerate launch config, or the
    deepspeed_config; LoRA always takes the light path (and refuses an FSDP / DeepSpeed launch).  FSDP over one
    process has nothing to shard and runs the plain path; DeepSpeed runs as asked (its launch wants its engine).
    """
    launched = LAUNCHED_SHARDING.get(distributed_type, "none")
    if lora_enabled and launched != "none":
        # accelerate's FSDP2 / DeepSpeed prepare wants the model with the optimiser; LoRA keeps its light path
        raise ConfigError(
            f"a LoRA run launched with an accelerate {distributed_type} config: LoRA trains unsharded (every process "
            "holds the model; one all-reduce of the adapter gradients); launch it with a plain multi-GPU config "
            "(accelerate launch -m align train ...), or set lora.enabled=false to shard full fine-tuning"
        )
    if deepspeed_config and launched != "none":
        raise ConfigError(
            f"deepspeed_config is set but the run was launched with an accelerate {distributed_type} config; "
            "deepspeed_config is for runs launched without one (torchrun, a plain accelerate launch): drop one of them"
        )
    if requested == "auto":
        requested = "deepspeed" if deepspeed_config else launched
    if requested == "deepspeed" and launched != "deepspeed" and not deepspeed_config:
        raise ConfigError(
            f"sharding='deepspeed' needs a DeepSpeed config: launch with an accelerate DeepSpeed config (accelerate "
            f"launch --config_file examples/accelerate/deepspeed_zero2_1node_8gpu.yaml ...), or set deepspeed_config "
            f"to a DeepSpeed JSON or accelerate DeepSpeed YAML; this run's accelerate distributed type is "
            f"{distributed_type!r}. Accepted without one: 'auto', 'none', 'fsdp'"
        )
    if requested != "deepspeed" and deepspeed_config:
        raise ConfigError(f"sharding={requested!r} with deepspeed_config set; accepted: 'auto' or 'deepspeed'")
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


def load_copy_(copy: Tensor, full: Tensor | None, replicated: bool = False) -> None:
    """Load a checkpointed full tensor into one tensor of a weight copy, in place: a sharded one receives its shard of
    the main process's ``full`` (a collective; the other processes pass None), a ``replicated`` one (whole on every
    process while only the main process read the checkpoint: ZeRO-2's EMA) the main process's ``full`` (a collective
    too), a plain one copies ``full``."""
    with torch.no_grad():
        if is_sharded(copy):
            source = full if full is not None else torch.empty(copy.shape, dtype=copy.dtype)
            copy.to_local().copy_(shard_like(source, copy))
        elif replicated:
            copy.copy_(broadcast_from_main(full, copy))
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


#: the sections of a DeepSpeed config the trainer owns: its own AdamW and learning-rate schedule
DEEPSPEED_OWNED_SECTIONS = ("optimizer", "scheduler")
#: the accelerate config's deepspeed_config keys :func:`load_deepspeed_config` passes to accelerate's DeepSpeedPlugin
ACCELERATE_DEEPSPEED_KEYS = ("zero_stage", "gradient_accumulation_steps", "gradient_clipping", "offload_optimizer_device",
                             "offload_param_device", "zero3_init_flag", "zero3_save_16bit_model", "deepspeed_config_file")


def load_deepspeed_config(path: str | Path) -> dict[str, Any]:
    """The DeepSpeed config in ``path``: a DeepSpeed JSON file, or an accelerate config YAML whose
    ``deepspeed_config`` section accelerate's DeepSpeedPlugin turns into one (what ``accelerate launch`` does)."""
    file = Path(path)
    accepted = "accepted: a DeepSpeed JSON file, or an accelerate DeepSpeed YAML (examples/accelerate/deepspeed_zero2_1node_8gpu.yaml)"
    if not file.is_file():
        raise ConfigError(f"deepspeed_config={str(path)!r} is not a file; {accepted}")
    text = file.read_text()
    if file.suffix == ".json":
        try:
            config = json.loads(text)
        except ValueError as exc:
            raise ConfigError(f"deepspeed_config={str(path)!r} is not valid JSON ({exc}); {accepted}") from None
    else:
        import yaml

        launch = yaml.safe_load(text) or {}
        section = launch.get("deepspeed_config") if isinstance(launch, dict) else None
        if not isinstance(section, dict):
            raise ConfigError(f"deepspeed_config={str(path)!r} has no deepspeed_config section; {accepted}")
        unknown = sorted(set(section) - set(ACCELERATE_DEEPSPEED_KEYS))
        if unknown:
            raise ConfigError(f"deepspeed_config={str(path)!r}: unknown key {unknown[0]!r} in its deepspeed_config "
                              f"section; accepted: {', '.join(ACCELERATE_DEEPSPEED_KEYS)}")
        from accelerate.utils import DeepSpeedPlugin

        check_zero3_init(section.get("zero3_init_flag"))
        options = {k: v for k, v in section.items() if k != "deepspeed_config_file"}
        if "deepspeed_config_file" in section:
            return load_deepspeed_config(section["deepspeed_config_file"])
        config = DeepSpeedPlugin(**options).deepspeed_config
    if not isinstance(config, dict):
        raise ConfigError(f"deepspeed_config={str(path)!r} does not hold a mapping; {accepted}")
    return config


def check_zero3_init(flag) -> None:
    """Refuse accelerate's ``zero3_init_flag``: it makes transformers' ``from_pretrained`` partition every model it
    loads (the frozen text encoders too), while the trainer loads the pipeline whole and partitions the denoiser."""
    if flag in (True, "true"):
        raise ConfigError(
            "the accelerate DeepSpeed config sets zero3_init_flag: true; accepted: false (the trainer partitions only "
            "the denoiser, after loading; zero.Init would partition the frozen text encoders as they load)"
        )


def check_deepspeed_config(ds_config: Mapping[str, Any], *, max_grad_norm: float) -> int:
    """Check a DeepSpeed config against what the trainer does; returns its ZeRO stage (2 or 3).

    The trainer accumulates micro-steps itself (it marks the last one as DeepSpeed's accumulation
    boundary), so the config must leave accumulation to it (1 or 'auto') and clip at the method's
    max_grad_norm (or 'auto'); fp16 is refused (use bf16), and so are an optimizer / scheduler section
    (the trainer's AdamW and schedule are used) and offloading (not tested here).
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
    for section in DEEPSPEED_OWNED_SECTIONS:
        if section in ds_config:
            raise ConfigError(
                f"the DeepSpeed config has a {section!r} section; the trainer uses its own AdamW and learning-rate "
                "schedule (the method's learning_rate, weight_decay, lr_schedule): remove it"
            )
    for key in ("offload_optimizer", "offload_param"):
        device = (zero.get(key) or {}).get("device", "none")
        if device not in (None, "none"):
            raise ConfigError(f"the DeepSpeed config sets {key} device={device!r}; accepted: none (offloading is not "
                              "supported by the trainer yet)")
    return stage


def check_deepspeed_ema(stage: int, ema_decay: float) -> None:
    """An EMA is kept under ZeRO-2 (the module's weights are whole on every process, as in an unsharded run) but
    refused under ZeRO-3, whose weights exist only as partitions."""
    if stage == 3 and ema_decay > 0:
        raise ConfigError(f"ema_decay={ema_decay} with DeepSpeed ZeRO-3; accepted: ema_decay=0, or ZeRO-2, or "
                          "sharding='fsdp'")


def broadcast_from_main(full: Tensor | None, like: Tensor) -> Tensor:
    """The main process's ``full`` on every process, shaped and typed as ``like`` (a collective; the other processes
    pass None)."""
    import torch.distributed as dist

    value = full.to(like.device, like.dtype).contiguous() if dist.get_rank() == 0 else torch.empty_like(like)
    dist.broadcast(value, src=0)
    return value


def engine_config(ds_config: Mapping[str, Any], *, batch_size: int, max_grad_norm: float, bf16: bool) -> dict[str, Any]:
    """The config the trainer passes to ``deepspeed.initialize``: ``ds_config`` (checked) with the values the trainer
    owns filled in, and accelerate's remaining 'auto' values dropped (DeepSpeed's defaults apply)."""
    check_deepspeed_config(ds_config, max_grad_norm=max_grad_norm)
    config = {k: v for k, v in ds_config.items() if v != "auto" and k not in ("train_batch_size", "fp16")}
    config["zero_optimization"] = {k: v for k, v in ds_config["zero_optimization"].items() if v != "auto"}
    config.update(
        train_micro_batch_size_per_gpu=batch_size,
        gradient_accumulation_steps=1,  # the trainer marks the boundary of its own accumulation
        gradient_clipping=float(max_grad_norm or 0.0),
        bf16={**(ds_config.get("bf16") or {}), "enabled": bf16},
        zero_allow_untested_optimizer=True,  # the trainer's torch AdamW
    )
    config.setdefault("steps_per_print", 2**62)
    return config


def prepare_deepspeed(module: nn.Module, optimizer: torch.optim.Optimizer, config: Mapping[str, Any], timeout_s: float):
    """``deepspeed.initialize`` on the denoiser with the trainer's AdamW; returns the engine.

    DeepSpeed wraps ``optimizer`` in its ZeRO optimiser, which keeps the fp32 master partitions and steps the
    same torch AdamW on them: the trainer's LambdaLR, built on ``optimizer``, keeps setting the rate it uses.
    ZeRO-3 partitions the module's weights and gathers them in hooks on the module's submodules, so the trainer
    keeps calling the module itself.  DeepSpeed's collectives run on a clone of the world process group; it is
    made here with the run's timeout (DeepSpeed would make it with the default one).
    """
    import deepspeed
    import torch.distributed as dist
    from deepspeed.utils import groups

    if not hasattr(groups, "_WORLD_GROUP"):
        raise AlignError(_untested_deepspeed("deepspeed.utils.groups._WORLD_GROUP"))
    if dist.is_initialized() and groups._WORLD_GROUP is None:
        groups._WORLD_GROUP = dist.new_group(ranks=range(dist.get_world_size()), timeout=timedelta(seconds=timeout_s))
    engine, *_ = deepspeed.initialize(model=module, optimizer=optimizer, config=dict(config))
    check_deepspeed_internals(engine)
    return engine


#: the DeepSpeed version the trainer's use of DeepSpeed's internals was written against and tested with
DEEPSPEED_TESTED = "0.19.8"
#: DeepSpeed internals the trainer uses (its engine is driven without engine(...)): engine attributes, and the ZeRO
#: optimiser's by stage
DEEPSPEED_ENGINE_INTERNALS = ("_backward_prologue", "backward", "step", "set_gradient_accumulation_boundary",
                              "was_step_applied", "get_global_grad_norm")
DEEPSPEED_MODULE_INTERNALS = (("deepspeed.runtime.utils", "register_output_backward_hooks"),
                              ("deepspeed.runtime.zero.stage_1_and_2", "INITIAL_MICRO_STEP_ID"))
DEEPSPEED_OPTIMIZER_INTERNALS = {
    2: ("clear_backward_seen_flag", "_release_preflattened_grad_buffers", "averaged_gradients", "all_grad_tensors",
        "micro_step_id", "single_partition_of_fp32_groups"),
    3: ("clear_backward_seen_flag", "fp32_partitioned_groups_flat"),
}


def _untested_deepspeed(missing: str) -> str:
    import deepspeed

    return (f"DeepSpeed {deepspeed.__version__} has no {missing}, which the trainer drives DeepSpeed's engine with "
            f"(written for and tested with DeepSpeed {DEEPSPEED_TESTED}); install that version "
            f"(pip install deepspeed=={DEEPSPEED_TESTED}) or shard with sharding=fsdp")


def check_deepspeed_internals(engine) -> None:
    """Fail at setup, naming what is missing, when the installed DeepSpeed lacks an internal the trainer uses (they
    are not public API and may change in any release), instead of failing mid-run."""
    import importlib

    for module, name in DEEPSPEED_MODULE_INTERNALS:
        if not hasattr(importlib.import_module(module), name):
            raise AlignError(_untested_deepspeed(f"{module}.{name}"))
    for name in DEEPSPEED_ENGINE_INTERNALS:
        if not hasattr(engine, name):
            raise AlignError(_untested_deepspeed(f"engine.{name}"))
    stage = engine.zero_optimization_stage()
    for name in DEEPSPEED_OPTIMIZER_INTERNALS.get(stage, ()):
        if not hasattr(engine.optimizer, name):
            raise AlignError(_untested_deepspeed(f"ZeRO-{stage} optimizer.{name}"))


def deepspeed_backward(engine, loss: Tensor) -> None:
    """``engine.backward(loss)`` for a loss computed by calling ``engine.module`` directly (not ``engine(...)``).

    What ``engine.forward`` adds is done here: the ZeRO optimiser's per-forward reset (ZeRO-3 counts micro-steps
    there, and adds a micro-step's gradients to the previous ones only once it has counted them) and DeepSpeed's
    backward prologue, hooked on the loss so that it runs at the start of the backward pass, as it would on an
    output of ``engine(...)``.  The micro-step's accumulation boundary is set by the caller.
    """
    from deepspeed.runtime.utils import register_output_backward_hooks

    engine.optimizer.clear_backward_seen_flag()
    register_output_backward_hooks(loss, preprocess_once_fn=engine._backward_prologue)
    engine.backward(loss)


def discard_gradients(engine) -> None:
    """Drop the gradients accumulated by the micro-steps of a step that is skipped before its boundary, as the
    ZeRO optimiser drops those of a step whose gradients overflow (DeepSpeed 0.19's overflow branch of
    ``DeepSpeedZeroOptimizer.step`` for ZeRO-2, ``zero_grad`` for ZeRO-3, which then overwrites the partitions)."""
    optimizer = engine.optimizer
    optimizer.zero_grad(set_to_none=True)
    if engine.zero_optimization_stage() == 3:
        return
    from deepspeed.runtime.zero.stage_1_and_2 import INITIAL_MICRO_STEP_ID

    optimizer._release_preflattened_grad_buffers()
    for k in list(optimizer.averaged_gradients):
        optimizer.averaged_gradients[k] = None
    for k in list(optimizer.all_grad_tensors):
        optimizer.all_grad_tensors[k] = None
    optimizer.micro_step_id = INITIAL_MICRO_STEP_ID


#: the AdamW state of a parameter, saved in full per parameter
ADAM_STATE = ("exp_avg", "exp_avg_sq")


def master_partitions(engine) -> list[Tensor]:
    """This process's flat fp32 master partitions: the tensors the ZeRO optimiser steps its torch AdamW on (and keys
    its state by): ZeRO-3's sub-groups, ZeRO-2's one partition per parameter group."""
    optimizer = engine.optimizer
    flats = getattr(optimizer, "fp32_partitioned_groups_flat", None)
    return list(flats if flats is not None else optimizer.single_partition_of_fp32_groups)


def _adam_state_initialised(engine) -> tuple[torch.optim.Optimizer, list[Tensor]]:
    """The torch AdamW inside the ZeRO optimiser and the master partitions its state is keyed by, that state created
    as its first step would (zeros, step 0) where there is none yet, and linked to the parameters' fragments (ZeRO-2
    links them after its first step)."""
    adam = engine.optimizer.optimizer
    flats = master_partitions(engine)
    for flat in flats:
        if "exp_avg" not in adam.state.get(flat, {}):
            adam.state[flat] = {"step": torch.tensor(0.0), **{k: torch.zeros_like(flat) for k in ADAM_STATE}}
    link = getattr(engine.optimizer, "_lazy_init_hp_params_optimizer_state", None)
    if link is not None:
        link()
    return adam, flats


def deepspeed_full_weights(names: list[str], params: list[nn.Parameter], main: bool) -> dict[str, Tensor]:
    """The full fp32 master weights {name: tensor} on the CPU of the main process ({} elsewhere); a collective."""
    from deepspeed.utils import safe_get_full_fp32_param

    weights = {}
    for name, p in zip(names, params):
        full = safe_get_full_fp32_param(p)
        if main:
            weights[name] = full.detach().cpu().clone()
    return weights


def deepspeed_full_optimizer_state(engine, names: list[str], params: list[nn.Parameter], main: bool) -> dict | None:
    """The full AdamW state on the CPU of the main process (None elsewhere), as FSDP's full optimiser state is:
    {"state": {name: {"step", "exp_avg", "exp_avg_sq"}}, "param_groups": [...]}. A collective."""
    from deepspeed.utils import safe_get_full_optimizer_state

    adam, flats = _adam_state_initialised(engine)
    step = adam.state[flats[0]]["step"]  # one count for all: every partition steps together
    state: dict[str, dict[str, Tensor]] = {}
    for name, p in zip(names, params):
        moments = {k: safe_get_full_optimizer_state(p, k) for k in ADAM_STATE}
        if main:
            state[name] = {"step": step.detach().cpu().clone(), **{k: v.detach().cpu().clone() for k, v in moments.items()}}
    if not main:
        return None
    return {"state": state, "param_groups": [{k: v for k, v in g.items() if k != "params"} for g in adam.param_groups]}


def load_deepspeed_state(engine, names: list[str], params: list[nn.Parameter], weights: Mapping[str, Tensor],
                         optimizer_state: Mapping[str, Any] | None) -> None:
    """Set each process's partitions of the master weights, of the AdamW state and of the module's weights from full
    ones held by the main process (the others pass empty ones). Every process must call it."""
    import deepspeed
    import torch.distributed as dist
    from deepspeed.utils import safe_set_full_fp32_param, safe_set_full_optimizer_state

    main = dist.get_rank() == 0
    adam, flats = _adam_state_initialised(engine)
    saved = (optimizer_state or {}).get("state", {})
    # the main process says whether there is an optimiser state to send, its param_groups and its step
    sent = _broadcast_object(
        (optimizer_state["param_groups"], float(next(iter(saved.values()))["step"]) if saved else 0.0)
        if main and optimizer_state is not None else None
    )
    keys = ("weight", *ADAM_STATE) if sent is not None else ("weight",)
    for name, p in zip(names, params):
        full = {}
        for key in keys:
            value = (weights[name] if key == "weight" else saved[name][key]) if main else torch.empty(p.ds_shape if hasattr(p, "ds_id") else p.shape)
            value = value.to(p.device, torch.float32).contiguous()
            dist.broadcast(value, src=0)
            full[key] = value
        safe_set_full_fp32_param(p, full["weight"])
        for key in keys[1:]:
            safe_set_full_optimizer_state(p, full[key], key)
        # the module's own (compute-dtype) weights: whole on every process under ZeRO-2, partitions under ZeRO-3
        # (gathered, set on the main process, partitioned again on leaving the context)
        with deepspeed.zero.GatheredParameters([p], modifier_rank=0), torch.no_grad():
            if main or not hasattr(p, "ds_id"):
                p.data.copy_(full["weight"].view(p.shape).to(p.dtype))
    if sent is not None:
        groups, step = sent
        for group, values in zip(adam.param_groups, groups):
            group.update(values)
        for flat in flats:
            adam.state[flat]["step"].fill_(step)


def _broadcast_object(obj):
    import torch.distributed as dist

    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


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
