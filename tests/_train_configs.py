"""A tiny CPU training config for the tests of a method trained on rollouts or pairs (DiffusionNFT, Diffusion-DPO)."""

from align.core.config import from_dict
from align.train.trainer import TrainConfig

PROMPTS = ["a red circle", "a blue square"]


def tiny_run(method: str, out, family: str, method_args: dict, **overrides) -> TrainConfig:
    """``method`` on a tiny seeded ``family`` model: 2 steps of batch 2 on the CPU, a rank-2 LoRA, the brightness
    reward, no checkpoints or sample grids; ``method_args`` are the method's settings, ``overrides`` any others."""
    data = {
        "method": method, "output_dir": str(out), "max_steps": 2, "batch_size": 2, "prompts": PROMPTS,
        "reward": "brightness", "checkpoint_every": 0, "sample_every": 0, "num_samples": 1, "lora": {"rank": 2},
        "max_sequence_length": 8 if family in ("sd3", "flux") else None, "device": "cpu",
        "model_recommendations": False, method: method_args, **overrides,
    }
    return from_dict(TrainConfig, data)
