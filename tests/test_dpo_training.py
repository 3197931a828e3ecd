"""Diffusion-DPO on the trainer's one loop: offline pairs from a preference data set (streamed or latent-cached),
online pairs from the model's own samples ranked by a reward, every model family, exact resume, 2 processes == 1,
bad data through the CLI; preferences learned and rewards that rise on held-out seeds."""

import json
import math

import pytest
import torch
from _threads import one_thread  # noqa: F401
from _train_configs import PROMPTS, tiny_run
from test_policy_gradient_training import _heldout, _metrics, _seed_spread, _weights

from align.builtin.testing import tiny_pipeline
from align.cli import main
from align.core.images import save_png
from align.core.lora import adapters_disabled
from align.core.models import DiffusionModel, load_model
from align.steer.generate import generate
from align.train.dpo import denoising_target, dpo_loss, noised_pairs, sample_training_levels
from align.train.preference_data import ImagePreparation, encode_pairs, iter_preference_pairs
from align.train.trainer import Trainer
from rewards import build_reward

BUILTIN_PROMPTS = ["a red circle on a blue background", "a yellow square on a black background"]


def preference_folder(path, model, reward_name, prompts, per_prompt, *, num_steps=8, seed_offset=0):
    """A JSONL preference set of the model's own samples: per prompt, ranked by the reward, the k-th best paired with
    the k-th worst (the winner in either image slot), labelled by the reward. Returns the folder."""
    path.mkdir(parents=True, exist_ok=True)
    captions = [p for p in prompts for _ in range(per_prompt)]
    seeds = [seed_offset + i for i in range(len(captions))]
    images = generate(model, captions, seeds, num_steps=num_steps, guidance_scale=1.0)
    scores = build_reward(reward_name)(images, captions).float()
    rows = []
    for p in range(len(prompts)):
        members = sorted(range(p * per_prompt, (p + 1) * per_prompt), key=lambda i: -float(scores[i]))
        half = len(members) // 2
        for k, (best, worst) in enumerate(zip(members[:half], members[half:][::-1])):
            first, second = (best, worst) if k % 2 == 0 else (worst, best)
            for i in (first, second):
                save_png(images[i : i + 1], path / f"{i}.png")
            rows.append({"jpg_0": f"{first}.png", "jpg_1": f"{second}.png", "caption": captions[first],
                         "label_0": 1 if scores[first] > scores[second] else 0})
    (path / "metadata.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def _config(out, family="sd", **overrides):
    method_args = {"num_steps": 4, "learning_rate": 1e-2, "guidance_scale": 1.0, "group_size": 4,
                   "rollout_prompts": 2, "pairing": "halves", **overrides.pop("method_args", {})}
    return tiny_run("diffusion_dpo", out, family, method_args, **overrides)


def _train(cfg, family="sd", model=None):
    trainer = Trainer(cfg, model=model or DiffusionModel(tiny_pipeline(family)), progress=False)
    trainer.train()
    return trainer


@pytest.fixture(scope="module")
def tiny_data(tmp_path_factory):
    """8 pairs of the tiny SD model's samples labelled by brightness."""
    model = DiffusionModel(tiny_pipeline("sd"))
    return preference_folder(tmp_path_factory.mktemp("prefs") / "data", model, "brightness", PROMPTS, 8, num_steps=4)


# ---------------------------------------------------------------------------------------------- every family
@pytest.mark.parametrize("family,online", [("sd", False), ("sdxl", False), ("sd3", False), ("sd", True),
                                           pytest.param("flux", True, marks=pytest.mark.slow)])
def test_first_step_is_log_2_and_the_lora_moves(tmp_path, tiny_data, family, online):
    """The model starts equal to its reference (LoRA B = 0), so every logit is 0 and the first loss is exactly
    log 2; the step then moves the LoRA. SDXL pairs carry their images' original sizes and crops as time ids."""
    args = {} if online else {"data": str(tiny_data), "random_crop": True}
    cfg = _config(tmp_path / "run", family, max_steps=1, method_args=args)
    trainer = _train(cfg, family)
    first = _metrics(cfg)[0]
    assert first["loss"] == pytest.approx(math.log(2), abs=1e-7) and first["dpo/implicit_accuracy"] == 0.0
    assert first["skipped"] == 0 and first["grad_norm"] > 0
    assert any(float(p.abs().max()) > 0 for n, p in _weights(trainer).items() if "lora_B" in n)
    if online:
        assert first["dpo/pairs"] == 4  # 2 groups of 4, halves: 2 pairs each


def test_full_fine_tuning_uses_a_frozen_copy_of_the_original_weights_also_after_resume(tmp_path, tiny_data):
    """Full fine-tuning: the reference is a frozen copy of the weights as loaded (so the first loss is exactly log 2).
    A resumed run copies it before the checkpoint's trained weights are loaded: its reference is still the original
    model, not the resumed weights, and it continues bitwise as the uninterrupted run."""

    def cfg(out, steps, **extra):
        return _config(out, max_steps=steps, lora={"enabled": False},
                       method_args={"data": str(tiny_data), "learning_rate": 1e-4}, **extra)

    original = Trainer(cfg(tmp_path / "original", 2), model=DiffusionModel(tiny_pipeline("sd")), progress=False)
    original.setup()
    initial = _weights(original)
    straight = _train(cfg(tmp_path / "a", 2))
    assert _metrics(cfg(tmp_path / "a", 2))[0]["loss"] == pytest.approx(math.log(2), abs=1e-7)
    _train(cfg(tmp_path / "b", 1))
    resumed = _train(cfg(tmp_path / "b", 2, resume="latest"))
    for trainer in (straight, resumed):
        frozen = trainer.objective.frozen
        assert frozen is not None and len(frozen) == len(trainer.params)
        assert all(torch.equal(f, initial[n]) for n, f in zip(trainer.param_names, frozen))
        assert any(not torch.equal(f, p.detach()) for f, p in zip(frozen, trainer.params))
    a, b = _weights(straight), _weights(resumed)
    assert all(torch.equal(a[n], b[n]) for n in a)


def test_an_online_rollout_that_does_not_split_evenly_over_processes_is_refused(tmp_path):
    """Uneven shares of a rollout would gather latents of different sizes and, sharded, make different numbers of
    denoiser calls (collectives) on the processes: 6 samples over batch_size 2 x 2 processes are refused."""
    from align.core.errors import ConfigError
    from align.train.objectives import DiffusionDPOObjective

    trainer = Trainer(_config(tmp_path / "run", method_args={"group_size": 3}), model=DiffusionModel(tiny_pipeline("sd")),
                      progress=False)
    trainer.setup()  # one process: 6 samples in chunks of 2
    trainer.num_processes = 2  # what a two-process launch sees
    with pytest.raises(ConfigError, match=r"rollout of 6 samples .* batch_size x processes = 2 x 2"):
        DiffusionDPOObjective(trainer)


# ---------------------------------------------------------------------------------------------- resume, processes
@pytest.mark.parametrize("source", ["stream", "latent_cache", "online"])
def test_resume_gives_identical_weights(tmp_path, tiny_data, source):
    """2N steps straight == N steps, stop, resume, N steps, bitwise. Offline: 8 pairs, 4 micro-batches of 2 per epoch,
    so the run crosses epochs and the stop falls inside one (the cache shuffles each epoch)."""
    n = 3
    args = {"online": {}, "stream": {"data": str(tiny_data)},
            "latent_cache": {"data": str(tiny_data), "latent_cache": str(tmp_path / "cache")}}[source]

    def cfg(out, steps, **extra):
        return _config(out, max_steps=steps, method_args=args, **extra)

    straight = _train(cfg(tmp_path / "a", 2 * n))
    _train(cfg(tmp_path / "b", n))
    resumed = _train(cfg(tmp_path / "b", 2 * n, resume="latest"))
    a, b = _weights(straight), _weights(resumed)
    for name in a:
        assert torch.equal(a[name], b[name]), name
    if source != "online":
        assert straight.objective.epoch == resumed.objective.epoch == 1
        assert [m["dpo/epoch"] for m in _metrics(cfg(tmp_path / "a", 2 * n))] == [0, 0, 0, 0, 1, 1]


@pytest.mark.slow
@pytest.mark.parametrize("online", [False, True])
def test_two_processes_train_what_one_process_trains(tmp_path, tiny_data, online):
    """Over 2 processes (gloo) == 1 process with the same global batch: offline, each process takes its share of each
    global micro-batch; online, the rollout's rewards and latents are gathered and every process pairs them."""
    from test_faults import two_processes_and_one

    args = {"num_steps": 3, "learning_rate": 1e-2, "guidance_scale": 1.0, "group_size": 4, "rollout_prompts": 2}
    if not online:
        args["data"] = str(tiny_data)
    base = {"method": "diffusion_dpo", "max_steps": 3, "prompts": PROMPTS, "checkpoint_every": 0, "sample_every": 0,
            "num_samples": 1, "lora": {"rank": 2}, "reward": "jpeg_compressibility", "model_recommendations": False,
            "diffusion_dpo": args}
    r0, r1, single = two_processes_and_one(tmp_path, base, 29545 + int(online))
    assert all(torch.equal(r0[k], r1[k]) for k in r0)
    # LoRA B starts at zero. Equal up to float32 summation order, which Adam turns into up to lr on the few weights
    # whose gradient is rounding noise (5 of 1280 measured offline): so the mean difference is compared (2e-4 of the
    # mean update measured); other pairs, levels or noise would differ by O(1)
    moved = torch.cat([single[k].flatten() for k in single if "lora_B" in k]).abs().mean()
    apart = torch.cat([(r0[k] - single[k]).flatten() for k in r0 if "lora_B" in k]).abs().mean()
    assert moved > 1e-3 and apart <= 2e-3 * moved, (apart, moved)


# ---------------------------------------------------------------------------------------------- bad data
def _write(folder, rows, images=True):
    folder.mkdir(parents=True, exist_ok=True)
    if images:
        for name in ("a.png", "b.png"):
            save_png(torch.rand(1, 3, 16, 16), folder / name)
        (folder / "broken.png").write_bytes(b"not an image")
    (folder / "metadata.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return folder


GOOD = {"jpg_0": "a.png", "jpg_1": "b.png", "label_0": 1, "caption": "a red circle"}
BAD_DATA = [
    ([{"image_a": "a.png", "jpg_1": "b.png", "label_0": 1, "caption": "x"}], "has no column 'jpg_0'", "image_0_column"),
    ([GOOD, {**GOOD, "label_0": 2}], "line 2", "label 2 is not one of 1"),
    ([GOOD, GOOD, {**GOOD, "jpg_1": "broken.png"}], "line 3", "jpg_1 could not be decoded"),
]


@pytest.mark.parametrize("rows,where,message", BAD_DATA, ids=["columns", "label", "image"])
def test_bad_preference_data_is_one_line_and_exit_2(tmp_path, capsys, rows, where, message):
    data = _write(tmp_path / "data", rows)
    # the bad row is met when training reaches it (the columns are checked before the first step)
    code = main(["train", "-q", f"output_dir={tmp_path / 'run'}", "max_steps=3", "num_samples=1", "device=cpu",
                 "method=diffusion_dpo", f"diffusion_dpo.data={data}", "batch_size=1", "diffusion_dpo.num_steps=2"])
    err = capsys.readouterr().err
    assert code == 2, err
    assert where in err and message in err and "Traceback" not in err
    assert err.strip().count("\n") == 0, err


def test_bad_rows_are_skipped_and_counted(tmp_path, capsys):
    rows = [GOOD, {**GOOD, "label_0": 2}, {**GOOD, "jpg_0": "broken.png"}, {**GOOD, "label_0": "tie"}, GOOD]
    data = _write(tmp_path / "data", rows)
    run = tmp_path / "run"
    code = main(["train", "-q", f"output_dir={run}", "max_steps=1", "num_samples=1", "device=cpu",
                 "method=diffusion_dpo", f"diffusion_dpo.data={data}", "diffusion_dpo.on_bad_row=skip", "batch_size=2",
                 "diffusion_dpo.num_steps=2"])
    assert code == 0, capsys.readouterr().err
    metrics = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines() if '"loss"' in x]
    # the first micro-batch (2 pairs) has read every row: 2 pairs, 1 tie, 2 bad rows skipped
    assert metrics[0]["data/pairs"] == 2 and metrics[0]["data/ties"] == 1 and metrics[0]["data/skipped_rows"] == 2


# ---------------------------------------------------------------------------------------------- learning
#: the built-in model's recommended DPO settings (align/builtin/shapes/diffusion_align.json, train.diffusion_dpo)
BUILTIN_ARGS = {"num_steps": 8, "learning_rate": 1e-2, "weight_decay": 0.0, "beta": 1000.0, "noisiest_fraction": 0.3,
                "empty_prompt_fraction": 0.0}
OFFLINE_ARGS = BUILTIN_ARGS | {"hflip": False}
ONLINE_ARGS = BUILTIN_ARGS | {"group_size": 8, "rollout_prompts": 2, "pairing": "halves"}


def test_the_learning_tests_train_with_the_builtin_models_recommendations():
    from pathlib import Path

    import align.builtin

    notes = json.loads((Path(align.builtin.__file__).parent / "shapes" / "diffusion_align.json").read_text())
    recommended = notes["recommended"]["train.diffusion_dpo"]
    assert {f"method.{k}": v for k, v in ONLINE_ARGS.items()}.items() <= recommended.items()


def implicit_accuracy(model, data, *, draws=8, resolution=64, beta=1000.0, seed=0) -> float:
    """Fraction of the data set's pairs whose DPO logit, averaged over ``draws`` shared (level, noise) draws, is
    positive: the trained model (LoRA on) denoises the winner better than the reference (LoRA off) does."""
    pairs = list(iter_preference_pairs(data))
    batch = next(encode_pairs(pairs, ImagePreparation(resolution, hflip=False), model.encode_images, len(pairs)))
    pc = model.encode_prompts(batch.captions, guidance=False)
    cond = {k: torch.cat([v, v]) for k, v in pc.cond.items()}
    scheduler, n = model.make_scheduler(), len(pairs)
    g = torch.Generator().manual_seed(seed)
    logits = torch.zeros(n, dtype=torch.float64)
    with torch.no_grad():
        for _ in range(draws):
            lv = sample_training_levels(scheduler, n, g)
            noise = torch.randn(batch.winners.shape, generator=g)
            x_t = noised_pairs(batch.winners, batch.losers, noise, lv.alphas.float(), lv.sigmas.float())
            both = torch.cat([lv.alphas, lv.alphas]).float(), torch.cat([lv.sigmas, lv.sigmas]).float()
            target = denoising_target(torch.cat([batch.winners, batch.losers]), torch.cat([noise, noise]), *both,
                                      "epsilon")
            t = torch.cat([lv.timesteps, lv.timesteps])
            trained = model.denoiser(x_t, t, cond)
            with adapters_disabled(model):
                reference = model.denoiser(x_t, t, cond)
            logits += dpo_loss(trained, reference, target, beta).logits.double()
    return float((logits > 0).double().mean())


def test_offline_dpo_learns_the_preferences_of_a_synthetic_set(tmp_path):
    """16 pairs of the built-in model's samples labelled by brightness: after 16 steps the model ranks the winners
    above the losers relative to the reference (implicit accuracy, averaged logits) on most pairs; before, every
    logit is 0 (the model is the reference)."""
    model = load_model("builtin", device="cpu")
    data = preference_folder(tmp_path / "data", model, "brightness", BUILTIN_PROMPTS, 16)
    cfg = _config(tmp_path / "run", max_steps=16, batch_size=8, prompts=BUILTIN_PROMPTS, lora={"rank": 4},
                  method_args={"data": str(data), "num_steps": 8, "beta": 1000.0, "hflip": False,
                               "empty_prompt_fraction": 0.0})
    Trainer(cfg, model=model, progress=False).train()
    accuracy = implicit_accuracy(model, data)
    with adapters_disabled(model):
        unseen = preference_folder(tmp_path / "unseen", model, "brightness", BUILTIN_PROMPTS, 16, seed_offset=1000)
    held_out = implicit_accuracy(model, unseen)
    print(f"implicit accuracy after 16 steps: {accuracy:.3f} on the 16 training pairs, {held_out:.3f} on 16 unseen")
    assert accuracy >= 0.8 and held_out > 0.5  # 1.0 and 0.75 measured


def _offline_rise(tmp_path, seed):
    """Held-out brightness gain of offline DPO on 32 synthetic pairs (the built-in model's samples of 2 prompts, seeds
    0-63, labelled by brightness), over the base model's seed spread on the held-out seeds 500-515."""
    model = load_model("builtin", device="cpu")
    data = preference_folder(tmp_path / "data", model, "brightness", BUILTIN_PROMPTS, 32)
    cfg = _config(tmp_path / "run", max_steps=45, batch_size=8, prompts=BUILTIN_PROMPTS, lora={"rank": 4}, seed=seed,
                  method_args=OFFLINE_ARGS | {"data": str(data)})
    score = build_reward("brightness")
    before = _heldout(model, cfg, BUILTIN_PROMPTS, score)
    Trainer(cfg, model=model, progress=False).train()
    after = _heldout(model, cfg, BUILTIN_PROMPTS, score)
    gain, spread = float(after.mean() - before.mean()), _seed_spread(before, len(BUILTIN_PROMPTS))
    print(f"offline diffusion_dpo/builtin/brightness (run seed {seed}): gain {gain:.4f} = {gain / spread:.1f} x the "
          f"seed spread {spread:.4f}")
    return gain, spread


@pytest.mark.slow
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_offline_dpo_raises_held_out_brightness_of_the_builtin_model(tmp_path, seed):
    """45 steps of 8 pairs (about 11 epochs of the 32), the built-in model's recommended settings (the noisiest 30 %
    of the timesteps). About 15 s each. Measured over run seeds 0, 1, 2: 6.8x, 10.4x, 5.3x the seed spread (6.8x,
    10.4x, 5.2x at weight decay 1e-2; on a second data set, seeds 1000-1063: 7.3x, 10.9x, 6.1x). With uniform
    timesteps over all levels, 30 steps: -2.7x, 1.9x, 3.6x (the 32 pairs fitted, implicit accuracy 0.9-1.0, yet
    seed 0 got darker); 7.6x, 6.0x, 7.4x at lr 2e-2."""
    gain, spread = _offline_rise(tmp_path, seed)
    assert gain > 3 * spread


def _online_rise(tmp_path, reward, steps, seed=0):
    prompts = BUILTIN_PROMPTS + ["a green triangle on a white background", "a cyan circle on a purple background"]
    cfg = _config(tmp_path / "run", max_steps=steps, batch_size=8, prompts=prompts, reward=reward, lora={"rank": 4},
                  seed=seed, method_args=ONLINE_ARGS)
    model = load_model("builtin", device="cpu")
    score = build_reward(reward)
    before = _heldout(model, cfg, prompts, score)
    Trainer(cfg, model=model, progress=False).train()
    after = _heldout(model, cfg, prompts, score)
    gain, spread = float(after.mean() - before.mean()), _seed_spread(before, len(prompts))
    print(f"online diffusion_dpo/builtin/{reward} (run seed {seed}): gain {gain:.4f} = {gain / spread:.1f} x the seed spread {spread:.4f}")
    return gain, spread


@pytest.mark.slow
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_online_dpo_raises_brightness_of_the_builtin_model(tmp_path, seed):
    """Online DPO (pairs: k-th best with k-th worst of each group of 8), 50 steps, the built-in model's recommended
    settings. About 40-90 s each. Measured over run seeds 0, 1, 2: 6.7x, 14.9x, 5.7x the seed spread (seeds 3, 4:
    4.8x, 5.4x; at 40 steps seeds 0-4 gave 5.4x, 14.5x, 3.6x, 6.1x, 3.5x). With uniform timesteps over all levels
    (30 steps): 3.4x, 0.6x, 4.9x at beta 1000, 4.3x, 0.8x, 4.5x at beta 100, 4.2x, 0.7x, 5.9x best-versus-worst;
    seed 1 learned its pairs (implicit accuracy 0.6-0.8 on fresh ones) without getting brighter."""
    gain, spread = _online_rise(tmp_path, "brightness", 50, seed)
    assert gain > 3 * spread
