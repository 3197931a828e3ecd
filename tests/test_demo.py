"""The demo's plumbing on a tiny model: every report artefact, and honest, consistent figures."""

import json

import imageio.v3 as iio
import pytest

from align.builtin.testing import tiny_pipeline
from align.core.errors import AlignError
from align.core.models import DiffusionModel
from align.demo import DemoConfig, _spearman, run_demo


class _RecordedBar:
    """A tqdm stand-in that records each bar's description, total and final count."""

    bars: list = []

    def __init__(self, total=None, desc="", disable=False, **_):
        self.total, self.desc, self.n = total, desc, 0
        _RecordedBar.bars.append(self)

    def update(self, n=1):
        self.n += n

    def close(self):
        self.closed = True


def test_demo_writes_report_and_summary(tmp_path, monkeypatch):
    import align.demo

    monkeypatch.setattr(align.demo, "tqdm", _RecordedBar)
    _RecordedBar.bars = []
    cfg = DemoConfig(
        output_dir=str(tmp_path / "demo"), num_steps=6, train_steps=4, batch_size=2,
        prompts=["a red circle", "a blue square"], heldout_prompts=["a green circle", "a red square", "a blue circle"],
        steer_prompts=2, num_particles=4, guide_seeds=1, eval_seeds=1, train_reward="brightness",
        blackbox_steps=2, blackbox_group_size=2, blackbox_prompts_per_rollout=2, blackbox_num_steps=3,
    )
    summary = run_demo(cfg, model=DiffusionModel(tiny_pipeline("sd")), progress=True)
    # parts 2-4 each have bars whose count reaches their total exactly (honest time estimates; training bars are
    # the trainer's own)
    sweep = len(cfg.guidance_weights) * cfg.num_steps
    assert [(b.desc[:8], b.total, b.n) for b in _RecordedBar.bars] == [
        ("demo 2/4", 3 * cfg.num_steps, 3 * cfg.num_steps), ("demo 3/4", sweep, sweep), ("demo 4/4", sweep, sweep),
    ]
    report = tmp_path / "demo" / "report"
    for name in ("index.html", "finetune_before.png", "finetune_after.png", "reward_curve.png", "steer_fk.png",
                 "steer_best_of_n.png", "fk_particles.gif", "guidance_sweep.png", "reward_vs_w.png",
                 "blackbox_reward_curve.png", "guidance_sweep_blackbox.png", "reward_vs_w_blackbox.png"):
        assert (report / name).is_file(), name
    html = (report / "index.html").read_text()
    for name in ("finetune_before.png", "fk_particles.gif", "reward_vs_w.png"):
        assert f"src='{name}'" in html
    gif = iio.imread(report / "fk_particles.gif", index=None)
    assert gif.shape[0] >= cfg.num_steps  # one frame per step (plus the held last frame)
    saved = json.loads((tmp_path / "demo" / "summary.json").read_text())
    assert saved["checks"] == summary["checks"]
    s = saved["steering"]
    assert s["fk_model_rows"] == s["best_of_n_model_rows"]  # matched compute
    assert s["fk_at_least_best_of_n"] == (s["fk_mean_best"] >= s["best_of_n_mean_best"])
    g = saved["guidance"]
    assert g["weights"] == cfg.guidance_weights and len(g["mean_reward"]) == len(g["weights"])
    assert g["monotone"] == all(b >= a for a, b in zip(g["mean_reward"], g["mean_reward"][1:]))
    assert g["rising_with_w"] == (g["spearman"] >= 0.8 and g["mean_reward"][-1] > g["mean_reward"][0])
    f = saved["finetune"]
    assert f["improved"] == (f["finetuned_mean"] > f["base_mean"])
    assert (tmp_path / "demo" / "train" / "lora" / "pytorch_lora_weights.safetensors").is_file()
    b = saved["blackbox"]  # part 4: GRPO toward JPEG compressibility on a fresh LoRA, then RL guidance over it
    assert b["reward"] == "jpeg_compressibility" and b["train_steps"] == 2 and b["weights"] == cfg.guidance_weights
    assert b["trained_above_base"] == (b["trained_mean"] > b["base_mean"])
    assert b["base_mean"] == b["mean_reward"][0] and b["rising_with_w"] == (b["spearman"] >= 0.8 and b["mean_reward"][-1] > b["mean_reward"][0])
    assert (tmp_path / "demo" / "train_blackbox" / "lora" / "pytorch_lora_weights.safetensors").is_file()
    assert saved["checks"]["blackbox_reward_rises_with_w"] == b["rising_with_w"]


def test_spearman_known_values():
    assert _spearman([0, 1, 2, 3], [1, 2, 3, 4]) == pytest.approx(1.0)
    assert _spearman([0, 1, 2, 3], [4, 3, 2, 1]) == pytest.approx(-1.0)
    assert _spearman([0, 1, 2], [1, 1, 1]) == 0.0


def test_demo_config_errors_name_the_value():
    with pytest.raises(AlignError, match="truncation_steps=30 is out of range"):
        DemoConfig(truncation_steps=30, num_steps=20)
    with pytest.raises(AlignError, match=r"guidance_weights=\[1.0\] needs at least two"):
        DemoConfig(guidance_weights=[1.0])


def test_prompt_fidelity_reads_rendered_scenes():
    from align.builtin import shapes_world as shapes
    from align.demo import _prompt_fidelity

    scenes = shapes.sample_scenes(6, 0)
    images = shapes.render(scenes, size=64, seed=0)
    prompts = [s.prompt for s in scenes]
    assert _prompt_fidelity(prompts, images) == 1.0
    assert _prompt_fidelity(prompts, images.flip(0)) == 0.0
    assert _prompt_fidelity(["a cat"] * 6, images) is None


def test_guidance_sweep_text_says_when_shapes_vanish():
    from align.demo import _over_optimisation_text

    rows = [{"w": w, "mean reward": r, "prompt fidelity": f}
            for w, r, f in ((0.0, 0.5, 1.0), (1.0, 0.6, 0.95), (1.5, 0.7, 0.6), (2.0, 0.72, 0.25))]
    text = _over_optimisation_text(rows, "saturation")
    assert "from w = 1.5 on" in text and "100% at w = 0 to 25% at w = 2" in text and "reward hacking" in text
    steady = [dict(r, **{"prompt fidelity": 0.9}) for r in rows]
    assert "no sign of over-optimisation" in _over_optimisation_text(steady, "saturation")
    no_classifier = [{k: v for k, v in r.items() if k != "prompt fidelity"} for r in rows]
    assert "look at the top rows" in _over_optimisation_text(no_classifier, "saturation")


@pytest.mark.slow
def test_full_demo_on_the_builtin_model(tmp_path):
    """`align demo` as the README runs it (about 5 minutes on 2 shared CPU cores, 4:53 measured): every expectation
    holds, part 4 (GRPO toward a black-box reward, then RL guidance) included."""
    summary = run_demo(DemoConfig(output_dir=str(tmp_path / "demo")), progress=False)
    assert all(summary["checks"].values()), summary["checks"]
    assert summary["finetune"]["prompt_fidelity_base"] >= 0.9
    assert len(summary["guidance"]["prompt_fidelity"]) == len(summary["guidance"]["weights"])
    assert summary["blackbox"]["trained_above_base"] and summary["blackbox"]["rising_with_w"]
