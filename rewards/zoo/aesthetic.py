"""LAION aesthetic predictor v2 (improved-aesthetic-predictor, "sac+logos+ava1-l14-linearMSE").

Score = MLP(L2-normalised CLIP ViT-L/14 image embedding), on the AVA scale (about 1-10).  The
MLP is 768-1024-128-64-16-1 with dropout between the first layers and no activation, so it is
affine; its layer indices match the released state dict (``layers.0``, ``layers.2``, ...).
The prompt is not used.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch.nn.functional as F
from torch import Tensor, nn

from align.core.errors import AlignError

from ..base import Reward
from ..loading import load_state_dict, resolve_file
from ..preprocess import ImagePreprocess
from ..registry import register_reward
from .clip import clip_backbone

AESTHETIC_CLIP = "openai/clip-vit-large-patch14"
#: the released head (Apache-2.0), as mirrored for TRL's DDPO example
AESTHETIC_HEAD = "trl-lib/ddpo-aesthetic-predictor/aesthetic-model.pth"
AESTHETIC_HIDDEN = (1024, 128, 64, 16)
AESTHETIC_DROPOUT = (0.2, 0.2, 0.1)


class AestheticHead(nn.Module):
    """The predictor's MLP: Linear/Dropout stack without activations, indices as in the release."""

    def __init__(self, embed_dim: int = 768, hidden: Sequence[int] = AESTHETIC_HIDDEN):
        super().__init__()
        layers: list[nn.Module] = []
        sizes = [embed_dim, *hidden]
        for i, (a, b) in enumerate(zip(sizes[:-1], sizes[1:])):
            layers.append(nn.Linear(a, b))
            if i < len(AESTHETIC_DROPOUT):
                layers.append(nn.Dropout(AESTHETIC_DROPOUT[i]))
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
        if isinstance(head, nn.Module):
            self.head = head
        else:
            state = head if isinstance(head, Mapping) else load_state_dict(
                resolve_file(head, offline=offline), allow_pickle=allow_pickle
            )
            self.head = _head_from_state(state)

    def _score(self, images: Tensor, prompts: list[str]) -> Tensor:
        embedding = F.normalize(self.backbone.encode_image(images), dim=-1)
        return self.head(embedding)


def _head_from_state(state: Mapping[str, Tensor]) -> AestheticHead:
    state = {k.removeprefix("model."): v for k, v in state.items()}
    weights = sorted((k for k in state if k.startswith("layers.") and k.endswith(".weight")),
                     key=lambda k: int(k.split(".")[1]))
    if not weights:
        raise AlignError(f"aesthetic head state dict has no 'layers.N.weight' entries; got keys {sorted(state)[:6]}")
    dims = [state[k].shape[0] for k in weights]
    head = AestheticHead(state[weights[0]].shape[1], dims[:-1])
    head.load_state_dict(state)
    return head
