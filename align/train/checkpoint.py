"""Atomic training checkpoints.

A checkpoint is a folder ``<run>/checkpoints/step-XXXXXXXX`` holding the trainable weights
(safetensors), the optimiser / lr-scheduler / RNG states (``torch.save``, read back with
``weights_only=True``) and ``state.json``.  It is written into a temporary sibling folder,
flushed to disk, then renamed into place, so a crash during a save leaves the previous
checkpoints intact and never a half-written one under a checkpoint's name.  ``latest`` names
the newest complete checkpoint and is replaced atomically too.  Only the last ``keep`` are kept.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from align.core.errors import AlignError

STATE_FILE = "state.json"
LATEST_FILE = "latest"
PREFIX = "step-"
TMP_PREFIX = ".tmp-"


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _fsync_tree(path: Path) -> None:
    for file in path.rglob("*"):
        if file.is_file():
            with open(file, "rb") as fh:
                os.fsync(fh.fileno())
    _fsync_dir(path)


def atomic_write_text(path: Path, text: str) -> None:
    """Write ``text`` to ``path`` through a temporary file and an atomic rename."""
    path = Path(path)
    tmp = path.with_name(f"{TMP_PREFIX}{path.name}.{os.getpid()}")
    with open(tmp, "w", encoding="utf-8") as fh:
        fh.write(text)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)
    _fsync_dir(path.parent)


def atomic_directory(final: Path, fill) -> Path:
    """Create directory ``final`` atomically: ``fill(tmp_dir)`` writes it, then it is renamed in.

    An existing ``final`` is replaced (moved aside, then deleted after the rename).
    """
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = final.parent / f"{TMP_PREFIX}{final.name}.{os.getpid()}.{time.monotonic_ns()}"
    tmp.mkdir()
    try:
        fill(tmp)
        _fsync_tree(tmp)
        old = None
        if final.exists():
            old = final.parent / f"{TMP_PREFIX}old-{final.name}.{os.getpid()}.{time.monotonic_ns()}"
            os.replace(final, old)
        os.replace(tmp, final)
        _fsync_dir(final.parent)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return final


def rng_state() -> dict[str, Any]:
    """Global RNG states (python, numpy, torch CPU and CUDA) in a weights_only-loadable form."""
    py = random.getstate()
    np_state = np.random.get_state()
    state: dict[str, Any] = {
        "python": [py[0], list(py[1]), py[2]],
        "numpy": [np_state[0], torch.from_numpy(np_state[1].astype(np.int64)), int(np_state[2]),
                  int(np_state[3]), float(np_state[4])],
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: Mapping[str, Any]) -> None:
    py = state["python"]
    random.setstate((py[0], tuple(py[1]), py[2]))
    n = state["numpy"]
    np.random.set_state((n[0], n[1].numpy().astype(np.uint32), n[2], n[3], n[4]))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


@dataclass
class CheckpointContents:
    """What a checkpoint holds, as loaded."""

    path: Path
    step: int
    trainable: dict[str, torch.Tensor]
    optimizer: dict[str, Any] | None
    lr_scheduler: dict[str, Any] | None
    rng: dict[str, Any] | None
    extra: dict[str, torch.Tensor]
    state: dict[str, Any]
    #: every key of extra.safetensors, also those not loaded (``load(weights=False)`` leaves out the EMA)
    extra_keys: frozenset[str] = frozenset()


class CheckpointManager:
    """Writes, lists, prunes and loads the checkpoints of one run."""

    def __init__(self, run_dir: str | Path, keep: int = 3):
        self.dir = Path(run_dir) / "checkpoints"
        self.keep = keep

    def path_for(self, step: int) -> Path:
        return self.dir / f"{PREFIX}{step:08d}"

    def complete(self) -> list[Path]:
        """Complete checkpoints, oldest first."""
        if not self.dir.is_dir():
            return []
        found = [p for p in self.dir.iterdir() if p.is_dir() and p.name.startswith(PREFIX) and (p / STATE_FILE).is_file()]
        return sorted(found, key=lambda p: p.name)

    def clean_partial(self) -> int:
        """Remove temporary folders left by saves that were interrupted; returns how many."""
        if not self.dir.is_dir():
            return 0
        removed = 0
        for p in self.dir.iterdir():
            if p.name.startswith(TMP_PREFIX):
                shutil.rmtree(p, ignore_errors=True) if p.is_dir() else p.unlink(missing_ok=True)
                removed += 1
        return removed

    def latest(self) -> Path | None:
        """The newest complete checkpoint (via ``latest``, falling back to a scan)."""
        pointer = self.dir / LATEST_FILE
        if pointer.is_file():
            candidate = self.dir / pointer.read_text().strip()
            if (candidate / STATE_FILE).is_file():
                return candidate
        done = self.complete()
        return done[-1] if done else None

    def save(
        self,
        step: int,
        trainable: Mapping[str, torch.Tensor],
        *,
        optimizer: Mapping[str, Any] | None = None,
        lr_scheduler: Mapping[str, Any] | None = None,
        rng: Mapping[str, Any] | None = None,
        extra: Mapping[str, torch.Tensor] | None = None,
        state: Mapping[str, Any] | None = None,
        write_extra_files=None,
    ) -> Path:
        """Write checkpoint ``step`` atomically, point ``latest`` at it and prune old ones."""

        def fill(tmp: Path) -> None:
            save_file({k: v.detach().cpu().contiguous() for k, v in trainable.items()}, tmp / "trainable.safetensors")
            if extra:
                save_file({k: v.detach().cpu().contiguous() for k, v in extra.items()}, tmp / "extra.safetensors")
            if optimizer is not None:
                torch.save(optimizer, tmp / "optimizer.pt")
            if lr_scheduler is not None:
                torch.save(lr_scheduler, tmp / "lr_scheduler.pt")
            if rng is not None:
                torch.save(rng, tmp / "rng.pt")
            if write_extra_files is not None:
                write_extra_files(tmp)
            # state.json last: its presence marks the folder complete even without the rename
            (tmp / STATE_FILE).write_text(json.dumps({"step": step, **(state or {})}, indent=2, default=str))

        path = atomic_directory(self.path_for(step), fill)
        atomic_write_text(self.dir / LATEST_FILE, path.name)
        self.prune()
        return path

    def prune(self) -> None:
        done = self.complete()
        for old in done[: max(0, len(done) - self.keep)]:
            shutil.rmtree(old, ignore_errors=True)

    def load(self, path: str | Path | None = None, *, weights: bool = True,
             copies: tuple[str, ...] = ("ema.",)) -> CheckpointContents:
        """Load a checkpoint (default: the latest complete one).

        ``weights=False`` leaves out the trained weights, the optimiser state and the copies of the weights (the
        extra tensors whose names start with one of ``copies``: the EMA, DiffusionNFT's old policy), for a process
        that receives its shards from the main process under sharding (FSDP, DeepSpeed): one full copy in CPU memory per machine would
        otherwise become one per process.
        """
        target = Path(path) if path is not None else self.latest()
        if target is None:
            raise AlignError(f"no complete checkpoint found in {str(self.dir)!r}; nothing to resume from")
        if not (target / STATE_FILE).is_file():
            raise AlignError(
                f"{str(target)!r} is not a complete checkpoint (no {STATE_FILE}); accepted: 'latest' or a "
                f"checkpoint folder such as {str(self.path_for(0))!r}"
            )

        def maybe(name: str):
            f = target / name
            return torch.load(f, map_location="cpu", weights_only=True) if f.is_file() else None

        state = json.loads((target / STATE_FILE).read_text())
        extra, extra_keys = {}, frozenset()
        extra_file = target / "extra.safetensors"
        if extra_file.is_file():
            with safe_open(extra_file, framework="pt") as fh:
                extra_keys = frozenset(fh.keys())
                extra = {k: fh.get_tensor(k) for k in extra_keys if weights or not k.startswith(copies)}
        return CheckpointContents(
            path=target,
            step=int(state["step"]),
            trainable=load_file(target / "trainable.safetensors") if weights else {},
            optimizer=maybe("optimizer.pt") if weights else None,
            lr_scheduler=maybe("lr_scheduler.pt"),
            rng=maybe("rng.pt"),
            extra=extra,
            state=state,
            extra_keys=extra_keys,
        )
