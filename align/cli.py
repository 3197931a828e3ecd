"""The ``align`` command line.

Each subcommand lives in ``align/commands/<name>.py`` and provides ``add_parser(subparsers)``
(which sets ``func`` on its parser) without importing heavy libraries at module level, so that
``align --help`` is quick.  A user error (:class:`align.core.errors.AlignError`) prints one line and
exits with status 2, without a traceback.  A reward that crashed (:class:`align.core.errors.RewardCrash`:
a bug in the reward's code, or out of memory) is a bug, not a wrong input: the reward's own
traceback is printed above the one-line message, and the status is 1.
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys
import traceback

#: subcommand name -> module under align.commands
COMMANDS: dict[str, str] = {
    "train": "train",
    "plan": "plan",
    "sample": "sample",
    "eval": "eval",
    "steer": "steer",
    "guide": "guide",
    "demo": "demo",
    "serve-reward": "serve_reward",
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="align",
        description=(
            "Align diffusion models with rewards: fine-tune by reward backpropagation (train), "
            "steer at inference time (steer, guide), sample, evaluate, serve rewards to many workers "
            "(serve-reward), and run the built-in demo."
        ),
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True
    for module in COMMANDS.values():
        importlib.import_module(f"align.commands.{module}").add_parser(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")
    parser = build_parser()
    argv = sys.argv[1:] if argv is None else list(argv)
    commands = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction)).choices
    if argv and argv[0] in commands:
        # flags and key=value overrides in any order (`align steer -q num_steps=4`); plain
        # parse_args stops taking the overrides once a flag follows the first of them
        args = commands[argv[0]].parse_intermixed_args(argv[1:])
        args.command = argv[0]
    else:
        args = parser.parse_args(argv)
    from align.commands.common import quiet_libraries

    # the libraries' own loading bars and info logs drown the toolkit's progress bars
    quiet_libraries()
    from align.core.errors import AlignError, RewardCrash

    try:
        return int(args.func(args) or 0)
    except RewardCrash as exc:
        # Fixing a bug needs its file and line, and rerunning with a flag to see them could cost the
        # hours a run took to reach the crash; the reward's frames only (the chained cause), then the line.
        if exc.__cause__ is not None:
            traceback.print_exception(exc.__cause__, file=sys.stderr)
        print(f"align {args.command}: error: {exc}", file=sys.stderr)
        return 1
    except AlignError as exc:
        print(f"align {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"align {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
