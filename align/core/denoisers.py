"""Adapters that give every supported diffusers denoiser one calling convention.

A denoiser is any callable ``(x_t [B, C, H, W], timestep [B], cond) -> model output`` where
``cond`` is a mapping of batch-first tensors (text embeddings and the like).  The sampler, the
reward-backprop loop and the steering samplers only see that callable, so an analytic toy model
works as well as a UNet.  Adapters keep the latents in the [B, C, H, W] layout even for FLUX,
whose transformer works on packed 2x2 patches.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import Tensor, nn

Conditioning = Mapping[str, Tensor]


def cat_conditioning(*conds: Conditioning) -> dict[str, Tensor]:
    """Concatenate conditionings along the batch dimension."""
    return {k: torch.cat([c[k] for c in conds]) for k in conds[0]}


def index_conditioning(cond: Conditioning, index: Tensor | slice) -> dict[str, Tensor]:
    """Select batch rows of a conditioning (e.g. to follow resampled particles)."""
    return {k: v[index] for k, v in cond.items()}


def repeat_conditioning(cond: Conditioning, repeats: int) -> dict[str, Tensor]:
    """Repeat each batch row ``repeats`` times, keeping rows of one prompt together."""
    return {k: v.repeat_interleave(repeats, dim=0) for k, v in cond.items()}


class ModuleDenoiser:
    """Base for adapters around an ``nn.Module``; ``module`` is what LoRA adapters attach to."""

    prediction_type: str = "epsilon"

    def __init__(self, module: nn.Module, prediction_type: str):
        self.module = module
        self.prediction_type = prediction_type

    def __call__(self, x_t: Tensor, timestep: Tensor, cond: Conditioning) -> Tensor:  # pragma: no cover
        raise NotImplementedError


class UNetDenoiser(ModuleDenoiser):
    """UNet2DConditionModel (SD 1.x/2.x; SDXL when ``cond`` has ``text_embeds`` and ``time_ids``)."""

    def __call__(self, x_t: Tensor, timestep: Tensor, cond: Conditioning) -> Tensor:
        added = None
        if "text_embeds" in cond:
            added = {"text_embeds": cond["text_embeds"], "time_ids": cond["time_ids"]}
        return self.module(
            x_t,
            timestep,
            encoder_hidden_states=cond["encoder_hidden_states"],
            added_cond_kwargs=added,
            return_dict=False,
        )[0]


class SD3Denoiser(ModuleDenoiser):
    """SD3Transformer2DModel: flow velocity from latents, timestep in [0, 1000]."""

    def __init__(self, module: nn.Module):
        super().__init__(module, "flow")

    def __call__(self, x_t: Tensor, timestep: Tensor, cond: Conditioning) -> Tensor:
        return self.module(
            hidden_states=x_t,
            timestep=timestep,
            encoder_hidden_states=cond["encoder_hidden_states"],
            pooled_projections=cond["pooled_projections"],
            return_dict=False,
        )[0]


class FluxDenoiser(ModuleDenoiser):
    """FluxTransformer2DModel on unpacked latents; packs 2x2 patches around the call.

    ``guidance`` is FLUX-dev's distilled guidance scale (embedded, not classifier-free); it is
    ignored by models without a guidance embedding (FLUX-schnell).
    """

    def __init__(self, module: nn.Module, guidance: float = 3.5):
        super().__init__(module, "flow")
        self.guidance = guidance

    @staticmethod
    def pack(x: Tensor) -> Tensor:
        b, c, h, w = x.shape
        x = x.view(b, c, h // 2, 2, w // 2, 2).permute(0, 2, 4, 1, 3, 5)
        return x.reshape(b, (h // 2) * (w // 2), c * 4)

    @staticmethod
    def unpack(x: Tensor, height: int, width: int) -> Tensor:
        b, _, d = x.shape
        x = x.view(b, height // 2, width // 2, d // 4, 2, 2).permute(0, 3, 1, 4, 2, 5)
        return x.reshape(b, d // 4, height, width)

    @staticmethod
    def image_ids(height: int, width: int, device, dtype) -> Tensor:
        ids = torch.zeros(height // 2, width // 2, 3)
        ids[..., 1] += torch.arange(height // 2)[:, None]
        ids[..., 2] += torch.arange(width // 2)[None, :]
        return ids.reshape(-1, 3).to(device=device, dtype=dtype)

    def __call__(self, x_t: Tensor, timestep: Tensor, cond: Conditioning) -> Tensor:
        b, _, h, w = x_t.shape
        text = cond["encoder_hidden_states"]
        guidance = None
        if getattr(self.module.config, "guidance_embeds", False):
            guidance = torch.full((b,), float(self.guidance), device=x_t.device, dtype=torch.float32)
        out = self.module(
            hidden_states=self.pack(x_t),
            timestep=timestep / 1000.0,
            guidance=guidance,
            pooled_projections=cond["pooled_projections"],
            encoder_hidden_states=text,
            txt_ids=torch.zeros(text.shape[1], 3, device=x_t.device, dtype=text.dtype),
            img_ids=self.image_ids(h, w, x_t.device, x_t.dtype),
            return_dict=False,
        )[0]
        return self.unpack(out, h, w)
