"""Gradients of the differentiable sampling chain: where they go and that they are right."""

import pytest
import torch

from align.builtin.testing import tiny_pipeline
from align.core.lora import LoRAConfig, add_lora, trainable_parameters
from align.core.models import DiffusionModel
from align.train.backprop import sample_with_grad
from align.train.truncation import (
    FullChain,
    LastK,
    LowVarianceLastStep,
    RandomCutoff,
    RandomLateStep,
    TruncationPlan,
)
from rewards import build_reward

STEPS = 4
PROMPTS = ["a red circle", "a blue square"]


def _model(family: str, seed: int = 0, dtype=torch.float32) -> tuple[DiffusionModel, list]:
    model = DiffusionModel(tiny_pipeline(family, seed=seed))
    model.pipe.to(dtype=dtype)
    params = add_lora(model, LoRAConfig(rank=2))
    # LoRA B starts at zero, which makes the gradient of A vanish; give B values so every
    # adapter weight must receive a gradient.
    gen = torch.Generator().manual_seed(seed + 7)
    with torch.no_grad():
        for p in params:
            p.add_(0.05 * torch.randn(p.shape, generator=gen).to(p.dtype))
    return model, params


def _loss(model, plan, *, eta=0.0, checkpointing=True, detach_input=False, seed=0, guidance=3.0):
    schedule = model.schedule(STEPS, eta=eta, height=32, width=32)
    pc = model.encode_prompts(PROMPTS, guidance=True, height=32, width=32, max_sequence_length=8 if model.is_flow else None)
    gens = [torch.Generator().manual_seed(seed + i) for i in range(len(PROMPTS))]
    x_T = schedule.initial_noise(model.latent_shape(len(PROMPTS), 32, 32), gens, "cpu", model.dtype)
    result = sample_with_grad(
        model.denoiser, schedule, x_T, pc.cond, pc.uncond, guidance, plan, generator=gens,
        gradient_checkpointing=checkpointing, detach_denoiser_input=detach_input,
    )
    images = model.decode(result.latents, gradient_checkpointing=checkpointing)
    reward = build_reward("brightness")
    return -reward(images, PROMPTS * (result.latents.shape[0] // len(PROMPTS))).mean(), result


def _grads(params):
    return [p.grad.detach().clone() if p.grad is not None else None for p in params]


POLICIES = [
    ("full", FullChain()),
    ("last-k", LastK(2)),
    ("alignprop", RandomCutoff("uniform", low=0.25, high=0.75)),
    ("refl", RandomLateStep(0.5, 0.75)),
    ("draft-lv", LowVarianceLastStep(2)),
]


@pytest.mark.parametrize("family", ["sd", "sd3"])
@pytest.mark.parametrize("name,policy", POLICIES, ids=[p[0] for p in POLICIES])
def test_gradients_reach_exactly_the_lora_weights(family, name, policy):
    model, params = _model(family)
    plan = policy.plan(STEPS, torch.Generator().manual_seed(0))
    loss, result = _loss(model, plan, eta=1.0 if name == "alignprop" else 0.0)
    loss.backward()
    assert result.grad_calls == plan.grad_steps + (1 if plan.renoised_copies else 0)
    names = {id(p) for p in params}
    for p in params:
        assert p.grad is not None and torch.isfinite(p.grad).all()
        assert p.grad.abs().sum() > 0, "a LoRA weight received no gradient"
    frozen = [p for p in model.module.parameters() if id(p) not in names]
    frozen += [p for p in model.pipe.vae.parameters()] + [p for p in model.pipe.text_encoder.parameters()]
    assert frozen and all(p.grad is None and not p.requires_grad for p in frozen)
    assert {id(p) for p in trainable_parameters(model)} == names


@pytest.mark.parametrize("family", ["sd", "sd3"])
def test_last_k_with_k_equal_t_is_full_backprop_and_checkpointing_is_exact(family):
    model, params = _model(family)
    _loss(model, LastK(STEPS).plan(STEPS))[0].backward()
    last_k = _grads(params)
    model.module.zero_grad()
    _loss(model, FullChain().plan(STEPS), checkpointing=False)[0].backward()
    naive = _grads(params)
    for a, b in zip(last_k, naive):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-8)


def test_truncation_changes_the_gradient():
    """K=1 and K=T give different gradients (so the previous test is not vacuous)."""
    model, params = _model("sd")
    _loss(model, LastK(1).plan(STEPS))[0].backward()
    k1 = _grads(params)
    model.module.zero_grad()
    _loss(model, FullChain().plan(STEPS))[0].backward()
    full = _grads(params)
    assert max((a - b).abs().max() for a, b in zip(k1, full)) > 1e-6


def test_k1_gradient_matches_finite_differences():
    """The DRaFT-K (K=1) gradient is the derivative of the last step's objective, with the earlier
    chain held fixed: check it against central differences along a random direction (float64)."""
    torch.manual_seed(0)
    model, params = _model("sd", dtype=torch.float64)
    schedule = model.schedule(STEPS, height=32, width=32)
    pc = model.encode_prompts(PROMPTS, guidance=True, height=32, width=32)
    gens = [torch.Generator().manual_seed(i) for i in range(2)]
    x_T = schedule.initial_noise(model.latent_shape(2, 32, 32), gens, "cpu", torch.float64)
    luma = torch.tensor([0.299, 0.587, 0.114], dtype=torch.float64).view(1, 3, 1, 1)

    def reward(images, prompts):  # brightness, kept in float64 for the finite differences
        return (images * luma).sum(1).mean((1, 2))

    plan = LastK(1).plan(STEPS)

    def objective_k1():
        result = sample_with_grad(model.denoiser, schedule, x_T, pc.cond, pc.uncond, 3.0, plan, generator=gens)
        return reward(model.decode(result.latents).double(), PROMPTS).sum()

    # the input of the last step, computed once with the current weights: held fixed below
    with torch.no_grad():
        prefix = sample_with_grad(
            model.denoiser, schedule, x_T, pc.cond, pc.uncond, 3.0, TruncationPlan(STEPS, STEPS - 1, stop_step=None),
            generator=gens, keep_x0_predictions=True,
        )
        x = x_T
        for i in range(STEPS - 1):
            from align.core.sampling import guided_prediction

            out = guided_prediction(model.denoiser, x, schedule.model_timestep(i, 2, "cpu"), pc.cond, pc.uncond, 3.0)
            x = schedule.step(i, x, out).prev_sample
        last_input = x
    assert prefix.model_calls == STEPS

    def objective_fixed_prefix():
        from align.core.sampling import guided_prediction

        i = STEPS - 1
        out = guided_prediction(model.denoiser, last_input, schedule.model_timestep(i, 2, "cpu"), pc.cond, pc.uncond, 3.0)
        return reward(model.decode(schedule.step(i, last_input, out).prev_sample).double(), PROMPTS).sum()

    loss = objective_k1()
    loss.backward()
    direction = [torch.randn_like(p) for p in params]
    analytic = sum((p.grad * d).sum() for p, d in zip(params, direction)).item()
    h = 1e-5
    with torch.no_grad():
        for p, d in zip(params, direction):
            p.add_(h * d)
        plus = objective_fixed_prefix().item()
        for p, d in zip(params, direction):
            p.sub_(2 * h * d)
        minus = objective_fixed_prefix().item()
        for p, d in zip(params, direction):
            p.add_(h * d)
    numeric = (plus - minus) / (2 * h)
    assert abs(analytic) > 1e-8
    assert analytic == pytest.approx(numeric, rel=1e-4, abs=1e-10)
    assert torch.allclose(objective_fixed_prefix(), loss.detach())


def _plain_and_detached_grads(k: int):
    model, params = _model("sd", dtype=torch.float64)
    _loss(model, LastK(k).plan(STEPS))[0].backward()
    plain = _grads(params)
    model.module.zero_grad()
    _loss(model, LastK(k).plan(STEPS), detach_input=True)[0].backward()
    return plain, _grads(params)


def test_detached_denoiser_input_differs_but_reaches_lora():
    plain, drtune = _plain_and_detached_grads(2)
    assert all(g is not None and g.abs().sum() > 0 for g in drtune)
    # The path through the next step's input is small on the tiny model (about 6e-4 of the
    # gradient), so the check is relative and in float64, where rounding sits near 1e-16.
    scale = max(a.abs().max() for a in plain)
    assert max((a - b).abs().max() for a, b in zip(plain, drtune)) > 1e-5 * scale


def test_detached_denoiser_input_changes_nothing_with_one_grad_step():
    # With K=1 the denoiser input comes from no-grad steps, so DRTune's stop-gradient is a no-op.
    plain, drtune = _plain_and_detached_grads(1)
    for a, b in zip(plain, drtune):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=0)


def test_refl_scores_the_x0_prediction_of_its_step():
    model, _ = _model("sd")
    plan = RandomLateStep(0.5, 0.5).plan(STEPS)
    assert plan.stop_step == plan.first_grad_step == 2
    _, result = _loss(model, plan)
    assert result.model_calls == 3 and result.grad_calls == 1


def test_float32_state_drives_a_bfloat16_model():
    """The trainer's layout: the chain's state in float32, only the denoiser's input cast to the model dtype."""
    model, params = _model("sd", dtype=torch.bfloat16)
    schedule = model.schedule(STEPS, eta=1.0, height=32, width=32)
    pc = model.encode_prompts(PROMPTS, guidance=True, height=32, width=32)
    gens = [torch.Generator().manual_seed(i) for i in range(2)]
    x_T = schedule.initial_noise(model.latent_shape(2, 32, 32), gens, "cpu")
    seen = []

    def bf16_denoiser(x, t, c):
        seen.append(x.dtype)
        return model.denoiser(x, t, c)

    result = sample_with_grad(bf16_denoiser, schedule, x_T, pc.cond, pc.uncond, 3.0, LastK(2).plan(STEPS),
                              generator=gens, keep_x0_predictions=True, model_dtype=torch.bfloat16)
    assert x_T.dtype == result.latents.dtype == torch.float32
    assert all(x0.dtype == torch.float32 for x0 in result.x0_predictions)
    assert seen and set(seen) == {torch.bfloat16}
    images = model.decode(result.latents)
    (-build_reward("brightness")(images.float(), PROMPTS).mean()).backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() and p.grad.abs().sum() > 0 for p in params)


def test_plans_validate():
    with pytest.raises(ValueError, match="truncation_steps=5 exceeds num_steps=4"):
        LastK(5).plan(4)
    with pytest.raises(ValueError, match="cutoff_distribution='beta'"):
        RandomCutoff("beta")
    plans = [RandomCutoff().plan(50, torch.Generator().manual_seed(s)).first_grad_step for s in range(200)]
    assert 40 <= sum(plans) / len(plans) <= 44  # gaussian around 42 of 50
    assert all(0 <= p <= 49 for p in plans)
