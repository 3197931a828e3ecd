"""Training methods: one config dataclass (with the paper's defaults) per method.

Reward backpropagation (:class:`BackpropConfig`): draft, draft_lv, alignprop, refl.
Policy gradient (:class:`PolicyGradientConfig`): ddpo, grpo (Flow-GRPO and its variants).
Forward-process RL: diffusion_nft (DiffusionNFT). Preference optimisation: diffusion_dpo (Diffusion-DPO).
"""

from align.train.methods.alignprop import AlignPropConfig
from align.train.methods.base import BackpropConfig, MethodConfig
from align.train.methods.ddpo import DDPOConfig
from align.train.methods.diffusion_dpo import DiffusionDPOConfig
from align.train.methods.diffusion_nft import DiffusionNFTConfig
from align.train.methods.draft import DraftConfig, DraftLVConfig
from align.train.methods.grpo import GRPOConfig
from align.train.methods.policy_gradient import PolicyGradientConfig
from align.train.methods.refl import ReFLConfig

#: method name -> config class
METHODS: dict[str, type[MethodConfig]] = {
    "draft": DraftConfig,
    "draft_lv": DraftLVConfig,
    "alignprop": AlignPropConfig,
    "refl": ReFLConfig,
    "ddpo": DDPOConfig,
    "grpo": GRPOConfig,
    "diffusion_nft": DiffusionNFTConfig,
    "diffusion_dpo": DiffusionDPOConfig,
}

__all__ = [
    "METHODS", "AlignPropConfig", "BackpropConfig", "DDPOConfig", "DiffusionDPOConfig", "DiffusionNFTConfig", "DraftConfig", "DraftLVConfig", "GRPOConfig",
    "MethodConfig", "PolicyGradientConfig", "ReFLConfig",
]
