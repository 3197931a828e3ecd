"""A reward served by ``align serve-reward`` on another process or machine, named like any other.

>>> reward = build_reward("remote", url="http://127.0.0.1:8700", reward="hpsv3")
>>> scores = reward(images, prompts)          # one 7B judge for every worker

The wire format (version 1, shared with :mod:`rewards.server`):

* request: ``POST {url}/v1/score/{reward}`` (``?grad=1`` also asks for the gradient), body
  safetensors bytes holding ``images`` [B, 3, H, W] in [0, 1] in the caller's floating dtype
  (float16, bfloat16, float32 or float64: the bytes are the tensor's, so nothing is lost in
  transit) and the prompts as a JSON list in the header metadata (``"prompts"``); an
  ``Authorization: Bearer <token>`` header when the server has a token;
* answer 200: safetensors bytes holding ``scores`` [B] float32 (NaN where not valid), ``valid``
  [B] (uint8), one ``info/<key>`` [B] per info entry, and with ``?grad=1`` ``grad`` [B, 3, H, W]
  (d score_i / d image_i, in float32); any other status: JSON ``{"error": message}``.

Faults follow the reward protocol (:mod:`rewards.base`): a refused or dropped connection, a
timeout, HTTP 503 (the server is busy, its reward is unavailable or it timed out) and 429 are
transient (:class:`RewardUnavailable`: retried ``retries`` times with exponential backoff, then
raised or dropped by ``on_invalid``); any other 4xx is a bad request or a bad setting
(:class:`RewardError`: wrong token, unknown reward, oversized or malformed payload; never
retried); a 5xx "reward raised" is a :class:`RewardCrash` naming the remote reward, whose message
carries the server's.

Differentiable when the served reward is (the server says so at ``/health``): with gradients on
and images that require them, the server returns each image's gradient and the scores enter the
caller's graph through it (each score depends on its own image only, as for every zoo reward).
"""

from __future__ import annotations

import http.client
import json
import os
import struct
import threading
import urllib.parse
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from align.core.errors import (
    AlignError,
    ConfigError,
    RewardCrash,
    RewardError,
    RewardUnavailable,
    check_range,
)

from .base import Reward, RewardOutput
from .registry import register_reward

WIRE_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
TOKEN_ENV = "ALIGN_REWARD_TOKEN"
URL_ENV = "ALIGN_REWARD_URL"


# -- the wire format --------------------------------------------------------------------------------
class WireError(AlignError):
    """A payload that is not what the wire format says (the server answers 400 with its message)."""


def _safetensors_header(data: bytes) -> dict:
    """The JSON header of safetensors bytes (8-byte little-endian length, then JSON)."""
    if len(data) < 8:
        raise WireError(f"payload of {len(data)} bytes is not safetensors (it needs an 8-byte header length)")
    (length,) = struct.unpack("<Q", data[:8])
    if length > len(data) - 8:
        raise WireError(f"payload is not safetensors: header length {length} exceeds the {len(data) - 8} bytes that follow")
    try:
        header = json.loads(data[8 : 8 + length])
    except ValueError as exc:
        raise WireError(f"payload is not safetensors: its header is not JSON ({exc})") from None
    if not isinstance(header, dict):
        raise WireError("payload is not safetensors: its header is not a JSON object")
    return header


def _load(data: bytes) -> tuple[dict[str, Tensor], dict[str, str]]:
    from safetensors.torch import load

    metadata = _safetensors_header(data).get("__metadata__") or {}
    try:
        tensors = load(data)
    except Exception as exc:
        raise WireError(f"payload is not valid safetensors: {exc}") from None
    return tensors, metadata


def encode_request(images: Tensor, prompts: Sequence[str]) -> bytes:
    """Safetensors bytes of a scoring request (see the module docstring)."""
    from safetensors.torch import save

    images = images.detach()
    if images.dtype not in WIRE_DTYPES:
        raise AlignError(f"images of dtype {images.dtype} cannot be sent; accepted: {', '.join(map(str, WIRE_DTYPES))}")
    return save({"images": images.cpu().contiguous()}, metadata={"prompts": json.dumps(list(prompts))})


def decode_request(data: bytes) -> tuple[Tensor, list[str]]:
    """(images [B, 3, H, W], prompts) of a scoring request; :class:`WireError` if malformed."""
    tensors, metadata = _load(data)
    if set(tensors) != {"images"}:
        raise WireError(f"request must hold one tensor named 'images'; got {sorted(tensors)}")
    images = tensors["images"]
    if images.dtype not in WIRE_DTYPES or images.ndim != 4 or images.shape[1] != 3:
        raise WireError(f"images must be a floating tensor [B, 3, H, W]; got {images.dtype} {tuple(images.shape)}")
    try:
        prompts = json.loads(metadata.get("prompts", "null"))
    except ValueError as exc:
        raise WireError(f"request metadata 'prompts' is not JSON: {exc}") from None
    if not isinstance(prompts, list) or not all(isinstance(p, str) for p in prompts):
        raise WireError("request metadata 'prompts' must be a JSON list of strings")
    if len(prompts) != images.shape[0]:
        raise WireError(f"request has {images.shape[0]} images but {len(prompts)} prompts; send one per image")
    return images, prompts


@dataclass
class ScoredBatch:
    """What the server answers: scores [B], valid [B], info {key: [B]}, optionally grad [B, 3, H, W]."""

    scores: Tensor
    valid: Tensor
    info: dict[str, Tensor]
    grad: Tensor | None = None


def encode_response(batch: ScoredBatch) -> bytes:
    from safetensors.torch import save

    tensors = {"scores": batch.scores.detach().float().cpu().contiguous(), "valid": batch.valid.cpu().to(torch.uint8)}
    tensors.update({f"info/{k}": v.detach().float().cpu().contiguous() for k, v in batch.info.items()})
    if batch.grad is not None:
        tensors["grad"] = batch.grad.detach().float().cpu().contiguous()
    return save(tensors)


def decode_response(data: bytes, size: int) -> ScoredBatch:
    tensors, _ = _load(data)
    scores, valid = tensors.get("scores"), tensors.get("valid")
    if scores is None or valid is None or scores.shape != (size,) or valid.shape != (size,):
        raise WireError(f"answer must hold 'scores' and 'valid' of {size} entries; got {sorted(tensors)}")
    info = {k.removeprefix("info/"): v for k, v in tensors.items() if k.startswith("info/")}
    return ScoredBatch(scores, valid.bool(), info, tensors.get("grad"))


# -- the client ---------------------------------------------------------------------------------------
class _RemoteScores(torch.autograd.Function):
    """Scores computed elsewhere, entering the graph through the gradients the server returned."""

    @staticmethod
    def forward(ctx, images: Tensor, scores: Tensor, grad: Tensor) -> Tensor:
        ctx.save_for_backward(grad)
        return scores.clone()

    @staticmethod
    def backward(ctx, grad_output: Tensor):
        (grad,) = ctx.saved_tensors
        return grad_output.view(-1, 1, 1, 1).to(grad.dtype) * grad, None, None


def _url_parts(url: str) -> tuple[str, str, int, str]:
    parts = urllib.parse.urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ConfigError(f"url={url!r} must be an http(s) URL of an `align serve-reward` server, e.g. http://127.0.0.1:8700")
    port = parts.port or (443 if parts.scheme == "https" else 80)
    return parts.scheme, parts.hostname, port, parts.path.rstrip("/")


@register_reward("remote")
class RemoteReward(Reward):
    """A reward served by ``align serve-reward`` (HTTP): scores computed by one shared model;
    differentiable when the served reward is.

    Args:
        url: the server (default: the ``ALIGN_REWARD_URL`` environment variable).
        reward: the served reward's name.
        token_env: environment variable holding the server's bearer token (sent if set).
        timeout: seconds to wait for an answer (connecting, then each read) before a transient fault.
        retries: retries of a transient fault (refused connection, timeout, HTTP 503 / 429).
        retry_backoff: seconds before the first retry, doubled after each.
        differentiable: whether to ask for gradients; None asks the server (``/health``) at construction.
        chunk_size, on_invalid: as every reward.
    """

    differentiable = False

    def __init__(
        self,
        url: str | None = None,
        *,
        reward: str,
        token_env: str = TOKEN_ENV,
        timeout: float = 120.0,
        retries: int = 3,
        retry_backoff: float = 1.0,
        differentiable: bool | None = None,
        chunk_size: int | None = None,
        on_invalid: str = "raise",
    ):
        super().__init__(chunk_size=chunk_size, on_invalid=on_invalid, retries=retries, retry_backoff=retry_backoff)
        url = url or os.environ.get(URL_ENV)
        if not url:
            raise ConfigError(f"remote reward needs url= (or the {URL_ENV} environment variable): the server's address")
        if not isinstance(reward, str) or not reward:
            raise ConfigError(f"reward={reward!r} must name a reward the server serves")
        check_range("timeout", timeout, 0, low_inclusive=False)
        self.scheme, self.host, self.port, self.base_path = _url_parts(url)
        self.url = url.rstrip("/")
        self.reward = reward
        self.name = f"remote:{reward}"
        self.token_env = token_env
        self.request_timeout = float(timeout)
        self._local = threading.local()  # one keep-alive connection per thread
        self.differentiable = self._served_differentiable() if differentiable is None else bool(differentiable)

    # -- HTTP -------------------------------------------------------------------------------------
    def _connection(self) -> http.client.HTTPConnection:
        connection = getattr(self._local, "connection", None)
        if connection is None:
            cls = http.client.HTTPSConnection if self.scheme == "https" else http.client.HTTPConnection
            connection = cls(self.host, self.port, timeout=self.request_timeout)
            self._local.connection = connection
        return connection

    def _drop_connection(self) -> None:
        connection = getattr(self._local, "connection", None)
        if connection is not None:
            connection.close()
            self._local.connection = None

    def __getstate__(self):
        state = super().__getstate__() if hasattr(super(), "__getstate__") else self.__dict__.copy()
        state = dict(state)
        state.pop("_local", None)  # connections stay with the process and thread that opened them
        return state

    def __setstate__(self, state):
        super().__setstate__(state)
        self._local = threading.local()

    def _exchange(self, method: str, path: str, body: bytes | None, headers: dict) -> tuple[http.client.HTTPResponse, bytes]:
        """One request on this thread's connection; a kept-alive connection the server has closed
        meanwhile is reopened once (the request never reached the server)."""
        reused = getattr(self._local, "connection", None) is not None
        try:
            connection = self._connection()
            connection.request(method, self.base_path + path, body=body, headers=headers)
            response = connection.getresponse()
        except (http.client.RemoteDisconnected, BrokenPipeError, ConnectionResetError):
            if not reused:
                raise
            self._drop_connection()
            connection = self._connection()
            connection.request(method, self.base_path + path, body=body, headers=headers)
            response = connection.getresponse()
        return response, response.read()

    def _http(self, method: str, path: str, body: bytes | None = None) -> tuple[int, bytes]:
        """(status, body) of one request; network failures become :class:`RewardUnavailable`."""
        headers = {"Content-Type": "application/octet-stream"} if body is not None else {}
        token = os.environ.get(self.token_env, "")
        if token:
            headers["Authorization"] = f"Bearer {token}"
        try:
            response, data = self._exchange(method, path, body, headers)
        except TimeoutError:
            self._drop_connection()
            raise RewardUnavailable(f"{self._where()}: no answer within timeout={self.request_timeout}s") from None
        except (OSError, http.client.HTTPException) as exc:  # refused, reset, unreachable, dropped mid-answer
            self._drop_connection()
            raise RewardUnavailable(f"{self._where()}: cannot reach the server: {type(exc).__name__}: {exc}") from None
        if response.getheader("Connection", "").lower() == "close":
            self._drop_connection()
        return response.status, data

    def _where(self) -> str:
        return f"remote reward {self.reward!r} at {self.url}"

    def _served_differentiable(self) -> bool:
        try:
            status, data = self._http("GET", "/health")
        except RewardUnavailable as exc:
            raise AlignError(f"{exc}; start it first (`align serve-reward {self.reward}`) or pass differentiable=") from None
        if status != 200:
            raise AlignError(f"{self._where()}: /health answered HTTP {status}: {_error_text(data)}")
        served = json.loads(data).get("rewards", {})
        if self.reward not in served:
            raise AlignError(f"{self._where()}: the server does not serve {self.reward!r}; it serves {', '.join(served)}")
        return bool(served[self.reward].get("differentiable"))

    # -- the reward -------------------------------------------------------------------------------
    def _score(self, images: Tensor, prompts: list[str]) -> RewardOutput:
        want_grad = self.differentiable and torch.is_grad_enabled() and images.requires_grad
        path = f"/v1/score/{urllib.parse.quote(self.reward, safe='')}" + ("?grad=1" if want_grad else "")
        status, data = self._http("POST", path, encode_request(images, prompts))
        if status == 200:
            try:
                answer = decode_response(data, images.shape[0])
            except WireError as exc:
                raise RewardUnavailable(f"{self._where()}: malformed answer: {exc}") from None
        elif status in (429, 503):
            raise RewardUnavailable(f"{self._where()}: HTTP {status}: {_error_text(data)}")
        elif status >= 500:
            raise RewardCrash(f"{self._where()} raised on the server (HTTP {status}): {_error_text(data)}")
        else:
            raise RewardError(f"{self._where()}: HTTP {status}: {_error_text(data)}")
        scores = answer.scores.to(images.device)
        if want_grad:
            if answer.grad is None or answer.grad.shape != images.shape:
                raise RewardUnavailable(f"{self._where()}: the answer lacks the gradient it was asked for")
            scores = _RemoteScores.apply(images, scores.to(images.dtype), answer.grad.to(images.device, images.dtype))
        info = {k: v.to(images.device) for k, v in answer.info.items()}
        return RewardOutput(scores, answer.valid.to(images.device), info)


def _error_text(data: bytes) -> str:
    """The server's error message (JSON ``{"error": ...}``), else the raw text, shortened."""
    try:
        return str(json.loads(data)["error"])
    except (ValueError, KeyError, TypeError):
        return data[:300].decode(errors="replace")
