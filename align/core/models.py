"""Loading diffusers pipelines and exposing what the samplers need from them.

:class:`DiffusionModel` is a thin layer over a diffusers pipeline of a supported family
(SD 1.x/2.x, SDXL, SD3, FLUX): it encodes prompts once per batch, wraps the denoiser in the
common calling convention (:mod:`align.core.denoisers`), builds the sampling schedule and decodes
latents to images in [0, 1] (optionally with gradient checkpointing, in chunks).

Models are named by ``"builtin"`` (the tiny model shipped with the package), a local
diffusers folder, or a Hugging Face hub id.  Offline mode (``HF_HUB_OFFLINE=1`` or
``offline=True``) only reads the local cache.  Weights load through safetensors; pickle
checkpoints are refused unless ``allow_pickle=True``.
"""

from __future__ import annotations

import contextlib
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
from align.core.errors import AlignError, check_choice
from align.core.sampling import SamplingSchedule

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
    path = Path(model).expanduser()
    if path.exists():
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


@dataclass
class PromptConditioning:
    """Text conditioning of one batch: ``cond`` and, for classifier-free guidance, ``uncond``."""

    cond: dict[str, Tensor]
    uncond: dict[str, Tensor] | None

    def __len__(self) -> int:
        return next(iter(self.cond.values())).shape[0]


class DiffusionModel:
    """A diffusers pipeline seen through the toolkit's calling conventions."""

    def __init__(self, pipe, *, flux_guidance: float = 3.5):
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
        if family in FLOW_FAMILIES:
            module = pipe.transformer
            self.denoiser: ModuleDenoiser = (
                SD3Denoiser(module) if family == "sd3" else FluxDenoiser(module, guidance=flux_guidance)
            )
        else:
            module = pipe.unet
            self.denoiser = UNetDenoiser(module, pipe.scheduler.config.prediction_type)
        self.source: str | None = getattr(pipe, "name_or_path", None) or pipe.config.get("_name_or_path")

    # ------------------------------------------------------------------ loading
    @classmethod
    def from_pretrained(
        cls,
        model: str,
        *,
        dtype: torch.dtype = torch.float32,
        device: str | torch.device = "cpu",
        offline: bool | None = None,
        revision: str | None = None,
        variant: str | None = None,
        allow_pickle: bool = False,
        trust_remote_code: bool = False,
        flux_guidance: float = 3.5,
    ) -> DiffusionModel:
        """Load ``model`` ('builtin', a local folder or a hub id) as a DiffusionModel."""
        from diffusers import DiffusionPipeline

        source = resolve_model(model, offline)
        local_only = hub_offline(offline)
        try:
            with warnings.catch_warnings():
                # diffusers >= 0.40 renamed torch_dtype to dtype; the old name works on every version
                warnings.filterwarnings("ignore", message=".*torch_dtype.*", category=FutureWarning)
                pipe = DiffusionPipeline.from_pretrained(
                    source,
                    torch_dtype=dtype,
                    local_files_only=local_only,
                    revision=revision,
                    variant=variant,
                    use_safetensors=None if allow_pickle else True,
                    trust_remote_code=trust_remote_code,
                )
        except (OSError, ValueError) as exc:
            reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            if "safetensors" in str(exc).lower() and not allow_pickle:
                raise AlignError(
                    f"model={model!r} has no safetensors weights; pickle checkpoints are refused by default "
                    "because loading them can run arbitrary code. Convert them, or pass allow_pickle=True "
                    "if you trust the source."
                ) from None
            where = (
                "offline mode is on (HF_HUB_OFFLINE=1) and it is not in the local Hugging Face cache"
                if local_only
                else f"loading failed: {reason}"
            )
            raise AlignError(
                f"model={model!r} could not be loaded: {where}. Accepted: 'builtin', an existing local "
                "diffusers folder, or a hub id."
            ) from None
        pipe.set_progress_bar_config(disable=True)
        pipe.to(device)
        enable_memory_efficient_attention(pipe)
        return cls(pipe, flux_guidance=flux_guidance)

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
        z = latents / vae.config.scaling_factor
        shift = getattr(vae.config, "shift_factor", None)
        if shift is not None:
            z = z + shift
        image = vae.decode(z.to(vae.dtype), return_dict=False)[0]
        if image.dtype in (torch.float16, torch.bfloat16):
            image = image.float()  # rewards see at least fp32 pixels
        return (image / 2 + 0.5).clamp(0, 1)

    def decode(self, latents: Tensor, *, gradient_checkpointing: bool = False, chunk_size: int | None = None) -> Tensor:
        """Decode latents to images in [0, 1], [B, 3, H, W] (float32, or float64 for a float64 VAE).

        With ``gradient_checkpointing`` every resnet, attention and upsampling block of the decoder
        is checkpointed on its own: the backward recomputes one block at a time, so its peak is one
        block's activations plus the block inputs, not the whole decoder's activations (which is
        what checkpointing the decode as one piece costs, since its backward recomputes them all
        at once).  ``chunk_size`` bounds how many latents are decoded at once.
        """
        chunks = latents.split(chunk_size) if chunk_size else (latents,)
        checkpointed = gradient_checkpointing and torch.is_grad_enabled()
        with checkpointed_blocks(self.pipe.vae.decoder) if checkpointed else contextlib.nullcontext():
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
