"""GenEval (Ghosh et al. 2023): compositional correctness of an image, from its prompt's structure.

A prompt names objects with counts, colours and relative positions.  GenEval's six task types and
their templates (``prompts/create_prompts.py`` of djghosh13/geneval):

==============  ==================================================  ========================================
task            prompt                                              requirements
==============  ==================================================  ========================================
single_object   a photo of a bench                                  1 bench
two_object      a photo of a bench and a sports ball                1 bench, 1 sports ball
counting        a photo of three buses                              3 buses, and not 4
colors          a photo of a purple pizza                           1 pizza, purple
position        a photo of a bird below a skateboard                1 skateboard; 1 bird below it
color_attr      a photo of a purple tennis racket and a black sink  1 purple tennis racket, 1 black sink
==============  ==================================================  ========================================

Requirements come from GenEval's metadata file (JSONL with ``tag``, ``include`` [{``class``,
``count``, ``color``, ``position``: [relation, index of the include clause]}], ``exclude``,
``prompt``: :func:`read_geneval_metadata`, so its prompt set is used as is) or are parsed from
the prompt text by the same templates (:func:`parse_geneval_prompt`; on all 553 GenEval prompts the
parse equals the metadata).

The verdict follows GenEval's ``evaluate_images.py`` rule for rule (:func:`judge`):

* detections of each class are kept above a confidence threshold (GenEval: 0.3, 0.9 for counting),
  sorted by confidence, at most 16 per class, then de-duplicated (greedy, by IoU);
* an include clause needs ``count`` objects of its class, checks the colour and position of the
  ``count`` most confident ones only; an exclude clause fails when ``count`` or more are found
  (counting prompts exclude count + 1);
* colour: CLIP zero-shot over GenEval's ten colours with its three templates ("a photo of a {c}
  {object}", "a photo of a {c}-colored {object}", "a photo of a {c} object"), on the box's crop;
* position: A is "left of" B when the centres' offset, shrunk on each axis by 0.1 x (the sum of the
  two boxes' widths, heights) and divided by the unshrunk offset's length, is below -0.5 in x
  (right: above 0.5; above / below likewise in y).

Where we differ from GenEval, and why:

* **Detector**: GenEval runs Mask2Former (mmdetection, COCO's 80 classes); we use an
  open-vocabulary detector native in transformers, OWLv2 (``google/owlv2-base-patch16-ensemble``,
  Apache-2.0), queried with "a photo of a {object}" for the prompt's objects only; each box takes
  the best of the prompt's queries.  Any callable with the :class:`Owlv2Detector` signature can
  replace it (Grounding DINO, or Mask2Former through mmdetection).
* **Thresholds**: GenEval's 0.3 / 0.9 are Mask2Former's calibration; 0.9 for counting there
  suppresses its low-confidence duplicates.  OWLv2 returns one box per image patch, so duplicates
  are removed by non-maximum suppression (IoU above ``max_overlap`` = 0.5; GenEval: off) and the
  defaults are 0.3 for every task.  OWLv2's confidences are calibrated differently from
  Mask2Former's: calibrate both thresholds on a few labelled images before comparing numbers with
  published GenEval scores.
* **Colour crops**: GenEval greys out (#999) the pixels outside Mask2Former's instance mask in the
  crop; a box detector has no mask, so the colour model sees the whole box (GenEval's own
  behaviour when a detector gives no mask).

Scores: ``score="correct"`` (default) is GenEval's verdict, 1 or 0 (the mean over a task's images
is GenEval's task accuracy); ``score="fraction"`` is the fraction of GenEval's checks passed (each
include clause's count, colour and position, each exclude clause), 1 exactly when the verdict is
correct: a denser signal for training (Flow-GRPO's reward server gives similar partial credit with
its own formula).  ``info`` holds the breakdown per criterion ("correct", "count", "color",
"position", "exclude": the fraction of that criterion's checks passed, NaN where the prompt has
none).  Black-box: detection and colour classification are thresholded decisions.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from align.core.errors import AlignError, RewardError, check_choice, check_range

from ..base import Reward
from ..loading import from_pretrained
from ..registry import register_reward
from .clip import TextImageBackbone, clip_backbone
from .jpeg import to_uint8_images

GENEVAL_TASKS = ("single_object", "two_object", "counting", "colors", "position", "color_attr")
GENEVAL_COLORS = ("red", "orange", "yellow", "green", "blue", "purple", "pink", "brown", "black", "white")
RELATIONS = ("left of", "right of", "above", "below")
NUMBER_WORDS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten")
#: GenEval's object names (COCO's 80 classes, GenEval's spelling)
COCO_CLASSES = (
    "person", "bicycle", "car", "motorcycle", "airplane", "bus", "train", "truck", "boat", "traffic light",
    "fire hydrant", "stop sign", "parking meter", "bench", "bird", "cat", "dog", "horse", "sheep", "cow",
    "elephant", "bear", "zebra", "giraffe", "backpack", "umbrella", "handbag", "tie", "suitcase", "frisbee",
    "skis", "snowboard", "sports ball", "kite", "baseball bat", "baseball glove", "skateboard", "surfboard",
    "tennis racket", "bottle", "wine glass", "cup", "fork", "knife", "spoon", "bowl", "banana", "apple",
    "sandwich", "orange", "broccoli", "carrot", "hot dog", "pizza", "donut", "cake", "chair", "couch",
    "potted plant", "bed", "dining table", "toilet", "tv", "laptop", "computer mouse", "tv remote",
    "computer keyboard", "cell phone", "microwave", "oven", "toaster", "sink", "refrigerator", "book", "clock",
    "vase", "scissors", "teddy bear", "hair drier", "toothbrush",
)
#: GenEval's evaluation settings (evaluation/evaluate_images.py)
GENEVAL_THRESHOLD = 0.3
GENEVAL_COUNTING_THRESHOLD = 0.9
GENEVAL_MAX_OBJECTS = 16
GENEVAL_POSITION_THRESHOLD = 0.1
#: GenEval's colour prompts (clip_benchmark zero-shot classifier: templates averaged per colour)
COLOR_TEMPLATES = ("a photo of a {color} {object}", "a photo of a {color}-colored {object}", "a photo of a {color} object")

OWLV2_MODEL = "google/owlv2-base-patch16-ensemble"
OWLV2_QUERY = "a photo of a {}"
#: OWLv2 defaults (see the module docstring)
THRESHOLD = 0.3
MAX_OVERLAP = 0.5
#: GenEval's colour model: OpenAI CLIP ViT-L/14
COLOR_CLIP = "openai/clip-vit-large-patch14"
SCORES = ("correct", "fraction")
CRITERIA = ("count", "color", "position", "exclude")


# -- prompt structure ------------------------------------------------------------------------------
@dataclass(frozen=True)
class ObjectClause:
    """``count`` objects named ``name``; optionally of ``color``, and ``position`` = (relation, index of
    the include clause the objects are placed relative to)."""

    name: str
    count: int = 1
    color: str | None = None
    position: tuple[str, int] | None = None


@dataclass(frozen=True)
class GenEvalSpec:
    """A GenEval prompt's requirements: include clauses (all must hold), exclude clauses (none may)."""

    tag: str
    include: tuple[ObjectClause, ...]
    exclude: tuple[ObjectClause, ...] = ()
    prompt: str = ""

    @property
    def classes(self) -> list[str]:
        """The object names the detector must look for, in order of appearance."""
        return list(dict.fromkeys(c.name for c in (*self.include, *self.exclude)))


def _clause(item: Any, where: str, *, allow_extras: bool) -> ObjectClause:
    if not isinstance(item, Mapping) or not isinstance(item.get("class"), str) or not item["class"].strip():
        raise AlignError(f"{where}: {item!r} must be an object with a non-empty 'class'")
    count = item.get("count", 1)
    if isinstance(count, bool) or not isinstance(count, int) or count < 1:
        raise AlignError(f"{where}: count={count!r} must be a positive integer")
    extras = set(item) - {"class", "count"}
    if extras and not allow_extras:
        raise AlignError(f"{where}: an exclude clause takes 'class' and 'count' only; got {sorted(extras)}")
    unknown = extras - {"color", "position"}
    if unknown:
        raise AlignError(f"{where}: unknown keys {sorted(unknown)}; accepted: class, count, color, position")
    color = item.get("color")
    if color is not None and color not in GENEVAL_COLORS:
        raise AlignError(f"{where}: color={color!r} is not one of GenEval's colours {', '.join(GENEVAL_COLORS)}")
    position = item.get("position")
    if position is not None:
        if (not isinstance(position, (list, tuple)) or len(position) != 2 or position[0] not in RELATIONS
                or isinstance(position[1], bool) or not isinstance(position[1], int)):
            raise AlignError(f"{where}: position={position!r} must be [relation, index] with relation in {RELATIONS}")
        position = (position[0], position[1])
    return ObjectClause(item["class"].strip(), count, color, position)


def spec_from_record(record: Mapping[str, Any], where: str = "GenEval metadata") -> GenEvalSpec:
    """A :class:`GenEvalSpec` from one GenEval metadata record (``tag``, ``include``, ``exclude``, ``prompt``)."""
    if not isinstance(record, Mapping):
        raise AlignError(f"{where}: {record!r} must be a JSON object")
    tag = record.get("tag")
    if tag not in GENEVAL_TASKS:
        raise AlignError(f"{where}: tag={tag!r} is not a GenEval task; accepted: {', '.join(GENEVAL_TASKS)}")
    prompt = record.get("prompt")
    if not isinstance(prompt, str) or not prompt.strip():
        raise AlignError(f"{where}: prompt={prompt!r} must be a non-empty string")
    include, exclude = record.get("include"), record.get("exclude", [])
    if not isinstance(include, list) or not include:
        raise AlignError(f"{where}: include={include!r} must be a non-empty list of object clauses")
    if not isinstance(exclude, list):
        raise AlignError(f"{where}: exclude={exclude!r} must be a list of object clauses")
    clauses = tuple(_clause(c, f"{where} include[{i}]", allow_extras=True) for i, c in enumerate(include))
    for i, clause in enumerate(clauses):
        if clause.position is not None and not 0 <= clause.position[1] < i:
            raise AlignError(f"{where} include[{i}]: position index {clause.position[1]} must name an earlier clause")
    excluded = tuple(_clause(c, f"{where} exclude[{i}]", allow_extras=False) for i, c in enumerate(exclude))
    return GenEvalSpec(tag, clauses, excluded, prompt.strip())


def read_geneval_metadata(path: str | Path) -> list[GenEvalSpec]:
    """Every record of a GenEval metadata file (JSON lines; ``evaluation_metadata.jsonl``)."""
    path = Path(path)
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except OSError as exc:
        raise AlignError(f"GenEval metadata {str(path)!r} cannot be read: {exc.strerror or exc}") from None
    specs = []
    for n, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as exc:
            raise AlignError(f"{str(path)!r} line {n} is not JSON: {exc.msg}") from None
        specs.append(spec_from_record(record, f"{str(path)!r} line {n}"))
    if not specs:
        raise AlignError(f"GenEval metadata {str(path)!r} holds no records")
    return specs


def _singular(plural: str, classes: Sequence[str]) -> str:
    """Invert GenEval's plural rule (+"es" after a final s, else +"s"), preferring a known class."""
    candidates = [plural[:-2]] if plural.endswith("ses") else []
    candidates.append(plural[:-1] if plural.endswith("s") else plural)
    known = [c for c in candidates if c in classes]
    return known[0] if known else candidates[0]


def _noun_phrase(text: str, classes: Sequence[str]) -> tuple[str | None, str] | None:
    """'a red car' -> ('red', 'car'); 'an orange' -> (None, 'orange') when 'orange' is a class."""
    match = re.fullmatch(r"an? (.+)", text)
    if match is None:
        return None
    words = match.group(1)
    first, _, rest = words.partition(" ")
    if words not in classes and first in GENEVAL_COLORS and rest:
        return first, rest
    return None, words


_COUNTING = re.compile(rf"a photo of ({'|'.join(NUMBER_WORDS[2:])}) (.+)")
_POSITION = re.compile(rf"a photo of (an? .+?) ({'|'.join(RELATIONS)}) (an? .+)")
_TWO = re.compile(r"a photo of (an? .+?) and (an? .+)")
_ONE = re.compile(r"a photo of (an? .+)")


def parse_geneval_prompt(prompt: str, classes: Sequence[str] = COCO_CLASSES) -> GenEvalSpec | None:
    """Requirements of a prompt written with GenEval's templates (see the module docstring), or None.

    ``classes`` resolves what the templates leave ambiguous (plurals, an object named like a
    colour: "a photo of an orange"); other object names are accepted as written.
    """
    text = " ".join(prompt.strip().lower().split())
    if match := _COUNTING.fullmatch(text):
        count = NUMBER_WORDS.index(match.group(1))
        name = _singular(match.group(2), classes)
        return GenEvalSpec("counting", (ObjectClause(name, count),), (ObjectClause(name, count + 1),), prompt)
    if match := _POSITION.fullmatch(text):
        a, relation, b = _noun_phrase(match.group(1), classes), match.group(2), _noun_phrase(match.group(3), classes)
        if a is None or b is None:
            return None
        include = (ObjectClause(b[1], 1, b[0]), ObjectClause(a[1], 1, a[0], (relation, 0)))
        return GenEvalSpec("position", include, (), prompt)
    if match := _TWO.fullmatch(text):
        a, b = _noun_phrase(match.group(1), classes), _noun_phrase(match.group(2), classes)
        if a is None or b is None:
            return None
        tag = "color_attr" if a[0] or b[0] else "two_object"
        return GenEvalSpec(tag, (ObjectClause(a[1], 1, a[0]), ObjectClause(b[1], 1, b[0])), (), prompt)
    if match := _ONE.fullmatch(text):
        a = _noun_phrase(match.group(1), classes)
        if a is None:
            return None
        return GenEvalSpec("colors" if a[0] else "single_object", (ObjectClause(a[1], 1, a[0]),), (), prompt)
    return None


# -- GenEval's rules -------------------------------------------------------------------------------
@dataclass(frozen=True)
class Detection:
    """A detected object: box (x0, y0, x1, y1) in pixels and confidence."""

    box: tuple[float, float, float, float]
    score: float


def box_iou(a: Sequence[float], b: Sequence[float]) -> float:
    """Intersection over union with GenEval's inclusive pixel convention (width = x1 - x0 + 1)."""

    def area(box: Sequence[float]) -> float:
        return max(box[2] - box[0] + 1, 0) * max(box[3] - box[1] + 1, 0)

    inter = area((max(a[0], b[0]), max(a[1], b[1]), min(a[2], b[2]), min(a[3], b[3])))
    union = area(a) + area(b) - inter
    return inter / union if union else 0.0


def select_detections(
    detections: Sequence[Detection], threshold: float, max_objects: int = GENEVAL_MAX_OBJECTS, max_overlap: float = 1.0
) -> list[Detection]:
    """GenEval's filter: confidence above ``threshold``, most confident first, at most ``max_objects``,
    then greedy suppression of boxes overlapping a kept one by IoU ``max_overlap`` or more (1: off)."""
    ranked = sorted((d for d in detections if d.score > threshold), key=lambda d: -d.score)[:max_objects]
    kept: list[Detection] = []
    while ranked:
        best = ranked.pop(0)
        kept.append(best)
        if max_overlap < 1:
            ranked = [d for d in ranked if box_iou(best.box, d.box) < max_overlap]
    return kept


def relative_position(a: Detection, b: Detection, threshold: float = GENEVAL_POSITION_THRESHOLD) -> set[str]:
    """Where A lies relative to B: a subset of {"left of", "right of", "above", "below"} (GenEval's rule)."""
    center_a = ((a.box[0] + a.box[2]) / 2, (a.box[1] + a.box[3]) / 2)
    center_b = ((b.box[0] + b.box[2]) / 2, (b.box[1] + b.box[3]) / 2)
    size_a = (abs(a.box[2] - a.box[0]), abs(a.box[3] - a.box[1]))
    size_b = (abs(b.box[2] - b.box[0]), abs(b.box[3] - b.box[1]))
    offset = [center_a[k] - center_b[k] for k in range(2)]
    shrunk = [max(abs(offset[k]) - threshold * (size_a[k] + size_b[k]), 0.0) * math.copysign(1.0, offset[k])
              if offset[k] else 0.0 for k in range(2)]
    if all(abs(s) < 1e-3 for s in shrunk):
        return set()
    norm = math.hypot(*offset)
    dx, dy = shrunk[0] / norm, shrunk[1] / norm
    relations = set()
    if dx < -0.5:
        relations.add("left of")
    if dx > 0.5:
        relations.add("right of")
    if dy < -0.5:
        relations.add("above")
    if dy > 0.5:
        relations.add("below")
    return relations


@dataclass
class Verdict:
    """GenEval's verdict on one image, with the outcome of every check and the reasons for failures."""

    correct: bool
    checks: dict[str, list[bool]] = field(default_factory=lambda: {c: [] for c in CRITERIA})
    reasons: list[str] = field(default_factory=list)

    @property
    def fraction(self) -> float:
        """Fraction of all checks passed (1 exactly when correct)."""
        outcomes = [ok for results in self.checks.values() for ok in results]
        return sum(outcomes) / len(outcomes) if outcomes else float(self.correct)

    def criterion(self, name: str) -> float:
        """Fraction of the checks of one criterion passed; NaN where the prompt has none."""
        results = self.checks[name]
        return sum(results) / len(results) if results else math.nan


ColorsOf = Callable[[str, Sequence[Detection]], list[str]]


def judge(
    spec: GenEvalSpec,
    objects: Mapping[str, Sequence[Detection]],
    colors_of: ColorsOf,
    position_threshold: float = GENEVAL_POSITION_THRESHOLD,
) -> Verdict:
    """GenEval's ``evaluate``: ``objects`` maps names to the kept detections (most confident first);
    ``colors_of(name, detections)`` names the colour of each detection.

    A colour or position check that GenEval skips because an earlier check of the clause failed
    counts as failed, so that :attr:`Verdict.fraction` is 1 exactly when the verdict is correct.
    """
    verdict = Verdict(correct=True)
    matched: list[Sequence[Detection] | None] = []
    for clause in spec.include:
        found = list(objects.get(clause.name, []))[: clause.count]
        ok = len(found) >= clause.count
        verdict.checks["count"].append(ok)
        if not ok:
            verdict.reasons.append(f"expected {clause.name}>={clause.count}, found {len(found)}")
        if clause.color is not None:
            if ok:
                colors = colors_of(clause.name, found)
                ok = colors.count(clause.color) >= clause.count
                if not ok:
                    seen = ", ".join(f"{colors.count(c)} {c}" for c in GENEVAL_COLORS if c in colors)
                    verdict.reasons.append(f"expected {clause.color} {clause.name}>={clause.count}, found {seen}")
            verdict.checks["color"].append(ok)
        if clause.position is not None:
            relation, target = clause.position
            targets = matched[target] if ok else None
            if ok and targets is None:
                ok = False
                verdict.reasons.append(f"no target for {clause.name} to be {relation}")
            elif ok:
                for obj in found:
                    bad = next((t for t in targets if relation not in relative_position(obj, t, position_threshold)), None)
                    if bad is not None:
                        found_rel = " and ".join(sorted(relative_position(obj, bad, position_threshold))) or "no relation to"
                        verdict.reasons.append(f"expected {clause.name} {relation} target, found {found_rel} target")
                        ok = False
                        break
            verdict.checks["position"].append(ok)
        verdict.correct &= ok
        matched.append(found if ok else None)
    for clause in spec.exclude:
        n = len(objects.get(clause.name, []))
        ok = n < clause.count
        verdict.checks["exclude"].append(ok)
        if not ok:
            verdict.reasons.append(f"expected {clause.name}<{clause.count}, found {n}")
        verdict.correct &= ok
    return verdict


# -- models -----------------------------------------------------------------------------------------
Detector = Callable[[Tensor, list[list[str]]], list[dict[str, list[Detection]]]]


class Owlv2Detector(nn.Module):
    """OWLv2 open-vocabulary detection: ``detector(images, names per image) -> [{name: [Detection]}]``.

    Each image is padded to a square (grey, bottom and right: OWLv2's preprocessing, by its
    image processor) and each predicted box (one per image patch) is assigned the best of that
    image's queries ("a photo of a {name}"), with the sigmoid of its logit as confidence.  All
    boxes are returned; thresholds are the caller's.
    """

    def __init__(self, model: nn.Module, image_processor, tokenizer, *, query: str = OWLV2_QUERY):
        super().__init__()
        self.model = model
        self.image_processor = image_processor
        self.tokenizer = tokenizer
        self.query = query

    @classmethod
    def from_pretrained(cls, source: str = OWLV2_MODEL, *, offline: bool | None = None,
                        revision: str | None = None) -> Owlv2Detector:
        from transformers import AutoImageProcessor, AutoTokenizer, Owlv2ForObjectDetection

        model = from_pretrained(Owlv2ForObjectDetection, source, offline=offline, revision=revision)
        image_processor = from_pretrained(AutoImageProcessor, source, offline=offline, revision=revision)
        tokenizer = from_pretrained(AutoTokenizer, source, offline=offline, revision=revision)
        return cls(model.eval(), image_processor, tokenizer)

    def forward(self, images: Tensor, names: list[list[str]]) -> list[dict[str, list[Detection]]]:
        parameter = next(self.model.parameters())
        vocabulary = list(dict.fromkeys(n for image_names in names for n in image_names))
        if not vocabulary:
            return [{} for _ in names]
        pixels = self.image_processor(to_uint8_images(images), return_tensors="pt").pixel_values
        max_length = self.model.config.text_config.max_position_embeddings
        tokens = self.tokenizer([self.query.format(n) for n in vocabulary], padding="max_length",
                                truncation=True, max_length=max_length, return_tensors="pt")
        batch = images.shape[0]
        # OWLv2 takes [batch * queries, length]: every image is asked the whole vocabulary, and each
        # box then picks among its own image's names (a query's logits do not depend on the others)
        with torch.no_grad():
            out = self.model(
                input_ids=tokens.input_ids.repeat(batch, 1).to(parameter.device),
                attention_mask=tokens.attention_mask.repeat(batch, 1).to(parameter.device),
                pixel_values=pixels.to(parameter.device, parameter.dtype),
            )
        probs = out.logits.float().sigmoid().cpu()  # [B, patches, vocabulary]
        centers = out.pred_boxes.float().cpu()  # [B, patches, 4]: cx, cy, w, h relative to the padded square
        height, width = images.shape[-2:]
        side = max(height, width)
        results = []
        for i, image_names in enumerate(names):
            columns = [vocabulary.index(n) for n in dict.fromkeys(image_names)]
            found: dict[str, list[Detection]] = {n: [] for n in dict.fromkeys(image_names)}
            if columns:
                score, best = probs[i][:, columns].max(-1)
                cx, cy, w, h = centers[i].unbind(-1)
                x0 = ((cx - w / 2) * side).clamp(0, width)
                y0 = ((cy - h / 2) * side).clamp(0, height)
                x1 = ((cx + w / 2) * side).clamp(0, width)
                y1 = ((cy + h / 2) * side).clamp(0, height)
                for p in range(probs.shape[1]):
                    name = vocabulary[columns[int(best[p])]]
                    found[name].append(Detection((float(x0[p]), float(y0[p]), float(x1[p]), float(y1[p])), float(score[p])))
            results.append(found)
        return results


class ClipColorClassifier(nn.Module):
    """GenEval's colour classifier: CLIP zero-shot over :data:`GENEVAL_COLORS` on each box's crop.

    Per object name, the text embeddings of the three :data:`COLOR_TEMPLATES` are normalised,
    averaged per colour and normalised again (clip_benchmark's zero-shot classifier); a crop takes
    the colour of highest cosine.  Crops round the box to whole pixels (as PIL's ``crop`` does).
    """

    def __init__(self, backbone: nn.Module):
        super().__init__()
        self.backbone = backbone
        self._classifiers: dict[str, Tensor] = {}

    def classifier(self, name: str) -> Tensor:
        """Unit colour embeddings [colours, D] for objects called ``name`` (cached)."""
        if name not in self._classifiers:
            texts = [t.format(color=c, object=name) for c in GENEVAL_COLORS for t in COLOR_TEMPLATES]
            embeddings = F.normalize(self.backbone.encode_text(texts).float(), dim=-1)
            per_color = embeddings.view(len(GENEVAL_COLORS), len(COLOR_TEMPLATES), -1).mean(1)
            self._classifiers[name] = F.normalize(per_color, dim=-1)
        return self._classifiers[name]

    def forward(self, image: Tensor, detections: Sequence[Detection], name: str) -> list[str]:
        if not detections:
            return []
        height, width = image.shape[-2:]
        features = []
        for d in detections:
            x0, y0, x1, y1 = (round(v) for v in d.box)
            x0, y0 = min(max(x0, 0), width - 1), min(max(y0, 0), height - 1)
            x1, y1 = max(min(x1, width), x0 + 1), max(min(y1, height), y0 + 1)
            with torch.no_grad():
                features.append(self.backbone.encode_image(image[None, :, y0:y1, x0:x1]).float())
        logits = F.normalize(torch.cat(features), dim=-1) @ self.classifier(name).to(features[0].device).T
        return [GENEVAL_COLORS[int(k)] for k in logits.argmax(-1)]


ColorClassifier = Callable[[Tensor, Sequence[Detection], str], list[str]]


@register_reward("geneval")
class GenEvalReward(Reward):
    """GenEval's compositional verdict (objects, counts, colours, positions) with an open-vocabulary
    detector; 1 if the image satisfies the prompt, else 0 (or the fraction of checks passed).

    Args:
        detector: OWLv2 hub id / local folder (default ``google/owlv2-base-patch16-ensemble``) or a
            callable ``(images, names per image) -> [{name: [Detection]}]``.
        color_model: CLIP hub id / folder for colours (default ``openai/clip-vit-large-patch14``, as
            GenEval), a CLIP backbone (:mod:`rewards.zoo.clip`), or a callable
            ``(image [3, H, W], detections, name) -> colours``.
        metadata: a GenEval metadata JSONL; its prompts are judged by their records, others parsed.
        score: "correct" (GenEval's 0/1 verdict) or "fraction" (of checks passed).
        threshold: detection confidence kept (all tasks but counting).
        counting_threshold: detection confidence kept for counting prompts.
        max_objects: most detections kept per object name.
        max_overlap: IoU at or above which a less confident box is dropped as a duplicate (1: no suppression).
        position_threshold: GenEval's margin, a fraction of the boxes' summed sizes.
        classes: known object names, which resolve what the templates leave ambiguous (default: GenEval's 80).
        offline, revision: hub loading.
    """

    name = "geneval"
    differentiable = False

    def __init__(
        self,
        detector: str | Detector = OWLV2_MODEL,
        *,
        color_model: str | TextImageBackbone | ColorClassifier = COLOR_CLIP,
        metadata: str | Path | None = None,
        score: str = "correct",
        threshold: float = THRESHOLD,
        counting_threshold: float = THRESHOLD,
        max_objects: int = GENEVAL_MAX_OBJECTS,
        max_overlap: float = MAX_OVERLAP,
        position_threshold: float = GENEVAL_POSITION_THRESHOLD,
        classes: Sequence[str] = COCO_CLASSES,
        offline: bool | None = None,
        revision: str | None = None,
        **kwargs,
    ):
        super().__init__(**kwargs)
        check_choice("score", score, SCORES)
        for field_name, value in (("threshold", threshold), ("counting_threshold", counting_threshold)):
            check_range(field_name, value, 0, 1)
        check_range("max_objects", max_objects, 1, integer=True)
        check_range("max_overlap", max_overlap, 0, 1, low_inclusive=False)
        check_range("position_threshold", position_threshold, 0)
        if isinstance(detector, str):
            detector = Owlv2Detector.from_pretrained(detector, offline=offline, revision=revision)
        if isinstance(color_model, str):
            color_model = clip_backbone(color_model, offline=offline, revision=revision)
        if isinstance(color_model, TextImageBackbone):
            color_model = ClipColorClassifier(color_model)
        for label, part in (("detector", detector), ("color_model", color_model)):
            if not callable(part):
                raise AlignError(f"geneval {label}={part!r} must be a hub id, a local folder or a callable")
        # modules are registered (they follow the images' device); plain callables are kept aside
        self._parts = {"detector": detector, "color_model": color_model}
        for label, part in self._parts.items():
            if isinstance(part, nn.Module):
                self.add_module(label, part)
        self.metadata = {spec.prompt: spec for spec in read_geneval_metadata(metadata)} if metadata else {}
        self.score_kind = score
        self.threshold = float(threshold)
        self.counting_threshold = float(counting_threshold)
        self.max_objects = max_objects
        self.max_overlap = float(max_overlap)
        self.position_threshold = float(position_threshold)
        self.classes = tuple(classes)

    def spec(self, prompt: str) -> GenEvalSpec | None:
        """The prompt's requirements: its metadata record, else parsed from GenEval's templates."""
        return self.metadata.get(prompt.strip()) or parse_geneval_prompt(prompt, self.classes)

    def applies_to(self, prompt: str) -> bool:
        """Prompts with a metadata record or written with GenEval's templates."""
        return self.spec(prompt) is not None

    def judge_detections(self, image: Tensor, spec: GenEvalSpec, found: Mapping[str, Sequence[Detection]]) -> Verdict:
        """GenEval's verdict on one image [3, H, W] from all detections per name (before thresholds)."""
        threshold = self.counting_threshold if spec.tag == "counting" else self.threshold
        objects = {name: select_detections(found.get(name, []), threshold, self.max_objects, self.max_overlap)
                   for name in spec.classes}
        objects = {name: kept for name, kept in objects.items() if kept}
        colors = self._parts["color_model"]
        return judge(spec, objects, lambda name, dets: list(colors(image, dets, name)), self.position_threshold)

    def _score(self, images: Tensor, prompts: list[str]):
        specs = []
        for prompt in prompts:
            spec = self.spec(prompt)
            if spec is None:
                raise RewardError(
                    f"reward {self.name!r}: prompt {prompt!r} is not a GenEval prompt; accepted: a prompt of its "
                    "metadata file (metadata=...) or one of GenEval's templates ('a photo of a cat and a dog', "
                    "'a photo of three cats', 'a photo of a red cat', 'a photo of a cat left of a dog', ...)"
                )
            specs.append(spec)
        found = self._parts["detector"](images, [s.classes for s in specs])
        if len(found) != len(specs):
            raise RewardError(f"reward {self.name!r}: the detector returned {len(found)} results for {len(specs)} images")
        verdicts = [self.judge_detections(image, spec, f) for image, spec, f in zip(images, specs, found)]
        device = images.device
        scores = [float(v.correct) if self.score_kind == "correct" else v.fraction for v in verdicts]
        info = {"correct": torch.tensor([float(v.correct) for v in verdicts], device=device)}
        for criterion in CRITERIA:
            info[criterion] = torch.tensor([v.criterion(criterion) for v in verdicts], device=device)
        return torch.tensor(scores, device=device), info
