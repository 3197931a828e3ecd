"""GenEval: its metadata and templates parsed exactly, its rules as written, exact verdicts from given boxes
for all six task types, and the OWLv2 + CLIP pipeline loaded from folders at toy size."""

import json
import math

import pytest
import torch
import torch.nn.functional as F
from _threads import one_thread  # noqa: F401

from align.builtin.testing import DEFAULT_WORDS, word_tokenizer
from align.core.errors import AlignError, ConfigError, RewardError
from rewards import build_reward
from rewards.testing import tiny_clip
from rewards.zoo.clip import HFClipBackbone
from rewards.zoo.geneval import (
    GENEVAL_COLORS,
    ClipColorClassifier,
    Detection,
    GenEvalReward,
    ObjectClause,
    Owlv2Detector,
    box_iou,
    parse_geneval_prompt,
    read_geneval_metadata,
    relative_position,
    select_detections,
    spec_from_record,
)

#: records of GenEval's prompts/evaluation_metadata.jsonl, verbatim (the tricky ones: articles,
#: plurals of names ending in s, an object named like a colour, the position clause order)
GENEVAL_RECORDS = [
    '{"tag": "single_object", "include": [{"class": "bench", "count": 1}], "prompt": "a photo of a bench"}',
    '{"tag": "single_object", "include": [{"class": "orange", "count": 1}], "prompt": "a photo of an orange"}',
    '{"tag": "single_object", "include": [{"class": "skis", "count": 1}], "prompt": "a photo of a skis"}',
    '{"tag": "two_object", "include": [{"class": "bench", "count": 1}, {"class": "sports ball", "count": 1}], '
    '"prompt": "a photo of a bench and a sports ball"}',
    '{"tag": "counting", "include": [{"class": "bus", "count": 3}], "exclude": [{"class": "bus", "count": 4}], '
    '"prompt": "a photo of three buses"}',
    '{"tag": "counting", "include": [{"class": "sheep", "count": 2}], "exclude": [{"class": "sheep", "count": 3}], '
    '"prompt": "a photo of two sheeps"}',
    '{"tag": "counting", "include": [{"class": "wine glass", "count": 3}], "exclude": [{"class": "wine glass", '
    '"count": 4}], "prompt": "a photo of three wine glasses"}',
    '{"tag": "colors", "include": [{"class": "pizza", "count": 1, "color": "purple"}], "prompt": "a photo of a purple pizza"}',
    '{"tag": "colors", "include": [{"class": "orange", "count": 1, "color": "orange"}], '
    '"prompt": "a photo of an orange orange"}',
    '{"tag": "position", "include": [{"class": "skateboard", "count": 1}, {"class": "bird", "count": 1, '
    '"position": ["below", 0]}], "prompt": "a photo of a bird below a skateboard"}',
    '{"tag": "color_attr", "include": [{"class": "tennis racket", "count": 1, "color": "purple"}, {"class": "sink", '
    '"count": 1, "color": "black"}], "prompt": "a photo of a purple tennis racket and a black sink"}',
]


@pytest.mark.parametrize("line", GENEVAL_RECORDS)
def test_templates_parse_to_the_metadata(line):
    record = spec_from_record(json.loads(line))
    assert parse_geneval_prompt(record.prompt) == record


def test_metadata_file_and_its_errors(tmp_path):
    path = tmp_path / "meta.jsonl"
    path.write_text("\n".join(GENEVAL_RECORDS) + "\n\n")
    specs = read_geneval_metadata(path)
    assert [s.tag for s in specs].count("counting") == 3 and len(specs) == len(GENEVAL_RECORDS)
    assert specs[9].include[1] == ObjectClause("bird", 1, None, ("below", 0))
    path.write_text(GENEVAL_RECORDS[0] + "\nnot json\n")
    with pytest.raises(AlignError, match="line 2 is not JSON"):
        read_geneval_metadata(path)
    bad = [
        ({"tag": "colours", "include": [{"class": "a"}], "prompt": "p"}, "tag='colours' is not a GenEval task"),
        ({"tag": "colors", "include": [{"class": "a", "color": "teal"}], "prompt": "p"}, "color='teal'"),
        ({"tag": "position", "include": [{"class": "a", "position": ["below", 0]}], "prompt": "p"}, "earlier clause"),
        ({"tag": "counting", "include": [{"class": "a", "count": 0}], "prompt": "p"}, "count=0"),
        ({"tag": "counting", "include": [{"class": "a"}], "exclude": [{"class": "a", "color": "red"}], "prompt": "p"},
         "exclude clause takes"),
    ]
    for record, message in bad:
        with pytest.raises(AlignError, match=message):
            spec_from_record(record)


def test_prompts_outside_the_templates_are_not_parsed():
    assert parse_geneval_prompt("a cat sitting on a mat") is None
    assert parse_geneval_prompt("a photo of three") is None
    # an open vocabulary: objects outside COCO parse as written
    spec = parse_geneval_prompt("a photo of a red lighthouse left of a blue kayak")
    assert spec.tag == "position" and spec.include[0] == ObjectClause("kayak", 1, "blue")


def test_geneval_geometry_known_answers():
    assert box_iou((0, 0, 9, 9), (5, 5, 14, 14)) == pytest.approx(25 / 175)  # inclusive pixels: 100 + 100 - 25
    assert box_iou((0, 0, 9, 9), (20, 20, 29, 29)) == 0
    a = Detection((40, 70, 60, 90), 0.9)  # centre (50, 80), 20 x 20
    b = Detection((40, 0, 60, 20), 0.9)  # centre (50, 10)
    # offset (0, 70); y shrunk by 0.1 * (20 + 20) = 4 -> 66 / 70 > 0.5
    assert relative_position(a, b) == {"below"} and relative_position(b, a) == {"above"}
    # offset (0, -8) is eaten by the margin 0.1 * (40 + 40) = 8: no relation
    assert relative_position(Detection((30, 30, 70, 70), 1), Detection((30, 38, 70, 78), 1)) == set()
    # diagonal: offset (30, 30), margins 2: 28 / 42.43 = 0.66 on both axes
    assert relative_position(Detection((75, 75, 85, 85), 1), Detection((45, 45, 55, 55), 1)) == {"right of", "below"}


def test_selection_threshold_order_cap_and_suppression():
    boxes = [Detection((0, 0, 10, 10), 0.5), Detection((1, 1, 11, 11), 0.7), Detection((50, 50, 60, 60), 0.3),
             Detection((80, 80, 90, 90), 0.31)]
    assert [d.score for d in select_detections(boxes, 0.3)] == [0.7, 0.5, 0.31]  # strictly above, by confidence
    assert [d.score for d in select_detections(boxes, 0.3, max_objects=2)] == [0.7, 0.5]
    # IoU of the first two is 100 / 142 = 0.70: suppressed at 0.5, kept at 0.75
    assert [d.score for d in select_detections(boxes, 0.3, max_overlap=0.5)] == [0.7, 0.31]
    assert len(select_detections(boxes, 0.3, max_overlap=0.75)) == 3


class GivenBoxes:
    """A detector stub: the boxes each test gives, per image and object name."""

    def __init__(self, per_image):
        self.per_image = per_image
        self.asked = []

    def __call__(self, images, names):
        self.asked.append(names)
        return [{n: list(self.per_image[i].get(n, [])) for n in image_names} for i, image_names in enumerate(names)]


class GivenColors:
    """A colour stub: the colour each box was given."""

    def __init__(self, colors):
        self.colors = colors

    def __call__(self, image, detections, name):
        return [self.colors[d.box] for d in detections]


def box(x0, y0, x1, y1, score=0.9):
    return Detection((x0, y0, x1, y1), score)


TOP, BOTTOM = box(40, 0, 60, 20), box(40, 70, 60, 90)
# prompt, boxes per name, colours per box, expected verdict, expected info breakdown
CASES = [
    ("a photo of a bench", {"bench": [box(10, 10, 50, 50)]}, {}, True, {"count": 1.0}),
    ("a photo of a bench", {"bench": [box(10, 10, 50, 50, score=0.2)]}, {}, False, {"count": 0.0}),
    ("a photo of a bench and a sports ball", {"bench": [box(0, 0, 40, 40)]}, {}, False, {"count": 0.5}),
    ("a photo of a bench and a sports ball", {"bench": [box(0, 0, 40, 40)], "sports ball": [box(60, 60, 70, 70)]},
     {}, True, {"count": 1.0}),
    ("a photo of three buses", {"bus": [box(0, 0, 20, 20), box(30, 0, 50, 20), box(60, 0, 80, 20)]}, {}, True,
     {"count": 1.0, "exclude": 1.0}),
    ("a photo of three buses", {"bus": [box(0, 0, 20, 20), box(30, 0, 50, 20), box(60, 0, 80, 20), box(0, 60, 20, 80)]},
     {}, False, {"count": 1.0, "exclude": 0.0}),
    # a duplicate of the first bus (IoU 0.82) is suppressed: still three
    ("a photo of three buses", {"bus": [box(0, 0, 20, 20), box(1, 1, 21, 21, 0.8), box(30, 0, 50, 20),
                                        box(60, 0, 80, 20)]}, {}, True, {"count": 1.0, "exclude": 1.0}),
    ("a photo of two buses", {"bus": [box(0, 0, 20, 20)]}, {}, False, {"count": 0.0, "exclude": 1.0}),
    ("a photo of a purple pizza", {"pizza": [box(0, 0, 30, 30)]}, {(0, 0, 30, 30): "purple"}, True,
     {"count": 1.0, "color": 1.0}),
    ("a photo of a purple pizza", {"pizza": [box(0, 0, 30, 30)]}, {(0, 0, 30, 30): "red"}, False,
     {"count": 1.0, "color": 0.0}),
    ("a photo of a purple pizza", {}, {}, False, {"count": 0.0, "color": 0.0}),  # no pizza: the colour check fails too
    ("a photo of a bird below a skateboard", {"skateboard": [TOP], "bird": [BOTTOM]}, {}, True,
     {"count": 1.0, "position": 1.0}),
    ("a photo of a bird below a skateboard", {"skateboard": [BOTTOM], "bird": [TOP]}, {}, False,
     {"count": 1.0, "position": 0.0}),
    ("a photo of a bird below a skateboard", {"bird": [BOTTOM]}, {}, False, {"count": 0.5, "position": 0.0}),
    ("a photo of a purple tennis racket and a black sink", {"tennis racket": [box(0, 0, 30, 30)], "sink": [TOP]},
     {(0, 0, 30, 30): "purple", TOP.box: "black"}, True, {"count": 1.0, "color": 1.0}),
    ("a photo of a purple tennis racket and a black sink", {"tennis racket": [box(0, 0, 30, 30)], "sink": [TOP]},
     {(0, 0, 30, 30): "purple", TOP.box: "white"}, False, {"count": 1.0, "color": 0.5}),
]


@pytest.mark.parametrize("prompt, boxes, colors, correct, breakdown", CASES)
def test_exact_geneval_verdicts_from_given_boxes(prompt, boxes, colors, correct, breakdown):
    detector = GivenBoxes([boxes])
    reward = GenEvalReward(detector, color_model=GivenColors(colors))
    out = reward.score(torch.rand(1, 3, 100, 100), [prompt])
    assert out.scores.item() == float(correct) == out.info["correct"].item()
    for criterion in ("count", "color", "position", "exclude"):
        value = out.info[criterion].item()
        assert value == breakdown[criterion] if criterion in breakdown else math.isnan(value), criterion
    assert detector.asked == [[reward.spec(prompt).classes]]
    fraction = GenEvalReward(detector, color_model=GivenColors(colors), score="fraction").score(
        torch.rand(1, 3, 100, 100), [prompt]).scores.item()
    assert (fraction == 1.0) == correct and 0 <= fraction <= 1


def test_task_types_covered_and_counting_threshold():
    assert {parse_geneval_prompt(p).tag for p, *_ in CASES} == {
        "single_object", "two_object", "counting", "colors", "position", "color_attr"}
    three = {"bus": [box(0, 0, 20, 20), box(30, 0, 50, 20), box(60, 0, 80, 20, score=0.85)]}
    strict = GenEvalReward(GivenBoxes([three]), color_model=GivenColors({}), counting_threshold=0.9)
    assert strict(torch.rand(1, 3, 100, 100), "a photo of three buses").item() == 0.0  # GenEval's 0.9: only two count


def test_batch_metadata_and_errors(tmp_path):
    path = tmp_path / "meta.jsonl"
    # a metadata record overrides the template reading of its prompt (here: an exclude clause of 2)
    path.write_text(json.dumps({"tag": "single_object", "include": [{"class": "cat", "count": 1}],
                                "exclude": [{"class": "cat", "count": 2}], "prompt": "my cat prompt"}))
    boxes = [{"cat": [box(0, 0, 10, 10), box(50, 50, 60, 60)]}, {"dog": [box(0, 0, 10, 10)]}]
    reward = GenEvalReward(GivenBoxes(boxes), color_model=GivenColors({}), metadata=path)
    assert reward.applies_to("my cat prompt") and reward.applies_to("a photo of a dog")
    assert not reward.applies_to("a dog on a beach")
    out = reward.score(torch.rand(2, 3, 64, 64), ["my cat prompt", "a photo of a dog"])
    assert out.scores.tolist() == [0.0, 1.0] and out.info["exclude"][0].item() == 0.0
    with pytest.raises(RewardError, match="not a GenEval prompt"):
        reward(torch.rand(1, 3, 8, 8), "a dog on a beach")
    with pytest.raises(ConfigError, match="score="):
        GenEvalReward(GivenBoxes([]), color_model=GivenColors({}), score="partial")


class ColorWords(torch.nn.Module):
    """A backbone stub: a text embeds as the one-hot of the colour it names; an image as the one-hot of the
    colour prototype nearest to its mean pixel, so the classifier's answer is known."""

    PROTOTYPES = torch.tensor([[1, 0, 0], [1, .5, 0], [1, 1, 0], [0, 1, 0], [0, 0, 1], [.5, 0, .5], [1, .6, .8],
                               [.5, .3, .1], [0, 0, 0], [1, 1, 1]])

    def encode_text(self, texts):
        return torch.stack([F.one_hot(torch.tensor(next(i for i, c in enumerate(GENEVAL_COLORS)
                                                          if f" {c} " in t or f" {c}-" in t)), 10).float() for t in texts])

    def encode_image(self, images):
        mean = images.mean((2, 3))
        return F.one_hot(torch.cdist(mean, self.PROTOTYPES).argmin(-1), 10).float()


def test_colour_classifier_crops_each_box():
    image = torch.zeros(3, 40, 40)
    image[0, :, :20] = 1.0  # left half red
    image[2, :, 20:] = 1.0  # right half blue
    classifier = ClipColorClassifier(ColorWords())
    dets = [Detection((2.4, 5, 17.6, 30), 1), Detection((22, 5, 38, 30), 1), Detection((0, 0, 40, 40), 1)]
    # the whole image averages to (0.5, 0, 0.5): purple
    assert classifier(image, dets, "car") == ["red", "blue", "purple"]
    assert classifier.classifier("car").shape == (10, 10) and "car" in classifier._classifiers


@pytest.fixture(scope="module")
def tiny_owl_folder(tmp_path_factory):
    """A seeded OWLv2 at toy size (32 px images, 8 px patches) with its processor, saved as a model folder."""
    from transformers import Owlv2Config, Owlv2ForObjectDetection
    from transformers.models.owlv2.image_processing_pil_owlv2 import Owlv2ImageProcessorPil

    tokenizer = word_tokenizer(DEFAULT_WORDS, max_length=16)
    common = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4)
    n = len(tokenizer)
    config = Owlv2Config(
        text_config=dict(vocab_size=n, max_position_embeddings=16, bos_token_id=n - 2, eos_token_id=n - 1,
                         pad_token_id=n - 1, **common),
        vision_config=dict(image_size=32, patch_size=8, **common), projection_dim=32,
    )
    torch.manual_seed(0)
    folder = tmp_path_factory.mktemp("owlv2")
    Owlv2ForObjectDetection(config).save_pretrained(folder)
    Owlv2ImageProcessorPil(size={"height": 32, "width": 32}).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def test_owlv2_detector_boxes(tiny_owl_folder):
    detector = Owlv2Detector.from_pretrained(str(tiny_owl_folder), offline=True)
    images = torch.rand(2, 3, 24, 40)
    found = detector(images, [["cat", "dog"], ["bird"]])
    assert set(found[0]) == {"cat", "dog"} and set(found[1]) == {"bird"}
    # every patch's box goes to one of its image's names: (32 / 8)^2 = 16 boxes per image
    assert sum(len(v) for v in found[0].values()) == 16 == len(found[1]["bird"])
    for detections in (*found[0].values(), found[1]["bird"]):
        for d in detections:
            x0, y0, x1, y1 = d.box
            assert 0 <= x0 <= x1 <= 40 and 0 <= y0 <= y1 <= 24 and 0 <= d.score <= 1
    # a query's logits do not depend on the other queries: asking one name alone gives its boxes
    alone = detector(images[1:], [["bird"]])[0]["bird"]
    assert [d.score for d in alone] == pytest.approx([d.score for d in found[1]["bird"]], abs=1e-5)


def test_owlv2_and_clip_end_to_end(tiny_owl_folder):
    clip, tokenizer = tiny_clip(0)
    reward = build_reward("geneval", detector=str(tiny_owl_folder), color_model=HFClipBackbone(clip, tokenizer),
                          threshold=0.0, counting_threshold=0.0, score="fraction", offline=True)
    assert not reward.differentiable
    prompts = ["a photo of a cat", "a photo of a red dog and a blue cat", "a photo of a cat left of a dog",
               "a photo of two birds"]
    out = reward.score(torch.rand(4, 3, 40, 48), prompts)
    assert out.scores.shape == (4,) and torch.isfinite(out.scores).all() and out.valid.all()
    assert ((out.scores >= 0) & (out.scores <= 1)).all()
    assert out.info["count"][0].item() == 1.0  # threshold 0: some box is a cat
    assert torch.isnan(out.info["color"][[0, 2, 3]]).all() and not torch.isnan(out.info["color"][1])
