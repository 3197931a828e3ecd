"""``align demo``: fine-tune, steer and guide the built-in model; write an HTML report."""

from __future__ import annotations

import argparse

from align.commands.common import add_config_command, resolve_config

#: the override example shown in --help (tests check that it is accepted)
EXAMPLE = "train_steps=20 num_particles=4"


def add_parser(subparsers) -> None:
    from align.demo import DemoConfig

    parser = add_config_command(
        subparsers, "demo", DemoConfig,
        help="the whole toolkit on the built-in model in minutes on a CPU (HTML report)",
        description=(
            "1) fine-tune with DRaFT-K + LoRA toward a differentiable reward, 2) steer the base model with "
            "Feynman-Kac particles toward JPEG compressibility next to best-of-N at matched compute, 3) sweep "
            "RL guidance w over [0, 2], 4) train toward JPEG compressibility (no gradient) with GRPO and sweep RL "
            "guidance over that LoRA. Writes OUTPUT_DIR/report/index.html (image grids, a GIF of the steered "
            "particles, reward plots) and OUTPUT_DIR/summary.json. The same command runs a real model on a GPU "
            "(model=<hub id> device=cuda ...)."
        ),
        example=EXAMPLE,
    )
    parser.add_argument("--quiet", "-q", action="store_true", help="no progress bars")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from align.demo import DemoConfig, run_demo

    config = resolve_config(DemoConfig, args)
    if config is None:
        return 0
    summary = run_demo(config, progress=not args.quiet)
    f, s, g = summary["finetune"], summary["steering"], summary["guidance"]
    print(f"1. fine-tuning ({f['reward']}): base {f['base_mean']:.4f} -> fine-tuned {f['finetuned_mean']:.4f}")
    print(f"2. steering ({s['reward']}): FK best {s['fk_mean_best']:.4f} vs best-of-{s['num_particles']} "
          f"{s['best_of_n_mean_best']:.4f} (plain sample {s['base_mean']:.4f})")
    print("3. RL guidance: " + ", ".join(f"w={w:g}: {r:.4f}" for w, r in zip(g["weights"], g["mean_reward"])))
    b = summary["blackbox"]
    print(f"4. GRPO toward {b['reward']} ({b['train_steps']} rollouts), then RL guidance: "
          + ", ".join(f"w={w:g}: {r:.4f}" for w, r in zip(b["weights"], b["mean_reward"])))
    for name, ok in summary["checks"].items():
        print(f"   {'ok ' if ok else 'NOT'} {name}")
    print(f"report: {config.output_dir}/report/index.html  summary: {config.output_dir}/summary.json  "
          f"({summary['seconds']:.0f} s)")
    return 0
