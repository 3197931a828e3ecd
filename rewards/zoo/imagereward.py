"""ImageReward (Xu et al. 2023): BLIP ViT-L/16 image encoder, BERT text encoder with cross-attention
to the image, and an MLP on the [CLS] feature; reported as ``(r - mean) / std`` with the
released constants.

Needs the ``image-reward`` package (extra ``imagereward``), which builds the BLIP model (its
stack imports timm and fairscale).  Images go through this package's differentiable torch
preprocessing (shortest side to 224, bicubic, center crop, OpenAI CLIP normalisation, as the
reference ``_transform``) instead of the PIL transform, so the score has a gradient.
"""

from __future__ import annotations

from torch import Tensor, nn

from ..base import Reward
from ..loading import import_optional
from ..preprocess import ImagePreprocess
from ..registry import register_reward

#: reference normalisation of the raw MLP output
IMAGEREWARD_MEAN = 0.16717362830052426
IMAGEREWARD_STD = 1.0333394966054072
IMAGEREWARD_MAX_TOKENS = 35


@register_reward("imagereward")
class ImageRewardScore(Reward):
    """ImageReward v1.0 score (roughly standard normal over generated images).

    Args:
        model: "ImageReward-v1.0", a local checkpoint file, or a built ImageReward model.
        download_root: where the package keeps its checkpoints (offline: put them there).
        med_config: path of BLIP's ``med_config.json`` (default: the package's download).
    """

    name = "imagereward"

    def __init__(
        self,
        model: str | nn.Module = "ImageReward-v1.0",
        *,
        download_root: str | None = None,
        med_config: str | None = None,
        **kwargs,
    ):
        super().__init__(**kwargs)
        if isinstance(model, str):
            package = import_optional("ImageReward", "imagereward", "the ImageReward reward")
            model = package.load(model, device="cpu", download_root=download_root, med_config=med_config)
        self.model = model
        self.preprocess = ImagePreprocess(size=224, crop_size=224)

    def _score(self, images: Tensor, prompts: list[str]) -> Tensor:
        blip = self.model.blip
        device = images.device
        tokens = blip.tokenizer(
            prompts, padding="max_length", truncation=True, max_length=IMAGEREWARD_MAX_TOKENS, return_tensors="pt"
        ).to(device)
        pixels = self.preprocess(images).to(next(self.model.parameters()).dtype)
        image_embeds = blip.visual_encoder(pixels)
        image_mask = image_embeds.new_ones(image_embeds.shape[:-1]).long()
        text = blip.text_encoder(
            tokens.input_ids,
            attention_mask=tokens.attention_mask,
            encoder_hidden_states=image_embeds,
            encoder_attention_mask=image_mask,
            return_dict=True,
        )
        raw = self.model.mlp(text.last_hidden_state[:, 0, :]).squeeze(-1)
        return (raw - IMAGEREWARD_MEAN) / IMAGEREWARD_STD
