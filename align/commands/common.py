"""Argument handling shared by the config-driven subcommands."""

from __future__ import annotations

import argparse
from pathlib import Path


def wrap_paragraphs(text: str) -> str:
    """Help prose wrapped to the terminal's width, paragraphs (blank-line separated) kept."""
    import textwrap

    from align.core.config import help_width

    width = help_width()
    return "\n\n".join(textwrap.fill(" ".join(par.split()), width) for par in text.split("\n\n"))


def add_config_command(subparsers, name: str, cls, *, help: str, description: str, example: str,
                       fields_title: str = "configuration fields (YAML keys / key=value overrides):"):
    """A subcommand driven by the config dataclass ``cls``: wrapped description, every field in the
    epilog, ``--config``, ``--print-config`` and ``key=value`` overrides with ``example`` (which must be
    valid for ``cls``: tests load every command's example)."""
    parser = subparsers.add_parser(
        name, help=help, description=wrap_paragraphs(description), epilog=config_epilog(cls, fields_title),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--config", "-c", type=Path, help="YAML file with config fields (overridden by key=value)")
    parser.add_argument(
        "--print-config", action="store_true", help="print the resolved configuration as YAML and exit"
    )
    parser.add_argument(
        "overrides", nargs="*", metavar="key=value",
        help=f"override config fields, nested with dots (e.g. {example})",
    )
    parser.set_defaults(config_example=example)
    return parser


def resolve_config(cls, args: argparse.Namespace):
    """Load ``cls`` from --config and overrides; print it and return None with --print-config."""
    import yaml

    from align.core.config import load_config, to_dict

    config = load_config(cls, args.config, args.overrides)
    if args.print_config:
        print(yaml.safe_dump(to_dict(config), sort_keys=False), end="")
        return None
    return config


def config_epilog(cls, title: str) -> str:
    """Help epilog listing every config field (type, default, description)."""
    from align.core.config import describe_config

    return f"{title}\n{describe_config(cls)}"


def plural(count: int, noun: str) -> str:
    """'1 image', '3 images'."""
    return f"{count} {noun}{'' if count == 1 else 's'}"


def quiet_libraries() -> None:
    """Silence the loading progress bars and info logs of diffusers and transformers."""
    import diffusers
    import transformers

    diffusers.utils.logging.disable_progress_bar()
    diffusers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    transformers.utils.logging.set_verbosity_error()
