"""A reward from a separately installed package is found by name through the entry-point group."""

import subprocess
import sys
import textwrap

import pytest
import torch

from align.core.errors import AlignError
from rewards import ENTRY_POINT_GROUP, available_rewards, build_reward

PYPROJECT = f"""
[build-system]
requires = ["setuptools>=68"]
build-backend = "setuptools.build_meta"

[project]
name = "diffusion-align-redness-plugin"
version = "0.0.1"

[project.entry-points."{ENTRY_POINT_GROUP}"]
redness_plugin = "redness_plugin:Redness"
broken_plugin = "redness_plugin.missing:Nothing"

[tool.setuptools]
packages = ["redness_plugin"]
"""

MODULE = '''
"""A third-party reward: mean of the red channel minus the mean of the others."""
from rewards import Reward


class Redness(Reward):
    name = "redness_plugin"

    def __init__(self, scale=1.0, **kwargs):
        super().__init__(**kwargs)
        self.scale = scale

    def _score(self, images, prompts):
        r, g, b = images.unbind(1)
        return self.scale * (r - (g + b) / 2).mean((1, 2))
'''


@pytest.fixture(scope="module")
def installed_plugin(tmp_path_factory):
    root = tmp_path_factory.mktemp("plugin")
    package = root / "src"
    (package / "redness_plugin").mkdir(parents=True)
    (package / "pyproject.toml").write_text(textwrap.dedent(PYPROJECT))
    (package / "redness_plugin" / "__init__.py").write_text(MODULE)
    target = root / "site"
    result = subprocess.run(
        [sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--no-build-isolation", "--no-index",
         "--target", str(target), str(package)],
        capture_output=True, text=True, timeout=300,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    assert any(p.name.endswith(".dist-info") for p in target.iterdir())
    return target


def test_plugin_reward_found_by_name(installed_plugin, monkeypatch):
    assert "redness_plugin" not in available_rewards()
    monkeypatch.syspath_prepend(str(installed_plugin))
    assert "redness_plugin" in available_rewards()
    reward = build_reward("redness_plugin", scale=2.0)
    images = torch.zeros(2, 3, 4, 4)
    images[0, 0] = 1.0  # pure red
    images[1, 2] = 1.0  # pure blue
    torch.testing.assert_close(reward(images), torch.tensor([2.0, -1.0]))
    assert reward.name == "redness_plugin" and all(not p.requires_grad for p in reward.parameters())
    mixed = build_reward({"redness_plugin": 1.0, "brightness": 1.0})  # composes like a built-in
    assert set(mixed.score(images).info) == {"redness_plugin", "brightness"}


def test_broken_plugin_error_names_the_entry_point(installed_plugin, monkeypatch):
    monkeypatch.syspath_prepend(str(installed_plugin))
    with pytest.raises(AlignError, match=r"'broken_plugin'.*'redness_plugin.missing:Nothing'.*failed to import"):
        build_reward("broken_plugin")
