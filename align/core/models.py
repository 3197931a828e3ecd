"""Loading diffusers pipelines and exposing what the samplers need from them.

:class:`DiffusionModel` is a thin layer over a diffusers pipeline of a supported family
(SD 1.x/2.x, SDXL, SD3, FLUX): it encodes prompts once per batch, wraps the denoiser in the
common calling convention (:mod:`align.core.denoisers`), builds the sampling schedule and decodes
latents to images in [0, 1] (optionally with gradient checkpointing, in chunks).

Every command loads its model through :func:`load_model`.  Models are named by ``"builtin"``
(the tiny model shipped with the package), a local diffusers folder, or a Hugging Face hub id.
Offline mode (``HF_HUB_OFFLINE=1`` or ``offline=True``) only reads the local cache.  Weights
load through safetensors; pickle checkpoints are refused unless ``allow_pickle=True``.

Precision, one rule for every command (:func:`resolve_dtype`): ``dtype="auto"`` is bfloat16 on
a CUDA device that supports it, float16 on other CUDA devices and float32 elsewhere.  Modules
that the weights' library keeps in float32 (``_keep_in_fp32_modules``, e.g. T5's ``wo``) stay
in float32, and the VAE decodes in float32 when :meth:`DiffusionModel.decodes_in_fp32` says so.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import os
import warnings
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import torch
from torch import Tensor
from torch.utils.checkpoint import checkpoint

from align.core.denoisers import FluxDenoiser, ModuleDenoiser, SD3Denoiser, UNetDenoiser
from align.core.errors import AlignError, ConfigError, check_choice, check_device, check_range
from align.core.hub import explain_load_failure
from align.core.model_notes import ModelNotes
from align.core.paths import is_dir, is_file, user_path
from align.core.sampling import SamplingSchedule

logger = logging.getLogger(__name__)

BUILTIN_MODELS = {"builtin": "shapes", "builtin:shapes": "shapes"}

#: pipeline class name -> family
FAMILIES = {
    "StableDiffusionPipeline": "sd",
    "StableDiffusionXLPipeline": "sdxl",
    "StableDiffusion3Pipeline": "sd3",
    "FluxPipeline": "flux",
}
FLOW_FAMILIES = ("sd3", "flux")
SAMPLERS = ("auto", "ddim", "ddpm", "flow")
#: weight dtypes by name; "auto" resolves per device (:func:`resolve_dtype`)
DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
DTYPE_CHOICES = ("auto", *DTYPES)
#: FLUX-dev's distilled guidance when none is given (diffusers' FluxPipeline default)
DEFAULT_DISTILLED_GUIDANCE = 3.5


def builtin_model_path(name: str = "shapes") -> Path:
    """Folder of a built-in model shipped inside the package."""
    return Path(__file__).resolve().parents[1] / "builtin" / name


def hub_offline(offline: bool | None = None) -> bool:
    """Whether hub access is disabled (explicitly or by ``HF_HUB_OFFLINE``)."""
    if offline is not None:
        return offline
    return os.environ.get("HF_HUB_OFFLINE", "0").lower() in ("1", "true", "yes", "on")


def _looks_like_path(name: str) -> bool:
    return (
        name.startswith((".", "/", "~"))
        or name.count("/") > 1
        or os.sep in name and os.sep != "/"
        or name.endswith((".safetensors", ".ckpt", ".pt", ".bin"))
    )


def resolve_model(model: str, offline: bool | None = None) -> str:
    """Turn a model name into what ``from_pretrained`` takes, or raise a clear AlignError."""
    if not isinstance(model, str) or not model.strip():
        raise AlignError(f"model={model!r} is empty; accepted: 'builtin', a local diffusers folder, or a hub id")
    if model in BUILTIN_MODELS:
        path = builtin_model_path(BUILTIN_MODELS[model])
        if not (path / "model_index.json").is_file():
            raise AlignError(
                f"the built-in model is missing from {path}; rebuild it with "
                "`python scripts/train_builtin_model.py` (see README)"
            )
        return str(path)
    path = user_path(model)
    if is_file(path) or is_dir(path):
        if path.is_file():
            raise AlignError(
                f"model={model!r} is a single file; accepted: a diffusers folder (with model_index.json) "
                "or a hub id. Convert single-file checkpoints with diffusers' from_single_file first."
            )
        if not (path / "model_index.json").is_file():
            raise AlignError(f"model={model!r} is a folder without model_index.json; it is not a diffusers pipeline")
        return str(path)
    if _looks_like_path(model):
        raise AlignError(
            f"model={model!r} does not exist; accepted: 'builtin', an existing local diffusers folder, "
            "or a hub id such as 'stable-diffusion-v1-5/stable-diffusion-v1-5'"
        )
    return model


def resolve_device(device: str | torch.device = "auto") -> torch.device:
    """'auto' is the current CUDA device when there is one, else the CPU; a CUDA device without CUDA is an error."""
    if isinstance(device, torch.device):
        return device
    check_device("device", device)
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise AlignError(f"device={device!r} but no CUDA device is available; use device=cpu or device=auto")
    return torch.device(device)


def resolve_dtype(dtype: str | torch.dtype = "auto", device: str | torch.device = "auto") -> torch.dtype:
    """The weight dtype every command uses: a name from :data:`DTYPE_CHOICES` or a torch dtype.

    ``"auto"`` is bfloat16 on a CUDA device that supports it natively (compute capability 8 and
    up: the range of float32, so nothing overflows), float16 on older CUDA devices, and float32
    on the CPU and anything else (half precision there is slow and only partly supported).
    """
    if isinstance(dtype, torch.dtype):
        if dtype not in DTYPES.values():
            raise AlignError(f"dtype={dtype} is not supported; accepted: {', '.join(DTYPE_CHOICES)}")
        return dtype
    check_choice("dtype", dtype, DTYPE_CHOICES)
    if dtype != "auto":
        return DTYPES[dtype]
    device = resolve_device(device)
    if device.type != "cuda":
        return torch.float32
    with torch.cuda.device(device):
        return torch.bfloat16 if torch.cuda.is_bf16_supported(including_emulation=False) else torch.float16


def fp32_module_names(module: torch.nn.Module, dtype: torch.dtype) -> frozenset[str]:
    """Names of the submodules that ``from_pretrained(torch_dtype=dtype)`` keeps in float32.

    transformers keeps ``_keep_in_fp32_modules`` (T5's ``wo``, whose activations overflow float16)
    only for float16 and ``_keep_in_fp32_modules_strict`` for float16 and bfloat16; diffusers
    keeps its models' ``_keep_in_fp32_modules`` for any dtype.
    """
    if dtype == torch.float32:
        return frozenset()
    from transformers import PreTrainedModel

    keep = set(getattr(module, "_keep_in_fp32_modules", None) or ())
    if isinstance(module, PreTrainedModel):
        if dtype != torch.float16:
            keep = set()
        if dtype in (torch.float16, torch.bfloat16):
            keep |= set(getattr(module, "_keep_in_fp32_modules_strict", None) or ())
    return frozenset(keep)


def cast_module(module: torch.nn.Module, dtype: torch.dtype) -> None:
    """Cast the floating-point parameters and buffers of ``module`` to ``dtype`` in place, except those
    under a submodule that :func:`fp32_module_names` keeps in float32 (they become float32).

    A name matches when one of its dot-separated parts is a kept name (diffusers' loader rule; the
    transformers names of the supported encoders, such as T5's ``wo``, match the same way).  Each
    tensor is cast once, from its own dtype, so a kept float32 weight never round-trips through
    ``dtype``.
    """
    keep = fp32_module_names(module, dtype)

    def target(name: str) -> torch.dtype:
        return torch.float32 if keep and not keep.isdisjoint(name.split(".")[:-1]) else dtype

    for name, param in module.named_parameters():
        if param.is_floating_point() and param.dtype != target(name):
            param.data = param.data.to(target(name))
    for name, buffer in module.named_buffers():
        if buffer.is_floating_point() and buffer.dtype != target(name):
            owner, _, leaf = name.rpartition(".")
            setattr(module.get_submodule(owner), leaf, buffer.to(target(name)))


def check_guidance(guidance_scale: float | None, distilled_guidance: float, true_cfg: bool = False) -> None:
    """Validate the guidance fields every sampling config has (see :meth:`DiffusionModel.cfg_scale`)."""
    if guidance_scale is not None:
        check_range("guidance_scale", guidance_scale, 0.0, None)
    check_range("distilled_guidance", distilled_guidance, 0.0, None)
    if true_cfg and (guidance_scale is None or guidance_scale <= 1.0):
        raise ConfigError(
            f"true_cfg=true asks for classifier-free guidance but guidance_scale={guidance_scale!r}; "
            "accepted with true_cfg: guidance_scale > 1"
        )


@dataclass
class PromptConditioning:
    """Text conditioning of one batch: ``cond`` and, for classifier-free guidance, ``uncond``."""

    cond: dict[str, Tensor]
    uncond: dict[str, Tensor] | None

    def __len__(self) -> int:
        return next(iter(self.cond.values())).shape[0]


class DiffusionModel:
    """A diffusers pipeline seen through the toolkit's calling conventions.

    Args:
        pipe: a pipeline of a supported family (or derived from one).
        distilled_guidance: the guidance value a guidance-distilled model (FLUX-dev) embeds; ignored
            by other models.
        upcast_vae: always decode in float32 (False: only when :meth:`decodes_in_fp32` says the VAE
            needs it).
    """

    def __init__(self, pipe, *, distilled_guidance: float = DEFAULT_DISTILLED_GUIDANCE, upcast_vae: bool = False):
        name = type(pipe).__name__
        family = FAMILIES.get(name)
        if family is None:
            for cls in type(pipe).__mro__:
                family = FAMILIES.get(cls.__name__)
                if family:
                    break
        if family is None:
            raise AlignError(
                f"pipeline {name} is not supported; accepted: {', '.join(FAMILIES)} "
                "(or pipelines derived from them)"
            )
        self.pipe = pipe
        self.family = family
        self.upcast_vae = upcast_vae
        if family in FLOW_FAMILIES:
            module = pipe.transformer
            self.denoiser: ModuleDenoiser = (
                SD3Denoiser(module) if family == "sd3" else FluxDenoiser(module, guidance=distilled_guidance)
            )
        else:
            module = pipe.unet
            self.denoiser = UNetDenoiser(module, pipe.scheduler.config.prediction_type)
        self.source: str | None = getattr(pipe, "name_or_path", None) or pipe.config.get("_name_or_path")
        self._vocabulary_warned = False

    @functools.cached_property
    def notes(self) -> ModelNotes | None:
        """What the model's folder says about itself (``diffusion_align.json``: recommended settings,
        vocabulary), or None."""
        return ModelNotes.read(self.source) if self.source and is_dir(self.source) else None

    def warn_unknown_words(self, prompts: Sequence[str]) -> None:
        """Warn once per model when prompts use words its text encoder does not know (the built-in model)."""
        if self._vocabulary_warned or self.notes is None:
            return
        message = self.notes.vocabulary_warning(prompts)
        if message:
            self._vocabulary_warned = True
            logger.warning(message)

    # ------------------------------------------------------------------ precision
    def cast(self, dtype: torch.dtype) -> None:
        """Put every component's weights in ``dtype`` as ``from_pretrained(torch_dtype=dtype)`` would.

        Modules the weights' library keeps in float32 stay in float32 (:func:`cast_module`), and the
        VAE is held in float32 when it decodes in float32 for ``dtype`` (:meth:`decodes_in_fp32`).
        Call it before adding LoRA adapters: they are created in float32 and must stay so.
        """
        vae = self.pipe.vae
        for component in self.pipe.components.values():
            if isinstance(component, torch.nn.Module):
                fp32_vae = component is vae and self.decodes_in_fp32(dtype)
                cast_module(component, torch.float32 if fp32_vae else dtype)

    def decodes_in_fp32(self, compute_dtype: torch.dtype) -> bool:
        """Whether the VAE decodes in float32 (weights and activations, autocast off) when the rest of
        the model computes in ``compute_dtype``.

        Always with ``upcast_vae``; otherwise as diffusers does: when ``compute_dtype`` is float16 and
        the VAE's config sets ``force_upcast`` (SDXL's VAE overflows in float16; fp16-fixed VAEs set it
        to false).  bfloat16 has float32's range and is not upcast unless asked.
        """
        if self.upcast_vae:
            return True
        return compute_dtype == torch.float16 and bool(getattr(self.pipe.vae.config, "force_upcast", False))

    # ------------------------------------------------------------------ guidance
    @property
    def guidance_distilled(self) -> bool:
        """Whether the denoiser embeds a distilled guidance value (FLUX-dev: ``guidance_embeds`` in its
        config) in place of classifier-free guidance."""
        return bool(getattr(self.module.config, "guidance_embeds", False))

    @property
    def distilled_guidance(self) -> float | None:
        """The guidance value a guidance-distilled model embeds; None for other models."""
        return float(self.denoiser.guidance) if self.guidance_distilled else None

    @distilled_guidance.setter
    def distilled_guidance(self, value: float) -> None:
        if isinstance(self.denoiser, FluxDenoiser):
            self.denoiser.guidance = float(value)

    def cfg_scale(self, guidance_scale: float, *, true_cfg: bool = False) -> float:
        """The classifier-free guidance scale to sample with (1: no CFG, one denoiser call per step).

        A guidance-distilled model samples as diffusers' FluxPipeline does: with its embedded
        ``distilled_guidance`` and no classifier-free pass.  ``guidance_scale`` applies to it only
        with ``true_cfg`` (classifier-free guidance on top, twice the denoiser compute); otherwise
        a notice says that it is not used.
        """
        if self.guidance_distilled and not true_cfg:
            if guidance_scale != 1.0:
                logger.warning(
                    "%s is guidance-distilled: sampling with its embedded distilled_guidance=%g and no "
                    "classifier-free guidance; guidance_scale=%g is not used (set true_cfg=true to run "
                    "classifier-free guidance on top, at twice the denoiser compute)",
                    self.source or f"this {self.family} model", self.distilled_guidance, guidance_scale,
                )
            return 1.0
        return float(guidance_scale)

    # ------------------------------------------------------------------ properties
    @property
    def module(self) -> torch.nn.Module:
        """The denoiser network (UNet or transformer) that LoRA adapters attach to."""
        return self.denoiser.module

    @property
    def device(self) -> torch.device:
        return self.module.device

    @property
    def dtype(self) -> torch.dtype:
        return self.module.dtype

    @property
    def is_flow(self) -> bool:
        return self.family in FLOW_FAMILIES

    @property
    def vae_scale_factor(self) -> int:
        return 2 ** (len(self.pipe.vae.config.block_out_channels) - 1)

    @property
    def latent_channels(self) -> int:
        if self.family == "flux":
            return self.module.config.in_channels // 4
        if self.is_flow:
            return self.module.config.in_channels
        return self.module.config.in_channels

    def default_resolution(self) -> tuple[int, int]:
        """The model's native (height, width) in pixels."""
        # FLUX has no sample_size; 128 latents = 1024 px
        size = 128 if self.family == "flux" else self.module.config.sample_size
        size = size * self.vae_scale_factor
        return int(size), int(size)

    def check_resolution(self, height: int, width: int) -> None:
        multiple = self.vae_scale_factor * (2 if self.family in ("flux", "sd3") else 1)
        if self.family == "sd3":
            multiple = self.vae_scale_factor * self.module.config.patch_size
        if self.family in ("sd", "sdxl"):
            # the UNet halves the latent once per down block after the first
            multiple = self.vae_scale_factor * 2 ** (len(self.module.config.block_out_channels) - 1)
        for name, value in (("height", height), ("width", width)):
            if not isinstance(value, int) or value <= 0 or value % multiple:
                raise AlignError(
                    f"{name}={value!r} is not supported by this {self.family} model; accepted: positive "
                    f"multiples of {multiple} pixels"
                )

    def latent_shape(self, batch_size: int, height: int, width: int) -> tuple[int, int, int, int]:
        self.check_resolution(height, width)
        f = self.vae_scale_factor
        return (batch_size, self.latent_channels, height // f, width // f)

    # ------------------------------------------------------------------ schedules
    def make_scheduler(self, sampler: str = "auto"):
        """A fresh diffusers scheduler of kind ``sampler`` built from the model's scheduler config."""
        from diffusers import DDIMScheduler, DDPMScheduler, FlowMatchEulerDiscreteScheduler

        check_choice("sampler", sampler, SAMPLERS)
        config = self.pipe.scheduler.config
        if self.is_flow:
            if sampler not in ("auto", "flow"):
                raise AlignError(
                    f"sampler={sampler!r} does not apply to the flow-matching family {self.family}; accepted: 'flow'"
                )
            return FlowMatchEulerDiscreteScheduler.from_config(config)
        if sampler == "flow":
            raise AlignError(f"sampler='flow' does not apply to the {self.family} (UNet) family; accepted: 'ddim', 'ddpm'")
        return (DDPMScheduler if sampler == "ddpm" else DDIMScheduler).from_config(config)

    def schedule(
        self,
        num_steps: int,
        *,
        sampler: str = "auto",
        eta: float | None = None,
        height: int | None = None,
        width: int | None = None,
    ) -> SamplingSchedule:
        """The sampling schedule of ``num_steps`` steps (resolution matters for FLUX's shift)."""
        scheduler = self.make_scheduler(sampler)
        kwargs: dict = {}
        if self.is_flow and getattr(scheduler.config, "use_dynamic_shifting", False):
            h, w = (height, width) if height and width else self.default_resolution()
            seq = (h // self.vae_scale_factor // 2) * (w // self.vae_scale_factor // 2)
            c = scheduler.config
            base_len, max_len = c.get("base_image_seq_len", 256), c.get("max_image_seq_len", 4096)
            base_shift, max_shift = c.get("base_shift", 0.5), c.get("max_shift", 1.15)
            slope = (max_shift - base_shift) / (max_len - base_len)
            kwargs["mu"] = seq * slope + base_shift - slope * base_len
        if self.family == "flux":
            kwargs["sigmas"] = torch.linspace(1.0, 1.0 / num_steps, num_steps).tolist()
        return SamplingSchedule.from_scheduler(scheduler, num_steps, eta=eta, device=self.device, **kwargs)

    # ------------------------------------------------------------------ text
    def encode_prompts(
        self,
        prompts: Sequence[str],
        *,
        negative_prompt: str | Sequence[str] | None = None,
        guidance: bool = True,
        height: int | None = None,
        width: int | None = None,
        max_sequence_length: int | None = None,
    ) -> PromptConditioning:
        """Encode a batch of prompts once; ``uncond`` is set when ``guidance`` (CFG) is on.

        Gradients flow through the text encoders when they have trainable (LoRA) parameters.
        """
        prompts = list(prompts)
        if not prompts or not all(isinstance(p, str) for p in prompts):
            raise AlignError(f"prompts={prompts!r} must be a non-empty list of strings")
        self.warn_unknown_words(prompts)
        pipe, device = self.pipe, self.device
        neg = negative_prompt
        if isinstance(neg, str):
            neg = [neg] * len(prompts)
        if self.family == "sd":
            cond, uncond = pipe.encode_prompt(prompts, device, 1, guidance, negative_prompt=neg)
            return PromptConditioning(
                {"encoder_hidden_states": cond},
                {"encoder_hidden_states": uncond} if guidance else None,
            )
        if self.family == "sdxl":
            cond, uncond, pooled, pooled_uncond = pipe.encode_prompt(
                prompts, device=device, num_images_per_prompt=1, do_classifier_free_guidance=guidance,
                negative_prompt=neg,
            )
            h, w = (height, width) if height and width else self.default_resolution()
            proj = (
                pipe.text_encoder_2.config.projection_dim if pipe.text_encoder_2 is not None else int(pooled.shape[-1])
            )
            time_ids = pipe._get_add_time_ids((h, w), (0, 0), (h, w), dtype=cond.dtype, text_encoder_projection_dim=proj)
            time_ids = time_ids.to(device).repeat(len(prompts), 1)
            c = {"encoder_hidden_states": cond, "text_embeds": pooled, "time_ids": time_ids}
            u = {"encoder_hidden_states": uncond, "text_embeds": pooled_uncond, "time_ids": time_ids} if guidance else None
            return PromptConditioning(c, u)
        if self.family == "sd3":
            kwargs = {} if max_sequence_length is None else {"max_sequence_length": max_sequence_length}
            cond, uncond, pooled, pooled_uncond = pipe.encode_prompt(
                prompts, None, None, device=device, num_images_per_prompt=1,
                do_classifier_free_guidance=guidance, negative_prompt=neg, **kwargs,
            )
            c = {"encoder_hidden_states": cond, "pooled_projections": pooled}
            u = {"encoder_hidden_states": uncond, "pooled_projections": pooled_uncond} if guidance else None
            return PromptConditioning(c, u)
        # flux: guidance-distilled; true CFG (guidance=True) encodes the negative prompt separately
        kwargs = {} if max_sequence_length is None else {"max_sequence_length": max_sequence_length}
        cond, pooled, _ = pipe.encode_prompt(prompts, None, device=device, num_images_per_prompt=1, **kwargs)
        c = {"encoder_hidden_states": cond, "pooled_projections": pooled}
        u = None
        if guidance:
            ucond, upooled, _ = pipe.encode_prompt(neg or [""] * len(prompts), None, device=device, **kwargs)
            u = {"encoder_hidden_states": ucond, "pooled_projections": upooled}
        return PromptConditioning(c, u)

    # ------------------------------------------------------------------ images
    def _decode_chunk(self, latents: Tensor) -> Tensor:
        vae = self.pipe.vae
        # unscale in the wider of the two dtypes, then hand the VAE its own dtype
        z = latents.to(torch.promote_types(latents.dtype, vae.dtype)) / vae.config.scaling_factor
        shift = getattr(vae.config, "shift_factor", None)
        if shift is not None:
            z = z + shift
        image = vae.decode(z.to(vae.dtype), return_dict=False)[0]
        if image.dtype in (torch.float16, torch.bfloat16):
            image = image.float()  # rewards see at least fp32 pixels
        return (image / 2 + 0.5).clamp(0, 1)

    def decode(self, latents: Tensor, *, gradient_checkpointing: bool = False, chunk_size: int | None = None) -> Tensor:
        """Decode latents to images in [0, 1], [B, 3, H, W] (float32, or float64 for a float64 VAE).

        When :meth:`decodes_in_fp32` holds for the dtype the model computes in (the autocast dtype
        inside an autocast region, else the denoiser's), the decode runs in float32 with autocast
        off: the VAE is held in float32 (cast once, here, if it is not yet) and the latents are cast
        to float32; gradients flow back to the latents in their own dtype.  Otherwise it runs in the
        VAE's dtype, under whatever autocast is active.

        With ``gradient_checkpointing`` every resnet, attention and upsampling block of the decoder
        is checkpointed on its own: the backward recomputes one block at a time, so its peak is one
        block's activations plus the block inputs, not the whole decoder's activations (which is
        what checkpointing the decode as one piece costs, since its backward recomputes them all
        at once).  The recomputation restores the forward's autocast state.  ``chunk_size`` bounds
        how many latents are decoded at once.
        """
        device_type = latents.device.type
        # devices without autocast (the meta device the memory planner traces on) have none to turn off
        has_autocast = torch.amp.is_autocast_available(device_type)
        autocast = has_autocast and torch.is_autocast_enabled(device_type)
        compute_dtype = torch.get_autocast_dtype(device_type) if autocast else self.dtype
        fp32 = self.decodes_in_fp32(compute_dtype)
        if fp32 and self.pipe.vae.dtype != torch.float32:
            self.pipe.vae.to(dtype=torch.float32)
        chunks = latents.split(chunk_size) if chunk_size else (latents,)
        checkpointed = gradient_checkpointing and torch.is_grad_enabled()
        with contextlib.ExitStack() as stack:
            if autocast and fp32:
                stack.enter_context(torch.autocast(device_type, enabled=False))
            if checkpointed:
                stack.enter_context(checkpointed_blocks(self.pipe.vae.decoder))
            out = [self._decode_chunk(chunk) for chunk in chunks]
        return torch.cat(out) if len(out) > 1 else out[0]

    def encode_images(self, images: Tensor) -> Tensor:
        """Images in [0, 1] -> latents (the posterior mean), for tests and image-to-image use."""
        vae = self.pipe.vae
        z = vae.encode((images * 2 - 1).to(vae.dtype)).latent_dist.mean
        shift = getattr(vae.config, "shift_factor", None)
        if shift is not None:
            z = z - shift
        return z * vae.config.scaling_factor


def load_model(
    model: str,
    *,
    dtype: str | torch.dtype = "auto",
    device: str | torch.device = "auto",
    lora: str | Path | None = None,
    offline: bool | None = None,
    allow_pickle: bool = False,
    distilled_guidance: float = DEFAULT_DISTILLED_GUIDANCE,
    upcast_vae: bool = False,
    revision: str | None = None,
    variant: str | None = None,
    trust_remote_code: bool = False,
) -> DiffusionModel:
    """Load ``model`` ('builtin', a local diffusers folder or a hub id) as a DiffusionModel: the one
    loader of every command (train, sample, eval, steer, guide, demo).

    Args:
        dtype: weight dtype, a name ("auto", "float32", "float16", "bfloat16") or a torch dtype;
            "auto" follows :func:`resolve_dtype` for ``device``.  Modules the weights' library keeps
            in float32 stay so (``from_pretrained`` sees the dtype).
        device: "auto", "cpu", "cuda" or "cuda:N" (or a torch device).
        lora: a diffusers-format LoRA folder to load onto the model.
        offline: only read the local Hugging Face cache (default: ``HF_HUB_OFFLINE``).
        allow_pickle: allow pickle checkpoints (they can run arbitrary code).
        distilled_guidance: the guidance value a guidance-distilled model (FLUX-dev) embeds.
        upcast_vae: see :meth:`DiffusionModel.decodes_in_fp32`.  A VAE that decodes in float32 is
            read in float32 (not upcast from rounded half-precision weights) and kept so; it is small
            (about 84M parameters for SDXL and FLUX: 0.33 GB in float32).
    """
    from diffusers import DiffusionPipeline

    device = resolve_device(device)
    dtype = resolve_dtype(dtype, device)
    source = resolve_model(model, offline)
    local_only = hub_offline(offline)
    # read the VAE in float32 whenever it may decode in float32; cast() below settles it
    vae_fp32 = upcast_vae or dtype == torch.float16
    torch_dtype = {"default": dtype, "vae": torch.float32} if vae_fp32 and dtype != torch.float32 else dtype
    try:
        with warnings.catch_warnings():
            # diffusers >= 0.40 renamed torch_dtype to dtype; the old name works on every version
            warnings.filterwarnings("ignore", message=".*torch_dtype.*", category=FutureWarning)
            pipe = DiffusionPipeline.from_pretrained(
                source,
                torch_dtype=torch_dtype,
                local_files_only=local_only,
                revision=revision,
                variant=variant,
                use_safetensors=None if allow_pickle else True,
                trust_remote_code=trust_remote_code,
            )
    except (OSError, ValueError) as exc:
        if "safetensors" in str(exc).lower() and not allow_pickle:
            raise AlignError(
                f"model={model!r} has no safetensors weights; pickle checkpoints are refused by default "
                "because loading them can run arbitrary code. Convert them, or pass allow_pickle=True "
                "if you trust the source."
            ) from None
        if is_dir(source):
            reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise AlignError(f"model={model!r} (the local folder {source}) could not be loaded: {reason}") from None
        raise explain_load_failure(model, exc, offline=local_only) from None
    pipe.set_progress_bar_config(disable=True)
    result = DiffusionModel(pipe, distilled_guidance=distilled_guidance, upcast_vae=upcast_vae)
    result.cast(dtype)
    pipe.to(device)
    enable_memory_efficient_attention(pipe)
    if lora is not None:
        from align.core.lora import load_lora

        load_lora(result, lora)
    return result


CHECKPOINTED_BLOCKS = ("ResnetBlock2D", "Attention", "Upsample2D")  # diffusers' VAE decoder blocks


@contextlib.contextmanager
def checkpointed_blocks(module: torch.nn.Module, block_types: Sequence[str] = CHECKPOINTED_BLOCKS) -> Iterator[int]:
    """Within the context, every submodule of ``module`` whose class is named in ``block_types``
    runs under activation checkpointing; yields how many blocks that is.

    A module with none of those blocks (another decoder architecture) is checkpointed as a whole.
    The recomputation happens in the backward pass, after the context has closed: it calls the
    blocks' own ``forward``, so nothing is left patched.
    """
    blocks = [m for m in module.modules() if type(m).__name__ in block_types]
    if not blocks:
        blocks = [module]
    # a block may already carry its own ``forward`` (accelerate's offload hooks set one): wrap it and put it back
    previous = [vars(block).get("forward") for block in blocks]
    for block in blocks:
        # the decoder has no randomness (no dropout in use): the RNG state need not be replayed
        block.forward = partial(checkpoint, block.forward, use_reentrant=False, preserve_rng_state=False)
    try:
        yield len(blocks)
    finally:
        for block, forward in zip(blocks, previous):
            if forward is None:
                del block.forward
            else:
                block.forward = forward


def enable_memory_efficient_attention(pipe) -> bool:
    """Use xformers attention when it is installed and the pipeline is on a GPU; else PyTorch SDPA.

    Returns whether xformers was enabled.  An installed xformers that fails to enable (a build
    for another torch or CUDA version, a GPU it has no kernels for) does not stop the run, but
    says so once per process and reason with a logging warning.
    """
    import logging

    device = getattr(pipe, "device", torch.device("cpu"))
    if torch.device(device).type != "cuda":
        return False
    try:
        import xformers  # noqa: F401
    except ImportError:
        return False
    try:
        pipe.enable_xformers_memory_efficient_attention()
    except Exception as exc:  # a broken xformers build must not stop a run; SDPA is the default anyway
        reason = f"{type(exc).__name__}: {exc}"
        reported = enable_memory_efficient_attention.__dict__.setdefault("reported", set())
        if reason not in reported:  # every model load calls this; one warning per reason is enough
            reported.add(reason)
            logging.getLogger(__name__).warning(
                "xformers is installed but could not be enabled (%s); using PyTorch's scaled-dot-product attention",
                reason,
            )
        return False
    return True
