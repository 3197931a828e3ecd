"""FK steering on an analytic Gaussian-mixture diffusion: the particles approach the closed-form tilted target.

Target: p(x) exp(lambda r(x)) / Z for a mixture p and a linear (or quadratic) reward, which is again a
mixture (align.builtin.toy).  Estimates are the FK self-normalised weighted averages per prompt group; the
tolerance is 4 standard errors from the spread between independent groups (the sample size), and the
base sampler is checked against p with the same tolerance so that discretisation cannot hide behind it.
"""

import functools
import math
import warnings

import pytest
import torch
from _threads import one_thread  # noqa: F401
from scipy import stats

from align.builtin.toy import (
    GaussianMixture,
    LinearReward,
    MixtureDenoiser,
    QuadraticReward,
    energy_distance_test,
    toy_scheduler,
    weighted_law_moments,
)
from align.core.chain import run_chain
from align.core.errors import AlignError
from align.core.sampling import SamplingSchedule
from align.steer.fk import FKConfig, LowESSWarning, fk_sample
from align.steer.guidance import BestOfNConfig, best_of_n
from align.steer.particles import prepare_particles
from align.steer.potentials import POTENTIALS
from align.steer.resampling import RESAMPLERS, effective_sample_size

MIX = GaussianMixture.create([0.7, 0.3], [[-1.0], [1.5]], [0.5, 0.4])
REWARD = LinearReward([1.0])
LAM = 0.5
TARGET = REWARD.tilt(MIX, LAM)  # component weights 0.7/0.3 -> 0.40/0.60, mean -0.25 -> 0.59
STEPS = 250
CDF_POINTS = (-1.0, 0.0, 1.0, 2.0)


@functools.cache
def toy(kind: str = "ddim", mixture: GaussianMixture = MIX, steps: int = STEPS):
    scheduler = toy_scheduler(kind)
    schedule = SamplingSchedule.from_scheduler(scheduler, steps, eta=None if kind == "ddpm" else 1.0)
    return MixtureDenoiser(mixture, scheduler), schedule


def batch_generator(seed: int) -> torch.Generator:
    """One generator for the whole batch: the prompt groups of the toy (all the same "prompt") are
    then independent replicates; the default per-particle seeds would give every group the same noise."""
    return torch.Generator().manual_seed(seed)


def run_fk(groups: int, kind: str = "ddim", reward=REWARD, mixture=MIX, **overrides):
    # ess_warning=0: the statistical tests read the weights themselves (the warning has its own tests)
    fields = dict(num_particles=128, lambda_=LAM, resample_start=50, resample_end=200, resample_interval=50, seed=0,
                  ess_warning=0.0)
    fields.update(overrides)
    denoiser, schedule = toy(kind, mixture)
    return fk_sample(denoiser, schedule, reward, FKConfig(**fields), sample_shape=(mixture.dim,),
                     num_prompts=groups, dtype=torch.float64, generator=batch_generator(fields["seed"]))


def group_estimates(result, groups: int, fn) -> torch.Tensor:
    """Per-group self-normalised estimate of E[fn(x)] ([G, K, d] -> [G, K] values)."""
    w = result.log_weights.exp()
    x = result.samples.view(groups, w.shape[1], -1)
    return (w * fn(x)).sum(1)


def assert_matches(result, groups: int, target: GaussianMixture, what: str):
    checks = {
        "mean": (lambda x: x[..., 0], target.mean()[0]),
        "second moment": (lambda x: x[..., 0] ** 2, (target.variance() + target.mean() ** 2)[0]),
    }
    for point in CDF_POINTS:
        checks[f"cdf({point})"] = (lambda x, p=point: (x[..., 0] <= p).double(), target.cdf(torch.tensor(point)))
    for name, (fn, exact) in checks.items():
        est = group_estimates(result, groups, fn)
        se = est.std() / groups**0.5
        assert abs(est.mean() - exact) <= 4 * se, f"{what}: {name} {est.mean():.4f} vs exact {float(exact):.4f} (se {se:.4f})"


def one_per_group(result, groups: int, seed: int = 0) -> torch.Tensor:
    """One particle per group drawn by the final weights: independent draws from FK's output law."""
    w = result.log_weights.exp()
    pick = torch.multinomial(w, 1, generator=torch.Generator().manual_seed(seed)).squeeze(1)
    return result.samples.view(groups, w.shape[1], -1)[torch.arange(groups), pick]


def test_base_sampler_matches_the_mixture():
    # the discretisation of the sampler is below the tolerance used for FK below
    result = run_fk(64, lambda_=0.0)
    assert_matches(result, 64, MIX, "base sampler")


CASES = [(p, r) for p in sorted(POTENTIALS) for r in sorted(RESAMPLERS)]


@pytest.mark.parametrize("potential,resampler", CASES, ids=[f"{p}-{r}" for p, r in CASES])
def test_fk_targets_the_tilted_mixture(potential, resampler):
    result = run_fk(64, potential=potential, resampler=resampler)
    assert_matches(result, 64, TARGET, f"{potential}/{resampler}")
    base_mean = MIX.mean()[0]
    assert abs(group_estimates(result, 64, lambda x: x[..., 0]).mean() - base_mean) > 0.6  # it really moved


@pytest.mark.parametrize(
    "kind,overrides",
    [
        ("flow", {}),  # flow matching with the SDE step
        ("ddpm", {"potential": "difference"}),
        ("ddim", {"ess_threshold": 0.5}),  # adaptive: weights carried over skipped steps
        ("ddim", {"intermediate_reward": "x0_samples", "intermediate_samples": 4}),
        ("ddim", {"proposal": "gradient", "proposal_scale": 2.0}),
        ("flow", {"proposal": "gradient", "potential": "difference"}),
        ("ddim", {"final_resample": True}),
    ],
    ids=["flow-sde", "ddpm", "adaptive-ess", "x0-samples", "gradient-proposal", "flow-gradient", "final-resample"],
)
def test_fk_variants_target_the_tilted_mixture(kind, overrides):
    result = run_fk(64, kind, **overrides)
    assert_matches(result, 64, TARGET, f"{kind} {overrides}")
    if overrides.get("final_resample"):
        assert torch.allclose(result.log_weights, torch.full_like(result.log_weights, -torch.log(torch.tensor(128.0))))


def test_gradient_proposal_is_corrected_by_its_weights():
    result = run_fk(64, proposal="gradient", proposal_scale=3.0, potential="difference")
    unweighted = result.samples.view(64, -1).mean(1).mean()
    weighted = group_estimates(result, 64, lambda x: x[..., 0]).mean()
    # the shifted proposal alone overshoots the target; the importance weights bring it back
    assert unweighted - TARGET.mean()[0] > 0.1
    assert abs(weighted - TARGET.mean()[0]) < abs(unweighted - TARGET.mean()[0]) / 2
    assert result.counts.reward_grad_rows > 0


@pytest.mark.parametrize("potential", ["max", "difference"])
def test_fk_approaches_the_target_as_particles_grow(potential):
    errors = {}
    for k in (1, 4, 64):
        groups = 4096 // k
        result = run_fk(groups, potential=potential, num_particles=k)
        errors[k] = abs(group_estimates(result, groups, lambda x: x[..., 0]).mean() - TARGET.mean()[0]).item()
    assert errors[1] == pytest.approx(abs(MIX.mean()[0] - TARGET.mean()[0]).item(), abs=0.08)  # K=1: the base law
    assert errors[1] > errors[4] > errors[64], errors


def potential_figures(potential: str, lam: float, k: int, groups: int, seeds) -> dict[str, float]:
    """Seed means of bias (FK's law minus the exact tilt), variance ratio and final ESS / k (bench/fk_potentials.py)."""
    target = REWARD.tilt(MIX, lam)
    runs = []
    for seed in seeds:
        result = run_fk(groups, potential=potential, num_particles=k, lambda_=lam, seed=seed)
        mean, variance = weighted_law_moments(result.samples.view(groups, k), result.log_weights)
        ess = float(effective_sample_size(result.log_weights).mean()) / k
        runs.append((mean - float(target.mean()[0]), variance / float(target.variance()[0]), ess))
    return dict(zip(("bias", "variance_ratio", "ess_fraction"), (sum(r[i] for r in runs) / len(runs) for i in range(3))))


def test_max_and_difference_converge_at_practical_k_and_sum_degenerates():
    """What bench/fk_potentials.py measures, at a CI size: lambda 2, k 256, 32 prompt groups, seeds 0-3, 250 steps.

    Over 12 seeds at this size (mean +- sd of one seed): bias difference -0.036 +- 0.006, max -0.029 +- 0.013
    (mostly the sampler's own time discretisation at 250 steps, about -0.03); variance ratio difference
    0.98 +- 0.02, max 0.95 +- 0.07; ESS/k difference 0.48 +- 0.02, max 0.14 +- 0.01, sum 0.039 +- 0.005.
    The bounds sit 4 standard errors of a 4-seed mean beyond those figures.  Sum's weights degenerate:
    its intermediate potentials multiply to about exp(10 lambda r) over the 4 potential steps (max's to
    about exp(4 lambda r), difference's to exactly exp(lambda r_last)), which the final weights must undo.
    """
    figures = {p: potential_figures(p, 2.0, 256, 32, range(4)) for p in ("difference", "max", "sum")}
    for potential in ("difference", "max"):
        assert abs(figures[potential]["bias"]) < 0.065, (potential, figures[potential])
        assert 0.8 < figures[potential]["variance_ratio"] < 1.15, (potential, figures[potential])
    ess = {p: f["ess_fraction"] for p, f in figures.items()}
    assert ess["sum"] < ess["max"] / 2 and ess["max"] < ess["difference"] / 2, ess


def test_two_sample_tests_accept_fk_and_reject_the_base_sampler():
    groups = 1024
    result = run_fk(groups, num_particles=32)
    draws = one_per_group(result, groups).squeeze(1).numpy()
    exact = TARGET.sample(4000, torch.Generator().manual_seed(1)).squeeze(1).numpy()
    assert stats.ks_2samp(draws, exact).pvalue > 1e-3
    base = run_fk(groups, num_particles=1)
    assert stats.ks_2samp(one_per_group(base, groups).squeeze(1).numpy(), exact).pvalue < 1e-6


def test_two_dimensional_quadratic_reward_energy_test():
    mix = GaussianMixture.create([0.5, 0.3, 0.2], [[-1.5, 0.0], [1.0, 1.0], [0.5, -1.5]], [[0.5, 0.4], [0.4, 0.6], [0.5, 0.5]])
    reward = QuadraticReward([1.0, 1.0])
    target = reward.tilt(mix, 1.0)
    groups = 384
    result = run_fk(groups, reward=reward, mixture=mix, lambda_=1.0, num_particles=32)
    draws = one_per_group(result, groups)
    exact = target.sample(groups, torch.Generator().manual_seed(2))
    _, p_fk = energy_distance_test(draws, exact, permutations=100, generator=torch.Generator().manual_seed(3))
    assert p_fk > 1e-3
    base = mix.sample(groups, torch.Generator().manual_seed(4))
    _, p_base = energy_distance_test(base, exact, permutations=100, generator=torch.Generator().manual_seed(3))
    assert p_base < 0.02  # the test has the power to tell the base law from the target
    for d in range(2):
        est = group_estimates(result, groups, lambda x, d=d: x[..., d])
        assert abs(est.mean() - target.mean()[d]) <= 4 * est.std() / groups**0.5


def _base_sample(groups: int, k: int, seed: int, kind: str = "ddim") -> torch.Tensor:
    denoiser, schedule = toy(kind)
    setup = prepare_particles(denoiser, schedule, k, sample_shape=(1,), num_prompts=groups, dtype=torch.float64)
    gen = batch_generator(seed)
    return run_chain(schedule, setup.predictor, setup.initial_noise(gen), gen)


@pytest.mark.parametrize("kind", ["ddim", "flow"])
def test_zero_lambda_and_constant_reward_reproduce_the_base_sampler(kind):
    base = _base_sample(8, 4, seed=5, kind=kind)
    zero = run_fk(8, kind, lambda_=0.0, num_particles=4, seed=5)
    assert torch.equal(zero.samples, base)
    constant = run_fk(8, kind, reward=lambda x, prompts: torch.full((x.shape[0],), 3.0), lambda_=10.0,
                      num_particles=4, seed=5)
    assert torch.equal(constant.samples, base)
    torch.testing.assert_close(constant.log_weights, torch.full((8, 4), -math.log(4), dtype=torch.float64), atol=1e-12, rtol=0)
    assert all(not bool(e.resampled.any()) for e in constant.ancestry)


def test_skipped_resampling_carries_the_weights():
    # never resampling turns FK into importance sampling: the final weights must be exp(lambda r(x0)),
    # which only holds when every intermediate potential is carried forward and then corrected
    result = run_fk(4, num_particles=16, ess_threshold=0.0, seed=2)
    assert torch.equal(result.samples, _base_sample(4, 16, seed=2))
    expected = torch.log_softmax(LAM * REWARD(result.samples).view(4, 16), dim=-1)
    torch.testing.assert_close(result.log_weights, expected, atol=1e-10, rtol=0)
    assert len(result.ancestry) == 4 and not any(bool(e.resampled.any()) for e in result.ancestry)


def test_prompts_are_steered_independently():
    # three "prompts" shift the mixture by their offsets; each group must reach its own tilted target
    offsets = torch.tensor([-2.0, 0.0, 3.0]).repeat(24)
    cond = {"offset": offsets[:, None].double()}
    denoiser, schedule = toy()
    result = fk_sample(denoiser, schedule, REWARD, FKConfig(num_particles=64, lambda_=LAM, resample_start=50,
                       resample_end=200, resample_interval=50), sample_shape=(1,), cond=cond, dtype=torch.float64,
                       generator=batch_generator(0))
    est = group_estimates(result, 72, lambda x: x[..., 0])
    for j, offset in enumerate((-2.0, 0.0, 3.0)):
        mine = est[j::3]
        assert abs(mine.mean() - (TARGET.mean()[0] + offset)) <= 4 * mine.std() / mine.numel() ** 0.5
    # resampling stays inside each prompt's group
    for event in result.ancestry:
        assert event.ancestors.shape == (72, 64) and int(event.ancestors.max()) < 64


def test_chunking_and_seed_determinism():
    sizes = []

    def decode(x):
        sizes.append(x.shape[0])
        return x

    common = dict(num_particles=10, seed=3)
    denoiser, schedule = toy()
    config = FKConfig(lambda_=LAM, resample_start=50, resample_end=200, resample_interval=50, **common)
    whole = fk_sample(denoiser, schedule, REWARD, config, sample_shape=(1,), num_prompts=5, dtype=torch.float64)
    chunked = fk_sample(denoiser, schedule, REWARD, FKConfig(lambda_=LAM, resample_start=50, resample_end=200,
                        resample_interval=50, chunk_size=7, model_chunk_size=6, **common), sample_shape=(1,),
                        num_prompts=5, decode_fn=decode, dtype=torch.float64)
    assert torch.equal(whole.samples, chunked.samples)
    assert torch.equal(whole.log_weights, chunked.log_weights)
    assert max(sizes) == 7 and sum(sizes) == 50 * 5  # four intermediate steps + the final one, 50 particles each
    assert chunked.counts.model_calls == STEPS * 9 and chunked.counts.model_rows == whole.counts.model_rows
    again = fk_sample(denoiser, schedule, REWARD, config, sample_shape=(1,), num_prompts=5, dtype=torch.float64)
    assert torch.equal(again.samples, whole.samples)
    other = fk_sample(denoiser, schedule, REWARD, FKConfig(lambda_=LAM, num_particles=10, seed=4, resample_start=50,
                      resample_end=200, resample_interval=50), sample_shape=(1,), num_prompts=5, dtype=torch.float64)
    assert not torch.equal(other.samples, whole.samples)


def test_custom_intermediate_reward_equals_the_default():
    default = run_fk(4, num_particles=8)
    denoiser, schedule = toy()
    config = FKConfig(num_particles=8, lambda_=LAM, resample_start=50, resample_end=200, resample_interval=50,
                      intermediate_reward="custom")
    custom = fk_sample(denoiser, schedule, REWARD, config, sample_shape=(1,), num_prompts=4, dtype=torch.float64,
                       intermediate_fn=lambda x_t, x0_hat, step: REWARD(x0_hat), generator=batch_generator(0))
    assert torch.equal(custom.samples, default.samples)


def test_fk_beats_best_of_n_at_matched_model_evaluations():
    denoiser, schedule = toy(steps=100)
    groups, k = 512, 4
    bon = best_of_n(denoiser, schedule, REWARD, BestOfNConfig(num_samples=k), sample_shape=(1,),
                    num_prompts=groups, dtype=torch.float64, generator=batch_generator(1))
    # lambda = 10 with k = 4 leaves ESS < 1.2 on many prompts (the warning would say so): ess_warning=0
    fk = fk_sample(denoiser, schedule, REWARD, FKConfig(num_particles=k, lambda_=10.0, ess_warning=0.0), sample_shape=(1,),
                   num_prompts=groups, dtype=torch.float64, generator=batch_generator(1))
    assert fk.counts.model_rows == bon.counts.model_rows == groups * k * 100
    gain = fk.best_rewards() - bon.best_rewards()
    # paired over prompts: FK's best particle beats best-of-N by many standard errors
    assert gain.mean() > 5 * gain.std() / groups**0.5
    # FK's extra cost is intermediate rewards only: 4 scheduled steps + the final one
    assert fk.counts.reward_rows == 5 * bon.counts.reward_rows


def test_best_of_n_is_fk_with_zero_lambda():
    bon = best_of_n(*toy(), REWARD, BestOfNConfig(num_samples=4), sample_shape=(1,), num_prompts=8,
                    dtype=torch.float64, generator=batch_generator(5))
    assert torch.equal(bon.samples, _base_sample(8, 4, seed=5))
    # the default seeds (sample k of every prompt from seed + k) agree between the two as well
    seeded = dict(sample_shape=(1,), num_prompts=8, dtype=torch.float64)
    fk = fk_sample(*toy(), REWARD, FKConfig(num_particles=4, lambda_=0.0, seed=5), **seeded)
    assert torch.equal(best_of_n(*toy(), REWARD, BestOfNConfig(num_samples=4, seed=5), **seeded).samples, fk.samples)
    assert torch.equal(bon.best_indices(), bon.rewards.argmax(-1) + torch.arange(8) * 4)


def _run_recording_warnings(**overrides):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        result = run_fk(4, **{"num_particles": 16, "ess_warning": FKConfig().ess_warning, **overrides})
    return result, [w for w in caught if issubclass(w.category, LowESSWarning)]


def test_collapsed_weights_warn_once_with_the_figures():
    # lambda = 50 on a reward whose spread between particles is ~1: the final correction puts
    # (nearly) all the weight of every prompt on one particle, ESS / K -> 1 / 16
    result, warned = _run_recording_warnings(lambda_=50.0)
    w = result.log_weights.exp()
    # the reported figure is the ESS of the returned (final, not resampled) weights: 1 / sum w^2 / K
    torch.testing.assert_close(result.final_relative_ess, 1.0 / (w * w).sum(-1) / 16, atol=1e-12, rtol=0)
    assert bool((result.final_relative_ess < 0.1).all())
    assert len(warned) == 1  # once per call, for all four prompts
    message = str(warned[0].message)
    for j in range(4):
        assert f"prompt {j}: {float(result.final_relative_ess[j]):.3f}" in message
    assert "Raise num_particles, lower lambda_ (now 50.0), or use potential='max' or 'difference'" in message
    # ESS / K per resampling event: the events' ESS over K
    assert result.relative_ess.shape == (len(result.ancestry), 4)
    torch.testing.assert_close(result.relative_ess, torch.stack([e.ess for e in result.ancestry]) / 16)
    # 0 switches the warning off
    assert _run_recording_warnings(lambda_=50.0, ess_warning=0.0)[1] == []
    # the default threshold also fires at the paper's k = 4, where ESS / k cannot go below 0.25
    four, warned = _run_recording_warnings(lambda_=50.0, num_particles=4)
    assert len(warned) == 1 and bool((four.final_relative_ess < FKConfig().ess_warning).any())


def test_healthy_weights_do_not_warn():
    result, warned = _run_recording_warnings(lambda_=LAM)
    assert warned == []
    assert bool((result.final_relative_ess > 0.5).all())  # 0.84-0.87 with the max potential
    # with a final resampling the last event's ESS is the same final ESS
    resampled, _ = _run_recording_warnings(lambda_=LAM, final_resample=True)
    torch.testing.assert_close(resampled.ancestry[-1].relative_ess, resampled.final_relative_ess)
    # best-of-N has no weights to report on
    assert best_of_n(*toy(), REWARD, BestOfNConfig(num_samples=2), sample_shape=(1,)).final_relative_ess is None


@pytest.mark.parametrize(
    "make,match",
    [
        (lambda: FKConfig(num_particles=0), r"num_particles=0 is out of range; accepted: \[1, inf\)"),
        (lambda: FKConfig(num_particles=2.5), r"num_particles=2.5 must be an integer"),
        (lambda: FKConfig(lambda_=-1.0), r"lambda_=-1.0 is out of range; accepted: \[0.0, inf\)"),
        (lambda: FKConfig(potential="maxx"), r"potential='maxx' is not supported; accepted: .*'max'.*Did you mean 'max'"),
        (lambda: FKConfig(resampler="bogus"), r"resampler='bogus' is not supported; accepted: 'multinomial', 'residual'"),
        (lambda: FKConfig(resample_start=50, resample_end=10), r"resample_end=10 is before resample_start=50"),
        (lambda: FKConfig(ess_threshold=1.5), r"ess_threshold=1.5 is out of range"),
        (lambda: FKConfig(proposal="twisted"), r"proposal='twisted' is not supported; accepted: 'base', 'gradient'"),
        (lambda: FKConfig(ess_warning=1.5), r"ess_warning=1.5 is out of range; accepted: \[0.0, 1.0\]"),
        (lambda: FKConfig(ess_warning=float("nan")), r"ess_warning=nan must be a finite number"),
    ],
)
def test_config_errors_name_the_value(make, match):
    with pytest.raises(AlignError, match=match):
        make()


@pytest.mark.parametrize("kind,hint", [("ddim", "DDIM with eta > 0"), ("flow", "flow-matching SDE step")])
def test_deterministic_sampler_is_refused(kind, hint):
    scheduler = toy_scheduler(kind)
    schedule = SamplingSchedule.from_scheduler(scheduler, 50, eta=0.0)
    with pytest.raises(AlignError, match=rf"eta=0.0 is deterministic.*{hint}"):
        fk_sample(MixtureDenoiser(MIX, scheduler), schedule, REWARD, FKConfig(resample_start=5, resample_end=40,
                  resample_interval=5), sample_shape=(1,), num_prompts=2)


def test_runtime_errors_are_clear():
    denoiser, schedule = toy(steps=20)
    with pytest.raises(AlignError, match="resample_start=20 is not a step of the 20-step sampler"):
        fk_sample(denoiser, schedule, REWARD, FKConfig(resample_start=20, resample_end=80, resample_interval=20),
                  sample_shape=(1,), num_prompts=1)
    small = FKConfig(resample_start=5, resample_end=15, resample_interval=5)
    with pytest.raises(AlignError, match="intermediate_reward='custom' needs intermediate_fn"):
        fk_sample(denoiser, schedule, REWARD, FKConfig(resample_start=5, resample_end=15, intermediate_reward="custom"),
                  sample_shape=(1,), num_prompts=1)
    with pytest.raises(AlignError, match=r"weights became invalid at step 5 for prompts \[0, 1\]"):
        fk_sample(denoiser, schedule, lambda x, p: torch.full((x.shape[0],), float("nan")), small,
                  sample_shape=(1,), num_prompts=2)
    with pytest.raises(AlignError, match=r"reward returned \(3, 1\); expected a tensor of shape \[3\]"):
        fk_sample(denoiser, schedule, lambda x, p: x, FKConfig(num_particles=3, resample_start=5, resample_end=15), sample_shape=(1,),
                  num_prompts=1)
    with pytest.raises(AlignError, match="disagree on the number of prompts"):
        fk_sample(denoiser, schedule, REWARD, small, sample_shape=(1,), cond={"offset": torch.zeros(3, 1)},
                  prompts=["a", "b"])


def test_resampling_window_scales_with_the_chain():
    """Fractions of the chain (the default 20%..80% every 20%) fit any number of steps; integers are steps."""
    default = FKConfig()
    assert default.potential_steps(100) == [20, 40, 60, 80]  # the paper's schedule
    assert default.potential_steps(4) == [1, 2, 3]  # `align steer num_steps=4` used to fail
    assert default.potential_steps(20) == [4, 8, 12, 16]
    assert FKConfig(resample_start=20, resample_end=80, resample_interval=20).potential_steps(100) == [20, 40, 60, 80]
    assert FKConfig(resample_start=0.5, resample_end=9, resample_interval=2).potential_steps(10) == [5, 7, 9]
    with pytest.raises(AlignError, match=r"resample_start=1.5 is a fraction of the chain and must lie in \[0, 1\]"):
        FKConfig(resample_start=1.5)
    with pytest.raises(AlignError, match=r"resample_end=0.2 \(step 2\) is before resample_start=5 \(step 5\)"):
        FKConfig(resample_start=5, resample_end=0.2).potential_steps(10)
    with pytest.raises(AlignError, match="resample_interval=0 steps must be at least 1"):
        FKConfig(resample_interval=0)
