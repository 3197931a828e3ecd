"""``align steer``: Feynman-Kac steering (and its baselines) toward a reward, at inference time."""

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
from align.core.errors import check_choice
from align.core.models import DEFAULT_DISTILLED_GUIDANCE
from align.steer.fk_config import FKConfig
from align.steer.guidance_config import GradientGuidanceConfig

STEER_METHODS = ("fk", "best_of_n", "gradient")


@dataclass
class SteerConfig:
    """Configuration of ``align steer``.

    Attributes:
        model: 'builtin', a local diffusers folder, or a hub id (SD 1.x/2.x, SDXL, SD3, FLUX).
        prompts: a list of prompts, a named prompt set, or a text file with one prompt per line.
        negative_prompt: negative prompt for classifier-free guidance.
        reward: a reward name, or {name: weight, ...} for a weighted sum.
        method: fk (Feynman-Kac steering), best_of_n (the matched-compute baseline: N = fk.num_particles
            samples with the same sampler, steps and seed) or gradient (reward-gradient guidance).
        num_steps: sampler steps (FK paper: 100, with resampling in [20, 80]).
        sampler: auto (DDIM for UNet models, flow matching for SD3/FLUX), ddim, ddpm or flow.
        eta: sampler stochasticity; FK needs eta > 0 (DDIM eta=1 as in the paper; the SDE step for flow models).
        guidance_scale: classifier-free guidance; None: the family default (SD 7.5, SDXL 5, SD3 7). FLUX runs
            without it (as diffusers' FluxPipeline): leave it unset and use distilled_guidance.
        distilled_guidance: the guidance value FLUX-dev embeds (diffusers' default 3.5); ignored by other models.
        height: image height in pixels (default: the model's native size).
        width: image width in pixels (default: the model's native size).
        max_sequence_length: text length for T5-based models (SD3, FLUX); default: the pipeline's.
        fk: Feynman-Kac settings (also num_particles, chunk sizes and seed of best_of_n).
        gradient: gradient-guidance settings (method=gradient).
        output_dir: folder for the images (all particles and the best per prompt) and results.json.
        device: auto, cpu, cuda or cuda:N.
        dtype: weight dtype: auto (bfloat16 on a CUDA device that supports it, float16 on other CUDA devices,
            float32 on the CPU), float32, float16 or bfloat16.
        upcast_vae: always decode in float32 (false: only where diffusers does, when the weights are float16 and
            the VAE's config sets force_upcast, as SDXL's VAE does).
        offline: only use local files (default: the HF_HUB_OFFLINE environment variable).
        allow_pickle: allow loading pickle checkpoints (unsafe with untrusted files).
    """

    model: str = "builtin"
    prompts: str | list[str] = "shapes"
    negative_prompt: str | None = None
    reward: str | dict[str, Any] = "brightness"
    method: str = "fk"
    num_steps: int = 100
    sampler: str = "auto"
    eta: float = 1.0
    guidance_scale: float | None = None
    distilled_guidance: float = DEFAULT_DISTILLED_GUIDANCE
    height: int | None = None
    width: int | None = None
    max_sequence_length: int | None = None
    fk: FKConfig = field(default_factory=FKConfig)
    gradient: GradientGuidanceConfig = field(default_factory=GradientGuidanceConfig)
    output_dir: str = "runs/steer"
    device: str = "auto"
    dtype: str = "auto"
    upcast_vae: bool = False
    offline: bool | None = None
    allow_pickle: bool = False

    def __post_init__(self) -> None:
        check_choice("method", self.method, STEER_METHODS)
        check_run_fields(self)

    def method_config(self):
        from align.steer.guidance_config import BestOfNConfig

        if self.method == "fk":
            return self.fk
        if self.method == "gradient":
            return self.gradient
        fk = self.fk
        return BestOfNConfig(num_samples=fk.num_particles, chunk_size=fk.chunk_size,
                             model_chunk_size=fk.model_chunk_size, seed=fk.seed)


#: the override example shown in --help (tests check that it is accepted)
EXAMPLE = "fk.num_particles=8 fk.lambda_=5 reward=jpeg_compressibility"


def add_parser(subparsers) -> None:
    parser = add_config_command(
        subparsers, "steer", SteerConfig,
        help="steer sampling toward a reward with Feynman-Kac particles (no training)",
        description=(
            "Sample with Feynman-Kac steering (or the best-of-N / gradient-guidance baselines) toward a reward. "
            "Writes every final particle to OUTPUT_DIR/particles, the best particle per prompt to OUTPUT_DIR/best, "
            "and rewards, log-weights, ancestry, ESS/k per resampling step and evaluation counts to OUTPUT_DIR/results.json."
        ),
        example=EXAMPLE,
        fields_title="configuration fields (YAML keys / key=value overrides, e.g. fk.lambda_=5):",
    )
    add_common_flags(parser)
    parser.add_argument("--reward", "-r", help="reward name (see the rewards zoo)")
    parser.add_argument("--method", choices=STEER_METHODS, help="fk (default), best_of_n or gradient")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    import torch

    from align.core.images import save_grid
    from align.core.prompts import load_prompts

    config = load_run_config(SteerConfig, args, {"reward": args.reward, "method": args.method})
    if config is None:
        return 0
    prompts = load_prompts(config.prompts)
    model = load_config_model(config)
    guidance_scale = pipeline_guidance_scale(model, config)
    from pipelines import FKSteeringPipeline

    pipe = FKSteeringPipeline.from_pipe(model.pipe)
    pipe.set_progress_bar_config(disable=args.quiet)
    out = pipe(
        prompts, config.reward, config=config.method_config(), negative_prompt=config.negative_prompt,
        num_inference_steps=config.num_steps, guidance_scale=guidance_scale, sampler=config.sampler,
        eta=config.eta, height=config.height, width=config.width, output_type="pt",
        max_sequence_length=config.max_sequence_length,
    )
    output = Path(config.output_dir)
    p, k = out.rewards.shape
    save_images(out.images, output / "particles", [f"p{i:03d}_k{j:03d}" for i in range(p) for j in range(k)])
    save_images(out.best_images, output / "best", [f"p{i:03d}" for i in range(p)])
    # one row per prompt, its particles by reward (best first; at most GRID_COLUMNS)
    shown = min(k, GRID_COLUMNS)
    order = out.rewards.argsort(-1, descending=True)[:, :shown] + torch.arange(p).unsqueeze(1) * k
    save_grid(out.images[order.flatten()], output / "grid.png", ncols=shown)
    results = {
        "prompts": prompts,
        "rewards": out.rewards.tolist(),
        "best_index": out.rewards.argmax(-1).tolist(),
        "best_reward": out.rewards.amax(-1).tolist(),
        "log_weights": None if out.log_weights is None else out.log_weights.tolist(),
        "ancestry": [
            {"step": e.step, "ancestors": e.ancestors.tolist(), "resampled": e.resampled.tolist(),
             "ess": e.ess.tolist(), "relative_ess": e.relative_ess.tolist(), "intermediate_rewards": e.rewards.tolist()}
            for e in out.ancestry
        ],
        "final_relative_ess": None if out.final_relative_ess is None else out.final_relative_ess.tolist(),
        "counts": out.counts.to_dict(),
    }
    path = write_results(output, config, results)
    for i, prompt in enumerate(prompts):
        line = f"{prompt!r}: best reward {float(out.rewards[i].max()):.4f} (mean {float(out.rewards[i].mean()):.4f})"
        if out.final_relative_ess is not None:
            by_step = ", ".join(f"{e.step}: {float(e.relative_ess[i]):.2f}" for e in out.ancestry)
            line += f"; ESS/k by step {{{by_step}}}, final {float(out.final_relative_ess[i]):.2f}"
        print(line)
    print(f"{plural(p * k, 'image')} in {output / 'particles'} (grid: {output / 'grid.png'}); results in {path}")
    return 0
