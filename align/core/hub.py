"""Why a model could not be loaded, said in this toolkit's words.

diffusers and huggingface_hub explain a failed load in their own terms ("check out the root cause in
the stacktrace above", a ``local_files_only=False`` hint that is no option of ours, "outgoing traffic
has been disabled" when nobody disabled it).  :func:`explain_load_failure` reads the exception chain
and says what is missing and what to do, naming the model: a local folder, or a download on a
connected machine.
"""

from __future__ import annotations

import socket
from collections.abc import Iterator

from align.core.errors import AlignError

#: exception class names (any module) that mean the network could not be used
_CONNECTION_ERRORS = ("ConnectError", "ConnectionError", "ConnectTimeout", "ReadTimeout", "Timeout", "ProxyError",
                      "OfflineModeIsEnabled", "LocalEntryNotFoundError")


def _chain(exc: BaseException) -> Iterator[BaseException]:
    seen: set[int] = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        yield exc
        exc = exc.__cause__ or exc.__context__


def _status(exc: BaseException) -> int | None:
    response = getattr(exc, "response", None)
    return getattr(response, "status_code", None)


def _download_hint(model: str) -> str:
    return (
        f"use a local diffusers folder (model=/path/to/folder), or download it on a connected machine "
        f"(`hf download {model}`, or `DiffusionPipeline.from_pretrained({model!r})` once) and copy the Hugging Face "
        "cache (~/.cache/huggingface) or the saved folder here"
    )


def explain_load_failure(model: str, exc: BaseException, *, offline: bool) -> AlignError:
    """An AlignError saying why hub model ``model`` did not load (``exc``) and what to do about it."""
    chain = list(_chain(exc))
    names = [type(e).__name__ for e in chain]
    statuses = [s for s in map(_status, chain) if s is not None]
    if any(n in ("RepositoryNotFoundError",) for n in names) or 404 in statuses:
        return AlignError(
            f"model={model!r} is not a model on the Hugging Face hub (or it is private); check the id, or pass a "
            "local diffusers folder"
        )
    if any(n == "GatedRepoError" for n in names) or 401 in statuses or 403 in statuses:
        return AlignError(
            f"model={model!r} is gated on the Hugging Face hub: accept its license on the model page and log in "
            "(`hf auth login`, or set HF_TOKEN), or pass a local diffusers folder"
        )
    if offline:
        return AlignError(
            f"model={model!r} is not in the local Hugging Face cache, and offline mode is on (HF_HUB_OFFLINE=1 or "
            f"offline=true), so it was not downloaded; {_download_hint(model)}"
        )
    unreachable = any(isinstance(e, (socket.gaierror, ConnectionError, TimeoutError)) for e in chain) or any(
        n in _CONNECTION_ERRORS for n in names
    )
    if unreachable:
        return AlignError(
            f"model={model!r} is not in the local Hugging Face cache and the Hugging Face hub cannot be reached from "
            f"this machine; {_download_hint(model)}"
        )
    reason = next((str(e).strip().splitlines()[0] for e in chain if str(e).strip()), type(exc).__name__)
    return AlignError(f"model={model!r} could not be loaded: {reason}")
