"""DiffusionNFT: the loss on given tensors, its fixed point on the analytic Gaussian mixture, and
its independence of the model's parameterisation (all in float64)."""

import math

import pytest
import torch
from _threads import one_thread  # noqa: F401

from align.builtin.toy import GaussianMixture, LinearReward, MixtureDenoiser, QuadraticReward, toy_scheduler
from align.core.errors import ConfigError
from align.train.methods.diffusion_nft import DiffusionNFTConfig
from align.train.nft import (
    ADAPTIVE_WEIGHT_FLOOR,
    implicit_predictions,
    nft_loss,
    old_policy_decay,
    optimality_probability,
    soft_update_,
)

F64 = torch.float64


# -- rewards to optimality probabilities, implicit policies ---------------------------------------


def test_optimality_probability_maps_clipped_advantages_linearly_onto_unit_interval():
    a = torch.tensor([-12.0, -5.0, -2.5, 0.0, 1.0, 5.0, 7.0], dtype=F64)
    r = optimality_probability(a, 5.0)
    assert r.tolist() == [0.0, 0.0, 0.25, 0.5, 0.6, 1.0, 1.0]
    with pytest.raises(ConfigError, match="advantage_clip=0"):
        optimality_probability(a, 0.0)


def test_implicit_predictions_are_the_papers_combinations():
    g = torch.Generator().manual_seed(0)
    theta, old = torch.randn(3, 5, generator=g, dtype=F64), torch.randn(3, 5, generator=g, dtype=F64)
    beta = 0.3
    pos, neg = implicit_predictions(theta, old, beta)
    torch.testing.assert_close(pos, beta * theta + (1 - beta) * old, rtol=0, atol=1e-15)
    torch.testing.assert_close(neg, (1 + beta) * old - beta * theta, rtol=0, atol=1e-15)
    torch.testing.assert_close((pos + neg) / 2, old, rtol=0, atol=1e-15)
    pos1, _ = implicit_predictions(theta, old, 1.0)
    assert torch.equal(pos1, old + (theta - old))


# -- the loss on given tensors against the official formula ---------------------------------------


def _official_flow_loss(v_theta, v_old, v_ref, x_t, x0, t, r, beta, clip, kl):
    """DiffusionNFT's SD3 loss written from its description (velocity predictions, x_t = (1-t) x0 + t eps)."""
    t = t.view(-1, 1, 1, 1)
    v_pos = beta * v_theta + (1 - beta) * v_old
    v_neg = (1 + beta) * v_old - beta * v_theta

    def term(v):
        x0_hat = x_t - t * v
        w = (x0_hat - x0).abs().mean(dim=(1, 2, 3), keepdim=True).clamp_min(1e-5)
        return ((x0_hat - x0) ** 2 / w).mean(dim=(1, 2, 3))

    policy = (r * term(v_pos) + (1 - r) * term(v_neg)) / beta
    return clip * policy.mean() + kl * ((v_theta - v_ref) ** 2).mean(dim=(1, 2, 3)).mean()


def _flow_batch(seed=0, b=6):
    g = torch.Generator().manual_seed(seed)
    x0 = torch.randn(b, 4, 8, 8, generator=g, dtype=F64)
    eps = torch.randn(b, 4, 8, 8, generator=g, dtype=F64)
    t = torch.rand(b, generator=g, dtype=F64) * 0.9 + 0.05
    x_t = (1 - t.view(-1, 1, 1, 1)) * x0 + t.view(-1, 1, 1, 1) * eps
    v_old = eps - x0 + 0.3 * torch.randn(b, 4, 8, 8, generator=g, dtype=F64)
    v_theta = v_old + 0.2 * torch.randn(b, 4, 8, 8, generator=g, dtype=F64)
    v_ref = v_old + 0.1 * torch.randn(b, 4, 8, 8, generator=g, dtype=F64)
    r = torch.rand(b, generator=g, dtype=F64)
    return v_theta, v_old, v_ref, x_t, x0, t, r


@pytest.mark.parametrize("beta", [1.0, 0.1])
def test_flow_loss_equals_the_official_formula(beta):
    v_theta, v_old, v_ref, x_t, x0, t, r = _flow_batch()
    got = nft_loss(
        v_theta, v_old, x_t, x0, 1 - t, t, "flow", r, beta=beta, policy_scale=5.0, reference_output=v_ref, kl_weight=1e-4
    )
    want = _official_flow_loss(v_theta, v_old, v_ref, x_t, x0, t, r, beta, 5.0, 1e-4)
    torch.testing.assert_close(got.total, want, rtol=1e-13, atol=0)
    torch.testing.assert_close(got.regulariser, ((v_theta - v_ref) ** 2).mean(dim=(1, 2, 3)), rtol=1e-13, atol=0)


def test_adaptive_weights_are_detached_gradient_in_closed_form():
    """d/dv_theta of c * mean((r L+ + (1 - r) L-) / beta): the divisors act as constants."""
    beta, clip = 0.5, 5.0
    v_theta, v_old, _, x_t, x0, t, r = _flow_batch(seed=1)
    v_theta.requires_grad_(True)
    loss = nft_loss(v_theta, v_old, x_t, x0, 1 - t, t, "flow", r, beta=beta, policy_scale=clip)
    (grad,) = torch.autograd.grad(loss.total, v_theta)
    b, d = x0.shape[0], x0[0].numel()
    tt = t.view(-1, 1, 1, 1)
    with torch.no_grad():
        pos, neg = implicit_predictions(v_theta, v_old, beta)
        e_pos, e_neg = x_t - tt * pos - x0, x_t - tt * neg - x0
        w_pos = e_pos.abs().mean(dim=(1, 2, 3), keepdim=True).clamp_min(ADAPTIVE_WEIGHT_FLOOR)
        w_neg = e_neg.abs().mean(dim=(1, 2, 3), keepdim=True).clamp_min(ADAPTIVE_WEIGHT_FLOOR)
        rr = r.view(-1, 1, 1, 1)
        # dx0+/dv_theta = -t beta, dx0-/dv_theta = +t beta
        want = clip / (b * beta) * (rr * 2 * e_pos / (d * w_pos) * (-tt * beta) + (1 - rr) * 2 * e_neg / (d * w_neg) * (tt * beta))
    torch.testing.assert_close(grad, want, rtol=1e-12, atol=1e-15)


def test_half_precision_outputs_are_upcast_for_the_loss():
    v_theta, v_old, v_ref, x_t, x0, t, r = (x.float() for x in _flow_batch(seed=2))
    got = nft_loss(v_theta.half(), v_old.half(), x_t, x0, 1 - t, t, "flow", r, beta=1.0, policy_scale=5.0)
    assert got.total.dtype == torch.float32 and got.policy.dtype == torch.float32


# -- the fixed point on the analytic Gaussian mixture ----------------------------------------------

MIXTURE = GaussianMixture.create([0.4, 0.6], [[-1.0], [2.0]], [0.6, 0.8])
GRID = torch.linspace(-14.0, 14.0, 56001, dtype=F64)


def _normal_logpdf(x, mean, var):
    return -0.5 * ((x - mean) ** 2 / var + torch.log(2 * math.pi * var))


def _marginal_logpdf(mixture, x, alpha, sigma):
    """log density of x_t = alpha x0 + sigma eps for a 1-D mixture."""
    var = alpha**2 * mixture.stds[:, 0] ** 2 + sigma**2
    return torch.logsumexp(torch.log(mixture.weights) + _normal_logpdf(x, alpha * mixture.means[:, 0], var), 0)


def _posterior_weights(x_t, alpha, sigma):
    """Quadrature weights of p_old(x0 | x_t) on GRID (sum to 1)."""
    log_prior = torch.logsumexp(
        torch.log(MIXTURE.weights)[:, None] + _normal_logpdf(GRID[None], MIXTURE.means, MIXTURE.stds**2), 0
    )
    log_q = log_prior + _normal_logpdf(x_t, alpha * GRID, torch.tensor(sigma**2, dtype=F64))
    return torch.softmax(log_q, 0)


def _expected_loss_and_grad(v, v_old, x_t, t, r, q, beta, adaptive):
    """E_{x0 | x_t}[policy loss] on GRID as a function of the one velocity v the model predicts at x_t."""
    n = GRID.shape[0]
    v = torch.tensor(float(v), dtype=F64, requires_grad=True)
    loss = nft_loss(
        v.expand(n, 1), torch.full((n, 1), float(v_old), dtype=F64), torch.full((n, 1), float(x_t), dtype=F64),
        GRID[:, None], 1 - t, t, "flow", r, beta=beta, policy_scale=1.0, adaptive_weighting=adaptive,
    )
    expected = (q * loss.policy).sum()
    (grad,) = torch.autograd.grad(expected, v)
    return float(expected.detach()), float(grad)


def _flow_denoiser(mixture):
    return MixtureDenoiser(mixture, toy_scheduler("flow"))


@pytest.mark.parametrize("t", [0.25, 0.55, 0.85])
@pytest.mark.parametrize("x_t", [-1.2, 0.4, 1.7])
@pytest.mark.parametrize("beta", [1.0, 0.1])
def test_unweighted_loss_is_minimised_at_the_tilted_fixed_point(t, x_t, beta):
    """r(x) = exp(lambda R(x)) with R(x) = -|x - c|^2 / 2 <= 0: the positive distribution
    r pi_old / Z is QuadraticReward's closed-form tilt, so the optimum of the module docstring,
    v* = v_old + (2 / beta) a(x_t) (v_pos - v_old), a(x_t) = Z p_pos,t(x_t) / p_old,t(x_t), is known
    exactly; the expected loss (quadrature over x0 | x_t) must be stationary there."""
    lam, center = 0.7, 1.0
    reward = QuadraticReward([center])
    tilted = reward.tilt(MIXTURE, lam)
    alpha, sigma = 1 - t, t
    timestep = torch.tensor([t * 1000.0], dtype=F64)
    xt = torch.tensor([[x_t]], dtype=F64)
    v_old = float(_flow_denoiser(MIXTURE)(xt, timestep)[0, 0])
    v_pos = float(_flow_denoiser(tilted)(xt, timestep)[0, 0])
    # Z = E_old[exp(lambda R)], per component in closed form (the tilt's unnormalised weights)
    var = MIXTURE.stds[:, 0] ** 2
    new_var = 1 / (1 / var + lam)
    z = (MIXTURE.weights * torch.sqrt(new_var / var) * torch.exp(-0.5 * lam * new_var / var * (MIXTURE.means[:, 0] - center) ** 2)).sum()
    x = torch.tensor(x_t, dtype=F64)
    a = float(z * torch.exp(_marginal_logpdf(tilted, x, alpha, sigma) - _marginal_logpdf(MIXTURE, x, alpha, sigma)))
    assert 0.05 < a < 0.95  # a genuine mix of positive and negative weight
    v_star = v_old + 2 / beta * a * (v_pos - v_old)

    q = _posterior_weights(x_t, alpha, sigma)
    r = torch.exp(lam * reward(GRID[:, None]))
    assert float(r.max()) <= 1.0
    _, g_star = _expected_loss_and_grad(v_star, v_old, x_t, t, r, q, beta, adaptive=False)
    _, g_old = _expected_loss_and_grad(v_old, v_old, x_t, t, r, q, beta, adaptive=False)
    _, g_far = _expected_loss_and_grad(v_old + 1.0, v_old, x_t, t, r, q, beta, adaptive=False)
    curvature = g_far - g_old  # the loss is quadratic in v: exact
    assert curvature == pytest.approx(2 * beta * t**2, rel=1e-9)  # beta^2 (r + 1 - r) t^2 * 2 / beta
    assert abs(g_star) <= 1e-9 * abs(g_old)
    assert v_old - g_old / curvature == pytest.approx(v_star, rel=1e-9, abs=1e-10)
    # the implicit positive policy at the optimum: v_old + 2 a (v_pos - v_old); v_pos itself where a = 1/2
    v_plus = v_old + beta * (v_star - v_old)
    assert v_plus == pytest.approx(v_old + 2 * a * (v_pos - v_old), rel=1e-12)


def test_nft_rewards_move_the_optimum_toward_higher_reward_with_and_without_adaptive_weights():
    """With NFT's own r (population-normalised, clipped advantages of a linear reward on x), the
    optimum moves x0_hat = x_t - t v toward higher reward; unweighted it is the closed form with
    a and E[r x0 | x_t] from the same quadrature; with adaptive weights the gradient at v_old
    already points that way."""
    reward = LinearReward([1.0])
    mean, std = float(MIXTURE.mean()[0]), float(MIXTURE.variance()[0].sqrt())
    r = optimality_probability((reward(GRID[:, None]) - mean) / std, 5.0)
    beta = 1.0
    for t in (0.3, 0.7):
        for x_t in (-0.8, 0.9, 2.2):
            q = _posterior_weights(x_t, 1 - t, t)
            x0_old = float((q * GRID).sum())  # the exact old denoiser
            v_old = (x_t - x0_old) / t
            a, r_x0 = float((q * r).sum()), float((q * r * GRID).sum())
            x0_star = x0_old + 2 / beta * (r_x0 - a * x0_old)
            assert x0_star > x0_old
            _, g_old = _expected_loss_and_grad(v_old, v_old, x_t, t, r, q, beta, adaptive=False)
            _, g_far = _expected_loss_and_grad(v_old + 1.0, v_old, x_t, t, r, q, beta, adaptive=False)
            v_min = v_old - g_old / (g_far - g_old)
            assert x_t - t * v_min == pytest.approx(x0_star, rel=1e-9, abs=1e-10)
            _, g_adaptive = _expected_loss_and_grad(v_old, v_old, x_t, t, r, q, beta, adaptive=True)
            assert g_adaptive > 0  # descent lowers v, raising x0_hat = x_t - t v


# -- the same construction in every parameterisation -----------------------------------------------

MIX2 = GaussianMixture.create([0.5, 0.5], [[-1.0, 0.5], [1.5, -0.5]], [[0.5, 0.7], [0.8, 0.4]])
MIX2_THETA = GaussianMixture.create([0.3, 0.7], [[-0.8, 0.7], [1.7, -0.2]], [[0.6, 0.6], [0.7, 0.5]])
MIX2_REF = GaussianMixture.create([0.6, 0.4], [[-1.1, 0.4], [1.4, -0.6]], [[0.5, 0.8], [0.9, 0.4]])


@pytest.mark.parametrize("adaptive", [True, False])
def test_parameterisations_give_the_same_losses(adaptive):
    """theta, old and reference are exact denoisers of three mixtures.  Their epsilon, VP-velocity and
    sample outputs on a VP path, and their flow velocities at the equivalent flow-path point
    (x_t / (alpha + sigma) at t = sigma / (alpha + sigma)), give identical NFT losses."""
    g = torch.Generator().manual_seed(3)
    b = 12
    x0 = MIX2.sample(b, generator=g)
    eps = torch.randn(b, 2, generator=g, dtype=F64)
    timestep = torch.randint(20, 980, (b,), generator=g)
    r = torch.rand(b, generator=g, dtype=F64)
    results = {}
    for ptype in ("epsilon", "v_prediction", "sample"):
        sched = toy_scheduler("ddim", ptype)
        theta, old, ref = (MixtureDenoiser(m, sched) for m in (MIX2_THETA, MIX2, MIX2_REF))
        alpha, sigma = old.levels(timestep)
        x_t = alpha[:, None] * x0 + sigma[:, None] * eps
        results[ptype] = nft_loss(
            theta(x_t, timestep), old(x_t, timestep), x_t, x0, alpha, sigma, ptype, r, beta=0.7, policy_scale=5.0,
            reference_output=ref(x_t, timestep), kl_weight=1e-4, adaptive_weighting=adaptive,
        )
    flow = toy_scheduler("flow")
    theta, old, ref = (MixtureDenoiser(m, flow) for m in (MIX2_THETA, MIX2, MIX2_REF))
    alpha, sigma = MixtureDenoiser(MIX2, toy_scheduler("ddim")).levels(timestep)
    scale = alpha + sigma
    t_flow = sigma / scale
    x_flow = (alpha[:, None] * x0 + sigma[:, None] * eps) / scale[:, None]
    tf = t_flow * 1000.0
    results["flow"] = nft_loss(
        theta(x_flow, tf), old(x_flow, tf), x_flow, x0, 1 - t_flow, t_flow, "flow", r, beta=0.7, policy_scale=5.0,
        reference_output=ref(x_flow, tf), kl_weight=1e-4, adaptive_weighting=adaptive,
    )
    base = results["epsilon"]
    assert float(base.regulariser.min()) > 0 and float((base.positive - base.negative).abs().min()) > 0
    for ptype, got in results.items():
        for name in ("positive", "negative", "policy", "regulariser"):
            torch.testing.assert_close(getattr(got, name), getattr(base, name), rtol=1e-9, atol=1e-12, msg=f"{ptype}.{name}")
        torch.testing.assert_close(got.total, base.total, rtol=1e-9, atol=0)


# -- the old policy's soft update -------------------------------------------------------------------


def test_old_policy_decay_follows_the_official_schedules():
    # default (decay_type 1): min(0.001 step, 0.5)
    assert [old_policy_decay(s, 0.001, 0.5) for s in (0, 1, 100, 499, 500, 10_000)] == pytest.approx(
        [0.0, 0.001, 0.1, 0.499, 0.5, 0.5], abs=1e-15
    )
    # OCR (decay_type 2): 0 until step 75, then min(0.0075 (step - 75), 0.999)
    assert [old_policy_decay(s, 0.0075, 0.999, delay=75) for s in (0, 74, 75, 175, 208, 500)] == pytest.approx(
        [0.0, 0.0, 0.0, 0.75, 0.9975, 0.999], abs=1e-15
    )


def test_soft_update_moves_old_toward_current():
    g = torch.Generator().manual_seed(4)
    current = [torch.randn(3, 4, generator=g, dtype=F64), torch.randn(5, generator=g, dtype=F64)]
    start = [torch.randn(3, 4, generator=g, dtype=F64), torch.randn(5, generator=g, dtype=F64)]
    old = [s.clone() for s in start]
    soft_update_(old, current, 0.25)
    for o, s, c in zip(old, start, current):
        torch.testing.assert_close(o, 0.25 * s + 0.75 * c, rtol=1e-15, atol=1e-15)
    soft_update_(old, current, 1.0)
    for o, s, c in zip(old, start, current):
        torch.testing.assert_close(o, 0.25 * s + 0.75 * c, rtol=1e-15, atol=1e-15)
    soft_update_(old, current, 0.0)
    assert all(torch.equal(o, c) for o, c in zip(old, current))
    with pytest.raises(ConfigError, match="decay=1.5"):
        soft_update_(old, current, 1.5)


# -- config -------------------------------------------------------------------------------------------


def test_config_defaults_are_the_official_ones():
    cfg = DiffusionNFTConfig()
    assert (cfg.num_steps, cfg.eval_num_steps, cfg.guidance_scale, cfg.eta) == (10, 40, 1.0, 0.0)
    assert (cfg.beta, cfg.advantage_clip, cfg.kl_weight, cfg.adaptive_weighting) == (1.0, 5.0, 1e-4, True)
    assert (cfg.group_size, cfg.rollout_prompts, cfg.global_std, cfg.timestep_fraction) == (24, 48, True, 0.99)
    assert (cfg.learning_rate, cfg.weight_decay, cfg.max_grad_norm) == (3e-4, 1e-4, 1.0)
    assert [cfg.old_decay(s) for s in (0, 100, 1000)] == pytest.approx([0.0, 0.1, 0.5])
    assert cfg.trained_steps == 9


@pytest.mark.parametrize(
    "field, value, match",
    [
        ("beta", 0.0, r"beta=0.0 is out of range; accepted: \(0.0, inf\)"),
        ("advantage_clip", -1.0, "advantage_clip=-1.0 is out of range"),
        ("group_size", 1, "group_size=1"),
        ("timestep_fraction", 0.0, "timestep_fraction=0.0 is out of range"),
        ("old_decay_max", 1.0, r"old_decay_max=1.0 is out of range; accepted: \[0.0, 1.0\)"),
        ("old_decay_rate", -0.1, "old_decay_rate=-0.1 is out of range"),
        ("old_decay_delay", -1, "old_decay_delay=-1 is out of range"),
        ("optimizer_steps_per_rollout", 0, "optimizer_steps_per_rollout=0 is out of range"),
        ("eval_num_steps", 0, "eval_num_steps=0 is out of range"),
    ],
)
def test_config_rejects_bad_values_naming_them(field, value, match):
    with pytest.raises(ConfigError, match=match):
        DiffusionNFTConfig(**{field: value})
