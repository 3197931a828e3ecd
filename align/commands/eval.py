"""``align eval``: score a folder of images, or a model's samples, with several rewards."""

from __future__ import annotations

import argparse

from align.commands.common import add_config_arguments, config_epilog, resolve_config


def add_parser(subparsers) -> None:
    from align.evaluate import EvalConfig

    parser = subparsers.add_parser(
        "eval",
        help="score images (a folder, or a model on a prompt set) with several rewards",
        description=(
            "Score a folder of images (images=DIR; prompts from its metadata.jsonl or the file names), or sample "
            "a model (and LoRA) on a prompt set first. Writes scores.csv, scores.json (per image and per-reward "
            "mean/std/min/max) and grid.png to OUTPUT_DIR."
        ),
        epilog=config_epilog(EvalConfig, "configuration fields (YAML keys / key=value overrides):"),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add_config_arguments(parser)
    parser.add_argument("--list-rewards", action="store_true", help="list the available rewards and exit")
    parser.add_argument("--quiet", "-q", action="store_true", help="no progress bar")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    if args.list_rewards:
        from rewards import available_rewards, get_reward_factory

        for name in available_rewards():
            doc = (get_reward_factory(name).__doc__ or "").strip().splitlines()
            print(f"{name:28s} {doc[0] if doc else ''}")
        return 0
    from align.evaluate import EvalConfig, evaluate

    config = resolve_config(EvalConfig, args)
    if config is None:
        return 0
    table = evaluate(config, progress=not args.quiet)
    width = max(len(n) for n in table["summary"])
    print(f"{'reward':{width}s}  {'mean':>10s}  {'std':>10s}  {'n':>5s}")
    for name, s in table["summary"].items():
        print(f"{name:{width}s}  {s['mean']:10.4f}  {s['std']:10.4f}  {s['count']:5d}")
    print(f"table: {config.output_dir}/scores.csv, {config.output_dir}/scores.json; grid: {config.output_dir}/grid.png")
    return 0
