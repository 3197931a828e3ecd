"""``align sample``: sample a model (optionally with a LoRA) on a prompt set into a folder."""

from __future__ import annotations

import argparse

from align.commands.common import add_config_arguments, config_epilog, resolve_config


def add_parser(subparsers) -> None:
    from align.evaluate import SampleConfig

    parser = subparsers.add_parser(
        "sample",
        help="sample images from a model (and LoRA) for a prompt set",
        description="Sample images with per-image seeds; writes PNGs, metadata.jsonl and grid.png to OUTPUT_DIR.",
        epilog=config_epilog(SampleConfig, "configuration fields (YAML keys / key=value overrides):"),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add_config_arguments(parser)
    parser.add_argument("--quiet", "-q", action="store_true", help="no progress bar")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from align.evaluate import SampleConfig, sample_to_folder

    config = resolve_config(SampleConfig, args)
    if config is None:
        return 0
    out, records, _ = sample_to_folder(config, progress=not args.quiet)
    print(f"{len(records)} images written to {out} (grid: {out / 'grid.png'})")
    return 0
