"""``align demo``: the toolkit's whole job on one model, with an HTML report.

1. Fine-tune with DRaFT-K and LoRA toward a differentiable reward; compare the base and
   fine-tuned samples on held-out prompts and seeds.
2. Steer the base model with Feynman-Kac particles toward a black-box reward (JPEG
   compressibility) next to best-of-N at the same number of model evaluations, and animate the
   steered particles denoising.
3. Sweep the RL-guidance weight w from 0 (base) through 1 (fine-tuned) to 2 (extrapolated).
4. Train toward the black-box reward with GRPO (policy gradient: no reward gradient), then sweep
   RL guidance over that LoRA: RLG's compressibility experiment in miniature.

Everything lands in ``OUTPUT_DIR``: ``report/index.html`` (grids, GIF, plots) and
``summary.json`` with the headline figures and whether each expectation held.
"""

from __future__ import annotations

import json
import math
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from align.core.config import to_dict
from align.core.errors import ConfigError, check_range
from align.core.paths import check_output_dir


@dataclass
class DemoConfig:
    """Configuration of ``align demo`` (defaults: the built-in model on a CPU in a few minutes).

    Attributes:
        model: 'builtin' (default), a local diffusers folder or a hub id.
        output_dir: folder for the report, the LoRA and summary.json (replaced if it holds a previous demo).
        device: auto, cpu, cuda or cuda:N.
        seed: seed of everything.
        num_steps: sampler steps in all three parts.
        guidance_scale: classifier-free guidance scale in all three parts.
        height: image height (default: the model's native size).
        width: image width (default: the model's native size).
        prompts: training prompts (a named set, a text file or a list).
        heldout_prompts: held-out prompts for the before/after comparison, steering and the guidance sweep.
        train_reward: the differentiable reward to fine-tune toward.
        train_steps: optimiser steps of DRaFT-K.
        batch_size: images per optimiser step.
        truncation_steps: K of DRaFT-K.
        learning_rate: AdamW learning rate.
        lora_rank: LoRA rank.
        eval_seeds: seeds per held-out prompt for the before/after comparison.
        steer_reward: the (black-box) reward FK steering and best-of-N optimise.
        steer_prompts: how many held-out prompts to steer.
        num_particles: FK particles per prompt (= N of best-of-N at matched compute).
        lambda_scale: FK's lambda is lambda_scale / (std of the reward over best-of-N's samples), so the tilt is
            the same whatever the reward's units.
        resample_interval: FK resampling interval in steps (resampling from 20% to 80% of the chain).
        gif_stride: record the steered particles every this many steps for the GIF.
        guidance_weights: RL-guidance weights w to sweep (parts 3 and 4).
        guide_seeds: seeds per held-out prompt in the guidance sweeps.
        blackbox_reward: the black-box reward part 4 trains toward with GRPO, then guides with.
        blackbox_steps: GRPO optimiser steps (one rollout each).
        blackbox_group_size: GRPO's samples per prompt.
        blackbox_prompts_per_rollout: prompts (groups) per rollout.
        blackbox_num_steps: sampling steps of the rollouts (fewer than num_steps: Flow-GRPO's denoising reduction).
        blackbox_guidance_scale: classifier-free guidance scale of part 4's rollouts and guidance sweep (1: none).
        blackbox_learning_rate: GRPO's AdamW learning rate.
        blackbox_ratio_norm: GRPO-Guard's ratio normalisation (on the built-in model it learns in a few rollouts what
            plain GRPO needs several times as many for).
    """

    model: str = "builtin"
    output_dir: str = "demo-output"
    device: str = "auto"
    seed: int = 0
    num_steps: int = 20
    guidance_scale: float = 4.0
    height: int | None = None
    width: int | None = None
    prompts: str | list[str] = "shapes"
    heldout_prompts: str | list[str] = "shapes_heldout"
    train_reward: str | dict[str, Any] = "saturation"
    train_steps: int = 40
    batch_size: int = 4
    truncation_steps: int = 2
    learning_rate: float = 3e-3
    lora_rank: int = 4
    eval_seeds: int = 2
    steer_reward: str | dict[str, Any] = "jpeg_compressibility"
    steer_prompts: int = 6
    num_particles: int = 8
    lambda_scale: float = 3.0
    resample_interval: int = 2
    gif_stride: int = 1
    guidance_weights: list[float] = field(default_factory=lambda: [0.0, 0.5, 1.0, 1.5, 2.0])
    guide_seeds: int = 4
    blackbox_reward: str | dict[str, Any] = "jpeg_compressibility"
    blackbox_steps: int = 30
    blackbox_group_size: int = 8
    blackbox_prompts_per_rollout: int = 2
    blackbox_num_steps: int = 8
    blackbox_guidance_scale: float = 1.0
    blackbox_learning_rate: float = 1e-2
    blackbox_ratio_norm: bool = True

    def __post_init__(self) -> None:
        check_range("num_steps", self.num_steps, 2, 1000, integer=True)
        check_range("guidance_scale", self.guidance_scale, 0.0, None)
        check_range("train_steps", self.train_steps, 1, None, integer=True)
        check_range("batch_size", self.batch_size, 1, None, integer=True)
        check_range("truncation_steps", self.truncation_steps, 1, self.num_steps, integer=True)
        check_range("learning_rate", self.learning_rate, 0.0, 1.0, low_inclusive=False)
        check_range("lora_rank", self.lora_rank, 1, 1024, integer=True)
        check_range("eval_seeds", self.eval_seeds, 1, 64, integer=True)
        check_range("steer_prompts", self.steer_prompts, 1, 1000, integer=True)
        check_range("num_particles", self.num_particles, 2, 1024, integer=True)
        check_range("lambda_scale", self.lambda_scale, 0.0, None)
        check_range("resample_interval", self.resample_interval, 1, self.num_steps, integer=True)
        check_range("gif_stride", self.gif_stride, 1, self.num_steps, integer=True)
        check_range("guide_seeds", self.guide_seeds, 1, 64, integer=True)
        check_range("blackbox_steps", self.blackbox_steps, 1, None, integer=True)
        check_range("blackbox_group_size", self.blackbox_group_size, 2, 1024, integer=True)
        check_range("blackbox_prompts_per_rollout", self.blackbox_prompts_per_rollout, 1, 1024, integer=True)
        check_range("blackbox_num_steps", self.blackbox_num_steps, 2, 1000, integer=True)
        check_range("blackbox_guidance_scale", self.blackbox_guidance_scale, 0.0, None)
        check_range("blackbox_learning_rate", self.blackbox_learning_rate, 0.0, 1.0, low_inclusive=False)
        if len(self.guidance_weights) < 2:
            raise ConfigError(f"guidance_weights={self.guidance_weights!r} needs at least two weights to sweep")
        check_output_dir("output_dir", self.output_dir)




def run_demo(config: DemoConfig, *, model=None, progress: bool = True) -> dict[str, Any]:
    """Run the four parts and write the report; returns the summary (also in summary.json)."""
    from align.core.images import make_grid, save_gif, save_png
    from align.core.lora import adapters_disabled
    from align.core.models import load_model
    from align.core.prompts import load_prompts
    from align.report import Figure, Section, write_html
    from align.steer.fk_config import FKConfig
    from align.steer.generate import generate
    from align.steer.guidance_config import BestOfNConfig
    from align.train.trainer import TrainConfig, Trainer
    from pipelines import FKSteeringPipeline
    from rewards import build_reward

    started = time.perf_counter()
    out = Path(config.output_dir)
    for previous in ("train", "train_blackbox", "report", "summary.json"):  # a previous demo's outputs are replaced
        path = out / previous
        if path.is_dir():
            shutil.rmtree(path)
        elif path.exists():
            path.unlink()
    report_dir = out / "report"
    report_dir.mkdir(parents=True, exist_ok=True)
    given_model = model
    if model is None:
        # dtype "auto", as the trainer's mixed_precision "auto" below: the same weights serve all three parts
        model = load_model(config.model, device=config.device)
    h, w = (config.height, config.width) if config.height and config.width else model.default_resolution()
    scale = max(1, 96 // w)  # enlarge tiny images in the report
    train_prompts = load_prompts(config.prompts)
    heldout = load_prompts(config.heldout_prompts)
    model_name = str(model.source) if model.source else (config.model if given_model is None else "an in-memory pipeline")
    summary: dict[str, Any] = {"config": to_dict(config), "model": model_name, "resolution": [h, w]}
    sections: list[Section] = []
    # one bar per part, counting what that part repeats (optimiser steps, then sampler steps), so
    # that its time estimate is honest; part 1's bar is the trainer's own

    # ---------------------------------------------------------------- 1. fine-tuning
    train_cfg = TrainConfig(
        model=config.model, method="draft", reward=config.train_reward, prompts=list(train_prompts),
        output_dir=str(out / "train"), seed=config.seed, max_steps=config.train_steps, batch_size=config.batch_size,
        height=h, width=w, checkpoint_every=0, sample_every=0, num_samples=4, device=config.device,
        model_recommendations=False,  # the demo's own settings are all explicit
    )
    train_cfg.draft.num_steps = config.num_steps
    train_cfg.draft.guidance_scale = config.guidance_scale
    train_cfg.draft.truncation_steps = config.truncation_steps
    train_cfg.draft.learning_rate = config.learning_rate
    train_cfg.draft.weight_decay = 0.0
    train_cfg.lora.rank = config.lora_rank
    trainer = Trainer(train_cfg, model=model, progress="demo 1/4: fine-tuning (DRaFT-K + LoRA)" if progress else False)
    trainer.setup()
    train_reward = trainer.reward
    eval_prompts = [p for p in heldout for _ in range(config.eval_seeds)]
    eval_seeds = [1000 + i for i in range(len(eval_prompts))]
    sample_kwargs = dict(num_steps=config.num_steps, guidance_scale=config.guidance_scale, height=h, width=w)

    def score(reward, images, prompts) -> torch.Tensor:
        reward.eval()
        with torch.no_grad():
            out_ = reward.score(images, prompts)
        return out_.scores.float()

    with adapters_disabled(model):
        before = generate(model, eval_prompts, eval_seeds, **sample_kwargs)
    t0 = time.perf_counter()
    result = trainer.train()
    train_seconds = time.perf_counter() - t0
    after = generate(model, eval_prompts, eval_seeds, **sample_kwargs)
    r_before, r_after = score(train_reward, before, eval_prompts), score(train_reward, after, eval_prompts)
    ncols = config.eval_seeds * min(4, len(heldout))
    save_png(make_grid(before, ncols=ncols), report_dir / "finetune_before.png", scale=scale)
    save_png(make_grid(after, ncols=ncols), report_dir / "finetune_after.png", scale=scale)
    _plot_training_reward(out / "train" / "metrics.jsonl", report_dir / "reward_curve.png", "batch reward",
                          f"DRaFT-K training reward ({train_reward.name})", "optimiser step")
    fidelity_before = _prompt_fidelity(eval_prompts, before)
    fidelity = None if fidelity_before is None else (fidelity_before, _prompt_fidelity(eval_prompts, after))
    finetune = {
        "reward": train_reward.name,
        "base_mean": float(r_before.mean()),
        "base_std": float(r_before.std()),
        "finetuned_mean": float(r_after.mean()),
        "finetuned_std": float(r_after.std()),
        "improved": bool(r_after.mean() > r_before.mean()),
        "heldout_images": len(eval_prompts),
        "train_steps": result.steps,
        "train_seconds": round(train_seconds, 1),
        "lora_dir": str(result.lora_dir),
    }
    if fidelity is not None:
        finetune["prompt_fidelity_base"], finetune["prompt_fidelity_finetuned"] = fidelity
    summary["finetune"] = finetune
    fidelity_text = ""
    if fidelity is not None:
        fidelity_text = (
            f"\n\nPrompt fidelity (the shapes classifier agrees on shape, colour and background): "
            f"{fidelity[0]:.0%} (base) -> {fidelity[1]:.0%} (fine-tuned). Optimising one reward can trade away "
            "what it does not measure (reward hacking); `align train` can watch held-out rewards on held-out "
            "prompts (monitor_rewards, monitor_prompts) and stop when they diverge."
        )
    sections.append(
        Section(
            "1. Fine-tuning with DRaFT-K and LoRA",
            f"{result.steps} optimiser steps of DRaFT-K (K={config.truncation_steps} of {config.num_steps} DDIM steps, "
            f"LoRA rank {config.lora_rank} on the attention projections) toward the differentiable reward "
            f"'{train_reward.name}', in {train_seconds:.0f} s. The held-out prompts and seeds below were never trained "
            f"on; the same seeds give the left and right grids.\n\nMean reward on {len(eval_prompts)} held-out images: "
            f"{finetune['base_mean']:.4f} (base) -> {finetune['finetuned_mean']:.4f} (fine-tuned).{fidelity_text}",
            [
                Figure("finetune_before.png", "base model"),
                Figure("finetune_after.png", "fine-tuned (LoRA)"),
                Figure("reward_curve.png", "training reward per optimiser step"),
            ],
        )
    )

    # ---------------------------------------------------------------- 2. FK steering vs best-of-N
    steer_reward = build_reward(config.steer_reward)
    steer_prompts = heldout[: config.steer_prompts]
    k = config.num_particles
    fk_pipe = FKSteeringPipeline.from_pipe(model.pipe)
    fk_pipe.set_progress_bar_config(disable=True)
    common = dict(num_inference_steps=config.num_steps, guidance_scale=config.guidance_scale, eta=1.0,
                  height=h, width=w, output_type="pt")
    frames_latents: list[torch.Tensor] = []
    bar = tqdm(total=3 * config.num_steps, desc="demo 2/4: best-of-N, FK, plain sampling", unit="step",
               disable=not progress, dynamic_ncols=True)

    def advance(i: int, x0_hat: torch.Tensor) -> None:
        bar.update(1)

    def record(i: int, x0_hat: torch.Tensor) -> None:
        bar.update(1)
        if i % config.gif_stride == 0 or i == config.num_steps - 1:
            frames_latents.append(x0_hat[:k].clone())

    with adapters_disabled(model):
        bon = fk_pipe(steer_prompts, steer_reward, config=BestOfNConfig(num_samples=k, seed=config.seed),
                      step_callback=advance, **common)
        spread = float(bon.rewards.float().std())
        lam = config.lambda_scale / spread if spread > 0 else 1.0
        fk_config = FKConfig(
            num_particles=k, lambda_=lam, potential="max", resampler="systematic", resample_start=0.2,
            resample_end=0.8, resample_interval=config.resample_interval, seed=config.seed,
        )
        fk = fk_pipe(steer_prompts, steer_reward, config=fk_config, step_callback=record, **common)
        # seed + k: a seed none of the k particles used, so the plain sample is independent of them
        base_images = fk_pipe(steer_prompts, steer_reward, config=BestOfNConfig(num_samples=1, seed=config.seed + k),
                              step_callback=advance, **common)
    bar.close()
    fk_best, bon_best = fk.rewards.max(1).values, bon.rewards.max(1).values
    save_png(make_grid(bon.best_images, ncols=len(steer_prompts)), report_dir / "steer_best_of_n.png", scale=scale)
    save_png(make_grid(fk.best_images, ncols=len(steer_prompts)), report_dir / "steer_fk.png", scale=scale)
    save_png(make_grid(base_images.images, ncols=len(steer_prompts)), report_dir / "steer_base.png", scale=scale)
    frames = []
    with torch.no_grad():
        for lat in frames_latents:
            frames.append(make_grid(model.decode(lat.to(model.device, model.dtype)), ncols=k))
    frames += [frames[-1]] * 4  # hold the last frame
    save_gif(frames, report_dir / "fk_particles.gif", fps=6, scale=scale)
    resample_steps = [e.step for e in fk.ancestry]
    steering = {
        "reward": steer_reward.name,
        "num_particles": k,
        "lambda": lam,
        "fk_mean_best": float(fk_best.mean()),
        "best_of_n_mean_best": float(bon_best.mean()),
        "base_mean": float(base_images.rewards.float().mean()),
        "fk_at_least_best_of_n": bool(fk_best.mean() >= bon_best.mean()),
        "prompts_where_fk_wins_or_ties": int((fk_best >= bon_best).sum()),
        "prompts": len(steer_prompts),
        "fk_model_rows": fk.counts.model_rows,
        "best_of_n_model_rows": bon.counts.model_rows,
        "fk_reward_rows": fk.counts.reward_rows,
        "best_of_n_reward_rows": bon.counts.reward_rows,
        "resampling_steps": resample_steps,
    }
    summary["steering"] = steering
    table = [
        {"prompt": p, "best-of-N best": float(b), "FK best": float(f), "FK >= best-of-N": bool(f >= b)}
        for p, b, f in zip(steer_prompts, bon_best, fk_best)
    ]
    sections.append(
        Section(
            "2. Feynman-Kac steering toward a black-box reward",
            f"The base model (LoRA off) steered toward '{steer_reward.name}' (no gradients: the reward is computed "
            f"from a JPEG encoding) with {k} particles per prompt, potential 'max', systematic resampling at steps "
            f"{resample_steps}, lambda = {lam:.3g} (= {config.lambda_scale} / reward spread). Best-of-{k} draws {k} "
            f"samples with the same sampler: both use {fk.counts.model_rows} denoiser rows "
            f"(best-of-N: {bon.counts.model_rows}); FK also scores intermediate x0-predictions "
            f"({fk.counts.reward_rows} reward rows vs {bon.counts.reward_rows}).\n\nMean best reward over "
            f"{len(steer_prompts)} prompts: FK {steering['fk_mean_best']:.4f}, best-of-{k} "
            f"{steering['best_of_n_mean_best']:.4f}, one plain sample {steering['base_mean']:.4f}.",
            [
                Figure("steer_base.png", "one plain sample per prompt"),
                Figure("steer_best_of_n.png", f"best of {k} independent samples"),
                Figure("steer_fk.png", f"best FK particle ({k} particles)"),
                Figure("fk_particles.gif", f"the {k} particles of the first prompt: x0-predictions while denoising "
                       "(resampling copies good particles over bad ones)"),
            ],
            table,
        )
    )

    # ---------------------------------------------------------------- 3. RL guidance sweep
    guide_prompts = heldout[: max(1, min(len(heldout), 8))]
    sweep = _guidance_sweep(model, guide_prompts, train_reward, config, "demo 3/4: RL guidance sweep", progress,
                            guidance_scale=config.guidance_scale, h=h, w=w, report_dir=report_dir, scale=scale, tag="")
    sweep_rows, ws, means, figures = sweep["rows"], sweep["weights"], sweep["means"], sweep["figures"]
    summary["guidance"] = {"reward": train_reward.name, **_trend(ws, means)}
    spearman = summary["guidance"]["spearman"]
    if "prompt fidelity" in sweep_rows[0]:
        summary["guidance"]["prompt_fidelity"] = [row["prompt fidelity"] for row in sweep_rows]
    sections.append(
        Section(
            "3. RL guidance: one knob from base to aligned and beyond",
            "v = v_base + w (v_aligned - v_base) per step, base and aligned being the same network with the LoRA of "
            "part 1 off and on (one batched forward per step). Each row of the grid is one w, top to bottom "
            f"{', '.join(f'{x:g}' for x in ws)}; the columns share prompts and seeds. Mean reward rises with w "
            f"(Spearman rank correlation {spearman:.2f}; {'monotone' if summary['guidance']['monotone'] else 'not strictly monotone'})."
            f"\n\n{_over_optimisation_text(sweep_rows, train_reward.name)}",
            figures,
            sweep_rows,
        )
    )

    # ---------------------------------------------------------------- 4. a black-box reward: trained, then guided
    blackbox = _blackbox_part(model, config, train_prompts, heldout, out, report_dir, scale, h, w, progress, sections)
    summary["blackbox"] = blackbox

    summary["checks"] = {
        "finetuned_above_base": finetune["improved"],
        "fk_at_least_best_of_n": steering["fk_at_least_best_of_n"],
        "reward_rises_with_w": summary["guidance"]["rising_with_w"],
        "blackbox_trained_above_base": blackbox["trained_above_base"],
        "blackbox_reward_rises_with_w": blackbox["rising_with_w"],
    }
    summary["seconds"] = round(time.perf_counter() - started, 1)
    checks = [{"expectation": k_, "holds": v} for k_, v in summary["checks"].items()]
    sections.insert(0, Section("Summary", f"Finished in {summary['seconds']:.0f} s on {model.device} ({model.dtype}).", table=checks))
    write_html(
        report_dir / "index.html", "diffusion-align demo",
        sections, subtitle=f"model: {model_name} ({model.family}, {h}x{w} px)",
    )
    (out / "summary.json").write_text(json.dumps(summary, indent=2))
    return summary


def _plot_training_reward(metrics_path: Path, png: Path, label: str, title: str, xlabel: str) -> None:
    """The reward of every optimiser step logged in ``metrics_path`` and its moving average, as a line plot."""
    from align.report import moving_average, plot_lines

    metrics = [json.loads(x) for x in metrics_path.read_text().splitlines() if x.strip()]
    steps = [m["step"] for m in metrics if "loss" in m]
    rewards = [m["reward_mean"] for m in metrics if "loss" in m]
    plot_lines(png, {label: (steps, rewards), "moving average (5)": (steps, moving_average(rewards, 5))},
               title=title, xlabel=xlabel, ylabel="reward")


def _trend(ws: list[float], means: list[float]) -> dict[str, Any]:
    """How the mean reward follows w: "rising" is the trend over the sweep (rank correlation), not every adjacent
    pair, since at w > 1 extrapolation can saturate or overshoot within the noise of a few samples."""
    spearman = _spearman(ws, means)
    return {
        "weights": ws,
        "mean_reward": means,
        "spearman": spearman,
        "monotone": bool(all(b >= a for a, b in zip(means, means[1:]))),
        "rising_with_w": bool(spearman >= 0.8 and means[-1] > means[0]),
    }


def _guidance_sweep(model, prompts, reward, config: DemoConfig, description: str, progress: bool, *, guidance_scale: float,
                    h: int, w: int, report_dir: Path, scale: int, tag: str, eta: float | None = None) -> dict[str, Any]:
    """RL guidance over ``config.guidance_weights`` with the model's current LoRA as the aligned side: rows (mean
    reward, std, prompt fidelity per w), the grid and plots written as ``guidance_sweep{tag}.png`` etc., and figures."""
    from align.core.images import make_grid, save_png
    from align.report import Figure, plot_lines
    from pipelines import RLGuidancePipeline

    rlg_pipe = RLGuidancePipeline.from_pipe(model.pipe)
    rlg_pipe.set_progress_bar_config(disable=True)
    rows, images = [], []
    bar = tqdm(total=len(config.guidance_weights) * config.num_steps, desc=description, unit="step",
               disable=not progress, dynamic_ncols=True)
    for weight in config.guidance_weights:
        gen = torch.Generator().manual_seed(config.seed + 7)
        res = rlg_pipe(
            prompts, weight=float(weight), num_samples=config.guide_seeds, reward=reward,
            num_inference_steps=config.num_steps, guidance_scale=guidance_scale, height=h, width=w, eta=eta,
            generator=gen, output_type="pt", step_callback=lambda i, x0: bar.update(1),
        )
        r = res.rewards.float()
        row = {"w": float(weight), "mean reward": float(r.mean()), "std": float(r.std())}
        fidelity = _prompt_fidelity([p for p in prompts for _ in range(config.guide_seeds)], res.images)
        if fidelity is not None:
            row["prompt fidelity"] = fidelity
        rows.append(row)
        images.append(res.images[:: config.guide_seeds][: min(8, len(prompts))])
    bar.close()
    save_png(make_grid(torch.cat(images), ncols=images[0].shape[0]), report_dir / f"guidance_sweep{tag}.png", scale=scale)
    ws = [row["w"] for row in rows]
    means = [row["mean reward"] for row in rows]
    plot_lines(
        report_dir / f"reward_vs_w{tag}.png", {reward.name: (ws, means)},
        bands={reward.name: [row["std"] / math.sqrt(len(prompts) * config.guide_seeds) for row in rows]},
        title="RL guidance: reward vs w (0 base, 1 fine-tuned, >1 extrapolated)", xlabel="w", ylabel="mean reward",
        markers=True,
    )
    figures = [Figure(f"guidance_sweep{tag}.png", "rows: w = " + ", ".join(f"{x:g}" for x in ws)),
               Figure(f"reward_vs_w{tag}.png", "mean reward vs w (band: standard error)")]
    if "prompt fidelity" in rows[0]:
        plot_lines(
            report_dir / f"fidelity_vs_w{tag}.png", {"prompt fidelity": (ws, [row["prompt fidelity"] for row in rows])},
            title="RL guidance: prompt fidelity vs w", xlabel="w", ylabel="fraction of images that follow the prompt",
            markers=True,
        )
        figures.append(Figure(f"fidelity_vs_w{tag}.png", "prompt fidelity vs w (the shapes classifier)"))
    return {"rows": rows, "weights": ws, "means": means, "figures": figures}


def _blackbox_part(model, config: DemoConfig, train_prompts, heldout, out: Path, report_dir: Path, scale: int, h: int,
                   w: int, progress: bool, sections: list) -> dict[str, Any]:
    """Part 4: GRPO toward the black-box reward on a fresh LoRA, then RL guidance over it."""
    from align.core.lora import ADAPTER_NAME, LoRAConfig
    from align.report import Figure, Section
    from align.train.methods import GRPOConfig
    from align.train.trainer import TrainConfig, Trainer

    if getattr(model.module, "peft_config", None):
        model.module.delete_adapters(ADAPTER_NAME)  # part 1's LoRA is saved; GRPO trains a fresh one
    group, groups = config.blackbox_group_size, config.blackbox_prompts_per_rollout
    rollout = group * groups
    # one optimiser step per rollout (on-policy), in micro-batches of at most 8 samples
    batch = next(b for b in (8, 4, 2, 1) if rollout % b == 0)
    grpo = GRPOConfig(
        num_steps=config.blackbox_num_steps, eval_num_steps=config.num_steps, guidance_scale=config.blackbox_guidance_scale,
        group_size=group, rollout_prompts=groups, learning_rate=config.blackbox_learning_rate, weight_decay=0.0,
        ratio_norm=config.blackbox_ratio_norm,
    )
    train_cfg = TrainConfig(
        model=config.model, method="grpo", grpo=grpo, reward=config.blackbox_reward, prompts=list(train_prompts),
        output_dir=str(out / "train_blackbox"), seed=config.seed, max_steps=config.blackbox_steps, batch_size=batch,
        gradient_accumulation_steps=rollout // batch, height=h, width=w, checkpoint_every=0, sample_every=0,
        num_samples=4, device=config.device, lora=LoRAConfig(rank=config.lora_rank), model_recommendations=False,
    )
    trainer = Trainer(train_cfg, model=model, progress="demo 4/4: GRPO toward a black-box reward" if progress else False)
    trainer.setup()
    reward = trainer.reward
    t0 = time.perf_counter()
    result = trainer.train()
    seconds = time.perf_counter() - t0
    _plot_training_reward(out / "train_blackbox" / "metrics.jsonl", report_dir / "blackbox_reward_curve.png",
                          "rollout reward", f"GRPO training reward ({reward.name})", "optimiser step (one rollout each)")
    guide_prompts = heldout[: max(1, min(len(heldout), 8))]
    sweep = _guidance_sweep(model, guide_prompts, reward, config, "demo 4/4: RL guidance sweep", progress,
                            guidance_scale=config.blackbox_guidance_scale, h=h, w=w, report_dir=report_dir, scale=scale,
                            tag="_blackbox", eta=grpo.evaluation_sampling(model.is_flow)["eta"])
    rows, ws, means = sweep["rows"], sweep["weights"], sweep["means"]
    trend = _trend(ws, means)
    base = next(r for r in rows if r["w"] == 0.0) if 0.0 in ws else rows[0]
    trained = next((r for r in rows if r["w"] == 1.0), None)
    part = {
        "reward": reward.name,
        "method": "grpo",
        "train_steps": result.steps,
        "train_seconds": round(seconds, 1),
        "rollout_samples": rollout,
        "sampling_steps": config.blackbox_num_steps,
        "base_mean": base["mean reward"],
        "trained_mean": None if trained is None else trained["mean reward"],
        "trained_above_base": bool(trained is not None and trained["mean reward"] > base["mean reward"]),
        "lora_dir": str(result.lora_dir),
        **trend,
    }
    if "prompt fidelity" in rows[0]:
        part["prompt_fidelity"] = [row["prompt fidelity"] for row in rows]
    sampler = f"the flow SDE, a = {grpo.noise_level}" if model.is_flow else f"DDIM, eta {grpo.eta:g}"
    trained_text = "" if trained is None else (
        f" Mean '{reward.name}' on {len(guide_prompts) * config.guide_seeds} held-out images: {base['mean reward']:.4f} "
        f"(w = 0, base) -> {trained['mean reward']:.4f} (w = 1, the GRPO LoRA)."
    )
    sections.append(
        Section(
            "4. A black-box reward: trained with GRPO, then guided",
            f"No gradient of '{reward.name}' exists, so part 1's reward backpropagation cannot train toward it; a policy "
            f"gradient can. GRPO sampled {result.steps} rollouts of {groups} prompts x {group} samples with a stochastic "
            f"sampler ({sampler}, {config.blackbox_num_steps} steps), scored them, normalised each "
            f"reward within its prompt's group and took one PPO-clipped step on a fresh LoRA per rollout"
            f"{' (with GRPO-Guard ratio normalisation)' if config.blackbox_ratio_norm else ''}, in "
            f"{seconds:.0f} s.{trained_text} Then RL guidance blends the base and the GRPO model with w, as part 3 does: "
            f"the compressibility experiment of RL guidance in miniature (Spearman rank correlation of reward and w "
            f"{trend['spearman']:.2f}).\n\n{_over_optimisation_text(rows, reward.name)}",
            [Figure("blackbox_reward_curve.png", "mean reward of each rollout"), *sweep["figures"]],
            rows,
        )
    )
    return part


def _prompt_fidelity(prompts: list[str], images: torch.Tensor) -> float | None:
    """Fraction of images the shapes classifier reads as their prompt (shape, colour and background);
    None when the prompts are not shapes prompts (another model)."""
    from align.builtin import shapes_world as shapes
    from align.core.errors import AlignError

    try:
        scenes = [shapes.parse_prompt(p) for p in prompts]
    except AlignError:
        return None
    return shapes.agreement(scenes, shapes.classify(images))["all"]


def _over_optimisation_text(rows: list[dict[str, Any]], reward: str) -> str:
    """What the guidance sweep's images show, in words: where prompt fidelity falls while the reward rises."""
    if "prompt fidelity" not in rows[0]:
        return (
            "Beyond w = 1 the blend extrapolates past the fine-tuned model; look at the top rows of the grid for "
            f"over-optimisation: '{reward}' keeps rising while the images lose what the prompt asks for."
        )
    base = rows[0]["prompt fidelity"]
    fallen = [r for r in rows if r["prompt fidelity"] < base - 0.2]
    if not fallen:
        return (
            f"Prompt fidelity (the shapes classifier agrees on shape, colour and background) stays within 20 points of "
            f"w = {rows[0]['w']:g}'s {base:.0%} over the whole sweep: no sign of over-optimisation at these weights."
        )
    first, worst = fallen[0], min(rows, key=lambda r: r["prompt fidelity"])
    return (
        f"What the images show: from w = {first['w']:g} on, the shapes fade into the background. Prompt fidelity "
        f"(the shapes classifier agrees on shape, colour and background) falls from {base:.0%} at w = {rows[0]['w']:g} "
        f"to {worst['prompt fidelity']:.0%} at w = {worst['w']:g} while '{reward}' keeps rising: extrapolating past "
        "the fine-tuned model over-optimises the reward (reward hacking). Weights between 0 and 1 interpolate "
        "without this; above 1, check the images, not only the reward."
    )


def _spearman(xs: list[float], ys: list[float]) -> float:
    """Spearman rank correlation (ties by average rank)."""

    def ranks(v: list[float]) -> list[float]:
        order = sorted(range(len(v)), key=lambda i: v[i])
        r = [0.0] * len(v)
        i = 0
        while i < len(order):
            j = i
            while j + 1 < len(order) and v[order[j + 1]] == v[order[i]]:
                j += 1
            for m in range(i, j + 1):
                r[order[m]] = (i + j) / 2.0
            i = j + 1
        return r

    rx, ry = ranks(xs), ranks(ys)
    mx, my = sum(rx) / len(rx), sum(ry) / len(ry)
    num = sum((a - mx) * (b - my) for a, b in zip(rx, ry))
    den = math.sqrt(sum((a - mx) ** 2 for a in rx) * sum((b - my) ** 2 for b in ry))
    return num / den if den else 0.0
