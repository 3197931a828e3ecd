"""Configuration of best-of-N and gradient guidance (kept free of heavy imports for the CLI's --help)."""

from __future__ import annotations

from dataclasses import dataclass

from align.core.errors import ConfigError, check_range
from align.steer.fk_config import check_chunks_and_seed


@dataclass
class BestOfNConfig:
    """Best-of-N: draw N samples per prompt with the plain sampler and keep the highest reward.

    The fair baseline for FK steering: with N equal to FK's num_particles and the same sampler and
    steps it makes exactly as many model evaluations (FK's intermediate decodes and rewards are
    counted separately).

    Attributes:
        num_samples: samples per prompt N.
        chunk_size: samples decoded and scored at once (None: all at once).
        model_chunk_size: samples per denoiser call (None: all in one batched call).
        seed: random seed of the initial and sampler noise (None: random); the same seed as an FK run
            gives the same starting noise.
    """

    num_samples: int = 4
    chunk_size: int | None = None
    model_chunk_size: int | None = None
    seed: int | None = 0

    def __post_init__(self) -> None:
        check_range("num_samples", self.num_samples, 1, None, integer=True)
        check_chunks_and_seed(self)


@dataclass
class GradientGuidanceConfig:
    """Reward-gradient guidance (universal-guidance / DPS style, in x0 space): no particles.

    At each guided step the x0-prediction is moved along the reward gradient before the sampler
    step, x0_hat <- x0_hat + scale * grad_x0 r(decode(x0_hat)), which shifts the step's mean by
    coef_x0 * scale * grad.  Works with deterministic and stochastic samplers; needs a
    differentiable reward (the decoder is backpropagated, not the denoiser).

    Attributes:
        scale: step size of the x0 shift per unit reward gradient (0 is the plain sampler).
        start_step: first guided step (0-based).
        end_step: last guided step (inclusive; None: the last step).
        num_samples: samples per prompt.
        chunk_size: samples decoded, scored and differentiated at once (bounds memory).
        model_chunk_size: samples per denoiser call (None: all in one batched call).
        seed: random seed (None: random).
    """

    scale: float = 1.0
    start_step: int = 0
    end_step: int | None = None
    num_samples: int = 1
    chunk_size: int | None = None
    model_chunk_size: int | None = None
    seed: int | None = 0

    def __post_init__(self) -> None:
        check_range("scale", self.scale, 0.0, None)
        check_range("start_step", self.start_step, 0, None, integer=True)
        if self.end_step is not None:
            check_range("end_step", self.end_step, 0, None, integer=True)
            if self.end_step < self.start_step:
                raise ConfigError(
                    f"end_step={self.end_step!r} is before start_step={self.start_step!r}; accepted: end_step >= start_step"
                )
        check_range("num_samples", self.num_samples, 1, None, integer=True)
        check_chunks_and_seed(self)
