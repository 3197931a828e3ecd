"""The README's Python section runs as written, on the built-in model, and shows what it promises."""

import re
import time
from pathlib import Path

import pytest

README = Path(__file__).resolve().parents[1] / "README.md"
#: the one change the test makes to the README's code (documented there): hub ids -> the built-in model
SWAP = {
    "stable-diffusion-v1-5/stable-diffusion-v1-5": "builtin",
    "stabilityai/stable-diffusion-xl-base-1.0": "builtin",
}


def python_blocks(text: str) -> list[str]:
    return re.findall(r"```python\n(.*?)```", text, re.S)


def test_readme_python_block_runs_and_training_shows_a_clear_rise(tmp_path, monkeypatch):
    blocks = python_blocks(README.read_text())
    assert blocks, "the README has no Python block"
    code = "\n".join(blocks)
    for hub_id, local in SWAP.items():
        code = code.replace(f'"{hub_id}"', f'"{local}"')
    # any other quoted hub id would try the network here: the swap list must cover it
    code_lines = [line.split("#", 1)[0] for line in code.splitlines()]
    unknown = re.findall(r'"([\w.-]+/[\w.-]+)"', "\n".join(code_lines))
    assert not [u for u in unknown if not u.startswith("runs/")], unknown
    monkeypatch.chdir(tmp_path)
    namespace: dict = {}
    started = time.perf_counter()
    exec(compile(code, str(README), "exec"), namespace)
    seconds = time.perf_counter() - started
    result, out, images = namespace["result"], namespace["out"], namespace["images"]
    # with the built-in model's recommended settings the reward rises clearly (it did not with the
    # paper defaults: 0.5998 -> 0.6020); the grid's images are fixed seeds, so the rise is paired
    assert result.last_reward - result.first_reward > 0.05, (result.first_reward, result.last_reward)
    assert tuple(out.rewards.shape) == (2, 4) and out.final_relative_ess.shape == (2,)
    assert len(images) == 1 and images[0].size == (64, 64)
    assert (tmp_path / "runs" / "readme" / "lora" / "pytorch_lora_weights.safetensors").is_file()
    print(f"README block: {seconds:.0f} s, saturation {result.first_reward:.3f} -> {result.last_reward:.3f}")


@pytest.mark.parametrize("hub_id", sorted(SWAP))
def test_the_swap_is_documented(hub_id):
    assert "tests/test_readme.py" in README.read_text() and SWAP[hub_id] == "builtin"
