"""The reward-backprop trainer: rewards rise, LoRA round-trips through diffusers, resume is exact, bad input is clear."""

import json
import subprocess
import sys

import pytest
import torch

from align.builtin.testing import tiny_pipeline
from align.core.config import from_dict
from align.core.models import DiffusionModel
from align.steer.generate import generate, seeded_generators
from align.train.trainer import TrainConfig, Trainer
from rewards import build_reward

PROMPTS = ["a red circle", "a blue square"]
HELDOUT_SEEDS = list(range(500, 516))


def _config(tmp_path, method, family="sd", **overrides):
    method_args = {"num_steps": 8, "learning_rate": 1e-2, "guidance_scale": 3.0, **overrides.pop("method_args", {})}
    data = {
        "method": method,
        "output_dir": str(tmp_path / f"run-{method}-{family}"),
        "max_steps": 30,
        "batch_size": 2,
        "prompts": PROMPTS,
        "reward": "brightness",
        "checkpoint_every": 0,
        "sample_every": 0,
        "num_samples": 2,
        "lora": {"rank": 4},
        "max_sequence_length": 8 if family in ("sd3", "flux") else None,
        method: method_args,
        **overrides,
    }
    return from_dict(TrainConfig, data)


def _heldout_reward(model, cfg):
    m = cfg.method_config
    prompts = [PROMPTS[i % 2] for i in range(len(HELDOUT_SEEDS))]
    images = generate(
        model, prompts, HELDOUT_SEEDS, num_steps=m.num_steps, guidance_scale=m.guidance_scale, eta=m.eta,
        max_sequence_length=cfg.max_sequence_length,
    )
    return build_reward("brightness")(images, prompts)


METHODS = [
    ("draft", {"truncation_steps": 2}),
    ("draft_lv", {}),
    ("alignprop", {}),
    ("refl", {"loss": "negative", "loss_scale": 1.0}),
]


@pytest.mark.parametrize("family", ["sd", "sd3"])
@pytest.mark.parametrize("method,args", METHODS, ids=[m[0] for m in METHODS])
def test_training_raises_heldout_reward(tmp_path, family, method, args):
    cfg = _config(tmp_path, method, family, method_args=args)
    model = DiffusionModel(tiny_pipeline(family))
    before = _heldout_reward(model, cfg)
    result = Trainer(cfg, model=model, progress=False).train()
    after = _heldout_reward(model, cfg)
    gain = float(after.mean() - before.mean())
    # the seed-to-seed spread of the base model's reward sets the scale of a "clear margin"
    spread = float(before.std())
    assert gain > 3 * spread, f"{method}/{family}: gain {gain:.5f} vs spread {spread:.5f}"
    assert result.steps == cfg.max_steps and result.skipped_steps == 0
    cfg_dir = tmp_path / f"run-{method}-{family}"
    lines = [json.loads(line) for line in (cfg_dir / "metrics.jsonl").read_text().splitlines()]
    train_lines = [m for m in lines if "loss" in m]
    assert len(train_lines) == cfg.max_steps
    for key in ("reward_mean", "reward_std", "grad_norm", "lr", "step_time_s", "peak_memory_mb"):
        assert key in train_lines[0]
    assert (cfg_dir / "lora" / "pytorch_lora_weights.safetensors").is_file()
    assert (cfg_dir / "samples" / "step-00000000.png").is_file()


@pytest.mark.floor
@pytest.mark.parametrize("family", ["sd", "sd3"])
def test_saved_lora_reproduces_samples_in_plain_diffusers(tmp_path, family):
    cfg = _config(tmp_path, "draft", family, max_steps=3, method_args={"num_steps": 4})
    model = DiffusionModel(tiny_pipeline(family))
    trainer = Trainer(cfg, model=model, progress=False)
    trainer.train()
    seeds = [3, 4]
    ours = generate(model, PROMPTS, seeds, num_steps=4, guidance_scale=3.0, max_sequence_length=cfg.max_sequence_length)

    fresh = tiny_pipeline(family)
    base_model = DiffusionModel(fresh)
    schedule = base_model.schedule(4)
    latents = schedule.initial_noise(base_model.latent_shape(2, 32, 32), seeded_generators(seeds), "cpu")
    extra = {"max_sequence_length": 8} if family == "sd3" else {}
    with torch.no_grad():
        base = fresh(PROMPTS, latents=latents, num_inference_steps=4, guidance_scale=3.0, output_type="pt", **extra).images
        fresh.load_lora_weights(str(tmp_path / f"run-draft-{family}" / "lora"))
        tuned = fresh(PROMPTS, latents=latents, num_inference_steps=4, guidance_scale=3.0, output_type="pt", **extra).images
    torch.testing.assert_close(tuned.float(), ours, atol=2e-5, rtol=1e-4)
    assert (base.float() - ours).abs().max() > 1e-3


def _trainable(trainer):
    return {n: p.detach().clone() for n, p in zip(trainer.param_names, trainer.params)}


@pytest.mark.parametrize("reward", ["brightness", {"brightness": {"weight": 1.0, "normalize": True}}], ids=["plain", "normalized"])
def test_resume_gives_identical_weights(tmp_path, reward):
    """2N steps straight == N steps, stop, resume, N steps (AlignProp: random window and eta=1 noise;
    with a running-normalised reward, whose statistics travel in the checkpoint)."""
    n = 3
    straight_cfg = _config(tmp_path / "a", "alignprop", max_steps=2 * n, reward=reward, method_args={"num_steps": 6})
    straight = Trainer(straight_cfg, model=DiffusionModel(tiny_pipeline("sd")), progress=False)
    straight.train()

    first_cfg = _config(tmp_path / "b", "alignprop", max_steps=n, reward=reward, method_args={"num_steps": 6})
    Trainer(first_cfg, model=DiffusionModel(tiny_pipeline("sd")), progress=False).train()
    resumed_cfg = _config(tmp_path / "b", "alignprop", max_steps=2 * n, resume="latest", reward=reward, method_args={"num_steps": 6})
    resumed = Trainer(resumed_cfg, model=DiffusionModel(tiny_pipeline("sd")), progress=False)
    resumed.train()

    a, b = _trainable(straight), _trainable(resumed)
    assert a.keys() == b.keys()
    for name in a:
        assert torch.equal(a[name], b[name]), name
    # and the resumed run really continued: its metrics hold every step once
    lines = (tmp_path / "b" / "run-alignprop-sd" / "metrics.jsonl").read_text().splitlines()
    steps = [json.loads(line)["step"] for line in lines if "loss" in json.loads(line)]
    assert steps == list(range(1, 2 * n + 1))


def test_resuming_a_finished_run_changes_nothing(tmp_path):
    """resume=latest on a run at max_steps: no nan first reward, no duplicate eval line, a clear message."""
    first = _config(tmp_path, "draft", max_steps=2, method_args={"num_steps": 2})
    done = Trainer(first, model=DiffusionModel(tiny_pipeline("sd")), progress=False).train()
    metrics = tmp_path / "run-draft-sd" / "metrics.jsonl"
    before = metrics.read_text()
    again = _config(tmp_path, "draft", max_steps=2, resume="latest", method_args={"num_steps": 2})
    result = Trainer(again, model=DiffusionModel(tiny_pipeline("sd")), progress=False).train()
    assert result.already_finished and result.steps == 2
    assert (result.first_reward, result.last_reward) == (done.first_reward, done.last_reward)
    assert result.first_reward == result.first_reward  # not nan
    assert metrics.read_text() == before


def test_a_resumed_run_reports_its_first_reward(tmp_path):
    Trainer(_config(tmp_path, "draft", max_steps=1, method_args={"num_steps": 2}),
            model=DiffusionModel(tiny_pipeline("sd")), progress=False).train()
    more = _config(tmp_path, "draft", max_steps=2, resume="latest", method_args={"num_steps": 2})
    result = Trainer(more, model=DiffusionModel(tiny_pipeline("sd")), progress=False).train()
    step0 = json.loads((tmp_path / "run-draft-sd" / "metrics.jsonl").read_text().splitlines()[0])
    assert step0["step"] == 0 and result.first_reward == step0["eval_reward_mean"]
    assert not result.already_finished and result.steps == 2


def test_builtin_model_recommendations_fill_unset_fields_and_are_printed(tmp_path, capsys):
    from align.core.config import load_config

    config = load_config(TrainConfig, None, [f"output_dir={tmp_path / 'run'}", "draft.guidance_scale=3.0", "device=cpu"])
    trainer = Trainer(config)
    trainer.setup()
    assert trainer.method.learning_rate == 3e-3 and trainer.method.num_steps == 20 and trainer.config.lora.rank == 4
    assert trainer.method.guidance_scale == 3.0  # set by the user: kept
    assert trainer.optimizer.param_groups[0]["lr"] == 3e-3 and trainer.schedule.num_steps == 20
    out = capsys.readouterr()
    assert "using the built-in model's recommended settings: draft.learning_rate=0.003" in out.out + out.err
    off = load_config(TrainConfig, None, [f"output_dir={tmp_path / 'off'}", "model_recommendations=false", "device=cpu"])
    plain = Trainer(off, progress=False)
    plain.setup()
    assert plain.method.learning_rate == 2e-4 and plain.method.num_steps == 50


def test_fresh_run_refuses_existing_checkpoints(tmp_path):
    cfg = _config(tmp_path, "draft", max_steps=1, method_args={"num_steps": 2})
    Trainer(cfg, model=DiffusionModel(tiny_pipeline("sd")), progress=False).train()
    with pytest.raises(ValueError, match="already holds checkpoints; pass resume=latest"):
        Trainer(cfg, model=DiffusionModel(tiny_pipeline("sd")), progress=False).train()


def _cli(*args, cwd=None):
    return subprocess.run(
        [sys.executable, "-m", "align", *args], capture_output=True, text=True, cwd=cwd, timeout=300,
        env={**__import__("os").environ, "HF_HUB_OFFLINE": "1"},
    )


BAD_INPUT = [
    (["lerning_rate=1e-4"], "unknown config key 'lerning_rate'"),
    (["draft.truncation_steps=60", "draft.num_steps=50"], "draft.truncation_steps=60 exceeds num_steps=50; accepted: 1..50"),
    (["draft.learning_rate=-0.0001"], "draft.learning_rate=-0.0001 is out of range"),
    (["draft.sampler=euler_ancestral"], "draft.sampler='euler_ancestral' is not supported; accepted: 'auto', 'ddim', 'ddpm', 'flow'"),
    (["model=/no/such/model", "offline=true"], "model='/no/such/model' does not exist"),
    (["method=dpo"], "method='dpo' is not supported"),
]


@pytest.mark.parametrize("args,message", BAD_INPUT, ids=[b[1][:30] for b in BAD_INPUT])
def test_cli_bad_input_is_a_clear_error(tmp_path, args, message):
    proc = _cli("train", f"output_dir={tmp_path / 'run'}", *args)
    assert proc.returncode == 2, proc.stderr
    assert message in proc.stderr
    assert "Traceback" not in proc.stderr


def test_cli_trains_a_local_model(tmp_path):
    tiny_pipeline("sd").save_pretrained(tmp_path / "model")
    proc = _cli(
        "train", "-q", f"model={tmp_path / 'model'}", f"output_dir={tmp_path / 'run'}", "max_steps=2",
        "draft.num_steps=3", "prompts=[a red circle]", "num_samples=2", "sample_every=0",
    )
    assert proc.returncode == 0, proc.stderr
    assert "LoRA saved to" in proc.stdout
    assert (tmp_path / "run" / "lora" / "pytorch_lora_weights.safetensors").is_file()
    assert json.loads((tmp_path / "run" / "summary.json").read_text())["steps"] == 2


def _train(cfg, family="sd"):
    trainer = Trainer(cfg, model=DiffusionModel(tiny_pipeline(family)), progress=False)
    trainer.train()
    return trainer


def test_accumulation_trains_on_the_same_samples_as_a_larger_batch(tmp_path):
    one = _train(_config(tmp_path / "a", "draft", max_steps=3, batch_size=2, method_args={"num_steps": 4, "truncation_steps": 2}))
    two = _train(_config(tmp_path / "b", "draft", max_steps=3, batch_size=1, gradient_accumulation_steps=2,
                         method_args={"num_steps": 4, "truncation_steps": 2}))
    start = Trainer(_config(tmp_path / "c", "draft", batch_size=2, method_args={"num_steps": 4, "truncation_steps": 2}),
                    model=DiffusionModel(tiny_pipeline("sd")), progress=False)
    start.setup()
    moved = max(float((a - p).detach().abs().max()) for a, p in zip(one.params, start.params))
    apart = max(float((a - b).detach().abs().max()) for a, b in zip(one.params, two.params))
    assert moved > 1e-3
    # Equal up to float32 summation order (one batch of 2 vs two of 1), which Adam amplifies on
    # weights whose gradient is near zero: about 1e-4 of the update; a wrong accumulation is O(1).
    assert apart <= 2e-3 * moved, (apart, moved)


@pytest.mark.floor
def test_text_encoder_lora_is_trained(tmp_path):
    trainer = _train(_config(tmp_path, "draft", max_steps=2, lora={"rank": 2, "text_encoder": True},
                             method_args={"num_steps": 3}))
    text = [(n, p) for n, p in zip(trainer.param_names, trainer.params) if n.startswith("text_encoder")]
    assert text and all("lora" in n for n, _ in text)
    assert any(p.detach().abs().sum() > 0 for n, p in text if "lora_B" in n)  # B starts at zero


def test_full_finetuning_trains_every_denoiser_weight_and_saves_the_model(tmp_path):
    model = DiffusionModel(tiny_pipeline("sd"))
    before = {n: p.detach().clone() for n, p in model.module.named_parameters()}
    cfg = _config(tmp_path, "draft", max_steps=2, lora={"enabled": False}, method_args={"num_steps": 3, "learning_rate": 1e-3})
    trainer = Trainer(cfg, model=model, progress=False)
    trainer.train()
    assert len(trainer.params) == len(before)
    changed = sum(not torch.equal(before[n], p.detach()) for n, p in model.module.named_parameters())
    assert changed > 0.9 * len(before)
    assert not any(p.requires_grad for p in model.pipe.vae.parameters())
    from diffusers import UNet2DConditionModel

    saved = UNet2DConditionModel.from_pretrained(tmp_path / "run-draft-sd" / "unet")
    for (n, p), q in zip(model.module.named_parameters(), saved.parameters()):
        assert torch.equal(p.detach(), q), n


def test_kl_regularizer_is_zero_at_start_then_positive(tmp_path):
    _train(_config(tmp_path, "draft", max_steps=3, method_args={"num_steps": 3, "kl_weight": 0.5}))
    lines = [json.loads(x) for x in (tmp_path / "run-draft-sd" / "metrics.jsonl").read_text().splitlines()]
    kl = [m["kl_regularizer"] for m in lines if "kl_regularizer" in m]
    assert len(kl) == 3
    assert kl[0] == 0.0  # LoRA B starts at zero: trained == frozen predictions
    assert kl[-1] > 0.0


def test_ema_weights_are_what_is_saved(tmp_path):
    from safetensors.torch import load_file

    trainer = _train(_config(tmp_path, "draft", max_steps=3, ema_decay=0.5, method_args={"num_steps": 3}))
    saved = load_file(tmp_path / "run-draft-sd" / "lora" / "pytorch_lora_weights.safetensors")
    ema_norm = sum(float(e.abs().sum()) for e in trainer.ema)
    raw_norm = sum(float(p.detach().abs().sum()) for p in trainer.params)
    saved_norm = sum(float(v.abs().sum()) for v in saved.values())
    assert saved_norm == pytest.approx(ema_norm, rel=1e-5)
    assert abs(saved_norm - raw_norm) > 1e-4 * raw_norm


def test_the_ema_of_bf16_weights_is_kept_and_updated_in_fp32(tmp_path, caplog):
    """Full fine-tuning with bf16 weights: the EMA is fp32 and moves by exactly (1 - decay) of the gap to the new
    weights each step; a bf16 EMA would round most of that move away (bf16 resolves 2^-8 relative)."""
    cfg = _config(tmp_path, "draft", max_steps=1, ema_decay=0.99, mixed_precision="bf16", lora={"enabled": False},
                  method_args={"num_steps": 2, "learning_rate": 1e-3})
    trainer = Trainer(cfg, model=DiffusionModel(tiny_pipeline("sd")), progress=False)
    with caplog.at_level("WARNING", logger="align"):
        trainer.setup()
    assert "steps the denoiser's bfloat16 weights directly (no fp32 master copy)" in caplog.text  # said, not silent
    assert {p.dtype for p in trainer.params} == {torch.bfloat16}
    assert {e.dtype for e in trainer.ema} == {torch.float32}
    before = [e.clone() for e in trainer.ema]
    metrics = trainer.train_step()
    assert metrics["skipped"] == 0
    moved = expected = 0.0
    for e0, e, p in zip(before, trainer.ema, trainer.params):
        target = e0 + 0.01 * (p.detach().double() - e0.double())
        torch.testing.assert_close(e.double(), target, rtol=0, atol=1e-6)
        moved += float((e.double() - e0.double()).abs().sum())
        expected += float((target - e0.double()).abs().sum())
    assert moved > 0.9 * expected > 0  # the update is there, not rounded away
