"""Resamplers are unbiased with the expected variance ordering; potentials and weights are exact in log space."""

import math

import pytest
import torch

from align.core.errors import AlignError
from align.steer.potentials import Potential, PotentialState
from align.steer.resampling import (
    RESAMPLERS,
    effective_sample_size,
    flat_indices,
    normalize_log_weights,
    resample_groups,
)

WEIGHTS = torch.tensor([0.05, 0.4, 0.0, 0.3, 0.15, 0.1], dtype=torch.float64)
REPLICATES = 20_000


def _counts(name: str) -> torch.Tensor:
    """Offspring counts [REPLICATES, K] of the same weights resampled REPLICATES times (as groups)."""
    log_w = torch.log(WEIGHTS).expand(REPLICATES, -1).contiguous()
    ancestors = RESAMPLERS[name](log_w, torch.Generator().manual_seed(1))
    assert ancestors.shape == (REPLICATES, WEIGHTS.numel())
    return torch.zeros_like(log_w).scatter_add_(1, ancestors, torch.ones_like(log_w))


@pytest.mark.parametrize("name", sorted(RESAMPLERS))
def test_resampler_is_unbiased(name):
    counts = _counts(name)
    k = WEIGHTS.numel()
    expected = k * WEIGHTS
    mean = counts.mean(0)
    # standard error from the multinomial variance bound K w (1 - w) (the others have less)
    se = torch.sqrt(k * WEIGHTS * (1 - WEIGHTS) / REPLICATES)
    assert torch.all((mean - expected).abs() <= 4 * se + 1e-12), (mean, expected)
    assert torch.all(counts.sum(1) == k)
    assert counts[:, 2].max() == 0  # a zero-weight particle is never chosen


def test_low_variance_resamplers_beat_multinomial():
    var = {name: _counts(name).var(0).sum().item() for name in RESAMPLERS}
    k = WEIGHTS.numel()
    multinomial_theory = (k * WEIGHTS * (1 - WEIGHTS)).sum().item()
    assert var["multinomial"] == pytest.approx(multinomial_theory, rel=0.05)
    for name in ("stratified", "systematic", "residual"):
        assert var[name] < 0.6 * var["multinomial"], var
    # residual keeps floor(K w) copies deterministically
    counts = _counts("residual")
    assert torch.all(counts >= torch.floor(k * WEIGHTS))


@pytest.mark.parametrize("name", sorted(RESAMPLERS))
def test_extreme_log_weights_do_not_overflow(name):
    # linear weights exp(1e5) overflow; in log space the dominant particle simply wins
    log_w = torch.tensor([[0.0, 1e5, -1e5, 3.0]], dtype=torch.float64)
    ancestors = RESAMPLERS[name](log_w, torch.Generator().manual_seed(0))
    assert ancestors.tolist() == [[1, 1, 1, 1]]


def test_ess_and_normalisation():
    log_w = torch.log(torch.tensor([[0.25, 0.25, 0.25, 0.25], [1.0, 0.0, 0.0, 0.0]], dtype=torch.float64)) + 7.0
    ess = effective_sample_size(log_w)
    assert ess[0].item() == pytest.approx(4.0)
    assert ess[1].item() == pytest.approx(1.0)
    assert torch.logsumexp(normalize_log_weights(log_w), -1).abs().max() < 1e-12


def test_resample_groups_skips_even_and_high_ess_groups():
    log_w = torch.tensor([[0.0, 0.0, 0.0, 0.0], [0.0, 0.1, -0.1, 0.0], [5.0, 0.0, 0.0, 0.0]], dtype=torch.float64)
    gen = torch.Generator().manual_seed(0)
    ancestors, resampled, ess = resample_groups(log_w, "systematic", gen, ess_threshold=0.5)
    # equal weights: never resampled; ESS 3.98 > 2: skipped; ESS ~1.05 < 2: resampled
    assert resampled.tolist() == [False, False, True]
    assert ancestors[0].tolist() == [0, 1, 2, 3] and ancestors[1].tolist() == [0, 1, 2, 3]
    assert ancestors[2].tolist() == [0, 0, 0, 0]
    _, always, _ = resample_groups(log_w, "systematic", gen, ess_threshold=1.0)
    assert always.tolist() == [False, True, True]
    assert flat_indices(ancestors).tolist() == [0, 1, 2, 3, 4, 5, 6, 7, 8, 8, 8, 8]


def test_unknown_resampler_is_named():
    with pytest.raises(AlignError, match="resampler='stratifed'.*Did you mean 'stratified'"):
        resample_groups(torch.zeros(1, 2), "stratifed", None)


REWARDS = [torch.tensor([-3.0, -1.0]), torch.tensor([-2.0, -4.0]), torch.tensor([-5.0, 0.5])]
# running statistic after each step, per potential, for the two particles above (no resampling)
EXPECTED_STATS = {
    "immediate": [[-3.0, -1.0], [-2.0, -4.0], [-5.0, 0.5]],
    "difference": [[-3.0, -1.0], [1.0, -3.0], [-3.0, 4.5]],
    "max": [[-3.0, -1.0], [-2.0, -1.0], [-2.0, 0.5]],
    "sum": [[-3.0, -1.0], [-5.0, -5.0], [-10.0, -4.5]],
}


@pytest.mark.parametrize("name", sorted(EXPECTED_STATS))
def test_potentials_with_negative_rewards_and_exact_final_correction(name):
    lam = 2.0
    potential = Potential(name, lam)
    state = PotentialState.initial(2, "cpu")
    total = torch.zeros(2, dtype=torch.float64)
    for rewards, expected in zip(REWARDS, EXPECTED_STATS[name]):
        log_g, state = potential.intermediate(rewards, state)
        # the first step uses the reward itself (the public code's 0 start would give max(-3, 0) = 0)
        assert torch.allclose(log_g, lam * torch.tensor(expected, dtype=torch.float64))
        total += log_g
    final_reward = torch.tensor([1.5, -0.25])
    total += potential.final(final_reward, state)
    # whatever the potential, the product along each path is exp(lambda r(x0))
    assert torch.allclose(total, lam * final_reward.double())


def test_potential_state_follows_resampling():
    potential = Potential("max", 1.0)
    _, state = potential.intermediate(torch.tensor([1.0, 5.0, 2.0]), PotentialState.initial(3, "cpu"))
    state = state.select(torch.tensor([1, 1, 0]))
    log_g, state = potential.intermediate(torch.tensor([0.0, 6.0, 0.5]), state)
    assert log_g.tolist() == [5.0, 6.0, 1.0]
    assert math.isclose(potential.final(torch.tensor([0.0, 0.0, 0.0]), state)[0].item(), -(5.0 + 5.0))
