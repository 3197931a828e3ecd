"""Resampling of weighted particles, vectorised over groups (one group per prompt).

A resampler maps log-weights ``[G, K]`` (G groups of K particles, any normalisation, float64
recommended) to ancestor indices ``[G, K]`` within each group, such that particle ``j`` of
group ``g`` is copied ``N_gj`` times with ``E[N_gj] = K w_gj`` (unbiased).  All resamplers work
on the whole batch at once through inverse-CDF lookups (``searchsorted``), without Python loops
over particles and without host synchronisation, so that the caller can gather every per-particle
tensor with one ``index_select``.

Registered resamplers (lowest variance last):

* ``multinomial``: K independent draws (what the public FK code uses).
* ``residual``: floor(K w) deterministic copies, the rest drawn multinomially.
* ``stratified``: one uniform in each of the K strata [k/K, (k+1)/K).
* ``systematic``: one uniform shared by all strata.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

from align.core.errors import AlignError, check_choice

Resampler = Callable[[Tensor, "torch.Generator | None"], Tensor]

RESAMPLERS: dict[str, Resampler] = {}


def register_resampler(name: str):
    """Register a resampler ``(log_weights [G, K], generator) -> ancestors [G, K]`` under ``name``."""

    def add(fn: Resampler) -> Resampler:
        if name in RESAMPLERS and RESAMPLERS[name] is not fn:
            raise AlignError(f"a resampler named {name!r} is already registered")
        RESAMPLERS[name] = fn
        return fn

    return add


def get_resampler(name: str) -> Resampler:
    check_choice("resampler", name, sorted(RESAMPLERS))
    return RESAMPLERS[name]


def normalized_weights(log_weights: Tensor) -> Tensor:
    """Weights summing to one along the last dimension, computed stably from log-weights."""
    return torch.softmax(log_weights, dim=-1)


def normalize_log_weights(log_weights: Tensor) -> Tensor:
    """Log-weights shifted so that each group's weights sum to one."""
    return log_weights - torch.logsumexp(log_weights, dim=-1, keepdim=True)


def effective_sample_size(log_weights: Tensor) -> Tensor:
    """ESS = 1 / sum(w^2) of the normalised weights, per group: [G, K] -> [G]."""
    return torch.exp(2 * torch.logsumexp(log_weights, -1) - torch.logsumexp(2 * log_weights, -1))


def _uniform(shape: tuple[int, ...], generator: torch.Generator | None, like: Tensor) -> Tensor:
    device = generator.device if generator is not None else like.device
    u = torch.rand(shape, generator=generator, device=device, dtype=torch.float64)
    return u.to(like.device)


def _inverse_cdf(weights: Tensor, u: Tensor) -> Tensor:
    """Index of the first particle whose cumulative weight exceeds ``u`` (u in [0, 1))."""
    cdf = weights.cumsum(-1)
    cdf[..., -1] = 1.0  # rounding must not leave a gap above the last particle
    return torch.searchsorted(cdf, u.contiguous(), right=True).clamp_(max=weights.shape[-1] - 1)


@register_resampler("multinomial")
def multinomial(log_weights: Tensor, generator: torch.Generator | None = None) -> Tensor:
    """K independent draws from the weights."""
    w = normalized_weights(log_weights.double())
    return _inverse_cdf(w, _uniform(tuple(w.shape), generator, w))


@register_resampler("stratified")
def stratified(log_weights: Tensor, generator: torch.Generator | None = None) -> Tensor:
    """One independent uniform per stratum [k/K, (k+1)/K)."""
    w = normalized_weights(log_weights.double())
    k = w.shape[-1]
    offsets = torch.arange(k, device=w.device, dtype=torch.float64)
    return _inverse_cdf(w, (offsets + _uniform(tuple(w.shape), generator, w)) / k)


@register_resampler("systematic")
def systematic(log_weights: Tensor, generator: torch.Generator | None = None) -> Tensor:
    """One uniform per group, shifted by k/K for the k-th draw."""
    w = normalized_weights(log_weights.double())
    k = w.shape[-1]
    offsets = torch.arange(k, device=w.device, dtype=torch.float64)
    return _inverse_cdf(w, (offsets + _uniform((*w.shape[:-1], 1), generator, w)) / k)


@register_resampler("residual")
def residual(log_weights: Tensor, generator: torch.Generator | None = None) -> Tensor:
    """floor(K w) copies of each particle, the remaining R = K - sum floor(K w) drawn multinomially
    from the residual weights K w - floor(K w)."""
    w = normalized_weights(log_weights.double())
    k = w.shape[-1]
    scaled = w * k
    counts = scaled.floor()
    remaining = (k - counts.sum(-1, keepdim=True)).clamp_(min=0)
    res = scaled - counts
    total = res.sum(-1, keepdim=True)
    # groups with nothing left to draw get dummy uniform residuals; their draws are masked out below
    res = torch.where(total > 0, res / total.clamp(min=1e-300), torch.full_like(res, 1.0 / k))
    draws = _inverse_cdf(res, _uniform(tuple(w.shape), generator, w))
    keep = torch.arange(k, device=w.device, dtype=torch.float64) < remaining
    counts = counts.scatter_add(-1, draws, keep.to(counts.dtype))
    # ancestors in order: slot j belongs to the first particle whose cumulative count exceeds j
    slots = torch.arange(k, device=w.device, dtype=torch.float64).expand_as(counts).contiguous()
    return torch.searchsorted(counts.cumsum(-1), slots, right=True).clamp_(max=k - 1)


def resample_groups(
    log_weights: Tensor,
    resampler: str | Resampler,
    generator: torch.Generator | None,
    ess_threshold: float = 1.0,
) -> tuple[Tensor, Tensor, Tensor]:
    """Decide per group whether to resample, and draw ancestors.

    A group is resampled when its weights are not all equal and, for ``ess_threshold`` < 1,
    when its ESS is below ``ess_threshold * K`` (``ess_threshold`` >= 1 resamples at every call,
    as the FK paper does).  Equal weights are never resampled: that only adds noise, and it
    keeps a zero-reward run identical to the base sampler.  Random numbers are drawn for every
    group whatever the decision, so the random stream does not depend on the weights.

    Returns ``(ancestors [G, K], resampled [G] bool, ess [G])``; groups not resampled get the
    identity ancestry.
    """
    fn = get_resampler(resampler) if isinstance(resampler, str) else resampler
    k = log_weights.shape[-1]
    ess = effective_sample_size(log_weights)
    uneven = log_weights.amax(-1) > log_weights.amin(-1)
    resampled = uneven if ess_threshold >= 1.0 else uneven & (ess < ess_threshold * k)
    drawn = fn(log_weights, generator)
    identity = torch.arange(k, device=log_weights.device).expand_as(drawn)
    ancestors = torch.where(resampled.unsqueeze(-1), drawn, identity)
    return ancestors, resampled, ess


def flat_indices(ancestors: Tensor) -> Tensor:
    """Group-local ancestors [G, K] -> indices into the flattened, group-major batch [G * K]."""
    g, k = ancestors.shape
    offsets = torch.arange(g, device=ancestors.device).unsqueeze(-1) * k
    return (ancestors + offsets).reshape(-1)
