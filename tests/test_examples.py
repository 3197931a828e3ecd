"""The example configs load and validate with the CLI's config classes (no GPU needed)."""

from pathlib import Path

import pytest

from align.commands.guide import GuideConfig
from align.commands.steer import SteerConfig
from align.core.config import load_config
from align.core.prompts import load_prompts
from align.train.trainer import TrainConfig

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"


@pytest.mark.parametrize(
    "name,cls",
    [("sd15_aesthetic_draft.yaml", TrainConfig), ("sdxl_pickscore_fk.yaml", SteerConfig), ("sd3_rlg.yaml", GuideConfig),
     ("sd35_pickscore_flow_grpo.yaml", TrainConfig), ("sd15_jpeg_ddpo.yaml", TrainConfig),
     ("flux_vlm_grpo_window.yaml", TrainConfig), ("sdxl_full_finetune.yaml", TrainConfig)],
)
def test_example_config_validates(name, cls, monkeypatch):
    monkeypatch.chdir(EXAMPLES.parent)
    config = load_config(cls, EXAMPLES / name)
    prompts = load_prompts(config.prompts)
    assert len(prompts) >= 8


def test_simple_animals_is_the_ddpo_set():
    animals = load_prompts("simple_animals")
    assert len(animals) == 45 and animals[0] == "cat" and "kangaroo" in animals


@pytest.mark.parametrize("name", ["sd35_pickscore_flow_grpo.yaml", "sd15_jpeg_ddpo.yaml", "flux_vlm_grpo_window.yaml"])
def test_policy_gradient_examples_split_their_rollouts_into_whole_optimiser_steps(name, monkeypatch):
    """On the 8 processes the comments assume, every rollout trains a whole number of optimiser steps (the trainer
    refuses a run where it does not), and the reward spec builds the reward the comment names."""
    from rewards.registry import get_reward_factory

    monkeypatch.chdir(EXAMPLES.parent)
    config = load_config(TrainConfig, EXAMPLES / name)
    m = config.method_config
    minibatch = config.batch_size * config.gradient_accumulation_steps * 8
    assert m.rollout_size % minibatch == 0 and m.rollout_size // minibatch in (2, 4)
    names = list(config.reward) if isinstance(config.reward, dict) else [config.reward]
    assert all(get_reward_factory(n) for n in names)
