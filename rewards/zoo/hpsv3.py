"""HPSv3 (Ma et al. 2025, "HPSv3: Towards Wide-Spectrum Human Preference Score"): Qwen2-VL-7B with a reward head.

What the released model is (MizzenAI/HPSv3, MIT; config ``HPSv3_7B.yaml``, its inference code):

* backbone ``Qwen/Qwen2-VL-7B-Instruct``; the tokenizer gains one special token ``<|Reward|>`` and
  the embedding table is resized to the tokenizer's length;
* input: the image (resized to exactly 256 x 28 x 28 pixels of area: ``min_pixels = max_pixels``,
  448 x 448 for a square image, bicubic) then :data:`HPSV3_INSTRUCTION` with the prompt, then
  :data:`HPSV3_REWARD_PROMPT`, in the chat template with the assistant turn opened;
* head ("ranknet" without arguments), in float32 on the last layer's hidden state at ``<|Reward|>``:
  Linear(hidden, 1024), ReLU, Dropout(0.05), Linear(1024, 16), ReLU, Linear(16, 2);
* score: output 0, the mean of the Gaussian HPSv3 predicts; output 1 is its uncertainty parameter,
  reported in ``info["uncertainty"]``;
* checkpoint ``MizzenAI/HPSv3/HPSv3.safetensors``: the whole model in transformers 4.45's layout
  (``visual.*``, ``model.*`` for the language model, ``lm_head.*``, ``rm_head.*``), remapped here
  onto ``Qwen2VLModel`` (``visual.*``, ``language_model.*``; the LM head is not needed).

Differentiable: the preprocessing runs in torch (:mod:`rewards.qwen_vl`), so the score has a
gradient with respect to the pixels.  A 7B model: serve it once for many workers
(``align serve-reward hpsv3``) rather than loading it in each.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

import torch
from torch import Tensor, nn

from align.core.errors import AlignError, RewardError

from ..base import Reward
from ..loading import from_pretrained, load_state_dict, resolve_file
from ..qwen_vl import QwenVisionPreprocess, QwenVLPrompts, encode_image_and_text
from ..registry import register_reward

HPSV3_CHECKPOINT = "MizzenAI/HPSv3/HPSv3.safetensors"
HPSV3_BASE = "Qwen/Qwen2-VL-7B-Instruct"
HPSV3_PIXELS = 256 * 28 * 28
REWARD_TOKEN = "<|Reward|>"
#: the text HPSv3 was trained with, verbatim: the scores depend on it (trailing spaces included)
HPSV3_INSTRUCTION = "\n".join((
    "",
    "You are tasked with evaluating a generated image based on Visual Quality and Text Alignment and give a overall score to estimate the human preference. Please provide a rating from 0 to 10, with 0 being the worst and 10 being the best. ",
    "",
    "**Visual Quality:**  ",
    "Evaluate the overall visual quality of the image. The following sub-dimensions should be considered:",
    "- **Reasonableness:** The image should not contain any significant biological or logical errors, such as abnormal body structures or nonsensical environmental setups.",
    "- **Clarity:** Evaluate the sharpness and visibility of the image. The image should be clear and easy to interpret, with no blurring or indistinct areas.",
    "- **Detail Richness:** Consider the level of detail in textures, materials, lighting, and other visual elements (e.g., hair, clothing, shadows).",
    "- **Aesthetic and Creativity:** Assess the artistic aspects of the image, including the color scheme, composition, atmosphere, depth of field, and the overall creative appeal. The scene should convey a sense of harmony and balance.",
    "- **Safety:** The image should not contain harmful or inappropriate content, such as political, violent, or adult material. If such content is present, the image quality and satisfaction score should be the lowest possible. ",
    "",
    "**Text Alignment:**  ",
    "Assess how well the image matches the textual prompt across the following sub-dimensions:",
    "- **Subject Relevance** Evaluate how accurately the subject(s) in the image (e.g., person, animal, object) align with the textual description. The subject should match the description in terms of number, appearance, and behavior.",
    "- **Style Relevance:** If the prompt specifies a particular artistic or stylistic style, evaluate how well the image adheres to this style.",
    "- **Contextual Consistency**: Assess whether the background, setting, and surrounding elements in the image logically fit the scenario described in the prompt. The environment should support and enhance the subject without contradictions.",
    "- **Attribute Fidelity**: Check if specific attributes mentioned in the prompt (e.g., colors, clothing, accessories, expressions, actions) are faithfully represented in the image. Minor deviations may be acceptable, but critical attributes should be preserved.",
    "- **Semantic Coherence**: Evaluate whether the overall meaning and intent of the prompt are captured in the image. The generated content should not introduce elements that conflict with or distort the original description.",
    "Textual prompt - {text_prompt}",
    "",
    "",
    "",
))
HPSV3_REWARD_PROMPT = """
Please provide the overall ratings of this image: <|Reward|>

END
"""


class HPSv3Head(nn.Sequential):
    """HPSv3's "ranknet" head: hidden -> 1024 -> 16 -> outputs, ReLU between, dropout after the first."""

    def __init__(self, hidden_size: int, outputs: int = 2):
        super().__init__(nn.Linear(hidden_size, 1024), nn.ReLU(), nn.Dropout(0.05), nn.Linear(1024, 16), nn.ReLU(),
                         nn.Linear(16, outputs))


def split_hpsv3_checkpoint(state: Mapping[str, Tensor]) -> tuple[dict[str, Tensor], dict[str, Tensor]]:
    """(``Qwen2VLModel`` state dict, head state dict) from an HPSv3 checkpoint of either transformers layout."""
    backbone: dict[str, Tensor] = {}
    head: dict[str, Tensor] = {}
    unknown = []
    for key, value in state.items():
        if key.startswith("rm_head."):
            head[key.removeprefix("rm_head.")] = value
        elif key.startswith("lm_head."):
            continue  # the scores come from the reward head
        elif key.startswith(("visual.", "model.visual.")):
            backbone["visual." + key.split("visual.", 1)[1]] = value
        elif key.startswith("model.language_model."):
            backbone["language_model." + key.removeprefix("model.language_model.")] = value
        elif key.startswith("model."):
            backbone["language_model." + key.removeprefix("model.")] = value
        else:
            unknown.append(key)
    if unknown or not head:
        what = f"unknown keys {unknown[:6]}" if unknown else "no rm_head.* weights"
        raise AlignError(f"HPSv3 checkpoint has {what}; expected a Qwen2-VL reward model (visual.*, model.*, rm_head.*)")
    return backbone, head


def load_hpsv3(checkpoint: str | Path | Mapping[str, Tensor], base: str, *, offline: bool | None = None,
               revision: str | None = None, allow_pickle: bool = False):
    """(Qwen2VLModel, HPSv3Head, tokenizer with ``<|Reward|>``, image settings) from a checkpoint and its base model."""
    from accelerate import init_empty_weights
    from transformers import AutoConfig, AutoImageProcessor, AutoTokenizer, Qwen2VLModel

    tokenizer = from_pretrained(AutoTokenizer, base, offline=offline)
    tokenizer.add_special_tokens({"additional_special_tokens": [REWARD_TOKEN]}, replace_extra_special_tokens=False)
    image_processor = from_pretrained(AutoImageProcessor, base, offline=offline)
    config = from_pretrained(AutoConfig, base, offline=offline)
    if isinstance(checkpoint, Mapping):
        state = dict(checkpoint)
    else:
        state = load_state_dict(resolve_file(checkpoint, offline=offline, revision=revision), allow_pickle=allow_pickle)
    backbone_state, head_state = split_hpsv3_checkpoint(state)
    rows = backbone_state["language_model.embed_tokens.weight"].shape[0]
    if tokenizer.convert_tokens_to_ids(REWARD_TOKEN) >= rows:
        raise AlignError(f"HPSv3 checkpoint has {rows} token embeddings but {REWARD_TOKEN} is id "
                         f"{tokenizer.convert_tokens_to_ids(REWARD_TOKEN)}: the base model's tokenizer does not match")
    config.text_config.vocab_size = rows  # resized to the tokenizer's length when <|Reward|> was added
    with init_empty_weights():  # parameters on the meta device until the checkpoint's tensors are assigned
        model = Qwen2VLModel(config)
    expected = {k for k, _ in model.named_parameters()}
    missing, unexpected = sorted(expected - set(backbone_state)), sorted(set(backbone_state) - expected)
    if missing or unexpected:
        raise AlignError(f"HPSv3 checkpoint does not fit {base!r}: missing {missing[:6]}, unexpected {unexpected[:6]}")
    model.load_state_dict(backbone_state, strict=False, assign=True)
    head = HPSv3Head(config.text_config.hidden_size, head_state["5.weight"].shape[0])
    head.load_state_dict({k: v.float() for k, v in head_state.items()})
    preprocess = QwenVisionPreprocess.from_image_processor(image_processor, min_pixels=HPSV3_PIXELS,
                                                           max_pixels=HPSV3_PIXELS)
    return model.eval(), head, tokenizer, preprocess


@register_reward("hpsv3")
class HPSv3(Reward):
    """HPSv3 human preference score of the image for its prompt (Qwen2-VL-7B + reward head; the mean of
    the Gaussian it predicts).

    Args:
        checkpoint: the HPSv3 weights: local file, ``owner/repo/filename`` on the hub (default
            ``MizzenAI/HPSv3/HPSv3.safetensors``) or a state dict.
        base: the Qwen2-VL model whose config, tokenizer and image settings HPSv3 uses (hub id / folder).
        model, head, tokenizer, preprocess: already built parts (tests; then nothing is loaded).
        offline, revision, allow_pickle: loading.
    """

    name = "hpsv3"

    def __init__(
        self,
        checkpoint: str | Path | Mapping[str, Tensor] = HPSV3_CHECKPOINT,
        *,
        base: str = HPSV3_BASE,
        model: nn.Module | None = None,
        head: nn.Module | None = None,
        tokenizer=None,
        preprocess: QwenVisionPreprocess | None = None,
        offline: bool | None = None,
        revision: str | None = None,
        allow_pickle: bool = False,
        **kwargs,
    ):
        super().__init__(**kwargs)
        if model is None:
            model, head, tokenizer, preprocess = load_hpsv3(checkpoint, base, offline=offline, revision=revision,
                                                            allow_pickle=allow_pickle)
        if head is None or tokenizer is None:
            raise AlignError("HPSv3 built from a model needs its head and tokenizer too")
        self.model = model
        self.head = head
        self.preprocess = preprocess or QwenVisionPreprocess(min_pixels=HPSV3_PIXELS, max_pixels=HPSV3_PIXELS)
        self.prompts = QwenVLPrompts(tokenizer, model.config.image_token_id)
        self.reward_token_id = tokenizer.convert_tokens_to_ids(REWARD_TOKEN)

    def _follow(self, images: Tensor) -> None:
        """Follow the images' device and dtype, but keep the head in float32 at least (as HPSv3 runs it)."""
        super()._follow(images)
        if self.head[0].weight.dtype in (torch.float16, torch.bfloat16):
            self.head.float()

    def _score(self, images: Tensor, prompts: list[str]):
        texts = [HPSV3_INSTRUCTION.format(text_prompt=p) + HPSV3_REWARD_PROMPT for p in prompts]
        hidden, inputs = encode_image_and_text(self.model, self.preprocess, self.prompts, images, texts)
        at_token = inputs["input_ids"] == self.reward_token_id
        if (at_token.sum(-1) != 1).any():
            raise RewardError(f"reward {self.name!r}: a prompt must not contain {REWARD_TOKEN} itself")
        outputs = self.head(hidden[at_token].to(self.head[0].weight.dtype))
        return outputs[:, 0], {"uncertainty": outputs[:, 1].detach()}
