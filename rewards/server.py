"""Serve rewards over HTTP to many workers: ``align serve-reward NAME...``.

A training run on 8 GPUs should not load a 7B judge 8 times: one process loads each reward once
and every worker names ``{"remote": {"url": ..., "reward": NAME}}`` (:mod:`rewards.remote`).

* Framework: Starlette on uvicorn (the optional extra ``serve``), one asyncio event loop.
* Dynamic batching: requests for a reward wait in its queue; once the reward is free, a batch is
  opened with the oldest request and closed when it holds ``max_batch_size`` images or
  ``max_delay_ms`` later, and scored in one call on the reward's own worker thread (one model,
  one device: calls never overlap; requests that arrived while it was busy join at once).
  Requests are batched with others of the same image size, dtype and gradient wish.  If a batch of
  several requests fails, each request is scored alone, so that one bad request cannot fail the
  others and every error reaches the request that caused it.
* Endpoints: ``GET /health`` (what is served: names, whether differentiable, limits, queue
  lengths), ``POST /v1/score/NAME`` (:mod:`rewards.remote` describes the payload).
* Limits and answers: an optional bearer token (401 without it); request bodies over
  ``max_request_mb`` (413), more than ``max_images_per_request`` images (413), malformed payloads
  (400), an unknown reward (404), a gradient asked of a black-box reward (400), a request the
  reward rejects as invalid input (422, e.g. an OCR prompt without quoted text): the message
  says what was wrong, and the server keeps serving.  A full queue (``max_queue`` images), a
  reward that is unavailable or a request waiting longer than ``request_timeout`` seconds get
  503 with ``Retry-After`` (the client retries); a reward that raised gets 500 naming it.
* Scores equal the in-process reward's: images travel as their own bytes (safetensors), are
  converted to ``dtype`` (exact from float16 / bfloat16 into float32) and scored by the same code.
  Batching puts other requests' images beside them; per-image results do not depend on that up
  to floating-point reduction order (exact for reductions per image, within about 1e-6 relative
  for models whose matrix kernels block by batch size).
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import json
import logging
import math
import os
import socket
import statistics
import threading
import time
from collections import deque
from collections.abc import Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from align.core.errors import (
    AlignError,
    ConfigError,
    RewardCrash,
    RewardUnavailable,
    check_choice,
    check_device,
    check_range,
)

from .base import Reward, check_images
from .remote import TOKEN_ENV, ScoredBatch, WireError, decode_request, encode_response

logger = logging.getLogger("rewards.server")

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
MIB = 2**20
#: seconds an idle client connection stays open (a training step between two scorings can take a while)
KEEP_ALIVE_S = 120


@dataclass
class ServeConfig:
    """Configuration of ``align serve-reward``.

    Attributes:
        rewards: rewards to serve, each at /v1/score/NAME: registered names (zoo, plugins), or in YAML a mapping NAME -> a registered name, {reward: name, argument: value, ...}, or a {name: weight} composition.
        host: interface to listen on (127.0.0.1: this machine only; 0.0.0.0: the network).
        port: TCP port (0: a free one, printed at start).
        token_env: environment variable holding the bearer token clients must send (unset or empty: none required).
        device: auto, cpu, cuda or cuda:N (the rewards' device).
        dtype: float32, float16 or bfloat16: images are converted to it and the rewards follow.
        max_batch_size: most images scored in one call; requests from many clients are batched up to it.
        max_delay_ms: longest wait, in milliseconds, for more requests to fill a batch.
        max_images_per_request: most images one request may carry.
        max_request_mb: largest request body, in MiB.
        max_queue: most images waiting per reward; further requests get 503 (busy).
        request_timeout: seconds a request waits for its scores before 503.
        offline: only use local files when loading rewards (default: HF_HUB_OFFLINE).
    """

    rewards: list[str] | dict[str, Any] = field(default_factory=list)
    host: str = "127.0.0.1"
    port: int = 8700
    token_env: str = TOKEN_ENV
    device: str = "auto"
    dtype: str = "float32"
    max_batch_size: int = 32
    max_delay_ms: float = 10.0
    max_images_per_request: int = 64
    max_request_mb: float = 256.0
    max_queue: int = 1024
    request_timeout: float = 300.0
    offline: bool | None = None

    def __post_init__(self) -> None:
        if not self.rewards:
            raise ConfigError("rewards is empty; name at least one reward to serve (align serve-reward NAME ...)")
        names = self.rewards if isinstance(self.rewards, list) else list(self.rewards)
        bad = [n for n in names if not isinstance(n, str) or not n or "/" in n or n != n.strip()]
        if bad:
            raise ConfigError(f"rewards: {bad!r} cannot name a served reward; accepted: non-empty names without '/'")
        if len(set(names)) != len(names):
            raise ConfigError(f"rewards={names!r} names a reward twice")
        check_range("port", self.port, 0, 65535, integer=True)
        check_device("device", self.device)
        check_choice("dtype", self.dtype, tuple(DTYPES))
        check_range("max_batch_size", self.max_batch_size, 1, integer=True)
        check_range("max_delay_ms", self.max_delay_ms, 0)
        check_range("max_images_per_request", self.max_images_per_request, 1, integer=True)
        check_range("max_request_mb", self.max_request_mb, 0, low_inclusive=False)
        check_range("max_queue", self.max_queue, 1, integer=True)
        check_range("request_timeout", self.request_timeout, 0, low_inclusive=False)

    def reward_specs(self) -> dict[str, Any]:
        """Served name -> what :func:`rewards.registry.build_reward_entry` builds it from."""
        return {n: n for n in self.rewards} if isinstance(self.rewards, list) else dict(self.rewards)


# -- batching ---------------------------------------------------------------------------------------------
class RequestError(Exception):
    """A request the server answers with ``status`` and ``message`` (never a server fault)."""

    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status
        self.message = message


@dataclass
class _Job:
    images: Tensor
    prompts: list[str]
    grad: bool
    future: asyncio.Future

    @property
    def key(self) -> tuple:
        return (tuple(self.images.shape[1:]), self.images.dtype, self.grad)


class RewardWorker:
    """One served reward: its queue, its batching loop and the thread its model runs on."""

    def __init__(self, name: str, reward: Reward, *, device: torch.device, dtype: torch.dtype,
                 max_batch_size: int, max_delay: float, max_queue: int):
        self.name = name
        self.reward = reward.to(device)
        if reward.name == Reward.name:  # an unnamed reward is named by what it is served as
            reward.name = name
        self.device = device
        self.dtype = dtype
        self.max_batch_size = max_batch_size
        self.max_delay = max_delay
        self.max_queue = max_queue
        self.queue: asyncio.Queue[_Job] | None = None
        self.pending: deque[_Job] = deque()  # taken from the queue, waiting for a batch of their kind
        self.queued_images = 0
        self.batches = 0
        self.images_scored = 0
        self.executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix=f"reward-{name}")
        self.task: asyncio.Task | None = None

    def start(self) -> None:
        self.queue = asyncio.Queue()
        self.task = asyncio.get_running_loop().create_task(self._loop(), name=f"batcher-{self.name}")

    async def stop(self) -> None:
        if self.task is not None:
            self.task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self.task
        self.executor.shutdown(wait=False, cancel_futures=True)

    async def submit(self, images: Tensor, prompts: list[str], grad: bool, timeout: float) -> ScoredBatch:
        if self.queued_images + images.shape[0] > self.max_queue:
            raise RequestError(503, f"reward {self.name!r} is busy: {self.queued_images} images already queued "
                                    f"(max_queue={self.max_queue}); retry later")
        future = asyncio.get_running_loop().create_future()
        self.queued_images += images.shape[0]
        await self.queue.put(_Job(images, prompts, grad, future))
        try:
            return await asyncio.wait_for(asyncio.shield(future), timeout)
        except asyncio.TimeoutError:
            future.cancel()  # its batch still runs; the answer is dropped (the batcher skips done futures)
            raise RequestError(503, f"reward {self.name!r} gave no score within request_timeout={timeout:g}s "
                                    f"({self.queued_images} images queued); retry later") from None

    async def _next_batch(self) -> list[_Job]:
        first = self.pending.popleft() if self.pending else await self.queue.get()
        batch, size = [first], first.images.shape[0]
        deadline = time.monotonic() + self.max_delay
        # requests of the same kind that already waited join first, then newcomers until full or late
        for job in list(self.pending):
            if size >= self.max_batch_size:
                break
            if job.key == first.key and size + job.images.shape[0] <= self.max_batch_size:
                self.pending.remove(job)
                batch.append(job)
                size += job.images.shape[0]
        while size < self.max_batch_size:
            remaining = deadline - time.monotonic()
            try:
                job = self.queue.get_nowait() if remaining <= 0 else await asyncio.wait_for(self.queue.get(), remaining)
            except (asyncio.QueueEmpty, asyncio.TimeoutError):
                break
            if job.key == first.key and size + job.images.shape[0] <= self.max_batch_size:
                batch.append(job)
                size += job.images.shape[0]
            else:
                self.pending.append(job)
        return batch

    async def _loop(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            batch = await self._next_batch()
            for job in [job for job in batch if job.future.done()]:  # its client gave up while it waited
                self.queued_images -= job.images.shape[0]
                batch.remove(job)
            if not batch:
                continue
            results = await loop.run_in_executor(self.executor, self._run, batch)
            self.batches += 1
            for job, result in zip(batch, results):
                self.queued_images -= job.images.shape[0]
                if job.future.done():  # its client gave up while it was scored
                    continue
                if isinstance(result, BaseException):
                    job.future.set_exception(result)
                else:
                    job.future.set_result(result)

    # -- on the worker thread ----------------------------------------------------------------------
    def _run(self, batch: list[_Job]) -> list[ScoredBatch | BaseException]:
        """Score a batch in one call; if that fails and it holds several requests, each alone."""
        try:
            return self._score(batch)
        except Exception as exc:
            if len(batch) == 1:
                return [exc]
        out: list[ScoredBatch | BaseException] = []
        for job in batch:
            try:
                out.extend(self._score([job]))
            except Exception as exc:
                out.append(exc)
        return out

    def _score(self, batch: list[_Job]) -> list[ScoredBatch]:
        images = torch.cat([job.images for job in batch]).to(self.device, self.dtype)
        prompts = [p for job in batch for p in job.prompts]
        self.images_scored += images.shape[0]
        grad = batch[0].grad
        if grad:
            images.requires_grad_(True)
        with torch.set_grad_enabled(grad):
            out = self.reward.score(images, prompts)
            gradient = None
            if grad:
                total = torch.where(out.valid, out.scores, torch.zeros_like(out.scores)).sum()
                (gradient,) = torch.autograd.grad(total, images, allow_unused=True)
                gradient = torch.zeros_like(images) if gradient is None else gradient
        results, start = [], 0
        for job in batch:
            end = start + job.images.shape[0]
            results.append(ScoredBatch(
                out.scores[start:end].detach().cpu(), out.valid[start:end].cpu(),
                {k: v[start:end].cpu() for k, v in out.info.items()},
                None if gradient is None else gradient[start:end].cpu(),
            ))
            start = end
        return results


# -- the application --------------------------------------------------------------------------------------
def create_app(rewards: Mapping[str, Reward], config: ServeConfig, *, device: torch.device | None = None):
    """The Starlette application serving ``rewards`` (built ones) with ``config``'s limits."""
    from starlette.applications import Starlette
    from starlette.requests import Request
    from starlette.responses import JSONResponse, Response
    from starlette.routing import Route

    device = device or _device(config.device)
    workers = {
        name: RewardWorker(name, reward, device=device, dtype=DTYPES[config.dtype], max_batch_size=config.max_batch_size,
                           max_delay=config.max_delay_ms / 1000, max_queue=config.max_queue)
        for name, reward in rewards.items()
    }
    token = os.environ.get(config.token_env, "") if config.token_env else ""
    max_bytes = int(config.max_request_mb * MIB)

    def error(status: int, message: str, **extra) -> JSONResponse:
        headers = {"Retry-After": "1"} if status == 503 else None
        return JSONResponse({"error": message, **extra}, status_code=status, headers=headers)

    def authorized(request: Request) -> bool:
        if not token:
            return True
        sent = request.headers.get("authorization", "")
        return hmac.compare_digest(sent.encode(), f"Bearer {token}".encode())

    async def health(request: Request) -> Response:
        if not authorized(request):
            return error(401, "missing or wrong bearer token (Authorization: Bearer <token>)")
        return JSONResponse({
            "status": "ok",
            "rewards": {n: {"differentiable": bool(w.reward.differentiable), "queued_images": w.queued_images,
                            "batches": w.batches, "images_scored": w.images_scored} for n, w in workers.items()},
            "limits": {"max_batch_size": config.max_batch_size, "max_images_per_request": config.max_images_per_request,
                       "max_request_mb": config.max_request_mb, "max_queue": config.max_queue},
            "dtype": config.dtype, "device": str(device),
        })

    async def read_body(request: Request) -> bytes:
        declared = request.headers.get("content-length")
        if declared is not None and declared.isdigit() and int(declared) > max_bytes:
            raise RequestError(413, f"request body of {int(declared)} bytes exceeds max_request_mb={config.max_request_mb:g}")
        chunks, size = [], 0
        async for chunk in request.stream():
            size += len(chunk)
            if size > max_bytes:
                raise RequestError(413, f"request body exceeds max_request_mb={config.max_request_mb:g}")
            chunks.append(chunk)
        return b"".join(chunks)

    async def score(request: Request) -> Response:
        name = request.path_params["name"]
        if not authorized(request):
            return error(401, "missing or wrong bearer token (Authorization: Bearer <token>)")
        worker = workers.get(name)
        if worker is None:
            return error(404, f"no reward named {name!r} is served here; served: {', '.join(workers)}")
        grad = request.query_params.get("grad", "0") in ("1", "true")
        try:
            if grad and not worker.reward.differentiable:
                raise RequestError(400, f"reward {name!r} is not differentiable; ask without grad=1")
            body = await read_body(request)
            try:
                images, prompts = decode_request(body)
            except WireError as exc:
                raise RequestError(400, str(exc)) from None
            if images.shape[0] > config.max_images_per_request:
                raise RequestError(413, f"request carries {images.shape[0]} images; max_images_per_request="
                                        f"{config.max_images_per_request}")
            try:
                check_images(images, name)
            except AlignError as exc:
                raise RequestError(400, str(exc)) from None
            result = await worker.submit(images, prompts, grad, config.request_timeout)
        except RequestError as exc:
            return error(exc.status, exc.message)
        except RewardUnavailable as exc:
            return error(503, str(exc))
        except RewardCrash as exc:
            cause = f" ({type(exc.__cause__).__name__}: {exc.__cause__})" if exc.__cause__ is not None else ""
            logger.error("reward %r raised: %s%s", name, exc, cause)
            return error(500, str(exc), reward=name)
        except AlignError as exc:  # the reward rejected this input (a prompt it cannot judge, ...)
            return error(422, str(exc))
        except Exception as exc:  # a bug outside the reward protocol: still the reward's request
            logger.exception("reward %r failed", name)
            return error(500, f"reward {name!r} raised {type(exc).__name__}: {exc}", reward=name)
        return Response(encode_response(result), media_type="application/octet-stream")

    @contextlib.asynccontextmanager
    async def lifespan(app):
        for worker in workers.values():
            worker.start()
        try:
            yield
        finally:
            for worker in workers.values():
                await worker.stop()

    app = Starlette(routes=[Route("/health", health), Route("/v1/score/{name}", score, methods=["POST"])],
                    lifespan=lifespan)
    app.state.workers = workers
    return app


def _device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise AlignError(f"device={device!r} but no CUDA device is available; use device=cpu")
    return torch.device(device)


def _import_server():
    from .loading import import_optional

    import_optional("starlette", "serve", "align serve-reward")
    return import_optional("uvicorn", "serve", "align serve-reward")


def bind(host: str, port: int) -> socket.socket:
    """A listening TCP socket (port 0: a free one); AlignError when the address is taken."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
        sock.listen(2048)  # connections wait in the backlog until the server accepts them
    except OSError as exc:
        sock.close()
        raise AlignError(f"cannot listen on {host}:{port}: {exc.strerror or exc}; choose another port= or host=") from None
    return sock


class ServerThread:
    """Run an app with uvicorn on a background thread (tests, benchmarks, notebooks).

    >>> with ServerThread(create_app(rewards, config)) as server:
    ...     RemoteReward(server.url, reward="brightness")(images)
    """

    def __init__(self, app, host: str = "127.0.0.1", port: int = 0, **uvicorn_options):
        uvicorn = _import_server()
        self.socket = bind(host, port)
        options = {"log_level": "warning", "access_log": False, "lifespan": "on",
                   "timeout_keep_alive": KEEP_ALIVE_S, **uvicorn_options}
        self.server = uvicorn.Server(uvicorn.Config(app, **options))
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [self.socket]},
                                       name="reward-server", daemon=True)

    @property
    def url(self) -> str:
        host, port = self.socket.getsockname()[:2]
        return f"http://{host}:{port}"

    def __enter__(self) -> ServerThread:
        self.thread.start()
        deadline = time.monotonic() + 30
        while not self.server.started:
            if not self.thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError("the reward server did not start")
            time.sleep(0.01)
        return self

    def __exit__(self, *exc) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=30)
        self.socket.close()


def serve(config: ServeConfig, *, announce=print) -> None:
    """Build the configured rewards, then serve them until interrupted (``align serve-reward``)."""
    uvicorn = _import_server()
    from .registry import build_reward_entry

    rewards = {name: build_reward_entry(name, spec, offline=config.offline) for name, spec in config.reward_specs().items()}
    app = create_app(rewards, config)
    sock = bind(config.host, config.port)
    host, port = sock.getsockname()[:2]
    token = bool(config.token_env and os.environ.get(config.token_env))
    kinds = ", ".join(f"{n} ({'differentiable' if r.differentiable else 'black-box'})" for n, r in rewards.items())
    announce(f"serving {kinds} at http://{host}:{port}  (GET /health, POST /v1/score/NAME; "
             f"bearer token {'required' if token else 'not required'}; batches of up to {config.max_batch_size} images)")
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning", access_log=False, lifespan="on",
                                           timeout_keep_alive=KEEP_ALIVE_S))
    try:
        server.run(sockets=[sock])
    finally:
        sock.close()


# -- load test --------------------------------------------------------------------------------------------
@dataclass
class LoadTestResult:
    """What a load test measured and how every request was accounted for.

    Attributes:
        clients, requests, images: concurrent clients; requests and images answered.
        seconds: from the first request sent to the last answer received.
        latencies: seconds from sending each answered request to receiving its answer.
        mismatched: answers differing from the reference's scores on the same images by more than the tolerance.
        max_difference: the largest |answer - reference| over all scores.
        lost: requests that got no answer.
        duplicated: images the server scored beyond those sent (its /health counter before and after).
        batches: calls the server made to the reward.
    """

    clients: int
    requests: int
    images: int
    seconds: float
    latencies: list[float]
    mismatched: int
    max_difference: float
    lost: int
    duplicated: int
    batches: int

    @property
    def images_per_second(self) -> float:
        return self.images / self.seconds

    @property
    def requests_per_second(self) -> float:
        return self.requests / self.seconds

    def percentile(self, q: float) -> float:
        """Latency percentile ``q`` in [0, 100] (nearest rank)."""
        ordered = sorted(self.latencies)
        return ordered[max(0, math.ceil(q / 100 * len(ordered)) - 1)]

    def summary(self) -> dict[str, float | int]:
        return {
            "clients": self.clients, "requests": self.requests, "images": self.images, "seconds": self.seconds,
            "images_per_second": self.images_per_second, "requests_per_second": self.requests_per_second,
            "latency_p50_ms": 1000 * self.percentile(50), "latency_p99_ms": 1000 * self.percentile(99),
            "latency_mean_ms": 1000 * statistics.fmean(self.latencies), "mismatched": self.mismatched,
            "max_difference": self.max_difference, "lost": self.lost, "duplicated": self.duplicated,
            "batches": self.batches, "mean_batch_images": self.images / max(self.batches, 1),
        }


def tagged_images(client: int, request: int, count: int, size: int) -> Tensor:
    """The images of one load-test request: noise seeded by (client, request), so that the reference
    reward can recompute what each answer must be."""
    generator = torch.Generator().manual_seed(1_000_003 * client + request)
    return torch.rand(count, 3, size, size, generator=generator)


def _prompts(client: int, request: int, count: int) -> list[str]:
    return [f"a photo of a cat {client} {request} {j}" for j in range(count)]


def _client_run(url: str, reward: str, client: int, requests: int, images_per_request: int, size: int,
                start_at: float):
    """One client's requests, one after the other, from ``start_at`` (wall clock):
    [(request, scores or None if it failed, sent, answered)]."""
    from .remote import RemoteReward

    remote = RemoteReward(url, reward=reward, differentiable=False, retries=5, retry_backoff=0.05)
    batches = [(tagged_images(client, r, images_per_request, size), _prompts(client, r, images_per_request))
               for r in range(requests)]
    time.sleep(max(0.0, start_at - time.time()))
    out = []
    for r, (images, prompts) in enumerate(batches):
        sent = time.time()
        try:
            scores = remote.score(images, prompts).scores.tolist()
        except AlignError as exc:
            logger.warning("load test client %d request %d failed: %s", client, r, exc)
            scores = None
        out.append((r, scores, sent, time.time()))
    return out


def _served_counters(url: str, reward: str) -> tuple[int, int]:
    """(images scored, batches) of a served reward, from /health."""
    import urllib.request

    request = urllib.request.Request(url.rstrip("/") + "/health")
    token = os.environ.get(TOKEN_ENV, "")
    if token:
        request.add_header("Authorization", f"Bearer {token}")
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    with opener.open(request, timeout=30) as response:
        served = json.loads(response.read())["rewards"][reward]
    return int(served["images_scored"]), int(served["batches"])


def load_test(url: str, reward: str, *, clients: int, requests: int, images_per_request: int, size: int = 16,
              reference: Reward | None = None, tolerance: float = 0.0, processes: bool = False,
              start_delay: float = 0.0) -> LoadTestResult:
    """``clients`` concurrent clients (threads, or spawned processes) each sending ``requests`` requests
    of ``images_per_request`` images one after the other; every answer is checked against
    ``reference`` (the in-process reward) within ``tolerance`` (0: bitwise).

    Clients prepare their images, then start together ``start_delay`` seconds after the call (give
    spawned processes time to import); throughput counts from the first request to the last answer.
    """
    for field_name, value in (("clients", clients), ("requests", requests), ("images_per_request", images_per_request)):
        check_range(field_name, value, 1, integer=True)
    scored_before, batches_before = _served_counters(url, reward)
    start_at = time.time() + start_delay
    args = [(url, reward, c, requests, images_per_request, size, start_at) for c in range(clients)]
    if processes:
        import multiprocessing

        with multiprocessing.get_context("spawn").Pool(clients) as pool:
            answers = pool.starmap(_client_run, args)
    else:
        with ThreadPoolExecutor(max_workers=clients) as pool:
            answers = list(pool.map(lambda a: _client_run(*a), args))
    scored_after, batches_after = _served_counters(url, reward)
    rows = [(c, r, scores, sent, done) for c, client_rows in enumerate(answers) for r, scores, sent, done in client_rows]
    answered = [(c, r, scores) for c, r, scores, _, _ in rows if scores is not None]
    timed = [(sent, done) for _, _, scores, sent, done in rows if scores is not None]
    mismatched, max_difference = 0, 0.0
    if reference is not None:
        for client, r, scores in answered:
            with torch.no_grad():
                images = tagged_images(client, r, images_per_request, size)
                expected = reference.score(images, _prompts(client, r, images_per_request)).scores.float()
            difference = float((torch.tensor(scores, dtype=torch.float32) - expected).abs().max())
            max_difference = max(max_difference, difference)
            mismatched += difference > tolerance
    sent_images = clients * requests * images_per_request
    seconds = max(done for _, done in timed) - min(sent for sent, _ in timed) if timed else math.nan
    return LoadTestResult(
        clients, len(answered), len(answered) * images_per_request, seconds, [d - s for s, d in timed], mismatched,
        max_difference, clients * requests - len(answered), max(0, scored_after - scored_before - sent_images),
        batches_after - batches_before,
    )
