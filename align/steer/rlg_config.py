"""Configuration of RL guidance (kept free of heavy imports for the CLI's --help)."""

from __future__ import annotations

import math
from dataclasses import dataclass

from align.core.errors import ConfigError, check_range
from align.steer.fk_config import check_chunks_and_seed


@dataclass
class RLGConfig:
    """Reinforcement Learning Guidance (Jin et al.): blend a base and an aligned model per step.

    v = v_base + weight * (v_aligned - v_base), each side with its own classifier-free guidance.
    weight 0 is the base model, 1 the aligned model, 0..1 interpolates and > 1 extrapolates (the
    paper recommends 1-3): for an aligned model that samples p_base exp(r / beta), weight w acts
    like the KL coefficient beta / w.

    Attributes:
        weight: the blend w (any finite number; negative values move away from the aligned model).
        aligned_guidance_scale: classifier-free guidance of the aligned side (None: the same as the base
            side's guidance_scale).
        num_samples: samples per prompt.
        batched: evaluate base and aligned rows in one batched forward (LoRA rows of the base side get a
            zero LoRA input); False runs two forwards (adapters off, then on).
        model_chunk_size: samples per forward (None: all samples at once).
        seed: random seed of the initial and sampler noise (None: random).
    """

    weight: float = 2.0
    aligned_guidance_scale: float | None = None
    num_samples: int = 1
    batched: bool = True
    model_chunk_size: int | None = None
    seed: int | None = 0

    def __post_init__(self) -> None:
        check_range("weight", self.weight)
        if not math.isfinite(self.weight):
            raise ConfigError(f"weight={self.weight!r} must be a finite number")
        if self.aligned_guidance_scale is not None:
            check_range("aligned_guidance_scale", self.aligned_guidance_scale, 0.0, None)
        check_range("num_samples", self.num_samples, 1, None, integer=True)
        check_chunks_and_seed(self)
