"""VQAScore (Lin et al. 2024): the probability that a vision-language model answers "Yes" to
'Does this figure show "{prompt}"? Please answer Yes or No.' about the image.

The question and answer are t2v_metrics' defaults.  The score is the softmax probability of the
answer's token as the first token of the assistant's reply, in [0, 1] (``info["log_prob"]`` holds
its logarithm).

Locally (this reward) with a Qwen2-VL or Qwen2.5-VL model through transformers (default
``Qwen/Qwen2.5-VL-7B-Instruct``, Apache-2.0; ``AutoModelForImageTextToText``), with the image
prepared in torch (:mod:`rewards.qwen_vl`): the score is differentiable in the pixels.  Remotely,
any OpenAI-compatible endpoint that returns log-probabilities serves the same question through the
VLM judge's yes/no mode: ``{"vlm_judge": {"mode": "yes_no", "endpoint": ...}}``
(:mod:`rewards.zoo.vlm`).
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from align.core.errors import AlignError

from ..base import Reward
from ..loading import from_pretrained
from ..qwen_vl import QwenVisionPreprocess, QwenVLPrompts, encode_image_and_text, last_token_index
from ..registry import register_reward

VQASCORE_MODEL = "Qwen/Qwen2.5-VL-7B-Instruct"
VQASCORE_QUESTION = 'Does this figure show "{prompt}"? Please answer Yes or No.'
VQASCORE_ANSWER = "Yes"


def answer_token_id(tokenizer, answer: str) -> int:
    """The one token id of ``answer`` (VQAScore reads the probability of a single-token answer)."""
    ids = tokenizer.encode(answer, add_special_tokens=False)
    if len(ids) != 1:
        raise AlignError(f"answer={answer!r} is {len(ids)} tokens for this tokenizer; VQAScore needs a one-token answer")
    return ids[0]


@register_reward("vqascore")
class VQAScore(Reward):
    """VQAScore: probability that a Qwen2-VL / Qwen2.5-VL model answers "Yes" to 'Does this figure show
    "{prompt}"?' (in [0, 1]; remote endpoints: vlm_judge with mode=yes_no).

    Args:
        model: hub id / local folder of a Qwen2-VL or Qwen2.5-VL instruct model, or a built
            ``Qwen2VLForConditionalGeneration`` / ``Qwen2_5_VLForConditionalGeneration``.
        tokenizer, preprocess: the built model's tokenizer and image settings (tests).
        question: the question; ``{prompt}`` is replaced by the prompt.
        answer: the answer whose probability is the score (one token).
        min_pixels, max_pixels: image area bounds (default: the model's image processor's).
        offline, revision: hub loading.
    """

    name = "vqascore"

    def __init__(
        self,
        model: str | nn.Module = VQASCORE_MODEL,
        *,
        tokenizer=None,
        preprocess: QwenVisionPreprocess | None = None,
        question: str = VQASCORE_QUESTION,
        answer: str = VQASCORE_ANSWER,
        min_pixels: int | None = None,
        max_pixels: int | None = None,
        offline: bool | None = None,
        revision: str | None = None,
        **kwargs,
    ):
        super().__init__(**kwargs)
        if "{prompt}" not in question:
            raise AlignError(f"question={question!r} must contain {{prompt}}")
        pixels = {k: v for k, v in (("min_pixels", min_pixels), ("max_pixels", max_pixels)) if v is not None}
        if isinstance(model, str):
            from transformers import AutoImageProcessor, AutoModelForImageTextToText, AutoTokenizer

            source = model
            model = from_pretrained(AutoModelForImageTextToText, source, offline=offline, revision=revision)
            tokenizer = from_pretrained(AutoTokenizer, source, offline=offline, revision=revision)
            image_processor = from_pretrained(AutoImageProcessor, source, offline=offline, revision=revision)
            preprocess = QwenVisionPreprocess.from_image_processor(image_processor, **pixels)
        if tokenizer is None or not hasattr(model, "lm_head") or not hasattr(model, "model"):
            raise AlignError("vqascore needs a Qwen2-VL-style model with .model and .lm_head, and its tokenizer")
        self.model = model.eval()
        self.preprocess = preprocess or QwenVisionPreprocess(**pixels)
        self.prompts = QwenVLPrompts(tokenizer, model.config.image_token_id)
        self.question = question
        self.answer_id = answer_token_id(tokenizer, answer)

    def _score(self, images: Tensor, prompts: list[str]):
        questions = [self.question.replace("{prompt}", p) for p in prompts]
        hidden, inputs = encode_image_and_text(self.model.model, self.preprocess, self.prompts, images, questions)
        rows = torch.arange(len(prompts), device=hidden.device)
        last = hidden[rows, last_token_index(inputs["attention_mask"])]
        log_probs = self.model.lm_head(last).float().log_softmax(-1)[:, self.answer_id]
        return log_probs.exp(), {"log_prob": log_probs.detach()}
