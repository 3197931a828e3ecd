"""Sampling to a folder and scoring images with several rewards (``align sample``, ``align eval``).

A sample folder holds PNG images, ``metadata.jsonl`` (one ``{"file_name", "prompt", "seed"}``
line per image, the Hugging Face image-folder convention), ``sampling.json`` (the model, the LoRA and
every sampling setting) and ``grid.png``.  ``align eval``
scores such a folder (or any folder of images: prompts from ``metadata.jsonl``, else the file
names), or samples a model on a prompt set first, and writes ``scores.csv``, ``scores.json``
(per-image scores, per-reward mean / std / min / max, and what was scored: the model and LoRA, from
the sample folder's ``sampling.json`` when a folder is scored) and ``grid.png``.

Each image's prompt has a category: its GenEval task type (from a GenEval metadata file given as
``prompts=...jsonl``, or GenEval's templates), ``ocr`` for prompts that quote text to render, else
``other``.  ``scores.json`` reports every reward per category too ("by_category"; with GenEval's
reward, the per-task accuracies, and "category_mean" their average, GenEval's overall score; with
the OCR reward, ``ocr/exact`` on the ``ocr`` category is the OCR accuracy).  A reward is scored only
on the prompts it applies to (:meth:`rewards.Reward.applies_to`: the OCR reward on prompts with
quoted text, GenEval's on GenEval prompts); its info entries become columns ``reward/key``.
``grid_<reward>.png`` shows each reward's worst images (top row) and best (bottom row).
"""

from __future__ import annotations

import csv
import json
import math
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from align.core.errors import AlignError, ConfigError, check_choice, check_device, check_range
from align.core.models import DEFAULT_DISTILLED_GUIDANCE, DTYPE_CHOICES, check_guidance
from align.core.paths import check_output_dir

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp")


@dataclass
class SampleConfig:
    """Configuration of ``align sample``.

    Attributes:
        model: 'builtin', a local diffusers folder, or a hub id.
        lora: a LoRA folder (diffusers format, e.g. a training run's OUTPUT_DIR/lora) to load; None for the base model.
        prompts: a named prompt set (shapes, simple_animals), a text file with one prompt per line, or a list.
        images_per_prompt: images per prompt (seeds seed, seed+1, ...).
        seed: first seed.
        num_steps: sampling steps.
        guidance_scale: classifier-free guidance scale (not used by guidance-distilled models such as FLUX-dev
            unless true_cfg is set).
        distilled_guidance: the guidance value a guidance-distilled model (FLUX-dev) embeds; ignored by other models.
        true_cfg: run classifier-free guidance on a guidance-distilled model too (twice the denoiser compute).
        sampler: auto, ddim, ddpm or flow.
        eta: DDIM eta / flow-step stochasticity.
        height: image height (default: the model's native size).
        width: image width (default: the model's native size).
        batch_size: images per forward batch.
        output_dir: folder for the images, metadata.jsonl and grid.png.
        device: auto, cpu, cuda or cuda:N.
        dtype: weight dtype: auto (bfloat16 on a CUDA device that supports it, float16 on other CUDA devices,
            float32 on the CPU), float32, float16 or bfloat16.
        upcast_vae: always decode in float32 (false: only where diffusers does, when the weights are float16 and
            the VAE's config sets force_upcast, as SDXL's VAE does).
        offline: only use local files (default: HF_HUB_OFFLINE).
        allow_pickle: allow loading pickle checkpoints (unsafe with untrusted files).
    """

    model: str = "builtin"
    lora: str | None = None
    prompts: str | list[str] = "shapes_heldout"
    images_per_prompt: int = 1
    seed: int = 0
    num_steps: int = 30
    guidance_scale: float = 5.0
    distilled_guidance: float = DEFAULT_DISTILLED_GUIDANCE
    true_cfg: bool = False
    sampler: str = "auto"
    eta: float = 0.0
    height: int | None = None
    width: int | None = None
    batch_size: int = 8
    output_dir: str = "samples"
    device: str = "auto"
    dtype: str = "auto"
    upcast_vae: bool = False
    offline: bool | None = None
    allow_pickle: bool = False

    def __post_init__(self) -> None:
        check_range("images_per_prompt", self.images_per_prompt, 1, 10_000, integer=True)
        check_range("seed", self.seed, 0, 2**63 - 1, integer=True)
        check_range("num_steps", self.num_steps, 1, 1000, integer=True)
        check_guidance(self.guidance_scale, self.distilled_guidance, self.true_cfg)
        check_range("eta", self.eta, 0.0, None)
        check_range("batch_size", self.batch_size, 1, None, integer=True)
        for name in ("height", "width"):
            if getattr(self, name) is not None:
                check_range(name, getattr(self, name), 1, None, integer=True)
        check_device("device", self.device)
        check_output_dir("output_dir", self.output_dir)
        check_choice("dtype", self.dtype, DTYPE_CHOICES)


@dataclass
class EvalConfig(SampleConfig):
    """Configuration of ``align eval``: the sampling fields apply when ``images`` is not given.

    Attributes:
        images: a folder of images to score (prompts from its metadata.jsonl, else the file names); None samples the model.
        rewards: rewards to evaluate, each reported separately: names (see --list-rewards), or in YAML a mapping label -> a name, {reward: name, argument: value, ...} or a {name: weight} composition.
        reward_batch_size: images per reward call.
        extremes: images per row of each reward's grid of worst (top) and best (bottom) images (at most half of those it scored).
    """

    images: str | None = None
    rewards: list[str] | dict[str, Any] = field(default_factory=lambda: ["brightness", "saturation", "jpeg_compressibility"])
    reward_batch_size: int = 16
    extremes: int = 4
    output_dir: str = "eval"

    def __post_init__(self) -> None:
        super().__post_init__()
        if not self.rewards:
            raise ConfigError("rewards=[] is empty; name at least one reward")
        check_range("reward_batch_size", self.reward_batch_size, 1, None, integer=True)
        check_range("extremes", self.extremes, 1, 64, integer=True)

    def reward_specs(self) -> dict[str, Any]:
        """Label -> what :func:`rewards.registry.build_reward_entry` builds it from."""
        return {n: n for n in self.rewards} if isinstance(self.rewards, list) else dict(self.rewards)


def sample_to_folder(config: SampleConfig, model=None, progress: bool = True) -> tuple[Path, list[dict[str, Any]], Tensor]:
    """Sample every prompt ``images_per_prompt`` times; write PNGs, metadata.jsonl and grid.png."""
    from align.core.images import save_grid, save_png, to_uint8
    from align.core.models import load_model
    from align.core.prompts import load_prompts
    from align.steer.generate import generate

    if model is None:
        model = load_model(
            config.model, dtype=config.dtype, device=config.device, lora=config.lora, offline=config.offline,
            allow_pickle=config.allow_pickle, upcast_vae=config.upcast_vae,
        )
    model.distilled_guidance = config.distilled_guidance
    prompts = load_prompts(config.prompts)
    jobs = [(p, config.seed + k) for p in prompts for k in range(config.images_per_prompt)]
    images = generate(
        model, [p for p, _ in jobs], [s for _, s in jobs], num_steps=config.num_steps,
        guidance_scale=model.cfg_scale(config.guidance_scale, true_cfg=config.true_cfg), sampler=config.sampler,
        eta=config.eta, height=config.height, width=config.width, batch_size=config.batch_size, progress=progress,
    )
    out = Path(config.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    records = []
    pixels = to_uint8(images)
    digits = max(4, len(str(len(jobs))))
    for i, ((prompt, seed), arr) in enumerate(zip(jobs, pixels)):
        name = f"{i:0{digits}d}.png"
        save_png(arr, out / name)
        records.append({"file_name": name, "prompt": prompt, "seed": seed})
    (out / "metadata.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    (out / SAMPLING_RECORD).write_text(json.dumps(sampling_record(config, model), indent=2))
    save_grid(images, out / "grid.png", ncols=min(8, len(jobs)))
    return out, records, images


SAMPLING_RECORD = "sampling.json"


def sampling_record(config: SampleConfig, model) -> dict[str, Any]:
    """What produced a sample folder: the model as named and as loaded, the LoRA, every sampling setting."""
    from align.core.config import to_dict

    settings = {k: v for k, v in to_dict(config).items() if k not in ("output_dir", "device", "offline")}
    return {"model": config.model, "model_path": str(model.source) if model.source else None,
            "family": model.family, "lora": config.lora, "settings": settings}


def read_image_folder(folder: str | Path) -> tuple[Tensor, list[str], list[str]]:
    """Images [N, 3, H, W] in [0, 1], their prompts and file names, from a folder.

    Prompts come from ``metadata.jsonl`` ("prompt" or "text" field) when present, otherwise from
    the file name (underscores and dashes become spaces).  All images must share one size.
    """
    import imageio.v3 as iio

    folder = Path(folder)
    if not folder.is_dir():
        raise AlignError(f"images={str(folder)!r} is not a folder")
    files = sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES and p.name != "grid.png")
    if not files:
        raise AlignError(f"images={str(folder)!r} holds no images ({', '.join(IMAGE_SUFFIXES)})")
    prompts_by_file: dict[str, str] = {}
    meta = folder / "metadata.jsonl"
    if meta.is_file():
        for n, line in enumerate(meta.read_text().splitlines(), 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
                prompts_by_file[record["file_name"]] = record.get("prompt", record.get("text", ""))
            except (json.JSONDecodeError, KeyError, TypeError):
                raise AlignError(f"{str(meta)!r} line {n} is not a JSON object with file_name and prompt") from None
    arrays, prompts = [], []
    for f in files:
        arr = iio.imread(f)
        if arr.ndim == 2:
            arr = np.stack([arr] * 3, -1)
        arrays.append(arr[..., :3])
        prompts.append(prompts_by_file.get(f.name, f.stem.replace("_", " ").replace("-", " ")))
    shapes = {a.shape for a in arrays}
    if len(shapes) > 1:
        raise AlignError(f"images in {str(folder)!r} have different sizes {sorted(shapes)}; resize them to one size")
    images = torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2).float() / 255.0
    return images, prompts, [f.name for f in files]


def score_images(
    images: Tensor, prompts: list[str], rewards: list[str] | Mapping[str, Any], batch_size: int = 16,
    offline: bool | None = None,
) -> dict[str, Tensor]:
    """{column: values [N]}: each reward's scores, then its info entries as ``reward/key``.

    ``rewards`` are names or a mapping label -> entry (:func:`rewards.registry.build_reward_entry`).
    A reward scores only the images whose prompt it applies to; values are NaN elsewhere and where
    it could not score an image.
    """
    from rewards.registry import build_reward_entry

    specs = {n: n for n in rewards} if not isinstance(rewards, Mapping) else dict(rewards)
    columns: dict[str, Tensor] = {}
    for label, spec in specs.items():
        reward = build_reward_entry(label, spec, offline=offline)
        reward.chunk_size = batch_size
        reward.to(images.device)
        chosen = [i for i, p in enumerate(prompts) if reward.applies_to(p)]
        nan = torch.full((len(prompts),), float("nan"))
        columns[label] = nan.clone()
        if not chosen:
            continue
        with torch.no_grad():
            out = reward.score(images[chosen], [prompts[i] for i in chosen])
        valid = out.valid.cpu()
        columns[label][chosen] = torch.where(valid, out.scores.float().cpu(), torch.nan)
        for key, values in out.info.items():
            columns[f"{label}/{key}"] = nan.clone()
            columns[f"{label}/{key}"][chosen] = torch.where(valid, values.float().cpu(), torch.nan)
    return columns


def prompt_category(prompt: str, tags: Mapping[str, str] | None = None) -> str:
    """A prompt's category: its GenEval task type (from ``tags``, else GenEval's templates), ``ocr`` when it
    quotes text to render, else ``other``."""
    from rewards.zoo.geneval import parse_geneval_prompt
    from rewards.zoo.ocr import quoted_text

    if tags and prompt in tags:
        return tags[prompt]
    spec = parse_geneval_prompt(prompt)
    if spec is not None:
        return spec.tag
    return "ocr" if quoted_text(prompt) is not None else "other"


def summarize(scores: dict[str, Tensor]) -> dict[str, dict[str, float]]:
    out = {}
    for name, s in scores.items():
        v = s[torch.isfinite(s)]
        n = int(v.numel())
        out[name] = {
            "mean": float(v.mean()) if n else math.nan,
            "std": float(v.std()) if n > 1 else 0.0,
            "min": float(v.min()) if n else math.nan,
            "max": float(v.max()) if n else math.nan,
            "count": n,
        }
    return out


def summarize_by_category(scores: dict[str, Tensor], categories: list[str]) -> dict[str, dict[str, dict[str, float]]]:
    """{category: summary of each column over that category's images} (columns without values there left out)."""
    out = {}
    for category in dict.fromkeys(categories):
        rows = torch.tensor([c == category for c in categories])
        parts = {name: values[rows] for name, values in scores.items() if torch.isfinite(values[rows]).any()}
        out[category] = summarize(parts)
    return out


def category_means(by_category: dict[str, dict[str, dict[str, float]]]) -> dict[str, float]:
    """Each column's mean over categories of its per-category means (GenEval's overall score over its tasks)."""
    columns = dict.fromkeys(name for summary in by_category.values() for name in summary)
    return {name: float(np.mean([s[name]["mean"] for s in by_category.values() if name in s])) for name in columns}


def extremes(values: Tensor, count: int) -> tuple[list[int], list[int]]:
    """(worst ``count`` image indices, lowest first; best ``count``, highest first) among finite values;
    at most half of them each, so that the two rows show different images (one image: both)."""
    finite = [i for i in torch.argsort(values, stable=True).tolist() if math.isfinite(float(values[i]))]
    count = min(count, max(1, len(finite) // 2)) if finite else 0
    return finite[:count], finite[::-1][:count]


def write_extremes(out_dir: Path, images: Tensor, files: list[str], scores: dict[str, Tensor], rewards: list[str],
                   count: int) -> dict[str, dict[str, Any]]:
    """grid_<reward>.png per reward: worst images on the top row, best on the bottom row; what they show."""
    from align.core.images import save_grid

    shown = {}
    for name in rewards:
        worst, best = extremes(scores[name], count)
        if not worst:
            continue
        path = out_dir / f"grid_{re.sub(r'[^A-Za-z0-9._-]+', '_', name)}.png"
        save_grid(images[worst + best], path, ncols=len(worst))
        shown[name] = {
            "grid": path.name,
            "worst": [{"file_name": files[i], "score": float(scores[name][i])} for i in worst],
            "best": [{"file_name": files[i], "score": float(scores[name][i])} for i in best],
        }
    return shown


def write_table(
    out_dir: Path, files: list[str], prompts: list[str], scores: dict[str, Tensor], scored: dict[str, Any] | None = None,
    categories: list[str] | None = None,
) -> dict[str, Any]:
    """scores.csv (one row per image) and scores.json (what was scored, summaries overall and per category, rows)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    names = list(scores)
    categories = categories or [prompt_category(p) for p in prompts]
    rows = []
    for i, (f, p) in enumerate(zip(files, prompts)):
        rows.append({"file_name": f, "prompt": p, "category": categories[i], **{n: float(scores[n][i]) for n in names}})
    with open(out_dir / "scores.csv", "w", newline="", encoding="utf-8") as fh:
        writer = csv.DictWriter(fh, fieldnames=["file_name", "prompt", "category", *names])
        writer.writeheader()
        writer.writerows(rows)
    by_category = summarize_by_category(scores, categories)
    table = {"scored": scored or {}, "summary": summarize(scores), "by_category": by_category,
             "category_mean": category_means(by_category), "images": rows}
    (out_dir / "scores.json").write_text(json.dumps(table, indent=2))
    return table


def evaluate(config: EvalConfig, progress: bool = True) -> dict[str, Any]:
    """Score a folder of images, or a model's samples, with several rewards."""
    from align.core.images import save_grid

    out = Path(config.output_dir)
    tags: dict[str, str] = {}
    if config.images is not None:
        images, prompts, files = read_image_folder(config.images)
        record = Path(config.images) / SAMPLING_RECORD
        scored = {"images": str(config.images), "model": None, "lora": None}
        if record.is_file():  # a folder written by `align sample`: it says which model and LoRA drew it
            produced = json.loads(record.read_text())
            scored.update(model=produced.get("model"), lora=produced.get("lora"), sampling=produced)
    else:
        sample_dir = out / "images"
        fields = {k: getattr(config, k) for k in SampleConfig.__dataclass_fields__ if k != "output_dir"}
        if isinstance(config.prompts, str) and config.prompts.endswith(".jsonl"):
            # GenEval's metadata: its prompts, and their task types for the report
            from rewards.zoo.geneval import read_geneval_metadata

            specs = read_geneval_metadata(config.prompts)
            tags = {spec.prompt: spec.tag for spec in specs}
            fields["prompts"] = list(dict.fromkeys(spec.prompt for spec in specs))
        sample_cfg = SampleConfig(**fields, output_dir=str(sample_dir))
        _, records, images = sample_to_folder(sample_cfg, progress=progress)
        prompts = [r["prompt"] for r in records]
        files = [f"images/{r['file_name']}" for r in records]
        scored = {"images": str(sample_dir), "model": config.model, "lora": config.lora,
                  "sampling": json.loads((sample_dir / SAMPLING_RECORD).read_text())}
    specs = config.reward_specs()
    scores = score_images(images, prompts, specs, config.reward_batch_size, offline=config.offline)
    table = write_table(out, files, prompts, scores, scored, [prompt_category(p, tags) for p in prompts])
    table["extremes"] = write_extremes(out, images, files, scores, list(specs), config.extremes)
    (out / "scores.json").write_text(json.dumps(table, indent=2))
    save_grid(images, out / "grid.png", ncols=min(8, len(files)))
    return table
