"""Argument handling shared by the config-driven subcommands."""

from __future__ import annotations

import argparse
from pathlib import Path


def add_config_arguments(parser: argparse.ArgumentParser) -> None:
    """``--config FILE``, ``--print-config`` and trailing ``key=value`` overrides."""
    parser.add_argument("--config", "-c", type=Path, help="YAML file with config fields (overridden by key=value)")
    parser.add_argument(
        "--print-config", action="store_true", help="print the resolved configuration as YAML and exit"
    )
    parser.add_argument(
        "overrides", nargs="*", metavar="key=value",
        help="override config fields, nested with dots (e.g. method=alignprop alignprop.num_steps=20 lora.rank=4)",
    )


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


def quiet_libraries() -> None:
    """Silence the loading progress bars and info logs of diffusers and transformers."""
    import diffusers
    import transformers

    diffusers.utils.logging.disable_progress_bar()
    diffusers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    transformers.utils.logging.set_verbosity_error()
