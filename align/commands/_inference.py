"""Pieces shared by the inference-time subcommands (``align steer``, ``align guide``)."""

from __future__ import annotations

import argparse
import dataclasses
import json
from pathlib import Path
from typing import Any

from align.core.errors import check_choice, check_device

DTYPES = ("auto", "float32", "float16", "bfloat16")
#: images per row of a command's grid.png
GRID_COLUMNS = 16


def check_run_fields(config) -> None:
    """Validate the fields every inference command has (device, dtype, sizes, output folder)."""
    from align.core.errors import check_range
    from align.core.paths import check_output_dir

    check_device("device", config.device)
    check_choice("dtype", config.dtype, DTYPES)
    for name in ("height", "width", "max_sequence_length"):
        if getattr(config, name) is not None:
            check_range(name, getattr(config, name), 1, None, integer=True)
    check_range("num_steps", config.num_steps, 1, None, integer=True)
    check_output_dir("output_dir", config.output_dir)


def add_common_flags(parser: argparse.ArgumentParser) -> None:
    """Flags that set config fields (they win over --config and key=value)."""
    parser.add_argument("--model", "-m", help="model: 'builtin', a local diffusers folder or a hub id")
    parser.add_argument("--prompt", "-p", action="append", dest="prompt_list", metavar="TEXT",
                        help="a prompt (repeat for several); default: the config's prompts")
    parser.add_argument("--output", "-o", dest="output_dir", help="output folder")
    parser.add_argument("--quiet", "-q", action="store_true", help="no progress bar")


def load_run_config(cls, args: argparse.Namespace, flags: dict[str, Any]):
    """Config from --config, key=value overrides, then the flags; None after --print-config."""
    import yaml

    from align.core.config import load_config, to_dict

    config = load_config(cls, args.config, args.overrides)
    given = {k: v for k, v in flags.items() if v is not None}
    if args.prompt_list:
        given["prompts"] = list(args.prompt_list)
    if args.model:
        given["model"] = args.model
    if args.output_dir:
        given["output_dir"] = args.output_dir
    config = dataclasses.replace(config, **given) if given else config
    if args.print_config:
        print(yaml.safe_dump(to_dict(config), sort_keys=False), end="")
        return None
    return config


def load_model(config):
    """The DiffusionModel of ``config.model`` on the configured device and dtype."""
    import torch

    from align.core.models import DiffusionModel

    device = config.device
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    name = config.dtype
    if name == "auto":
        name = "float16" if torch.device(device).type == "cuda" else "float32"
    dtype = getattr(torch, name)
    return DiffusionModel.from_pretrained(
        config.model, dtype=dtype, device=device, offline=config.offline, allow_pickle=config.allow_pickle
    )


def save_images(images, folder: Path, names: list[str]) -> list[str]:
    """Save images [B, 3, H, W] in [0, 1] as PNG files ``folder/<name>.png``; returns the paths."""
    from diffusers.image_processor import VaeImageProcessor

    folder.mkdir(parents=True, exist_ok=True)
    pil = VaeImageProcessor.numpy_to_pil(VaeImageProcessor.pt_to_numpy(images.float().cpu()))
    paths = []
    for image, name in zip(pil, names):
        path = folder / f"{name}.png"
        image.save(path)
        paths.append(str(path))
    return paths


def write_results(output_dir: Path, config, results: dict[str, Any]) -> Path:
    """results.json (with the resolved config) and config.yaml in ``output_dir``."""
    from align.core.config import save_config, to_dict

    output_dir.mkdir(parents=True, exist_ok=True)
    save_config(config, output_dir / "config.yaml")
    path = output_dir / "results.json"
    path.write_text(json.dumps({"config": to_dict(config), **results}, indent=2))
    return path
