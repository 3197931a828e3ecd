"""Train the built-in model: a tiny text-to-image Stable Diffusion pipeline of coloured shapes.

The script renders its own dataset (:mod:`align.builtin.shapes_world`: a circle, square or triangle of one of
8 colours on a background of another, prompts like "a red circle on a blue background"),
then trains, on the CPU and seeded:

1. an AutoencoderKL (64 px images <-> 16x16x4 latents) with an L1 reconstruction loss, a
   small KL penalty and, over the first half, a loss that ties latent channels 0-2 to the
   4x-downsampled image (so that colours are learnt in hundreds of steps, not thousands); its ``scaling_factor`` is set to
   1 / std of the dataset's latents;
2. a UNet2DConditionModel (epsilon prediction, min-SNR-5 weighted, SD's scaled-linear betas)
   jointly with a 2-layer CLIPTextModel over a word-level CLIPTokenizer.  The prompt is
   replaced by "" 10% of the time so that classifier-free guidance works.  The text encoder is
   trained, not frozen: a random encoder would have to carry "which colour is the shape and
   which the background" by chance, and the tiny UNet learns faster from trained embeddings.
   An exponential moving average of the weights is what is saved.

It then measures prompt following with the toolkit's own sampling loop (DDIM, CFG) and the
shapes classifier, and saves a StableDiffusionPipeline (DDIMScheduler, no safety checker,
float32 safetensors) to ``align/builtin/shapes/``.

Rebuild (about an hour on one CPU thread)::

    python scripts/train_builtin_model.py

``--quick`` runs a few minutes with fewer steps, to check that the losses fall.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm import tqdm

from align.builtin import shapes_world as shapes
from align.builtin.testing import tiny_clip_text_encoder, word_tokenizer
from align.core.models import DiffusionModel, builtin_model_path

IMAGE_SIZE = 64
MAX_TOKENS = 16
TEXT_HIDDEN = 64
P_UNCOND = 0.1
MIN_SNR_GAMMA = 5.0


def build_vae():
    from diffusers import AutoencoderKL

    return AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * 3,
        up_block_types=("UpDecoderBlock2D",) * 3,
        block_out_channels=(16, 32, 32),
        layers_per_block=1,
        latent_channels=4,
        # one group: GroupNorm over few channels per group erases the absolute colour of flat regions
        norm_num_groups=1,
        sample_size=IMAGE_SIZE,
        mid_block_add_attention=False,
    )


def build_unet(addition_text_embedding: bool):
    from diffusers import UNet2DConditionModel

    extra = {"addition_embed_type": "text", "addition_embed_type_num_heads": 4} if addition_text_embedding else {}
    return UNet2DConditionModel(
        sample_size=IMAGE_SIZE // 4,
        in_channels=4,
        out_channels=4,
        block_out_channels=(16, 32, 64),
        down_block_types=("DownBlock2D", "DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D", "UpBlock2D"),
        layers_per_block=1,
        cross_attention_dim=TEXT_HIDDEN,
        attention_head_dim=8,
        norm_num_groups=2,
        **extra,
    )


def build_scheduler():
    from diffusers import DDIMScheduler

    # Stable Diffusion 1.x's noise schedule and DDIM settings
    return DDIMScheduler(
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        clip_sample=False,
        set_alpha_to_one=False,
        steps_offset=1,
        prediction_type="epsilon",
    )


def lr_at(step: int, total: int, peak: float, warmup: int = 200) -> float:
    """Linear warm-up, then cosine decay to 10% of ``peak``."""
    if step < warmup:
        return peak * (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return peak * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress)))


def set_lr(optimizer, lr: float) -> None:
    for group in optimizer.param_groups:
        group["lr"] = lr


def render_batch(n: int, generator: torch.Generator) -> tuple[torch.Tensor, list[str]]:
    pool = shapes.TRAIN_SCENES
    idx = torch.randint(len(pool), (n,), generator=generator).tolist()
    scenes = [pool[i] for i in idx]
    return shapes.render(scenes, IMAGE_SIZE, generator=generator), [s.prompt for s in scenes]


def train_vae(vae, steps: int, batch_size: int, lr: float, kl_weight: float, generator) -> float:
    optimizer = torch.optim.AdamW(vae.parameters(), lr=lr, weight_decay=0.0)
    vae.train()
    bar = tqdm(range(steps), desc="vae", mininterval=10, file=sys.stdout)
    avg = None
    for step in bar:
        set_lr(optimizer, lr_at(step, steps, lr, warmup=50))
        images, _ = render_batch(batch_size, generator)
        x = images * 2 - 1
        posterior = vae.encode(x).latent_dist
        z = posterior.mean + posterior.std * torch.randn(posterior.mean.shape, generator=generator)
        recon = vae.decode(z).sample
        rec = (recon - x).abs().mean()
        # anchoring three latent channels to the 4x-downsampled image gets colours right within a
        # few hundred steps (instead of thousands); released over the first half of training so
        # that the latents can then also carry sharp corners
        anchor = (posterior.mean[:, :3] - F.avg_pool2d(x, 4)).square().mean()
        anchor_weight = max(0.0, 1.0 - step / (0.5 * steps))
        loss = rec + anchor_weight * anchor + kl_weight * posterior.kl().mean()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        avg = rec.item() if avg is None else 0.98 * avg + 0.02 * rec.item()
        bar.set_postfix(l1=f"{avg:.4f}", refresh=False)
    vae.eval()
    return avg


@torch.no_grad()
def encode_dataset(vae, n: int, generator, chunk: int = 256) -> tuple[torch.Tensor, list[str]]:
    latents, prompts = [], []
    for start in tqdm(range(0, n, chunk), desc="encode", mininterval=10, file=sys.stdout):
        images, p = render_batch(min(chunk, n - start), generator)
        latents.append(vae.encode(images * 2 - 1).latent_dist.mean)
        prompts += p
    return torch.cat(latents), prompts


def train_denoiser(
    unet, text_encoder, tokenizer, latents, prompts, scheduler, *, steps, batch_size, lr, ema_decay, generator
) -> tuple[float, dict]:
    """Epsilon-prediction training of ``unet`` and ``text_encoder``; returns (final loss, EMA state)."""
    distinct = sorted(set(prompts))
    index = {p: i for i, p in enumerate(distinct)}
    prompt_ids = torch.tensor([index[p] for p in prompts])

    def tokenize(texts):
        return tokenizer(
            texts, padding="max_length", max_length=tokenizer.model_max_length, truncation=True, return_tensors="pt"
        ).input_ids

    tokens = tokenize(distinct)
    empty = tokenize([""])
    acp = scheduler.alphas_cumprod.float()
    snr = acp / (1 - acp)
    weight = snr.clamp(max=MIN_SNR_GAMMA) / snr  # min-SNR weighting for epsilon prediction

    modules = torch.nn.ModuleDict({"unet": unet, "text_encoder": text_encoder})
    params = [p for p in modules.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=0.01)
    ema = {k: v.detach().clone() for k, v in modules.state_dict().items()}
    modules.train()
    bar = tqdm(range(steps), desc="unet", mininterval=10, file=sys.stdout)
    avg = None
    for step in bar:
        set_lr(optimizer, lr_at(step, steps, lr))
        idx = torch.randint(len(latents), (batch_size,), generator=generator)
        x0 = latents[idx]
        ids = tokens[prompt_ids[idx]]
        drop = torch.rand(batch_size, generator=generator) < P_UNCOND
        ids = torch.where(drop[:, None], empty, ids)
        t = torch.randint(len(acp), (batch_size,), generator=generator)
        noise = torch.randn(x0.shape, generator=generator)
        a = acp[t].view(-1, 1, 1, 1)
        x_t = a.sqrt() * x0 + (1 - a).sqrt() * noise
        states = text_encoder(ids)[0]
        pred = unet(x_t, t, states).sample
        per_sample = (pred - noise).square().mean(dim=(1, 2, 3))
        loss = (weight[t] * per_sample).mean()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        decay = min(ema_decay, (1 + step) / (10 + step))
        with torch.no_grad():
            for k, v in modules.state_dict().items():
                if v.dtype.is_floating_point:
                    ema[k].lerp_(v, 1 - decay)
                else:
                    ema[k].copy_(v)
        mse = per_sample.mean().item()
        avg = mse if avg is None else 0.99 * avg + 0.01 * mse
        bar.set_postfix(mse=f"{avg:.4f}", refresh=False)
    modules.eval()
    return avg, ema


def evaluate(pipe, guidance_scales, num_steps: int, n_train: int, n_heldout: int) -> dict:
    model = DiffusionModel(pipe)
    results = {}
    for g in guidance_scales:
        for name, prompts in (
            ("train", shapes.sample_prompts(n_train, seed=123)),
            ("heldout", shapes.sample_prompts(n_heldout, seed=456, heldout=True)),
        ):
            acc = shapes.prompt_following(model, prompts, num_steps=num_steps, guidance_scale=g, seed=7).accuracy
            results[f"{name}@{g}"] = acc
            print(
                f"prompt following ({name} prompts, n={len(prompts)}, DDIM {num_steps} steps, CFG {g}): "
                + ", ".join(f"{k} {v:.1%}" for k, v in acc.items()),
                flush=True,
            )
    return results


def write_slow_tokenizer_files(folder: Path) -> None:
    """Write vocab.json and merges.txt beside tokenizer.json: transformers < 5 loads CLIPTokenizer from them."""
    bpe = json.loads((folder / "tokenizer.json").read_text())["model"]
    (folder / "vocab.json").write_text(json.dumps(bpe["vocab"], indent=0) + "\n")
    merges = [m if isinstance(m, str) else " ".join(m) for m in bpe["merges"]]
    (folder / "merges.txt").write_text("\n".join(["#version: 0.2", *merges]) + "\n")


#: the level transformers 4.x CLIPTextModel names its weights under (5.x flattened it away)
CLIP_TEXT_PREFIX = "text_model."


def write_portable_text_encoder(folder: Path) -> None:
    """Rewrite ``folder/model.safetensors`` (a CLIPTextModel) with every key under ``text_model.``.

    transformers 5 saves CLIPTextModel's weights flattened (``embeddings...``); transformers
    4.x does not recognise those names and silently re-initialises the whole encoder.  The
    ``text_model.`` layout is what 4.x saves and what 5.x maps back on load, so every version
    loads it.  The tensors are written unchanged.
    """
    from safetensors.torch import load_file, save_file

    path = folder / "model.safetensors"
    state = load_file(str(path))
    portable = {k if k.startswith(CLIP_TEXT_PREFIX) else CLIP_TEXT_PREFIX + k: v for k, v in state.items()}
    save_file(portable, str(path), metadata={"format": "pt"})


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=str(builtin_model_path("shapes")), help="output folder")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    parser.add_argument("--vae-steps", type=int, default=2000)
    parser.add_argument("--vae-batch", type=int, default=16)
    parser.add_argument("--vae-lr", type=float, default=2e-3)
    parser.add_argument("--kl-weight", type=float, default=1e-5)
    parser.add_argument("--dataset", type=int, default=40000, help="rendered images for the UNet")
    parser.add_argument("--unet-steps", type=int, default=10000)
    parser.add_argument("--unet-batch", type=int, default=64)
    parser.add_argument("--unet-lr", type=float, default=1e-3)
    parser.add_argument("--ema", type=float, default=0.999)
    parser.add_argument("--text-time-embedding", action="store_true",
                        help="also add a pooled text embedding to the UNet's time embedding")
    parser.add_argument("--quick", action="store_true", help="a few-minute run to check the losses fall")
    parser.add_argument("--no-save", action="store_true")
    args = parser.parse_args(argv)
    if args.quick:
        args.vae_steps, args.dataset, args.unet_steps = 300, 4096, 600

    from diffusers import StableDiffusionPipeline

    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    generator = torch.Generator().manual_seed(args.seed)
    started = time.time()

    vae = build_vae()
    vae_l1 = train_vae(vae, args.vae_steps, args.vae_batch, args.vae_lr, args.kl_weight, generator)
    latents, prompts = encode_dataset(vae, args.dataset, generator)
    scaling = float(1.0 / latents.std())
    vae.register_to_config(scaling_factor=scaling)
    print(f"vae: l1 {vae_l1:.4f}, latent std {latents.std():.3f} -> scaling_factor {scaling:.4f}", flush=True)

    tokenizer = word_tokenizer(shapes.VOCABULARY, max_length=MAX_TOKENS)
    text_encoder = tiny_clip_text_encoder(len(tokenizer), hidden=TEXT_HIDDEN, seed=args.seed + 1)
    torch.manual_seed(args.seed + 2)
    unet = build_unet(args.text_time_embedding)
    scheduler = build_scheduler()
    final_mse, ema = train_denoiser(
        unet, text_encoder, tokenizer, latents * scaling, prompts, scheduler,
        steps=args.unet_steps, batch_size=args.unet_batch, lr=args.unet_lr, ema_decay=args.ema, generator=generator,
    )
    torch.nn.ModuleDict({"unet": unet, "text_encoder": text_encoder}).load_state_dict(ema)
    train_minutes = (time.time() - started) / 60

    pipe = StableDiffusionPipeline(
        vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet, scheduler=scheduler,
        safety_checker=None, feature_extractor=None, image_encoder=None, requires_safety_checker=False,
    )
    pipe.set_progress_bar_config(disable=True)
    results = evaluate(pipe, (1.0, 3.0, 5.0, 7.5), 20, 96 if not args.quick else 32, 32 if not args.quick else 16)
    counts = {
        name: sum(p.numel() for p in module.parameters())
        for name, module in (("unet", unet), ("vae", vae), ("text_encoder", text_encoder))
    }
    print(f"parameters: {counts}; training {train_minutes:.1f} min; final unet mse {final_mse:.4f}", flush=True)
    if not args.no_save:
        out = Path(args.out)
        pipe.save_pretrained(out, safe_serialization=True)
        write_slow_tokenizer_files(out / "tokenizer")
        write_portable_text_encoder(out / "text_encoder")
        summary = {
            "seed": args.seed,
            "threads": args.threads,
            "args": {k: v for k, v in vars(args).items() if k not in ("out",)},
            "parameters": counts,
            "train_minutes": round(train_minutes, 1),
            "vae_l1": round(vae_l1, 5),
            "unet_mse": round(final_mse, 5),
            "prompt_following": {k: {m: round(v, 4) for m, v in acc.items()} for k, acc in results.items()},
        }
        (out / "training_summary.json").write_text(json.dumps(summary, indent=2) + "\n")
        size = sum(f.stat().st_size for f in out.rglob("*") if f.is_file())
        print(f"saved to {out} ({size / 2**20:.2f} MiB)", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
