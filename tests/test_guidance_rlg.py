"""RL guidance: exact at w = 0 and w = 1, the right blend in between, one batched forward with LoRA rows masked."""

import pytest
import torch
from _threads import one_thread  # noqa: F401

from align.builtin.testing import tiny_pipeline
from align.builtin.toy import GaussianMixture, LinearReward, MixtureDenoiser, toy_scheduler
from align.core.chain import run_chain
from align.core.errors import AlignError
from align.core.lora import LoRAConfig, adapters_disabled, add_lora
from align.core.models import DiffusionModel
from align.core.sampling import SamplingSchedule
from align.steer.particles import prepare_particles
from align.steer.rlg import LoRAPair, RLGConfig, TwoModels, rlg_prediction, rlg_sample

REWARD = LinearReward([1.0])
PROMPTS = ["a red circle", "a blue square"]


def _plain(denoiser, schedule, shape, per_prompt, seed=0, **inputs):
    """The plain sampler with the particle samplers' default seeds (sample k from seed + k)."""
    setup = prepare_particles(denoiser, schedule, per_prompt, sample_shape=shape, **inputs)
    noise, _ = setup.noise(seed)
    with torch.no_grad():
        return run_chain(schedule, setup.predictor, setup.initial_noise(noise), noise)


# ---------------------------------------------------------------------------------------------- toy
@pytest.mark.parametrize("kind,eta", [("ddim", 0.0), ("ddim", 1.0), ("flow", 0.0)])
def test_gaussian_rlg_is_exactly_the_w_tilted_model(kind, eta):
    # for a Gaussian and a linear reward the blended prediction IS the w-tilted model's prediction
    # at every noise level, so RLG reproduces that model's sampler to rounding
    base_law = GaussianMixture.create([1.0], [[0.5]], [0.8])
    scheduler = toy_scheduler(kind)
    schedule = SamplingSchedule.from_scheduler(scheduler, 50, eta=eta)
    pair = TwoModels(MixtureDenoiser(base_law, scheduler), MixtureDenoiser(REWARD.tilt(base_law, 1.0), scheduler))
    for w in (0.0, 0.5, 1.0, 2.5):
        ours = rlg_sample(pair, schedule, RLGConfig(weight=w, num_samples=256), sample_shape=(1,), num_prompts=1,
                          dtype=torch.float64)
        exact_model = MixtureDenoiser(REWARD.tilt(base_law, w), scheduler)
        reference = _plain(exact_model, schedule, (1,), 256, num_prompts=1, dtype=torch.float64)
        torch.testing.assert_close(ours.samples, reference, atol=1e-12, rtol=0)


def test_mixture_rlg_moves_toward_the_w_tilted_target():
    mix = GaussianMixture.create([0.7, 0.3], [[-1.0], [1.5]], [0.5, 0.4])
    scheduler = toy_scheduler("ddim")
    schedule = SamplingSchedule.from_scheduler(scheduler, 100)
    base, aligned = MixtureDenoiser(mix, scheduler), MixtureDenoiser(REWARD.tilt(mix, 1.0), scheduler)
    means = {}
    n = 4000
    for w in (0.0, 0.5, 1.0, 2.0, 3.0):
        # one generator for the batch: 4000 per-sample generators would only slow the toy down
        out = rlg_sample(TwoModels(base, aligned), schedule, RLGConfig(weight=w, num_samples=n), sample_shape=(1,),
                         num_prompts=1, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
        means[w] = out.samples.mean().item()
    se = mix.variance().sqrt().item() / n**0.5
    # w = 0 and 1 are the base and aligned laws (up to the sampler's discretisation, ~0.02 here)
    assert abs(means[0.0] - mix.mean().item()) < 4 * se + 0.02
    assert abs(means[1.0] - REWARD.tilt(mix, 1.0).mean().item()) < 4 * se + 0.02
    assert means[0.0] < means[0.5] < means[1.0] < means[2.0] < means[3.0]
    for w in (2.0, 3.0):
        target = REWARD.tilt(mix, w).mean().item()
        assert abs(means[w] - target) < abs(means[1.0] - target), (w, means, target)


# ------------------------------------------------------------------------------------- LoRA models
@pytest.fixture(scope="module", params=["epsilon", "v_prediction", "sd3"])
def lora_model(request):
    if request.param == "sd3":
        pipe, extra = tiny_pipeline("sd3"), {"max_sequence_length": 8}
    else:
        pipe, extra = tiny_pipeline("sd", prediction_type=request.param), {}
    model = DiffusionModel(pipe)
    pc = model.encode_prompts(PROMPTS, guidance=True, **extra)
    schedule = model.schedule(5)
    shape = model.latent_shape(1, 32, 32)[1:]
    base = _plain(model.denoiser, schedule, shape, 2, cond=pc.cond, uncond=pc.uncond, guidance_scale=4.0)
    params = add_lora(model, LoRAConfig(rank=4))
    with torch.no_grad():
        for i, p in enumerate(params):  # an aligned model that differs from the base
            p.add_(0.2 * torch.randn(p.shape, generator=torch.Generator().manual_seed(i)))
    aligned = _plain(model.denoiser, schedule, shape, 2, cond=pc.cond, uncond=pc.uncond, guidance_scale=4.0)
    return model, pc, schedule, shape, base, aligned


def _rlg(model, pc, schedule, shape, weight, batched=True, **kw):
    with torch.no_grad():
        return rlg_sample(LoRAPair(model.denoiser, batched=batched), schedule,
                          RLGConfig(weight=weight, num_samples=2, batched=batched, **kw),
                          sample_shape=shape, cond=pc.cond, uncond=pc.uncond, guidance_scale=4.0)


def test_lora_rlg_is_exact_at_zero_and_one(lora_model):
    model, pc, schedule, shape, base, aligned = lora_model
    assert (base - aligned).abs().max() > 0.05  # the adapter matters
    w0 = _rlg(model, pc, schedule, shape, 0.0)
    w1 = _rlg(model, pc, schedule, shape, 1.0)
    assert torch.equal(w0.samples, base)
    assert torch.equal(w1.samples, aligned)
    # w = 0 / 1 run one model only: 2 rows (CFG pair) per sample and step
    assert w0.counts.model_rows == w1.counts.model_rows == 2 * 4 * schedule.num_steps
    with adapters_disabled(model):  # RLG refuses to run with the adapter switched off: there is no aligned model
        with pytest.raises(AlignError, match="adapters are disabled"):
            _rlg(model, pc, schedule, shape, 0.5)
    assert torch.equal(_rlg(model, pc, schedule, shape, 1.0).samples, aligned)


def test_one_batched_forward_equals_two_forwards(lora_model):
    model, pc, schedule, shape, base, aligned = lora_model
    for w in (0.5, 2.0):
        one = _rlg(model, pc, schedule, shape, w)
        two = _rlg(model, pc, schedule, shape, w, batched=False)
        torch.testing.assert_close(one.samples, two.samples, atol=2e-4, rtol=1e-4)
        assert one.counts.model_calls == schedule.num_steps  # one forward per step
        assert one.counts.model_rows == 4 * 4 * schedule.num_steps  # [u_b, c_b, u_a, c_a] per sample
    mid = _rlg(model, pc, schedule, shape, 0.5).samples
    assert 0 < (mid - base).abs().max() and 0 < (mid - aligned).abs().max()


def test_blend_is_linear_in_the_weight(lora_model):
    model, pc, schedule, shape, *_ = lora_model
    x = torch.randn(2, *shape, generator=torch.Generator().manual_seed(0))
    t = schedule.model_timestep(1, 2, "cpu")
    pair = LoRAPair(model.denoiser)
    with torch.no_grad():
        v0, v1, v2 = (rlg_prediction(pair, x, t, w, pc.cond, pc.uncond, 4.0) for w in (0.0, 1.0, 2.0))
        torch.testing.assert_close(v2, 2 * v1 - v0, atol=1e-4, rtol=1e-4)
        # separate guidance scales per side: the aligned side with CFG 1 is its conditional prediction
        mixed = rlg_prediction(pair, x, t, 1.0, pc.cond, pc.uncond, 4.0, aligned_guidance_scale=1.0)
        torch.testing.assert_close(mixed, model.denoiser(x, t, pc.cond), atol=1e-5, rtol=1e-5)


@pytest.mark.floor
def test_text_encoder_lora_base_side_uses_the_plain_encoder():
    from pipelines import RLGuidancePipeline

    pipe = tiny_pipeline("sd")
    ref = pipe(PROMPTS, num_inference_steps=4, guidance_scale=4.0, output_type="pt",
               generator=torch.Generator().manual_seed(0)).images
    model = DiffusionModel(pipe)
    params = add_lora(model, LoRAConfig(rank=4, text_encoder=True))
    with torch.no_grad():
        for i, p in enumerate(params):
            p.add_(0.3 * torch.randn(p.shape, generator=torch.Generator().manual_seed(i)))
    rlg = RLGuidancePipeline.from_pipe(pipe)
    rlg.set_progress_bar_config(disable=True)
    kwargs = dict(num_inference_steps=4, guidance_scale=4.0, output_type="pt", height=32, width=32)
    out0 = rlg(PROMPTS, weight=0.0, generator=torch.Generator().manual_seed(0), **kwargs)
    torch.testing.assert_close(out0.images, ref, atol=2e-5, rtol=1e-4)
    aligned = pipe(PROMPTS, num_inference_steps=4, guidance_scale=4.0, output_type="pt",
                   generator=torch.Generator().manual_seed(0)).images
    out1 = rlg(PROMPTS, weight=1.0, generator=torch.Generator().manual_seed(0), **kwargs)
    torch.testing.assert_close(out1.images, aligned, atol=2e-5, rtol=1e-4)
    assert (aligned - ref).abs().max() > 1e-3


@pytest.mark.floor
@pytest.mark.parametrize("family", ["sd", "flux"])
def test_pipeline_with_diffusers_loaded_lora(tmp_path, family):
    from align.core.lora import save_lora
    from pipelines import RLGuidancePipeline

    extra = {"max_sequence_length": 8} if family == "flux" else {}
    source = tiny_pipeline(family)
    trained = DiffusionModel(tiny_pipeline(family))
    params = add_lora(trained, LoRAConfig(rank=4))
    with torch.no_grad():
        for i, p in enumerate(params):
            p.add_(0.3 * torch.randn(p.shape, generator=torch.Generator().manual_seed(i)))
    save_lora(trained, tmp_path / "lora")
    common = dict(num_inference_steps=4, height=32, width=32, output_type="pt", **extra)
    base = source(PROMPTS, generator=torch.Generator().manual_seed(1), **common).images
    rlg = RLGuidancePipeline.from_pipe(source)
    rlg.set_progress_bar_config(disable=True)
    rlg.load_lora_weights(str(tmp_path / "lora"))  # the diffusers way
    aligned = source(PROMPTS, generator=torch.Generator().manual_seed(1), **common).images
    outs = {w: rlg(PROMPTS, weight=w, generator=torch.Generator().manual_seed(1), reward="brightness", **common)
            for w in (0.0, 1.0, 2.0)}
    torch.testing.assert_close(outs[0.0].images, base, atol=2e-5, rtol=1e-4)
    torch.testing.assert_close(outs[1.0].images, aligned, atol=2e-5, rtol=1e-4)
    assert (outs[2.0].images - aligned).abs().max() > 1e-4
    assert outs[2.0].rewards.shape == (2, 1)


def test_rlg_errors():
    model = DiffusionModel(tiny_pipeline("sd"))
    with pytest.raises(AlignError, match="needs a LoRA adapter"):
        LoRAPair(model.denoiser)
    with pytest.raises(AlignError, match="weight=inf must be a finite number"):
        RLGConfig(weight=float("inf"))
    with pytest.raises(AlignError, match="num_samples=0 is out of range"):
        RLGConfig(num_samples=0)


def test_cli_guide(tmp_path, capsys):
    from align.cli import main
    from align.core.lora import save_lora

    tiny_pipeline("sd").save_pretrained(tmp_path / "model")
    trained = DiffusionModel(tiny_pipeline("sd"))
    params = add_lora(trained, LoRAConfig(rank=4))
    with torch.no_grad():
        for i, p in enumerate(params):
            p.add_(0.3 * torch.randn(p.shape, generator=torch.Generator().manual_seed(i)))
    save_lora(trained, tmp_path / "lora")
    out = tmp_path / "out"
    code = main(["guide", "-q", "--model", str(tmp_path / "model"), "--lora", str(tmp_path / "lora"), "-p", "a cat",
                 "--weights", "0,1,2", "--reward", "brightness", "-o", str(out), "num_steps=4", "height=32",
                 "width=32", "num_samples=2"])
    assert code == 0
    import json

    runs = json.loads((out / "results.json").read_text())["runs"]
    assert [r["weight"] for r in runs] == [0.0, 1.0, 2.0]
    assert [r["counts"]["model_rows"] for r in runs] == [2 * 2 * 4, 2 * 2 * 4, 4 * 2 * 4]
    assert all(len(list((out / f"w{w}").glob("*.png"))) == 2 for w in ("0", "1", "2"))
    import imageio.v3 as iio

    grid = iio.imread(out / "grid.png")  # a row per weight, two samples each, 32 px tiles enlarged 4x
    assert grid.shape[:2] == (4 * (3 * 34 + 2), 4 * (2 * 34 + 2))
    assert "mean reward" in capsys.readouterr().out
    code = main(["guide", "-q", "--model", str(tmp_path / "model"), "-p", "a cat", "-o", str(out), "height=32",
                 "width=32"])
    assert code == 2 and "needs the aligned model's LoRA folder" in capsys.readouterr().err
