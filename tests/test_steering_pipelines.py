"""FK steering on tiny real pipelines: every family, the diffusers loading routes, parity with diffusers at
lambda = 0, FK against best-of-N at matched model evaluations, and the ``align steer`` command."""

import json

import pytest
import torch
from _threads import one_thread  # noqa: F401

from align.builtin.testing import tiny_pipeline
from align.cli import main
from align.core.errors import AlignError
from align.core.models import DiffusionModel
from align.steer.fk import FKConfig, fk_sample
from align.steer.guidance import BestOfNConfig, GradientGuidanceConfig, best_of_n, gradient_guidance
from pipelines import FKSteeringPipeline
from rewards import build_reward

PROMPTS = ["a red circle", "a blue square"]
SMALL = dict(num_inference_steps=6, height=32, width=32, resample_start=1, resample_end=4, resample_interval=2)


@pytest.mark.floor
@pytest.mark.parametrize("family", ["sd", "sdxl", "sd3", "flux"])
def test_from_pipe_and_from_pretrained_for_every_family(tmp_path, family):
    extra = {"max_sequence_length": 8} if family in ("sd3", "flux") else {}
    source = tiny_pipeline(family)
    pipe = FKSteeringPipeline.from_pipe(source)
    assert pipe.family == family
    assert (pipe.unet if family in ("sd", "sdxl") else pipe.transformer) is (
        source.unet if family in ("sd", "sdxl") else source.transformer)  # shared, not copied
    out = pipe(PROMPTS, "brightness", num_particles=3, lambda_=500.0, output_type="pt", **SMALL, **extra)
    assert out.images.shape == (6, 3, 32, 32) and out.best_images.shape == (2, 3, 32, 32)
    assert out.rewards.shape == out.log_weights.shape == (2, 3)
    assert torch.allclose(torch.logsumexp(out.log_weights, -1), torch.zeros(2, dtype=torch.float64))
    assert [e.step for e in out.ancestry] == [1, 3]
    assert out.relative_ess.shape == (2, 2) and out.final_relative_ess.shape == (2,)  # [events, prompts], [prompts]
    assert torch.equal(out.best_images, out.images[out.rewards.argmax(-1) + torch.tensor([0, 3])])
    source.save_pretrained(tmp_path / "model")
    loaded = FKSteeringPipeline.from_pretrained(tmp_path / "model")
    loaded.set_progress_bar_config(disable=True)
    again = loaded(PROMPTS, "brightness", num_particles=3, lambda_=500.0, output_type="pt", **SMALL, **extra)
    torch.testing.assert_close(again.images, out.images)


def test_zero_lambda_matches_the_diffusers_pipeline():
    source = tiny_pipeline("sd")
    reference = source(PROMPTS, num_inference_steps=6, guidance_scale=5.0, eta=1.0, num_images_per_prompt=3,
                       generator=torch.Generator().manual_seed(7), output_type="pt").images
    pipe = FKSteeringPipeline.from_pipe(source)
    out = pipe(PROMPTS, "brightness", num_particles=3, lambda_=0.0, guidance_scale=5.0, eta=1.0,
               generator=torch.Generator().manual_seed(7), output_type="pt", **SMALL)
    torch.testing.assert_close(out.images, reference, atol=2e-5, rtol=1e-4)
    # steering changes the result (the random-weight decoder's brightness varies by ~1e-3)
    steered = pipe(PROMPTS, "brightness", num_particles=3, lambda_=5000.0, guidance_scale=5.0, eta=1.0,
                   generator=torch.Generator().manual_seed(7), output_type="pt", **SMALL)
    assert any(bool(e.resampled.any()) for e in steered.ancestry)
    assert not torch.allclose(steered.images, reference, atol=1e-4)


def test_output_types_and_baselines_through_the_pipeline():
    pipe = FKSteeringPipeline.from_pipe(tiny_pipeline("sd"))
    pil = pipe(PROMPTS[:1], "brightness", num_particles=2, **SMALL)
    assert len(pil.images) == 2 and pil.images[0].size == (32, 32) and len(pil.best_images) == 1
    arr = pipe(PROMPTS[:1], "saturation", num_particles=2, output_type="np", **SMALL)
    assert arr.images.shape == (2, 32, 32, 3)
    latent = pipe(PROMPTS[:1], "brightness", num_particles=2, output_type="latent", **SMALL)
    assert latent.images.shape == (2, 4, 16, 16)
    bon = pipe(PROMPTS, "brightness", config=BestOfNConfig(num_samples=3), output_type="pt", num_inference_steps=6,
               height=32, width=32)
    assert bon.log_weights is None and bon.ancestry == [] and bon.rewards.shape == (2, 3)
    grad = pipe(PROMPTS, "brightness", config=GradientGuidanceConfig(scale=50.0), output_type="pt",
                num_inference_steps=6, height=32, width=32)
    assert grad.counts.reward_grad_rows == 2 * 6


def test_pipeline_errors_name_the_value():
    pipe = FKSteeringPipeline.from_pipe(tiny_pipeline("sd"))
    with pytest.raises(AlignError, match=r"eta=0.0 is deterministic.*DDIM with eta > 0"):
        pipe(PROMPTS, "brightness", eta=0.0, **SMALL)
    with pytest.raises(AlignError, match=r"unknown argument\(s\) \['num_particle'\] for FKConfig"):
        pipe(PROMPTS, "brightness", num_particle=3, **SMALL)
    with pytest.raises(AlignError, match="num_particles=0 is out of range"):
        pipe(PROMPTS, "brightness", num_particles=0, **SMALL)
    with pytest.raises(AlignError, match="unknown reward 'brightnes'.*Did you mean 'brightness'"):
        pipe(PROMPTS, "brightnes", **SMALL)
    with pytest.raises(AlignError, match="output_type='png' is not supported"):
        pipe(PROMPTS, "brightness", output_type="png", **SMALL)


def test_fk_beats_best_of_n_on_a_tiny_model_at_matched_evaluations():
    model = DiffusionModel(tiny_pipeline("sd"))
    prompts = ["a red circle", "a blue square", "a green triangle", "a yellow cat", "a dark dog", "a bright bird",
               "a pink fish", "a white horse"]
    pc = model.encode_prompts(prompts, guidance=True)
    schedule = model.schedule(20, eta=1.0)
    reward = build_reward("brightness")
    inputs = dict(sample_shape=(4, 16, 16), cond=pc.cond, uncond=pc.uncond, guidance_scale=5.0, prompts=prompts,
                  decode_fn=model.decode)
    with torch.no_grad():
        bon = best_of_n(model.denoiser, schedule, reward, BestOfNConfig(num_samples=4, seed=0), **inputs)
        # lambda in units of the reward's spread: the random decoder's brightness varies by ~1e-3
        lam = 3.0 / bon.rewards.std(1).mean().item()
        fk = fk_sample(model.denoiser, schedule, reward, FKConfig(num_particles=4, lambda_=lam, resample_start=4,
                       resample_end=16, resample_interval=4, seed=0), **inputs)
    assert fk.counts.model_rows == bon.counts.model_rows == 8 * 4 * 2 * 20
    assert fk.best_rewards().mean() > bon.best_rewards().mean()


def test_gradient_guidance_raises_a_differentiable_reward():
    model = DiffusionModel(tiny_pipeline("sd"))
    pc = model.encode_prompts(PROMPTS, guidance=True)
    schedule = model.schedule(6)
    reward = build_reward("brightness")
    inputs = dict(sample_shape=(4, 16, 16), cond=pc.cond, uncond=pc.uncond, guidance_scale=5.0, prompts=PROMPTS,
                  decode_fn=model.decode)
    with torch.no_grad():
        plain = best_of_n(model.denoiser, schedule, reward, BestOfNConfig(num_samples=2, seed=0), **inputs)
        zero = gradient_guidance(model.denoiser, schedule, reward, GradientGuidanceConfig(scale=0.0, num_samples=2),
                                 **inputs)
        # the random decoder's brightness gradient is ~1e-4 per latent entry, hence the large scale
        guided = gradient_guidance(model.denoiser, schedule, reward,
                                   GradientGuidanceConfig(scale=1e4, num_samples=2), **inputs)
    assert torch.equal(zero.samples, plain.samples)
    gain = guided.rewards - plain.rewards  # same noise: paired
    assert bool((gain > 0).all()) and gain.mean() > 2 * plain.rewards.std()


def test_cli_steer_writes_images_and_results(tmp_path, capsys):
    tiny_pipeline("sd").save_pretrained(tmp_path / "model")
    out = tmp_path / "out"
    code = main(["steer", "-q", "--model", str(tmp_path / "model"), "-p", "a red circle", "-p", "a blue square",
                 "--reward", "brightness", "-o", str(out), "num_steps=6", "height=32", "width=32",
                 "fk.resample_start=1", "fk.resample_end=4", "fk.resample_interval=2", "fk.num_particles=3",
                 "fk.lambda_=500"])
    assert code == 0
    results = json.loads((out / "results.json").read_text())
    assert len(results["rewards"]) == 2 and len(results["rewards"][0]) == 3
    assert [e["step"] for e in results["ancestry"]] == [1, 3]
    for event in results["ancestry"]:  # ESS / k per resampling step, per prompt
        assert event["relative_ess"] == pytest.approx([ess / 3 for ess in event["ess"]])
    final_ess = results["final_relative_ess"]
    assert len(final_ess) == 2 and all(1 / 3 - 1e-9 <= e <= 1 + 1e-9 for e in final_ess)
    assert results["counts"]["model_rows"] == 6 * 2 * 3 * 2
    assert len(list((out / "particles").glob("*.png"))) == 6 and len(list((out / "best").glob("*.png"))) == 2
    # grid.png: a row per prompt, its particles best first (32 px tiles enlarged 4x, 2 px padding)
    import imageio.v3 as iio

    grid = iio.imread(out / "grid.png")
    assert grid.shape[:2] == (4 * (2 * (32 + 2) + 2), 4 * (3 * (32 + 2) + 2))
    best_first = iio.imread(out / "best" / "p001.png")
    row1 = grid[4 * (2 + 34): 4 * (2 + 34 + 32): 4, 4 * 2: 4 * (2 + 32): 4]
    assert (row1.astype(int) - best_first.astype(int)).__abs__().max() == 0
    printed = capsys.readouterr().out
    assert "best reward" in printed and f"final {final_ess[1]:.2f}" in printed and "ESS/k by step {1: " in printed
    # the baseline at matched compute, from the same command
    code = main(["steer", "-q", "--model", str(tmp_path / "model"), "-p", "a red circle", "--method", "best_of_n",
                 "-o", str(tmp_path / "bon"), "num_steps=6", "height=32", "width=32", "fk.num_particles=3"])
    assert code == 0
    bon = json.loads((tmp_path / "bon" / "results.json").read_text())
    assert bon["counts"]["model_rows"] == 6 * 3 * 2 and bon["final_relative_ess"] is None
    assert "ESS/k" not in capsys.readouterr().out


@pytest.mark.parametrize(
    "args,message",
    [
        (["fk.lambda_=-1"], "fk.lambda_=-1.0 is out of range"),
        (["fk.num_particles=0"], "fk.num_particles=0 is out of range"),
        (["fk.potential=maximum"], "fk.potential='maximum' is not supported"),
        (["eta=0", "num_steps=30"], "eta=0.0 is deterministic"),
    ],
)
def test_cli_steer_errors_exit_2(tmp_path, capsys, args, message):
    tiny_pipeline("sd").save_pretrained(tmp_path / "model")
    code = main(["steer", "-q", "--model", str(tmp_path / "model"), "-p", "a cat", "-o", str(tmp_path / "o"),
                 "height=32", "width=32", *args])
    assert code == 2
    assert message in capsys.readouterr().err
