"""DiffusionNFT on the trainer's one loop: rollouts of the old policy through the policy-gradient machinery, the
old policy's soft update, exact resume, 2 processes == 1, clear errors; rewards that rise on held-out seeds."""


import pytest
import torch
from _threads import one_thread  # noqa: F401
from _train_configs import PROMPTS, tiny_run
from test_policy_gradient_training import _heldout, _metrics, _seed_spread, _weights

from align.builtin.testing import tiny_pipeline
from align.cli import main
from align.core.config import from_dict
from align.core.models import DiffusionModel, load_model
from align.train.nft import old_policy_decay
from align.train.trainer import TrainConfig, Trainer
from rewards import build_reward


def _config(out, family="sd3", **overrides):
    method_args = {"num_steps": 4, "eval_num_steps": 4, "learning_rate": 1e-2, "group_size": 2, "rollout_prompts": 2,
                   **overrides.pop("method_args", {})}
    return tiny_run("diffusion_nft", out, family, method_args, **overrides)


def _train(cfg, family="sd3", reward=None):
    trainer = Trainer(cfg, model=DiffusionModel(tiny_pipeline(family)), reward=reward, progress=False)
    trainer.train()
    return trainer


def _rise(tmp_path, family, reward, method_args, steps, prompts=PROMPTS, batch_size=8):
    """Held-out reward gain over the base model's seed-to-seed spread after ``steps`` optimiser steps."""
    cfg = _config(tmp_path / "run", family, max_steps=steps, batch_size=batch_size, prompts=prompts, reward=reward,
                  method_args={"eval_num_steps": method_args["num_steps"], **method_args})
    model = load_model("builtin", device="cpu") if family == "builtin" else DiffusionModel(tiny_pipeline(family))
    score = build_reward(reward)
    before = _heldout(model, cfg, prompts, score)
    Trainer(cfg, model=model, progress=False).train()
    after = _heldout(model, cfg, prompts, score)
    gain, spread = float(after.mean() - before.mean()), _seed_spread(before, len(prompts))
    print(f"diffusion_nft/{family}/{reward}: gain {gain:.4f} = {gain / spread:.1f} x the seed spread {spread:.4f}")
    return gain, spread


TINY_FLOW = {"group_size": 8, "rollout_prompts": 2, "num_steps": 6, "learning_rate": 3e-2}


def test_nft_raises_brightness_of_the_tiny_flow_model(tmp_path):
    """DiffusionNFT on tiny_pipeline("sd3"): deterministic flow rollouts, CFG-free, the reward a black box."""
    gain, spread = _rise(tmp_path, "sd3", "brightness", TINY_FLOW, 20)
    assert gain > 3 * spread


# ---------------------------------------------------------------------------------------------- the old policy
def test_first_step_old_equals_trained_and_the_old_policy_follows_softly(tmp_path):
    """Step 0: the old policy is the trained one, so the implicit positive and negative predictions coincide (equal
    errors). After rollout 0's step the old policy is updated once, before rollout 1 is sampled, to
    d w0 + (1 - d) w1 with d = old_decay(1): checked against a 1-step run's weights w1."""
    args = {"old_decay_rate": 0.3, "old_decay_max": 0.5}
    one = _train(_config(tmp_path / "one", max_steps=1, method_args=args))
    first = _metrics(one.config)[0]
    assert first["nft/positive_error"] == first["nft/negative_error"] and first["nft/old_decay"] == 0.0
    # rollout 0's old policy was the initial weights, and nothing updated it yet
    fresh = Trainer(_config(tmp_path / "fresh", method_args=args), model=DiffusionModel(tiny_pipeline("sd3")),
                    progress=False)
    fresh.setup()
    w0 = dict(zip(fresh.param_names, fresh.objective.old))
    assert all(torch.equal(w0[n], o) for n, o in zip(one.param_names, one.objective.old))
    w1 = _weights(one)
    two = _train(_config(tmp_path / "two", max_steps=2, method_args=args))
    d = old_policy_decay(1, 0.3, 0.5)
    assert d == pytest.approx(0.3) and _metrics(two.config)[1]["nft/old_decay"] == pytest.approx(d)
    moved = 0.0
    for name, old in zip(two.param_names, two.objective.old):
        torch.testing.assert_close(old, d * w0[name] + (1 - d) * w1[name], rtol=0, atol=1e-6)  # lerp vs this formula: rounding
        moved = max(moved, float((old - w0[name]).abs().max()))
    assert moved > 1e-3


def test_resume_mid_rollout_gives_identical_weights(tmp_path):
    """2N steps straight == N steps, stop, resume, N steps, bitwise: the checkpoint carries the rollout in use (2
    optimiser steps per rollout; the stop falls inside one) and the old policy's weights."""
    n = 3

    def cfg(out, steps, **extra):
        return _config(out, "sd", max_steps=steps, method_args={"optimizer_steps_per_rollout": 2,
                                                                "old_decay_rate": 0.2}, **extra)

    straight = _train(cfg(tmp_path / "a", 2 * n), "sd")
    assert straight.objective.steps_per_rollout == 2 and straight.objective.micro_batches == 1
    _train(cfg(tmp_path / "b", n), "sd")
    resumed = _train(cfg(tmp_path / "b", 2 * n, resume="latest"), "sd")
    a, b = _weights(straight), _weights(resumed)
    for name in a:
        assert torch.equal(a[name], b[name]), name
    for x, y in zip(straight.objective.old, resumed.objective.old):
        assert torch.equal(x, y)
    assert [m["step"] for m in _metrics(cfg(tmp_path / "b", 2 * n))] == list(range(1, 2 * n + 1))


@pytest.mark.slow
def test_two_processes_train_what_one_process_trains(tmp_path):
    """DiffusionNFT over 2 processes (gloo) == 1 process with the same global batch: the rollout is split by
    position, its rewards gathered, the forward-process draws seeded per sample. About 1.5 minutes on 2 cores."""
    from test_faults import two_processes_and_one

    base = {
        "method": "diffusion_nft", "max_steps": 3, "prompts": PROMPTS, "checkpoint_every": 0, "sample_every": 0,
        "num_samples": 1, "lora": {"rank": 2}, "reward": "jpeg_compressibility", "model_recommendations": False,
        "diffusion_nft": {"num_steps": 3, "eval_num_steps": 3, "learning_rate": 1e-2, "group_size": 2,
                          "rollout_prompts": 2, "old_decay_rate": 0.2},
    }
    r0, r1, single = two_processes_and_one(tmp_path, base, 29541)
    assert all(torch.equal(r0[k], r1[k]) for k in r0)
    moved = max(float(single[k].abs().max()) for k in single if "lora_B" in k)
    apart = max(float((r0[k] - single[k]).abs().max()) for k in r0)
    # equal up to float32 summation order (the all-reduce); other samples, levels or noise would differ by O(1)
    assert moved > 1e-3 and apart <= 2e-3 * moved, (apart, moved)


# ---------------------------------------------------------------------------------------------- bad input
BAD = [
    (["diffusion_nft.group_size=1"], "diffusion_nft.group_size=1 gives groups of one sample"),
    (["diffusion_nft.beta=0"], "diffusion_nft.beta=0.0 is out of range"),
    (["diffusion_nft.old_decay_max=1"], "old_decay_max=1"),
    (["gradient_accumulation_steps=2"], "gradient_accumulation_steps=2 does not apply to diffusion_nft"),
    (["diffusion_nft.group_size=3", "diffusion_nft.rollout_prompts=1", "batch_size=2"],
     "diffusion_nft: a rollout of 3 samples (group_size x rollout_prompts) does not split"),
]


@pytest.mark.parametrize("args,message", BAD, ids=[b[1][:40] for b in BAD])
def test_bad_nft_input_is_one_line_and_exit_2(tmp_path, capsys, args, message):
    code = main(["train", "-q", f"output_dir={tmp_path / 'run'}", "max_steps=1", "num_samples=1", "device=cpu",
                 "model_recommendations=false", "method=diffusion_nft", *args])
    err = capsys.readouterr().err
    assert code == 2, err
    assert message in err and "Traceback" not in err
    assert err.strip().count("\n") == 0, err


@pytest.mark.parametrize("method", ["diffusion_nft", "diffusion_dpo"])
def test_plan_says_it_does_not_model_them_and_help_lists_them(capsys, method):
    code = main(["plan", "--method", method])
    err = capsys.readouterr().err
    assert code == 2 and f"method={method!r}: align plan models the reward-backprop methods" in err
    assert "one more copy of the trained weights" in err and err.strip().count("\n") == 0
    with pytest.raises(SystemExit):
        main(["train", "--help"])
    out = capsys.readouterr().out
    assert f"method={method}" in out and f"  {method}: settings of the {method} method." in out and f"  {method}.beta" in out


BUILTIN_PROMPTS = ["a red circle on a blue background", "a yellow square on a black background",
                   "a green triangle on a white background", "a cyan circle on a purple background"]


@pytest.mark.slow
def test_nft_raises_a_black_box_reward_of_the_builtin_model(tmp_path):
    """DiffusionNFT against JPEG compressibility (no gradient) on the built-in model, 8 deterministic DDIM steps,
    16 samples per rollout, 20 optimiser steps: 6.3x the seed spread measured (7.0x at 40 steps and lr 1e-2). About
    2 minutes on 2 shared cores."""
    gain, spread = _rise(tmp_path, "builtin", "jpeg_compressibility",
                         {"group_size": 8, "rollout_prompts": 2, "num_steps": 8, "learning_rate": 2e-2}, 20,
                         prompts=BUILTIN_PROMPTS)
    assert gain > 3 * spread


@pytest.mark.parametrize("method", ["diffusion_nft", "diffusion_dpo"])
def test_deepspeed_full_fine_tuning_is_refused_with_what_is_accepted(tmp_path, method):
    """The old policy (NFT) and the frozen reference (DPO, full fine-tuning) are copies of the trained weights, sharded
    like them under FSDP (tests/test_sharding.py) but not partitioned under DeepSpeed: refused there."""
    from align.core.errors import ConfigError
    from align.train.objectives import OBJECTIVES

    data = {"method": method, "output_dir": str(tmp_path / "run"), "device": "cpu", "lora": {"enabled": False},
            "model_recommendations": False, "batch_size": 2, "prompts": PROMPTS,
            method: {"num_steps": 2, "group_size": 2, "rollout_prompts": 2,
                     **({"kl_weight": 0.0} if method == "diffusion_nft" else {})}}
    cfg = from_dict(TrainConfig, data)
    trainer = Trainer(cfg, model=DiffusionModel(tiny_pipeline("sd")), progress=False)
    trainer.setup()
    trainer.sharding = "deepspeed"  # what a run launched with a DeepSpeed config resolves to
    with pytest.raises(ConfigError, match=f"{method} with sharding='deepspeed'.*accepted: LoRA.*sharding=none or fsdp"):
        OBJECTIVES[method](trainer)
