"""LoRA adapters (peft) on the denoiser and optionally the text encoders, saved in diffusers' format.

The saved folder holds ``pytorch_lora_weights.safetensors`` with the adapter's config as
metadata, so that a plain diffusers pipeline's ``load_lora_weights(folder)`` reproduces the
fine-tuned model, rank and alpha included.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from align.core.errors import AlignError, check_range

#: attention projections of diffusers UNets and DiT transformers (SD3, FLUX) alike
DEFAULT_TARGETS: tuple[str, ...] = ("to_q", "to_k", "to_v", "to_out.0")
TEXT_ENCODER_TARGETS: tuple[str, ...] = ("q_proj", "k_proj", "v_proj", "out_proj")
ADAPTER_NAME = "default"


@dataclass
class LoRAConfig:
    """LoRA settings.

    Attributes:
        rank: adapter rank r (AlignProp uses 4; DRaFT 8-32).
        alpha: scaling numerator; the update is (alpha / rank) * B A. None means alpha = rank.
        target_modules: module names (suffixes) that get adapters; default: the attention
            projections to_q, to_k, to_v, to_out.0 of the UNet or transformer.
        dropout: dropout on the adapter input.
        text_encoder: also train LoRA on the text encoder(s) (q/k/v/out projections).
        enabled: False trains the whole denoiser instead (full fine-tuning; needs much more memory).
    """

    rank: int = 8
    alpha: float | None = None
    target_modules: list[str] = field(default_factory=lambda: list(DEFAULT_TARGETS))
    dropout: float = 0.0
    text_encoder: bool = False
    enabled: bool = True

    def __post_init__(self) -> None:
        check_range("rank", self.rank, 1, 1024, integer=True)
        if self.alpha is not None:
            check_range("alpha", self.alpha, 0.0, None, low_inclusive=False)
        check_range("dropout", self.dropout, 0.0, 1.0, high_inclusive=False)
        if not self.target_modules:
            raise AlignError("target_modules=[] is empty; list module names such as to_q, to_k, to_v, to_out.0")

    @property
    def scale_alpha(self) -> float:
        return float(self.rank if self.alpha is None else self.alpha)


def _peft_config(config: LoRAConfig, targets: Sequence[str]):
    from peft import LoraConfig

    return LoraConfig(
        r=config.rank,
        lora_alpha=config.scale_alpha,
        lora_dropout=config.dropout,
        target_modules=list(targets),
        init_lora_weights="gaussian",
    )


def _check_targets(module: nn.Module, targets: Sequence[str], what: str) -> None:
    names = [n for n, _ in module.named_modules()]
    missing = [t for t in targets if not any(n == t or n.endswith("." + t) for n in names)]
    if missing:
        linear = sorted({n.rsplit(".", 1)[-1] for n, m in module.named_modules() if isinstance(m, nn.Linear)})
        raise AlignError(
            f"lora.target_modules {missing} match no module of the {what}; linear layer names it has: "
            f"{', '.join(linear[:30])}"
        )


def add_lora(model, config: LoRAConfig) -> list[nn.Parameter]:
    """Attach LoRA adapters to ``model`` (a :class:`align.core.models.DiffusionModel`).

    Freezes all base weights and returns the trainable parameters (fp32 LoRA weights).
    With ``config.enabled`` False, the whole denoiser is trainable instead.
    """
    module = model.module
    freeze_pipeline(model.pipe)
    if not config.enabled:
        module.requires_grad_(True)
        return [p for p in module.parameters()]
    _check_targets(module, config.target_modules, type(module).__name__)
    module.add_adapter(_peft_config(config, config.target_modules), adapter_name=ADAPTER_NAME)
    if config.text_encoder:
        encoders = text_encoders(model.pipe)
        if not encoders:
            raise AlignError("lora.text_encoder=true but this pipeline has no text encoder")
        for enc in encoders:
            _check_targets(enc, TEXT_ENCODER_TARGETS, type(enc).__name__)
            enc.add_adapter(_peft_config(config, TEXT_ENCODER_TARGETS), adapter_name=ADAPTER_NAME)
    params = trainable_parameters(model)
    for p in params:
        p.data = p.data.float()  # LoRA weights stay fp32 under mixed precision
    return params


def freeze_pipeline(pipe) -> None:
    """requires_grad_(False) on every network of the pipeline (denoiser, VAE, text and image encoders)."""
    for component in pipe.components.values():
        if isinstance(component, nn.Module):
            component.requires_grad_(False)


def text_encoders(pipe) -> list[nn.Module]:
    return [
        getattr(pipe, n)
        for n in ("text_encoder", "text_encoder_2", "text_encoder_3")
        if getattr(pipe, n, None) is not None
    ]


def trainable_parameters(model) -> list[nn.Parameter]:
    """Parameters with requires_grad in the denoiser and text encoders (LoRA weights)."""
    params = [p for p in model.module.parameters() if p.requires_grad]
    for enc in text_encoders(model.pipe):
        params += [p for p in enc.parameters() if p.requires_grad]
    return params


def lora_state_dicts(model) -> dict[str, dict[str, torch.Tensor]]:
    """{component name: LoRA state dict in diffusers' key format} for every adapted component."""
    from diffusers.utils import convert_state_dict_to_diffusers
    from peft.utils import get_peft_model_state_dict

    out = {}
    denoiser_name = "transformer" if model.is_flow else "unet"
    out[denoiser_name] = convert_state_dict_to_diffusers(get_peft_model_state_dict(model.module))
    for name in ("text_encoder", "text_encoder_2", "text_encoder_3"):
        enc = getattr(model.pipe, name, None)
        if enc is not None and getattr(enc, "peft_config", None):
            out[name] = convert_state_dict_to_diffusers(get_peft_model_state_dict(enc))
    return out


def save_lora(model, directory: str | Path) -> Path:
    """Save the adapters in diffusers' LoRA format (loadable by ``pipe.load_lora_weights``)."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    if not getattr(model.module, "peft_config", None):
        raise AlignError("this model has no LoRA adapter to save (full fine-tuning saves the whole model)")
    layers = lora_state_dicts(model)
    kwargs = {}
    for name, state in layers.items():
        kwargs[f"{name}_lora_layers"] = {k: v.detach().float().cpu().contiguous() for k, v in state.items()}
        owner = model.module if name in ("unet", "transformer") else getattr(model.pipe, name)
        kwargs[f"{name}_lora_adapter_metadata"] = owner.peft_config[ADAPTER_NAME].to_dict()
    type(model.pipe).save_lora_weights(directory, safe_serialization=True, **kwargs)
    return directory


def load_lora(model, directory: str | Path) -> None:
    """Load a LoRA saved in diffusers' format (by us or any diffusers trainer) into ``model``."""
    directory = Path(directory)
    if not directory.exists():
        raise AlignError(f"LoRA path {str(directory)!r} does not exist; accepted: a folder holding pytorch_lora_weights.safetensors")
    try:
        model.pipe.load_lora_weights(str(directory))
    except (OSError, ValueError, KeyError) as exc:
        raise AlignError(f"LoRA in {str(directory)!r} could not be loaded into this {model.family} model: {exc}") from None


@contextlib.contextmanager
def adapters_disabled(model) -> Iterator[None]:
    """Run the base model: LoRA adapters off inside the block, restored after."""
    module = model.module if hasattr(model, "module") else model
    if not getattr(module, "peft_config", None):
        yield
        return
    module.disable_adapters()
    try:
        yield
    finally:
        module.enable_adapters()
