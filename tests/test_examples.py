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
    [("sd15_aesthetic_draft.yaml", TrainConfig), ("sdxl_pickscore_fk.yaml", SteerConfig), ("sd3_rlg.yaml", GuideConfig)],
)
def test_example_config_validates(name, cls, monkeypatch):
    monkeypatch.chdir(EXAMPLES.parent)
    config = load_config(cls, EXAMPLES / name)
    prompts = load_prompts(config.prompts)
    assert len(prompts) >= 8


def test_simple_animals_is_the_ddpo_set():
    animals = load_prompts("simple_animals")
    assert len(animals) == 45 and animals[0] == "cat" and "kangaroo" in animals
