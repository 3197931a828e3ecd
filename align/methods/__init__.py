"""Reward-backpropagation methods: one config dataclass (with the paper's defaults) per method."""

from .alignprop import AlignPropConfig
from .base import MethodConfig
from .draft import DraftConfig, DraftLVConfig
from .refl import ReFLConfig

#: method name -> config class
METHODS: dict[str, type[MethodConfig]] = {
    "draft": DraftConfig,
    "draft_lv": DraftLVConfig,
    "alignprop": AlignPropConfig,
    "refl": ReFLConfig,
}

__all__ = ["METHODS", "AlignPropConfig", "DraftConfig", "DraftLVConfig", "MethodConfig", "ReFLConfig"]
