"""Subcommands of the ``align`` CLI (one module each; see align/cli.py)."""
