"""Qwen2-VL / Qwen2.5-VL inputs built in torch, so that scores keep their gradient to the pixels.

Rewards built on these vision-language models (HPSv3, VQAScore) prepare each batch like the
model's processor, without its numpy / uint8 path:

* :class:`QwenVisionPreprocess`: resize to ``smart_resize(H, W)`` (sides multiples of
  ``patch_size * merge_size``, area between ``min_pixels`` and ``max_pixels``; transformers'
  function), antialiased bicubic as PIL does (:func:`rewards.preprocess.resize`), normalise with
  the OpenAI CLIP constants, and cut into the flat patches the vision tower takes
  ``[B * grid_h * grid_w, 3 * temporal_patch_size * patch_size**2]`` (the one frame repeated
  ``temporal_patch_size`` times, merge-window order), with ``image_grid_thw`` [B, 3];
* :class:`QwenVLPrompts`: the chat text (the tokenizer's chat template when it has one, else
  Qwen2-VL's: system "You are a helpful assistant.", the image, the text, then the assistant
  turn), ``<|image_pad|>`` repeated once per merged patch, tokenised with right padding, and the
  multimodal token types the model's M-RoPE needs.

Parity with ``Qwen2VLImageProcessorPil`` (images quantised to uint8 first, as the processor sees
them): the documented bound of :data:`rewards.preprocess.PARITY_TOLERANCE` on normalised pixels
holds (``tests/test_rewards_qwen.py``); patches and grids are identical in layout.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from align.core.errors import AlignError, check_range

from .preprocess import OPENAI_CLIP_MEAN, OPENAI_CLIP_STD, normalize, resize

IMAGE_PAD = "<|image_pad|>"
#: Qwen2-VL's chat template rendered for one user turn holding an image then text, with the assistant prompt
QWEN_VL_CHAT = (
    "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\n"
    "<|vision_start|>" + IMAGE_PAD + "<|vision_end|>{text}<|im_end|>\n<|im_start|>assistant\n"
)


@dataclass(frozen=True)
class QwenVisionPreprocess:
    """Qwen2-VL's image preprocessing in torch (see the module docstring).

    Attributes:
        patch_size: side of a vision patch (14).
        merge_size: patches merged per side into one language token (2).
        temporal_patch_size: frames per patch; an image is repeated this many times (2).
        min_pixels: smallest image area after resizing.
        max_pixels: largest image area after resizing.
        mean: per-channel normalisation mean.
        std: per-channel normalisation standard deviation.
    """

    patch_size: int = 14
    merge_size: int = 2
    temporal_patch_size: int = 2
    min_pixels: int = 56 * 56
    max_pixels: int = 28 * 28 * 1280
    mean: tuple[float, float, float] = OPENAI_CLIP_MEAN
    std: tuple[float, float, float] = OPENAI_CLIP_STD

    def __post_init__(self):
        for name in ("patch_size", "merge_size", "temporal_patch_size", "min_pixels", "max_pixels"):
            check_range(name, getattr(self, name), 1, integer=True)
        if self.min_pixels > self.max_pixels:
            raise AlignError(f"min_pixels={self.min_pixels} must not exceed max_pixels={self.max_pixels}")

    @classmethod
    def from_image_processor(cls, processor, **overrides) -> QwenVisionPreprocess:
        """Settings of a transformers Qwen2-VL image processor (``min_pixels`` etc. overridable)."""
        size = getattr(processor, "size", None) or {}
        settings = dict(
            patch_size=processor.patch_size,
            merge_size=processor.merge_size,
            temporal_patch_size=processor.temporal_patch_size,
            min_pixels=size.get("shortest_edge", getattr(processor, "min_pixels", cls.min_pixels)),
            max_pixels=size.get("longest_edge", getattr(processor, "max_pixels", cls.max_pixels)),
            mean=tuple(processor.image_mean),
            std=tuple(processor.image_std),
        )
        return cls(**{**settings, **overrides})

    def resized_size(self, height: int, width: int) -> tuple[int, int]:
        """(h, w) after resizing: transformers' ``smart_resize``."""
        from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import smart_resize

        try:
            return smart_resize(height, width, self.patch_size * self.merge_size, self.min_pixels, self.max_pixels)
        except ValueError as exc:
            raise AlignError(f"image of {height}x{width} pixels: {exc}") from None

    def __call__(self, images: Tensor) -> tuple[Tensor, Tensor]:
        """[B, 3, H, W] in [0, 1] -> (pixel_values [B * gh * gw, 3 * T * p * p], image_grid_thw [B, 3])."""
        batch, channels = images.shape[:2]
        height, width = self.resized_size(*images.shape[-2:])
        pixels = normalize(resize(images, height, width), self.mean, self.std)
        p, m, t = self.patch_size, self.merge_size, self.temporal_patch_size
        gh, gw = height // p, width // p
        patches = pixels.reshape(batch, channels, gh // m, m, p, gw // m, m, p)
        # (B, merged rows, merged cols, row in window, col in window, C, p, p): the processor's order
        patches = patches.permute(0, 2, 5, 3, 6, 1, 4, 7).unsqueeze(6)
        patches = patches.expand(*patches.shape[:6], t, p, p)
        grid = torch.tensor([[1, gh, gw]] * batch, dtype=torch.long, device=images.device)
        return patches.reshape(batch * gh * gw, channels * t * p * p), grid

    def tokens_per_image(self, height: int, width: int) -> int:
        """Language tokens one image becomes (patches / merge_size**2)."""
        h, w = self.resized_size(height, width)
        return (h // self.patch_size) * (w // self.patch_size) // self.merge_size**2


class QwenVLPrompts:
    """Token ids of the chat text around one image per sample (see the module docstring).

    Args:
        tokenizer: the model's tokenizer; it must know ``<|image_pad|>``.
        image_token_id: the model's image token id (its config's ``image_token_id``).
        chat: text -> chat string holding one ``<|image_pad|>``; default: the tokenizer's chat
            template if it has one, else :data:`QWEN_VL_CHAT`.
    """

    def __init__(self, tokenizer, image_token_id: int, chat: Callable[[str], str] | None = None):
        if tokenizer.convert_tokens_to_ids(IMAGE_PAD) != image_token_id:
            raise AlignError(
                f"the tokenizer's {IMAGE_PAD} is id {tokenizer.convert_tokens_to_ids(IMAGE_PAD)} but the model's "
                f"image_token_id is {image_token_id}; load the tokenizer that belongs to the model"
            )
        self.tokenizer = tokenizer
        self.image_token_id = image_token_id
        self.chat = chat or self._default_chat(tokenizer)

    @staticmethod
    def _default_chat(tokenizer) -> Callable[[str], str]:
        if getattr(tokenizer, "chat_template", None):
            def render(text: str) -> str:
                messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": text}]}]
                return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)

            return render
        return lambda text: QWEN_VL_CHAT.format(text=text)

    def __call__(self, texts: Sequence[str], image_tokens: int, device: torch.device) -> dict[str, Tensor]:
        """input_ids, attention_mask [B, L] (right padding) and mm_token_type_ids (1 on image tokens)."""
        rendered = []
        for text in texts:
            chat = self.chat(text)
            if chat.count(IMAGE_PAD) != 1:
                raise AlignError(f"the chat text must hold one {IMAGE_PAD}; got {chat.count(IMAGE_PAD)} in {chat[:200]!r}")
            rendered.append(chat.replace(IMAGE_PAD, IMAGE_PAD * image_tokens))
        tokens = self.tokenizer(rendered, padding=True, padding_side="right", return_tensors="pt")
        input_ids = tokens.input_ids.to(device)
        return {
            "input_ids": input_ids,
            "attention_mask": tokens.attention_mask.to(device),
            "mm_token_type_ids": (input_ids == self.image_token_id).int(),
        }


def last_token_index(attention_mask: Tensor) -> Tensor:
    """Position of each row's last real token under right padding: [B]."""
    return attention_mask.long().sum(-1) - 1


def encode_image_and_text(
    model, preprocess: QwenVisionPreprocess, prompts: QwenVLPrompts, images: Tensor, texts: Sequence[str]
) -> tuple[Tensor, dict[str, Tensor]]:
    """Last-layer hidden states [B, L, D] of a Qwen2-VL-style base model (``Qwen2VLModel``,
    ``Qwen2_5_VLModel``) reading each image then its text, and the token inputs used."""
    pixel_values, grid = preprocess(images)
    inputs = prompts(texts, preprocess.tokens_per_image(*images.shape[-2:]), images.device)
    dtype = next(model.parameters()).dtype
    out = model(**inputs, pixel_values=pixel_values.to(dtype), image_grid_thw=grid, use_cache=False)
    return out.last_hidden_state, inputs
