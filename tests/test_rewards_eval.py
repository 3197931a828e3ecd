"""align eval with the new rewards: each reward only on the prompts it applies to, summaries per prompt
category (GenEval's task types, OCR accuracy) equal to the means computed by hand, worst/best grids."""

import csv
import json
import math

import imageio.v3 as iio
import numpy as np
import pytest
import torch
from _threads import one_thread  # noqa: F401

from align.commands.eval import format_summary
from align.evaluate import EvalConfig, evaluate, extremes, prompt_category, read_image_folder
from rewards import build_reward
from rewards.registry import _REGISTRY, register_reward
from rewards.zoo.geneval import Detection, GenEvalReward
from rewards.zoo.ocr import OCRReward

PROMPTS = [
    "a photo of a cat",  # single_object
    "a photo of a dog",  # single_object
    "a photo of three birds",  # counting
    'a sign that says "OPEN"',  # ocr
    'a mug with "good morning" on it',  # ocr
    "a watercolour landscape",  # other
]
#: what the stub OCR model reads, image by image (only the OCR prompts' images are read)
READ = {3: "open", 4: "good mornin"}
#: one cat box in image 0, none in image 1, three birds in image 2
BOXES = {0: {"cat": [Detection((0, 0, 8, 8), 0.9)]}, 2: {"bird": [Detection((0, 0, 4, 4), 0.9),
                                                                   Detection((6, 6, 10, 10), 0.9),
                                                                   Detection((12, 0, 15, 4), 0.9)]}}


def _levels(images):
    """Which test image this is: its grey level encodes its index."""
    return [round(float(x) * 10) for x in images.mean((1, 2, 3))]


@pytest.fixture(scope="module", autouse=True)
def stub_rewards():
    """An OCR and a GenEval reward whose models are stubs keyed by image, registered like plugins."""

    def ocr_stub(**kwargs) -> OCRReward:
        return OCRReward(lambda images: [READ[i] for i in _levels(images)], **kwargs)

    def detect(images, names):
        return [{n: BOXES.get(i, {}).get(n, []) for n in image_names} for i, image_names in zip(_levels(images), names)]

    def geneval_stub(**kwargs) -> GenEvalReward:
        return GenEvalReward(detect, color_model=lambda image, dets, name: ["red"] * len(dets), **kwargs)

    register_reward("test_ocr_stub", ocr_stub)
    register_reward("test_geneval_stub", geneval_stub)
    yield
    _REGISTRY.pop("test_ocr_stub")
    _REGISTRY.pop("test_geneval_stub")


@pytest.fixture
def folder(tmp_path):
    """Six flat images (grey level i / 10 for image i) with their prompts."""
    images = tmp_path / "images"
    images.mkdir()
    records = []
    for i, prompt in enumerate(PROMPTS):
        name = f"{i:04d}.png"
        iio.imwrite(images / name, np.full((16, 16, 3), round(255 * i / 10), np.uint8))
        records.append(json.dumps({"file_name": name, "prompt": prompt}))
    (images / "metadata.jsonl").write_text("\n".join(records) + "\n")
    return images


def test_prompt_categories():
    assert [prompt_category(p) for p in PROMPTS] == [
        "single_object", "single_object", "counting", "ocr", "ocr", "other"]
    assert prompt_category("a watercolour landscape", {"a watercolour landscape": "position"}) == "position"


def test_rewards_per_image_and_per_category(folder, tmp_path):
    out = tmp_path / "eval"
    config = EvalConfig(images=str(folder), rewards=["brightness", "test_ocr_stub", "test_geneval_stub"],
                        output_dir=str(out), extremes=2)
    table = evaluate(config, progress=False)
    rows = list(csv.DictReader(open(out / "scores.csv")))
    assert [r["category"] for r in rows] == ["single_object", "single_object", "counting", "ocr", "ocr", "other"]
    ocr = [float(r["test_ocr_stub"]) for r in rows]
    geneval = [float(r["test_geneval_stub"]) for r in rows]
    # each reward on the prompts it applies to only
    assert all(math.isnan(v) for v in ocr[:3] + ocr[5:]) and ocr[3] == 1.0 and ocr[4] == pytest.approx(1 - 1 / 11)
    assert geneval[:3] == [1.0, 0.0, 1.0] and all(math.isnan(v) for v in geneval[3:])
    assert [float(r["test_ocr_stub/exact"]) for r in rows[3:5]] == [1.0, 0.0]
    by = table["by_category"]
    assert by["single_object"]["test_geneval_stub"]["mean"] == 0.5 and by["counting"]["test_geneval_stub"]["mean"] == 1.0
    assert table["category_mean"]["test_geneval_stub"] == 0.75  # GenEval's overall: the mean over its tasks
    assert by["ocr"]["test_ocr_stub/exact"]["mean"] == 0.5 and by["ocr"]["test_ocr_stub"]["count"] == 2  # OCR accuracy
    assert "test_ocr_stub" not in by["single_object"] and set(by) == {"single_object", "counting", "ocr", "other"}
    images, prompts, _ = read_image_folder(folder)
    brightness = build_reward("brightness")(images)
    assert by["other"]["brightness"]["mean"] == pytest.approx(float(brightness[5]), abs=1e-6)
    # worst and best per reward, lowest and highest first; the grids are written
    assert [e["file_name"] for e in table["extremes"]["brightness"]["worst"]] == ["0000.png", "0001.png"]
    assert [e["file_name"] for e in table["extremes"]["brightness"]["best"]] == ["0005.png", "0004.png"]
    assert [e["file_name"] for e in table["extremes"]["test_ocr_stub"]["best"]] == ["0003.png"]
    assert [e["file_name"] for e in table["extremes"]["test_ocr_stub"]["worst"]] == ["0004.png"]
    for name in ("brightness", "test_ocr_stub", "test_geneval_stub"):
        grid = iio.imread(out / table["extremes"][name]["grid"])
        assert grid.shape[0] > grid.shape[1] / 2  # two rows
    assert json.loads((out / "scores.json").read_text())["extremes"] == table["extremes"]
    text = format_summary(table)
    assert "mean per prompt category:" in text and "single_object" in text and "mean over categories" in text


def test_extremes_skip_missing_scores():
    values = torch.tensor([0.5, float("nan"), 0.1, 0.9, float("nan")])
    assert extremes(values, 2) == ([2], [3])  # three scored images: one each, never the same on both rows
    assert extremes(torch.tensor([0.3, 0.1, 0.2, 0.4]), 5) == ([1, 2], [3, 0])
    assert extremes(torch.tensor([0.7, float("nan")]), 3) == ([0], [0])
    assert extremes(torch.tensor([float("nan")]), 3) == ([], [])


def test_eval_samples_a_geneval_metadata_file(tmp_path):
    meta = tmp_path / "evaluation_metadata.jsonl"
    records = [{"tag": "colors", "include": [{"class": "circle", "count": 1, "color": "red"}], "prompt": "a red circle"},
               {"tag": "two_object", "include": [{"class": "circle", "count": 1}, {"class": "square", "count": 1}],
                "prompt": "a blue square"}]
    meta.write_text("\n".join(json.dumps(r) for r in records))
    config = EvalConfig(model="builtin", prompts=str(meta), num_steps=2, rewards=["brightness"],
                        output_dir=str(tmp_path / "eval"), device="cpu")
    table = evaluate(config, progress=False)
    # the metadata's tags are the categories, even where the prompt reads otherwise
    assert [r["category"] for r in table["images"]] == ["colors", "two_object"]
    assert [r["prompt"] for r in table["images"]] == ["a red circle", "a blue square"]
