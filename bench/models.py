"""Models the benchmarks run on: real architectures built from config with random weights.

Speed and memory depend on the architecture and the tensor shapes, not on the weight values, so
random weights cost what trained ones cost.

* ``cpu-sd``: a Stable-Diffusion-architecture UNet scaled to the CPU (block_out_channels
  (64, 128, 256), two layers per block, cross-attention on the two upper levels, 32x32 latents),
  a VAE of SD's layout at half width and three levels (32x32 latents -> 128x128 images) and a
  two-layer CLIP text encoder (77 tokens, width 128).
* ``sd15`` / ``sdxl``: the SD 1.5 / SDXL UNet, VAE and text encoders at full size from the
  planner's presets (align/train/presets), for GPU rows.  The tokenizer is a small word-level CLIP
  tokenizer (the real vocabulary file cannot be downloaded here); it pads to 77 tokens, so the
  text encoders and the UNet see the shapes they see with the real tokenizer.
* ``tiny-sd`` / ``tiny-sdxl``: the test suite's tiny pipelines (:func:`align.builtin.testing.tiny_pipeline`),
  for smoke runs of the GPU scripts on the CPU (``bench/gpu/run.sh --smoke``).
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

MODELS = ("cpu-sd", "sd15", "sdxl", "tiny-sd", "tiny-sdxl")


def _text_encoder(cls_name: str, config: dict, vocab: int):
    import transformers

    cls = getattr(transformers, cls_name)
    config = {k: v for k, v in config.items() if not k.startswith("_") and k != "architectures"}
    # the word tokenizer's ids: keep the architecture, shrink nothing but the id range it uses
    config.update(bos_token_id=vocab - 2, eos_token_id=vocab - 1, pad_token_id=vocab - 1)
    return cls(cls.config_class(**config)).eval()


def _cpu_sd(seed: int):
    from diffusers import AutoencoderKL, DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    from align.builtin.testing import word_tokenizer

    tokenizer = word_tokenizer(max_length=77)
    torch.manual_seed(seed)
    text_encoder = CLIPTextModel(
        CLIPTextConfig(
            vocab_size=len(tokenizer), hidden_size=128, intermediate_size=512, num_attention_heads=4,
            num_hidden_layers=2, max_position_embeddings=77, bos_token_id=len(tokenizer) - 2,
            eos_token_id=len(tokenizer) - 1, pad_token_id=len(tokenizer) - 1, projection_dim=128,
        )
    ).eval()
    torch.manual_seed(seed + 1)
    unet = UNet2DConditionModel(
        sample_size=32, in_channels=4, out_channels=4, layers_per_block=2, block_out_channels=(64, 128, 256),
        down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=128, attention_head_dim=8, norm_num_groups=32,
    ).eval()
    torch.manual_seed(seed + 2)
    vae = AutoencoderKL(
        in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(32, 64, 64), layers_per_block=1,
        down_block_types=("DownEncoderBlock2D",) * 3, up_block_types=("UpDecoderBlock2D",) * 3,
        norm_num_groups=32, sample_size=128,
    ).eval()
    scheduler = DDIMScheduler(
        beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", clip_sample=False,
        set_alpha_to_one=False, steps_offset=1,
    )
    return StableDiffusionPipeline(
        unet=unet, vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, scheduler=scheduler,
        safety_checker=None, feature_extractor=None, image_encoder=None, requires_safety_checker=False,
    )


def _from_preset(name: str, seed: int, device: str):
    import diffusers

    from align.builtin.testing import word_tokenizer
    from align.train.plan import PRESET_DIR

    preset = json.loads((PRESET_DIR / f"{name}.json").read_text())
    index = preset["model_index"]
    tokenizer = word_tokenizer(max_length=77)
    components = {}
    with torch.device(device):
        torch.manual_seed(seed)
        for comp in ("text_encoder", "text_encoder_2"):
            if comp in preset:
                components[comp] = _text_encoder(index[comp][1], preset[comp], len(tokenizer))
        unet_config = {k: v for k, v in preset["unet"].items() if not k.startswith("_")}
        components["unet"] = diffusers.UNet2DConditionModel.from_config(unet_config).eval()
        vae_config = {k: v for k, v in preset["vae"].items() if not k.startswith("_")}
        components["vae"] = diffusers.AutoencoderKL.from_config(vae_config).eval()
    scheduler = diffusers.DDIMScheduler(
        beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", clip_sample=False,
        set_alpha_to_one=False, steps_offset=1,
    )
    if name == "sdxl":
        return diffusers.StableDiffusionXLPipeline(
            tokenizer=tokenizer, tokenizer_2=word_tokenizer(max_length=77), scheduler=scheduler, **components
        )
    return diffusers.StableDiffusionPipeline(
        tokenizer=tokenizer, scheduler=scheduler, safety_checker=None, feature_extractor=None, image_encoder=None,
        requires_safety_checker=False, **components,
    )


def bench_pipeline(name: str, seed: int = 0, device: str = "cpu"):
    """The benchmark pipeline ``name`` (see the module docstring), seeded, on ``device``."""
    if name == "cpu-sd":
        pipe = _cpu_sd(seed).to(device)
    elif name in ("sd15", "sdxl"):
        pipe = _from_preset(name, seed, device)
    elif name in ("tiny-sd", "tiny-sdxl"):
        from align.builtin.testing import tiny_pipeline

        pipe = tiny_pipeline(name.removeprefix("tiny-"), seed=seed).to(device)
    else:
        raise ValueError(f"model={name!r}; accepted: {', '.join(MODELS)}")
    pipe.set_progress_bar_config(disable=True)
    return pipe


def save_bench_pipeline(name: str, folder: str | Path, seed: int = 0) -> Path:
    """Save the pipeline as a diffusers folder (for tools that load from a path, e.g. TRL)."""
    folder = Path(folder)
    bench_pipeline(name, seed).save_pretrained(folder, safe_serialization=True)
    return folder
