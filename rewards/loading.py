"""Finding and safely loading reward model weights, and importing optional packages.

* Files are named by a local path, by ``"<owner>/<repo>/<path in repo>"`` on the Hugging Face
  hub, or by an ``https://`` URL (weights published outside the hub; cached where
  ``torch.hub.load_state_dict_from_url`` caches them).  Offline mode (``HF_HUB_OFFLINE=1`` or
  ``offline=True``) only reads the local caches.
* Weights load through safetensors, or ``torch.load(weights_only=True)``, which only rebuilds
  tensors and plain containers.  Anything else in a pickle (arbitrary objects, code) is refused
  unless the caller passes ``allow_pickle=True`` for a source they trust.
* Remote code is never run unless asked for (``trust_remote_code`` stays False).
"""

from __future__ import annotations

import pickle
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from align.core.errors import AlignError
from align.core.models import hub_offline
from align.core.paths import is_file, user_path

_LOCAL_PREFIXES = (".", "/", "~")


def resolve_file(spec: str | Path, *, offline: bool | None = None, revision: str | None = None) -> Path:
    """Local path of ``spec``: an existing file, ``owner/repo/filename`` fetched from the hub, or a URL (cached)."""
    if is_file(spec):
        return user_path(spec)
    text = str(spec)
    if text.startswith(("https://", "http://")):
        return _download_url(text, offline)
    parts = text.split("/")
    if text.startswith(_LOCAL_PREFIXES) or len(parts) < 3 or not all(parts):
        raise AlignError(
            f"weights file {text!r} does not exist; accepted: an existing local file or "
            "'<owner>/<repo>/<filename>' on the Hugging Face hub"
        )
    repo_id, filename = "/".join(parts[:2]), "/".join(parts[2:])
    from huggingface_hub import hf_hub_download

    local_only = hub_offline(offline)
    try:
        return Path(hf_hub_download(repo_id, filename, revision=revision, local_files_only=local_only))
    except Exception as exc:
        where = (
            "offline mode is on (HF_HUB_OFFLINE=1) and it is not in the local Hugging Face cache"
            if local_only
            else f"download failed: {type(exc).__name__}: {str(exc).strip().splitlines()[0] if str(exc).strip() else ''}"
        )
        raise AlignError(
            f"could not get {filename!r} from the hub repository {repo_id!r}: {where}. "
            "Pass a local path to the file instead, or download it first."
        ) from None


def _download_url(url: str, offline: bool | None) -> Path:
    """The file at ``url``, downloaded once into torch hub's ``checkpoints`` folder."""
    import urllib.parse

    import torch.hub

    target = Path(torch.hub.get_dir()) / "checkpoints" / Path(urllib.parse.urlsplit(url).path).name
    if target.is_file():
        return target
    if hub_offline(offline):
        raise AlignError(
            f"could not get {url!r}: offline mode is on (HF_HUB_OFFLINE=1) and it is not in the cache {str(target)!r}. "
            "Pass a local path to the file instead, or download it first."
        )
    target.parent.mkdir(parents=True, exist_ok=True)
    try:
        torch.hub.download_url_to_file(url, str(target), progress=False)
    except Exception as exc:
        raise AlignError(f"could not download {url!r}: {type(exc).__name__}: {exc}. Pass a local path instead.") from None
    return target


def load_state_dict(path: str | Path, *, allow_pickle: bool = False) -> dict[str, Tensor]:
    """Tensors of a checkpoint: safetensors, or a torch file restricted to tensors (see the module doc).

    A checkpoint wrapped as ``{"state_dict": ...}`` or ``{"model": ...}`` is unwrapped, and a
    ``module.`` prefix (DataParallel) is removed.
    """
    path = Path(path)
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        state = load_file(str(path))
    else:
        try:
            state = torch.load(path, map_location="cpu", weights_only=True)
        except pickle.UnpicklingError as exc:
            if not allow_pickle:
                raise AlignError(
                    f"refusing to load {str(path)!r}: it is a pickle holding more than tensors, and unpickling "
                    "can run arbitrary code. Convert it to safetensors, or pass allow_pickle=True if you trust "
                    f"the source. ({str(exc).strip().splitlines()[0]})"
                ) from None
            state = torch.load(path, map_location="cpu", weights_only=False)
    return _unwrap(state, str(path))


def _unwrap(state: Any, where: str) -> dict[str, Tensor]:
    for key in ("state_dict", "model"):
        if isinstance(state, Mapping) and isinstance(state.get(key), Mapping):
            state = state[key]
    if not isinstance(state, Mapping) or not all(isinstance(v, Tensor) for v in state.values()):
        raise AlignError(f"{where!r} does not hold a state dict of tensors")
    if state and all(k.startswith("module.") for k in state):
        state = {k[len("module.") :]: v for k, v in state.items()}
    return dict(state)


def from_pretrained(cls, source: str, *, offline: bool | None = None, revision: str | None = None, **kwargs):
    """``cls.from_pretrained`` (a transformers class) with offline handling and a clear error.

    safetensors are preferred; a ``.bin`` fallback is read by transformers with
    ``weights_only=True``.  Remote code is not run.
    """
    local_only = hub_offline(offline)
    try:
        return cls.from_pretrained(source, local_files_only=local_only, revision=revision, **kwargs)
    except (OSError, ValueError) as exc:
        where = (
            "offline mode is on (HF_HUB_OFFLINE=1) and it is not in the local Hugging Face cache"
            if local_only
            else f"loading failed: {str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__}"
        )
        raise AlignError(
            f"could not load {cls.__name__} from {source!r}: {where}. Accepted: a local folder or a hub id."
        ) from None


def import_optional(module: str, extra: str, purpose: str):
    """Import an optional dependency, or raise an AlignError naming the extra that installs it.

    Any failure counts as missing: these packages import torchvision, whose registry wheels can
    fail to load with a CPU-only torch.
    """
    import importlib

    try:
        return importlib.import_module(module)
    except Exception as exc:
        raise AlignError(
            f"{purpose} needs the optional package {module!r}, which could not be imported "
            f"({type(exc).__name__}: {exc}); install it with `pip install diffusion-align[{extra}]`"
        ) from None
