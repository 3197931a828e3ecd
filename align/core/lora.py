"""LoRA adapters (peft) on the denoiser and optionally the text encoders, saved in diffusers' format.

Text encoders get their adapters from peft itself (``peft.inject_adapter_in_model``), and every
adapter is switched on and off through peft's tuner layers (:func:`set_adapters_enabled`), not
through transformers' adapter methods, whose required peft version moves with each transformers
release. The denoiser keeps diffusers' ``add_adapter``, which calls peft directly.

The saved folder holds ``pytorch_lora_weights.safetensors`` with the adapters' configs as
metadata, so that a plain diffusers pipeline's ``load_lora_weights(folder)`` reproduces the
fine-tuned model, rank and alpha included. Diffusers' loaders know the denoiser and the CLIP
encoders but not the T5 encoders of SD3 (``text_encoder_3``) and FLUX (``text_encoder_2``): a
T5 adapter is saved beside the file in peft's format, ``folder/<component>/adapter_config.json``
and ``adapter_model.safetensors``, which :func:`load_lora` loads after the diffusers file (and
``pipe.text_encoder_2.load_adapter(folder + "/text_encoder_2")`` loads by hand).
"""

from __future__ import annotations

import contextlib
import inspect
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from align.core.errors import AlignError, check_range

#: attention projections of diffusers UNets and DiT transformers (SD3, FLUX) alike
DEFAULT_TARGETS: tuple[str, ...] = ("to_q", "to_k", "to_v", "to_out.0")
#: attention projections of each text-encoder family, by the encoder config's ``model_type``
#: (CLIPTextModel and CLIPTextModelWithProjection: clip_text_model; T5EncoderModel: t5)
TEXT_ENCODER_TARGETS: dict[str, tuple[str, ...]] = {
    "clip_text_model": ("q_proj", "k_proj", "v_proj", "out_proj"),
    "t5": ("q", "k", "v", "o"),
}
TEXT_ENCODER_NAMES: tuple[str, ...] = ("text_encoder", "text_encoder_2", "text_encoder_3")
ADAPTER_NAME = "default"
LORA_FILE = "pytorch_lora_weights.safetensors"
PEFT_ADAPTER_FILE = "adapter_model.safetensors"


@dataclass
class LoRAConfig:
    """LoRA settings.

    Attributes:
        rank: adapter rank r (AlignProp uses 4; DRaFT 8-32).
        alpha: scaling numerator; the update is (alpha / rank) * B A. None means alpha = rank.
        target_modules: module names (suffixes) that get adapters; default: the attention
            projections to_q, to_k, to_v, to_out.0 of the UNet or transformer.
        dropout: dropout on the adapter input.
        text_encoder: also train LoRA on the text encoder(s), on their attention projections.
        text_encoder_target_modules: text-encoder module names (suffixes) that get adapters;
            None picks each encoder's attention projections by its family (CLIP: q_proj, k_proj,
            v_proj, out_proj; T5: q, k, v, o). A given list applies to every text encoder, each
            name where it matches, so one list can cover a CLIP and a T5 encoder.
        enabled: False trains the whole denoiser instead (full fine-tuning; needs much more memory).
    """

    rank: int = 8
    alpha: float | None = None
    target_modules: list[str] = field(default_factory=lambda: list(DEFAULT_TARGETS))
    dropout: float = 0.0
    text_encoder: bool = False
    text_encoder_target_modules: list[str] | None = None
    enabled: bool = True

    def __post_init__(self) -> None:
        check_range("rank", self.rank, 1, 1024, integer=True)
        if self.alpha is not None:
            check_range("alpha", self.alpha, 0.0, None, low_inclusive=False)
        check_range("dropout", self.dropout, 0.0, 1.0, high_inclusive=False)
        if not self.target_modules:
            raise AlignError("target_modules=[] is empty; list module names such as to_q, to_k, to_v, to_out.0")
        if self.text_encoder_target_modules is not None and not self.text_encoder_target_modules:
            raise AlignError(
                "text_encoder_target_modules=[] is empty; list module names such as q_proj, v_proj (CLIP) "
                "or q, v (T5), or leave it unset (null) for each encoder's attention projections"
            )

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


def _matches(module: nn.Module, target: str) -> bool:
    """Whether peft's suffix rule for a ``target_modules`` entry selects some module of ``module``."""
    return any(n == target or n.endswith("." + target) for n, _ in module.named_modules())


def _linear_names(module: nn.Module) -> str:
    names = sorted({n.rsplit(".", 1)[-1] for n, m in module.named_modules() if isinstance(m, nn.Linear)})
    return ", ".join(names[:30])


def _check_targets(module: nn.Module, targets: Sequence[str], what: str, field_name: str) -> None:
    missing = [t for t in targets if not _matches(module, t)]
    if missing:
        raise AlignError(
            f"lora.{field_name} {missing} match no module of the {what}; linear layer names it has: "
            f"{_linear_names(module)}"
        )


def text_encoder_targets(encoder: nn.Module) -> tuple[str, ...]:
    """The attention projections that get LoRA adapters in ``encoder``, by its family (config.model_type)."""
    model_type = getattr(getattr(encoder, "config", None), "model_type", None)
    if model_type not in TEXT_ENCODER_TARGETS:
        raise AlignError(
            f"no default LoRA targets for the text encoder {type(encoder).__name__} (model_type={model_type!r}); "
            f"known families: {', '.join(sorted(TEXT_ENCODER_TARGETS))}; set lora.text_encoder_target_modules "
            f"from its linear layer names: {_linear_names(encoder)}"
        )
    return TEXT_ENCODER_TARGETS[model_type]


def _text_encoder_plan(encoders: dict[str, nn.Module], config: LoRAConfig) -> dict[str, tuple[str, ...]]:
    """{component name: its LoRA targets}; every encoder gets at least one, every listed name lands somewhere."""
    if config.text_encoder_target_modules is None:
        plan = {name: text_encoder_targets(enc) for name, enc in encoders.items()}
        for name, targets in plan.items():
            _check_targets(encoders[name], targets, f"{name} ({type(encoders[name]).__name__})",
                           "text_encoder_target_modules")
        return plan
    wanted = config.text_encoder_target_modules
    plan = {name: tuple(t for t in wanted if _matches(enc, t)) for name, enc in encoders.items()}
    for name, targets in plan.items():
        if not targets:
            enc = encoders[name]
            raise AlignError(
                f"lora.text_encoder_target_modules {list(wanted)} match no module of {name} "
                f"({type(enc).__name__}); linear layer names it has: {_linear_names(enc)}"
            )
    unused = [t for t in wanted if not any(t in targets for targets in plan.values())]
    if unused:
        raise AlignError(
            f"lora.text_encoder_target_modules {unused} match no module of any text encoder ("
            + "; ".join(f"{n}: {_linear_names(e)}" for n, e in encoders.items()) + ")"
        )
    return plan


def add_lora(model, config: LoRAConfig) -> list[nn.Parameter]:
    """Attach LoRA adapters to ``model`` (a :class:`align.core.models.DiffusionModel`).

    Freezes all base weights and returns the trainable parameters (fp32 LoRA weights).
    With ``config.enabled`` False, the whole denoiser is trainable instead. With
    ``config.text_encoder``, every text encoder gets adapters through peft (see the module doc).
    """
    module = model.module
    freeze_pipeline(model.pipe)
    if not config.enabled:
        module.requires_grad_(True)
        return [p for p in module.parameters()]
    _check_targets(module, config.target_modules, type(module).__name__, "target_modules")
    encoders = {}
    if config.text_encoder:
        encoders = named_text_encoders(model.pipe)
        if not encoders:
            raise AlignError("lora.text_encoder=true but this pipeline has no text encoder")
    plan = _text_encoder_plan(encoders, config)  # checked before any adapter is added
    module.add_adapter(_peft_config(config, config.target_modules), adapter_name=ADAPTER_NAME)
    for name, targets in plan.items():
        _inject(encoders[name], _peft_config(config, targets))
    params = trainable_parameters(model)
    for p in params:
        p.data = p.data.float()  # LoRA weights stay fp32 under mixed precision
    return params


def _inject(module: nn.Module, peft_config) -> None:
    """Add LoRA layers to ``module`` with peft alone; it records the config as ``module.peft_config``."""
    from peft import inject_adapter_in_model

    inject_adapter_in_model(peft_config, module, adapter_name=ADAPTER_NAME)


def freeze_pipeline(pipe) -> None:
    """requires_grad_(False) on every network of the pipeline (denoiser, VAE, text and image encoders)."""
    for component in pipe.components.values():
        if isinstance(component, nn.Module):
            component.requires_grad_(False)


def named_text_encoders(pipe) -> dict[str, nn.Module]:
    """{component name: text encoder} of the pipeline (text_encoder, text_encoder_2, text_encoder_3)."""
    return {n: getattr(pipe, n) for n in TEXT_ENCODER_NAMES if getattr(pipe, n, None) is not None}


def text_encoders(pipe) -> list[nn.Module]:
    return list(named_text_encoders(pipe).values())


def trainable_parameters(model) -> list[nn.Parameter]:
    """Parameters with requires_grad in the denoiser and text encoders (LoRA weights)."""
    params = [p for p in model.module.parameters() if p.requires_grad]
    for enc in text_encoders(model.pipe):
        params += [p for p in enc.parameters() if p.requires_grad]
    return params


def _denoiser_name(model) -> str:
    return "transformer" if model.is_flow else "unet"


def adapted_components(model) -> dict[str, nn.Module]:
    """{component name: module} of every component carrying the LoRA adapter :func:`add_lora` adds."""
    components = {_denoiser_name(model): model.module, **named_text_encoders(model.pipe)}
    return {n: m for n, m in components.items() if ADAPTER_NAME in (getattr(m, "peft_config", None) or {})}


def lora_state_dicts(model) -> dict[str, dict[str, torch.Tensor]]:
    """{component name: LoRA state dict in peft's key format, float32 on the CPU} for every adapted component."""
    from peft.utils import get_peft_model_state_dict

    return {
        name: {k: v.detach().float().cpu().contiguous()
               for k, v in get_peft_model_state_dict(module, adapter_name=ADAPTER_NAME).items()}
        for name, module in adapted_components(model).items()
    }


def save_lora(model, directory: str | Path) -> Path:
    """Save the adapters in diffusers' LoRA format (loadable by ``pipe.load_lora_weights``).

    Components that the pipeline's diffusers loader does not know (T5 encoders) go to
    ``directory/<component>/`` in peft's format; :func:`load_lora` reads both.
    """
    from diffusers.utils import convert_state_dict_to_diffusers

    directory = Path(directory)
    components = adapted_components(model)
    if _denoiser_name(model) not in components:
        raise AlignError("this model has no LoRA adapter to save (full fine-tuning saves the whole model)")
    directory.mkdir(parents=True, exist_ok=True)
    save = type(model.pipe).save_lora_weights
    accepted = inspect.signature(save).parameters
    kwargs = {}
    for name, state in lora_state_dicts(model).items():
        config = components[name].peft_config[ADAPTER_NAME]
        if f"{name}_lora_layers" in accepted:
            kwargs[f"{name}_lora_layers"] = convert_state_dict_to_diffusers(state)
            kwargs[f"{name}_lora_adapter_metadata"] = config.to_dict()
        else:
            _save_peft_adapter(directory / name, state, config)
    save(directory, safe_serialization=True, **kwargs)
    return directory


#: key prefix of peft's own saved format (a PeftModel's state dict)
_PEFT_PREFIX = "base_model.model."


def _save_peft_adapter(folder: Path, state: dict[str, torch.Tensor], config) -> None:
    """peft's format, as ``PeftModel.save_pretrained`` writes it (transformers' ``load_adapter`` reads it)."""
    from safetensors.torch import save_file

    folder.mkdir(parents=True, exist_ok=True)
    config.save_pretrained(str(folder))
    save_file({_PEFT_PREFIX + k: v for k, v in state.items()}, str(folder / PEFT_ADAPTER_FILE))


def _load_peft_adapter(module: nn.Module, folder: Path) -> None:
    from peft import LoraConfig
    from peft.utils import set_peft_model_state_dict
    from safetensors.torch import load_file

    if ADAPTER_NAME in (getattr(module, "peft_config", None) or {}):
        raise AlignError(f"{folder.name} already has a LoRA adapter named {ADAPTER_NAME!r}; load {folder} into a fresh model")
    config = LoraConfig.from_pretrained(str(folder))
    state = {k.removeprefix(_PEFT_PREFIX): v for k, v in load_file(str(folder / PEFT_ADAPTER_FILE)).items()}
    _inject(module, config)
    result = set_peft_model_state_dict(module, state, adapter_name=ADAPTER_NAME)
    unexpected = list(getattr(result, "unexpected_keys", None) or [])
    if unexpected:
        raise AlignError(f"the adapter in {str(folder)!r} has weights for modules {folder.name} lacks: {unexpected[:5]}")


def load_lora(model, directory: str | Path) -> None:
    """Load a LoRA folder in diffusers' format (ours or any diffusers trainer's) into ``model``.

    Then the peft-format adapters that :func:`save_lora` writes beside the file for the
    components diffusers' loader skips (T5 encoders), each into its component.
    """
    directory = Path(directory)
    if not directory.exists():
        raise AlignError(f"LoRA path {str(directory)!r} does not exist; accepted: a folder holding {LORA_FILE}")
    try:
        model.pipe.load_lora_weights(str(directory))
    except (OSError, ValueError, KeyError) as exc:
        raise AlignError(f"LoRA in {str(directory)!r} could not be loaded into this {model.family} model: {exc}") from None
    encoders = named_text_encoders(model.pipe)
    for name in TEXT_ENCODER_NAMES:
        folder = directory / name
        if not (folder / PEFT_ADAPTER_FILE).is_file():
            continue
        if name not in encoders:
            raise AlignError(f"LoRA in {str(directory)!r} has an adapter for {name}, which this {model.family} model lacks")
        _load_peft_adapter(encoders[name], folder)


def tuner_layers(module: nn.Module) -> list[nn.Module]:
    """peft's adapter layers (``BaseTunerLayer``) inside ``module``, however they were added."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    return [m for m in module.modules() if isinstance(m, BaseTunerLayer)]


def has_adapters(module: nn.Module) -> bool:
    """Whether ``module`` holds any peft adapter layer."""
    return bool(tuner_layers(module))


def set_adapters_enabled(module: nn.Module, enabled: bool) -> None:
    """Switch every adapter layer in ``module`` (a denoiser, a text encoder, any network) on or off.

    peft's tuner-layer API, so it works for adapters added by diffusers, transformers or peft alike.
    """
    for layer in tuner_layers(module):
        layer.enable_adapters(enabled)


@contextlib.contextmanager
def adapters_disabled(model) -> Iterator[None]:
    """Run the base model: the adapters of ``model`` (a DiffusionModel's denoiser, or any module,
    e.g. a text encoder) off inside the block.

    After it, each layer is back on or off as it was, and its parameters' requires_grad as it was
    (peft's switch sets requires_grad, which would make a frozen, loaded LoRA trainable).
    """
    module = model.module if hasattr(model, "module") else model
    layers = tuner_layers(module)
    was_off = [bool(layer.disable_adapters) for layer in layers]
    requires_grad = [(p, p.requires_grad) for layer in layers for p in layer.parameters()]
    set_adapters_enabled(module, False)
    try:
        yield
    finally:
        for layer, off in zip(layers, was_off):
            if not off:
                layer.enable_adapters(True)
        for p, flag in requires_grad:
            p.requires_grad_(flag)
