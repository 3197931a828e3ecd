"""OCR reward: does the image show the text the prompt quotes? (Flow-GRPO's text-rendering reward.)

The target is the text between the first pair of double quotes in the prompt (``a sign that says
"OPEN"`` -> ``OPEN``; straight or curly quotes).  An OCR model reads all the text in the image, and
the reward is Flow-GRPO's normalised edit distance (``flow_grpo/ocr.py``):

* spaces are removed from both strings and both are lower-cased;
* if the target occurs in the recognised text the distance is 0 (extra text is not penalised);
* otherwise d = Levenshtein(recognised, target), capped at len(target);
* reward = 1 - d / len(target), in [0, 1].

``info["exact"]`` is 1 where the target was read exactly (d = 0): its mean over OCR prompts is the
OCR accuracy.  Black-box (the model generates text): use it for steering, evaluation and
policy-gradient training.

The default reader is GOT-OCR 2.0 (``stepfun-ai/GOT-OCR-2.0-hf``, Apache-2.0, 580M parameters),
native in transformers (``GotOcr2ForConditionalGeneration``): it loads without
``trust_remote_code`` and with the PIL image processor (no torchvision), and reads scene text and
whole pages, which generated images need.  TrOCR reads one cropped text line only; Florence-2
also loads natively but is a generic captioner with an OCR task prompt.  Flow-GRPO used PaddleOCR,
which is not a transformers model: scores are comparable in definition, not in value.  Any
callable ``reader(images [B, 3, H, W] in [0, 1]) -> list[str]`` can replace it.
"""

from __future__ import annotations

import re
from collections.abc import Callable

import torch
from torch import Tensor, nn

from align.core.errors import AlignError, RewardError, check_range

from ..base import Reward
from ..loading import from_pretrained
from ..registry import register_reward
from .jpeg import to_uint8_images

OCR_MODEL = "stepfun-ai/GOT-OCR-2.0-hf"
#: straight quotes, then typographic ones
_QUOTED = re.compile(r'"([^"]*)"|\u201c([^\u201d]*)\u201d')

TextReader = Callable[[Tensor], list[str]]


def quoted_text(prompt: str) -> str | None:
    """The text between the first pair of double quotes (straight or curly), or None."""
    match = _QUOTED.search(prompt)
    if match is None:
        return None
    return match.group(1) if match.group(1) is not None else match.group(2)


def edit_distance(a: str, b: str) -> int:
    """Levenshtein distance: the fewest insertions, deletions and substitutions turning ``a`` into ``b``."""
    if len(a) < len(b):
        a, b = b, a
    previous = list(range(len(b) + 1))
    for i, ca in enumerate(a, 1):
        current = [i]
        for j, cb in enumerate(b, 1):
            current.append(min(previous[j] + 1, current[j - 1] + 1, previous[j - 1] + (ca != cb)))
        previous = current
    return previous[-1]


def _canonical(text: str) -> str:
    return text.replace(" ", "").lower()


def ocr_distance(target: str, recognized: str) -> int:
    """Flow-GRPO's distance: 0 if the target occurs in the recognised text, else Levenshtein capped at len(target)."""
    target, recognized = _canonical(target), _canonical(recognized)
    if target in recognized:
        return 0
    return min(edit_distance(recognized, target), len(target))


def ocr_similarity(target: str, recognized: str) -> float:
    """1 - ocr_distance / len(target) (spaces removed), in [0, 1]."""
    length = len(_canonical(target))
    if length == 0:
        raise AlignError(f"OCR target {target!r} is empty (or only spaces); quote the text the image should show")
    return 1.0 - ocr_distance(target, recognized) / length


class GotOcrReader(nn.Module):
    """GOT-OCR 2.0 through transformers: the plain text of each image, greedy decoding.

    Args:
        model: a ``GotOcr2ForConditionalGeneration``.
        processor: its ``GotOcr2Processor`` (PIL image processor, tokenizer).
        max_new_tokens: longest text read per image (prompts quote a few words).
    """

    def __init__(self, model: nn.Module, processor, *, max_new_tokens: int = 64):
        super().__init__()
        check_range("max_new_tokens", max_new_tokens, 1, integer=True)
        self.model = model
        self.processor = processor
        self.max_new_tokens = max_new_tokens
        # the vision tower's patch grid shrinks 4x per side in the projector's two stride-2
        # convolutions: 1024 / 16 / 4 = 16, so 256 tokens for the released model
        vision = model.config.vision_config
        processor.num_image_tokens = (vision.image_size // vision.patch_size // 4) ** 2

    @classmethod
    def from_pretrained(
        cls, source: str = OCR_MODEL, *, offline: bool | None = None, revision: str | None = None, **kwargs
    ) -> GotOcrReader:
        from transformers import AutoProcessor, GotOcr2ForConditionalGeneration

        model = from_pretrained(GotOcr2ForConditionalGeneration, source, offline=offline, revision=revision)
        processor = from_pretrained(AutoProcessor, source, offline=offline, revision=revision)
        return cls(model.eval(), processor, **kwargs)

    def forward(self, images: Tensor) -> list[str]:
        tokenizer = self.processor.tokenizer
        inputs = self.processor(to_uint8_images(images), return_tensors="pt")
        parameter = next(self.model.parameters())
        inputs = {k: v.to(parameter.device) for k, v in inputs.items()}
        inputs["pixel_values"] = inputs["pixel_values"].to(parameter.dtype)
        with torch.no_grad():
            generated = self.model.generate(
                **inputs, do_sample=False, max_new_tokens=self.max_new_tokens, tokenizer=tokenizer,
                stop_strings=self.processor.message_end_token, pad_token_id=tokenizer.pad_token_id,
            )
        answers = generated[:, inputs["input_ids"].shape[1]:]
        return [text.strip() for text in tokenizer.batch_decode(answers, skip_special_tokens=True)]


@register_reward("ocr")
class OCRReward(Reward):
    """Text rendering: 1 - normalised edit distance between the prompt's quoted text and the text an
    OCR model reads (Flow-GRPO's definition; 1 = the quoted text appears in the image).

    Args:
        model: GOT-OCR 2.0 hub id / local folder (default ``stepfun-ai/GOT-OCR-2.0-hf``), or a reader:
            any callable ``images [B, 3, H, W] in [0, 1] -> list of B strings``.
        max_new_tokens: longest text the default reader generates per image.
        offline, revision: hub loading (offline: only the local cache).
    """

    name = "ocr"
    differentiable = False

    def __init__(
        self,
        model: str | TextReader = OCR_MODEL,
        *,
        max_new_tokens: int = 64,
        offline: bool | None = None,
        revision: str | None = None,
        **kwargs,
    ):
        super().__init__(**kwargs)
        if isinstance(model, str):
            model = GotOcrReader.from_pretrained(model, offline=offline, revision=revision, max_new_tokens=max_new_tokens)
        if not callable(model):
            raise AlignError(f"ocr model={model!r} must be a hub id, a local folder or a reader callable")
        if isinstance(model, nn.Module):
            self.reader = model
        else:
            self._reader = model  # a plain function: not a submodule

    def applies_to(self, prompt: str) -> bool:
        """Only prompts that quote the text to render."""
        return quoted_text(prompt) is not None

    def read(self, images: Tensor) -> list[str]:
        """The text the reader finds in each image."""
        reader = self.reader if "reader" in self._modules else self._reader
        texts = list(reader(images))
        if len(texts) != images.shape[0] or not all(isinstance(t, str) for t in texts):
            raise RewardError(f"reward {self.name!r}: the reader returned {texts!r}; expected {images.shape[0]} strings")
        return texts

    def _score(self, images: Tensor, prompts: list[str]):
        targets = []
        for prompt in prompts:
            target = quoted_text(prompt)
            if target is None:
                raise RewardError(
                    f"reward {self.name!r}: prompt {prompt!r} quotes no text; the OCR reward scores prompts "
                    'like \'a shop sign that says "OPEN"\' (the text between double quotes)'
                )
            targets.append(target)
        texts = self.read(images)
        scores = [ocr_similarity(t, r) for t, r in zip(targets, texts)]
        exact = [float(ocr_distance(t, r) == 0) for t, r in zip(targets, texts)]
        device = images.device
        return torch.tensor(scores, device=device), {"exact": torch.tensor(exact, device=device)}
