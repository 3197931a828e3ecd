"""DiffusionNFT vs GRPO vs DRaFT-K on the built-in model at the same number of model forward passes.

Each method trains the built-in model's LoRA toward the same reward (brightness: differentiable, so DRaFT can run
it; NFT and GRPO use it as a black box) with 8 sampling steps and no CFG, through the trainer's own
``train_step``, until a budget of denoiser forward passes is spent.  Forward passes are counted per sample: every
row of every batch given to the denoiser, rollouts, training passes, the old policy's and the frozen model's calls
alike (a backward is not counted).  At evenly spaced points of the budget the held-out reward is measured on fixed
seeds (16 per point, the method's own evaluation sampler; those calls are not counted).

Examples::

    python bench/method_comparison.py --out bench/results/method_comparison_cpu.json --plot bench/results/method_comparison_cpu.png
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import new_payload, write_results  # noqa: E402

PROMPTS = ["a red circle on a blue background", "a yellow square on a black background",
           "a green triangle on a white background", "a cyan circle on a purple background"]
HELDOUT_SEEDS = list(range(500, 516))
#: method -> (method settings, trainer settings): the tests' settings for the built-in model
METHODS: dict[str, tuple[dict[str, Any], dict[str, Any]]] = {
    "diffusion_nft": ({"group_size": 8, "rollout_prompts": 2, "learning_rate": 2e-2}, {"batch_size": 8}),
    "grpo": ({"group_size": 8, "rollout_prompts": 2, "learning_rate": 1e-2, "ratio_norm": True},
             {"batch_size": 8, "gradient_accumulation_steps": 2}),
    "draft": ({"truncation_steps": 1, "learning_rate": 3e-3}, {"batch_size": 8}),
}


class CountingDenoiser:
    """The model's denoiser, counting the rows (samples) of every call while ``counting``."""

    def __init__(self, inner):
        self.inner, self.calls, self.counting = inner, 0, True

    def __call__(self, x_t, timestep, cond):
        if self.counting:
            self.calls += int(x_t.shape[0])
        return self.inner(x_t, timestep, cond)

    def __getattr__(self, name):
        return getattr(self.inner, name)


def heldout_reward(trainer, reward) -> float:
    from align.steer.generate import generate

    m = trainer.method
    prompts = [PROMPTS[i % len(PROMPTS)] for i in range(len(HELDOUT_SEEDS))]
    images = generate(trainer.model, prompts, HELDOUT_SEEDS, guidance_scale=1.0,
                      **m.evaluation_sampling(trainer.model.is_flow))
    return float(reward(images, prompts).float().mean())


def run_method(method: str, budget: int, points: int, reward_name: str, num_steps: int, out: Path) -> dict[str, Any]:
    from align.core.config import from_dict
    from align.core.models import load_model
    from align.train.trainer import TrainConfig, Trainer
    from rewards import build_reward

    args, trainer_args = METHODS[method]
    method_args = {"num_steps": num_steps, "guidance_scale": 1.0, **args}
    if method in ("diffusion_nft", "grpo"):
        method_args["eval_num_steps"] = num_steps
    cfg = from_dict(TrainConfig, {
        "method": method, "output_dir": str(out / method), "max_steps": 10_000, "prompts": PROMPTS,
        "reward": reward_name, "checkpoint_every": 0, "sample_every": 0, "num_samples": 1, "lora": {"rank": 4},
        "device": "cpu", "model_recommendations": False, method: method_args, **trainer_args,
    })
    model = load_model("builtin", device="cpu")
    trainer = Trainer(cfg, model=model, progress=False)
    trainer.setup()
    counter = CountingDenoiser(model.denoiser)
    model.denoiser = counter
    reward = build_reward(reward_name)
    marks = [round(budget * (k + 1) / points) for k in range(points)]

    def evaluate() -> float:
        counter.counting = False
        try:
            return heldout_reward(trainer, reward)
        finally:
            counter.counting = True

    curve = [{"forward_passes": 0, "steps": 0, "seconds": 0.0, "heldout_reward": evaluate()}]
    seconds, steps = 0.0, 0
    while counter.calls < budget:
        start = time.perf_counter()
        trainer.train_step()
        seconds += time.perf_counter() - start
        steps += 1
        if steps == 1:
            per_step = counter.calls
        if marks and counter.calls >= marks[0]:
            while marks and counter.calls >= marks[0]:
                marks.pop(0)
            curve.append({"forward_passes": counter.calls, "steps": steps, "seconds": seconds,
                          "heldout_reward": evaluate()})
    return {"variant": method, "settings": {**method_args, **trainer_args}, "forward_passes_first_step": per_step,
            "curve": curve}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--budget", type=int, default=5000, help="denoiser forward passes (samples) per method")
    parser.add_argument("--points", type=int, default=5, help="held-out evaluations along the budget")
    parser.add_argument("--reward", default="brightness")
    parser.add_argument("--num-steps", type=int, default=8)
    parser.add_argument("--methods", default="diffusion_nft,grpo,draft")
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--plot", type=Path, help="write a PNG of held-out reward vs forward passes here")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    payload = new_payload("method_comparison", __file__, argv, "cpu", 1)
    payload.update({"budget": args.budget, "reward": args.reward, "num_steps": args.num_steps,
                    "heldout_seeds": len(HELDOUT_SEEDS)})
    with tempfile.TemporaryDirectory() as tmp:
        for method in args.methods.split(","):
            row = run_method(method, args.budget, args.points, args.reward, args.num_steps, Path(tmp))
            payload["rows"].append(row)
            last = row["curve"][-1]
            print(f"{method}: {row['curve'][0]['heldout_reward']:.4f} -> {last['heldout_reward']:.4f} after "
                  f"{last['forward_passes']} forward passes ({last['steps']} steps, {last['seconds']:.0f} s)")
            write_results(args.out, payload)
    if args.plot:
        plot(payload, args.plot)
    return 0


def plot(payload: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for row in payload["rows"]:
        curve = row["curve"]
        ax.plot([p["forward_passes"] for p in curve], [p["heldout_reward"] for p in curve], marker="o",
                label=row["variant"])
    ax.set_xlabel("denoiser forward passes (samples)")
    ax.set_ylabel(f"held-out {payload['reward']} ({payload['heldout_seeds']} seeds)")
    ax.set_title("built-in model, same forward-pass budget")
    ax.legend()
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)


if __name__ == "__main__":
    sys.exit(main())
