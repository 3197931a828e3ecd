"""The one sampling chain: its hooks, its noise layout and state dtype, and that every sampler built on it
gives bitwise the images of ``align sample`` (``generate``) under the same seed when its steering does nothing."""

import pytest
import torch
from _threads import one_thread  # noqa: F401

from align.builtin.testing import tiny_pipeline
from align.builtin.toy import GaussianMixture, MixtureDenoiser, toy_scheduler
from align.core.chain import run_chain, seeded_generators
from align.core.errors import AlignError
from align.core.lora import LoRAConfig, add_lora
from align.core.models import DiffusionModel
from align.core.sampling import SamplingSchedule
from align.steer.fk import FKConfig, fk_sample
from align.steer.generate import generate
from align.steer.guidance import BestOfNConfig, best_of_n
from align.steer.particles import particle_noise
from align.steer.rlg import RLGConfig, TwoModels, rlg_sample
from pipelines import FKSteeringPipeline, RLGuidancePipeline
from rewards import build_reward

MIX = GaussianMixture.create([0.7, 0.3], [[-1.0], [1.5]], [0.5, 0.4])
PROMPTS = ["a red circle", "a blue square"]


def _toy(kind: str, steps: int, eta: float | None):
    scheduler = toy_scheduler(kind)
    return MixtureDenoiser(MIX, scheduler), SamplingSchedule.from_scheduler(scheduler, steps, eta=eta)


def _start(schedule, rows: int):
    """x_T and the generators that drew it (which go on to draw the step noise), seeds 0..rows-1."""
    gens = seeded_generators(range(rows))
    return schedule.initial_noise((rows, 1), gens, "cpu"), gens


def _toy_predict(denoiser, schedule, model_dtype=None):
    def predict(i, x):
        t = schedule.model_timestep(i, x.shape[0], x.device)
        return denoiser(x if model_dtype is None else x.to(model_dtype), t).to(x.dtype)

    return predict


# ------------------------------------------------------------------------------------------ the loop
@pytest.mark.parametrize("kind,eta", [("ddim", 1.0), ("ddim", 0.0), ("ddpm", None), ("flow", 1.0), ("flow", 0.0)])
def test_chain_is_the_step_loop(kind, eta):
    denoiser, schedule = _toy(kind, 20, eta)
    predict = _toy_predict(denoiser, schedule)
    x, gens = _start(schedule, 6)
    x0_of_step = []
    for i in range(schedule.num_steps):
        step = schedule.step(i, x, predict(i, x), generator=gens)
        x0_of_step.append(step.x0_hat)
        x = step.prev_sample
    seen = []
    chained = run_chain(schedule, predict, *_start(schedule, 6), step_callback=lambda i, x0: seen.append((i, x0)))
    assert torch.equal(chained, x)
    assert [i for i, _ in seen] == list(range(20))
    assert all(torch.equal(a, b) for (_, a), b in zip(seen, x0_of_step))
    # ReFL's early stop: the x0-prediction of the stop step, after stop + 1 model calls
    calls = []
    stopped = run_chain(schedule, lambda i, x: calls.append(i) or predict(i, x), *_start(schedule, 6), stop_step=7)
    assert calls == list(range(8)) and torch.equal(stopped, x0_of_step[7])


def test_shift_moves_the_mean_and_on_noise_sees_the_drawn_noise():
    denoiser, schedule = _toy("ddim", 10, 1.0)
    predict = _toy_predict(denoiser, schedule)
    shifted_steps = {2, 5}
    record = {}

    def shift(i, step):
        return torch.full_like(step.mean, 0.25) if i in shifted_steps else None

    def on_noise(i, delta, z):
        record[i] = (delta, z)

    states = []
    run_chain(schedule, lambda i, x: states.append(x) or predict(i, x), *_start(schedule, 4), shift=shift,
              on_noise=on_noise)
    assert sorted(record) == sorted(shifted_steps)  # called on shifted steps only
    for i in shifted_steps:
        delta, z = record[i]
        mean = schedule.transition(i, states[i], predict(i, states[i])).mean
        torch.testing.assert_close(states[i + 1], mean + delta + schedule.noise_stds[i] * z, atol=0, rtol=0)


def test_on_transition_reports_each_step_input_gaussian_and_output():
    denoiser, schedule = _toy("ddim", 8, 1.0)
    predict = _toy_predict(denoiser, schedule)
    seen = []
    out = run_chain(schedule, predict, *_start(schedule, 3), on_transition=lambda i, x, step, nxt: seen.append((i, x, step, nxt)))
    assert torch.equal(out, run_chain(schedule, predict, *_start(schedule, 3)))  # recording changes nothing
    assert [i for i, *_ in seen] == list(range(8))
    x_T, _ = _start(schedule, 3)
    assert torch.equal(seen[0][1], x_T) and torch.equal(seen[-1][3], out)
    for (i, x, step, nxt), later in zip(seen, seen[1:] + [None]):
        assert torch.equal(step.mean, schedule.transition(i, x, predict(i, x)).mean) and step.noise_std == schedule.noise_stds[i]
        if later is not None:
            assert torch.equal(later[1], nxt)  # the output of step i is the input of step i + 1
        if step.noise_std == 0:
            assert torch.equal(nxt, step.mean)


def test_reweight_replaces_particles_and_outputs():
    denoiser, schedule = _toy("ddim", 10, 1.0)
    predict = _toy_predict(denoiser, schedule)
    flip = torch.tensor([3, 2, 1, 0])

    def reweight(i, x, out):
        return (x[flip], out[flip]) if i == 0 else (x, out)

    # reversing the particles at step 0 equals starting from the reversed x_T (the noise stays per slot)
    x_T, gens = _start(schedule, 4)
    reversed_start = run_chain(schedule, predict, x_T[flip], gens)
    assert torch.equal(run_chain(schedule, predict, *_start(schedule, 4), reweight=reweight), reversed_start)


# --------------------------------------------------------------------------------- noise and dtype
def test_particle_noise_follows_the_align_sample_seeds():
    denoiser, schedule = _toy("ddim", 5, 1.0)
    noise, aux = particle_noise(7, None, num_prompts=3, per_prompt=2)
    x_T = schedule.initial_noise((6, 1), noise, "cpu")
    # particle k of every prompt: the noise of seed 7 + k, whatever the batch
    alone = [schedule.initial_noise((1, 1), seeded_generators([7 + k]), "cpu") for k in range(2)]
    assert torch.equal(x_T, torch.cat(alone * 3))
    again_noise, again_aux = particle_noise(7, None, num_prompts=1, per_prompt=2)
    assert torch.equal(schedule.initial_noise((2, 1), again_noise, "cpu"), x_T[:2])
    assert torch.equal(torch.rand(3, generator=aux), torch.rand(3, generator=again_aux))  # aux: from the seed only
    with pytest.raises(AlignError, match=r"got 2 generators for 3 prompt\(s\) x 1 samples"):
        particle_noise(0, seeded_generators([0, 1]), num_prompts=3, per_prompt=1)


@pytest.mark.parametrize("eta,at_least", [(0.0, 10.0), (1.0, 10.0)])
def test_half_precision_state_drifts_far_more_than_a_half_precision_model(eta, at_least):
    """28 flow steps on the analytic toy, compared with a float64 chain: a bfloat16 state (the old layout)
    drifts 37x (Euler ODE, eta=0) and 21x (SDE step, eta=1) further than a float32 state driving the same
    bfloat16 model; the test keeps a margin of 2-4x."""
    denoiser, schedule = _toy("flow", 28, eta)

    def run(state, model):
        gen = torch.Generator().manual_seed(0)
        x_T = schedule.initial_noise((4096, 1), gen, "cpu", state)
        return run_chain(schedule, _toy_predict(denoiser, schedule, model), x_T, gen).double()

    exact = run(torch.float64, torch.float64)

    def rms(x):
        return ((x - exact) ** 2).mean().sqrt().item()

    fp32 = rms(run(torch.float32, torch.float32))
    mixed = rms(run(torch.float32, torch.bfloat16))
    low = rms(run(torch.bfloat16, torch.bfloat16))
    assert fp32 < 1e-5 < mixed  # the bf16 model's own rounding dominates the float32 state
    assert low / mixed > at_least, (low, mixed)


# ------------------------------------------------------------------ bitwise: generate = every sampler
FAMILIES = [("sd", {}), ("sd3", {"max_sequence_length": 8})]
SEED, STEPS, SCALE, K = 3, 5, 4.0, 2


@pytest.fixture(scope="module", params=FAMILIES, ids=[f for f, _ in FAMILIES])
def tiny(request):
    family, extra = request.param
    pipe = tiny_pipeline(family)
    model = DiffusionModel(pipe)
    settings = dict(num_steps=STEPS, guidance_scale=SCALE, eta=1.0, height=32, width=32, **extra)
    # align sample: image k of every prompt from seed + k, all rows in one batch
    per_k = generate(model, [p for p in PROMPTS for _ in range(K)], [SEED + k for _ in PROMPTS for k in range(K)],
                     batch_size=len(PROMPTS) * K, return_latents=True, **settings)
    return family, pipe, model, settings, extra, per_k


def _inputs(model, extra):
    pc = model.encode_prompts(PROMPTS, guidance=True, height=32, width=32, **extra)
    return dict(sample_shape=model.latent_shape(1, 32, 32)[1:], cond=pc.cond, uncond=pc.uncond, guidance_scale=SCALE,
                prompts=PROMPTS, decode_fn=model.decode)


def test_generate_best_of_n_fk_and_rlg_agree_bitwise(tiny):
    _, pipe, model, settings, extra, per_k = tiny
    schedule = model.schedule(STEPS, eta=1.0, height=32, width=32)
    reward = build_reward("brightness")
    inputs = _inputs(model, extra)
    with torch.no_grad():
        one = generate(model, PROMPTS, [SEED] * len(PROMPTS), batch_size=len(PROMPTS), return_latents=True, **settings)
        bon = best_of_n(model.denoiser, schedule, reward, BestOfNConfig(num_samples=1, seed=SEED), **inputs)
        fk = fk_sample(model.denoiser, schedule, reward, FKConfig(num_particles=K, lambda_=0.0, seed=SEED,
                       resample_start=1, resample_end=3, resample_interval=1), **inputs)
        unused = lambda x, t, c: pytest.fail("w = 0 must not call the aligned model")  # noqa: E731
        rlg_inputs = {k: v for k, v in inputs.items() if k not in ("prompts", "decode_fn")}
        rlg = rlg_sample(TwoModels(model.denoiser, unused), schedule, RLGConfig(weight=0.0, num_samples=K, seed=SEED),
                         **rlg_inputs)
    assert torch.equal(bon.samples, one)
    assert torch.equal(fk.samples, per_k)
    assert torch.equal(rlg.samples, per_k)
    assert torch.equal(fk.images, model.decode(per_k))
    # the same seed is not the same image as the next seed: the test can fail
    assert not torch.equal(per_k[0], per_k[1])


def test_pipelines_route_the_seed_like_align_sample(tiny):
    family, pipe, model, settings, extra, per_k = tiny
    common = dict(num_inference_steps=STEPS, guidance_scale=SCALE, eta=1.0, height=32, width=32, output_type="latent",
                  **extra)
    fk_pipe = FKSteeringPipeline.from_pipe(pipe)
    fk_pipe.set_progress_bar_config(disable=True)
    out = fk_pipe(PROMPTS, "brightness", num_particles=K, lambda_=0.0, seed=SEED, resample_start=1, resample_end=3,
                  resample_interval=1, **common)
    assert torch.equal(out.images, per_k)
    # lambda = 0 applies no potentials: no events, and the equal final weights have ESS / K = 1
    assert out.relative_ess is None and torch.equal(out.final_relative_ess, torch.ones(2, dtype=torch.float64))
    # RL guidance needs an aligned model: the same (seeded) tiny model with a LoRA, run at weight 0
    aligned = tiny_pipeline(family)
    add_lora(DiffusionModel(aligned), LoRAConfig(rank=2))
    rlg_pipe = RLGuidancePipeline.from_pipe(aligned)
    rlg_pipe.set_progress_bar_config(disable=True)
    out = rlg_pipe(PROMPTS, weight=0.0, num_samples=K, seed=SEED, **common)
    assert torch.equal(out.images, per_k)
