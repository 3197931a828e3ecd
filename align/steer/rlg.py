"""Reinforcement Learning Guidance (RLG): blend a base and an aligned model with one knob.

Jin et al., "Inference-Time Alignment Control for Diffusion Models with Reinforcement Learning
Guidance".  Per step, each side gets its own classifier-free guidance and the two are blended:

    v_base = u_b + g_b (c_b - u_b),   v_aligned = u_a + g_a (c_a - u_a),
    v      = v_base + w (v_aligned - v_base).

The blend is linear in the model output, so it is the same for epsilon, v and flow-velocity
models (every conversion to x0 / eps is affine in the output).  w = 0 and w = 1 run only the base
or only the aligned model (half the compute, and bitwise the plain sampler of that model).

The two models are a :class:`DenoiserPair`: a callable evaluating a batch whose first
``num_base`` rows go to the base model and the rest to the aligned model.

* :class:`LoRAPair`: base and aligned are the same network with its LoRA adapter off and on.
  Batched mode runs all rows in ONE forward: a forward pre-hook on every active ``lora_A``
  module multiplies its input by a per-row mask (0 for base rows, 1 for aligned rows), so the
  LoRA update of base rows is exactly zero while the frozen weights process the whole batch
  once.  The extra cost over a plain forward of the same rows is one multiply per LoRA layer and
  the (rank-r) LoRA matmuls on the base rows.  Adapters that are merged or use a variant (DoRA)
  fall back to two forwards (adapters off, then on), which is also what ``batched=False`` does.
* :class:`TwoModels`: two separate callables (a fully fine-tuned model, or the analytic toy).
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator
from typing import Any, Protocol

import torch
from torch import Tensor

from align.core.chain import StepCallback, run_chain
from align.core.denoisers import cat_conditioning
from align.core.errors import AlignError
from align.core.lora import adapters_disabled
from align.core.sampling import DenoiserFn, Generators, SamplingSchedule
from align.steer.particles import (
    Conditioning,
    EvalCounts,
    Predictor,
    SteeringResult,
    prepare_particles,
)
from align.steer.rlg_config import RLGConfig

__all__ = ["RLGConfig", "DenoiserPair", "LoRAPair", "TwoModels", "rlg_prediction", "rlg_sample"]

logger = logging.getLogger(__name__)


class DenoiserPair(Protocol):
    """``pair(x, t, cond, num_base)``: rows [0, num_base) by the base model, the rest by the aligned one."""

    def __call__(self, x: Tensor, t: Tensor, cond: Conditioning, num_base: int) -> Tensor: ...


class TwoModels:
    """A pair of separate denoiser callables (two forwards when a batch mixes both)."""

    def __init__(self, base: DenoiserFn, aligned: DenoiserFn):
        self.base, self.aligned = base, aligned

    def __call__(self, x: Tensor, t: Tensor, cond: Conditioning, num_base: int) -> Tensor:
        n = x.shape[0]
        if num_base == n:
            return self.base(x, t, cond)
        if num_base == 0:
            return self.aligned(x, t, cond)
        head = {k: v[:num_base] for k, v in cond.items()}
        tail = {k: v[num_base:] for k, v in cond.items()}
        return torch.cat([self.base(x[:num_base], t[:num_base], head), self.aligned(x[num_base:], t[num_base:], tail)])


def _lora_layers(module: torch.nn.Module) -> list:
    from peft.tuners.lora import LoraLayer

    return [m for m in module.modules() if isinstance(m, LoraLayer)]


class LoRAPair:
    """Base = ``denoiser.module`` with its LoRA adapters off, aligned = adapters on.

    With ``batched`` (default) mixed batches run in one forward through row-masked LoRA inputs
    (see the module docstring); otherwise, or when the adapters do not allow it, in two.
    """

    def __init__(self, denoiser, batched: bool = True):
        module = getattr(denoiser, "module", None)
        if module is None or not getattr(module, "peft_config", None):
            raise AlignError(
                "RL guidance with one network needs a LoRA adapter on its denoiser (the aligned model); "
                "load one first (pipe.load_lora_weights(dir) or align.core.lora.load_lora), or pass two models"
            )
        layers = _lora_layers(module)
        if not layers:
            raise AlignError("the denoiser has a peft config but no LoRA layers; RL guidance needs LoRA adapters")
        self.denoiser = denoiser
        self.module = module
        self._layers = layers
        self.batched = batched and self._maskable()

    def _maskable(self) -> bool:
        for layer in self._layers:
            active = [a for a in layer.active_adapters if a in layer.lora_A]
            variants = getattr(layer, "lora_variant", {})
            unmaskable = any(a in layer.scaling and a not in layer.lora_A for a in layer.active_adapters)
            if layer.merged or unmaskable or any(a in variants for a in active):
                logger.warning(
                    "LoRA adapters are merged, on embeddings or use a variant (e.g. DoRA); RL guidance runs "
                    "two forwards per step instead of one"
                )
                return False
        return True

    @contextlib.contextmanager
    def _row_mask(self, mask: Tensor) -> Iterator[None]:
        def hook(_module, args):
            inp = args[0]
            if inp.shape[0] != mask.shape[0]:
                raise AlignError(
                    f"a LoRA layer saw a batch of {inp.shape[0]} rows where {mask.shape[0]} were sent; this "
                    "model folds the batch, so run RL guidance with batched=False"
                )
            return (inp * mask.view(-1, *([1] * (inp.ndim - 1))).to(inp.dtype), *args[1:])

        handles = []
        try:
            for layer in self._layers:
                for name in layer.active_adapters:
                    if name in layer.lora_A:
                        handles.append(layer.lora_A[name].register_forward_pre_hook(hook))
            yield
        finally:
            for h in handles:
                h.remove()

    def __call__(self, x: Tensor, t: Tensor, cond: Conditioning, num_base: int) -> Tensor:
        n = x.shape[0]
        if getattr(self._layers[0], "disable_adapters", False):
            raise AlignError("the LoRA adapters are disabled; enable them (the aligned model) before RL guidance")
        if num_base == 0:
            return self.denoiser(x, t, cond)
        if num_base == n:
            with adapters_disabled(self.module):
                return self.denoiser(x, t, cond)
        if not self.batched:
            return TwoModels(self._base, self.denoiser)(x, t, cond, num_base)
        mask = torch.ones(n, device=x.device)
        mask[:num_base] = 0.0
        with self._row_mask(mask):
            return self.denoiser(x, t, cond)

    def _base(self, x: Tensor, t: Tensor, cond: Conditioning) -> Tensor:
        with adapters_disabled(self.module):
            return self.denoiser(x, t, cond)


def _side_rows(cond: Conditioning, uncond: Conditioning | None, scale: float) -> tuple[list[Conditioning], bool]:
    if uncond is None or scale == 1.0:
        return [cond], False
    return [uncond, cond], True


def rlg_prediction(
    pair: DenoiserPair,
    x: Tensor,
    t: Tensor,
    weight: float,
    cond_base: Conditioning,
    uncond_base: Conditioning | None = None,
    guidance_scale: float = 1.0,
    cond_aligned: Conditioning | None = None,
    uncond_aligned: Conditioning | None = None,
    aligned_guidance_scale: float | None = None,
    counts: EvalCounts | None = None,
) -> Tensor:
    """The RLG model output v_base + weight (v_aligned - v_base), from one call of ``pair``.

    ``cond_aligned``/``uncond_aligned`` default to the base side's (they differ when the text
    encoder has its own adapter).  Rows are ordered [u_b, c_b, u_a, c_a] (CFG parts dropped where
    the scale is 1 or there is no uncond; a side dropped where weight is 0 or 1).
    """
    g_a = guidance_scale if aligned_guidance_scale is None else aligned_guidance_scale
    cond_aligned = cond_base if cond_aligned is None else cond_aligned
    uncond_aligned = uncond_base if uncond_aligned is None else uncond_aligned
    sides = []
    if weight != 1.0:
        sides.append((cond_base, uncond_base, guidance_scale))
    if weight != 0.0:
        sides.append((cond_aligned, uncond_aligned, g_a))
    blocks: list[Conditioning] = []
    layout: list[bool] = []
    for cond, uncond, scale in sides:
        rows, cfg = _side_rows(cond, uncond, scale)
        blocks += rows
        layout.append(cfg)
    b = x.shape[0]
    num_base = 0 if weight == 1.0 else b * (2 if layout[0] else 1)
    out = pair(torch.cat([x] * len(blocks)), torch.cat([t] * len(blocks)), cat_conditioning(*blocks), num_base)
    if counts is not None:
        counts.model_calls += 1
        counts.model_rows += b * len(blocks)
    parts = list(out.split(b))
    preds = []
    for (_, _, scale), cfg in zip(sides, layout):
        if cfg:
            u, c = parts.pop(0), parts.pop(0)
            preds.append(u + scale * (c - u))
        else:
            preds.append(parts.pop(0))
    if len(preds) == 1:
        return preds[0]
    v_base, v_aligned = preds
    return v_base + weight * (v_aligned - v_base)


class _RLGPredictor(Predictor):
    """Per-step RLG outputs for all samples (chunked and counted like any predictor)."""

    def __init__(self, pair: DenoiserPair, base: Predictor, conds: dict, config: RLGConfig):
        super().__init__(pair, base.schedule, base.cond, base.uncond, base.guidance_scale, base.counts,
                         chunk_size=config.model_chunk_size, model_dtype=base.model_dtype)
        self.pair, self.conds, self.config = pair, conds, config

    def _evaluate(self, x: Tensor, t: Tensor, rows: slice | None) -> Tensor:
        conds = {k: (v if v is None or rows is None else {n: c[rows] for n, c in v.items()}) for k, v in self.conds.items()}
        return rlg_prediction(
            self.pair, x, t, self.config.weight, guidance_scale=self.guidance_scale,
            aligned_guidance_scale=self.config.aligned_guidance_scale, counts=self.counts, **conds,
        )


def rlg_sample(
    pair: DenoiserPair,
    schedule: SamplingSchedule,
    config: RLGConfig | None = None,
    *,
    cond_aligned: Conditioning | None = None,
    uncond_aligned: Conditioning | None = None,
    generator: Generators = None,
    progress: bool = False,
    step_callback: StepCallback | None = None,
    **inputs: Any,
) -> SteeringResult:
    """Sample ``config.num_samples`` per prompt with the RLG blend at every step.

    ``inputs`` are the keywords of :func:`align.steer.particles.prepare_particles` (``sample_shape``, per-prompt
    ``cond``/``uncond`` and ``guidance_scale`` of the base side, ``num_prompts``, ``device``, ``dtype``,
    ``model_dtype``); ``cond_aligned``/``uncond_aligned`` only when the aligned side encodes prompts
    differently (a text-encoder adapter).  The blend is the ``predict`` of the one sampling chain
    (:func:`align.core.chain.run_chain`), seeded like the other particle samplers (``generator`` None:
    sample k of every prompt from ``config.seed + k``; see :func:`align.steer.particles.particle_noise`),
    so w = 0 reproduces :func:`align.steer.generate.generate` of the base model bitwise.  Returns the
    final samples (no decoding, no rewards).
    """
    config = config or RLGConfig()
    k = config.num_samples
    setup = prepare_particles(pair, schedule, k, **inputs)

    def per_sample(c: Conditioning | None) -> dict | None:
        return None if c is None else {n: v.repeat_interleave(k, dim=0) for n, v in c.items()}

    base = setup.predictor
    conds = {
        "cond_base": base.cond,
        # kept even when the base side has no CFG (scale 1): the aligned side may use it
        "uncond_base": per_sample(inputs.get("uncond")) if base.uncond is None else base.uncond,
        "cond_aligned": per_sample(cond_aligned),
        "uncond_aligned": per_sample(uncond_aligned),
    }
    predictor = _RLGPredictor(pair, base, conds, config)
    noise, _ = setup.noise(config.seed, generator)
    x = run_chain(schedule, predictor, setup.initial_noise(noise), noise, step_callback=step_callback, progress=progress,
                  description="RL guidance")
    return SteeringResult(samples=x, images=None, rewards=None, counts=setup.counts)
