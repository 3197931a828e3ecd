"""Preference pairs for Diffusion-DPO: offline data sets, their preparation and latent cache, and pairs ranked from the model's own samples.

Offline data.  One row holds two images, a caption and a label, in Pick-a-Pic's columns by default
(``jpg_0``, ``jpg_1``, ``label_0``, ``caption``; :class:`PreferenceColumns` renames them).  The label
says which image is preferred: 1 (image 0), 0 (image 1) or a tie (0.5, Pick-a-Pic's value, or the
string "tie"); ties carry no preference and are dropped (counted).  Pairs come out winner first.
Sources (:func:`iter_preference_pairs`), all read as a stream, one row at a time:

* a JSONL file, or a folder with a ``metadata.jsonl``: one JSON object per line; an image is a path,
  relative to the JSONL's folder;
* a Hugging Face ``datasets`` data set: a folder written by ``save_to_disk`` (memory-mapped, not
  loaded), Parquet file(s) (streamed), or a hub id such as ``yuvalkirstain/pickapic_v2``
  (``streaming=True``: never downloaded whole).  An image may be bytes (Pick-a-Pic), an ``Image``
  feature ({"bytes", "path"} or a decoded image) or a path.  ``datasets`` is the optional extra
  ``data`` and is imported only for these sources.

Bad input.  A data set without the needed columns is an error naming the missing and the found
columns.  A bad row (a label outside {0, 1, tie}, a caption that is not a string, an image that
cannot be decoded, a row without a column, a line that is not JSON) is either an error naming its
row (``on_bad_row="error"``) or skipped and counted (``"skip"``; :class:`PreferenceCounts`).

Preparation (:class:`ImagePreparation`): as the original Diffusion-DPO, resize the shorter side to
the resolution (bilinear), crop (centre or random) and flip at random (p = 1/2, ``hflip``), each
image of a pair with its own draw, seeded by its row so the result does not depend on batching.
Each image's original size and crop corner are kept for SDXL's added conditions
(:func:`align.train.dpo.sdxl_time_ids`).

Latent cache (:class:`LatentCache`): the prepared pairs encoded once and written to a folder as
safetensors shards plus a manifest, then read back shard by shard every epoch; the crop and flip
drawn when the cache was built are the ones every epoch sees.  The manifest records a fingerprint
of what produced the latents (source, resolution, augmentation, encoder); a cache built for a
different fingerprint is an error, never silently reused or overwritten.

Online pairs (:func:`pairs_from_rewards`): the model's own samples, grouped by prompt and scored by
any reward (black-box ones included), are ranked within each group and paired winner / loser;
pairs whose rewards are tied (or closer than a margin) are skipped.
"""

from __future__ import annotations

import io
import json
import numbers
import os
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from align.core.errors import AlignError, check_choice, check_range

#: what to do with a bad row: raise an error naming it, or skip it and count it
ON_BAD_ROW: tuple[str, ...] = ("error", "skip")
#: how the model's own samples are paired within a prompt's group
PAIRINGS: tuple[str, ...] = ("best_worst", "halves", "all")
#: how many bad-row messages :class:`PreferenceCounts` keeps as examples
KEPT_EXAMPLES = 5
_DATASETS_MARKERS = ("dataset_info.json", "state.json", "dataset_dict.json")


@dataclass(frozen=True)
class PreferenceColumns:
    """Column names of a preference data set (Pick-a-Pic's by default)."""

    image_0: str = "jpg_0"
    image_1: str = "jpg_1"
    label: str = "label_0"
    caption: str = "caption"

    @property
    def required(self) -> tuple[str, ...]:
        return (self.image_0, self.image_1, self.label, self.caption)


class BadPreferenceRow(AlignError):
    """One row of a preference data set cannot be used; ``where`` names it, ``reason`` is its kind
    ("label", "image", "caption", "column" or "json")."""

    def __init__(self, where: str, reason: str, message: str):
        super().__init__(f"{where}: {message}")
        self.where, self.reason = where, reason


@dataclass
class PreferenceCounts:
    """What reading a preference data set met: rows, pairs kept, ties dropped, bad rows skipped by reason."""

    rows: int = 0
    pairs: int = 0
    ties: int = 0
    skipped: int = 0
    reasons: dict[str, int] = field(default_factory=dict)
    examples: list[str] = field(default_factory=list)

    def record(self, error: BadPreferenceRow) -> None:
        self.skipped += 1
        self.reasons[error.reason] = self.reasons.get(error.reason, 0) + 1
        if len(self.examples) < KEPT_EXAMPLES:
            self.examples.append(str(error))

    def summary(self) -> str:
        text = f"{self.pairs} pairs from {self.rows} rows, {self.ties} ties dropped, {self.skipped} bad rows skipped"
        if self.reasons:
            text += " (" + ", ".join(f"{k}: {v}" for k, v in sorted(self.reasons.items())) + ")"
        return text


@dataclass(frozen=True)
class PreferencePair:
    """A caption and its preferred (winner) and rejected (loser) images (PIL, RGB).

    ``row`` is where it came from: the line number in a JSONL file, the 0-based index in a ``datasets`` set.
    """

    caption: str
    winner: Any
    loser: Any
    row: int


# ---------------------------------------------------------------------------------------- rows


def preference_winner(label: object, where: str) -> int | None:
    """Index (0 or 1) of the preferred image for a label, or None for a tie; a bad label raises BadPreferenceRow."""
    if isinstance(label, str):
        if label.strip().lower() == "tie":
            return None
    elif isinstance(label, numbers.Real) and not isinstance(label, bool):
        value = float(label)
        if value == 1.0:
            return 0
        if value == 0.0:
            return 1
        if value == 0.5:
            return None
    raise BadPreferenceRow(where, "label", f"label {label!r} is not one of 1 (image 0 preferred), 0 (image 1), 0.5 or 'tie'")


def decode_image(value: object, root: Path | None, where: str, column: str):
    """An RGB PIL image from bytes, a {"bytes", "path"} mapping, a PIL image or a path (relative to ``root``)."""
    from PIL import Image

    if isinstance(value, Image.Image):
        image = value
    else:
        if isinstance(value, Mapping):
            value = value.get("bytes") if value.get("bytes") is not None else value.get("path")
        if isinstance(value, (bytes, bytearray, memoryview)):
            source: Any = io.BytesIO(bytes(value))
        elif isinstance(value, (str, os.PathLike)):
            path = Path(value).expanduser()
            source = path if path.is_absolute() or root is None else root / path
        else:
            raise BadPreferenceRow(where, "image", f"{column} is a {type(value).__name__}; accepted: bytes, a path or an image")
        try:
            image = Image.open(source)
            image.load()  # decode now: Image.open only reads the header
        except (OSError, ValueError, Image.DecompressionBombError) as exc:
            raise BadPreferenceRow(where, "image", f"{column} could not be decoded ({exc})") from exc
    return image.convert("RGB")


def _jsonl_rows(path: Path) -> Iterator[tuple[str, int, Any]]:
    with open(path, encoding="utf-8") as f:
        for number, line in enumerate(f, start=1):
            if not line.strip():
                continue
            where = f"{path} line {number}"
            try:
                record = json.loads(line)
            except json.JSONDecodeError as exc:
                record = BadPreferenceRow(where, "json", f"not a JSON object ({exc.msg})")
            yield where, number, record


def _import_datasets():
    try:
        import datasets
    except ImportError as exc:
        raise AlignError(
            "reading a Hugging Face data set needs the 'datasets' package: pip install 'diffusion-align[data]'"
        ) from exc
    return datasets


def _hf_rows(dataset, name: str) -> Iterator[tuple[str, int, Any]]:
    for index, record in enumerate(dataset):
        yield f"{name} row {index}", index, record


def _open_source(source: str | Path, split: str) -> tuple[Iterator[tuple[str, int, Any]], Path | None, list[str] | None]:
    """(rows, root for relative image paths, the column names when the source declares them)."""
    path = Path(source).expanduser()
    if path.is_file() and path.suffix == ".jsonl":
        return _jsonl_rows(path), path.parent, None
    if path.is_dir() and (path / "metadata.jsonl").is_file():
        return _jsonl_rows(path / "metadata.jsonl"), path, None
    if path.is_dir() and any((path / m).is_file() for m in _DATASETS_MARKERS):
        datasets = _import_datasets()
        dataset = datasets.load_from_disk(str(path))
        if isinstance(dataset, datasets.DatasetDict):
            if split not in dataset:
                raise AlignError(f"data set {path} has no split {split!r}; accepted: {', '.join(dataset)}")
            dataset = dataset[split]
        return _hf_rows(dataset, str(path)), path, list(dataset.column_names)
    parquet = [path] if path.is_file() and path.suffix == ".parquet" else sorted(path.glob("*.parquet")) if path.is_dir() else []
    if parquet:
        datasets = _import_datasets()
        dataset = datasets.load_dataset(
            "parquet", data_files=[str(p) for p in parquet], split="train", streaming=True
        )
        columns = list(dataset.features) if dataset.features is not None else None
        return _hf_rows(dataset, str(path)), path if path.is_dir() else path.parent, columns
    if path.exists():
        raise AlignError(
            f"data set {source} is not a preference data set; accepted: a .jsonl file, a folder with metadata.jsonl, "
            "a folder written by datasets' save_to_disk, .parquet file(s), or a Hugging Face hub id"
        )
    text = str(source)
    if text.startswith(("/", ".", "~")) or text.endswith((".jsonl", ".parquet")) or text.count("/") > 1:
        raise AlignError(f"data set {source} not found")
    datasets = _import_datasets()
    try:
        dataset = datasets.load_dataset(text, split=split, streaming=True)
    except Exception as exc:  # the hub's errors vary by version (not found, gated, offline, no such split)
        raise AlignError(f"data set {source} is not a local path and could not be opened from the hub: {exc}") from exc
    columns = list(dataset.features) if dataset.features is not None else None
    return _hf_rows(dataset, text), None, columns


def _check_columns(columns: Iterable[str], needed: PreferenceColumns, source: object) -> None:
    found = list(columns)
    missing = [c for c in needed.required if c not in found]
    if missing:
        raise AlignError(
            f"data set {source} has no column {', '.join(repr(c) for c in missing)}; found: "
            f"{', '.join(repr(c) for c in found) or 'none'} (name the columns with image_0_column, image_1_column, "
            "label_column, caption_column)"
        )


def _pair_from_record(record: Any, where: str, row: int, columns: PreferenceColumns, root: Path | None) -> PreferencePair | None:
    if isinstance(record, BadPreferenceRow):
        raise record
    if not isinstance(record, Mapping):
        raise BadPreferenceRow(where, "json", f"a row must be a JSON object, not a {type(record).__name__}")
    absent = [c for c in columns.required if c not in record]
    if absent:
        raise BadPreferenceRow(where, "column", f"no {', '.join(repr(c) for c in absent)}")
    winner = preference_winner(record[columns.label], where)
    if winner is None:
        return None
    caption = record[columns.caption]
    if not isinstance(caption, str):
        raise BadPreferenceRow(where, "caption", f"caption {caption!r} is not a string")
    images = (
        decode_image(record[columns.image_0], root, where, columns.image_0),
        decode_image(record[columns.image_1], root, where, columns.image_1),
    )
    return PreferencePair(caption, images[winner], images[1 - winner], row)


def iter_preference_pairs(
    source: str | Path,
    *,
    split: str = "train",
    columns: PreferenceColumns = PreferenceColumns(),
    on_bad_row: str = "error",
    counts: PreferenceCounts | None = None,
) -> Iterator[PreferencePair]:
    """Stream the winner-first pairs of a preference data set (see the module docstring for sources).

    Ties are dropped; bad rows raise :class:`BadPreferenceRow` naming the row, or with
    ``on_bad_row="skip"`` are skipped; both are counted in ``counts`` when given.  The needed columns
    are checked before the first row (from the source's schema, or the first row's keys).
    """
    check_choice("on_bad_row", on_bad_row, ON_BAD_ROW)
    counts = counts if counts is not None else PreferenceCounts()
    rows, root, declared = _open_source(source, split)
    if declared is not None:
        _check_columns(declared, columns, source)
    first = True
    for where, row, record in rows:
        if first and declared is None and isinstance(record, Mapping):
            _check_columns(record.keys(), columns, source)
        first = False
        counts.rows += 1
        try:
            pair = _pair_from_record(record, where, row, columns, root)
        except BadPreferenceRow as error:
            if on_bad_row == "error":
                raise
            counts.record(error)
            continue
        if pair is None:
            counts.ties += 1
            continue
        counts.pairs += 1
        yield pair


# --------------------------------------------------------------------------------- preparation


@dataclass(frozen=True)
class PreparedImage:
    """An image ready to encode: pixels [3, R, R] in [0, 1], its original (height, width) and crop (top, left)."""

    pixels: Tensor
    original_size: tuple[int, int]
    crop_top_left: tuple[int, int]


@dataclass(frozen=True)
class ImagePreparation:
    """Resize the shorter side to ``resolution`` (bilinear), crop to a square, flip at random.

    Attributes:
        resolution: side of the square output in pixels.
        random_crop: a random crop instead of the centre one.
        hflip: flip horizontally with probability 1/2 (the original Diffusion-DPO default).
        seed: with the row and the image's slot (0 winner, 1 loser), seeds the crop and flip draws.
    """

    resolution: int
    random_crop: bool = False
    hflip: bool = True
    seed: int = 0

    def __post_init__(self) -> None:
        check_range("resolution", self.resolution, 1, None, integer=True)
        check_range("seed", self.seed, 0, None, integer=True)

    def generator(self, row: int, slot: int) -> torch.Generator:
        return torch.Generator().manual_seed((self.seed * 1_000_003 + row) * 2 + slot)

    def __call__(self, image, row: int = 0, slot: int = 0) -> PreparedImage:
        from PIL import Image

        g = self.generator(row, slot)
        width, height = image.size
        size = self.resolution
        if width <= height:  # the shorter side becomes `size`, the longer keeps the aspect (rounded down)
            new_w, new_h = size, max(size, int(size * height / width))
        else:
            new_w, new_h = max(size, int(size * width / height)), size
        resized = image.resize((new_w, new_h), Image.BILINEAR) if (new_w, new_h) != (width, height) else image
        if self.random_crop:
            top = int(torch.randint(0, new_h - size + 1, (1,), generator=g))
            left = int(torch.randint(0, new_w - size + 1, (1,), generator=g))
        else:
            top, left = int(round((new_h - size) / 2.0)), int(round((new_w - size) / 2.0))
        array = np.asarray(resized.crop((left, top, left + size, top + size)), dtype=np.uint8)
        pixels = torch.from_numpy(array.copy()).permute(2, 0, 1).float() / 255.0
        if self.hflip and bool(torch.rand(1, generator=g) < 0.5):
            pixels = pixels.flip(-1)
        return PreparedImage(pixels, (height, width), (top, left))


@dataclass
class LatentPairBatch:
    """Encoded pairs: latents of winners and losers [n, ...], captions, source rows, and per image the
    original (height, width) and crop (top, left) [n, 2] (SDXL's added conditions)."""

    winners: Tensor
    losers: Tensor
    captions: list[str]
    rows: Tensor
    winner_original_sizes: Tensor
    winner_crops: Tensor
    loser_original_sizes: Tensor
    loser_crops: Tensor

    _TENSORS = (
        "winners", "losers", "rows", "winner_original_sizes", "winner_crops", "loser_original_sizes", "loser_crops",
    )

    def __len__(self) -> int:
        return len(self.captions)

    def tensors(self) -> dict[str, Tensor]:
        return {name: getattr(self, name).contiguous() for name in self._TENSORS}

    def select(self, index: Tensor) -> LatentPairBatch:
        picked = {name: getattr(self, name)[index] for name in self._TENSORS}
        return LatentPairBatch(captions=[self.captions[i] for i in index.tolist()], **picked)

    @classmethod
    def concat(cls, batches: list[LatentPairBatch]) -> LatentPairBatch:
        joined = {name: torch.cat([getattr(b, name) for b in batches]) for name in cls._TENSORS}
        return cls(captions=[c for b in batches for c in b.captions], **joined)


def encode_pairs(
    pairs: Iterable[PreferencePair],
    prepare: ImagePreparation,
    encode: Callable[[Tensor], Tensor],
    batch_size: int = 8,
) -> Iterator[LatentPairBatch]:
    """Prepare and encode pairs in batches of ``batch_size`` (winners and losers in one call of ``encode``).

    ``encode`` maps images [B, 3, R, R] in [0, 1], on the CPU, to latents (e.g.
    ``lambda x: model.encode_images(x.to(model.device))``); the latents are kept on the CPU.
    """
    check_range("batch_size", batch_size, 1, None, integer=True)
    chunk: list[PreferencePair] = []
    for pair in pairs:
        chunk.append(pair)
        if len(chunk) == batch_size:
            yield _encode_chunk(chunk, prepare, encode)
            chunk = []
    if chunk:
        yield _encode_chunk(chunk, prepare, encode)


def _encode_chunk(chunk: list[PreferencePair], prepare: ImagePreparation, encode) -> LatentPairBatch:
    winners = [prepare(p.winner, p.row, 0) for p in chunk]
    losers = [prepare(p.loser, p.row, 1) for p in chunk]
    with torch.no_grad():
        latents = encode(torch.stack([im.pixels for im in winners + losers]))
    n = len(chunk)

    def sizes(images, key):
        return torch.tensor([getattr(im, key) for im in images], dtype=torch.int64)

    return LatentPairBatch(
        winners=latents[:n].detach().cpu(),
        losers=latents[n:].detach().cpu(),
        captions=[p.caption for p in chunk],
        rows=torch.tensor([p.row for p in chunk], dtype=torch.int64),
        winner_original_sizes=sizes(winners, "original_size"),
        winner_crops=sizes(winners, "crop_top_left"),
        loser_original_sizes=sizes(losers, "original_size"),
        loser_crops=sizes(losers, "crop_top_left"),
    )


# -------------------------------------------------------------------------------- latent cache


class LatentCache:
    """Encoded preference pairs on disk: ``shard-NNNNN.safetensors`` files and a ``manifest.json``.

    Build (or reuse) with :meth:`build_or_load`; read with :meth:`iter_batches`.  The manifest is
    written last, so a folder without one holds an unfinished build and is rebuilt.
    """

    MANIFEST = "manifest.json"
    FORMAT = 1

    def __init__(self, directory: str | Path, manifest: Mapping[str, Any]):
        self.directory = Path(directory)
        self.manifest = dict(manifest)

    def __len__(self) -> int:
        return int(self.manifest["pairs"])

    @property
    def counts(self) -> PreferenceCounts:
        """The counts of the data set read when the cache was built."""
        return PreferenceCounts(**self.manifest["counts"])

    @staticmethod
    def _normalised(fingerprint: Mapping[str, Any]) -> dict[str, Any]:
        try:
            return json.loads(json.dumps(dict(fingerprint), sort_keys=True))
        except TypeError as exc:
            raise AlignError(f"a latent cache fingerprint must be JSON data: {exc}") from exc

    @classmethod
    def load(cls, directory: str | Path, fingerprint: Mapping[str, Any]) -> LatentCache | None:
        """The complete cache in ``directory`` if it matches ``fingerprint``; None if there is none.

        A complete cache built for another fingerprint raises AlignError naming the differing keys.
        """
        path = Path(directory) / cls.MANIFEST
        if not path.is_file():
            return None
        manifest = json.loads(path.read_text())
        want, have = cls._normalised(fingerprint), manifest.get("fingerprint", {})
        if manifest.get("format") != cls.FORMAT or have != want:
            keys = sorted(k for k in set(want) | set(have) if want.get(k) != have.get(k)) or ["format"]
            detail = "; ".join(f"{k}: cached {have.get(k)!r}, wanted {want.get(k)!r}" for k in keys)
            raise AlignError(
                f"latent cache {directory} was built for other settings ({detail}); delete it or choose another "
                "latent_cache folder"
            )
        return cls(directory, manifest)

    @classmethod
    def build_or_load(
        cls,
        directory: str | Path,
        fingerprint: Mapping[str, Any],
        batches: Callable[[], Iterable[LatentPairBatch]],
        *,
        counts: PreferenceCounts | None = None,
        shard_size: int = 1024,
    ) -> LatentCache:
        """The cache in ``directory`` for ``fingerprint``, built from ``batches()`` when it is not there yet.

        ``batches`` is called only to build (typically :func:`encode_pairs` over
        :func:`iter_preference_pairs`, which fills ``counts``; the counts are stored in the manifest).
        """
        check_range("shard_size", shard_size, 1, None, integer=True)
        cached = cls.load(directory, fingerprint)
        if cached is not None:
            return cached
        from safetensors.torch import save_file

        folder = Path(directory)
        folder.mkdir(parents=True, exist_ok=True)
        for stale in folder.glob("shard-*.safetensors*"):
            stale.unlink()
        shards: list[dict[str, Any]] = []
        pending: list[LatentPairBatch] = []
        pending_pairs = 0

        def flush(final: bool) -> None:
            nonlocal pending, pending_pairs
            while pending_pairs >= shard_size or (final and pending_pairs > 0):
                joined = LatentPairBatch.concat(pending)
                take = min(shard_size, len(joined))
                shard = joined.select(torch.arange(take))
                rest = joined.select(torch.arange(take, len(joined)))
                name = f"shard-{len(shards):05d}.safetensors"
                tmp = folder / (name + ".tmp")
                save_file(shard.tensors(), str(tmp), metadata={"captions": json.dumps(shard.captions)})
                os.replace(tmp, folder / name)
                shards.append({"file": name, "pairs": take})
                pending, pending_pairs = ([rest] if len(rest) else []), len(rest)

        for batch in batches():
            if len(batch):
                pending.append(batch)
                pending_pairs += len(batch)
                flush(final=False)
        flush(final=True)
        manifest = {
            "format": cls.FORMAT,
            "fingerprint": cls._normalised(fingerprint),
            "shards": shards,
            "pairs": sum(s["pairs"] for s in shards),
            "counts": asdict(counts if counts is not None else PreferenceCounts()),
        }
        tmp = folder / (cls.MANIFEST + ".tmp")
        tmp.write_text(json.dumps(manifest, indent=1))
        os.replace(tmp, folder / cls.MANIFEST)
        return cls(folder, manifest)

    def read_shard(self, index: int) -> LatentPairBatch:
        from safetensors import safe_open

        path = self.directory / self.manifest["shards"][index]["file"]
        with safe_open(str(path), framework="pt") as f:
            tensors = {name: f.get_tensor(name) for name in f.keys()}  # noqa: SIM118 - safe_open has no iterator
            captions = json.loads(f.metadata()["captions"])
        return LatentPairBatch(captions=captions, **tensors)

    def iter_batches(self, batch_size: int, generator: torch.Generator | None = None) -> Iterator[LatentPairBatch]:
        """Batches of ``batch_size`` pairs (the last may be smaller), one shard in memory at a time.

        With ``generator`` the shard order and the order within each shard are shuffled.
        """
        check_range("batch_size", batch_size, 1, None, integer=True)
        count = len(self.manifest["shards"])
        order = torch.randperm(count, generator=generator) if generator is not None else torch.arange(count)
        carry: LatentPairBatch | None = None
        for index in order.tolist():
            shard = self.read_shard(index)
            if generator is not None:
                shard = shard.select(torch.randperm(len(shard), generator=generator))
            if carry is not None:
                shard = LatentPairBatch.concat([carry, shard])
            full = len(shard) // batch_size * batch_size
            for start in range(0, full, batch_size):
                yield shard.select(torch.arange(start, start + batch_size))
            carry = shard.select(torch.arange(full, len(shard))) if full < len(shard) else None
        if carry is not None:
            yield carry


# ------------------------------------------------------------------------------- online pairs


def pairs_from_rewards(
    rewards: Tensor,
    groups: Tensor,
    *,
    pairing: str = "best_worst",
    valid: Tensor | None = None,
    min_margin: float = 0.0,
) -> tuple[Tensor, Tensor]:
    """Winner and loser indices [P] of preference pairs among samples grouped by prompt.

    Within each group (``groups`` [N] holds group ids) the valid, finite rewards are ranked (ties keep
    their order); ``pairing`` "best_worst" pairs the best with the worst (Flow-GRPO's online DPO),
    "halves" the k-th best with the k-th worst for k < G / 2, "all" every two samples.  A pair is kept
    only when the winner's reward exceeds the loser's by more than ``min_margin``: tied rewards never
    make a pair.  Groups come in increasing id order.
    """
    check_choice("pairing", pairing, PAIRINGS)
    check_range("min_margin", min_margin, 0.0, None)
    if rewards.ndim != 1 or groups.shape != rewards.shape:
        raise AlignError(f"rewards {tuple(rewards.shape)} and groups {tuple(groups.shape)} must both be [N]")
    r = rewards.detach().double().cpu()
    ok = torch.isfinite(r)
    if valid is not None:
        ok &= valid.bool().cpu()
    groups = groups.cpu()
    winners: list[int] = []
    losers: list[int] = []
    for g in torch.unique(groups):
        members = torch.nonzero(ok & (groups == g)).flatten()
        if members.numel() < 2:
            continue
        ranked = members[torch.sort(r[members], descending=True, stable=True).indices].tolist()
        if pairing == "best_worst":
            candidates = [(ranked[0], ranked[-1])]
        elif pairing == "halves":
            candidates = [(ranked[k], ranked[-1 - k]) for k in range(len(ranked) // 2)]
        else:
            candidates = [(ranked[i], ranked[j]) for i in range(len(ranked)) for j in range(i + 1, len(ranked))]
        for winner, loser in candidates:
            if float(r[winner] - r[loser]) > min_margin:  # > 0 at least: tied rewards never make a pair
                winners.append(winner)
                losers.append(loser)
    return torch.tensor(winners, dtype=torch.long), torch.tensor(losers, dtype=torch.long)
