"""Fine-tune with the Python API, then compare base and tuned samples.

    python examples/train_with_python.py                      # the built-in model, CPU, about a minute
    python examples/train_with_python.py model=<hub id> ...   # any key=value of `align train`
"""

import sys

from align.core.config import load_config
from align.steer.generate import generate
from align.train.trainer import TrainConfig, Trainer
from rewards import build_reward

defaults = [
    "model=builtin", "method=draft", "reward=brightness", "prompts=shapes", "max_steps=40", "batch_size=4",
    "draft.num_steps=20", "draft.guidance_scale=4.0", "draft.truncation_steps=2", "draft.learning_rate=3e-3",
    "output_dir=runs/python-example", "checkpoint_every=0", "sample_every=20",
]
config = load_config(TrainConfig, None, defaults + sys.argv[1:])
trainer = Trainer(config)
trainer.setup()
reward = build_reward(config.reward)
prompts = trainer.prompts[:8]
seeds = list(range(100, 108))
m = config.method_config


def mean_reward() -> float:
    images = generate(trainer.model, prompts, seeds, num_steps=m.num_steps, guidance_scale=m.guidance_scale)
    return float(reward(images, prompts).mean())


before = mean_reward()
trainer.train()
after = mean_reward()
print(f"mean {config.reward} on held-out seeds: {before:.4f} -> {after:.4f}; LoRA in {config.output_dir}/lora")
