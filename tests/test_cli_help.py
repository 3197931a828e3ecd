"""The command line as a newcomer meets it: help that is valid and readable, errors that are one line."""

import importlib
import re

import pytest

from align.cli import COMMANDS, main
from align.core.config import load_config

CONFIG_COMMANDS = {
    "train": "align.train.trainer:TrainConfig",
    "sample": "align.evaluate:SampleConfig",
    "eval": "align.evaluate:EvalConfig",
    "steer": "align.commands.steer:SteerConfig",
    "guide": "align.commands.guide:GuideConfig",
    "demo": "align.demo:DemoConfig",
    "serve-reward": "rewards.server:ServeConfig",
}


def _config_class(path: str):
    module, name = path.split(":")
    return getattr(importlib.import_module(module), name)


def _help(command: str, capsys, columns: int = 100, monkeypatch=None) -> str:
    with pytest.raises(SystemExit) as exit_info:
        main([command, "--help"])
    assert exit_info.value.code == 0
    return capsys.readouterr().out


@pytest.mark.parametrize("command", sorted(CONFIG_COMMANDS))
def test_each_commands_help_example_is_valid_for_it(command, capsys):
    cls = _config_class(CONFIG_COMMANDS[command])
    example = importlib.import_module(f"align.commands.{COMMANDS[command]}").EXAMPLE
    config = load_config(cls, None, example.split())  # raises ConfigError if the example is not accepted
    assert isinstance(config, cls)
    assert example in " ".join(_help(command, capsys).split())  # and it is what --help shows


@pytest.mark.parametrize("command", sorted(CONFIG_COMMANDS) + ["plan"])
def test_help_is_wrapped_to_the_terminal_width(command, capsys, monkeypatch):
    monkeypatch.setenv("COLUMNS", "82")
    text = _help(command, capsys)
    # example command lines are left whole (they are copied, not read)
    long = [line for line in text.splitlines() if len(line) > 80 and not line.startswith("  align ")]
    assert not long, long[:3]


def test_train_help_shows_the_shared_method_fields_once(capsys, monkeypatch):
    monkeypatch.setenv("COLUMNS", "200")
    text = _help("train", capsys)
    # every method has learning_rate; it is listed once, with each method's default
    assert len(re.findall(r"learning_rate \(", text)) == 1
    line = next(ln for ln in text.splitlines() if "learning_rate (" in ln)
    for method, lr in (("draft", "0.0002"), ("alignprop", "0.001"), ("refl", "0.0001")):
        assert f"{method} {lr}" in line
    # a field only one method has stays under that method
    assert "draft.truncation_steps (int, default 1)" in text
    assert "draft_lv.lv_copies (int, default 2)" in text
    assert "draft.learning_rate" not in text
    # each family's own fields once, for its sections only: backprop's loss, policy gradient's clip range
    assert len(re.findall(r"SECTION\.loss \(", text)) == 1 and len(re.findall(r"SECTION\.clip_range \(", text)) == 1
    families = [ln for ln in text.splitlines() if ln.strip().startswith("fields of the sections")]
    assert [ln.split("(")[0].strip() for ln in families] == [
        "fields of the sections draft, draft_lv, alignprop, refl", "fields of the sections ddpo, grpo"]
    assert "grpo.group_size (int, default 24)" in text and "ddpo.rollout_samples (int, default 256)" in text
    line = next(ln for ln in text.splitlines() if "SECTION.num_steps (" in ln)
    assert "ddpo 50" in line and "grpo 10" in line


def test_list_rewards_gives_whole_first_paragraphs(capsys, monkeypatch):
    monkeypatch.setenv("COLUMNS", "100")
    assert main(["eval", "--list-rewards"]) == 0
    text = capsys.readouterr().out
    entries = re.split(r"\n(?=\S)", text.strip())
    clip = next(e for e in entries if e.startswith("clipscore"))
    flat = " ".join(clip.split())
    assert flat.count("(") == flat.count(")")  # not cut mid-parenthesis
    assert "torchmetrics uses weight 100" in flat
    assert " diff. " in f" {flat} "
    jpeg = next(e for e in entries if e.startswith("jpeg_compressibility"))
    assert "black-box" in jpeg
    assert all(len(line) <= 98 for line in text.splitlines())


@pytest.mark.parametrize("command", ["train", "sample", "eval", "steer", "guide", "demo"])
def test_output_dir_that_is_a_file_is_one_line_exit_2(command, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "afile").write_text("")
    code = main([command, "output_dir=afile"])
    err = capsys.readouterr().err
    assert code == 2
    assert err.strip().count("\n") == 0, err
    assert "output_dir='afile' is an existing file; accepted: a folder" in err
    code = main([command, "output_dir=afile/run"])
    err = capsys.readouterr().err
    assert code == 2 and "lies under 'afile', which is a file" in err


def test_steer_with_few_steps_and_flags_after_overrides(tmp_path, capsys):
    """`align steer -p x num_steps=4` needed three resampling fields changed; flags after key=value failed."""
    out = tmp_path / "steer"
    code = main(["steer", "-p", "a red circle on a blue background", "num_steps=4", "fk.num_particles=2", "-q",
                 f"output_dir={out}"])
    assert code == 0, capsys.readouterr().err
    results = __import__("json").loads((out / "results.json").read_text())
    assert [event["step"] for event in results["ancestry"]] == [1, 2, 3]
