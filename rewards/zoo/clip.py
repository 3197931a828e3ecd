"""CLIP-family text-image rewards (CLIPScore, PickScore) and the backbones they share.

A :class:`TextImageBackbone` holds an image tower, a text tower and the model's preprocessing
constants: ``encode_image`` runs the differentiable torch preprocessing
(:mod:`rewards.preprocess`) and the image tower; ``encode_text`` embeds prompts once and caches
them per prompt string (prompts repeat across training steps; the text side needs no gradient).

Backends:

* ``"transformers"`` (default): a transformers ``CLIPModel`` (or a vision-only
  ``CLIPVisionModelWithProjection``), from a hub id / local folder or an already built model
  (tests build tiny ones from ``CLIPConfig``);
* ``"open_clip"``: an open_clip model, named ``"ViT-B-32:openai"`` (architecture:pretrained tag) or
  ``"hf-hub:<repo>"`` (extra ``clip``);
* ``"openai"``: OpenAI's ``clip`` package, named ``"ViT-B/32"`` (extra ``clip``).  Its checkpoints
  are TorchScript/pickle archives, so loading needs ``allow_pickle=True``.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from align.core.errors import AlignError, check_choice

from ..base import Reward, widen
from ..loading import from_pretrained, import_optional
from ..preprocess import OPENAI_CLIP_MEAN, OPENAI_CLIP_STD, ImagePreprocess
from ..registry import register_reward

BACKENDS = ("transformers", "open_clip", "openai")

#: CLIPScore (Hessel et al. 2021): ViT-B/32, w * max(cos, 0) with w = 2.5
CLIPSCORE_MODEL = "openai/clip-vit-base-patch32"
CLIPSCORE_WEIGHT = 2.5
#: PickScore (Kirstain et al. 2023): fine-tuned CLIP ViT-H/14 with the LAION ViT-H/14 processor
PICKSCORE_MODEL = "yuvalkirstain/PickScore_v1"
PICKSCORE_PROCESSOR = "laion/CLIP-ViT-H-14-laion2B-s32B-b79K"


class TextImageBackbone(nn.Module):
    """Image and text towers into a shared embedding space, with preprocessing and a prompt cache.

    Subclasses implement ``_image_features(pixels)`` (normalised pixels -> [B, D]),
    ``_text_features(prompts)`` (-> [K, D]) and ``logit_scale()``.
    """

    def __init__(self, preprocess: ImagePreprocess, *, max_cached_prompts: int = 4096):
        super().__init__()
        self.preprocess = preprocess
        self.max_cached_prompts = max_cached_prompts
        self._text_cache: OrderedDict[str, Tensor] = OrderedDict()
        self._cache_state: tuple | None = None

    def _image_features(self, pixels: Tensor) -> Tensor:
        raise NotImplementedError

    def _text_features(self, prompts: list[str]) -> Tensor:
        raise NotImplementedError

    def logit_scale(self) -> Tensor:
        raise NotImplementedError

    def _reference(self) -> Tensor:
        return next(self.parameters())

    def encode_image(self, images: Tensor) -> Tensor:
        """[B, 3, H, W] in [0, 1] -> unnormalised embeddings [B, D]; differentiable in the pixels."""
        ref = self._reference()
        return self._image_features(self.preprocess(images).to(ref.dtype))

    def encode_text(self, prompts: Sequence[str]) -> Tensor:
        """Unnormalised prompt embeddings [K, D], computed once per distinct prompt and cached."""
        ref = self._reference()
        state = (ref.device, ref.dtype)
        if state != self._cache_state:
            self._text_cache.clear()
            self._cache_state = state
        missing = list(dict.fromkeys(p for p in prompts if p not in self._text_cache))
        if missing:
            # prompts carry no gradient and the towers are frozen: no graph to keep
            with torch.no_grad():
                features = self._text_features(missing)
            for prompt, feature in zip(missing, features):
                self._text_cache[prompt] = feature
        for prompt in prompts:
            self._text_cache.move_to_end(prompt)
        out = torch.stack([self._text_cache[p] for p in prompts])
        while len(self._text_cache) > self.max_cached_prompts:
            self._text_cache.popitem(last=False)
        return out


def _default_preprocess(config) -> ImagePreprocess:
    vision = getattr(config, "vision_config", config)
    return ImagePreprocess(size=vision.image_size, crop_size=vision.image_size)


class HFClipBackbone(TextImageBackbone):
    """A transformers ``CLIPModel`` (text and image) or ``CLIPVisionModelWithProjection`` (image only)."""

    def __init__(self, model: nn.Module, tokenizer=None, preprocess: ImagePreprocess | None = None, **kwargs):
        super().__init__(preprocess or _default_preprocess(model.config), **kwargs)
        self.model = model
        self.tokenizer = tokenizer
        self.has_text = hasattr(model, "text_model")

    @classmethod
    def from_pretrained(
        cls,
        source: str,
        *,
        processor: str | None = None,
        vision_only: bool = False,
        offline: bool | None = None,
        revision: str | None = None,
    ) -> HFClipBackbone:
        """Load weights from ``source`` and tokenizer / image-processor constants from ``processor`` (default: source)."""
        from transformers import AutoTokenizer, CLIPModel, CLIPVisionModelWithProjection

        model_cls = CLIPVisionModelWithProjection if vision_only else CLIPModel
        model = from_pretrained(model_cls, source, offline=offline, revision=revision)
        processor = processor or source
        tokenizer = None if vision_only else from_pretrained(AutoTokenizer, processor, offline=offline)
        preprocess = ImagePreprocess.from_pretrained(processor, offline=offline)
        return cls(model, tokenizer, preprocess)

    def _image_features(self, pixels: Tensor) -> Tensor:
        if self.has_text:
            return self.model.visual_projection(self.model.vision_model(pixel_values=pixels).pooler_output)
        return self.model(pixel_values=pixels).image_embeds

    def _text_features(self, prompts: list[str]) -> Tensor:
        if not self.has_text or self.tokenizer is None:
            what = "has no text tower" if not self.has_text else "was built without a tokenizer (pass tokenizer=)"
            raise AlignError(f"{type(self.model).__name__} {what}; it cannot embed prompts")
        max_length = min(self.tokenizer.model_max_length, self.model.config.text_config.max_position_embeddings)
        tokens = self.tokenizer(
            prompts, padding="max_length", truncation=True, max_length=max_length, return_tensors="pt"
        ).to(self._reference().device)
        pooled = self.model.text_model(input_ids=tokens.input_ids, attention_mask=tokens.attention_mask).pooler_output
        return self.model.text_projection(pooled)

    def logit_scale(self) -> Tensor:
        return self.model.logit_scale


class EncodeBackbone(TextImageBackbone):
    """A model with ``encode_image`` / ``encode_text`` / ``logit_scale`` (open_clip, OpenAI clip)."""

    def __init__(self, model: nn.Module, tokenize: Callable[[list[str]], Tensor], preprocess: ImagePreprocess, **kw):
        super().__init__(preprocess, **kw)
        self.model = model
        self._tokenize = tokenize

    def _image_features(self, pixels: Tensor) -> Tensor:
        return self.model.encode_image(pixels)

    def _text_features(self, prompts: list[str]) -> Tensor:
        return self.model.encode_text(self._tokenize(prompts).to(self._reference().device))

    def logit_scale(self) -> Tensor:
        return self.model.logit_scale

    @classmethod
    def open_clip(cls, name: str, *, preprocess: ImagePreprocess | None = None) -> EncodeBackbone:
        """An open_clip model: ``"ViT-B-32:openai"`` (architecture:pretrained tag) or ``"hf-hub:<repo>"``."""
        open_clip = import_optional("open_clip", "clip", "the open_clip CLIP backend")
        if name.startswith("hf-hub:"):
            model, tokenizer = open_clip.create_model(name), open_clip.get_tokenizer(name)
        else:
            arch, _, tag = name.partition(":")
            model, tokenizer = open_clip.create_model(arch, pretrained=tag or None), open_clip.get_tokenizer(arch)
        if preprocess is None:
            size = model.visual.image_size
            size = size if isinstance(size, int) else size[0]
            mean = getattr(model.visual, "image_mean", None) or OPENAI_CLIP_MEAN
            std = getattr(model.visual, "image_std", None) or OPENAI_CLIP_STD
            preprocess = ImagePreprocess(size=size, crop_size=size, mean=tuple(mean), std=tuple(std))
        return cls(model.eval(), tokenizer, preprocess)

    @classmethod
    def openai_clip(cls, name: str, *, allow_pickle: bool = False, download_root: str | None = None) -> EncodeBackbone:
        """A model of OpenAI's ``clip`` package (``"ViT-B/32"``, ``"ViT-L/14"``, or a local file)."""
        if not allow_pickle:
            raise AlignError(
                f"OpenAI clip checkpoint {name!r} is a TorchScript/pickle archive, and loading it can run "
                "arbitrary code; pass allow_pickle=True if you trust it, or use backend='transformers'"
            )
        clip = import_optional("clip", "clip", "the OpenAI clip backend")
        model, _ = clip.load(name, device="cpu", jit=False, download_root=download_root)
        size = model.visual.input_resolution
        return cls(model.float().eval(), lambda p: clip.tokenize(p, truncate=True), ImagePreprocess(size, crop_size=size))


def clip_backbone(
    model: str | nn.Module,
    *,
    backend: str = "transformers",
    tokenizer=None,
    processor: str | None = None,
    preprocess: ImagePreprocess | None = None,
    vision_only: bool = False,
    offline: bool | None = None,
    revision: str | None = None,
    allow_pickle: bool = False,
) -> TextImageBackbone:
    """A backbone from a name (hub id / local folder / open_clip or OpenAI clip name) or a built model."""
    check_choice("backend", backend, BACKENDS)
    if isinstance(model, TextImageBackbone):
        return model
    if isinstance(model, nn.Module):
        return HFClipBackbone(model, tokenizer, preprocess)
    if not isinstance(model, str) or not model:
        raise AlignError(f"model={model!r} must be a hub id, a local folder, a model name, or a CLIP model")
    if backend == "open_clip":
        return EncodeBackbone.open_clip(model, preprocess=preprocess)
    if backend == "openai":
        return EncodeBackbone.openai_clip(model, allow_pickle=allow_pickle)
    backbone = HFClipBackbone.from_pretrained(
        model, processor=processor, vision_only=vision_only, offline=offline, revision=revision
    )
    if preprocess is not None:
        backbone.preprocess = preprocess
    return backbone


class TextImageReward(Reward):
    """A reward ``head(cos(image embedding, prompt embedding))`` on a :class:`TextImageBackbone`.

    ``info["cosine"]`` holds the cosine similarity.
    """

    def __init__(self, backbone: TextImageBackbone, **kwargs):
        super().__init__(**kwargs)
        self.backbone = backbone

    def _head(self, cosine: Tensor) -> Tensor:
        raise NotImplementedError

    def _score(self, images: Tensor, prompts: list[str]):
        image = F.normalize(self.backbone.encode_image(images), dim=-1)
        text = F.normalize(self.backbone.encode_text(prompts), dim=-1).to(image.dtype)
        cosine = (image * text).sum(-1)
        return self._head(cosine), {"cosine": cosine.detach()}

    def score_candidates(self, images: Tensor, candidates: Sequence[Sequence[str]]) -> list[Tensor]:
        """Each image embedded once, scored against all its candidate prompts (list of [K_i])."""
        self._prepare(images, None)
        if len(candidates) != images.shape[0]:
            raise AlignError(f"reward {self.name!r}: got {len(candidates)} candidate sets for {images.shape[0]} images")
        image = F.normalize(self.backbone.encode_image(images), dim=-1)
        out = []
        for i, prompts in enumerate(candidates):
            text = F.normalize(self.backbone.encode_text(list(prompts)), dim=-1).to(image.dtype)
            out.append(widen(self._head(text @ image[i])))
        return out


@register_reward("clipscore")
class ClipScore(TextImageReward):
    """CLIPScore: ``weight * max(cos(image, prompt), 0)`` (Hessel et al. 2021: ViT-B/32, weight 2.5;
    torchmetrics uses weight 100).

    Args:
        model: hub id / local folder, an open_clip or OpenAI clip name (see ``backend``), or a
            built transformers ``CLIPModel``.
        weight: the scale w.
        backend: "transformers", "open_clip" or "openai".
        tokenizer: the tokenizer, when ``model`` is a built model.
        preprocess: override the preprocessing read from the processor config.
    """

    name = "clipscore"

    def __init__(
        self,
        model: str | nn.Module = CLIPSCORE_MODEL,
        *,
        weight: float = CLIPSCORE_WEIGHT,
        backend: str = "transformers",
        tokenizer=None,
        processor: str | None = None,
        preprocess: ImagePreprocess | None = None,
        offline: bool | None = None,
        revision: str | None = None,
        allow_pickle: bool = False,
        **kwargs,
    ):
        backbone = clip_backbone(
            model, backend=backend, tokenizer=tokenizer, processor=processor, preprocess=preprocess,
            offline=offline, revision=revision, allow_pickle=allow_pickle,
        )
        super().__init__(backbone, **kwargs)
        self.weight = float(weight)

    def _head(self, cosine: Tensor) -> Tensor:
        return self.weight * cosine.clamp(min=0)


@register_reward("pickscore")
class PickScore(TextImageReward):
    """PickScore: ``exp(logit_scale) * cos(image, prompt)`` (about 0-26; Kirstain et al. 2023).

    Weights ``yuvalkirstain/PickScore_v1``; tokenizer and image constants from the LAION
    ViT-H/14 processor, as in the reference code.  Arguments as :class:`ClipScore`.
    """

    name = "pickscore"

    def __init__(
        self,
        model: str | nn.Module = PICKSCORE_MODEL,
        *,
        processor: str | None = PICKSCORE_PROCESSOR,
        tokenizer=None,
        preprocess: ImagePreprocess | None = None,
        offline: bool | None = None,
        revision: str | None = None,
        **kwargs,
    ):
        backbone = clip_backbone(
            model, tokenizer=tokenizer, processor=processor, preprocess=preprocess, offline=offline, revision=revision
        )
        super().__init__(backbone, **kwargs)

    def _head(self, cosine: Tensor) -> Tensor:
        return self.backbone.logit_scale().exp() * cosine
