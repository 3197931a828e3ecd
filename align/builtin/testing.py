"""Tiny, seeded diffusers pipelines built from config, for tests and CPU benchmarks.

They have the real architectures (UNet2DConditionModel, SD3Transformer2DModel, ...) at toy
sizes with random weights, and a word-level CLIP tokenizer made on the fly, so that every code
path used with real checkpoints runs offline in seconds.
"""

from __future__ import annotations

import inspect
import json
import tempfile
from collections.abc import Iterable
from pathlib import Path

import torch

DEFAULT_WORDS = (
    "a an the of on in with and photo picture image drawing painting "
    "red green blue yellow orange purple pink white black gray cyan magenta brown "
    "circle square triangle background shape small large big cat dog horse bird fish "
    "cute happy sad bright dark colorful simple animal"
).split()


def word_tokenizer(words: Iterable[str] = DEFAULT_WORDS, max_length: int = 16):
    """A CLIPTokenizer whose vocabulary holds ``words`` whole (unknown characters map to <|endoftext|>)."""
    from transformers import CLIPTokenizer

    words = sorted({w.lower() for w in words})
    vocab: dict[str, int] = {}

    def add(token: str) -> None:
        vocab.setdefault(token, len(vocab))

    for ch in sorted({c for w in words for c in w}):
        add(ch)
        add(ch + "</w>")
    merges: list[tuple[str, str]] = []
    seen = set()
    for word in words:
        parts = list(word[:-1]) + [word[-1] + "</w>"]
        while len(parts) > 1:
            pair = (parts[0], parts[1])
            if pair not in seen:
                seen.add(pair)
                merges.append(pair)
            parts = [parts[0] + parts[1]] + parts[2:]
            add(parts[0])
    add("<|startoftext|>")
    add("<|endoftext|>")
    if _takes_vocabulary(CLIPTokenizer):
        return CLIPTokenizer(vocab=vocab, merges=merges, model_max_length=max_length)
    # transformers 4.x reads the vocabulary from files only (same token ids)
    with tempfile.TemporaryDirectory() as folder:
        vocab_file, merges_file = Path(folder, "vocab.json"), Path(folder, "merges.txt")
        vocab_file.write_text(json.dumps(vocab))
        merges_file.write_text("#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in merges))
        return CLIPTokenizer(str(vocab_file), str(merges_file), model_max_length=max_length)


def _takes_vocabulary(tokenizer_cls) -> bool:
    """Whether the tokenizer builds from an in-memory vocabulary (transformers >= 5)."""
    return "vocab" in inspect.signature(tokenizer_cls.__init__).parameters


def _seed(seed: int) -> None:
    torch.manual_seed(seed)


def tiny_clip_text_encoder(vocab_size: int, hidden: int = 32, projection: int | None = None, seed: int = 0):
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    _seed(seed)
    config = CLIPTextConfig(
        bos_token_id=vocab_size - 2,
        eos_token_id=vocab_size - 1,
        pad_token_id=vocab_size - 1,
        hidden_size=hidden,
        intermediate_size=hidden * 2,
        num_attention_heads=4,
        num_hidden_layers=2,
        vocab_size=vocab_size,
        max_position_embeddings=32,
        projection_dim=projection or hidden,
        hidden_act="gelu",
    )
    cls = CLIPTextModelWithProjection if projection else CLIPTextModel
    return cls(config).eval()


def tiny_vae(latent_channels: int = 4, seed: int = 0, **extra):
    from diffusers import AutoencoderKL

    _seed(seed)
    return AutoencoderKL(
        block_out_channels=(8, 16),
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
        up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"),
        latent_channels=latent_channels,
        norm_num_groups=4,
        layers_per_block=1,
        sample_size=32,
        **extra,
    ).eval()


def tiny_sd_pipeline(seed: int = 0, prediction_type: str = "epsilon", sampler: str = "ddim"):
    """A StableDiffusionPipeline of a few hundred thousand parameters; 32 px images, 16x16 latents."""
    from diffusers import DDIMScheduler, DDPMScheduler, StableDiffusionPipeline, UNet2DConditionModel

    tokenizer = word_tokenizer()
    text_encoder = tiny_clip_text_encoder(len(tokenizer), seed=seed)
    _seed(seed + 1)
    unet = UNet2DConditionModel(
        block_out_channels=(16, 32),
        layers_per_block=1,
        sample_size=16,
        in_channels=4,
        out_channels=4,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=32,
        attention_head_dim=4,
        norm_num_groups=8,
    ).eval()
    scheduler_cls = DDPMScheduler if sampler == "ddpm" else DDIMScheduler
    scheduler = scheduler_cls(
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        clip_sample=False,
        prediction_type=prediction_type,
        **({"set_alpha_to_one": False, "steps_offset": 1} if scheduler_cls is DDIMScheduler else {}),
    )
    return StableDiffusionPipeline(
        unet=unet,
        scheduler=scheduler,
        vae=tiny_vae(seed=seed + 2),
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        safety_checker=None,
        feature_extractor=None,
        image_encoder=None,
        requires_safety_checker=False,
    )


def tiny_sdxl_pipeline(seed: int = 0):
    """A StableDiffusionXLPipeline with two tiny text encoders and the added (time, pooled) conditioning."""
    from diffusers import EulerDiscreteScheduler, StableDiffusionXLPipeline, UNet2DConditionModel

    tokenizer = word_tokenizer()
    te1 = tiny_clip_text_encoder(len(tokenizer), hidden=32, seed=seed)
    te2 = tiny_clip_text_encoder(len(tokenizer), hidden=32, projection=32, seed=seed + 3)
    _seed(seed + 1)
    unet = UNet2DConditionModel(
        block_out_channels=(16, 32),
        layers_per_block=1,
        sample_size=16,
        in_channels=4,
        out_channels=4,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        attention_head_dim=(2, 4),
        use_linear_projection=True,
        addition_embed_type="text_time",
        addition_time_embed_dim=8,
        transformer_layers_per_block=(1, 1),
        projection_class_embeddings_input_dim=32 + 6 * 8,
        cross_attention_dim=64,
        norm_num_groups=8,
    ).eval()
    # SDXL ships with Euler; the toolkit converts its config to DDIM for differentiable sampling
    scheduler = EulerDiscreteScheduler(
        beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", steps_offset=1,
        timestep_spacing="leading",
    )
    return StableDiffusionXLPipeline(
        vae=tiny_vae(seed=seed + 2),
        text_encoder=te1,
        text_encoder_2=te2,
        tokenizer=tokenizer,
        tokenizer_2=word_tokenizer(),
        unet=unet,
        scheduler=scheduler,
        force_zeros_for_empty_prompt=True,
    )


def tiny_sd3_pipeline(seed: int = 0, shift: float = 3.0):
    """A StableDiffusion3Pipeline (flow matching) with two tiny CLIP encoders and no T5 encoder."""
    from diffusers import FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel, StableDiffusion3Pipeline

    tokenizer = word_tokenizer()
    te1 = tiny_clip_text_encoder(len(tokenizer), hidden=32, projection=32, seed=seed)
    te2 = tiny_clip_text_encoder(len(tokenizer), hidden=32, projection=32, seed=seed + 3)
    _seed(seed + 1)
    transformer = SD3Transformer2DModel(
        sample_size=16,
        patch_size=2,
        in_channels=4,
        num_layers=2,
        attention_head_dim=8,
        num_attention_heads=4,
        caption_projection_dim=32,
        joint_attention_dim=64,
        pooled_projection_dim=64,
        out_channels=4,
    ).eval()
    vae = tiny_vae(seed=seed + 2, shift_factor=0.0609, scaling_factor=1.5035)
    return StableDiffusion3Pipeline(
        transformer=transformer,
        scheduler=FlowMatchEulerDiscreteScheduler(shift=shift),
        vae=vae,
        text_encoder=te1,
        tokenizer=tokenizer,
        text_encoder_2=te2,
        tokenizer_2=word_tokenizer(),
        text_encoder_3=None,
        tokenizer_3=None,
    )


def t5_word_tokenizer(words: Iterable[str] = DEFAULT_WORDS):
    """A T5 (unigram) tokenizer holding ``words`` whole, plus single letters for unknown words."""
    from transformers import T5TokenizerFast

    vocab = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0)]
    vocab += [("\u2581" + w, -1.0) for w in sorted(set(words))]
    vocab += [(c, -5.0) for c in "abcdefghijklmnopqrstuvwxyz"]
    if _takes_vocabulary(T5TokenizerFast):
        return T5TokenizerFast(vocab=vocab, extra_ids=0)
    # transformers 4.x: the same unigram model, pre-tokenizer and </s> suffix that 5.x builds from ``vocab``
    from tokenizers import Tokenizer, decoders, pre_tokenizers, processors
    from tokenizers.models import Unigram

    backend = Tokenizer(Unigram(vocab, unk_id=2, byte_fallback=False))
    backend.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.WhitespaceSplit(),
        pre_tokenizers.Metaspace(replacement="\u2581", prepend_scheme="always", split=True),
    ])
    backend.decoder = decoders.Metaspace(replacement="\u2581", prepend_scheme="always", split=True)
    backend.post_processor = processors.TemplateProcessing(
        single="$A </s>", pair="$A </s> $B </s>", special_tokens=[("</s>", 1)]
    )
    return T5TokenizerFast(tokenizer_object=backend, extra_ids=0, eos_token="</s>", unk_token="<unk>", pad_token="<pad>")


def tiny_flux_pipeline(seed: int = 0):
    """A FluxPipeline (guidance-distilled flow matching, packed latents) with tiny CLIP and T5 encoders."""
    from diffusers import FlowMatchEulerDiscreteScheduler, FluxPipeline, FluxTransformer2DModel
    from transformers import T5Config, T5EncoderModel

    tokenizer = word_tokenizer()
    clip = tiny_clip_text_encoder(len(tokenizer), hidden=32, seed=seed)
    t5_tok = t5_word_tokenizer()
    _seed(seed + 3)
    t5 = T5EncoderModel(
        T5Config(vocab_size=len(t5_tok), d_model=32, d_kv=8, d_ff=64, num_layers=1, num_heads=4)
    ).eval()
    _seed(seed + 1)
    transformer = FluxTransformer2DModel(
        patch_size=1,
        in_channels=16,
        num_layers=1,
        num_single_layers=1,
        attention_head_dim=16,
        num_attention_heads=2,
        joint_attention_dim=32,
        pooled_projection_dim=32,
        guidance_embeds=True,
        axes_dims_rope=(4, 6, 6),
    ).eval()
    vae = tiny_vae(seed=seed + 2, shift_factor=0.1159, scaling_factor=0.3611, use_quant_conv=False,
                   use_post_quant_conv=False)
    scheduler = FlowMatchEulerDiscreteScheduler(
        use_dynamic_shifting=True, base_image_seq_len=16, max_image_seq_len=256, base_shift=0.5, max_shift=1.15
    )
    return FluxPipeline(
        scheduler=scheduler, vae=vae, text_encoder=clip, tokenizer=tokenizer,
        text_encoder_2=t5, tokenizer_2=t5_tok, transformer=transformer,
    )


def tiny_pipeline(family: str = "sd", seed: int = 0, **kwargs):
    """Tiny pipeline of ``family`` in {'sd', 'sdxl', 'sd3', 'flux'}."""
    builders = {
        "sd": tiny_sd_pipeline,
        "sdxl": tiny_sdxl_pipeline,
        "sd3": tiny_sd3_pipeline,
        "flux": tiny_flux_pipeline,
    }
    if family not in builders:
        raise ValueError(f"family={family!r}; accepted: {sorted(builders)}")
    pipe = builders[family](seed=seed, **kwargs)
    pipe.set_progress_bar_config(disable=True)
    return pipe
