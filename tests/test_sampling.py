"""The sampler steps equal diffusers' schedulers step for step, and the math is consistent."""

import math

import pytest
import torch
from diffusers import DDIMScheduler, DDPMScheduler, EulerDiscreteScheduler, FlowMatchEulerDiscreteScheduler

from align.core.errors import AlignError
from align.core.sampling import SamplingSchedule, guided_prediction, posterior_noise_std, split_prediction

SD_SCHEDULER = dict(
    beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", clip_sample=False,
    set_alpha_to_one=False, steps_offset=1,
)

VP_CASES = [
    ("ddim-eps-eta0", DDIMScheduler, dict(SD_SCHEDULER, prediction_type="epsilon"), 0.0),
    ("ddim-eps-eta1", DDIMScheduler, dict(SD_SCHEDULER, prediction_type="epsilon"), 1.0),
    ("ddim-v-eta0.5", DDIMScheduler, dict(SD_SCHEDULER, prediction_type="v_prediction"), 0.5),
    ("ddim-trailing", DDIMScheduler, dict(SD_SCHEDULER, timestep_spacing="trailing"), 0.3),
    ("ddim-clip", DDIMScheduler, dict(prediction_type="epsilon", clip_sample=True), 1.0),
    ("ddpm-eps", DDPMScheduler, dict(SD_SCHEDULER, prediction_type="epsilon"), None),
    ("ddpm-v", DDPMScheduler, dict(SD_SCHEDULER, prediction_type="v_prediction"), None),
    ("ddpm-clip", DDPMScheduler, dict(prediction_type="epsilon"), None),
    ("ddpm-large", DDPMScheduler, dict(SD_SCHEDULER, variance_type="fixed_large"), None),
]


def _fake_model(x, t):
    # any smooth function of (x, t) will do; the step is compared for the same model output
    return torch.tanh(x * 0.7 + t.view(-1, 1, 1, 1) / 1000.0)


@pytest.mark.floor
@pytest.mark.parametrize("name,cls,config,eta", VP_CASES, ids=[c[0] for c in VP_CASES])
def test_vp_steps_match_diffusers(name, cls, config, eta):
    ref = cls(**{k: v for k, v in config.items() if k in cls.__init__.__code__.co_varnames})
    ours = SamplingSchedule.from_scheduler(cls.from_config(ref.config), 10, eta=eta)
    ref.set_timesteps(10)
    assert torch.equal(ours.timesteps, ref.timesteps)
    gen = torch.Generator().manual_seed(0)
    x_ref = torch.randn(2, 4, 6, 5, generator=gen)
    x_ours = x_ref.clone()
    for i, t in enumerate(ref.timesteps):
        noise = torch.randn(x_ref.shape, generator=gen)
        out = _fake_model(x_ref, t.expand(2).float())
        kwargs = {"eta": eta, "variance_noise": noise} if cls is DDIMScheduler else {}
        if cls is DDPMScheduler:
            g = torch.Generator().manual_seed(100 + i)
            kwargs["generator"] = g
            noise = torch.randn(x_ref.shape, generator=torch.Generator().manual_seed(100 + i))
        ref_out = ref.step(out, t, x_ref, **kwargs)
        step = ours.step(i, x_ours, _fake_model(x_ours, t.expand(2).float()), noise=noise)
        torch.testing.assert_close(step.x0_hat, ref_out.pred_original_sample, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(step.prev_sample, ref_out.prev_sample, atol=1e-5, rtol=1e-5)
        x_ref, x_ours = ref_out.prev_sample, step.prev_sample


@pytest.mark.floor
@pytest.mark.parametrize("shift", [1.0, 3.0])
def test_flow_euler_matches_diffusers(shift):
    ref = FlowMatchEulerDiscreteScheduler(shift=shift)
    ours = SamplingSchedule.from_scheduler(FlowMatchEulerDiscreteScheduler.from_config(ref.config), 8)
    ref.set_timesteps(8)
    torch.testing.assert_close(ours.timesteps, ref.timesteps)
    x_ref = torch.randn(2, 4, 6, 6, generator=torch.Generator().manual_seed(1))
    x_ours = x_ref.clone()
    for i, t in enumerate(ref.timesteps):
        out = _fake_model(x_ref, t.expand(2))
        x_ref = ref.step(out, t, x_ref).prev_sample
        x_ours = ours.step(i, x_ours, _fake_model(x_ours, t.expand(2))).prev_sample
        torch.testing.assert_close(x_ours, x_ref, atol=1e-5, rtol=1e-5)
    assert not ours.is_stochastic


def test_flow_stochastic_step_preserves_marginals():
    """With x0 known exactly, the eta=1 flow step maps N(alpha_t x0, sigma_t^2) to N(alpha_s x0, sigma_s^2)."""
    sched = SamplingSchedule.from_scheduler(FlowMatchEulerDiscreteScheduler(shift=1.0), 5, eta=1.0)
    assert sched.is_stochastic
    x0 = torch.full((200_000, 1), 0.7)
    gen = torch.Generator().manual_seed(3)
    i = 2
    x_t = sched.add_noise(x0, torch.randn(x0.shape, generator=gen), i)
    # the exact velocity for a point mass at x0: v = eps - x0 with eps = (x_t - alpha x0) / sigma
    v = (x_t - sched.alphas[i] * x0) / sched.sigmas[i] - x0
    x_s = sched.step(i, x_t, v, generator=gen).prev_sample
    assert abs(x_s.mean().item() - sched.next_alphas[i] * 0.7) < 5e-3
    assert abs(x_s.std().item() - sched.next_sigmas[i]) < 5e-3


def test_split_prediction_roundtrip():
    x0 = torch.randn(3, 4)
    eps = torch.randn(3, 4)
    a, s = 0.6, 0.8
    x_t = a * x0 + s * eps
    for kind, out in [("epsilon", eps), ("v_prediction", a * eps - s * x0), ("sample", x0)]:
        x0_hat, eps_hat = split_prediction(out, x_t, a, s, kind)
        torch.testing.assert_close(x0_hat, x0)
        torch.testing.assert_close(eps_hat, eps)
    a, s = 0.3, 0.7  # flow path: alpha = 1 - sigma
    x_t = a * x0 + s * eps
    x0_hat, eps_hat = split_prediction(eps - x0, x_t, a, s, "flow")
    torch.testing.assert_close(x0_hat, x0)
    torch.testing.assert_close(eps_hat, eps)


def test_posterior_noise_std_is_ddim_sigma():
    a_t, a_prev = 0.5, 0.8
    ddim = math.sqrt((1 - a_prev) / (1 - a_t)) * math.sqrt(1 - a_t / a_prev)
    ours = posterior_noise_std(math.sqrt(a_t), math.sqrt(1 - a_t), math.sqrt(a_prev), math.sqrt(1 - a_prev), 1.0)
    assert ours == pytest.approx(ddim)


def test_unsupported_scheduler_is_named():
    with pytest.raises(AlignError, match="EulerDiscreteScheduler.*accepted: DDIMScheduler"):
        SamplingSchedule.from_scheduler(EulerDiscreteScheduler(), 10)


def test_bad_step_count_and_eta():
    with pytest.raises(AlignError, match="num_steps=0"):
        SamplingSchedule.from_scheduler(DDIMScheduler(), 0)
    with pytest.raises(AlignError, match="eta=-1"):
        SamplingSchedule.from_scheduler(DDIMScheduler(), 5, eta=-1.0)


def test_guided_prediction_is_one_batched_forward():
    calls = []

    def model(x, t, cond):
        calls.append(x.shape[0])
        return x * cond["h"].view(-1, 1)

    x = torch.ones(2, 3)
    cond, uncond = {"h": torch.tensor([2.0, 2.0])}, {"h": torch.tensor([1.0, 1.0])}
    out = guided_prediction(model, x, torch.zeros(2), cond, uncond, 3.0)
    torch.testing.assert_close(out, torch.full((2, 3), 1.0 + 3.0 * (2.0 - 1.0)))
    assert calls == [4]
    guided_prediction(model, x, torch.zeros(2), cond, uncond, 1.0)
    assert calls == [4, 2]
