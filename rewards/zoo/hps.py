"""Human Preference Score v2 / v2.1 (Wu et al. 2023): a fine-tuned open_clip ViT-H-14.

Score = cos(image embedding, prompt embedding), without the logit scale.  v2.0 and v2.1 are
different checkpoints whose scores are not comparable.  Preprocessing differs from CLIP: the
LONGEST side is resized to 224 (bicubic) and the image zero-padded to a square (open_clip's
``ResizeMaxSize``).

Two backends:

* ``"transformers"`` (default, no extra needed): the open_clip state dict is remapped into a
  transformers ``CLIPModel`` (:func:`openclip_to_transformers`).  The architectures are the same
  (pre-LayerNorm ViT and causal text transformer, exact GELU for ViT-H-14, class-token /
  end-of-text pooling, projections without bias); open_clip packs q, k, v in one
  ``in_proj_weight`` (split here in that order) and stores projections as [in, out] matrices
  (transposed here).  Parity is tested against an open_clip-layout reference built from
  ``nn.MultiheadAttention`` on a tiny state dict.  The tokenizer is the Hugging Face
  ``CLIPTokenizer`` of ``laion/CLIP-ViT-H-14-laion2B-s32B-b79K`` (the same BPE as open_clip's;
  open_clip additionally applies ftfy text fixing).
* ``"open_clip"``: open_clip itself (extra ``clip``).
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from pathlib import Path

from torch import Tensor, nn

from align.core.errors import AlignError, check_choice

from ..loading import from_pretrained, import_optional, load_state_dict, resolve_file
from ..preprocess import ImagePreprocess
from ..registry import register_reward
from .clip import EncodeBackbone, HFClipBackbone, TextImageReward

#: released checkpoints (xswu/HPSv2 on the hub, Apache-2.0)
HPS_CHECKPOINTS = {
    "v2.0": "xswu/HPSv2/HPS_v2_compressed.pt",
    "v2.1": "xswu/HPSv2/HPS_v2.1_compressed.pt",
}
HPS_TOKENIZER = "laion/CLIP-ViT-H-14-laion2B-s32B-b79K"
HPS_ARCH = "ViT-H-14"
#: attention heads of open_clip ViT-H-14 (head width 80 in the image tower, 64 in the text tower);
#: everything else is read off the state dict's shapes
VIT_H_14_HEADS = {"vision_heads": 16, "text_heads": 16}

_BLOCK_PARTS = {
    "ln_1": "layer_norm1",
    "ln_2": "layer_norm2",
    "mlp.c_fc": "mlp.fc1",
    "mlp.c_proj": "mlp.fc2",
    "attn.out_proj": "self_attn.out_proj",
}
_DIRECT = {
    "visual.class_embedding": "vision_model.embeddings.class_embedding",
    "visual.conv1.weight": "vision_model.embeddings.patch_embedding.weight",
    "visual.positional_embedding": "vision_model.embeddings.position_embedding.weight",
    "visual.ln_pre.weight": "vision_model.pre_layrnorm.weight",
    "visual.ln_pre.bias": "vision_model.pre_layrnorm.bias",
    "visual.ln_post.weight": "vision_model.post_layernorm.weight",
    "visual.ln_post.bias": "vision_model.post_layernorm.bias",
    "token_embedding.weight": "text_model.embeddings.token_embedding.weight",
    "positional_embedding": "text_model.embeddings.position_embedding.weight",
    "ln_final.weight": "text_model.final_layer_norm.weight",
    "ln_final.bias": "text_model.final_layer_norm.bias",
    "logit_scale": "logit_scale",
}
_BLOCK = re.compile(r"^(visual\.)?transformer\.resblocks\.(\d+)\.(.+)$")


def openclip_to_transformers(state: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """Rename an open_clip ViT CLIP state dict to transformers ``CLIPModel`` keys (see module doc)."""
    out: dict[str, Tensor] = {}
    unknown = []
    for key, value in state.items():
        block = _BLOCK.match(key)
        if key in _DIRECT:
            out[_DIRECT[key]] = value
        elif key in ("visual.proj", "text_projection"):  # [width, embed] parameters -> Linear [embed, width]
            out["visual_projection.weight" if key == "visual.proj" else "text_projection.weight"] = value.t()
        elif key == "text_projection.weight":  # open_clip configs with a Linear text projection
            out["text_projection.weight"] = value
        elif key == "attn_mask":  # causal mask buffer of old open_clip versions; transformers builds its own
            continue
        elif block:
            tower, index, part = block.groups()
            prefix = f"{'vision_model' if tower else 'text_model'}.encoder.layers.{index}."
            if part in ("attn.in_proj_weight", "attn.in_proj_bias"):
                kind = part.rsplit("_", 1)[1]
                for name, chunk in zip(("q_proj", "k_proj", "v_proj"), value.chunk(3, dim=0)):
                    out[f"{prefix}self_attn.{name}.{kind}"] = chunk
            else:
                module, _, kind = part.rpartition(".")
                if module not in _BLOCK_PARTS:
                    unknown.append(key)
                    continue
                out[f"{prefix}{_BLOCK_PARTS[module]}.{kind}"] = value
        else:
            unknown.append(key)
    if unknown:
        raise AlignError(
            f"open_clip state dict has keys this remap does not know: {unknown[:8]}; only ViT CLIP models "
            "(class-token pooling, no attention pooling) are supported"
        )
    return out


def _num_layers(state: Mapping[str, Tensor], prefix: str) -> int:
    indices = {int(m.group(2)) for k in state if (m := _BLOCK.match(k)) and bool(m.group(1)) == (prefix == "visual.")}
    return max(indices) + 1 if indices else 0


def openclip_clip_config(
    state: Mapping[str, Tensor], *, vision_heads: int, text_heads: int, hidden_act: str = "gelu"
):
    """The transformers ``CLIPConfig`` of an open_clip ViT state dict (head counts are not in the shapes)."""
    from transformers import CLIPConfig

    conv = state["visual.conv1.weight"]
    patch, vision_width = conv.shape[-1], conv.shape[0]
    grid = int(round((state["visual.positional_embedding"].shape[0] - 1) ** 0.5))
    vocab, text_width = state["token_embedding.weight"].shape
    embed_dim = state["visual.proj"].shape[1]
    return CLIPConfig(
        projection_dim=embed_dim,
        logit_scale_init_value=float(state["logit_scale"]) if "logit_scale" in state else 2.6592,
        vision_config=dict(
            hidden_size=vision_width,
            intermediate_size=state["visual.transformer.resblocks.0.mlp.c_fc.weight"].shape[0],
            num_hidden_layers=_num_layers(state, "visual."),
            num_attention_heads=vision_heads,
            patch_size=patch,
            image_size=patch * grid,
            hidden_act=hidden_act,
            projection_dim=embed_dim,
        ),
        text_config=dict(
            vocab_size=vocab,
            hidden_size=text_width,
            intermediate_size=state["transformer.resblocks.0.mlp.c_fc.weight"].shape[0],
            num_hidden_layers=_num_layers(state, ""),
            num_attention_heads=text_heads,
            max_position_embeddings=state["positional_embedding"].shape[0],
            hidden_act=hidden_act,
            # the CLIP BPE puts <|startoftext|>, <|endoftext|> last; pooling at the first
            # end-of-text token equals open_clip's argmax pooling
            bos_token_id=vocab - 2,
            eos_token_id=vocab - 1,
            pad_token_id=vocab - 1,
            projection_dim=embed_dim,
        ),
    )


def openclip_as_transformers(
    state: Mapping[str, Tensor], *, vision_heads: int, text_heads: int, hidden_act: str = "gelu"
) -> nn.Module:
    """A transformers ``CLIPModel`` holding an open_clip ViT state dict (float32, eval mode)."""
    from accelerate import init_empty_weights
    from transformers import CLIPModel

    config = openclip_clip_config(state, vision_heads=vision_heads, text_heads=text_heads, hidden_act=hidden_act)
    with init_empty_weights():  # parameters on the meta device: no time spent on a random init
        model = CLIPModel(config)
    remapped = {k: v.float() for k, v in openclip_to_transformers(state).items()}
    expected = {k for k, _ in model.named_parameters()}
    missing = sorted(expected - set(remapped))
    if missing:
        raise AlignError(f"open_clip state dict lacks weights for {missing[:8]}")
    model.load_state_dict(remapped, strict=False, assign=True)
    return model.eval()


@register_reward("hpsv2")
class HPSv2(TextImageReward):
    """HPSv2 score: cos(image, prompt) of the HPS fine-tuned ViT-H-14 (about 0.2-0.35).

    Args:
        version: "v2.0" or "v2.1" (registered as "hpsv2" and "hpsv2.1").
        checkpoint: the open_clip checkpoint: local file, ``owner/repo/filename`` on the hub, or a
            state dict (default: the released one for ``version``).
        backend: "transformers" (remapped, no extra) or "open_clip".
        tokenizer: tokenizer hub id / folder, or a tokenizer object (transformers backend).
        vision_heads, text_heads: attention heads of the architecture (ViT-H-14: 16, 16).
        hidden_act: activation of the architecture (ViT-H-14: "gelu").
        image_size: side of the square input (default: read off the checkpoint).
    """

    name = "hpsv2"

    def __init__(
        self,
        version: str = "v2.0",
        *,
        checkpoint: str | Path | Mapping[str, Tensor] | None = None,
        backend: str = "transformers",
        tokenizer=HPS_TOKENIZER,
        vision_heads: int = VIT_H_14_HEADS["vision_heads"],
        text_heads: int = VIT_H_14_HEADS["text_heads"],
        hidden_act: str = "gelu",
        offline: bool | None = None,
        revision: str | None = None,
        allow_pickle: bool = False,
        **kwargs,
    ):
        check_choice("version", version, tuple(HPS_CHECKPOINTS))
        check_choice("backend", backend, ("transformers", "open_clip"))
        checkpoint = HPS_CHECKPOINTS[version] if checkpoint is None else checkpoint
        if isinstance(checkpoint, Mapping):
            state = dict(checkpoint)
        else:
            state = load_state_dict(resolve_file(checkpoint, offline=offline, revision=revision), allow_pickle=allow_pickle)
        if backend == "open_clip":
            backbone = _open_clip_backbone(state)
        else:
            model = openclip_as_transformers(state, vision_heads=vision_heads, text_heads=text_heads, hidden_act=hidden_act)
            if isinstance(tokenizer, str):
                from transformers import AutoTokenizer

                tokenizer = from_pretrained(AutoTokenizer, tokenizer, offline=offline)
            size = model.config.vision_config.image_size
            backbone = HFClipBackbone(model, tokenizer, _hps_preprocess(size))
        super().__init__(backbone, **kwargs)
        self.version = version
        self.name = "hpsv2" if version == "v2.0" else "hpsv2.1"

    def _head(self, cosine: Tensor) -> Tensor:
        return cosine


def _hps_preprocess(size: int) -> ImagePreprocess:
    return ImagePreprocess(size=size, resize_mode="longest", crop_size=size, fill=0.0)


def _open_clip_backbone(state: Mapping[str, Tensor]) -> EncodeBackbone:
    open_clip = import_optional("open_clip", "clip", "HPSv2 with backend='open_clip'")
    model = open_clip.create_model(HPS_ARCH, pretrained=None)
    model.load_state_dict(state)
    size = model.visual.image_size
    size = size if isinstance(size, int) else size[0]
    return EncodeBackbone(model.float().eval(), open_clip.get_tokenizer(HPS_ARCH), _hps_preprocess(size))


@register_reward("hpsv2.1")
def hpsv2_1(**kwargs) -> HPSv2:
    """HPSv2.1 (the v2.1 checkpoint); arguments as :class:`HPSv2`."""
    return HPSv2("v2.1", **kwargs)


