"""``align sample``: sample a model (optionally with a LoRA) on a prompt set into a folder."""

from __future__ import annotations

import argparse

from align.commands.common import add_config_command, plural, resolve_config

#: the override example shown in --help (tests check that it is accepted)
EXAMPLE = "prompts=shapes_heldout images_per_prompt=4 guidance_scale=5.0"


def add_parser(subparsers) -> None:
    from align.evaluate import SampleConfig

    parser = add_config_command(
        subparsers, "sample", SampleConfig,
        help="sample images from a model (and LoRA) for a prompt set",
        description="Sample images with per-image seeds; writes PNGs, metadata.jsonl and grid.png to OUTPUT_DIR.",
        example=EXAMPLE,
    )
    parser.add_argument("--quiet", "-q", action="store_true", help="no progress bar")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from align.evaluate import SampleConfig, sample_to_folder

    config = resolve_config(SampleConfig, args)
    if config is None:
        return 0
    out, records, _ = sample_to_folder(config, progress=not args.quiet)
    print(f"{plural(len(records), 'image')} written to {out} (grid: {out / 'grid.png'})")
    return 0
