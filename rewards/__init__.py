"""Rewards: one protocol for differentiable and black-box rewards, a zoo, composition, plugins.

>>> from rewards import build_reward
>>> r = build_reward({"brightness": 1.0, "saturation": 0.5})
>>> scores = r(images, prompts)        # images [B, 3, H, W] in [0, 1] -> [B]
>>> out = r.score(images, prompts)     # RewardOutput(scores, valid, info per component)

Built-in names: see :func:`available_rewards` (and ``rewards/zoo``); third-party rewards are
found through the ``diffusion_align.rewards`` entry-point group.  A reward that reads structure
from the prompt (OCR, GenEval) says which prompts it can judge with :meth:`Reward.applies_to`.

Serving: ``align serve-reward NAME...`` (:mod:`rewards.server`) serves any of them over HTTP to
many workers, which name ``{"remote": {"url": ..., "reward": NAME}}`` (:mod:`rewards.remote`).

Failures: a reward whose service is down raises :class:`RewardUnavailable` (a transient fault,
like a timeout, a connection error or a non-finite score: retried, then dropped with
``on_invalid="drop"``); any exception a reward does not declare transient (``transient_errors``)
becomes a :class:`RewardCrash` that stops the run.
"""

from align.core.errors import RewardCrash, RewardError, RewardUnavailable

from .base import TRANSIENT_ERRORS, Reward, RewardOutput, require_differentiable
from .compose import Ensemble, RunningNorm, TextNorm, WeightedSum
from .preprocess import ImagePreprocess
from .registry import ENTRY_POINT_GROUP, available_rewards, build_reward, get_reward_factory, register_reward

__all__ = [
    "ENTRY_POINT_GROUP",
    "TRANSIENT_ERRORS",
    "Ensemble",
    "ImagePreprocess",
    "Reward",
    "RewardCrash",
    "RewardError",
    "RewardOutput",
    "RewardUnavailable",
    "RunningNorm",
    "TextNorm",
    "WeightedSum",
    "available_rewards",
    "build_reward",
    "get_reward_factory",
    "register_reward",
    "require_differentiable",
]
