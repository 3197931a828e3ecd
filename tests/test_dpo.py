"""Diffusion-DPO: the loss against its closed form, its small-beta gradient, shared noise within a pair,
regression targets, training levels (float64 where it matters)."""

import math
from types import SimpleNamespace

import pytest
import torch
from _threads import one_thread  # noqa: F401

from align.builtin.toy import GaussianMixture, MixtureDenoiser, toy_scheduler
from align.core.errors import AlignError, ConfigError
from align.core.sampling import split_prediction
from align.train.dpo import (
    DPO_BETA,
    denoising_errors,
    denoising_target,
    dpo_beta,
    dpo_loss,
    dpo_loss_from_errors,
    noised_pairs,
    sample_training_levels,
    sdxl_time_ids,
)
from align.train.methods.diffusion_dpo import DiffusionDPOConfig

F64 = torch.float64


def test_loss_equals_its_closed_form():
    mw = torch.tensor([0.30, 0.50, 0.20, 0.41], dtype=F64)
    ml = torch.tensor([0.40, 0.10, 0.20, 0.40], dtype=F64)
    rw = torch.tensor([0.35, 0.45, 0.25, 0.40], dtype=F64)
    rl = torch.tensor([0.38, 0.20, 0.15, 0.41], dtype=F64)
    beta = 50.0
    out = dpo_loss_from_errors(mw, ml, rw, rl, beta)
    for i in range(4):
        z = -beta / 2 * ((mw[i] - ml[i]) - (rw[i] - rl[i])).item()
        assert out.logits[i].item() == pytest.approx(z, rel=1e-13, abs=1e-15)
        assert out.loss[i].item() == pytest.approx(math.log1p(math.exp(-z)), rel=1e-13)
    # pairs 0 and 3 improve on the reference (logit > 0), 1 and 2 do not
    assert out.implicit_accuracy == 0.5
    # the reference carries no gradient even if its errors were computed with one
    ref_w, ref_l = rw.clone().requires_grad_(True), rl.clone().requires_grad_(True)
    model_w = mw.clone().requires_grad_(True)
    dpo_loss_from_errors(model_w, ml, ref_w, ref_l, beta).loss.sum().backward()
    assert ref_w.grad is None and ref_l.grad is None and model_w.grad is not None


def test_loss_from_predictions_uses_per_pair_mean_squared_errors():
    g = torch.Generator().manual_seed(0)
    target = torch.randn(6, 2, 3, 3, generator=g, dtype=F64)
    model = target + 0.5 * torch.randn(6, 2, 3, 3, generator=g, dtype=F64)
    ref = target + 0.5 * torch.randn(6, 2, 3, 3, generator=g, dtype=F64)
    out = dpo_loss(model, ref, target, beta=5000.0)
    for p in range(3):
        w, lo = p, p + 3  # [winners; losers]
        mse = [((x[i] - target[i]) ** 2).mean().item() for x, i in ((model, w), (model, lo), (ref, w), (ref, lo))]
        z = -2500.0 * ((mse[0] - mse[1]) - (mse[2] - mse[3]))
        assert out.logits[p].item() == pytest.approx(z, rel=1e-12)
        softplus = max(-z, 0.0) + math.log1p(math.exp(-abs(z)))  # -log sigmoid(z), stable
        assert out.loss[p].item() == pytest.approx(softplus, rel=1e-12)
    with pytest.raises(AlignError, match="even batch"):
        dpo_loss(model[:5], ref[:5], target[:5], beta=1.0)
    with pytest.raises(ConfigError, match="beta=0"):
        dpo_loss(model, ref, target, beta=0)


# -- a tiny linear epsilon-predictor: pred = x_t W (W [d, d]) -----------------------------------------


def _pairs(seed=1, p=5, d=4):
    g = torch.Generator().manual_seed(seed)
    x0_w, x0_l, noise = (torch.randn(p, d, generator=g, dtype=F64) for _ in range(3))
    t = torch.randint(0, 1000, (p,), generator=g)
    acp = toy_scheduler("ddpm").alphas_cumprod.double()[t]
    return x0_w, x0_l, noise, acp.sqrt(), (1 - acp).sqrt()


def _errors(weight, x_t, target):
    return denoising_errors(x_t @ weight, target).chunk(2)


def test_pair_shares_noise_and_level_so_identical_images_give_log_two():
    x0_w, _, noise, alpha, sigma = _pairs()
    x_t = noised_pairs(x0_w, x0_w.clone(), noise, alpha, sigma)
    assert torch.equal(x_t[:5], x_t[5:])
    g = torch.Generator().manual_seed(2)
    w_model, w_ref = torch.randn(4, 4, generator=g, dtype=F64), torch.randn(4, 4, generator=g, dtype=F64)
    target = torch.cat([noise, noise])
    out = dpo_loss(x_t @ w_model, x_t @ w_ref, target, beta=5000.0)
    assert torch.equal(out.logits, torch.zeros(5, dtype=F64))
    torch.testing.assert_close(out.loss, torch.full((5,), math.log(2.0), dtype=F64), rtol=1e-15, atol=0)
    # different images: the two halves differ by alpha (x0_w - x0_l) only (same noise, same level)
    x0_w, x0_l, noise, alpha, sigma = _pairs()
    x_t = noised_pairs(x0_w, x0_l, noise, alpha, sigma)
    torch.testing.assert_close(x_t[:5] - x_t[5:], alpha[:, None] * (x0_w - x0_l), rtol=1e-14, atol=1e-14)
    with pytest.raises(AlignError, match="same shape"):
        noised_pairs(x0_w, x0_l[:4], noise, alpha, sigma)


def _gradients(weight, w_ref, beta, x_t, target):
    """(grad of the mean DPO loss, grad of mean(e_model(w) - e_model(l)), the logits' x = model - ref diffs)."""
    weight = weight.clone().requires_grad_(True)
    mw, ml = _errors(weight, x_t, target)
    with torch.no_grad():
        rw, rl = _errors(w_ref, x_t, target)
    out = dpo_loss_from_errors(mw, ml, rw, rl, beta)
    (g_loss,) = torch.autograd.grad(out.loss.mean(), weight, retain_graph=True)
    (g_w,) = torch.autograd.grad(mw.mean(), weight, retain_graph=True)
    (g_l,) = torch.autograd.grad(ml.mean(), weight)
    x = ((mw - ml) - (rw - rl)).detach()
    return g_loss, g_w - g_l, x


def test_gradient_tends_to_beta_over_four_times_the_difference_of_denoising_loss_gradients():
    """dL/dW = sigmoid(beta x / 2) (beta / 2) dx/dW with dx/dW = d e_model(w)/dW - d e_model(l)/dW.
    Tested limit: beta -> 0 at fixed W; 4 / beta * dL/dW -> mean_pairs(dx/dW), with error at most
    tanh(beta max|x| / 4) * mean_pairs|dx/dW| (elementwise), i.e. linear in beta."""
    x0_w, x0_l, noise, alpha, sigma = _pairs(seed=3)
    x_t = noised_pairs(x0_w, x0_l, noise, alpha, sigma)
    target = torch.cat([noise, noise])
    g = torch.Generator().manual_seed(4)
    w_ref = torch.randn(4, 4, generator=g, dtype=F64) * 0.3
    weight = w_ref + 0.2 * torch.randn(4, 4, generator=g, dtype=F64)
    errors = []
    for beta in (1e-1, 1e-3, 1e-5):
        g_loss, g_diff, x = _gradients(weight, w_ref, beta, x_t, target)
        assert float(x.abs().max()) > 0.05  # the model differs from the reference
        err = (4 / beta * g_loss - g_diff).abs()
        bound = math.tanh(beta * float(x.abs().max()) / 4) * g_diff.abs().max()
        assert float(err.max()) <= float(bound) * (1 + 1e-9)
        errors.append(float(err.max()))
    assert errors[1] / errors[0] == pytest.approx(1e-2, rel=0.05)
    assert errors[2] / errors[1] == pytest.approx(1e-2, rel=0.05)


def test_gradient_is_exactly_beta_over_four_where_the_model_is_the_reference():
    x0_w, x0_l, noise, alpha, sigma = _pairs(seed=5)
    x_t = noised_pairs(x0_w, x0_l, noise, alpha, sigma)
    target = torch.cat([noise, noise])
    w_ref = torch.randn(4, 4, generator=torch.Generator().manual_seed(6), dtype=F64)
    for beta in (5000.0, 2.0):
        g_loss, g_diff, x = _gradients(w_ref, w_ref, beta, x_t, target)
        assert torch.equal(x, torch.zeros_like(x))
        torch.testing.assert_close(4 / beta * g_loss, g_diff, rtol=1e-12, atol=1e-15)


# -- regression targets and training levels ------------------------------------------------------------


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction", "flow", "sample"])
def test_target_is_what_split_prediction_inverts(prediction_type):
    """split_prediction(target) gives back (x0, noise): the target is the output of a perfect model."""
    g = torch.Generator().manual_seed(7)
    x0, noise = torch.randn(6, 3, 4, 4, generator=g, dtype=F64), torch.randn(6, 3, 4, 4, generator=g, dtype=F64)
    if prediction_type == "flow":
        sigma = torch.rand(6, generator=g, dtype=F64) * 0.98 + 0.01
        alpha = 1 - sigma
    else:
        acp = torch.rand(6, generator=g, dtype=F64) * 0.98 + 0.01
        alpha, sigma = acp.sqrt(), (1 - acp).sqrt()
    a, s = alpha.view(-1, 1, 1, 1), sigma.view(-1, 1, 1, 1)
    x_t = a * x0 + s * noise
    target = denoising_target(x0, noise, alpha, sigma, prediction_type)
    x0_hat, eps_hat = split_prediction(target, x_t, a, s, prediction_type)
    torch.testing.assert_close(x0_hat, x0, rtol=0, atol=1e-12)
    torch.testing.assert_close(eps_hat, noise, rtol=0, atol=1e-12)
    with pytest.raises(AlignError, match="prediction_type='x0'"):
        denoising_target(x0, noise, alpha, sigma, "x0")


def test_vp_training_levels_are_uniform_timesteps_with_the_schedulers_alphas():
    sched = toy_scheduler("ddpm")
    levels = sample_training_levels(sched, 20000, torch.Generator().manual_seed(8))
    t = levels.timesteps
    assert t.dtype == torch.int64 and int(t.min()) >= 0 and int(t.max()) <= 999
    counts = torch.bincount(t // 100, minlength=10).double()
    assert float((counts / 2000 - 1).abs().max()) < 0.06
    alpha, sigma = MixtureDenoiser(GaussianMixture.create([1.0], [[0.0]], [1.0]), sched).levels(t)
    assert torch.equal(levels.alphas, alpha) and torch.equal(levels.sigmas, sigma)


@pytest.mark.parametrize("shift", [1.0, 3.0])
def test_flow_training_levels_come_from_the_unshifted_state_of_the_scheduler(shift):
    from diffusers import FlowMatchEulerDiscreteScheduler

    sched = FlowMatchEulerDiscreteScheduler(shift=shift)
    fresh_sigmas = sched.sigmas.double().clone()
    sched.set_timesteps(10)  # a sampling run changed its state; training levels must not follow it
    for weighting in ("uniform", "logit_normal"):
        levels = sample_training_levels(sched, 4000, torch.Generator().manual_seed(9), weighting)
        assert bool(torch.isin(levels.sigmas, fresh_sigmas).all())
        torch.testing.assert_close(levels.alphas, 1 - levels.sigmas, rtol=0, atol=0)
        torch.testing.assert_close(levels.timesteps.double(), levels.sigmas * 1000, rtol=1e-6, atol=1e-3)
    if shift == 1.0:
        # logit-normal(0, 1) indexes the middle of the schedule most: median sigma ~ 1/2
        assert float(levels.sigmas.median()) == pytest.approx(0.5, abs=0.03)
        alpha, sigma = MixtureDenoiser(GaussianMixture.create([1.0], [[0.0]], [1.0]), toy_scheduler("flow")).levels(
            levels.timesteps
        )
        torch.testing.assert_close(sigma, levels.sigmas, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("weighting", ["uniform", "logit_normal"])
def test_noisiest_fraction_keeps_the_noisiest_levels_and_one_keeps_the_original_draws(weighting):
    """VP: timesteps rise with the noise, so 0.3 keeps t in [700, 999] (uniform: every one of them about equally);
    flow: the training sigmas fall from 1, so 0.25 keeps the first 250. 1.0 draws exactly what the original does."""
    vp, g = toy_scheduler("ddpm"), torch.Generator()
    everything = sample_training_levels(vp, 3000, g.manual_seed(3), weighting)
    if weighting == "uniform":
        assert torch.equal(everything.timesteps, torch.randint(0, 1000, (3000,), generator=g.manual_seed(3)))
    else:
        u = torch.sigmoid(torch.randn(3000, generator=g.manual_seed(3), dtype=F64))
        assert torch.equal(everything.timesteps, (u * 1000).long().clamp_max(999))
    top = sample_training_levels(vp, 30000, g.manual_seed(4), weighting, noisiest=0.3)
    assert int(top.timesteps.min()) >= 700 and int(top.timesteps.max()) <= 999
    if weighting == "uniform":
        assert int(top.timesteps.min()) == 700 and int(top.timesteps.max()) == 999
        counts = torch.bincount(top.timesteps - 700, minlength=300).double()
        assert float((counts / 100 - 1).abs().max()) < 0.5  # 100 expected per timestep, Poisson-like spread
    torch.testing.assert_close(top.alphas, vp.alphas_cumprod.double()[top.timesteps].sqrt(), rtol=0, atol=0)
    from diffusers import FlowMatchEulerDiscreteScheduler

    flow = FlowMatchEulerDiscreteScheduler()
    kept = flow.sigmas.double()[:250]
    levels = sample_training_levels(flow, 4000, g.manual_seed(5), weighting, noisiest=0.25)
    assert bool(torch.isin(levels.sigmas, kept).all()) and float(levels.sigmas.min()) >= float(kept.min())
    assert float(kept.min()) == pytest.approx(0.751, abs=1e-3)
    with pytest.raises(ConfigError, match="noisiest=0 is out of range"):
        sample_training_levels(vp, 2, noisiest=0)


def test_training_levels_reject_unknown_schedulers_and_weightings():
    class KarrasOnly:  # neither alphas_cumprod nor flow sigmas
        config = SimpleNamespace(num_train_timesteps=1000)

    with pytest.raises(AlignError, match="KarrasOnly is not supported"):
        sample_training_levels(KarrasOnly(), 2)
    with pytest.raises(ConfigError, match="weighting='cosine'"):
        sample_training_levels(toy_scheduler("ddpm"), 2, weighting="cosine")


def test_sdxl_time_ids_follow_diffusers_order():
    ids = sdxl_time_ids(torch.tensor([[600, 800], [512, 512]]), torch.tensor([[0, 144], [0, 0]]), (512, 512))
    assert ids.tolist() == [[600, 800, 0, 144, 512, 512], [512, 512, 0, 0, 512, 512]]
    with pytest.raises(AlignError, match=r"\[n, 2\]"):
        sdxl_time_ids(torch.zeros(2, 3), torch.zeros(2, 3), (8, 8))


# -- beta per family and the config ---------------------------------------------------------------------


def test_beta_per_family():
    assert DPO_BETA == {"sd": 5000.0, "sdxl": 5000.0, "sd3": 100.0, "flux": 2000.0}
    assert dpo_beta("sdxl") == 5000.0
    with pytest.raises(ConfigError, match="family='sd35'"):
        dpo_beta("sd35")
    cfg = DiffusionDPOConfig()
    assert [cfg.beta_for(f) for f in ("sd", "sd3")] == [5000.0, 100.0]
    assert DiffusionDPOConfig(beta=2500.0).beta_for("sd3") == 2500.0
    assert [cfg.timestep_weighting_for(f) for f in ("sd", "sdxl", "sd3", "flux")] == [
        "uniform", "uniform", "logit_normal", "logit_normal",
    ]
    assert DiffusionDPOConfig(timestep_weighting="uniform").timestep_weighting_for("flux") == "uniform"


def test_config_defaults_and_columns():
    cfg = DiffusionDPOConfig()
    assert (cfg.empty_prompt_fraction, cfg.hflip, cfg.random_crop, cfg.on_bad_row) == (0.2, True, False, "error")
    assert (cfg.learning_rate, cfg.weight_decay, cfg.kl_weight) == (1e-5, 1e-2, 0.0)
    assert cfg.online and not DiffusionDPOConfig(data="prefs.jsonl").online
    assert cfg.columns.required == ("jpg_0", "jpg_1", "label_0", "caption")


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"beta": 0.0}, r"beta=0.0 is out of range"),
        ({"kl_weight": 0.1}, "kl_weight=0.1 does not apply"),
        ({"timestep_weighting": "cosine"}, "timestep_weighting='cosine' is not supported"),
        ({"empty_prompt_fraction": 1.5}, "empty_prompt_fraction=1.5 is out of range"),
        ({"on_bad_row": "ignore"}, "on_bad_row='ignore' is not supported"),
        ({"label_column": ""}, "label_column='' must be a non-empty string"),
        ({"image_1_column": "jpg_0"}, "the four data columns must differ"),
        ({"resolution": 4}, "resolution=4 is out of range"),
        ({"latent_cache": "/tmp/cache"}, "latent_cache='/tmp/cache' needs an offline data set"),
        ({"group_size": 1}, "group_size=1 is out of range"),
        ({"pairing": "random"}, "pairing='random' is not supported"),
        ({"min_reward_margin": -1.0}, "min_reward_margin=-1.0 is out of range"),
        ({"noisiest_fraction": 0.0}, "noisiest_fraction=0.0 is out of range"),
    ],
)
def test_config_rejects_bad_values_naming_them(kwargs, match):
    with pytest.raises(ConfigError, match=match):
        DiffusionDPOConfig(**kwargs)
