"""Rewards: one protocol for differentiable and black-box rewards, a zoo, composition, plugins.

>>> from rewards import build_reward
>>> r = build_reward({"brightness": 1.0, "saturation": 0.5})
>>> scores = r(images, prompts)        # images [B, 3, H, W] in [0, 1] -> [B]
>>> out = r.score(images, prompts)     # RewardOutput(scores, valid, info per component)

Built-in names: see :func:`available_rewards` (and ``rewards/zoo``); third-party rewards are
found through the ``diffusion_align.rewards`` entry-point group.
"""

from .base import Reward, RewardOutput, require_differentiable
from .compose import Ensemble, RunningNorm, TextNorm, WeightedSum
from .preprocess import ImagePreprocess
from .registry import ENTRY_POINT_GROUP, available_rewards, build_reward, get_reward_factory, register_reward

__all__ = [
    "ENTRY_POINT_GROUP",
    "Ensemble",
    "ImagePreprocess",
    "Reward",
    "RewardOutput",
    "RunningNorm",
    "TextNorm",
    "WeightedSum",
    "available_rewards",
    "build_reward",
    "get_reward_factory",
    "register_reward",
    "require_differentiable",
]
