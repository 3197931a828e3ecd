"""Nothing lost, nothing silent: non-finite steps, kills at any moment, distributed runs, the monitor."""

import json
import os
import signal
import subprocess
import sys
import textwrap
import time

import pytest
import torch
from safetensors.torch import load_file

from align.builtin.testing import tiny_pipeline
from align.core.config import from_dict
from align.core.errors import AlignError, ConfigError, RewardCrash, RewardError
from align.core.models import DiffusionModel
from align.train.trainer import TrainConfig, Trainer
from rewards import Reward
from rewards.zoo.stats import Brightness

PROMPTS = ["a red circle", "a blue square"]


def _config(out, **overrides):
    data = {
        "method": "draft",
        "output_dir": str(out),
        "max_steps": 4,
        "batch_size": 2,
        "prompts": PROMPTS,
        "reward": "brightness",
        "checkpoint_every": 0,
        "sample_every": 0,
        "num_samples": 2,
        "lora": {"rank": 2},
        "draft": {"num_steps": 3, "learning_rate": 1e-2, "guidance_scale": 3.0},
    }
    data.update(overrides)
    return from_dict(TrainConfig, data)


class ScriptedBrightness(Reward):
    """Brightness, except on the calls listed in ``bad_calls``, which ``mode`` decides:

    ``nan`` (NaN scores in ``bad_rows``), ``unreachable`` (a ConnectionError: a transient fault),
    ``hang`` (sleeps ``hang_s`` first: a timeout when ``timeout`` is set), ``bug`` (a TypeError).
    """

    name = "scripted_brightness"

    def __init__(self, bad_calls, mode="nan", bad_rows=None, hang_s=1.0, **kwargs):
        super().__init__(**kwargs)
        self.bad_calls, self.mode, self.bad_rows, self.hang_s, self.calls = set(bad_calls), mode, bad_rows, hang_s, 0
        self.inner = Brightness()

    def _score(self, images, prompts):
        self.calls += 1
        bad = self.calls in self.bad_calls
        if bad and self.mode == "unreachable":
            raise ConnectionError("reward server unreachable")
        if bad and self.mode == "bug":
            return self.inner._score(images, prompts) + "1"  # TypeError: Tensor + str
        if bad and self.mode == "hang":
            time.sleep(self.hang_s)
        scores = self.inner._score(images, prompts)
        if bad and self.mode == "nan":
            rows = self.bad_rows if self.bad_rows is not None else list(range(scores.shape[0]))
            mask = torch.zeros_like(scores, dtype=torch.bool)
            mask[rows] = True
            scores = torch.where(mask, torch.full_like(scores, float("nan")), scores)
        return scores


def _weights(trainer):
    return [p.detach().clone() for p in trainer.params]


@pytest.mark.parametrize("mode", ["nan", "unreachable"])
def test_nonfinite_or_unreachable_reward_skips_the_step_and_leaves_weights(tmp_path, mode):
    reward = ScriptedBrightness(bad_calls={2}, mode=mode)
    trainer = Trainer(_config(tmp_path / "run"), model=DiffusionModel(tiny_pipeline("sd")), reward=reward, progress=False)
    trainer.setup()
    trainer.train_step()
    before = _weights(trainer)
    metrics = trainer.train_step()
    assert metrics["skipped"] == 1 and trainer.skipped == 1
    assert all(torch.equal(a, b) for a, b in zip(before, _weights(trainer)))
    metrics = trainer.train_step()
    assert metrics["skipped"] == 0 and trainer.consecutive_bad == 0
    assert any(not torch.equal(a, b) for a, b in zip(before, _weights(trainer)))


def test_drop_mode_leaves_out_only_the_bad_sample(tmp_path):
    reward = ScriptedBrightness(bad_calls={1}, bad_rows=[0], on_invalid="drop")
    trainer = Trainer(_config(tmp_path / "run"), model=DiffusionModel(tiny_pipeline("sd")), reward=reward, progress=False)
    trainer.setup()
    before = _weights(trainer)
    metrics = trainer.train_step()
    assert metrics["skipped"] == 0 and metrics["invalid_samples"] == 1
    assert any(not torch.equal(a, b) for a, b in zip(before, _weights(trainer)))


def test_too_many_nonfinite_steps_stop_with_a_checkpoint(tmp_path):
    reward = ScriptedBrightness(bad_calls=set(range(3, 100)))
    cfg = _config(tmp_path / "run", max_steps=10, max_nonfinite_steps=3)
    trainer = Trainer(cfg, model=DiffusionModel(tiny_pipeline("sd")), reward=reward, progress=False)
    # calls 1-2: the step-0 sample grid and step 1; calls 3+ fail
    with pytest.raises(AlignError, match="3 consecutive steps had a non-finite loss") as info:
        trainer.train()
    assert "checkpoints/step-00000004" in str(info.value)
    saved = load_file(tmp_path / "run" / "checkpoints" / "step-00000004" / "trainable.safetensors")
    for name, p in zip(trainer.param_names, trainer.params):
        assert torch.equal(saved[name], p.detach())


# ---------------------------------------------------------------------------------------------
# a reward's bug stops the run at once; its transient faults are retried, dropped and counted


@pytest.mark.parametrize("on_invalid", ["raise", "drop"])
def test_a_reward_bug_stops_training_at_the_first_step(tmp_path, on_invalid):
    # call 1 is the step-0 sample grid, call 2 the first training step
    reward = ScriptedBrightness(bad_calls=set(range(2, 100)), mode="bug", on_invalid=on_invalid, retries=2)
    trainer = Trainer(_config(tmp_path / "run", max_steps=5), model=DiffusionModel(tiny_pipeline("sd")), reward=reward,
                      progress=False)
    with pytest.raises(RewardCrash) as info:
        trainer.train()
    assert isinstance(info.value, AlignError)
    assert str(info.value).startswith("reward 'scripted_brightness' raised TypeError: unsupported operand type")
    assert isinstance(info.value.__cause__, TypeError)
    assert reward.calls == 2 and trainer.step == 0 and trainer.skipped == 0  # not retried, not skipped
    lines = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in lines] == [0]


def _timeout_run(tmp_path, **overrides):
    # chunks of one image, two tries each: calls 1-2 are the step-0 grid, call 3 (sample 0 of step 1)
    # and its retry 4 hang past the timeout, call 5 (sample 1) answers
    reward = ScriptedBrightness(bad_calls={3, 4}, mode="hang", hang_s=1.0, timeout=0.2, retries=1, retry_backoff=0.0,
                                chunk_size=1, on_invalid="drop")
    cfg = _config(tmp_path / "run", **overrides)
    trainer = Trainer(cfg, model=DiffusionModel(tiny_pipeline("sd")), reward=reward, progress=False)
    return trainer, reward


def test_a_timeout_is_retried_then_dropped_counted_and_logged(tmp_path, caplog):
    trainer, reward = _timeout_run(tmp_path, max_steps=2)
    with caplog.at_level("WARNING", logger="rewards"):
        result = trainer.train()
    assert reward.calls == 2 + 3 + 2 + 2  # grid, step 1 (with one retry), step 2, final grid
    assert reward.dropped == 1 and result.skipped_steps == 0
    assert "retry 1/1" in caplog.text and "TimeoutError" in caplog.text and "dropping 1 samples" in caplog.text
    lines = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    steps = {m["step"]: m for m in lines if "loss" in m}
    # step 1 trained on the one sample left
    assert steps[1]["reward/dropped_fraction"] == 0.5 and steps[1]["invalid_samples"] == 1 and steps[1]["skipped"] == 0
    assert steps[2]["reward/dropped_fraction"] == 0.0 and steps[2]["skipped"] == 0


def test_dropping_more_than_the_limit_stops_with_a_checkpoint(tmp_path):
    trainer, reward = _timeout_run(tmp_path, max_steps=5, max_dropped_fraction=0.4)
    trainer.setup()
    start = _weights(trainer)
    with pytest.raises(RewardError) as info:
        trainer.train()
    message = str(info.value)
    assert message.startswith("stopping at step 1: reward 'scripted_brightness' dropped 50% of a batch's samples, "
                              "more than max_dropped_fraction=0.4")
    assert "checkpoints/step-00000001" in message
    saved = load_file(tmp_path / "run" / "checkpoints" / "step-00000001" / "trainable.safetensors")
    for name, p, p0 in zip(trainer.param_names, trainer.params, start):
        assert torch.equal(saved[name], p0) and torch.equal(p.detach(), p0)  # the step was skipped
    last = json.loads((tmp_path / "run" / "metrics.jsonl").read_text().splitlines()[-1])
    assert last["step"] == 1 and last["reward/dropped_fraction"] == 0.5 and last["skipped"] == 1


@pytest.mark.parametrize("value", [-0.1, 1.5, float("nan")])
def test_max_dropped_fraction_is_validated(tmp_path, value):
    with pytest.raises(ConfigError, match=r"max_dropped_fraction=.* accepted: \[0.0, 1.0\]|max_dropped_fraction=nan"):
        _config(tmp_path / "run", max_dropped_fraction=value)


CLI_DRIVER = textwrap.dedent(
    """
    import sys
    from align.cli import main
    from rewards import Reward, register_reward
    from rewards.zoo.stats import Brightness


    class Buggy(Reward):
        name = "buggy"

        def _score(self, images, prompts):
            return Brightness()._score(images, prompts) + "1"


    register_reward("buggy", Buggy)
    sys.exit(main(sys.argv[1:]))
    """
)


def test_cli_reports_a_reward_bug_with_its_traceback_and_status_1(tmp_path):
    tiny_pipeline("sd").save_pretrained(tmp_path / "model")
    script = tmp_path / "driver.py"
    script.write_text(CLI_DRIVER)
    proc = subprocess.run(
        [sys.executable, str(script), "train", "-q", f"model={tmp_path / 'model'}", f"output_dir={tmp_path / 'run'}",
         "reward=buggy", "max_steps=2", "draft.num_steps=2", "prompts=[a red circle]", "num_samples=1", "sample_every=0"],
        capture_output=True, text=True, timeout=300, env={**os.environ, "HF_HUB_OFFLINE": "1"},
    )
    assert proc.returncode == 1, proc.stderr
    lines = proc.stderr.strip().splitlines()
    # the reward's own frames (file and line of the bug), then one line naming the reward
    assert lines[0] == "Traceback (most recent call last):"
    assert f'File "{script}"' in proc.stderr and "return Brightness()._score(images, prompts) + \"1\"" in proc.stderr
    assert lines[-1].startswith("align train: error: reward 'buggy' raised TypeError: unsupported operand type")
    assert "a bug in the reward" in lines[-1]
    assert "trainer.py" not in proc.stderr  # the toolkit's loop does not bury it


# ---------------------------------------------------------------------------------------------
# SIGKILL during training and during a save, then resume: identical final weights

DRIVER = textwrap.dedent(
    """
    import json, os, signal, sys
    import align.train.checkpoint as checkpoint
    from align.core.config import from_dict
    from align.train.trainer import TrainConfig, Trainer

    config = from_dict(TrainConfig, json.loads(sys.argv[1]))
    kill_in_save = int(sys.argv[2])
    if kill_in_save:
        real_save_file = checkpoint.save_file

        def save_file_then_die(tensors, path, *args, **kwargs):
            real_save_file(tensors, path, *args, **kwargs)
            if f"step-{kill_in_save:08d}" in str(path):
                os.kill(os.getpid(), signal.SIGKILL)  # half-written checkpoint folder

        checkpoint.save_file = save_file_then_die
    Trainer(config, progress=False).train()
    """
)


def _run_driver(tmp_path, config: dict, kill_in_save=0, kill_after_step=None):
    script = tmp_path / "driver.py"
    script.write_text(DRIVER)
    proc = subprocess.Popen(
        [sys.executable, str(script), json.dumps(config), str(kill_in_save)],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )
    if kill_after_step is not None:
        metrics = tmp_path / "run" / "metrics.jsonl"
        deadline = time.time() + 300
        while time.time() < deadline and proc.poll() is None:
            if metrics.is_file() and any(
                json.loads(line).get("step", 0) >= kill_after_step and "loss" in line
                for line in metrics.read_text().splitlines()
                if line.strip()
            ):
                os.kill(proc.pid, signal.SIGKILL)
                break
            time.sleep(0.05)
    out, err = proc.communicate(timeout=300)
    return proc.returncode, err


def _final_weights(run):
    return load_file(run / "checkpoints" / "step-00000008" / "trainable.safetensors")


def test_sigkill_during_training_and_during_save_then_resume_is_exact(tmp_path):
    tiny_pipeline("sd").save_pretrained(tmp_path / "model")
    base = {
        "model": str(tmp_path / "model"), "method": "alignprop", "max_steps": 8, "batch_size": 1, "prompts": PROMPTS,
        "checkpoint_every": 2, "keep_checkpoints": 2, "sample_every": 0, "num_samples": 1, "lora": {"rank": 2},
        "alignprop": {"num_steps": 4, "learning_rate": 1e-2}, "device": "cpu",
    }
    straight = tmp_path / "straight"
    straight.mkdir()
    code, err = _run_driver(straight, {**base, "output_dir": str(straight / "run")})
    assert code == 0, err
    expected = _final_weights(straight / "run")

    # killed at a random moment after step 5 (mid-step or mid-save), then resumed
    killed = tmp_path / "killed"
    killed.mkdir()
    code, _ = _run_driver(killed, {**base, "output_dir": str(killed / "run")}, kill_after_step=5)
    assert code == -signal.SIGKILL
    code, err = _run_driver(killed, {**base, "output_dir": str(killed / "run"), "resume": "latest"})
    assert code == 0, err

    # killed while writing checkpoint 6: the partial folder must not be taken for a checkpoint
    in_save = tmp_path / "in_save"
    in_save.mkdir()
    code, _ = _run_driver(in_save, {**base, "output_dir": str(in_save / "run")}, kill_in_save=6)
    assert code == -signal.SIGKILL
    ckpts = in_save / "run" / "checkpoints"
    assert (ckpts / "latest").read_text().strip() == "step-00000004"
    assert any(p.name.startswith(".tmp-") for p in ckpts.iterdir())
    code, err = _run_driver(in_save, {**base, "output_dir": str(in_save / "run"), "resume": "latest"})
    assert code == 0, err
    assert not any(p.name.startswith(".tmp-") for p in ckpts.iterdir())

    for run in (killed / "run", in_save / "run"):
        got = _final_weights(run)
        assert got.keys() == expected.keys()
        for k in expected:
            assert torch.equal(got[k], expected[k]), (run, k)
        assert len([p for p in (run / "checkpoints").iterdir() if p.name.startswith("step-")]) == 2


# ---------------------------------------------------------------------------------------------
# two processes (gloo) == one process with the same global batch

DIST_DRIVER = textwrap.dedent(
    """
    import json, sys
    import torch
    from safetensors.torch import save_file
    from align.core.config import from_dict
    from align.train.trainer import TrainConfig, Trainer

    trainer = Trainer(from_dict(TrainConfig, json.loads(sys.argv[1])), progress=False)
    trainer.train()
    out = sys.argv[2].format(rank=trainer.rank)
    save_file({n: p.detach().contiguous() for n, p in zip(trainer.param_names, trainer.params)}, out)
    """
)


def two_processes_and_one(tmp_path, base: dict, port: int, batch_size: int = 1):
    """Train ``base`` on two processes (torchrun, gloo) with ``batch_size`` each and on one process with twice that
    (the same global batch); returns the final weights of (rank 0, rank 1, the single process)."""
    tiny_pipeline("sd").save_pretrained(tmp_path / "model")
    script = tmp_path / "dist.py"
    script.write_text(DIST_DRIVER)
    base = {**base, "model": str(tmp_path / "model"), "device": "cpu"}
    two = {**base, "batch_size": batch_size, "output_dir": str(tmp_path / "two")}
    proc = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(port),
         str(script), json.dumps(two), str(tmp_path / "two-rank{rank}.safetensors")],
        capture_output=True, text=True, timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    one = {**base, "batch_size": 2 * batch_size, "output_dir": str(tmp_path / "one")}
    proc = subprocess.run(
        [sys.executable, str(script), json.dumps(one), str(tmp_path / "one-rank{rank}.safetensors")],
        capture_output=True, text=True, timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return tuple(load_file(tmp_path / name) for name in ("two-rank0.safetensors", "two-rank1.safetensors",
                                                          "one-rank0.safetensors"))


def test_two_process_training_matches_one_process(tmp_path):
    # a linear schedule with warm-up: the learning rate must advance once per optimiser step on every process
    base = {
        "max_steps": 4, "prompts": PROMPTS, "checkpoint_every": 1,
        "sample_every": 0, "num_samples": 1, "lora": {"rank": 2}, "draft": {"num_steps": 3, "learning_rate": 1e-2},
        "lr_schedule": "linear", "lr_warmup_steps": 2,
    }
    r0, r1, single = two_processes_and_one(tmp_path, base, 29533)
    for k in r0:
        assert torch.equal(r0[k], r1[k]), k  # both ranks hold the same weights
        torch.testing.assert_close(r0[k], single[k], rtol=1e-4, atol=1e-6)
    assert any(not torch.equal(r0[k], load_file(tmp_path / "two" / "checkpoints" / "step-00000002" / "trainable.safetensors")[k]) for k in r0)
    # only rank 0 wrote: one metrics line per step (plus the step-0 sample line)
    lines = {
        run: [json.loads(x) for x in (tmp_path / run / "metrics.jsonl").read_text().splitlines() if '"loss"' in x]
        for run in ("two", "one")
    }
    assert [m["step"] for m in lines["two"]] == [1, 2, 3, 4]
    # the rate each step used: warm-up (step + 1) / 2, then linear decay (4 - step) / (4 - 2)
    expected = [1e-2 * f for f in (0.5, 1.0, 1.0, 0.5)]
    for run in ("two", "one"):
        assert [m["lr"] for m in lines[run]] == pytest.approx(expected, rel=1e-12), run


# ---------------------------------------------------------------------------------------------


def test_reward_hacking_monitor_stops_when_heldout_reward_diverges(tmp_path):
    """Training brightness while monitoring darkness: the held-out reward falls as the training reward rises."""
    cfg = _config(
        tmp_path / "run", max_steps=40, monitor_rewards="darkness", monitor_prompts=["a green circle"],
        monitor_every=2, monitor_patience=2,
    )
    result = Trainer(cfg, model=DiffusionModel(tiny_pipeline("sd")), progress=False).train()
    assert result.stopped_early and "held-out reward" in result.stopped_early
    assert result.steps < 40
    lines = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    monitored = [m for m in lines if "monitor/heldout_reward" in m]
    assert len(monitored) >= 2
    assert monitored[-1]["monitor/heldout_reward"] < monitored[0]["monitor/heldout_reward"]
    assert monitored[-1]["monitor/train_reward"] > monitored[0]["monitor/train_reward"]


def test_bf16_mixed_precision_keeps_lora_in_fp32(tmp_path):
    cfg = _config(tmp_path / "run", mixed_precision="bf16", device="cpu", max_steps=2)
    model = DiffusionModel(tiny_pipeline("sd"))
    trainer = Trainer(cfg, model=model, progress=False)
    trainer.setup()
    assert model.module.conv_in.weight.dtype == torch.bfloat16
    before = _weights(trainer)
    for _ in range(2):
        metrics = trainer.train_step()
        assert metrics["skipped"] == 0
    assert all(p.dtype == torch.float32 for p in trainer.params)
    assert any(not torch.equal(a, b) for a, b in zip(before, _weights(trainer)))
