"""Peak-memory planner for reward-backprop fine-tuning (``align plan``).

Predicts the peak memory of one optimiser step of :class:`align.train.trainer.Trainer` from the
model's architecture (its config files; no weights are read) and the run's settings, and finds
the largest batch size and truncation K that fit a memory budget.

How.  The denoiser and the VAE are built on PyTorch's ``meta`` device (shapes without data) and
one call of each is traced three ways (a grad-free forward; a grad-enabled forward; its
backward) while a dispatch mode counts the bytes of every tensor storage the call creates and
frees.  That gives, per call, the forward's transient peak, the bytes autograd keeps for the
backward, and the peak of forward + backward, which is also what a checkpointed call costs when
it is recomputed in the backward pass.  The step's peak then follows by replaying the structure
of :func:`align.train.backprop.sample_with_grad` and the trainer: T - K grad-free calls; K grad-enabled
(checkpointed) calls whose kept bytes accumulate; the VAE decode (traced block-checkpointed
when checkpointing is on, as it runs); the backward
through the decode and then through each call in reverse; the optimiser step.  Weights,
gradients and AdamW state are counted from the parameters.  Activation figures are affine in the
batch size, so each call is traced at batch 1 and 2 and the budget search is instant.

Attention is traced as the fused kernels PyTorch uses on CUDA and CPU (flash / memory-efficient),
which keep the output and the log-sum-exp rather than the attention matrix.  Not modelled:
allocator fragmentation and cuDNN workspaces (GPU), the float32 ops of CUDA autocast under mixed
precision (the trace runs wholly in the weight dtype, which matches CPU bf16 autocast within a few
percent), the reward model (pass its memory as ``extra_memory_gb``), and gradient accumulation
(micro-steps after the first hold every gradient through their backward: add the gradients' size).
"""

from __future__ import annotations

import contextlib
import inspect
import json
import math
import re
import weakref
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field, replace
from functools import partial
from pathlib import Path
from typing import Any

import torch
from torch import Tensor
from torch.utils import _pytree as pytree
from torch.utils._python_dispatch import TorchDispatchMode

from align.core.errors import AlignError, ConfigError, check_choice, check_range
from align.train.sharding import PLAN_SHARDING, sharded_memory, unit_sizes

PRESET_DIR = Path(__file__).resolve().parent / "presets"
PRESET_ALIASES = {"sd1.5": "sd15", "sd-1.5": "sd15", "sd-xl": "sdxl", "sd3-medium": "sd3", "flux-dev": "flux"}
PLAN_METHODS = ("draft", "draft_lv", "alignprop", "refl")
#: training methods the planner does not model (their step is not the backprop chain's)
UNPLANNED_METHODS = ("ddpo", "grpo", "diffusion_nft", "diffusion_dpo")
DEVICES = ("cuda", "cpu")
DTYPES = {"no": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
DEFAULT_BUDGETS_GB = (24.0, 80.0)
GB = 2**30
DENOISER_COMPONENTS = ("unet", "transformer")
TEXT_ENCODER_COMPONENTS = ("text_encoder", "text_encoder_2", "text_encoder_3")
#: text tokens fed to the denoiser: CLIP's 77, plus T5's max_sequence_length for SD3 (joined) and FLUX (T5 only)
DEFAULT_T5_LENGTH = {"sd3": 256, "flux": 512}


# ---------------------------------------------------------------------------------------------
# architecture: config files only
# ---------------------------------------------------------------------------------------------
@dataclass
class ModelSpec:
    """A pipeline's architecture: ``model_index.json`` and the config of each component.

    ``configs`` maps a component name (unet / transformer, vae, text_encoder, ...) to its
    ``config.json`` contents; ``source`` says where they came from.
    """

    model_index: dict[str, Any]
    configs: dict[str, dict[str, Any]]
    source: str

    @property
    def pipeline_class(self) -> str:
        return str(self.model_index.get("_class_name", ""))

    @property
    def denoiser_name(self) -> str:
        for name in DENOISER_COMPONENTS:
            if name in self.configs:
                return name
        raise AlignError(f"{self.source}: no unet or transformer config found; is it a text-to-image pipeline?")

    def component_class(self, name: str) -> str:
        entry = self.model_index.get(name)
        if isinstance(entry, (list, tuple)) and len(entry) == 2 and entry[1]:
            return str(entry[1])
        cls = self.configs.get(name, {}).get("_class_name") or (self.configs.get(name, {}).get("architectures") or [None])[0]
        if not cls:
            raise AlignError(f"{self.source}: cannot tell the class of component {name!r}")
        return str(cls)

    @property
    def text_encoders(self) -> list[str]:
        return [n for n in TEXT_ENCODER_COMPONENTS if n in self.configs]

    @classmethod
    def from_pipeline(cls, pipe) -> ModelSpec:
        """The spec of a loaded diffusers pipeline (configs of its components)."""
        index: dict[str, Any] = {"_class_name": type(pipe).__name__}
        configs: dict[str, dict[str, Any]] = {}
        for name, component in pipe.components.items():
            if component is None or not isinstance(component, torch.nn.Module):
                continue
            index[name] = [type(component).__module__.split(".")[0], type(component).__name__]
            config = component.config
            configs[name] = dict(config.to_dict() if hasattr(config, "to_dict") else config)
        return cls(index, configs, f"pipeline {type(pipe).__name__}")


def preset_names() -> list[str]:
    return sorted(p.stem for p in PRESET_DIR.glob("*.json"))


def _read_json(path: Path) -> dict[str, Any]:
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise AlignError(f"cannot read config file {str(path)!r}: {exc}") from None


def _spec_from_reader(index: dict[str, Any], read: Callable[[str], dict[str, Any] | None], source: str) -> ModelSpec:
    configs = {}
    for name in (*DENOISER_COMPONENTS, "vae", *TEXT_ENCODER_COMPONENTS):
        entry = index.get(name)
        if not entry or entry[0] is None:
            continue
        config = read(name)
        if config is not None:
            configs[name] = config
    spec = ModelSpec(index, configs, source)
    spec.denoiser_name  # noqa: B018 - raises a clear error when there is none
    if "vae" not in configs:
        raise AlignError(f"{source}: no vae config found; the planner needs the VAE to size the decode")
    return spec


def load_spec(model: str, *, offline: bool | None = None, revision: str | None = None) -> ModelSpec:
    """The architecture of ``model``: a preset name (see :func:`preset_names`), 'builtin', a local
    diffusers folder, or a hub id (only ``model_index.json`` and the components' ``config.json``
    are fetched)."""
    from align.core.models import hub_offline, resolve_model

    key = PRESET_ALIASES.get(model.lower(), model.lower()) if isinstance(model, str) else model
    if isinstance(key, str) and (PRESET_DIR / f"{key}.json").is_file():
        data = _read_json(PRESET_DIR / f"{key}.json")
        return _spec_from_reader(data["model_index"], data.get, f"preset {key!r}")
    source = resolve_model(model, offline)
    folder = Path(source)
    if folder.is_dir():
        index = _read_json(folder / "model_index.json")

        def read_local(name: str) -> dict[str, Any] | None:
            path = folder / name / "config.json"
            return _read_json(path) if path.is_file() else None

        return _spec_from_reader(index, read_local, str(folder))
    return _spec_from_hub(source, hub_offline(offline), revision)


def _spec_from_hub(repo_id: str, offline: bool, revision: str | None) -> ModelSpec:
    from huggingface_hub import hf_hub_download
    from huggingface_hub.utils import (
        EntryNotFoundError,
        HfHubHTTPError,
        LocalEntryNotFoundError,
        RepositoryNotFoundError,
    )

    def fetch(filename: str, required: bool) -> dict[str, Any] | None:
        try:
            path = hf_hub_download(repo_id, filename, revision=revision, local_files_only=offline)
        except LocalEntryNotFoundError:  # (a subclass of EntryNotFoundError: test it first)
            where = "offline mode is on (HF_HUB_OFFLINE=1) and" if offline else "the hub could not be reached and"
            raise AlignError(
                f"model={repo_id!r}: {where} {filename} is not in the local Hugging Face cache. Accepted offline: "
                f"a preset ({', '.join(preset_names())}), 'builtin' or a local diffusers folder."
            ) from None
        except EntryNotFoundError:
            if required:
                raise AlignError(f"model={repo_id!r} has no {filename}; it is not a diffusers pipeline") from None
            return None
        except RepositoryNotFoundError:
            raise AlignError(
                f"model={repo_id!r} is not a hub repository (or it is private); accepted: a preset "
                f"({', '.join(preset_names())}), 'builtin', a local diffusers folder or a hub id"
            ) from None
        except (HfHubHTTPError, OSError, ValueError) as exc:
            reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise AlignError(f"model={repo_id!r}: fetching {filename} failed: {reason}") from None
        return _read_json(Path(path))

    index = fetch("model_index.json", True)
    return _spec_from_reader(index, lambda name: fetch(f"{name}/config.json", False), f"hub {repo_id}")


# ---------------------------------------------------------------------------------------------
# settings
# ---------------------------------------------------------------------------------------------
def parse_memory(value: str | float | int) -> float:
    """'24GB', '24 GiB', '24000MB', '1TB' -> GB (binary units: 1 GB = 2**30 bytes); a Python number is GB.

    A string needs its unit: '24' could be GB or MB, so it is refused with the two readings.
    """
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    text = str(value).strip().lower()
    match = re.fullmatch(r"([0-9]*\.?[0-9]+)\s*(gb|gib|g|mb|mib|m|tb|tib|t)?", text)
    if not match:
        raise ConfigError(f"memory size {value!r} is not understood; accepted: a size with its unit such as 24GB, 80GiB or 16000MB")
    if match.group(2) is None:
        raise ConfigError(f"memory size {value!r} has no unit; write {match.group(1)}GB or {match.group(1)}MB")
    number, unit = float(match.group(1)), match.group(2)[0]
    return number * {"g": 1.0, "m": 1.0 / 1024, "t": 1024.0}[unit]


@dataclass
class PlanConfig:
    """What to plan (``align plan``).

    Attributes:
        model: a preset (sd15, sdxl, sd3, flux), 'builtin', a local diffusers folder or a hub id; only
            config files are read, never weights.
        method: draft (DRaFT-K), draft_lv (DRaFT-LV), alignprop (AlignProp) or refl (ReFL).
        num_steps: sampling steps T (default: the method's default).
        truncation_steps: K, grad-enabled steps (draft; default 1). For alignprop the window is drawn per
            batch; the default plans for the cut-off two standard deviations early. Ignored by draft_lv and
            refl (one grad step).
        lv_copies: DRaFT-LV's re-noised copies.
        batch_size: images per process per micro-step.
        resolution: image side in pixels (default: the model's native size).
        guidance: classifier-free guidance (doubles the denoiser batch); default: the method's
            guidance_scale != 1.
        lora: train LoRA adapters (true) or the whole denoiser (false).
        lora_rank: LoRA rank.
        lora_targets: module names that get adapters.
        gradient_checkpointing: checkpoint every grad-enabled denoiser call and the VAE decode.
        mixed_precision: no (float32), fp16 or bf16 weights and activations.
        device: cuda or cpu (they differ in the optimiser's temporaries).
        max_sequence_length: T5 tokens for sd3 / flux (default: the pipeline's, 256 / 512).
        budgets_gb: memory budgets in GB for the largest batch size / K search.
        extra_memory_gb: memory the planner does not model (reward model weights and activations), added to the peak.
        offline: read only local files (default: the HF_HUB_OFFLINE environment variable).
        processes: GPUs the run is spread over (all machines together).
        sharding: how full fine-tuning splits the denoiser over the processes: none (replicated), fsdp
            (sharding=fsdp: fp32 master weights, gradients and AdamW state divided by the processes, plus the
            largest block gathered while it runs), zero2 / zero3 (DeepSpeed ZeRO stage 2 / 3).
    """

    model: str = "sd15"
    method: str = "draft"
    num_steps: int | None = None
    truncation_steps: int | None = None
    lv_copies: int = 2
    batch_size: int = 1
    resolution: int | None = None
    guidance: bool | None = None
    lora: bool = True
    lora_rank: int = 8
    lora_targets: list[str] = field(default_factory=lambda: ["to_q", "to_k", "to_v", "to_out.0"])
    gradient_checkpointing: bool = True
    mixed_precision: str = "no"
    device: str = "cuda"
    max_sequence_length: int | None = None
    budgets_gb: list[float] = field(default_factory=lambda: list(DEFAULT_BUDGETS_GB))
    extra_memory_gb: float = 0.0
    offline: bool | None = None
    processes: int = 1
    sharding: str = "none"

    def __post_init__(self) -> None:
        if self.method in ("diffusion_nft", "diffusion_dpo"):
            raise ConfigError(
                f"method={self.method!r}: align plan models the reward-backprop methods ({', '.join(PLAN_METHODS)}), not "
                "diffusion_nft / diffusion_dpo. A step holds one denoiser forward+backward of batch_size samples "
                "(diffusion_dpo: 2 x batch_size, winners and losers) plus grad-free forwards (the old policy or the "
                "reference), whatever num_steps; rollouts are grad-free. Full fine-tuning keeps one more copy of the "
                "trained weights (the old policy, or DPO's frozen reference). `align plan --method draft "
                "--truncation-steps 1 --no-checkpointing --batch-size B` bounds the step from above"
            )
        if self.method in UNPLANNED_METHODS:
            raise ConfigError(
                f"method={self.method!r}: align plan models the reward-backprop methods ({', '.join(PLAN_METHODS)}), not "
                "the policy-gradient ones. A ddpo/grpo step holds one CFG-batched denoiser forward+backward of batch_size "
                "samples (whatever num_steps), a grad-free rollout chunk and decode, and the rollout buffer (2 latents per "
                "stochastic step and sample of the process's share); `align plan --method draft --truncation-steps 1 "
                "--no-checkpointing --batch-size B` bounds the step from above, the buffer comes on top"
            )
        check_choice("method", self.method, PLAN_METHODS)
        if self.num_steps is not None:
            check_range("num_steps", self.num_steps, 1, 1000, integer=True)
        if self.truncation_steps is not None:
            check_range("truncation_steps", self.truncation_steps, 1, None, integer=True)
            if self.truncation_steps > self.steps:
                raise ConfigError(
                    f"truncation_steps={self.truncation_steps} exceeds num_steps={self.steps}; accepted: 1..{self.steps}"
                )
        check_range("lv_copies", self.lv_copies, 1, 64, integer=True)
        check_range("batch_size", self.batch_size, 1, None, integer=True)
        if self.resolution is not None:
            check_range("resolution", self.resolution, 8, 16384, integer=True)
        check_range("lora_rank", self.lora_rank, 1, 1024, integer=True)
        check_choice("mixed_precision", self.mixed_precision, tuple(DTYPES))
        check_choice("device", self.device, DEVICES)
        if self.max_sequence_length is not None:
            check_range("max_sequence_length", self.max_sequence_length, 1, 4096, integer=True)
        for budget in self.budgets_gb:
            check_range("budget", budget, 0.0, None, low_inclusive=False)
        check_range("extra_memory_gb", self.extra_memory_gb, 0.0, None)
        check_range("processes", self.processes, 1, None, integer=True)
        check_choice("sharding", self.sharding, PLAN_SHARDING)
        if self.sharding != "none" and self.lora:
            raise ConfigError(
                f"sharding={self.sharding!r} shards full fine-tuning; LoRA trains unsharded. Add --full-finetune, "
                "or drop --sharding"
            )

    @property
    def method_defaults(self):
        from align.train.methods import METHODS

        return METHODS[self.method]()

    @property
    def steps(self) -> int:
        return self.num_steps if self.num_steps is not None else self.method_defaults.num_steps

    @property
    def cfg(self) -> bool:
        return self.guidance if self.guidance is not None else self.method_defaults.guidance_scale != 1.0

    @property
    def grad_steps(self) -> int:
        """K: grad-enabled steps along the chain this plan is for."""
        if self.method in ("draft_lv", "refl"):
            return 1
        if self.truncation_steps is not None:
            return self.truncation_steps
        if self.method == "alignprop":
            m = self.method_defaults
            early = max(m.cutoff_low, m.cutoff_mean - 2 * m.cutoff_std)
            first = min(int(math.floor(early * self.steps + 0.5)), self.steps - 1)
            return self.steps - first
        return 1

    @property
    def renoised_copies(self) -> int:
        return self.lv_copies if self.method == "draft_lv" else 0


# ---------------------------------------------------------------------------------------------
# tracing on the meta device
# ---------------------------------------------------------------------------------------------
class LiveBytes(TorchDispatchMode):
    """Counts the bytes of tensor storages created inside the block that are still alive, and their peak.

    Outputs that alias an input (views, in-place results) are not new memory.  A storage is
    released when its last tensor dies (a weak reference to the storage), which is exactly when
    an allocator would get the bytes back.  Works on any device, ``meta`` included.
    """

    def __init__(self) -> None:
        super().__init__()
        self.live = 0
        self.peak = 0
        self._tracked: set[int] = set()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        inputs = {t.untyped_storage()._cdata for t in pytree.tree_leaves((args, kwargs)) if isinstance(t, Tensor)}
        for t in pytree.tree_leaves(out):
            if isinstance(t, Tensor) and t.untyped_storage()._cdata not in inputs:
                self._track(t)
        return out

    def _track(self, tensor: Tensor) -> None:
        storage = tensor.untyped_storage()
        key = storage._cdata
        if key in self._tracked:
            return
        size = storage.nbytes()
        self._tracked.add(key)
        self.live += size
        self.peak = max(self.peak, self.live)
        weakref.finalize(storage, self._release, key, size)

    def _release(self, key: int, size: int) -> None:
        if key in self._tracked:
            self._tracked.discard(key)
            self.live -= size

    def reset_peak(self) -> None:
        self.peak = self.live


@contextlib.contextmanager
def fused_attention() -> Iterator[None]:
    """Inside the block, unmasked ``scaled_dot_product_attention`` on meta tensors runs as the
    fused CPU flash kernel, whose saved tensors (q, k, v, output, log-sum-exp) are those of the
    fused CUDA kernels too; the meta device would otherwise take the math path and keep the
    attention matrix."""
    import torch.nn.functional as F

    original = F.scaled_dot_product_attention

    def sdpa(query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None, **kwargs):
        if attn_mask is None and query.device.type == "meta" and not kwargs:
            return torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(
                query, key, value, dropout_p, is_causal, scale=scale
            )[0]
        return original(query, key, value, attn_mask=attn_mask, dropout_p=dropout_p, is_causal=is_causal, scale=scale, **kwargs)

    F.scaled_dot_product_attention = sdpa
    try:
        yield
    finally:
        F.scaled_dot_product_attention = original


def _nbytes(tensor: Tensor) -> int:
    return tensor.untyped_storage().nbytes()


@dataclass(frozen=True)
class CallMemory:
    """Memory of one call beyond its inputs, in bytes.

    Attributes:
        forward: peak of a grad-free (or checkpointed) forward, output included.
        grad_forward: peak of a grad-enabled forward.
        kept: bytes autograd keeps for the backward after a grad-enabled forward (output excluded).
        output: bytes of the output.
        backward: peak over a grad-enabled forward and its backward (= a checkpointed call recomputed).
    """

    forward: float
    grad_forward: float
    kept: float
    output: float
    backward: float

    def __add__(self, other: CallMemory) -> CallMemory:
        return CallMemory(*(a + b for a, b in zip(self._values(), other._values())))

    def __mul__(self, factor: float) -> CallMemory:
        return CallMemory(*(a * factor for a in self._values()))

    def _values(self) -> tuple[float, ...]:
        return (self.forward, self.grad_forward, self.kept, self.output, self.backward)


def trace_call(fn: Callable[[Tensor], Tensor], x: Tensor) -> CallMemory:
    """Trace ``fn(x)`` (grad-free forward; grad forward + backward) and count its memory.

    Parameters that require grad should already hold a ``.grad`` (so that accumulation, not
    allocation, is traced: gradients are counted separately).
    """
    with fused_attention(), LiveBytes() as live:
        with torch.no_grad():
            out = fn(x)
        forward = live.peak
        del out
        live.reset_peak()
        x = x.detach().requires_grad_(True)
        out = fn(x)
        grad_forward = live.peak
        output = _nbytes(out)
        kept = live.live - output
        out.backward(torch.ones_like(out))
        backward = live.peak
        del out
    return CallMemory(forward, grad_forward, kept, output, backward)


@dataclass(frozen=True)
class Affine:
    """A :class:`CallMemory` affine in the batch size, from traces at batch 1 and 2."""

    at_one: CallMemory
    per_sample: CallMemory

    def at(self, batch: int) -> CallMemory:
        return self.at_one + self.per_sample * (batch - 1)

    @classmethod
    def from_traces(cls, one: CallMemory, two: CallMemory) -> Affine:
        return cls(one, two + one * -1.0)


# ---------------------------------------------------------------------------------------------
# the model on the meta device
# ---------------------------------------------------------------------------------------------
def _from_config(cls, config: Mapping[str, Any]):
    """Build a diffusers model from its config on the current (meta) device."""
    clean = {k: v for k, v in config.items() if not k.startswith("_")}
    return cls.from_config(clean)


@contextlib.contextmanager
def _quiet_diffusers() -> Iterator[None]:
    """Silence diffusers' advice about dtype casts of the (weightless) meta modules."""
    from diffusers.utils import logging

    level = logging.get_verbosity()
    logging.set_verbosity_error()
    try:
        yield
    finally:
        logging.set_verbosity(level)


def _text_encoder_parameters(spec: ModelSpec, name: str) -> int:
    import transformers

    cls_name = spec.component_class(name)
    cls = getattr(transformers, cls_name, None)
    if cls is None:
        raise AlignError(f"{spec.source}: text encoder class {cls_name!r} is not in transformers")
    config = cls.config_class(**{k: v for k, v in spec.configs[name].items() if not k.startswith("_")})
    with torch.device("meta"):
        module = cls(config)
    return sum(p.numel() for p in module.parameters())


def _meta_model(spec: ModelSpec, dtype: torch.dtype, vae_dtype: torch.dtype):
    """A DiffusionModel whose denoiser and VAE live on the meta device (no text encoders)."""
    import diffusers

    from align.core.models import FAMILIES, FLOW_FAMILIES, DiffusionModel

    pipe_cls = getattr(diffusers, spec.pipeline_class, None)
    family = FAMILIES.get(spec.pipeline_class)
    if pipe_cls is None or family is None:
        raise AlignError(
            f"{spec.source}: pipeline {spec.pipeline_class or '(none)'} is not supported; accepted: {', '.join(FAMILIES)}"
        )
    den_name = spec.denoiser_name
    den_cls = getattr(diffusers, spec.component_class(den_name))
    with torch.device("meta"), _quiet_diffusers():
        denoiser = _from_config(den_cls, spec.configs[den_name]).to(dtype).eval()
        vae = _from_config(diffusers.AutoencoderKL, spec.configs["vae"]).to(vae_dtype).eval()
    if family in FLOW_FAMILIES:
        scheduler = diffusers.FlowMatchEulerDiscreteScheduler()
    else:  # the sampler's shape arithmetic is all the planner needs from it
        scheduler = diffusers.DDIMScheduler(clip_sample=False, steps_offset=1)
    kwargs: dict[str, Any] = {}
    for name, param in inspect.signature(pipe_cls.__init__).parameters.items():
        if name in ("unet", "transformer"):
            kwargs[name] = denoiser
        elif name == "vae":
            kwargs[name] = vae
        elif name == "scheduler":
            kwargs[name] = scheduler
        elif name == "requires_safety_checker":
            kwargs[name] = False
        elif param.default is inspect.Parameter.empty and name != "self":
            kwargs[name] = None
    return DiffusionModel(pipe_cls(**kwargs))


def _conditioning(model, spec: ModelSpec, batch: int, height: int, width: int, max_sequence_length: int | None):
    """Text conditioning of the denoiser's shapes (zeros on meta): what encode_prompts would give."""
    cfg = model.module.config
    dtype, meta = model.dtype, torch.device("meta")
    if model.family in ("sd", "sdxl"):
        length = 77
        for name in spec.text_encoders:
            length = int(spec.configs[name].get("max_position_embeddings", length))
        cond = {"encoder_hidden_states": torch.zeros(batch, length, cfg.cross_attention_dim, dtype=dtype, device=meta)}
        if model.family == "sdxl":
            pooled = cfg.projection_class_embeddings_input_dim - 6 * cfg.addition_time_embed_dim
            cond["text_embeds"] = torch.zeros(batch, pooled, dtype=dtype, device=meta)
            cond["time_ids"] = torch.zeros(batch, 6, dtype=dtype, device=meta)
        return cond
    t5 = max_sequence_length or DEFAULT_T5_LENGTH[model.family]
    length = 77 + t5 if model.family == "sd3" else t5
    return {
        "encoder_hidden_states": torch.zeros(batch, length, cfg.joint_attention_dim, dtype=dtype, device=meta),
        "pooled_projections": torch.zeros(batch, cfg.pooled_projection_dim, dtype=dtype, device=meta),
    }


@dataclass(frozen=True)
class _Profiles:
    denoiser: Affine  # one (CFG-batched) denoiser call, per image, gradients already allocated
    first_backward: Affine  # the same call when its backward allocates the gradients (the first in reverse order)
    decode: Affine  # VAE decode, per image
    chain: float  # bytes the sampling chain keeps per grad step and image outside the checkpointed call
    chain_fixed: float


def _chain_bytes(model, spec: ModelSpec, config: PlanConfig, height: int, width: int, batch: int) -> float:
    """Bytes kept per grad-enabled step by the chain itself (scheduler update, CFG inputs), from
    :func:`sample_with_grad` run on meta with a stand-in denoiser that keeps nothing."""
    from align.train.backprop import sample_with_grad
    from align.train.truncation import LastK

    scale = torch.nn.Parameter(torch.ones((), device="meta", dtype=model.dtype))

    def stand_in(x, t, c):
        return x * scale

    schedule = model.schedule(4, eta=config.method_defaults.eta, height=height, width=width)
    cond = _conditioning(model, spec, batch, height, width, config.max_sequence_length)
    uncond = cond if config.cfg else None
    x_T = torch.zeros(model.latent_shape(batch, height, width), device="meta", dtype=model.dtype)
    gens = [torch.Generator().manual_seed(i) for i in range(batch)]
    kept = []
    for k in (1, 2):
        with LiveBytes() as live:
            result = sample_with_grad(stand_in, schedule, x_T, cond, uncond, 7.5, LastK(k).plan(4), generator=gens)
            kept.append(live.live - _nbytes(result.latents))
            del result
    return kept[1] - kept[0]


def _profiles(model, spec: ModelSpec, config: PlanConfig, height: int, width: int) -> _Profiles:
    from align.core.sampling import guided_prediction

    trainable = [p for p in model.module.parameters() if p.requires_grad]
    traces, firsts, decodes, chains = [], [], [], []
    for batch in (1, 2):
        cond = _conditioning(model, spec, batch, height, width, config.max_sequence_length)
        uncond = cond if config.cfg else None
        t = torch.full((batch,), 500.0, device="meta", dtype=torch.float32)
        x = torch.zeros(model.latent_shape(batch, height, width), device="meta", dtype=model.dtype)

        def call(x_in, cond=cond, uncond=uncond, t=t):
            return guided_prediction(model.denoiser, x_in, t, cond, uncond, 7.5)

        # The step's first backward through a denoiser call creates the gradients as it goes, while
        # activations are being freed: its peak is below "all gradients + the call's backward".
        for p in trainable:
            p.grad = None
        firsts.append(trace_call(call, x))
        for p in trainable:
            p.grad = torch.zeros_like(p)
        traces.append(trace_call(call, x))
        decodes.append(trace_call(partial(model.decode, gradient_checkpointing=config.gradient_checkpointing), x))
        chains.append(_chain_bytes(model, spec, config, height, width, batch))
    per = chains[1] - chains[0]
    return _Profiles(Affine.from_traces(*traces), Affine.from_traces(*firsts), Affine.from_traces(*decodes), per, chains[0] - per)


# ---------------------------------------------------------------------------------------------
# the plan
# ---------------------------------------------------------------------------------------------
@dataclass
class Fit:
    """Largest settings that fit a budget (None: not even 1 fits)."""

    budget_gb: float
    max_batch_size: int | None
    max_truncation_steps: int | None


@dataclass
class MemoryPlan:
    """Predicted memory of one optimiser step, in bytes.

    Attributes:
        config: the settings planned for.
        family: model family (sd, sdxl, sd3, flux).
        height: image height in pixels.
        width: image width in pixels.
        weights: resident weights per component (denoiser, vae, text encoders, lora).
        trainable_parameters: number of trained parameters.
        gradients: gradient bytes (present from the first backward to the optimiser step).
        optimizer_state: AdamW state bytes (two moments).
        phases: memory above weights + optimizer state at each phase of the step (gradients included
            where they exist).
        peak_phase: the phase where the peak occurs.
        extra: memory added for what is not modelled (extra_memory_gb).
        fits: the largest batch size / K per budget.
    """

    config: PlanConfig
    family: str
    height: int
    width: int
    weights: dict[str, float]
    trainable_parameters: int
    gradients: float
    optimizer_state: float
    phases: dict[str, float]
    peak_phase: str
    extra: float
    fits: list[Fit] = field(default_factory=list)

    @property
    def step_peak(self) -> float:
        """Peak above the resident weights and optimizer state: what one step adds."""
        return self.phases[self.peak_phase]

    @property
    def total(self) -> float:
        return sum(self.weights.values()) + self.optimizer_state + self.step_peak + self.extra

    @property
    def activations(self) -> float:
        """The peak phase's memory without the gradients."""
        grads = self.gradients if self.peak_phase in _PHASES_WITH_GRADIENTS else 0.0
        return self.step_peak - grads

    def to_dict(self) -> dict[str, Any]:
        from align.core.config import to_dict

        return {
            "config": to_dict(self.config),
            "family": self.family,
            "resolution": [self.height, self.width],
            "grad_steps": self.config.grad_steps,
            "num_steps": self.config.steps,
            "weights_bytes": self.weights,
            "trainable_parameters": self.trainable_parameters,
            "gradients_bytes": self.gradients,
            "optimizer_state_bytes": self.optimizer_state,
            "phases_bytes": self.phases,
            "peak_phase": self.peak_phase,
            "step_peak_bytes": self.step_peak,
            "extra_bytes": self.extra,
            "total_bytes": self.total,
            "fits": [vars(f) for f in self.fits],
        }


_PHASES_WITH_GRADIENTS = ("denoiser backward", "optimizer step")
_DENOISER_FORWARD_PHASES = ("grad-free sampling", "grad steps forward", "re-noised copies forward")


def _phases(p: _Profiles, batch: int, k: int, copies: int, grad_free: int, ckpt: bool, grads: float, opt: float) -> dict[str, float]:
    """Memory above weights and optimizer state through one step (see the module docstring)."""
    call, call_copies = p.denoiser.at(batch), p.denoiser.at(batch * copies) if copies else None
    decode = p.decode.at(batch * (1 + copies))

    def keep(c: CallMemory, b: int) -> float:
        return p.chain_fixed + p.chain * b + (0.0 if ckpt else c.kept)

    def fwd(c: CallMemory) -> float:
        return c.forward if ckpt else c.grad_forward

    phases: dict[str, float] = {}
    if grad_free:
        phases["grad-free sampling"] = call.forward
    kept = (k - 1) * keep(call, batch)
    phases["grad steps forward"] = kept + fwd(call)
    kept += keep(call, batch)
    if call_copies is not None:
        phases["re-noised copies forward"] = kept + fwd(call_copies)
        kept += keep(call_copies, batch * copies)
    # the decode is traced as it runs (block-checkpointed or not): what it keeps is its own trace's
    phases["decode forward"] = kept + decode.grad_forward
    phases["reward"] = kept + decode.kept + decode.output
    phases["decode backward"] = kept + decode.backward
    # in reverse order; the first call's backward allocates the gradients (its trace counts them)
    backward = []
    if call_copies is not None:
        kept -= keep(call_copies, batch * copies)
        backward.append(kept + p.first_backward.at(batch * copies).backward)
    kept -= keep(call, batch)
    backward.append(kept + (call.backward + grads if backward else p.first_backward.at(batch).backward))
    if k > 1:  # the next call back, with every gradient present
        backward.append(kept - keep(call, batch) + grads + call.backward)
    phases["denoiser backward"] = max(backward)
    phases["optimizer step"] = grads + opt
    return phases


class MemoryPlanner:
    """Traces a model's calls once and predicts the step peak for any batch size and K."""

    def __init__(self, config: PlanConfig, spec: ModelSpec | None = None):
        from align.core.lora import LoRAConfig, add_lora

        self.config = config
        self.spec = spec if spec is not None else load_spec(config.model, offline=config.offline)
        dtype = DTYPES[config.mixed_precision]
        vae_dtype = torch.float32 if config.mixed_precision == "fp16" else dtype  # the trainer decodes fp16 in fp32
        self.model = model = _meta_model(self.spec, dtype, vae_dtype)
        if config.resolution is not None:
            self.height = self.width = config.resolution
        else:
            self.height, self.width = model.default_resolution()
        model.check_resolution(self.height, self.width)
        lora = LoRAConfig(rank=config.lora_rank, target_modules=list(config.lora_targets), enabled=config.lora)
        params = add_lora(model, lora)
        self.trainable = sum(p.numel() for p in params)
        trained_bytes = sum(p.numel() * p.element_size() for p in params)
        self.gradients = float(trained_bytes)
        self.optimizer_state = 2.0 * trained_bytes
        # AdamW's temporaries: the CUDA (foreach) path holds one copy of all trained tensors at
        # once; the CPU path works one tensor at a time.
        largest = max((p.numel() * p.element_size() for p in params), default=0)
        self.optimizer_temporary = float(trained_bytes if config.device == "cuda" else 2 * largest)
        frozen = sum(p.numel() * p.element_size() for p in model.module.parameters() if not p.requires_grad)
        self.weights = {
            "denoiser": float(frozen if config.lora else trained_bytes),
            "vae": float(sum(p.numel() * p.element_size() for p in model.pipe.vae.parameters())),
        }
        if config.lora:
            self.weights["lora"] = float(trained_bytes)
        size = torch.tensor([], dtype=dtype).element_size()
        for name in self.spec.text_encoders:
            self.weights[name] = float(_text_encoder_parameters(self.spec, name) * size)
        self.gathered_forward = self.gathered_backward = 0.0
        if config.sharding != "none":
            shard = sharded_memory(
                self.trainable, config.processes, torch.tensor([], dtype=dtype).element_size(), config.sharding,
                max(unit_sizes(model.module)),
            )
            self.weights["denoiser"] = shard.weights
            self.gradients, self.optimizer_state = shard.gradients, shard.optimizer_state
            self.optimizer_temporary = shard.optimizer_temporary if config.device == "cuda" else 0.0
            self.gathered_forward, self.gathered_backward = shard.gathered_forward, shard.gathered_backward
        if dtype != torch.float32:
            # under autocast the float32 LoRA weights compute in the low dtype; trace them so (their float32
            # bytes are counted above), or peft's casts would keep float32 copies of every adapted input
            for p in params:
                p.data = p.data.to(dtype)
        self.profiles = _profiles(model, self.spec, config, self.height, self.width)

    def phases(self, batch_size: int, grad_steps: int, num_steps: int | None = None) -> dict[str, float]:
        """Memory above weights and optimizer state through one step, by phase."""
        c = self.config
        steps = c.steps if num_steps is None else num_steps
        profiles = self.profiles
        if c.sharding != "none":
            # the traced first backward allocates every gradient of the whole denoiser; sharded, each block's
            # unsharded gradient lives only until it is reduce-scattered (gathered_backward) into the shards
            profiles = replace(profiles, first_backward=profiles.denoiser)
        phases = _phases(
            profiles, batch_size, grad_steps, c.renoised_copies, steps - grad_steps, c.gradient_checkpointing,
            self.gradients, self.optimizer_temporary,
        )
        # sharded: the blocks gathered while the denoiser runs (none during the decode, reward and optimiser step)
        for name in phases:
            if name == "denoiser backward":
                phases[name] += self.gathered_backward
            elif name in _DENOISER_FORWARD_PHASES:
                phases[name] += self.gathered_forward
        return phases

    def total(self, batch_size: int, grad_steps: int, num_steps: int | None = None) -> float:
        """Predicted peak of one step, in bytes."""
        step = max(self.phases(batch_size, grad_steps, num_steps).values())
        return sum(self.weights.values()) + self.optimizer_state + step + self.config.extra_memory_gb * GB

    def plan(self) -> MemoryPlan:
        c = self.config
        phases = self.phases(c.batch_size, c.grad_steps)
        peak_phase = max(phases, key=phases.get)
        fits = [self.fit(budget) for budget in c.budgets_gb]
        return MemoryPlan(
            c, self.model.family, self.height, self.width, dict(self.weights), self.trainable, self.gradients,
            self.optimizer_state, phases, peak_phase, c.extra_memory_gb * GB, fits,
        )

    def fit(self, budget_gb: float) -> Fit:
        """Largest batch size (at the planned K) and largest K (at the planned batch) within ``budget_gb``."""
        c, budget = self.config, budget_gb * GB

        def largest(fits: Callable[[int], bool], upper: int) -> int | None:
            if not fits(1):
                return None
            lo, hi = 1, 2
            while hi <= upper and fits(hi):
                lo, hi = hi, hi * 2
            hi = min(hi, upper + 1)
            while hi - lo > 1:  # fits(lo) and not fits(hi) (or hi beyond upper)
                mid = (lo + hi) // 2
                lo, hi = (mid, hi) if fits(mid) else (lo, mid)
            return lo

        batch = largest(lambda b: self.total(b, c.grad_steps) <= budget, 1 << 16)
        if c.method in ("draft", "alignprop"):
            k = largest(lambda k: self.total(c.batch_size, k) <= budget, c.steps)
        else:
            k = 1 if self.total(c.batch_size, 1) <= budget else None
        return Fit(budget_gb, batch, k)


def plan_memory(config: PlanConfig, spec: ModelSpec | None = None) -> MemoryPlan:
    """Predict the peak memory of one optimiser step (see the module docstring)."""
    return MemoryPlanner(config, spec).plan()


# ---------------------------------------------------------------------------------------------
# report
# ---------------------------------------------------------------------------------------------
def _gb(n: float) -> str:
    return f"{n / GB:7.2f} GB"


def format_plan(plan: MemoryPlan) -> str:
    c = plan.config
    k, t = c.grad_steps, c.steps
    window = {
        "draft": f"K={k} of T={t} steps",
        "alignprop": f"K={k} of T={t} steps" + ("" if c.truncation_steps else " (window drawn per batch; planned at the cut-off 2 std early)"),
        "draft_lv": f"K=1 + {c.lv_copies} re-noised copies, T={t} steps",
        "refl": f"one grad step of T={t}",
    }[c.method]
    lines = [
        f"model      {c.model} ({plan.family}), {plan.height}x{plan.width} px",
        f"method     {c.method}: {window}; batch {c.batch_size}; CFG {'on' if c.cfg else 'off'}",
        f"training   {'LoRA rank ' + str(c.lora_rank) if c.lora else 'full fine-tuning'}"
        f"{'' if c.sharding == 'none' else f', sharded ({c.sharding}) over {c.processes} processes: per process'}"
        f"; gradient checkpointing "
        f"{'on' if c.gradient_checkpointing else 'off'}; mixed precision {c.mixed_precision}; device {c.device}",
        "",
        "weights",
    ]
    for name, size in plan.weights.items():
        lines.append(f"  {name:<24}{_gb(size)}")
    lines += [
        f"trainable parameters        {plan.trainable_parameters / 1e6:.2f} M",
        f"gradients                 {_gb(plan.gradients)}",
        f"optimizer state (AdamW)   {_gb(plan.optimizer_state)}",
        "step memory above weights and optimizer state, by phase:",
    ]
    for name, size in plan.phases.items():
        mark = "  <- peak" if name == plan.peak_phase else ""
        lines.append(f"  {name:<24}{_gb(size)}{mark}")
    if plan.extra:
        lines.append(f"extra (not modelled)      {_gb(plan.extra)}")
    lines += [f"predicted peak            {_gb(plan.total)}", ""]
    for fit in plan.fits:
        batch = "nothing fits" if fit.max_batch_size is None else f"batch_size <= {fit.max_batch_size} (at K={k})"
        if c.method in ("draft", "alignprop"):
            ks = "no K fits" if fit.max_truncation_steps is None else f"truncation_steps <= {fit.max_truncation_steps} (at batch {c.batch_size})"
            lines.append(f"budget {fit.budget_gb:g} GB: {batch}; {ks}")
        else:
            lines.append(f"budget {fit.budget_gb:g} GB: {batch}")
    lines.append(
        "(not modelled: allocator fragmentation and cuDNN workspaces, autocast's float32 islands, the reward model; "
        "add it with --extra-memory)"
    )
    return "\n".join(lines)
