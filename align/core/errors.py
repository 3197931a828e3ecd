"""User-facing errors.

Anything the user can fix (a bad config value, a missing model, an unsupported scheduler)
raises :class:`AlignError`.  The CLI prints its message and exits with status 2, without a
traceback; library users catch it like any ``ValueError``.
"""

from __future__ import annotations

import difflib
from collections.abc import Iterable


class AlignError(ValueError):
    """An error caused by the user's input, with a message that says what to change."""


class ConfigError(AlignError):
    """A configuration field has a value outside what it accepts."""


class RewardError(AlignError):
    """A reward failed (raised, timed out, returned a malformed or non-finite score)."""


class RewardUnavailable(RewardError):
    """A transient reward fault: the reward could not give a usable score this time.

    A remote or plugin reward raises it when its service is down, overloaded or answers without a
    score; the reward base class raises it for a timeout, a connection error or a non-finite score
    that its retries did not cure.  Faults of this kind are retried, then dropped and counted
    with ``on_invalid="drop"`` (and an enclosing reward or the trainer treats them the same way).
    """


class RewardCrash(RewardError):
    """A reward raised an exception it did not declare transient: a bug in the reward, or out of memory.

    Never retried, dropped or counted: a run stops at once.  ``__cause__`` is the original
    exception, with its traceback.
    """


def suggest(value: str, accepted: Iterable[str]) -> str:
    """Return ' Did you mean X?' when ``value`` is close to one of ``accepted``, else ''."""
    close = difflib.get_close_matches(str(value), [str(a) for a in accepted], n=1, cutoff=0.6)
    return f" Did you mean {close[0]!r}?" if close else ""


def check_choice(field: str, value: object, accepted: Iterable[object]) -> None:
    """Raise ConfigError unless ``value`` is one of ``accepted``."""
    accepted = list(accepted)
    if value not in accepted:
        names = ", ".join(repr(a) for a in accepted)
        raise ConfigError(
            f"{field}={value!r} is not supported; accepted: {names}.{suggest(str(value), map(str, accepted))}"
        )


def check_range(
    field: str,
    value: float,
    low: float | None = None,
    high: float | None = None,
    *,
    low_inclusive: bool = True,
    high_inclusive: bool = True,
    integer: bool = False,
) -> None:
    """Raise ConfigError unless ``low <= value <= high`` (bounds optional, inclusivity configurable)."""
    if integer and (isinstance(value, bool) or not isinstance(value, int)):
        raise ConfigError(f"{field}={value!r} must be an integer")
    if not integer and (isinstance(value, bool) or not isinstance(value, (int, float))):
        raise ConfigError(f"{field}={value!r} must be a number")
    if value != value:  # NaN
        raise ConfigError(f"{field}={value!r} must be a finite number")
    ok_low = low is None or (value >= low if low_inclusive else value > low)
    ok_high = high is None or (value <= high if high_inclusive else value < high)
    if not (ok_low and ok_high):
        lo = "-inf" if low is None else f"{low}"
        hi = "inf" if high is None else f"{high}"
        left = "[" if (low is not None and low_inclusive) else "("
        right = "]" if (high is not None and high_inclusive) else ")"
        raise ConfigError(f"{field}={value!r} is out of range; accepted: {left}{lo}, {hi}{right}")


def check_device(field: str, value: str) -> None:
    """Raise ConfigError unless ``value`` names a device: auto, cpu, cuda or cuda:N."""
    ok = value in ("auto", "cpu", "cuda") or (
        isinstance(value, str) and value.startswith("cuda:") and value[5:].isdigit()
    )
    if not ok:
        raise ConfigError(f"{field}={value!r} is not supported; accepted: 'auto', 'cpu', 'cuda', 'cuda:N'")
