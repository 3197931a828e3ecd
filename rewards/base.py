"""The reward protocol.

A reward scores a batch of images (float tensor [B, 3, H, W] with values in [0, 1]) with their
prompts and returns a tensor [B].  It declares whether it is ``differentiable`` (its score has a
gradient with respect to the pixels).  Black-box rewards serve steering and evaluation; a
training method that needs gradients refuses them (:func:`require_differentiable`).

Subclasses implement :meth:`Reward._score`; the base class

* checks the input (shape, dtype, range) and pairs one prompt with each image;
* freezes reward models with ``requires_grad_(False)`` (never ``torch.no_grad``, which would
  silently cut the gradient to the pixels) and keeps them in eval mode whatever ``train()``
  says (dropout in a reward model is noise in the reward);
* moves the reward to the images' device and dtype;
* evaluates in chunks of ``chunk_size`` images;
* tells faults from bugs.  A *transient fault* is a :class:`TimeoutError` (a chunk that takes
  longer than ``timeout`` seconds is one), a :class:`ConnectionError`, a
  :class:`~align.core.errors.RewardUnavailable` (what a remote or plugin reward raises when its
  service is down), an exception type the reward lists in its ``transient_errors`` class
  attribute, or a non-finite score.  A chunk that fails with a transient fault is retried
  ``retries`` times with exponential backoff; if it still fails it raises a
  :class:`~align.core.errors.RewardUnavailable` naming the reward (``on_invalid="raise"``, the
  default) or, with ``on_invalid="drop"``, its samples are marked invalid in
  :class:`RewardOutput` (their score is NaN), counted in ``dropped`` and logged.  A non-finite
  score is not retried (a deterministic reward would return it again).
* never retries, drops or hides anything else: any other exception (a ``TypeError`` in the
  reward's code, CUDA or CPU out of memory) raises a :class:`~align.core.errors.RewardCrash` naming
  the reward with the original exception chained as ``__cause__``, whatever ``on_invalid`` says;
  an :class:`~align.core.errors.AlignError` the reward raises itself (a bad API key, a bad input)
  passes through unchanged.  Never a silent zero.

Samples dropped in drop mode carry NaN scores: consumers select ``out.scores[out.valid]``.
(The gradient of a dropped sample may itself be NaN where its score was; a trainer that keeps
training through drops should skip the step or zero non-finite gradients.)
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Literal

import torch
from torch import Tensor, nn

from align.core.errors import (
    AlignError,
    RewardCrash,
    RewardError,
    RewardUnavailable,
    check_choice,
    check_range,
)

OnInvalid = Literal["raise", "drop"]
ON_INVALID = ("raise", "drop")

logger = logging.getLogger("rewards")

#: faults every reward may have, retried and then raised or dropped (a reward adds its own in ``transient_errors``)
TRANSIENT_ERRORS: tuple[type[BaseException], ...] = (TimeoutError, ConnectionError, RewardUnavailable)


@dataclass
class RewardOutput:
    """Scores [B] (NaN where invalid), which samples are valid [B] (bool), per-sample extra information.

    ``info`` maps names (e.g. the components of a composite reward) to tensors [B], detached,
    for logging.
    """

    scores: Tensor
    valid: Tensor
    info: dict[str, Tensor] = field(default_factory=dict)

    @property
    def num_dropped(self) -> int:
        return int((~self.valid).sum())

    def valid_mean(self) -> Tensor:
        """Mean score over valid samples (NaN when none is valid); differentiable."""
        return self.scores[self.valid].mean()


def normalize_prompts(prompts: str | Sequence[str] | None, batch_size: int, reward: str) -> list[str]:
    """One prompt per image: a single string is repeated; a list must match the batch."""
    if prompts is None:
        return [""] * batch_size
    if isinstance(prompts, str):
        return [prompts] * batch_size
    prompts = list(prompts)
    if len(prompts) != batch_size:
        raise RewardError(f"reward {reward!r}: got {len(prompts)} prompts for {batch_size} images; pass one per image")
    if not all(isinstance(p, str) for p in prompts):
        bad = next(p for p in prompts if not isinstance(p, str))
        raise RewardError(f"reward {reward!r}: prompts must be strings; got {type(bad).__name__} {bad!r}")
    return prompts


def check_images(images: Tensor, reward: str) -> None:
    """Images must be a float tensor [B, 3, H, W] in [0, 1]."""
    if not isinstance(images, Tensor) or images.ndim != 4 or images.shape[1] != 3:
        shape = tuple(images.shape) if isinstance(images, Tensor) else type(images).__name__
        raise RewardError(f"reward {reward!r}: images must be a tensor [B, 3, H, W]; got {shape}")
    if not images.is_floating_point():
        raise RewardError(f"reward {reward!r}: images must be floating point in [0, 1]; got {images.dtype}")
    if images.numel():
        lo, hi = float(images.detach().min()), float(images.detach().max())
        if not (lo >= -1e-3 and hi <= 1 + 1e-3):  # also catches NaN
            raise RewardError(
                f"reward {reward!r}: images must have values in [0, 1]; got range [{lo:.3f}, {hi:.3f}] "
                "(VAE outputs in [-1, 1] need images / 2 + 0.5)"
            )


def widen(scores: Tensor) -> Tensor:
    """Scores in float32 at least (half-precision models), float64 kept (gradient checks)."""
    return scores if scores.dtype == torch.float64 else scores.float()


def _chunk_output(out, size: int, name: str) -> RewardOutput:
    """Turn what ``_score`` returned into a RewardOutput of ``size`` samples, or raise."""
    if isinstance(out, RewardOutput):
        result = out
    else:
        scores, info = out if isinstance(out, tuple) else (out, {})
        valid = torch.ones(size, dtype=torch.bool, device=scores.device) if isinstance(scores, Tensor) else None
        result = RewardOutput(scores, valid, dict(info))
    if not isinstance(result.scores, Tensor) or result.scores.shape != (size,):
        got = tuple(result.scores.shape) if isinstance(result.scores, Tensor) else type(result.scores).__name__
        raise RewardCrash(f"reward {name!r} returned shape {got}; expected [{size}]")
    return result


class Reward(nn.Module):
    """Base class of all rewards: ``reward(images, prompts) -> scores [B]``.

    Attributes:
        name: registry name, used in logs and error messages.
        differentiable: whether gradients of the score reach the pixels.
        chunk_size: images scored per model call (None: the whole batch at once).
        on_invalid: what a transient fault that retries did not cure does: "raise" (default) or
            "drop" (mark the samples invalid, count them).  Other exceptions always raise.
        timeout: seconds to wait for one chunk before treating it as a transient fault (None: no
            limit).  The chunk runs in a helper thread, which cannot be killed: use it for
            black-box rewards that block on I/O.
        retries: how many times a chunk failing with a transient fault is retried before giving up.
        retry_backoff: seconds before the first retry; doubled at each further retry.
        transient_errors: (class attribute) exception types this reward raises for faults that
            may pass, on top of :data:`TRANSIENT_ERRORS` (e.g. its client library's network errors).
    """

    name: str = "reward"
    differentiable: bool = True
    transient_errors: tuple[type[BaseException], ...] = ()

    def __init__(
        self,
        *,
        chunk_size: int | None = None,
        on_invalid: OnInvalid = "raise",
        timeout: float | None = None,
        retries: int = 0,
        retry_backoff: float = 1.0,
    ):
        super().__init__()
        if chunk_size is not None:
            check_range("chunk_size", chunk_size, 1, integer=True)
        check_choice("on_invalid", on_invalid, ON_INVALID)
        if timeout is not None:
            check_range("timeout", timeout, 0, low_inclusive=False)
        check_range("retries", retries, 0, integer=True)
        check_range("retry_backoff", retry_backoff, 0)
        self.chunk_size = chunk_size
        self.on_invalid: OnInvalid = on_invalid
        self.timeout = timeout
        self.retries = retries
        self.retry_backoff = retry_backoff
        self.dropped = 0

    # -- subclasses implement this ----------------------------------------------------------
    def _score(self, images: Tensor, prompts: list[str]) -> Tensor | tuple[Tensor, dict[str, Tensor]] | RewardOutput:
        """Score one chunk: [b, 3, H, W] in [0, 1] -> [b], optionally with per-sample info.

        Returning a :class:`RewardOutput` lets a reward mark samples it already judged invalid
        (a composite whose component dropped them); those are counted as dropped here too.
        """
        raise NotImplementedError

    def applies_to(self, prompt: str) -> bool:
        """Whether this reward can judge images of ``prompt`` (default: every prompt; a composite: where
        all its components can).

        Rewards that read structure from the prompt say where they cannot: the OCR reward needs quoted
        text, the GenEval reward a prompt it can parse.  Scoring such a prompt raises; ``align eval``
        scores each reward only on the prompts it applies to.
        """
        return all(reward.applies_to(prompt) for reward in _nested_rewards(self))

    # -- modes --------------------------------------------------------------------------------
    def train(self, mode: bool = True) -> Reward:
        """Set the training flag of rewards (running statistics update), keep reward models in eval."""
        for module in self.modules():
            module.training = mode if isinstance(module, Reward) else False
        return self

    def freeze(self) -> Reward:
        """Freeze model weights with requires_grad_(False) (never no_grad: pixels keep their gradient)."""
        self.requires_grad_(False)
        return self.train(self.training)

    def _follow(self, images: Tensor) -> None:
        """Move this reward's own models and tensors to the images' device and dtype.

        Nested rewards (components of a composite) are left alone: they follow when called.
        """
        modules = list(_owned_modules(self))
        ref = next((t for m in modules for t in (*m._parameters.values(), *m._buffers.values()) if t is not None), None)
        if ref is None or (ref.device == images.device and (not ref.is_floating_point() or ref.dtype == images.dtype)):
            return
        for module in modules:
            # the same conversion as Module.to, applied without recursing into nested rewards
            module._apply(lambda t: t.to(images.device, images.dtype if t.is_floating_point() else None), recurse=False)

    # -- the protocol -----------------------------------------------------------------------
    def _prepare(self, images: Tensor, prompts: str | Sequence[str] | None) -> list[str]:
        """Check the input, freeze, follow the images' device and dtype; one prompt per image."""
        check_images(images, self.name)
        prompts = normalize_prompts(prompts, images.shape[0], self.name)
        if any(p.requires_grad for p in self.parameters()):
            self.freeze()
        self._follow(images)
        return prompts

    def score(self, images: Tensor, prompts: str | Sequence[str] | None = None) -> RewardOutput:
        """Scores with validity mask and info; see the module docstring for failure handling."""
        prompts = self._prepare(images, prompts)
        outputs = []
        step = self.chunk_size or max(images.shape[0], 1)
        for start in range(0, images.shape[0], step):
            outputs.append(self._score_chunk(images[start : start + step], prompts[start : start + step]))
        if not outputs:
            empty = images.new_zeros(0, dtype=torch.float32)
            return RewardOutput(empty, empty.bool(), {})
        scores = torch.cat([widen(o.scores) for o in outputs])
        valid = torch.cat([o.valid.to(scores.device) for o in outputs])
        info = {
            key: torch.cat([
                o.info[key].detach().float().to(scores.device) if key in o.info
                else torch.full(o.scores.shape, float("nan"), device=scores.device)  # a dropped chunk
                for o in outputs
            ])
            for key in dict.fromkeys(k for o in outputs for k in o.info)
        }
        finite = torch.isfinite(scores.detach())
        bad = (valid & ~finite).nonzero().flatten().tolist()
        if bad and self.on_invalid == "raise":
            raise RewardUnavailable(
                f"reward {self.name!r} returned a non-finite score for samples {bad}; "
                "set on_invalid='drop' to skip such samples instead"
            )
        if bad:
            logger.warning("reward %r: dropped samples %s with a non-finite score", self.name, bad)
        valid = valid & finite
        num_invalid = int((~valid).sum())
        if num_invalid:
            self.dropped += num_invalid
            scores = torch.where(valid, scores, torch.full_like(scores, float("nan")).detach())
        return RewardOutput(scores, valid, info)

    def is_transient(self, error: BaseException) -> bool:
        """Whether ``error`` is a fault that may pass (retried, then dropped or raised by on_invalid)."""
        return isinstance(error, TRANSIENT_ERRORS + tuple(self.transient_errors))

    def _score_chunk(self, images: Tensor, prompts: list[str]) -> RewardOutput:
        """One chunk, with retries, backoff and timeout for transient faults; anything else raises."""
        attempts = self.retries + 1
        for attempt in range(attempts):
            try:
                out = self._call_with_timeout(images, prompts)
            except Exception as exc:
                if not self.is_transient(exc):
                    if isinstance(exc, AlignError):
                        raise  # already says what went wrong and what to change
                    raise RewardCrash(_crash_message(self.name, exc)) from exc
                cause = exc
                if attempt + 1 < attempts:
                    delay = self.retry_backoff * 2**attempt
                    logger.warning(
                        "reward %r failed (%s: %s); retry %d/%d in %.2fs",
                        self.name, type(exc).__name__, exc, attempt + 1, self.retries, delay,
                    )
                    time.sleep(delay)
            else:
                # a wrong shape is a bug in the reward, not a fault to retry or drop
                return _chunk_output(out, images.shape[0], self.name)
        tried = f" after {attempts} attempts" if attempts > 1 else ""
        message = f"reward {self.name!r} failed{tried}: {type(cause).__name__}: {cause}"
        if self.on_invalid == "raise":
            if isinstance(cause, RewardUnavailable) and attempts == 1:
                raise cause  # a nested reward's fault, already named
            raise RewardUnavailable(message) from cause
        logger.warning("%s; dropping %d samples (on_invalid='drop')", message, images.shape[0])
        nan = torch.full((images.shape[0],), float("nan"), device=images.device)
        return RewardOutput(nan, torch.zeros_like(nan, dtype=torch.bool), {})

    def _call_with_timeout(self, images: Tensor, prompts: list[str]):
        if self.timeout is None:
            return self._score(images, prompts)
        box: dict[str, object] = {}
        grad_enabled = torch.is_grad_enabled()  # grad mode is per thread

        def run() -> None:
            try:
                with torch.set_grad_enabled(grad_enabled):
                    box["out"] = self._score(images, prompts)
            except BaseException as exc:  # handed to the caller's thread
                box["error"] = exc

        worker = threading.Thread(target=run, name=f"reward-{self.name}", daemon=True)
        worker.start()
        worker.join(self.timeout)
        if worker.is_alive():
            raise TimeoutError(f"no result within timeout={self.timeout}s")
        if "error" in box:
            raise box["error"]  # type: ignore[misc]
        return box["out"]

    def forward(self, images: Tensor, prompts: str | Sequence[str] | None = None) -> Tensor:
        return self.score(images, prompts).scores

    def score_candidates(self, images: Tensor, candidates: Sequence[Sequence[str]]) -> list[Tensor]:
        """Score image i against each prompt of ``candidates[i]``: a list of B tensors [K_i].

        Used by calibration (TextNorm).  This default scores each image once per candidate;
        text-image models override it to encode each image once.
        """
        if len(candidates) != images.shape[0]:
            raise RewardError(f"reward {self.name!r}: got {len(candidates)} candidate sets for {images.shape[0]} images")
        out = []
        for image, prompts in zip(images, candidates):
            prompts = list(prompts)
            result = self.score(image.unsqueeze(0).expand(len(prompts), -1, -1, -1), prompts)
            out.append(result.scores)
        return out

    def extra_repr(self) -> str:
        return f"name={self.name!r}, differentiable={self.differentiable}"


def _crash_message(name: str, error: BaseException) -> str:
    """What a RewardCrash says: the reward, the original exception, and why it was not retried."""
    if isinstance(error, (torch.cuda.OutOfMemoryError, MemoryError)):
        why = "out of memory is not a transient fault; score fewer images per call (chunk_size) or free memory"
    else:
        why = ("a bug in the reward, not a fault to retry or drop (a reward declares the exceptions of faults "
               "that may pass in transient_errors)")
    return f"reward {name!r} raised {type(error).__name__}: {error}; {why}"


def _owned_modules(reward: Reward):
    """The reward and its submodules, not descending into nested rewards."""
    stack = [reward]
    while stack:
        module = stack.pop()
        yield module
        stack.extend(child for child in module.children() if not isinstance(child, Reward))


def _nested_rewards(reward: Reward):
    """The rewards directly inside ``reward`` (components of a composite), not descending further."""
    stack = list(reward.children())
    while stack:
        module = stack.pop()
        if isinstance(module, Reward):
            yield module
        else:
            stack.extend(module.children())


def require_differentiable(reward: Reward, method: str) -> None:
    """Refuse a black-box reward for a method that backpropagates through it."""
    if not getattr(reward, "differentiable", False):
        raise AlignError(
            f"reward {reward.name!r} is not differentiable, and {method} backpropagates the reward into the "
            "model; use a differentiable reward for training, or use this reward for steering "
            "(align steer) or evaluation (align eval)"
        )
