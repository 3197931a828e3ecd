"""Reward-backpropagation methods: one config dataclass (with the paper's defaults) per method."""

from align.train.methods.alignprop import AlignPropConfig
from align.train.methods.base import MethodConfig
from align.train.methods.draft import DraftConfig, DraftLVConfig
from align.train.methods.refl import ReFLConfig

#: method name -> config class
METHODS: dict[str, type[MethodConfig]] = {
    "draft": DraftConfig,
    "draft_lv": DraftLVConfig,
    "alignprop": AlignPropConfig,
    "refl": ReFLConfig,
}

__all__ = ["METHODS", "AlignPropConfig", "DraftConfig", "DraftLVConfig", "MethodConfig", "ReFLConfig"]
