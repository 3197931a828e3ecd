"""Pieces shared by the inference-time subcommands (``align steer``, ``align guide``)."""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from align.core.errors import ConfigError, check_choice, check_device
from align.core.models import DTYPE_CHOICES, check_guidance

#: images per row of a command's grid.png
GRID_COLUMNS = 16


def check_run_fields(config) -> None:
    """Validate the fields every inference command has (device, dtype, guidance, sizes, output folder)."""
    from align.core.errors import check_range
    from align.core.paths import check_output_dir

    check_device("device", config.device)
    check_choice("dtype", config.dtype, DTYPE_CHOICES)
    check_guidance(config.guidance_scale, config.distilled_guidance)
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

    from align.core.config import load_config, replace_config, to_dict

    config = load_config(cls, args.config, args.overrides)
    given = {k: v for k, v in flags.items() if v is not None}
    if args.prompt_list:
        given["prompts"] = list(args.prompt_list)
    if args.model:
        given["model"] = args.model
    if args.output_dir:
        given["output_dir"] = args.output_dir
    config = replace_config(config, **given) if given else config
    if args.print_config:
        print(yaml.safe_dump(to_dict(config), sort_keys=False), end="")
        return None
    return config


def load_config_model(config, lora: str | None = None):
    """The DiffusionModel of ``config.model`` (and ``lora``) with the config's device, dtype and VAE precision."""
    from align.core.models import load_model

    return load_model(
        config.model, dtype=config.dtype, device=config.device, lora=lora, offline=config.offline,
        allow_pickle=config.allow_pickle, upcast_vae=config.upcast_vae,
    )


def pipeline_guidance_scale(model, config) -> float | None:
    """The ``guidance_scale`` to call a steering pipeline with.

    The pipelines follow diffusers' FluxPipeline: for FLUX their ``guidance_scale`` is the distilled
    guidance the transformer embeds, and no classifier-free pass runs.  So a FLUX model gets
    ``config.distilled_guidance`` there, and a classifier-free ``guidance_scale`` is refused.
    """
    if model.family != "flux":
        return config.guidance_scale
    if config.guidance_scale not in (None, 1.0):
        raise ConfigError(
            f"guidance_scale={config.guidance_scale!r} asks for classifier-free guidance, which the steering "
            "pipelines do not run for FLUX (as diffusers' FluxPipeline, they sample it with its distilled guidance "
            "only); accepted for FLUX: guidance_scale unset (null) or 1, and distilled_guidance for the embedded value"
        )
    return config.distilled_guidance


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
