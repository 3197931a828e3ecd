"""Aesthetic predictors: LAION v2 (CLIP) and v2.5 (SigLIP).  The prompt is not used.

* ``aesthetic``: LAION aesthetic predictor v2 (improved-aesthetic-predictor,
  "sac+logos+ava1-l14-linearMSE").  Score = MLP(L2-normalised CLIP ViT-L/14 image embedding), on
  the AVA scale (about 1-10).  The MLP is 768-1024-128-64-16-1 with dropout between the first
  layers and no activation, so it is affine; its layer indices match the released state dict
  (``layers.0``, ``layers.2``, ...).
* ``aesthetic_v2.5``: aesthetic predictor v2.5 (discus0434/aesthetic-predictor-v2-5, AGPL-3.0
  code, weights published in its repository).  Score = MLP(L2-normalised pooled output of SigLIP
  ``google/siglip-so400m-patch14-384``'s vision tower), 1-10 (5.5 and above: "great").  The MLP is
  1152-1024-128-64-16-1, dropout after every layer but the last, no activation (affine); the
  released head's keys are ``scoring_head.0``, ``scoring_head.2``, ... ``scoring_head.8`` (bfloat16).
  Preprocessing is SigLIP's: resize to 384 x 384 (bicubic, aspect ratio not kept), normalise with
  mean = std = 0.5; in torch here (:class:`~rewards.preprocess.ImagePreprocess`, "stretch"), so the
  score is differentiable.  Parity with ``SiglipImageProcessorPil`` is within
  :data:`~rewards.preprocess.PARITY_TOLERANCE` (``tests/test_rewards_aesthetic25.py``).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch.nn.functional as F
from torch import Tensor, nn

from align.core.errors import AlignError

from ..base import Reward
from ..loading import from_pretrained, load_state_dict, resolve_file
from ..preprocess import ImagePreprocess
from ..registry import register_reward
from .clip import clip_backbone

AESTHETIC_CLIP = "openai/clip-vit-large-patch14"
#: the released head (Apache-2.0), as mirrored for TRL's DDPO example
AESTHETIC_HEAD = "trl-lib/ddpo-aesthetic-predictor/aesthetic-model.pth"
AESTHETIC_HIDDEN = (1024, 128, 64, 16)
AESTHETIC_DROPOUT = (0.2, 0.2, 0.1)
#: v2.5: SigLIP vision tower, head weights as published with the predictor's code
AESTHETIC_V25_SIGLIP = "google/siglip-so400m-patch14-384"
AESTHETIC_V25_HEAD = "https://github.com/discus0434/aesthetic-predictor-v2-5/raw/main/models/aesthetic_predictor_v2_5.pth"
AESTHETIC_V25_DROPOUT = (0.5, 0.5, 0.5, 0.2)
#: SigLIP's normalisation
SIGLIP_MEAN = SIGLIP_STD = (0.5, 0.5, 0.5)


class AestheticHead(nn.Module):
    """The predictors' MLP: Linear/Dropout stack without activations, indices as in the releases.

    ``dropout`` gives the rate after each of the first layers (v2: three, v2.5: four); it fixes
    where the Linear layers sit in the Sequential, hence the state dict's keys.
    """

    def __init__(self, embed_dim: int = 768, hidden: Sequence[int] = AESTHETIC_HIDDEN,
                 dropout: Sequence[float] = AESTHETIC_DROPOUT):
        super().__init__()
        layers: list[nn.Module] = []
        sizes = [embed_dim, *hidden]
        for i, (a, b) in enumerate(zip(sizes[:-1], sizes[1:])):
            layers.append(nn.Linear(a, b))
            if i < len(dropout):
                layers.append(nn.Dropout(dropout[i]))
        layers.append(nn.Linear(sizes[-1], 1))
        self.layers = nn.Sequential(*layers)

    def forward(self, embedding: Tensor) -> Tensor:
        return self.layers(embedding).squeeze(-1)


@register_reward("aesthetic")
class Aesthetic(Reward):
    """LAION aesthetic score v2 of the image (about 1-10).

    Args:
        model: CLIP ViT-L/14 (hub id / local folder, or a built ``CLIPVisionModelWithProjection``
            / ``CLIPModel``, or an open_clip / OpenAI clip name with ``backend``).
        head: the MLP weights: a local file or ``owner/repo/filename`` on the hub, a state
            dict, or an :class:`AestheticHead`.
        allow_pickle: allow a head checkpoint that is more than tensors (trusted sources only).
    """

    name = "aesthetic"

    def __init__(
        self,
        model: str | nn.Module = AESTHETIC_CLIP,
        *,
        head: str | Mapping[str, Tensor] | nn.Module = AESTHETIC_HEAD,
        backend: str = "transformers",
        preprocess: ImagePreprocess | None = None,
        offline: bool | None = None,
        revision: str | None = None,
        allow_pickle: bool = False,
        **kwargs,
    ):
        super().__init__(**kwargs)
        self.backbone = clip_backbone(
            model, backend=backend, preprocess=preprocess, vision_only=True, offline=offline,
            revision=revision, allow_pickle=allow_pickle,
        )
        self.head = _head(head, AESTHETIC_DROPOUT, offline=offline, allow_pickle=allow_pickle)

    def _score(self, images: Tensor, prompts: list[str]) -> Tensor:
        embedding = F.normalize(self.backbone.encode_image(images), dim=-1)
        return self.head(embedding)


def _head_from_state(state: Mapping[str, Tensor], dropout: Sequence[float] = AESTHETIC_DROPOUT) -> AestheticHead:
    """An :class:`AestheticHead` holding a released head's weights (``layers.N.*`` or ``scoring_head.N.*``)."""
    prefixes = ("model.", "layers.", "scoring_head.")
    renamed = {}
    for key, value in state.items():
        for prefix in prefixes:
            key = key.removeprefix(prefix)
        renamed[f"layers.{key}"] = value.float()
    weights = sorted((k for k in renamed if k.endswith(".weight") and k.split(".")[1].isdigit()),
                     key=lambda k: int(k.split(".")[1]))
    if not weights:
        raise AlignError(f"aesthetic head state dict has no 'layers.N.weight' entries; got keys {sorted(state)[:6]}")
    dims = [renamed[k].shape[0] for k in weights]
    head = AestheticHead(renamed[weights[0]].shape[1], dims[:-1], dropout)
    try:
        head.load_state_dict(renamed)
    except RuntimeError as exc:
        raise AlignError(f"aesthetic head weights do not fit the predictor's layout: {str(exc).splitlines()[0]}") from None
    return head


def _head(head: str | Mapping[str, Tensor] | nn.Module, dropout: Sequence[float], *, offline: bool | None,
          allow_pickle: bool) -> nn.Module:
    if isinstance(head, nn.Module):
        return head
    state = head if isinstance(head, Mapping) else load_state_dict(resolve_file(head, offline=offline),
                                                                  allow_pickle=allow_pickle)
    return _head_from_state(state, dropout)


@register_reward("aesthetic_v2.5")
class AestheticV25(Reward):
    """Aesthetic predictor v2.5 (SigLIP so400m + MLP), 1-10; 5.5 and above is a great score.

    Args:
        model: SigLIP hub id / local folder (vision tower and preprocessing read from it), or a
            built ``SiglipVisionModel``.
        head: the MLP weights: a local file, a URL, ``owner/repo/filename`` on the hub, a state dict,
            or an :class:`AestheticHead` (default: the released head).
        preprocess: override the preprocessing (default: the model's processor config, or SigLIP's).
        allow_pickle: allow a head checkpoint that is more than tensors (trusted sources only).
    """

    name = "aesthetic_v2.5"

    def __init__(
        self,
        model: str | nn.Module = AESTHETIC_V25_SIGLIP,
        *,
        head: str | Mapping[str, Tensor] | nn.Module = AESTHETIC_V25_HEAD,
        preprocess: ImagePreprocess | None = None,
        offline: bool | None = None,
        revision: str | None = None,
        allow_pickle: bool = False,
        **kwargs,
    ):
        super().__init__(**kwargs)
        if isinstance(model, str):
            from transformers import SiglipVisionModel

            source = model
            model = from_pretrained(SiglipVisionModel, source, offline=offline, revision=revision)
            preprocess = preprocess or ImagePreprocess.from_pretrained(source, offline=offline, revision=revision)
        if not isinstance(model, nn.Module):
            raise AlignError(f"aesthetic_v2.5 model={model!r} must be a hub id, a local folder or a SiglipVisionModel")
        self.vision = model.eval()
        size = model.config.image_size
        self.preprocess = preprocess or ImagePreprocess(size=size, resize_mode="stretch", mean=SIGLIP_MEAN, std=SIGLIP_STD)
        self.head = _head(head, AESTHETIC_V25_DROPOUT, offline=offline, allow_pickle=allow_pickle)

    def _score(self, images: Tensor, prompts: list[str]) -> Tensor:
        parameter = next(self.vision.parameters())
        pooled = self.vision(pixel_values=self.preprocess(images).to(parameter.dtype)).pooler_output
        return self.head(F.normalize(pooled, dim=-1))
