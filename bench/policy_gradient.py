"""Policy-gradient fine-tuning (GRPO): time per optimiser step split into rollout, reward and training pass, next to
the lower bound and a naive loop; peak memory as the number of sampling steps T grows.

One optimiser step as the trainer takes it with ``method=grpo`` on the CPU model of ``bench/models.py``: a rollout
of ``group_size x prompts`` samples (DDIM eta 1 on every step but the last, CFG 4.5), decoded and scored by JPEG
compressibility (black-box, in the trainer's worker thread), group advantages, then the training pass: every
sample's T - 1 stochastic steps recomputed with gradients, one CFG-batched call per micro-step of ``batch_size``
samples at one step, PPO-clipped surrogate, AdamW.  ``batch_size x accumulation`` equals the rollout, so each
step collects one rollout.  Next to it:

* ``lower_bound``: the denoiser calls a step cannot avoid: the rollout's grad-free CFG-batched forwards (T per chunk
  of ``batch_size``) and the training pass's forward+backward calls (one per micro-step), on the same shapes, no
  decode, reward or optimiser.  It runs alternately with ours in the same worker (same machine load);
* ``naive``: the same method written as a plain loop: diffusers' ``DDIMScheduler.step`` (eta 1) storing every
  latent, log-probabilities from its own Gaussian, the reward scored after sampling (no worker), and per
  micro-batch of samples the surrogate summed over all trained steps with one backward (every step's graph kept).

``--reward-latency S`` makes every reward call wait S seconds more (a remote judge's round trip); ``--sequential``
rows score on the main thread (``overlap_reward=false``) to show what the worker hides.

Memory is measured as in ``bench/common.py``: the peak one step adds above what is resident before it.

Examples::

    python bench/policy_gradient.py --out bench/results/policy_gradient_cpu.json
    python bench/policy_gradient.py --device cuda --model sd15 --resolution 512 --out bench/results/policy_gradient_sd15.json
"""

from __future__ import annotations

import argparse
import math
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from bench.common import (  # noqa: E402
    MIB,
    PeakMemory,
    load_average,
    malloc_mode,
    measure_step,
    new_payload,
    resume_payload,
    row_key,
    run_worker,
    time_step,
    wait_for_quiet,
    worker_main,
    write_results,
)

PROMPTS = ["a red circle", "a blue square", "a photo of a cat", "a green triangle"]
GUIDANCE = 4.5
LORA_RANK = 4
VARIANTS = ("ours", "naive", "lower_bound")


# ---------------------------------------------------------------------------------------------
# worker side
# ---------------------------------------------------------------------------------------------
class _RemoteJpeg:
    """JPEG compressibility with a fixed extra wait per call (built lazily: the worker imports rewards)."""

    @staticmethod
    def build(latency: float):
        from rewards import Reward
        from rewards.zoo.jpeg import JpegCompressibility

        class RemoteJpeg(Reward):
            name = "jpeg_compressibility_remote"
            differentiable = False

            def __init__(self):
                super().__init__()
                self.inner = JpegCompressibility()

            def _score(self, images, prompts):
                time.sleep(latency)
                return self.inner._score(images, prompts)

        return RemoteJpeg()


def _trainer(job: dict[str, Any], model, workdir: str):
    from align.core.config import from_dict
    from align.train.trainer import TrainConfig, Trainer

    rollout = job["group_size"] * job["prompts"]
    cfg = from_dict(TrainConfig, {
        "method": "grpo",
        "grpo": {"num_steps": job["num_steps"], "guidance_scale": GUIDANCE, "group_size": job["group_size"],
                 "rollout_prompts": job["prompts"], "learning_rate": 1e-4, "eta": 1.0,
                 "overlap_reward": not job.get("sequential", False)},
        "output_dir": workdir, "batch_size": job["batch_size"], "gradient_accumulation_steps": rollout // job["batch_size"],
        "prompts": PROMPTS, "reward": "jpeg_compressibility", "lora": {"rank": LORA_RANK},
        "mixed_precision": job["mixed_precision"], "device": job["device"], "checkpoint_every": 0, "sample_every": 0,
        "max_steps": 1_000_000, "height": job.get("resolution"), "width": job.get("resolution"),
        "model_recommendations": False,
    })
    latency = job.get("reward_latency", 0.0)
    trainer = Trainer(cfg, model=model, reward=_RemoteJpeg.build(latency) if latency else None, progress=False)
    trainer.setup()
    return trainer


def _split(trainer):
    """``step()`` = trainer.train_step, recording its split (sampling, reward wait, training pass)."""
    splits: list[dict[str, float]] = []

    def step():
        metrics = trainer.train_step()
        sampling, wait = metrics.get("rollout/sampling_s", 0.0), metrics.get("rollout/reward_wait_s", 0.0)
        splits.append({"rollout_s": sampling, "reward_wait_s": wait, "reward_busy_s": metrics.get("rollout/reward_busy_s", 0.0),
                       "train_s": metrics["step_time_s"] - sampling - wait, "step_s": metrics["step_time_s"]})

    return step, splits


def _encode(trainer, n: int):
    prompts = [PROMPTS[i % len(PROMPTS)] for i in range(n)]
    with torch.no_grad():
        pc = trainer.model.encode_prompts(prompts, guidance=True, height=trainer.height, width=trainer.width)
    return prompts, pc


def _lower_bound_step(trainer):
    """The rollout's grad-free CFG-batched forwards and the training pass's forward+backward calls, nothing else."""
    from align.core.denoisers import cat_conditioning

    model, objective = trainer.model, trainer.objective
    b = trainer.config.batch_size
    chunks = math.ceil(objective.rollout_size / b)
    micro = objective.micro_steps(0)
    schedule = objective.schedule
    generator = torch.Generator().manual_seed(0)

    def step():
        _, pc = _encode(trainer, b)
        both = cat_conditioning(pc.uncond, pc.cond)
        x = torch.randn(model.latent_shape(b, trainer.height, trainer.width), generator=generator).to(model.device, model.dtype)
        x2 = torch.cat([x, x])
        t = schedule.model_timestep(0, x2.shape[0], model.device)
        with trainer.accelerator.autocast():
            with torch.no_grad():
                for _ in range(chunks * schedule.num_steps):
                    model.denoiser(x2, t, both)
            for _ in range(micro):
                out = model.denoiser(x2.detach(), t, both)
                out.backward(torch.ones_like(out))
                del out

    return step


def _naive_step(trainer):
    """GRPO as a plain loop: diffusers' DDIM step (eta 1), every latent stored, one backward per micro-batch over all steps."""
    from diffusers import DDIMScheduler

    from align.core.denoisers import cat_conditioning
    from align.train.policy_gradient import clipped_surrogate, gaussian_log_density, group_advantages

    model, objective = trainer.model, trainer.objective
    m = trainer.method
    b = trainer.config.batch_size
    rollout, group = objective.rollout_size, objective.group_size
    scheduler = DDIMScheduler.from_config(model.pipe.scheduler.config)
    steps = m.num_steps
    vae = model.pipe.vae
    generator = torch.Generator().manual_seed(0)

    def guided(x, t, both):
        out = model.denoiser(torch.cat([x, x]).to(model.dtype), t.expand(2 * x.shape[0]), both).float()
        uncond, cond = out.chunk(2)
        return uncond + GUIDANCE * (cond - uncond)

    def gaussian(scheduler, t, x, out):
        """Mean and std of diffusers' DDIM eta=1 step (its variance), as a simple reimplementation computes them."""
        mean = scheduler.step(out, t, x, eta=1.0, variance_noise=torch.zeros_like(x)).prev_sample
        prev_t = t - scheduler.config.num_train_timesteps // scheduler.num_inference_steps
        std = float(scheduler._get_variance(t, prev_t)) ** 0.5
        return mean, std

    def step():
        scheduler.set_timesteps(steps, device=model.device)
        timesteps = scheduler.timesteps
        trajectories = []
        with torch.no_grad(), trainer.accelerator.autocast():
            for _ in range(0, rollout, b):
                prompts, pc = _encode(trainer, b)
                both = cat_conditioning(pc.uncond, pc.cond)
                x = torch.randn(model.latent_shape(b, trainer.height, trainer.width), generator=generator)
                latents, logps = [x], []
                for i, t in enumerate(timesteps):
                    out = guided(x, t, both)
                    mean, std = gaussian(scheduler, t, x, out)
                    if i < steps - 1:
                        x = mean + std * torch.randn(x.shape, generator=generator)
                        logps.append(gaussian_log_density(x, mean, std) / x[0].numel())
                    else:
                        x = mean
                    latents.append(x)
                images = (vae.decode(x.to(vae.dtype) / vae.config.scaling_factor).sample.float() / 2 + 0.5).clamp(0, 1)
                scores = trainer.reward(images, prompts)
                trajectories.append((latents, torch.stack(logps, 1), scores, pc))
        rewards = torch.cat([tr[2] for tr in trajectories])
        advantages = group_advantages(rewards, torch.arange(rollout) // group)
        trainer.optimizer.zero_grad(set_to_none=True)
        with trainer.accelerator.autocast():
            for c, (latents, old, _, pc) in enumerate(trajectories):
                both = cat_conditioning(pc.uncond, pc.cond)
                adv = advantages[c * b : (c + 1) * b]
                loss = 0.0
                for i in range(steps - 1):  # every step's graph is kept until the one backward
                    t = timesteps[i]
                    out = guided(latents[i], t, both)
                    mean, std = gaussian(scheduler, t, latents[i], out)
                    new = gaussian_log_density(latents[i + 1], mean, std) / latents[i][0].numel()
                    per_sample, _ = clipped_surrogate(new - old[:, i], adv, m.clip_range)
                    loss = loss + per_sample.mean()
                (loss / (steps - 1) / len(trajectories)).backward()
        torch.nn.utils.clip_grad_norm_(trainer.params, 1.0)
        trainer.optimizer.step()
        trainer.optimizer.zero_grad(set_to_none=True)

    return step


def run_job(job: dict[str, Any]) -> dict[str, Any]:
    from align.core.models import DiffusionModel
    from bench.models import bench_pipeline

    torch.manual_seed(0)
    device = job["device"]
    resident_start = PeakMemory(device).resident()
    model = DiffusionModel(bench_pipeline(job["model"], seed=0, device=device))
    with tempfile.TemporaryDirectory() as workdir:
        trainer = _trainer(job, model, workdir)
        result: dict[str, Any] = {"resident_model_mb": (PeakMemory(device).resident() - resident_start) / MIB,
                                  "micro_steps": trainer.objective.micro_steps(0)}
        if job["variant"] == "ours":
            ours, splits = _split(trainer)
            lower = _lower_bound_step(trainer)
            malloc_mode("measure")
            ours(), lower()  # warm-up
            memory = measure_step(ours, device, timed_steps=0, warmup_steps=0)
            result.update(peak_mb=memory["peak_mb"], resident_mb=memory["resident_mb"], memory_method=memory["memory_method"])
            if job["timed_steps"]:
                malloc_mode("fast")
                ours(), lower()
                splits.clear()
                lower_times = []
                for _ in range(job["timed_steps"]):
                    ours()
                    lower_times.append(time_step(lower, device))
                result["split"] = {k: statistics.median(s[k] for s in splits) for k in splits[0]}
                result["step_time_s"] = result["split"]["step_s"]
                result["lower_bound_s"] = statistics.median(lower_times)
        else:
            step = _naive_step(trainer)
            measured = measure_step(step, device, timed_steps=job["timed_steps"])
            result.update(peak_mb=measured["peak_mb"], resident_mb=measured["resident_mb"],
                          memory_method=measured["memory_method"], step_time_s=measured["step_time_s"])
    return result


# ---------------------------------------------------------------------------------------------
# parent side
# ---------------------------------------------------------------------------------------------
def _jobs(args) -> list[dict[str, Any]]:
    jobs = []
    for steps in args.steps:
        base = {"model": args.model, "device": args.device, "num_steps": steps, "batch_size": args.batch_size,
                "group_size": args.group_size, "prompts": args.prompts, "mixed_precision": args.mixed_precision,
                "resolution": args.resolution, "threads": args.threads, "gradient_checkpointing": False,
                "training": "lora", "truncation_steps": steps - 1, "reward_latency": args.reward_latency,
                "sequential": args.sequential}
        timed = args.timed_steps if steps in args.timed_at else 0
        for variant in ("ours", "naive"):
            if variant in args.variants and (variant == "ours" or not args.naive_at or steps in args.naive_at):
                jobs.append({**base, "variant": variant, "timed_steps": timed})
    return jobs


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="cpu-sd", choices=("cpu-sd", "sd15", "sdxl"))
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--resolution", type=int, default=None, help="image side in pixels (default: the model's)")
    parser.add_argument("--batch-size", type=int, default=2, help="samples per micro-step and rollout chunk")
    parser.add_argument("--group-size", type=int, default=2)
    parser.add_argument("--prompts", type=int, default=2, help="groups per rollout")
    parser.add_argument("--mixed-precision", default="no", choices=("no", "fp16", "bf16"))
    parser.add_argument("--steps", type=int, nargs="+", default=[5, 10, 20], help="sampling steps T")
    parser.add_argument("--variants", nargs="+", default=["ours", "naive"], choices=("ours", "naive"))
    parser.add_argument("--naive-at", type=int, nargs="*", default=[], help="T values for the naive rows (empty: all)")
    parser.add_argument("--timed-steps", type=int, default=2)
    parser.add_argument("--timed-at", type=int, nargs="*", default=[5, 10, 20])
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--max-load", type=float, default=1.2)
    parser.add_argument("--max-wait", type=float, default=600.0)
    parser.add_argument("--reward-latency", type=float, default=0.0, help="extra seconds per reward call (a remote judge)")
    parser.add_argument("--sequential", action="store_true", help="score on the main thread (overlap_reward=false)")
    parser.add_argument("--out", required=True)
    parser.add_argument("--resume", action="store_true")
    args = parser.parse_args(argv)
    if (args.group_size * args.prompts) % args.batch_size:
        parser.error("--batch-size must divide --group-size x --prompts")

    jobs = _jobs(args)
    payload = new_payload("policy_gradient", __file__, argv, args.device, args.threads)
    done: set = set()
    if args.resume:
        payload, done = resume_payload(args.out, payload)
        jobs = [j for j in jobs if row_key(j) not in done]
    payload["settings"] = {"method": "grpo", "guidance_scale": GUIDANCE, "lora_rank": LORA_RANK, "prompts": PROMPTS,
                           "reward": "jpeg_compressibility (worker thread)", "sampler": "ddim eta=1, last step eta=0",
                           "optimizer": "AdamW, grad clip 1.0"}  # the rollout size is in each row
    for n, job in enumerate(jobs, 1):
        load_before = wait_for_quiet(args.device, args.max_load, args.max_wait) if job["timed_steps"] else load_average()[0]
        started = time.time()
        row = {**job, **run_worker(__file__, job), "load_before": load_before, "load_after": load_average()[0],
               "wall_s": time.time() - started}
        payload["rows"].append(row)
        write_results(args.out, payload)
        print(_describe(n, len(jobs), row), flush=True)
    return 0


def _describe(n: int, total: int, row: dict[str, Any]) -> str:
    head = f"[{n}/{total}] {row['variant']:<6} T={row['num_steps']:<3} latency {row.get('reward_latency', 0)}s"
    head += " sequential" if row.get("sequential") else ""
    if "error" in row:
        return f"{head} ERROR {row['error']} {row.get('log', '')}"
    text = f"{head} peak {row['peak_mb']:8.1f} MB"
    if row.get("step_time_s"):
        text += f" step {row['step_time_s']:.2f}s"
    if row.get("split"):
        s = row["split"]
        text += (f" (rollout {s['rollout_s']:.2f}s, reward wait {s['reward_wait_s']:.2f}s, training {s['train_s']:.2f}s;"
                 f" lower bound {row['lower_bound_s']:.2f}s)")
    return text + f" load {row['load_before']:.2f}"


if __name__ == "__main__":
    if not worker_main(run_job):
        sys.exit(main())
