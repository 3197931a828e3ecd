"""``align train``: fine-tuning toward a reward with LoRA: reward backpropagation (DRaFT, DRaFT-LV, AlignProp, ReFL),
policy gradient (DDPO, GRPO) or forward-process RL (DiffusionNFT) for any reward, or preference optimisation
(Diffusion-DPO)."""

from __future__ import annotations

import argparse

from align.commands.common import add_config_command, resolve_config

#: the override example shown in --help (tests check that it is accepted)
EXAMPLE = "method=alignprop alignprop.num_steps=20 lora.rank=4"


def add_parser(subparsers) -> None:
    from align.train.trainer import TrainConfig

    parser = add_config_command(
        subparsers, "train", TrainConfig,
        help="fine-tune a model toward a reward (reward backpropagation, or policy gradient for black-box rewards)",
        description=(
            "Fine-tune LoRA weights so that samples maximise a reward: by backpropagating a differentiable reward "
            "through sampling (method=draft, draft_lv, alignprop, refl), or by policy gradient over rollouts of a "
            "stochastic sampler, for any reward, black-box ones included (method=ddpo, grpo), by reinforcement on the "
            "forward process from rollouts of any sampler (method=diffusion_nft), or by preference optimisation on "
            "pairs from a preference data set or ranked by any reward (method=diffusion_dpo). Runs on one CPU, one GPU "
            "or many (`accelerate launch -m align train ...`). Writes the LoRA in diffusers format to OUTPUT_DIR/lora, "
            "resumable checkpoints, metrics.jsonl and sample grids. Resume with resume=latest."
        ),
        example=EXAMPLE,
    )
    parser.add_argument("--quiet", "-q", action="store_true", help="no progress bar")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from align.train.trainer import TrainConfig, Trainer

    config = resolve_config(TrainConfig, args)
    if config is None:
        return 0
    trainer = Trainer(config, progress=not args.quiet)
    result = trainer.train()
    if not trainer.is_main:
        return 0
    if result.already_finished:
        print(f"the run in {result.output_dir} already finished at step {result.steps} (max_steps={config.max_steps}); "
              "nothing to do. Raise max_steps to train it further.")
        return 0
    if result.lora_dir is not None:
        print(f"LoRA saved to {result.lora_dir}")
    print(
        f"steps {result.steps} (skipped {result.skipped_steps}); eval reward "
        f"{result.first_reward if result.first_reward is not None else float('nan'):.4f} -> "
        f"{result.last_reward if result.last_reward is not None else float('nan'):.4f}"
    )
    if result.stopped_early:
        print(f"stopped early: {result.stopped_early}")
    return 0
