"""align sample / align eval: files written, scores equal to the rewards computed directly."""

import csv
import json
import subprocess
import sys

import numpy as np
import pytest
import torch

from align.builtin.testing import tiny_pipeline
from align.evaluate import read_image_folder
from rewards import build_reward


def _cli(*args):
    return subprocess.run([sys.executable, "-m", "align", *args], capture_output=True, text=True, timeout=300,
                          env={**__import__("os").environ, "HF_HUB_OFFLINE": "1"})


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("m") / "tiny"
    tiny_pipeline("sd").save_pretrained(path)
    return path


def test_sample_then_eval_folder(model_dir, tmp_path):
    out = tmp_path / "samples"
    proc = _cli("sample", "-q", f"model={model_dir}", "prompts=[a red circle, a blue square]", "images_per_prompt=2",
                "num_steps=3", f"output_dir={out}")
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith("4 images written to")
    records = [json.loads(x) for x in (out / "metadata.jsonl").read_text().splitlines()]
    assert [r["prompt"] for r in records] == ["a red circle"] * 2 + ["a blue square"] * 2
    assert [r["seed"] for r in records] == [0, 1, 0, 1]
    assert (out / "grid.png").is_file()

    proc = _cli("eval", "-q", f"images={out}", "rewards=[brightness, jpeg_compressibility]", f"output_dir={tmp_path / 'ev'}")
    assert proc.returncode == 0, proc.stderr
    rows = list(csv.DictReader(open(tmp_path / "ev" / "scores.csv")))
    assert len(rows) == 4 and rows[0]["prompt"] == "a red circle"
    images, prompts, files = read_image_folder(out)
    expected = build_reward("brightness")(images, prompts)
    got = torch.tensor([float(r["brightness"]) for r in rows])
    torch.testing.assert_close(got, expected, atol=1e-6, rtol=0)
    summary = json.loads((tmp_path / "ev" / "scores.json").read_text())["summary"]
    assert summary["brightness"]["mean"] == pytest.approx(float(expected.mean()), abs=1e-6)
    assert summary["jpeg_compressibility"]["count"] == 4 and summary["jpeg_compressibility"]["mean"] < 0
    # scores.json says what was scored: the sample folder's own record of its model and LoRA
    scored = json.loads((tmp_path / "ev" / "scores.json").read_text())["scored"]
    assert scored["model"] == str(model_dir) and scored["lora"] is None and scored["images"] == str(out)
    assert scored["sampling"]["settings"]["num_steps"] == 3 and scored["sampling"]["family"] == "sd"


def test_eval_samples_a_model(model_dir, tmp_path):
    proc = _cli("eval", "-q", f"model={model_dir}", "prompts=[a red circle]", "images_per_prompt=3", "num_steps=2",
                "rewards=[saturation]", f"output_dir={tmp_path / 'ev'}")
    assert proc.returncode == 0, proc.stderr
    table = json.loads((tmp_path / "ev" / "scores.json").read_text())
    assert table["summary"]["saturation"]["count"] == 3
    assert table["scored"]["model"] == str(model_dir) and table["scored"]["lora"] is None
    assert len(list((tmp_path / "ev" / "images").glob("0*.png"))) == 3


def test_read_image_folder_uses_file_names_without_metadata(tmp_path):
    import imageio.v3 as iio

    iio.imwrite(tmp_path / "a_red_circle.png", np.full((8, 8, 3), 255, np.uint8))
    images, prompts, files = read_image_folder(tmp_path)
    assert prompts == ["a red circle"] and images.shape == (1, 3, 8, 8) and float(images.min()) == 1.0


def test_eval_errors_are_clear(tmp_path):
    proc = _cli("eval", f"images={tmp_path / 'nothing'}", f"output_dir={tmp_path / 'ev'}")
    assert proc.returncode == 2 and "is not a folder" in proc.stderr and "Traceback" not in proc.stderr
    proc = _cli("eval", f"images={tmp_path}", f"output_dir={tmp_path / 'ev'}")
    assert proc.returncode == 2 and "holds no images" in proc.stderr
    import imageio.v3 as iio

    iio.imwrite(tmp_path / "x.png", np.zeros((8, 8, 3), np.uint8))
    proc = _cli("eval", "rewards=[brightnes]", f"images={tmp_path}", f"output_dir={tmp_path / 'ev'}")
    assert proc.returncode == 2 and "unknown reward 'brightnes'" in proc.stderr and "Did you mean 'brightness'" in proc.stderr
