"""A vision-language model as judge, behind an OpenAI-compatible chat-completions endpoint.

Each image is sent as a base64 PNG data URL with a text (the prompt substituted for
``{prompt}``).  Two modes:

* ``mode="rubric"`` (default): the text is a rubric; the answer is parsed with a regular
  expression (default: the last ``Final Score: x``) and divided by ``scale_max`` (default 5, so
  scores lie in [0, 1]).
* ``mode="yes_no"``: VQAScore through an API.  The text is a yes/no question (default VQAScore's
  'Does this figure show "{prompt}"? Please answer Yes or No.'); the request asks for one token with
  its ``top_logprobs``, and the score is the probability of the answer ("Yes"): the summed
  probability of the listed first tokens equal to it up to case and surrounding spaces ("Yes",
  " yes"), 0 when none is listed (its probability is then below the smallest listed one).  A
  server that returns no log-probabilities cannot serve this mode: that is a configuration error,
  not a fault to retry.  The local, differentiable VQAScore is the ``vqascore`` reward.

Requests run ``concurrency`` at a time (threads), each with a ``timeout``.  Transient faults
(connection errors, timeouts, HTTP 429 / 5xx, invalid JSON, answers without a score; the
reward declares urllib's and http.client's network errors in ``transient_errors``) are retried
``retries`` times with exponential backoff (``retry_backoff * 2**attempt`` seconds); a sample that
still fails raises a :class:`~align.core.errors.RewardUnavailable` naming the endpoint and the
reason, or with ``on_invalid="drop"`` is dropped and counted.  Other HTTP 4xx (bad key, bad
model) raise a :class:`RewardError` at once, in either mode: no retry cures them.  Answers are
cached in memory, and on disk with ``cache_dir``, keyed by a hash of the PNG, the prompt, the
rubric and the model.  Only the standard library talks to the server.
"""

from __future__ import annotations

import base64
import hashlib
import http.client
import io
import ipaddress
import json
import logging
import math
import os
import re
import time
import urllib.error
import urllib.parse
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch
from torch import Tensor

from align.core.errors import ConfigError, RewardError, RewardUnavailable, check_choice, check_range

from ..base import Reward, RewardOutput
from ..registry import register_reward
from .jpeg import to_uint8_images
from .vqascore import VQASCORE_ANSWER, VQASCORE_QUESTION

logger = logging.getLogger("rewards")

DEFAULT_RUBRIC = (
    "You are judging an AI-generated image against the prompt it was generated from.\n"
    "Prompt: {prompt}\n"
    "Rate how faithfully the image depicts the prompt and how good it looks, on a scale from 1 "
    "(poor) to 5 (excellent). Explain briefly, then finish with a line of the form "
    "'Final Score: <number>'."
)
DEFAULT_SCORE_PATTERN = r"final\s*score\s*[:=]?\s*\**\s*([-+]?\d+(?:\.\d+)?)"
MODES = ("rubric", "yes_no")


def _is_loopback(url: str) -> bool:
    host = urllib.parse.urlsplit(url).hostname or ""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


@register_reward("vlm_judge")
class VLMJudge(Reward):
    """Score images with a VLM behind an OpenAI-compatible ``/chat/completions`` endpoint: a rubric's
    score, or (mode=yes_no) the probability that it answers "Yes" (VQAScore through an API).

    Args:
        endpoint: base URL (``http://host:port/v1``) or the full ``.../chat/completions`` URL
            (default: the ``OPENAI_BASE_URL`` environment variable).
        model: model name sent to the server.
        api_key_env: environment variable holding the API key (sent as a Bearer token if set).
        mode: "rubric" (a score parsed from the answer) or "yes_no" (the probability of ``answer``).
        rubric: the instruction; ``{prompt}`` is replaced by the image's prompt.
        score_pattern: regex whose first group is the score (the last match is used).
        scale_max: the rubric's maximum; scores are divided by it.
        question: the yes/no question of ``mode="yes_no"`` (``{prompt}`` replaced).
        answer: the answer whose probability is the score in ``mode="yes_no"``.
        top_logprobs: alternatives per token the server is asked to list (``mode="yes_no"``).
        concurrency: requests in flight at once.
        timeout: seconds per request.
        retries: retries per request after the first attempt.
        retry_backoff: seconds before the first retry, doubled after each.
        cache_dir: folder of the on-disk answer cache (None: in memory only).
        max_tokens, temperature: generation settings sent to the server.
    """

    name = "vlm_judge"
    differentiable = False
    # refused connections, DNS failures, connect timeouts (URLError); dropped connections and
    # truncated answers (HTTPException); read timeouts and resets are TimeoutError / ConnectionError
    transient_errors = (urllib.error.URLError, http.client.HTTPException)

    def __init__(
        self,
        endpoint: str | None = None,
        *,
        model: str = "default",
        api_key_env: str = "OPENAI_API_KEY",
        mode: str = "rubric",
        rubric: str = DEFAULT_RUBRIC,
        score_pattern: str = DEFAULT_SCORE_PATTERN,
        scale_max: float = 5.0,
        question: str = VQASCORE_QUESTION,
        answer: str = VQASCORE_ANSWER,
        top_logprobs: int = 20,
        concurrency: int = 4,
        timeout: float = 60.0,
        retries: int = 3,
        retry_backoff: float = 1.0,
        cache_dir: str | Path | None = None,
        max_tokens: int = 512,
        temperature: float = 0.0,
        chunk_size: int | None = None,
        on_invalid: str = "raise",
    ):
        # timeout / retries / backoff apply per request here, not per chunk as in the base class
        super().__init__(chunk_size=chunk_size, on_invalid=on_invalid)
        endpoint = endpoint or os.environ.get("OPENAI_BASE_URL")
        if not endpoint or not urllib.parse.urlsplit(endpoint).scheme.startswith("http"):
            raise ConfigError(
                f"vlm_judge endpoint={endpoint!r} must be an http(s) URL of an OpenAI-compatible server, "
                "e.g. 'http://127.0.0.1:8000/v1' (or set OPENAI_BASE_URL)"
            )
        check_choice("mode", mode, MODES)
        check_range("scale_max", scale_max, 0, low_inclusive=False)
        check_range("top_logprobs", top_logprobs, 1, 20, integer=True)
        if mode == "yes_no" and not answer.strip():
            raise ConfigError(f"answer={answer!r} must be a word (the answer whose probability is the score)")
        check_range("concurrency", concurrency, 1, integer=True)
        check_range("timeout", timeout, 0, low_inclusive=False)
        check_range("retries", retries, 0, integer=True)
        check_range("retry_backoff", retry_backoff, 0)
        check_range("max_tokens", max_tokens, 1, integer=True)
        try:
            self.score_regex = re.compile(score_pattern, re.IGNORECASE)
        except re.error as exc:
            raise ConfigError(f"score_pattern={score_pattern!r} is not a valid regular expression: {exc}") from None
        if self.score_regex.groups < 1:
            raise ConfigError(f"score_pattern={score_pattern!r} needs a group capturing the number")
        self.url = endpoint if endpoint.rstrip("/").endswith("/chat/completions") else endpoint.rstrip("/") + "/chat/completions"
        self.model = model
        self.api_key_env = api_key_env
        self.mode = mode
        # the text sent with each image; yes/no probabilities already lie in [0, 1]
        self.rubric = question if mode == "yes_no" else rubric
        self.scale_max = 1.0 if mode == "yes_no" else float(scale_max)
        self.answer = answer.strip().lower()
        self.top_logprobs = top_logprobs
        self.concurrency = concurrency
        self.request_timeout = float(timeout)
        self.request_retries = retries
        self.request_backoff = float(retry_backoff)
        self.max_tokens = max_tokens
        self.temperature = float(temperature)
        self.cache_dir = Path(cache_dir) if cache_dir is not None else None
        self._cache: dict[str, float] = {}
        self.requests_sent = 0
        # loopback servers are reached directly, whatever proxy the environment names
        handlers = [urllib.request.ProxyHandler({})] if _is_loopback(self.url) else []
        self._opener = urllib.request.build_opener(*handlers)

    # -- caching ------------------------------------------------------------------------------
    def _key(self, png: bytes, prompt: str) -> str:
        h = hashlib.sha256(hashlib.sha256(png).digest())
        extra = ("yes_no", self.answer) if self.mode == "yes_no" else ()  # rubric keys as before this mode existed
        for part in (prompt, self.rubric, self.model, *extra):
            h.update(b"\0" + part.encode())
        return h.hexdigest()

    def _cached(self, key: str) -> float | None:
        if key in self._cache:
            return self._cache[key]
        if self.cache_dir is not None:
            path = self.cache_dir / f"{key}.json"
            if path.is_file():
                try:
                    value = float(json.loads(path.read_text())["score"])
                except (ValueError, KeyError, TypeError):
                    return None  # a damaged entry is asked again
                self._cache[key] = value
                return value
        return None

    def _store(self, key: str, value: float, answer: str) -> None:
        self._cache[key] = value
        if self.cache_dir is not None:
            self.cache_dir.mkdir(parents=True, exist_ok=True)
            tmp = self.cache_dir / f".{key}.{os.getpid()}.tmp"
            tmp.write_text(json.dumps({"score": value, "answer": answer, "model": self.model}))
            tmp.replace(self.cache_dir / f"{key}.json")

    # -- one request ----------------------------------------------------------------------------
    def _request(self, png: bytes, prompt: str) -> dict:
        """The first choice of the server's answer (``choices[0]``)."""
        data_url = "data:image/png;base64," + base64.b64encode(png).decode("ascii")
        body = {
            "model": self.model,
            "messages": [
                {
                    "role": "user",
                    "content": [
                        {"type": "text", "text": self.rubric.replace("{prompt}", prompt)},
                        {"type": "image_url", "image_url": {"url": data_url}},
                    ],
                }
            ],
            "max_tokens": self.max_tokens,
            "temperature": self.temperature,
        }
        if self.mode == "yes_no":  # one token and its alternatives' log-probabilities
            body.update(max_tokens=1, logprobs=True, top_logprobs=self.top_logprobs)
        headers = {"Content-Type": "application/json"}
        key = os.environ.get(self.api_key_env, "")
        if key:
            headers["Authorization"] = f"Bearer {key}"
        request = urllib.request.Request(self.url, data=json.dumps(body).encode(), headers=headers, method="POST")
        self.requests_sent += 1
        try:
            with self._opener.open(request, timeout=self.request_timeout) as response:
                raw = response.read()
        except urllib.error.HTTPError as exc:
            detail = exc.read(300).decode(errors="replace").strip()
            message = f"HTTP {exc.code} {exc.reason}: {detail}"
            if exc.code == 429 or exc.code >= 500:
                raise RewardUnavailable(message) from None  # overloaded or failing: may pass
            raise RewardError(message) from None  # bad key, bad model, bad request: fix the settings
        # network errors and timeouts propagate as they are: transient (see transient_errors)
        try:
            payload = json.loads(raw)
        except ValueError:
            raise RewardUnavailable(f"invalid JSON in the response: {raw[:200]!r}") from None
        try:
            choice = payload["choices"][0]
            content = choice["message"]["content"]
        except (KeyError, IndexError, TypeError):
            raise RewardUnavailable(
                f"malformed response without choices[0].message.content: {str(payload)[:200]}"
            ) from None
        if isinstance(content, list):  # content parts
            choice["message"]["content"] = "".join(part.get("text", "") for part in content if isinstance(part, dict))
        return choice

    def _parse(self, choice: dict) -> tuple[float, str]:
        """(raw score, what to keep in the cache) from one choice of the server's answer."""
        if self.mode == "yes_no":
            return self._answer_probability(choice)
        answer = str(choice["message"]["content"])
        matches = self.score_regex.findall(answer)
        if not matches:
            raise RewardUnavailable(f"malformed answer, no score matching {self.score_regex.pattern!r}: {answer[:200]!r}")
        last = matches[-1]
        value = float(last[0] if isinstance(last, tuple) else last)
        if not 0.0 <= value <= self.scale_max:
            raise RewardUnavailable(f"score {value} outside [0, {self.scale_max:g}] in answer {answer[:200]!r}")
        return value, answer

    def _answer_probability(self, choice: dict) -> tuple[float, str]:
        """Probability of the answer as the first token (see the module docstring) and the listed tokens."""
        try:
            first = choice["logprobs"]["content"][0]
            listed = [*first.get("top_logprobs", []), {"token": first["token"], "logprob": first["logprob"]}]
            by_token = {str(t["token"]): float(t["logprob"]) for t in listed}
        except (KeyError, IndexError, TypeError, ValueError):
            raise RewardError(
                f"endpoint {self.url} (model {self.model!r}) returned no token log-probabilities "
                f"(choices[0].logprobs.content[0].top_logprobs): {str(choice.get('logprobs'))[:200]}; mode='yes_no' "
                "needs a server that honours logprobs/top_logprobs (OpenAI, vLLM, SGLang)"
            ) from None
        probability = sum(math.exp(lp) for token, lp in by_token.items() if token.strip().lower() == self.answer)
        return min(probability, 1.0), json.dumps(by_token)

    def _judge(self, png: bytes, prompt: str) -> float:
        """Raw score of one image (cached), retrying transient faults; RewardUnavailable when it gives up."""
        key = self._key(png, prompt)
        cached = self._cached(key)
        if cached is not None:
            return cached
        attempts = self.request_retries + 1
        for attempt in range(attempts):
            try:
                value, answer = self._parse(self._request(png, prompt))
            except Exception as exc:
                if not self.is_transient(exc):
                    raise  # a 4xx RewardError, or a bug: the base class tells which
                cause = exc
                if attempt + 1 < attempts:
                    time.sleep(self.request_backoff * 2**attempt)
                continue
            self._store(key, value, answer)
            return value
        raise RewardUnavailable(
            f"reward {self.name!r}: endpoint {self.url} (model {self.model!r}) failed after {attempts} "
            f"attempt{'s' if attempts > 1 else ''}: {_reason(cause, self.request_timeout)}"
        ) from cause

    # -- the reward -----------------------------------------------------------------------------
    def _score(self, images: Tensor, prompts: list[str]) -> Tensor:
        pngs = []
        for image in to_uint8_images(images):
            buffer = io.BytesIO()
            image.save(buffer, format="PNG")
            pngs.append(buffer.getvalue())
        scores = torch.full((len(pngs),), float("nan"))
        valid = torch.ones(len(pngs), dtype=torch.bool)
        with ThreadPoolExecutor(max_workers=self.concurrency, thread_name_prefix="vlm-judge") as pool:
            futures = [pool.submit(self._judge, png, prompt) for png, prompt in zip(pngs, prompts)]
            for i, future in enumerate(futures):
                try:
                    scores[i] = future.result() / self.scale_max
                except RewardUnavailable as exc:
                    if self.on_invalid == "raise":
                        _cancel(futures)
                        raise
                    valid[i] = False
                    logger.warning("%s; dropping sample %d (on_invalid='drop')", exc, i)
                except BaseException:
                    _cancel(futures)
                    raise
        return RewardOutput(scores.to(images.device), valid.to(images.device))


def _cancel(futures) -> None:
    """Cancel the requests not yet sent (those in flight finish and are cached)."""
    for future in futures:
        future.cancel()


def _reason(error: BaseException, timeout: float) -> str:
    """A transient fault in words: a timeout, a refused connection, the server's answer."""
    if isinstance(error, urllib.error.URLError) and isinstance(error.reason, TimeoutError):
        error = error.reason  # a connect timeout
    if isinstance(error, TimeoutError):
        return f"no answer within timeout={timeout}s"
    if isinstance(error, urllib.error.URLError):
        return f"cannot connect: {error.reason}"
    if isinstance(error, RewardUnavailable):
        return str(error)
    return f"{type(error).__name__}: {error}"
