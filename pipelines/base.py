"""One diffusers pipeline class for every supported family, wrapping the toolkit's core.

:class:`SteeringPipelineBase` is a ``DiffusionPipeline`` whose constructor accepts the components
of SD 1.x/2.x, SDXL, SD3 and FLUX pipelines alike (``unet`` or ``transformer``, up to three text
encoders), so that diffusers' own ``from_pretrained(folder or hub id)`` and ``from_pipe(pipe)``
work unchanged.  At call time it recognises the family from its components, builds the family's
diffusers pipeline around the same (shared, not copied) components for prompt encoding, and
hands an :class:`align.core.models.DiffusionModel` to the core samplers.

An SD ``safety_checker`` component is kept (so ``from_pipe`` round-trips) but not run: the
outputs are the raw decoded images, as with ``output_type="pt"`` pipelines without one.
"""

from __future__ import annotations

import contextlib
import inspect
import warnings
from collections.abc import Iterator, Sequence

import diffusers
import torch
from diffusers import (
    AutoencoderKL,
    DiffusionPipeline,
    FluxTransformer2DModel,
    SD3Transformer2DModel,
    UNet2DConditionModel,
)
from diffusers.image_processor import VaeImageProcessor
from diffusers.schedulers.scheduling_utils import SchedulerMixin
from torch import Tensor
from transformers import CLIPTextModel, CLIPTextModelWithProjection, T5EncoderModel

from align.core.errors import AlignError, check_choice
from align.core.lora import adapters_disabled, has_adapters, text_encoders
from align.core.models import DEFAULT_DISTILLED_GUIDANCE, DiffusionModel, PromptConditioning

#: family -> diffusers pipeline class whose prompt encoding the family uses
FAMILY_PIPELINES = {
    "sd": "StableDiffusionPipeline",
    "sdxl": "StableDiffusionXLPipeline",
    "sd3": "StableDiffusion3Pipeline",
    "flux": "FluxPipeline",
}
#: classifier-free (or, for FLUX, distilled) guidance scale of each family's diffusers pipeline
DEFAULT_GUIDANCE = {"sd": 7.5, "sdxl": 5.0, "sd3": 7.0, "flux": DEFAULT_DISTILLED_GUIDANCE}
OUTPUT_TYPES = ("pil", "np", "pt", "latent")


class SteeringPipelineBase(DiffusionPipeline):
    """Components of any supported family; subclasses implement ``__call__``."""

    model_cpu_offload_seq = "text_encoder->text_encoder_2->text_encoder_3->unet->transformer->vae"
    _optional_components = [
        "unet",
        "transformer",
        "text_encoder",
        "tokenizer",
        "text_encoder_2",
        "tokenizer_2",
        "text_encoder_3",
        "tokenizer_3",
        "safety_checker",
        "feature_extractor",
        "image_encoder",
    ]

    def __init__(
        self,
        vae: AutoencoderKL,
        scheduler: SchedulerMixin,
        unet: UNet2DConditionModel | None = None,
        transformer: SD3Transformer2DModel | FluxTransformer2DModel | None = None,
        text_encoder: CLIPTextModel | CLIPTextModelWithProjection | None = None,
        tokenizer=None,
        text_encoder_2: CLIPTextModelWithProjection | T5EncoderModel | None = None,
        tokenizer_2=None,
        text_encoder_3: T5EncoderModel | None = None,
        tokenizer_3=None,
        safety_checker=None,
        feature_extractor=None,
        image_encoder=None,
        requires_safety_checker: bool = False,
        force_zeros_for_empty_prompt: bool = True,
    ):
        super().__init__()
        if (unet is None) == (transformer is None):
            raise AlignError("a steering pipeline needs exactly one denoiser: a unet (SD, SDXL) or a transformer (SD3, FLUX)")
        self.register_modules(
            vae=vae, scheduler=scheduler, unet=unet, transformer=transformer, text_encoder=text_encoder,
            tokenizer=tokenizer, text_encoder_2=text_encoder_2, tokenizer_2=tokenizer_2,
            text_encoder_3=text_encoder_3, tokenizer_3=tokenizer_3, safety_checker=safety_checker,
            feature_extractor=feature_extractor, image_encoder=image_encoder,
        )
        self.register_to_config(
            requires_safety_checker=requires_safety_checker, force_zeros_for_empty_prompt=force_zeros_for_empty_prompt
        )

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, **kwargs):
        """diffusers' ``from_pretrained``, also accepting ``"builtin"`` (the model shipped with the package),
        as every other entry point of the toolkit does."""
        from align.core.models import BUILTIN_MODELS, resolve_model

        name = pretrained_model_name_or_path
        if isinstance(name, str) and name in BUILTIN_MODELS:
            name = resolve_model(name)
        return super().from_pretrained(name, **kwargs)

    @classmethod
    def from_pipe(cls, pipeline, **kwargs):
        """diffusers' ``from_pipe``, leaving the shared components' dtypes as they are unless ``torch_dtype``
        is given.

        diffusers casts every component to one dtype (float32 by default), which would also cast the
        components of ``pipeline`` (they are shared) and undo the float32 parts kept beside
        half-precision weights (a float32 VAE, T5's ``wo``); those parts get their tensors back.
        """
        keep = "torch_dtype" not in kwargs and "dtype" not in kwargs
        modules = [m for m in pipeline.components.values() if isinstance(m, torch.nn.Module)]
        if keep:
            # the denoiser's dtype: the large weights are not even transiently cast
            denoiser = getattr(pipeline, "unet", None) or getattr(pipeline, "transformer", None)
            kwargs["torch_dtype"] = denoiser.dtype if denoiser is not None else pipeline.dtype
        with contextlib.ExitStack() as stack:
            if keep:
                stack.enter_context(_tensors_restored(modules))
            with warnings.catch_warnings():
                # diffusers >= 0.40 renamed torch_dtype to dtype; the old name works on every version
                warnings.filterwarnings("ignore", message=".*torch_dtype.*", category=FutureWarning)
                new = super().from_pipe(pipeline, **kwargs)
        new.set_progress_bar_config(**getattr(pipeline, "_progress_bar_config", {}))
        return new

    # ------------------------------------------------------------------ family
    @property
    def family(self) -> str:
        """'sd', 'sdxl', 'sd3' or 'flux', recognised from the components."""
        if self.unet is not None:
            return "sdxl" if self.text_encoder_2 is not None else "sd"
        name = type(self.transformer).__name__
        if isinstance(self.transformer, SD3Transformer2DModel):
            return "sd3"
        if isinstance(self.transformer, FluxTransformer2DModel):
            return "flux"
        raise AlignError(f"transformer {name} is not supported; accepted: SD3Transformer2DModel, FluxTransformer2DModel")

    def family_pipeline(self) -> DiffusionPipeline:
        """The family's diffusers pipeline over this pipeline's components (shared, not copied)."""
        family = self.family
        cls = getattr(diffusers, FAMILY_PIPELINES[family])
        params = inspect.signature(cls.__init__).parameters
        kwargs = {name: getattr(self, name, None) for name in params if name in self.components}
        if "requires_safety_checker" in params:
            kwargs["requires_safety_checker"] = False
        if "force_zeros_for_empty_prompt" in params:
            kwargs["force_zeros_for_empty_prompt"] = self.config.force_zeros_for_empty_prompt
        if "add_watermarker" in params:
            kwargs["add_watermarker"] = False
        pipe = cls(**kwargs)
        pipe.set_progress_bar_config(disable=True)
        return pipe

    def diffusion_model(self, distilled_guidance: float = DEFAULT_DISTILLED_GUIDANCE) -> DiffusionModel:
        return DiffusionModel(self.family_pipeline(), distilled_guidance=distilled_guidance)

    def load_lora_weights(self, pretrained_model_name_or_path_or_dict, **kwargs) -> None:
        """Load a diffusers-format LoRA into the shared denoiser / text encoders (the family's loader)."""
        self.family_pipeline().load_lora_weights(pretrained_model_name_or_path_or_dict, **kwargs)

    # ------------------------------------------------------------------ shared call steps
    @property
    def _show_progress(self) -> bool:
        return not getattr(self, "_progress_bar_config", {}).get("disable", False)

    @staticmethod
    def _prompts(prompt: str | Sequence[str]) -> list[str]:
        prompts = [prompt] if isinstance(prompt, str) else list(prompt)
        if not prompts or not all(isinstance(p, str) for p in prompts):
            raise AlignError(f"prompt={prompt!r} must be a string or a non-empty list of strings")
        return prompts

    def _prepare(
        self, guidance_scale: float | None, height: int | None, width: int | None
    ) -> tuple[DiffusionModel, float, bool, int, int]:
        """(model, guidance scale, whether CFG is on, height, width) with the family's defaults.

        As in diffusers' FluxPipeline, a FLUX pipeline's ``guidance_scale`` is the distilled guidance
        its transformer embeds (ignored by FLUX-schnell, which has no guidance embedding) and no
        classifier-free pass runs.
        """
        family = self.family
        scale = DEFAULT_GUIDANCE[family] if guidance_scale is None else float(guidance_scale)
        model = self.diffusion_model(distilled_guidance=scale)
        h0, w0 = model.default_resolution()
        height, width = height or h0, width or w0
        model.check_resolution(height, width)
        cfg = family != "flux" and scale > 1.0
        return model, scale, cfg, height, width

    @staticmethod
    def _encode(model: DiffusionModel, prompts, negative_prompt, cfg, height, width, max_sequence_length) -> PromptConditioning:
        return model.encode_prompts(
            prompts, negative_prompt=negative_prompt, guidance=cfg, height=height, width=width,
            max_sequence_length=max_sequence_length,
        )

    @staticmethod
    def _postprocess(images: Tensor, latents: Tensor, output_type: str):
        check_choice("output_type", output_type, OUTPUT_TYPES)
        if output_type == "latent":
            return latents
        if output_type == "pt":
            return images
        array = VaeImageProcessor.pt_to_numpy(images.float().cpu())
        return array if output_type == "np" else VaeImageProcessor.numpy_to_pil(array)


@contextlib.contextmanager
def _tensors_restored(modules: Sequence[torch.nn.Module]) -> Iterator[None]:
    """On exit, every parameter and buffer of ``modules`` whose dtype was changed within the context
    gets its original tensor back."""
    params = [(p, p.data) for m in modules for p in m.parameters()]
    buffers = [(sub, name, b) for m in modules for sub in m.modules() for name, b in sub.named_buffers(recurse=False)]
    try:
        yield
    finally:
        for p, data in params:
            if p.dtype != data.dtype:
                p.data = data
        for sub, name, b in buffers:
            if getattr(sub, name).dtype != b.dtype:
                setattr(sub, name, b)


@contextlib.contextmanager
def text_adapters_disabled(pipe) -> Iterator[bool]:
    """Disable the adapters of every text encoder that has some (peft tuner layers, however added);
    yields whether any had."""
    with contextlib.ExitStack() as stack:
        found = False
        for enc in text_encoders(pipe):
            if has_adapters(enc):
                stack.enter_context(adapters_disabled(enc))
                found = True
        yield found


def as_generator(generator: torch.Generator | None) -> torch.Generator | None:
    if generator is not None and not isinstance(generator, torch.Generator):
        raise AlignError(f"generator={generator!r} must be one torch.Generator (or None to use the config's seed)")
    return generator
