"""``align serve-reward``: serve rewards over HTTP to many training or steering processes."""

from __future__ import annotations

import argparse

from align.commands.common import add_config_command, resolve_config

#: the override example shown in --help (tests check that it is accepted)
EXAMPLE = "rewards=[aesthetic,clipscore] port=8700 max_batch_size=16"


def add_parser(subparsers) -> None:
    from rewards.server import ServeConfig

    parser = add_config_command(
        subparsers, "serve-reward", ServeConfig,
        help="serve rewards over HTTP, batched, to many workers (one model for all)",
        description=(
            "Load each named reward once and serve it over HTTP (Starlette + uvicorn; pip install "
            "diffusion-align[serve]): align serve-reward NAME... [key=value ...]. Requests from many processes "
            "are batched up to max_batch_size images or max_delay_ms. Workers use it like any reward: "
            "{remote: {url: http://HOST:PORT, reward: NAME}} in a training or steering config. Endpoints: "
            "GET /health, POST /v1/score/NAME. Set the environment variable named by token_env to require a "
            "bearer token.\n\n"
            "Example: align serve-reward hpsv3 aesthetic port=8700 device=cuda dtype=bfloat16"
        ),
        example=EXAMPLE,
    )
    parser.set_defaults(func=run)


def split_names(overrides: list[str]) -> list[str]:
    """Bare words are reward names (``align serve-reward hpsv3 port=8700``): turn them into rewards=[...]."""
    names = [item for item in overrides if "=" not in item]
    rest = [item for item in overrides if "=" in item]
    if names and any(item.split("=", 1)[0] == "rewards" for item in rest):
        from align.core.errors import ConfigError

        raise ConfigError(f"name the rewards either as words ({' '.join(names)}) or with rewards=[...], not both")
    return rest + ([f"rewards=[{','.join(names)}]"] if names else [])


def run(args: argparse.Namespace) -> int:
    from rewards.server import ServeConfig, serve

    args.overrides = split_names(list(args.overrides))
    config = resolve_config(ServeConfig, args)
    if config is None:
        return 0
    try:
        serve(config)
    except KeyboardInterrupt:
        pass
    return 0
