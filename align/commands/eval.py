"""``align eval``: score a folder of images, or a model's samples, with several rewards."""

from __future__ import annotations

import argparse

from align.commands.common import add_config_command, resolve_config

#: the override example shown in --help (tests check that it is accepted)
EXAMPLE = "rewards=[brightness,jpeg_compressibility] images_per_prompt=2"


def add_parser(subparsers) -> None:
    from align.evaluate import EvalConfig

    parser = add_config_command(
        subparsers, "eval", EvalConfig,
        help="score images (a folder, or a model on a prompt set) with several rewards",
        description=(
            "Score a folder of images (images=DIR; prompts from its metadata.jsonl or the file names), or sample "
            "a model (and LoRA) on a prompt set first (a GenEval metadata file, prompts=evaluation_metadata.jsonl, "
            "works as is). Writes scores.csv, scores.json (per image, per reward, and per prompt category: "
            "GenEval's task types, 'ocr' for prompts quoting text, 'other'), grid.png and grid_REWARD.png (each "
            "reward's worst images on the top row, best on the bottom row) to OUTPUT_DIR."
        ),
        example=EXAMPLE,
    )
    parser.add_argument("--list-rewards", action="store_true", help="list the available rewards and exit")
    parser.add_argument("--quiet", "-q", action="store_true", help="no progress bar")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    if args.list_rewards:
        print(list_rewards())
        return 0
    from align.evaluate import EvalConfig, evaluate

    config = resolve_config(EvalConfig, args)
    if config is None:
        return 0
    table = evaluate(config, progress=not args.quiet)
    print(format_summary(table))
    grids = ", ".join(f"{config.output_dir}/{e['grid']}" for e in table["extremes"].values())
    print(f"table: {config.output_dir}/scores.csv, {config.output_dir}/scores.json; grid: {config.output_dir}/grid.png; "
          f"worst (top) and best (bottom) per reward: {grids}")
    return 0


def format_summary(table: dict) -> str:
    """Each reward's mean, std and count; then, when prompts fall in categories, each column's mean per category
    and their average over categories (GenEval's overall score)."""
    width = max(len(n) for n in table["summary"])
    lines = [f"{'reward':{width}s}  {'mean':>10s}  {'std':>10s}  {'n':>5s}"]
    for name, s in table["summary"].items():
        lines.append(f"{name:{width}s}  {s['mean']:10.4f}  {s['std']:10.4f}  {s['count']:5d}")
    categories = list(table["by_category"])
    if categories != ["other"]:
        heads = [*categories, "mean over categories"]
        cells = {c: max(len(c), 8) for c in heads}
        lines += ["", "mean per prompt category:", f"{'':{width}s}  " + "  ".join(f"{c:>{cells[c]}s}" for c in heads)]
        for name in table["summary"]:
            row = [table["by_category"][c].get(name, {}).get("mean") for c in categories]
            row.append(table["category_mean"].get(name))
            lines.append(f"{name:{width}s}  " + "  ".join(
                f"{'-':>{cells[c]}s}" if v is None else f"{v:{cells[c]}.4f}" for c, v in zip(heads, row)))
    return "\n".join(lines)


def list_rewards() -> str:
    """One entry per reward: name, whether it is differentiable (train with it) or black-box (steer or
    train by policy gradient), and the first paragraph of its docstring, wrapped to the terminal."""
    import re
    import textwrap

    from align.core.config import help_width
    from rewards import available_rewards, get_reward_factory

    width = help_width()
    lines = []
    for name in available_rewards():
        factory = get_reward_factory(name)
        doc = (factory.__doc__ or "").strip().split("\n\n")[0]
        doc = re.sub(r":\w+:`~?([^`]+)`", r"\1", doc).replace("``", "")
        kind = _reward_kind(factory)
        head = f"{name:24s} {kind:9s} "
        lines.append(textwrap.fill(" ".join(doc.split()), width, initial_indent=head,
                                   subsequent_indent=" " * len(head), break_long_words=False))
    return "\n".join(lines)


def _reward_kind(factory) -> str:
    """'diff.' or 'black-box' from the reward class a factory is or returns; 'as parts' for compositions."""
    import typing

    cls = factory
    if not isinstance(factory, type):
        try:
            cls = typing.get_type_hints(factory).get("return")
        except Exception:  # an annotation a plugin's module cannot resolve: say nothing rather than guess
            return ""
    if not isinstance(cls, type):
        return ""
    if cls.__module__ == "rewards.compose":
        return "as parts"
    return {True: "diff.", False: "black-box"}.get(getattr(cls, "differentiable", None), "")
