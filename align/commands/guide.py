"""``align guide``: RL guidance, blending a base model and its LoRA-aligned self at several weights."""

from __future__ import annotations

import argparse
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from align.commands._inference import (
    GRID_COLUMNS,
    add_common_flags,
    check_run_fields,
    load_config_model,
    load_run_config,
    pipeline_guidance_scale,
    save_images,
    write_results,
)
from align.commands.common import add_config_command, plural
from align.core.errors import ConfigError, check_range
from align.core.models import DEFAULT_DISTILLED_GUIDANCE
from align.steer.fk_config import check_chunks_and_seed


@dataclass
class GuideConfig:
    """Configuration of ``align guide``.

    Attributes:
        model: 'builtin', a local diffusers folder, or a hub id (the base model).
        lora: folder of the aligned model's LoRA in diffusers format (e.g. the lora/ folder of `align train`).
        prompts: a list of prompts, a named prompt set, or a text file with one prompt per line.
        negative_prompt: negative prompt for classifier-free guidance.
        weights: the RLG weights w to sample at (0: base, 1: aligned, > 1: extrapolate), same seed for each.
        num_samples: samples per prompt and weight.
        num_steps: sampler steps.
        sampler: auto (DDIM for UNet models, flow matching for SD3/FLUX), ddim, ddpm or flow.
        eta: sampler stochasticity (None: deterministic DDIM / flow Euler).
        guidance_scale: classifier-free guidance of the base side; None: the family default (SD 7.5, SDXL 5, SD3 7).
            FLUX runs without it (as diffusers' FluxPipeline): leave it unset and use distilled_guidance.
        distilled_guidance: the guidance value FLUX-dev embeds on both sides (diffusers' default 3.5); ignored by
            other models.
        aligned_guidance_scale: classifier-free guidance of the aligned side (None: same as the base side).
        batched: run base and aligned rows in one batched forward per step (False: two forwards).
        model_chunk_size: samples per forward (None: all at once).
        reward: optional reward name or {name: weight} to score the images at each weight.
        seed: random seed of the noise (the same for every weight).
        height: image height in pixels (default: the model's native size).
        width: image width in pixels (default: the model's native size).
        max_sequence_length: text length for T5-based models (SD3, FLUX); default: the pipeline's.
        output_dir: folder for the images (one subfolder per weight) and results.json.
        device: auto, cpu, cuda or cuda:N.
        dtype: weight dtype: auto (bfloat16 on a CUDA device that supports it, float16 on other CUDA devices,
            float32 on the CPU), float32, float16 or bfloat16.
        upcast_vae: always decode in float32 (false: only where diffusers does, when the weights are float16 and
            the VAE's config sets force_upcast, as SDXL's VAE does).
        offline: only use local files (default: the HF_HUB_OFFLINE environment variable).
        allow_pickle: allow loading pickle checkpoints (unsafe with untrusted files).
    """

    model: str = "builtin"
    lora: str | None = None
    prompts: str | list[str] = "shapes"
    negative_prompt: str | None = None
    weights: list[float] = field(default_factory=lambda: [0.0, 1.0, 2.0])
    num_samples: int = 1
    num_steps: int = 50
    sampler: str = "auto"
    eta: float | None = None
    guidance_scale: float | None = None
    distilled_guidance: float = DEFAULT_DISTILLED_GUIDANCE
    aligned_guidance_scale: float | None = None
    batched: bool = True
    model_chunk_size: int | None = None
    reward: str | dict[str, Any] | None = None
    seed: int | None = 0
    height: int | None = None
    width: int | None = None
    max_sequence_length: int | None = None
    output_dir: str = "runs/guide"
    device: str = "auto"
    dtype: str = "auto"
    upcast_vae: bool = False
    offline: bool | None = None
    allow_pickle: bool = False

    def __post_init__(self) -> None:
        if not self.weights:
            raise ConfigError("weights=[] is empty; give at least one RLG weight (e.g. 0,1,2)")
        for w in self.weights:
            check_range("weights", w)
        check_range("num_samples", self.num_samples, 1, None, integer=True)
        check_chunks_and_seed(self)
        check_run_fields(self)

    def rlg_config(self, weight: float):
        from align.steer.rlg_config import RLGConfig

        return RLGConfig(
            weight=weight, aligned_guidance_scale=self.aligned_guidance_scale, num_samples=self.num_samples,
            batched=self.batched, model_chunk_size=self.model_chunk_size, seed=self.seed,
        )


#: the override example shown in --help (tests check that it is accepted)
EXAMPLE = "weights=[0,1,2] num_samples=2 reward=saturation"


def _weights(text: str) -> list[float]:
    try:
        return [float(w) for w in text.split(",") if w.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"--weights {text!r} must be comma-separated numbers, e.g. 0,0.5,1,2") from None


def add_parser(subparsers) -> None:
    parser = add_config_command(
        subparsers, "guide", GuideConfig,
        help="RL guidance: blend a base model and its LoRA-aligned version at chosen weights",
        description=(
            "Sample with v = v_base + w (v_aligned - v_base) for each weight w, where the aligned model is the base "
            "model with a LoRA (--lora). Writes OUTPUT_DIR/w<w>/p<prompt>_s<sample>.png and results.json "
            "(rewards per weight when a reward is given)."
        ),
        example=EXAMPLE,
    )
    add_common_flags(parser)
    parser.add_argument("--lora", "-l", help="LoRA folder of the aligned model (diffusers format)")
    parser.add_argument("--weights", "-w", type=_weights, help="comma-separated RLG weights, e.g. 0,0.5,1,2")
    parser.add_argument("--reward", "-r", help="reward name to score the outputs")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    import torch

    from align.core.images import save_grid
    from align.core.prompts import load_prompts

    config = load_run_config(GuideConfig, args, {"lora": args.lora, "weights": args.weights, "reward": args.reward})
    if config is None:
        return 0
    if not config.lora:
        raise ConfigError("lora=None: RL guidance needs the aligned model's LoRA folder (--lora DIR)")
    prompts = load_prompts(config.prompts)
    model = load_config_model(config, lora=config.lora)
    guidance_scale = pipeline_guidance_scale(model, config)
    from pipelines import RLGuidancePipeline

    pipe = RLGuidancePipeline.from_pipe(model.pipe)
    pipe.set_progress_bar_config(disable=args.quiet)
    output = Path(config.output_dir)
    runs, rows = [], []
    for weight in config.weights:
        out = pipe(
            prompts, config=config.rlg_config(weight), negative_prompt=config.negative_prompt,
            num_inference_steps=config.num_steps, guidance_scale=guidance_scale, sampler=config.sampler,
            eta=config.eta, height=config.height, width=config.width, reward=config.reward, output_type="pt",
            max_sequence_length=config.max_sequence_length,
        )
        names = [f"p{i:03d}_s{j:03d}" for i in range(len(prompts)) for j in range(config.num_samples)]
        save_images(out.images, output / f"w{weight:g}", names)
        rows.append(out.images[:GRID_COLUMNS])
        entry = {"weight": weight, "folder": str(output / f"w{weight:g}"), "counts": out.counts.to_dict()}
        if out.rewards is not None:
            entry["rewards"] = out.rewards.tolist()
            entry["mean_reward"] = float(out.rewards.mean())
            print(f"w={weight:g}: mean reward {entry['mean_reward']:.4f}")
        runs.append(entry)
    path = write_results(output, config, {"prompts": prompts, "runs": runs})
    # one row per weight, the same prompts and seeds in every column
    save_grid(torch.cat(rows), output / "grid.png", ncols=rows[0].shape[0])
    print(f"images for {plural(len(config.weights), 'weight')} in {output} (grid: {output / 'grid.png'}); results in {path}")
    return 0
