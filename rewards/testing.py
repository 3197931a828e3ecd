"""Tiny, seeded reward models built from config, for tests and CPU examples.

Every CLIP-family reward of the zoo can be built at toy size (32 px images, 8 px patches,
width 32, 2 layers) with the word-level tokenizer of :mod:`align.builtin.testing`, so the real code
paths (preprocessing, towers, heads, the HPSv2 remap) run offline in milliseconds.
"""

from __future__ import annotations

from collections import OrderedDict

import torch
from torch import Tensor, nn

from align.builtin.testing import word_tokenizer

from .base import Reward

TINY_IMAGE_SIZE = 32
TINY_PATCH = 8
TINY_WIDTH = 32
TINY_HEADS = 4
TINY_LAYERS = 2
TINY_EMBED = 16
TINY_CONTEXT = 16


def tiny_clip_config(vocab_size: int, *, image_size: int = TINY_IMAGE_SIZE, hidden_act: str = "quick_gelu"):
    """A transformers ``CLIPConfig`` at toy size."""
    from transformers import CLIPConfig

    common = dict(
        hidden_size=TINY_WIDTH,
        intermediate_size=2 * TINY_WIDTH,
        num_hidden_layers=TINY_LAYERS,
        num_attention_heads=TINY_HEADS,
        hidden_act=hidden_act,
        projection_dim=TINY_EMBED,
    )
    return CLIPConfig(
        projection_dim=TINY_EMBED,
        text_config=dict(
            vocab_size=vocab_size,
            max_position_embeddings=TINY_CONTEXT,
            bos_token_id=vocab_size - 2,
            eos_token_id=vocab_size - 1,
            pad_token_id=vocab_size - 1,
            **common,
        ),
        vision_config=dict(image_size=image_size, patch_size=TINY_PATCH, **common),
    )


def tiny_clip(seed: int = 0, *, vision_only: bool = False):
    """(model, tokenizer): a seeded random ``CLIPModel`` (or ``CLIPVisionModelWithProjection``)."""
    from transformers import CLIPModel, CLIPVisionModelWithProjection

    tokenizer = word_tokenizer(max_length=TINY_CONTEXT)
    config = tiny_clip_config(len(tokenizer))
    torch.manual_seed(seed)
    model = CLIPVisionModelWithProjection(config.vision_config) if vision_only else CLIPModel(config)
    return model.eval(), tokenizer


class _OpenClipBlock(nn.Module):
    """open_clip's ResidualAttentionBlock: pre-LayerNorm, packed-qkv attention, GELU MLP."""

    def __init__(self, width: int, heads: int):
        super().__init__()
        self.ln_1 = nn.LayerNorm(width)
        self.attn = nn.MultiheadAttention(width, heads, batch_first=True)
        self.ln_2 = nn.LayerNorm(width)
        self.mlp = nn.Sequential(
            OrderedDict(c_fc=nn.Linear(width, 4 * width), gelu=nn.GELU(), c_proj=nn.Linear(4 * width, width))
        )

    def forward(self, x: Tensor, mask: Tensor | None = None) -> Tensor:
        h = self.ln_1(x)
        x = x + self.attn(h, h, h, need_weights=False, attn_mask=mask)[0]
        return x + self.mlp(self.ln_2(x))


class _OpenClipTransformer(nn.Module):
    def __init__(self, width: int, layers: int, heads: int):
        super().__init__()
        self.resblocks = nn.ModuleList(_OpenClipBlock(width, heads) for _ in range(layers))

    def forward(self, x: Tensor, mask: Tensor | None = None) -> Tensor:
        for block in self.resblocks:
            x = block(x, mask)
        return x


class _OpenClipVisual(nn.Module):
    def __init__(self, image_size: int, patch: int, width: int, layers: int, heads: int, embed: int):
        super().__init__()
        self.conv1 = nn.Conv2d(3, width, patch, stride=patch, bias=False)
        self.class_embedding = nn.Parameter(torch.randn(width) * width**-0.5)
        self.positional_embedding = nn.Parameter(torch.randn((image_size // patch) ** 2 + 1, width) * width**-0.5)
        self.ln_pre = nn.LayerNorm(width)
        self.transformer = _OpenClipTransformer(width, layers, heads)
        self.ln_post = nn.LayerNorm(width)
        self.proj = nn.Parameter(torch.randn(width, embed) * width**-0.5)

    def forward(self, pixels: Tensor) -> Tensor:
        x = self.conv1(pixels).flatten(2).transpose(1, 2)
        x = torch.cat([self.class_embedding.expand(x.shape[0], 1, -1), x], dim=1) + self.positional_embedding
        x = self.transformer(self.ln_pre(x))
        return self.ln_post(x[:, 0]) @ self.proj


class OpenClipLayoutCLIP(nn.Module):
    """A minimal CLIP with open_clip's parameter names and computation (ViT, exact GELU).

    A reference written independently of the remap in :mod:`rewards.zoo.hps`: its
    ``state_dict()`` has the layout of an HPSv2 checkpoint, and ``encode_image`` /
    ``encode_text`` (token ids [K, context], pooled at the highest id, the end-of-text token)
    are what the remapped transformers model must reproduce.
    """

    def __init__(
        self,
        vocab_size: int,
        *,
        image_size: int = TINY_IMAGE_SIZE,
        patch: int = TINY_PATCH,
        width: int = TINY_WIDTH,
        layers: int = TINY_LAYERS,
        heads: int = TINY_HEADS,
        embed: int = TINY_EMBED,
        context: int = TINY_CONTEXT,
    ):
        super().__init__()
        self.visual = _OpenClipVisual(image_size, patch, width, layers, heads, embed)
        self.token_embedding = nn.Embedding(vocab_size, width)
        self.positional_embedding = nn.Parameter(torch.randn(context, width) * 0.01)
        self.transformer = _OpenClipTransformer(width, layers, heads)
        self.ln_final = nn.LayerNorm(width)
        self.text_projection = nn.Parameter(torch.randn(width, embed) * width**-0.5)
        self.logit_scale = nn.Parameter(torch.tensor(4.6052))
        for p in self.parameters():  # move LayerNorms and biases away from their trivial init
            if p.ndim == 1:
                p.data.add_(0.1 * torch.randn_like(p))

    def encode_image(self, pixels: Tensor) -> Tensor:
        return self.visual(pixels)

    def encode_text(self, tokens: Tensor) -> Tensor:
        n = tokens.shape[1]
        causal = torch.full((n, n), float("-inf")).triu(1)
        x = self.token_embedding(tokens) + self.positional_embedding[:n]
        x = self.ln_final(self.transformer(x, causal))
        return x[torch.arange(x.shape[0]), tokens.argmax(-1)] @ self.text_projection


def tiny_openclip_checkpoint(vocab_size: int, seed: int = 0) -> dict[str, Tensor]:
    """The state dict of a seeded :class:`OpenClipLayoutCLIP` (an HPSv2-shaped checkpoint)."""
    torch.manual_seed(seed)
    return OpenClipLayoutCLIP(vocab_size).state_dict()


def tiny_rewards(seed: int = 0) -> dict[str, Reward]:
    """Every model-based zoo reward at toy size, keyed by registry name (no downloads)."""
    from .zoo.aesthetic import Aesthetic, AestheticHead
    from .zoo.clip import ClipScore, PickScore
    from .zoo.hps import HPSv2

    clip, tokenizer = tiny_clip(seed)
    vision, _ = tiny_clip(seed + 1, vision_only=True)
    torch.manual_seed(seed + 2)
    head = AestheticHead(TINY_EMBED)
    checkpoint = tiny_openclip_checkpoint(len(tokenizer), seed + 3)
    pick, _ = tiny_clip(seed + 4)
    tiny_heads = {"vision_heads": TINY_HEADS, "text_heads": TINY_HEADS}
    rewards = {
        "clipscore": ClipScore(clip, tokenizer=tokenizer),
        "pickscore": PickScore(pick, tokenizer=tokenizer, processor=None),
        "aesthetic": Aesthetic(vision, head=head),
        "hpsv2": HPSv2("v2.0", checkpoint=checkpoint, tokenizer=tokenizer, **tiny_heads),
        "hpsv2.1": HPSv2("v2.1", checkpoint=checkpoint, tokenizer=tokenizer, **tiny_heads),
    }
    return {name: reward.freeze() for name, reward in rewards.items()}


#: special tokens of the Qwen chat format and of the models built on it
QWEN_SPECIAL_TOKENS = (
    "<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|vision_start|>", "<|vision_end|>", "<|image_pad|>",
    "<|video_pad|>",
)


def byte_tokenizer(special_tokens=QWEN_SPECIAL_TOKENS, words=()):
    """A byte-level tokenizer without merges (one token per UTF-8 byte) plus ``special_tokens`` and whole
    ``words`` (added tokens: "Yes" as one token, as in real vocabularies); pads with the first special token."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    backend = Tokenizer(models.BPE(vocab={ch: i for i, ch in enumerate(alphabet)}, merges=[]))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    backend.decoder = decoders.ByteLevel()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend)
    tokenizer.add_special_tokens({"additional_special_tokens": list(special_tokens)})
    if words:
        tokenizer.add_tokens(list(words))
    tokenizer.pad_token = special_tokens[0]
    return tokenizer


def tiny_qwen2_vl_config(tokenizer):
    """A transformers ``Qwen2VLConfig`` at toy size whose special token ids are ``tokenizer``'s."""
    from transformers import Qwen2VLConfig

    ids = {name: tokenizer.convert_tokens_to_ids(token) for name, token in (
        ("image_token_id", "<|image_pad|>"), ("video_token_id", "<|video_pad|>"),
        ("vision_start_token_id", "<|vision_start|>"), ("vision_end_token_id", "<|vision_end|>"))}
    return Qwen2VLConfig(
        text_config=dict(
            vocab_size=len(tokenizer), hidden_size=TINY_WIDTH, intermediate_size=2 * TINY_WIDTH,
            num_hidden_layers=TINY_LAYERS, num_attention_heads=TINY_HEADS, num_key_value_heads=2,
            max_position_embeddings=2048, pad_token_id=tokenizer.pad_token_id,
            bos_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.convert_tokens_to_ids("<|im_end|>"),
            rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [1, 1, 2]},
        ),
        vision_config=dict(depth=TINY_LAYERS, embed_dim=TINY_WIDTH, hidden_size=TINY_WIDTH, num_heads=TINY_HEADS,
                           mlp_ratio=2, patch_size=14, spatial_merge_size=2, temporal_patch_size=2),
        **ids,
    )
