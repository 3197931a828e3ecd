"""Rewards found by name: built-ins registered here, third-party ones by entry point.

A separate package adds a reward by declaring, in its pyproject.toml::

    [project.entry-points."diffusion_align.rewards"]
    my_reward = "my_package.module:MyReward"

where the target is a :class:`rewards.Reward` subclass or a factory returning one.  Built-in
names win over entry points of the same name.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from importlib import metadata
from typing import Any

from align.core.errors import AlignError, suggest

from .base import Reward

ENTRY_POINT_GROUP = "diffusion_align.rewards"

RewardFactory = Callable[..., Reward]
_REGISTRY: dict[str, RewardFactory] = {}


def register_reward(name: str, factory: RewardFactory | None = None):
    """Register ``factory`` (a Reward subclass or a callable returning a Reward) under ``name``.

    Usable as a decorator: ``@register_reward("brightness")``.
    """

    def add(f: RewardFactory) -> RewardFactory:
        if name in _REGISTRY and _REGISTRY[name] is not f:
            raise AlignError(f"a reward named {name!r} is already registered")
        _REGISTRY[name] = f
        return f

    return add(factory) if factory is not None else add


def _entry_points() -> dict[str, metadata.EntryPoint]:
    return {ep.name: ep for ep in metadata.entry_points(group=ENTRY_POINT_GROUP)}


def available_rewards() -> list[str]:
    """Names of all rewards: built-in and installed plugins."""
    _load_builtins()
    return sorted(set(_REGISTRY) | set(_entry_points()))


def get_reward_factory(name: str) -> RewardFactory:
    """The factory registered under ``name`` (built-in first, then entry points)."""
    _load_builtins()
    if name in _REGISTRY:
        return _REGISTRY[name]
    eps = _entry_points()
    if name in eps:
        try:
            factory = eps[name].load()
        except Exception as exc:
            raise AlignError(
                f"reward {name!r} is installed by entry point {eps[name].value!r} but failed to import: "
                f"{type(exc).__name__}: {exc}"
            ) from exc
        return factory
    names = sorted(set(_REGISTRY) | set(eps))
    raise AlignError(f"unknown reward {name!r}; available: {', '.join(names)}.{suggest(name, names)}")


def build_reward(spec: str | Mapping[str, Any] | Reward, **kwargs: Any) -> Reward:
    """Build a reward from a name, a Reward, or a mapping of components.

    * ``"brightness"``: the registered reward, constructed with ``kwargs``.
    * ``{"aesthetic": 1.0, "pickscore": 0.5}``: a weighted sum of components.
    * ``{"aesthetic": {"weight": 1.0, "chunk_size": 8, "normalize": True}, ...}``: components
      with arguments; ``normalize`` wraps the component in a running normalisation
      (:class:`rewards.compose.RunningNorm`); ``reward`` names the registered reward when the
      key is a label (``{"clip_b": {"reward": "clipscore", "model": ...}}``).
    """
    if isinstance(spec, Reward):
        return spec
    if isinstance(spec, str):
        factory = get_reward_factory(spec)
        try:
            reward = factory(**kwargs)
        except AlignError:
            raise
        except TypeError as exc:
            raise AlignError(f"reward {spec!r} does not accept these arguments {sorted(kwargs)}: {exc}") from None
        if not isinstance(reward, Reward):
            raise AlignError(f"reward {spec!r} factory returned {type(reward).__name__}, not a rewards.Reward")
        if reward.name == Reward.name:
            reward.name = spec
        return reward.freeze()
    if isinstance(spec, Mapping):
        from .compose import WeightedSum

        if kwargs:
            raise AlignError(f"arguments {sorted(kwargs)} apply to one reward; put them in the mapping per component")
        if not spec:
            raise AlignError("reward mapping is empty; give at least one {name: weight}")
        components = {name: _component(name, value) for name, value in spec.items()}
        return WeightedSum(components).freeze()
    raise AlignError(f"reward spec {spec!r} must be a name, a {{name: weight}} mapping, or a Reward")


def build_reward_entry(label: str, spec: Any, *, offline: bool | None = None) -> Reward:
    """The reward of one named entry of a configuration (``align eval``'s and ``align serve-reward``'s
    ``rewards``): a registered name, ``{reward: name, **arguments}``, or a ``{name: weight}`` composition.

    ``offline`` is passed to rewards that load weights (those whose factory takes ``offline``) unless
    the entry sets it.
    """
    import inspect

    if isinstance(spec, Mapping) and "reward" not in spec:
        return build_reward(spec)
    if isinstance(spec, str):
        name, args = spec, {}
    elif isinstance(spec, Mapping):
        args = dict(spec)
        name = args.pop("reward")
    else:
        raise AlignError(f"rewards.{label}={spec!r} must be a reward name, a mapping with 'reward', or a {{name: weight}} mapping")
    if not isinstance(name, str):
        raise AlignError(f"rewards.{label}: reward={name!r} must be a registered reward name")
    factory = get_reward_factory(name)
    try:
        takes_offline = "offline" in inspect.signature(factory).parameters
    except (TypeError, ValueError):
        takes_offline = False
    if offline is not None and takes_offline:
        args.setdefault("offline", offline)
    return build_reward(name, **args)


def _component(label: str, value: Any) -> tuple[Reward, float]:
    """One ``{label: weight | {weight, normalize, reward, **arguments}}`` entry of a reward mapping."""
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return build_reward(label), float(value)
    if not isinstance(value, Mapping):
        raise AlignError(
            f"reward {label!r}: {value!r} must be a weight (number) or a mapping of arguments with 'weight'"
        )
    args = dict(value)
    weight = args.pop("weight", 1.0)
    normalize = args.pop("normalize", False)
    name = args.pop("reward", label)
    if not isinstance(weight, (int, float)) or isinstance(weight, bool):
        raise AlignError(f"reward {label!r}: weight={weight!r} must be a number")
    if not isinstance(normalize, bool):
        raise AlignError(f"reward {label!r}: normalize={normalize!r} must be true or false")
    reward = build_reward(name, **args)
    if normalize:
        from .compose import RunningNorm

        reward = RunningNorm(reward)
    return reward, float(weight)


_BUILTINS_LOADED = False


def _load_builtins() -> None:
    # importing the zoo modules runs their @register_reward decorators
    global _BUILTINS_LOADED
    if _BUILTINS_LOADED:
        return
    _BUILTINS_LOADED = True
    from . import compose, remote, zoo  # noqa: F401
