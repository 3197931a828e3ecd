"""Policy-gradient math against known answers: Gaussian densities, closed-form KL, the flow SDE's marginals,
REINFORCE on a toy with an exact gradient, advantages, the clipped surrogate, Guard's ratio, step windows."""

import dataclasses
import math

import numpy as np
import pytest
import scipy.stats
import torch
from _threads import one_thread  # noqa: F401

from align.builtin.toy import GaussianMixture, MixtureDenoiser, toy_scheduler
from align.core.chain import run_chain, seeded_generators
from align.core.errors import AlignError, ConfigError
from align.core.sampling import SamplingSchedule, flow_sde_row
from align.train.policy_gradient import (
    PerPromptStatTracker,
    clipped_surrogate,
    gaussian_kl,
    gaussian_log_density,
    group_advantages,
    guard_log_ratio,
    per_dimension,
)
from align.train.rollout import sample_trajectory, transition_means
from align.train.stochastic_steps import AllSteps, RandomSubset, RandomWindow, SlidingWindow

MIX = GaussianMixture.create([0.6, 0.4], [[-1.0, 0.5, 0.0], [1.0, -0.5, 0.3]], [0.5, 0.4])


def _toy_predict(denoiser, schedule):
    return lambda i, x: denoiser(x, schedule.model_timestep(i, x.shape[0], x.device))


def _recorded(kind: str, steps: int, eta: float | None, noise_level: float | None = None, rows: int = 5):
    scheduler = toy_scheduler(kind)
    denoiser = MixtureDenoiser(MIX, scheduler)
    schedule = SamplingSchedule.from_scheduler(scheduler, steps, eta=eta)
    if noise_level is not None:
        schedule = schedule.flow_sde(noise_level)
    gens = seeded_generators(range(rows))
    x_T = schedule.initial_noise((rows, MIX.dim), gens, "cpu", torch.float64)
    trajectory = sample_trajectory(schedule, _toy_predict(denoiser, schedule), x_T, gens, keep_means=True)
    return scheduler, schedule, denoiser, trajectory


def _reference_step(kind, scheduler, schedule, i, x, out, eta, noise_level):
    """The step's Gaussian (mean, std) from the papers' formulas, written here independently of SamplingSchedule."""
    t = int(schedule.timesteps[i])
    acp = scheduler.alphas_cumprod.double() if kind != "flow" else None
    if kind == "ddim":  # DDIM (Song et al. eq. 12), as ddpo-pytorch's ddim_step_with_logprob
        prev_t = t - scheduler.config.num_train_timesteps // schedule.num_steps
        a_t, a_prev = float(acp[t]), float(acp[prev_t]) if prev_t >= 0 else 1.0
        std = eta * math.sqrt((1 - a_prev) / (1 - a_t)) * math.sqrt(1 - a_t / a_prev)
        x0 = (x - math.sqrt(1 - a_t) * out) / math.sqrt(a_t)
        return math.sqrt(a_prev) * x0 + math.sqrt(1 - a_prev - std**2) * out, std
    if kind == "ddpm":  # the DDPM posterior (Ho et al. eqs. 6-7), fixed_small variance
        prev_t = int(schedule.timesteps[i + 1])
        a_t, a_prev = float(acp[t]), float(acp[prev_t])
        beta = 1 - a_t / a_prev
        x0 = (x - math.sqrt(1 - a_t) * out) / math.sqrt(a_t)
        mean = math.sqrt(a_prev) * beta / (1 - a_t) * x0 + math.sqrt(1 - beta) * (1 - a_prev) / (1 - a_t) * x
        return mean, math.sqrt((1 - a_prev) / (1 - a_t) * beta)
    # flow: Flow-GRPO's sde_step_with_logprob, in its own arrangement of the terms
    sigmas = scheduler.sigmas.double()
    sigma, sigma_next = float(sigmas[i]), float(sigmas[i + 1])
    g = noise_level * math.sqrt(sigma / (1 - (float(sigmas[1]) if sigma == 1 else sigma)))
    dt = sigma_next - sigma
    mean = x * (1 + g**2 / (2 * sigma) * dt) + out * (1 + g**2 * (1 - sigma) / (2 * sigma)) * dt
    return mean, g * math.sqrt(-dt)


@pytest.mark.parametrize("kind,eta,noise_level", [("ddim", 1.0, None), ("ddim", 0.5, None), ("ddpm", None, None),
                                                  ("flow", 0.0, 0.7), ("flow", 0.0, 1.3)])
def test_every_transition_log_prob_is_the_gaussian_density_of_the_step(kind, eta, noise_level):
    scheduler, schedule, denoiser, traj = _recorded(kind, 10, eta, noise_level)
    assert len(traj.steps) >= 9  # every noisy step is recorded
    for k, i in enumerate(traj.steps):
        x, x_next = traj.x_in[:, k], traj.x_next[:, k]
        out = denoiser(x, schedule.model_timestep(i, x.shape[0], "cpu"))
        mean, std = _reference_step(kind, scheduler, schedule, i, x, out, eta, noise_level)
        torch.testing.assert_close(traj.means[:, k], mean, rtol=1e-10, atol=1e-12)
        assert schedule.noise_stds[i] == pytest.approx(std, rel=1e-12)
        density = scipy.stats.norm.logpdf(x_next.numpy(), loc=mean.numpy(), scale=std).sum(1)
        np.testing.assert_allclose(traj.log_probs[:, k].numpy() * MIX.dim, density, rtol=1e-11)
        # and x_next really was drawn from that Gaussian: its standardised noise is what the generator drew
        assert float(((x_next - mean) / std).abs().max()) < 6


@pytest.mark.parametrize("noise_level", [0.3, 0.7, 1.2])
def test_flow_sde_has_the_marginals_of_the_ode(noise_level):
    """x0 of the SDE sampler and of the ODE sampler match the data's exact mean and variance within
    Monte-Carlo error (4 standard errors), on the analytic mixture with its exact denoiser."""
    mixture = GaussianMixture.create([0.7, 0.3], [[-1.0], [1.5]], [0.5, 0.4])
    scheduler = toy_scheduler("flow")
    denoiser = MixtureDenoiser(mixture, scheduler)
    ode = SamplingSchedule.from_scheduler(scheduler, 200, eta=0.0)
    sde = ode.flow_sde(noise_level)
    assert ode.stochastic_steps == () and sde.stochastic_steps == tuple(range(200))
    n = 20_000
    exact_mean, exact_var = float(mixture.mean()), float(mixture.variance())
    # standard errors of the sample mean and variance of n draws of the mixture
    fourth = float((mixture.sample(400_000, torch.Generator().manual_seed(0)) - exact_mean).pow(4).mean())
    se_mean, se_var = math.sqrt(exact_var / n), math.sqrt((fourth - exact_var**2) / n)
    for seed, schedule in ((1, ode), (2, sde)):
        gen = torch.Generator().manual_seed(seed)
        x_T = schedule.initial_noise((n, 1), gen, "cpu", torch.float64)
        x0 = run_chain(schedule, _toy_predict(denoiser, schedule), x_T, gen)
        assert abs(float(x0.mean()) - exact_mean) < 4 * se_mean, (schedule is sde, float(x0.mean()), exact_mean)
        assert abs(float(x0.var()) - exact_var) < 4 * se_var, (schedule is sde, float(x0.var()), exact_var)


def test_reinforce_estimate_and_surrogate_gradient_on_a_toy_with_a_known_gradient():
    """d/dtheta E[w . x0] for a flow model whose velocity is the exact one plus theta (Gaussian data, so every step
    is affine and E[x0] follows the noise-free chain exactly). The score-function estimate matches it within
    Monte-Carlo error, and the clipped surrogate's gradient on-policy is that estimate over (K steps x D dims)."""
    data = GaussianMixture.create([1.0], [[0.5, -0.3]], [[0.8, 0.6]])
    scheduler = toy_scheduler("flow")
    exact = MixtureDenoiser(data, scheduler)
    ode = SamplingSchedule.from_scheduler(scheduler, 6, eta=0.0)
    schedule = ode.mixed(ode.flow_sde(0.8), range(5))  # the last step stays deterministic, as GRPO samples
    w = torch.tensor([1.0, -2.0], dtype=torch.float64)
    theta = torch.zeros(2, dtype=torch.float64, requires_grad=True)

    def model(x, t, cond=None):
        return exact(x, t) + theta

    # exact: the noise-free chain from E[x_T] = 0 carries E[x_i] (every step is affine in x and theta)
    mean_only = dataclasses.replace(schedule, noise_stds=(0.0,) * 6)
    mean_x0 = run_chain(mean_only, _toy_predict(model, mean_only), torch.zeros(1, 2, dtype=torch.float64), None)
    (exact_grad,) = torch.autograd.grad((mean_x0[0] @ w), theta)

    n, batches = 40_000, 20
    gens = seeded_generators(range(n))
    with torch.no_grad():
        x_T = schedule.initial_noise((n, 2), gens, "cpu", torch.float64)
        traj = sample_trajectory(schedule, _toy_predict(model, schedule), x_T, gens)
    reward = traj.x0 @ w
    advantage = reward - reward.mean()
    steps = traj.steps
    assert steps == (0, 1, 2, 3, 4)
    log_probs = []
    for k, i in enumerate(steps):
        x = traj.x_in[:, k]
        out = model(x, schedule.model_timestep(i, n, "cpu"))
        mean = transition_means(schedule, [i] * n, x, out)
        log_probs.append(gaussian_log_density(traj.x_next[:, k], mean, schedule.noise_stds[i]))
    log_p = torch.stack(log_probs, 1)  # [n, K], differentiable in theta
    estimates = []
    for part in torch.arange(n).chunk(batches):
        (g,) = torch.autograd.grad((advantage[part, None] * log_p[part]).sum(1).mean(), theta, retain_graph=True)
        estimates.append(g)
    estimates = torch.stack(estimates)
    estimate, se = estimates.mean(0), estimates.std(0) / math.sqrt(batches)
    assert float(exact_grad.abs().min()) > 5 * float(se.max())  # the test can tell a wrong gradient
    assert torch.all((estimate - exact_grad).abs() < 4 * se), (estimate, exact_grad, se)

    # the clipped surrogate at ratio 1 (same weights): its gradient is minus the estimate / (K * D)
    old = per_dimension(log_p.detach(), traj.x_next[:, 0])
    new = per_dimension(log_p, traj.x_next[:, 0])
    loss, ratio = clipped_surrogate(new - old, advantage[:, None].expand_as(new), clip_range=1e-4)
    assert torch.equal(ratio, torch.ones_like(ratio))
    (surrogate_grad,) = torch.autograd.grad(loss.mean(), theta)
    torch.testing.assert_close(-surrogate_grad * len(steps) * 2, estimate, rtol=1e-10, atol=1e-14)


def test_closed_form_kl_equals_a_monte_carlo_estimate():
    g = torch.Generator().manual_seed(3)
    mean_p, mean_q = torch.randn(4, 8, generator=g, dtype=torch.float64), torch.randn(4, 8, generator=g, dtype=torch.float64)
    std = torch.tensor([0.5, 1.0, 1.5, 2.0], dtype=torch.float64)
    closed = gaussian_kl(mean_p, mean_q, std)
    torch.testing.assert_close(closed, ((mean_p - mean_q) ** 2).sum(1) / (2 * std**2))
    draws = 50_000
    x = mean_p[:, None] + std[:, None, None] * torch.randn(4, draws, 8, generator=g, dtype=torch.float64)
    log_ratio = torch.stack([
        gaussian_log_density(x[r], mean_p[r].expand(draws, 8), float(std[r]))
        - gaussian_log_density(x[r], mean_q[r].expand(draws, 8), float(std[r]))
        for r in range(4)
    ])
    mc, se = log_ratio.mean(1), log_ratio.std(1) / math.sqrt(draws)
    assert torch.all((mc - closed).abs() < 4 * se), (mc, closed, se)
    assert torch.equal(gaussian_kl(mean_p, mean_p, std), torch.zeros(4, dtype=torch.float64))


def test_group_advantages_are_standardised_per_group_and_zero_for_equal_rewards():
    g = torch.Generator().manual_seed(0)
    rewards = torch.cat([torch.randn(6, generator=g) * 3 + 1, torch.full((4,), 0.1), torch.randn(5, generator=g), torch.tensor([2.0])])
    groups = torch.tensor([0] * 6 + [1] * 4 + [2] * 5 + [3])
    adv = group_advantages(rewards, groups)
    assert adv.dtype == torch.float64 and torch.isfinite(adv).all()
    for group, std in ((0, rewards[:6].double().std(unbiased=False)), (2, rewards[10:15].double().std(unbiased=False))):
        a = adv[groups == group]
        assert abs(float(a.mean())) < 1e-12
        assert float(a.std(unbiased=False)) == pytest.approx(float(std / (std + 1e-4)), rel=1e-12)
        assert float(a.std(unbiased=False)) == pytest.approx(1.0, abs=1e-3)
    assert torch.equal(adv[groups == 1], torch.zeros(4, dtype=torch.float64))  # all equal: exactly 0, no NaN
    assert float(adv[15]) == 0.0  # a group of one has no baseline
    # dropped samples: 0, and left out of their group's statistics
    valid = torch.ones(16, dtype=torch.bool)
    valid[0] = False
    rewards_nan = rewards.clone()
    rewards_nan[0] = float("nan")
    dropped = group_advantages(rewards_nan, groups, valid)
    assert float(dropped[0]) == 0.0 and abs(float(dropped[1:6].mean())) < 1e-12
    # global std: every group divided by the std of all rewards
    overall = group_advantages(rewards, groups, global_std=True)
    s = rewards.double().std(unbiased=False)
    torch.testing.assert_close(overall[:6], (rewards[:6].double() - rewards[:6].double().mean()) / (s + 1e-4))


def test_per_prompt_tracker_uses_the_batch_until_a_prompt_has_enough_history():
    tracker = PerPromptStatTracker(buffer_size=4, min_count=3)
    first = tracker.update(["a", "a", "b"], torch.tensor([1.0, 3.0, 5.0]))
    batch = np.array([1.0, 3.0, 5.0])
    np.testing.assert_allclose(first.numpy(), (batch - batch.mean()) / (batch.std() + 1e-6), rtol=1e-12)
    second = tracker.update(["a", "b", "a"], torch.tensor([2.0, 4.0, 7.0]))
    history_a = np.array([1.0, 3.0, 2.0, 7.0])  # 4 >= 3: a's own statistics
    batch = np.array([2.0, 4.0, 7.0])  # b has 2 < 3: the batch's
    expected = [(2.0 - history_a.mean()) / (history_a.std() + 1e-6), (4.0 - batch.mean()) / (batch.std() + 1e-6),
                (7.0 - history_a.mean()) / (history_a.std() + 1e-6)]
    np.testing.assert_allclose(second.numpy(), expected, rtol=1e-12)
    tracker.update(["a"], torch.tensor([9.0]))  # the buffer keeps the last 4: 3, 2, 7, 9
    assert list(tracker.history["a"]) == [3.0, 2.0, 7.0, 9.0]
    restored = PerPromptStatTracker(buffer_size=4, min_count=3)
    restored.load_state_dict(tracker.state_dict())
    probe = torch.tensor([5.0, 1.0])
    assert torch.equal(restored.update(["a", "b"], probe), tracker.update(["a", "b"], probe))
    with pytest.raises(ConfigError, match="tracker_min_count=5 is out of range"):
        PerPromptStatTracker(buffer_size=4, min_count=5)


def test_clipped_surrogate_value_and_gradient():
    log_ratio = torch.log(torch.tensor([0.5, 0.99995, 1.0, 1.00005, 2.0, 0.5, 2.0], dtype=torch.float64)).requires_grad_()
    adv = torch.tensor([1.0, 1.0, 1.0, 1.0, 1.0, -1.0, -1.0], dtype=torch.float64)
    loss, ratio = clipped_surrogate(log_ratio, adv, clip_range=1e-4)
    r = ratio.detach()
    expected = torch.maximum(-adv * r, -adv * r.clamp(1 - 1e-4, 1 + 1e-4))
    torch.testing.assert_close(loss, expected)
    (grad,) = torch.autograd.grad(loss.sum(), log_ratio)
    # gradient -A * rho where the unclipped term is the larger one, 0 where the clip holds the objective
    torch.testing.assert_close(grad, torch.tensor([-0.5, -0.99995, -1.0, -1.00005, 0.0, 0.0, 2.0], dtype=torch.float64))


def test_guard_ratio_is_the_centred_noise_projection():
    g = torch.Generator().manual_seed(5)
    mean_old = torch.randn(3, 2, 4, 4, generator=g, dtype=torch.float64)
    mean_new = mean_old + 0.01 * torch.randn(3, 2, 4, 4, generator=g, dtype=torch.float64)
    std = torch.tensor([0.02, 0.2, 1.0], dtype=torch.float64)
    z = torch.randn(3, 2, 4, 4, generator=g, dtype=torch.float64)
    x = mean_old + std.view(-1, 1, 1, 1) * z
    log_ratio = per_dimension(gaussian_log_density(x, mean_new, std) - gaussian_log_density(x, mean_old, std), x)
    normalised = guard_log_ratio(log_ratio, mean_new, mean_old, std)
    torch.testing.assert_close(normalised, (z * (mean_new - mean_old)).flatten(1).mean(1), rtol=1e-10, atol=1e-14)


def test_flow_sde_rows_and_mixed_schedules():
    ode = SamplingSchedule.from_scheduler(toy_scheduler("flow"), 5, eta=0.0)
    sde = ode.flow_sde(0.7)
    for i in range(5):
        sigma, nxt = ode.sigmas[i], ode.next_sigmas[i]
        g = 0.7 * math.sqrt(sigma / (1 - (ode.next_sigmas[0] if sigma == 1 else sigma)))
        dt = nxt - sigma
        assert (sde.coef_x0[i], sde.coef_xt[i]) == (pytest.approx(-dt), 1.0)
        assert sde.coef_eps[i] == pytest.approx(dt * (1 + g * g / (2 * sigma)))
        assert sde.noise_stds[i] == pytest.approx(g * math.sqrt(-dt))
    constant = ode.flow_sde(0.3, "constant")
    assert constant.noise_stds[2] == pytest.approx(0.3 * math.sqrt(ode.sigmas[2] - ode.next_sigmas[2]))
    mixed = ode.mixed(sde, [1, 2])
    assert mixed.stochastic_steps == (1, 2)
    assert mixed.coef_eps == (ode.coef_eps[0], sde.coef_eps[1], sde.coef_eps[2], ode.coef_eps[3], ode.coef_eps[4])
    with pytest.raises(ConfigError, match="noise_level=0.0 must be > 0"):
        ode.flow_sde(0.0)
    with pytest.raises(ConfigError, match="sde_noise='brownian' is not supported"):
        flow_sde_row(0.5, 0.4, 0.7, "brownian")
    ddim = SamplingSchedule.from_scheduler(toy_scheduler("ddim"), 5, eta=1.0)
    with pytest.raises(AlignError, match="flow_sde needs a flow-matching schedule"):
        ddim.flow_sde(0.7)
    with pytest.raises(AlignError, match="same timesteps and levels"):
        ode.mixed(SamplingSchedule.from_scheduler(toy_scheduler("flow"), 6, eta=0.0).flow_sde(0.7), [1])
    with pytest.raises(AlignError, match=r"steps \[7\] are outside 0..4"):
        ode.mixed(sde, [7])


def test_stochastic_step_windows():
    candidates = tuple(range(9))
    gen = torch.Generator().manual_seed(0)
    assert AllSteps().steps(candidates, 3, gen) == candidates
    subset = RandomSubset(3).steps(candidates, 0, torch.Generator().manual_seed(1))
    assert len(set(subset)) == 3 and list(subset) == sorted(subset)
    starts = {RandomWindow(2).steps(candidates, 0, torch.Generator().manual_seed(s))[0] for s in range(200)}
    assert starts == set(range(8))  # uniform over [0, 9 - 2]
    windows = {RandomWindow(2, 0, 5).steps(candidates, 0, torch.Generator().manual_seed(s)) for s in range(100)}
    assert windows == {(0, 1), (1, 2), (2, 3), (3, 4)}
    sliding = SlidingWindow(4, shift_every=2, stride=1)
    assert [sliding.steps(candidates, r, gen)[0] for r in range(0, 16, 2)] == [0, 1, 2, 3, 4, 5, 5, 5]
    rolling = SlidingWindow(4, shift_every=2, stride=2, roll_back=True)
    assert [rolling.steps(candidates, r, gen)[0] for r in range(0, 12, 2)] == [0, 2, 4, 0, 2, 4]
    with pytest.raises(ConfigError, match="sde_window_size=12 is larger than the 9 steps"):
        RandomWindow(12).steps(candidates, 0, gen)
    with pytest.raises(ConfigError, match="holds 2 steps, fewer than sde_window_size=3"):
        RandomWindow(3, 2, 4)
