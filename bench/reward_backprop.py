"""Reward backpropagation: peak memory and time per optimiser step, side by side.

One optimiser step as the trainer takes it (prompt encoding, :func:`align.train.backprop.sample_with_grad`
with DDIM, checkpointed decode, a differentiable reward, backward, gradient clipping, AdamW) for
each truncation K and chain length T, with and without gradient checkpointing, LoRA and full
fine-tuning, next to:

* ``naive``: a plain diffusers loop (its own DDIM ``scheduler.step``), autograd through the last K
  steps, no checkpointing anywhere;
* ``lower_bound``: T grad-free (CFG-batched) denoiser forwards + K forward+backward passes of the
  same call + the decode forward+backward + the reward + the optimiser step, i.e. the compute a
  checkpointed step cannot avoid.  It runs in the same worker as the checkpointed step, the two
  alternating, so that both see the same machine load;
* TRL's AlignProp trainer: see ``bench/trl_alignprop.py`` (its own virtual environment).

Each configuration runs in a fresh worker process (see bench/common.py for how memory is
measured on CPU and CUDA).  Every row also carries the memory planner's prediction
(:mod:`align.train.plan`) for the same settings.

Examples::

    python bench/reward_backprop.py --out bench/results/reward_backprop_cpu.json
    python bench/reward_backprop.py --device cuda --model sd15 --out bench/results/reward_backprop_sd15.json
    python bench/reward_backprop.py --device cuda --model sdxl --out bench/results/reward_backprop_sdxl.json
"""

from __future__ import annotations

import argparse
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
    load_average,
    malloc_mode,
    measure_step,
    new_payload,
    resume_payload,
    row_key,
    run_worker,
    time_step,
    truncation_grid,
    wait_for_quiet,
    worker_main,
    write_results,
)

PROMPTS = ["a red circle", "a blue square", "a photo of a cat", "a green triangle"]
GUIDANCE = 7.5
LORA_RANK = 4  # AlignProp's (and TRL's) rank, so that the TRL rows train the same adapter
VARIANTS = ("ours", "naive", "lower_bound")


# ---------------------------------------------------------------------------------------------
# worker side
# ---------------------------------------------------------------------------------------------
def build_trainer(job: dict[str, Any], model, workdir: str, checkpointing: bool):
    """The trainer of a bench row: DRaFT-K with the row's T, K, batch, training, precision and resolution
    (``upcast_vae`` optional, default off), brightness reward, set up and ready for ``train_step``."""
    from align.core.config import from_dict
    from align.train.trainer import TrainConfig, Trainer

    cfg = from_dict(
        TrainConfig,
        {
            "method": "draft",
            "draft": {
                "num_steps": job["num_steps"], "truncation_steps": job["truncation_steps"],
                "guidance_scale": GUIDANCE, "learning_rate": 1e-4,
            },
            "output_dir": workdir,
            "batch_size": job["batch_size"],
            "prompts": PROMPTS,
            "reward": "brightness",
            "lora": {"rank": LORA_RANK, "enabled": job["training"] == "lora"},
            "gradient_checkpointing": checkpointing,
            "mixed_precision": job["mixed_precision"],
            "device": job["device"],
            "checkpoint_every": 0,
            "sample_every": 0,
            "max_steps": 1_000_000,
            "height": job.get("resolution"),
            "width": job.get("resolution"),
            "upcast_vae": job.get("upcast_vae", False),
        },
    )
    trainer = Trainer(cfg, model=model, progress=False)
    trainer.setup()
    return trainer


def _encode(trainer):
    prompts = [PROMPTS[i % len(PROMPTS)] for i in range(trainer.config.batch_size)]
    with torch.no_grad():
        pc = trainer.model.encode_prompts(prompts, guidance=True, height=trainer.height, width=trainer.width)
    return prompts, pc


def _optimizer_step(trainer) -> None:
    torch.nn.utils.clip_grad_norm_(trainer.params, 1.0)
    trainer.optimizer.step()
    trainer.optimizer.zero_grad(set_to_none=True)


def _naive_step(trainer):
    """A plain diffusers DRaFT-K loop: no checkpointing, diffusers' own DDIM step."""
    from diffusers import DDIMScheduler

    from align.core.denoisers import cat_conditioning

    model = trainer.model
    vae = model.pipe.vae
    scheduler = DDIMScheduler.from_config(model.pipe.scheduler.config)
    steps, k = trainer.method.num_steps, trainer.method.truncation_steps
    generator = torch.Generator().manual_seed(0)

    def step():
        prompts, pc = _encode(trainer)
        both = cat_conditioning(pc.uncond, pc.cond)
        scheduler.set_timesteps(steps, device=model.device)
        shape = model.latent_shape(len(prompts), trainer.height, trainer.width)
        latents = torch.randn(shape, generator=generator).to(model.device, model.dtype) * scheduler.init_noise_sigma
        with trainer.accelerator.autocast():
            for i, t in enumerate(scheduler.timesteps):
                with torch.set_grad_enabled(i >= steps - k):
                    out = model.denoiser(torch.cat([latents, latents]), t.expand(2 * len(prompts)), both)
                    uncond, cond = out.chunk(2)
                    latents = scheduler.step(uncond + GUIDANCE * (cond - uncond), t, latents).prev_sample
            images = (vae.decode(latents.to(vae.dtype) / vae.config.scaling_factor).sample.float() / 2 + 0.5).clamp(0, 1)
        loss = -trainer.reward(images, prompts).mean()
        loss.backward()
        _optimizer_step(trainer)

    return step


def _lower_bound_step(trainer):
    """T grad-free calls + K forward+backward calls + decode forward+backward + reward + optimiser step."""
    from align.core.denoisers import cat_conditioning

    model = trainer.model
    vae = model.pipe.vae
    steps, k = trainer.method.num_steps, trainer.method.truncation_steps
    schedule = trainer.schedule
    generator = torch.Generator().manual_seed(0)

    def step():
        prompts, pc = _encode(trainer)
        both = cat_conditioning(pc.uncond, pc.cond)
        shape = model.latent_shape(len(prompts), trainer.height, trainer.width)
        x = torch.randn(shape, generator=generator).to(model.device, model.dtype)
        x2 = torch.cat([x, x])
        with trainer.accelerator.autocast():
            with torch.no_grad():
                for i in range(steps):
                    model.denoiser(x2, schedule.model_timestep(i, x2.shape[0], model.device), both)
            for i in range(steps - k, steps):
                x_in = x2.detach().requires_grad_(True)
                out = model.denoiser(x_in, schedule.model_timestep(i, x2.shape[0], model.device), both)
                out.backward(torch.ones_like(out))
                del out, x_in
            z = x.detach().requires_grad_(True)
            images = (vae.decode(z.to(vae.dtype) / vae.config.scaling_factor).sample.float() / 2 + 0.5).clamp(0, 1)
        (-trainer.reward(images, prompts).mean()).backward()
        _optimizer_step(trainer)

    return step


def run_job(job: dict[str, Any]) -> dict[str, Any]:
    from align.core.models import DiffusionModel
    from bench.models import bench_pipeline

    torch.manual_seed(0)
    device = job["device"]
    resident_start = _resident_mb(device)
    pipe = bench_pipeline(job["model"], seed=0, device=device)
    model = DiffusionModel(pipe)
    checkpointing = job["variant"] == "ours" and job["gradient_checkpointing"]
    with tempfile.TemporaryDirectory() as workdir:
        trainer = build_trainer(job, model, workdir, checkpointing)
        result: dict[str, Any] = {"resident_model_mb": _resident_mb(device) - resident_start}
        if job["variant"] == "ours" and job.get("with_lower_bound"):
            # alternate the two so that both see the same machine load
            lower = _lower_bound_step(trainer)
            ours = trainer.train_step
            malloc_mode("measure")
            lower(), ours()  # warm-up
            mem_lower = measure_step(lower, device, timed_steps=0, warmup_steps=0)
            mem_ours = measure_step(ours, device, timed_steps=0, warmup_steps=0)
            ours_times, lower_times = [], []
            if job["timed_steps"]:
                malloc_mode("fast")
                lower(), ours()  # warm-up under the timing allocation policy
            for _ in range(job["timed_steps"]):
                ours_times.append(time_step(ours, device))
                lower_times.append(time_step(lower, device))
            result.update(_summary(mem_ours, ours_times))
            result["lower_bound"] = _summary(mem_lower, lower_times)
        else:
            step = trainer.train_step if job["variant"] == "ours" else _naive_step(trainer)
            measured = measure_step(step, device, timed_steps=job["timed_steps"])
            result.update(_summary(measured, measured["step_times_s"]))
    return result


def _summary(memory: dict[str, Any], times: list[float]) -> dict[str, Any]:
    import statistics

    return {
        "peak_mb": memory["peak_mb"],
        "resident_mb": memory["resident_mb"],
        "memory_method": memory["memory_method"],
        "step_time_s": statistics.median(times) if times else None,
        "step_times_s": times,
    }


def _resident_mb(device: str) -> float:
    from bench.common import PeakMemory

    return PeakMemory(device).resident() / MIB


# ---------------------------------------------------------------------------------------------
# parent side
# ---------------------------------------------------------------------------------------------
def _jobs(args) -> list[dict[str, Any]]:
    jobs = []
    for training in args.training:
        grid = truncation_grid(args.steps if training == "lora" else (args.full_ft_steps or args.steps), args.truncation)
        for steps, k in grid:
            base = {
                "model": args.model, "device": args.device, "num_steps": steps, "truncation_steps": k,
                "training": training, "batch_size": args.batch_size, "mixed_precision": args.mixed_precision,
                "resolution": args.resolution, "threads": args.threads,
            }
            timed = args.timed_steps if steps in args.timed_at else 0
            if "ours" in args.variants:
                jobs.append({**base, "variant": "ours", "gradient_checkpointing": True, "timed_steps": timed,
                             "with_lower_bound": "lower_bound" in args.variants})
                if not args.plain_at or steps in args.plain_at:
                    jobs.append({**base, "variant": "ours", "gradient_checkpointing": False, "timed_steps": timed})
            if "naive" in args.variants and (not args.naive_at or steps in args.naive_at):
                jobs.append({**base, "variant": "naive", "gradient_checkpointing": False, "timed_steps": timed})
    return jobs


class Predictor:
    """Planner predictions for the bench rows of ``model``, one traced planner per (training, checkpointing)."""

    def __init__(self, model: str):
        from align.train.plan import ModelSpec
        from bench.models import bench_pipeline

        self.model = model
        self.spec = ModelSpec.from_pipeline(bench_pipeline(model, device="meta" if model != "cpu-sd" else "cpu"))
        self.planners: dict[tuple[str, bool], Any] = {}

    def __call__(self, job: dict[str, Any]) -> dict[str, float]:
        from align.train.plan import MemoryPlanner, PlanConfig

        ckpt = job["variant"] == "ours" and job["gradient_checkpointing"]
        key = (job["training"], ckpt)
        if key not in self.planners:
            config = PlanConfig(
                model=self.model, method="draft", num_steps=50, truncation_steps=1, batch_size=job["batch_size"],
                resolution=job["resolution"], guidance=True, lora=job["training"] == "lora", lora_rank=LORA_RANK,
                gradient_checkpointing=ckpt, mixed_precision=job["mixed_precision"],
                device="cuda" if job["device"].startswith("cuda") else "cpu",
            )
            self.planners[key] = MemoryPlanner(config, self.spec)
        planner = self.planners[key]
        phases = planner.phases(job["batch_size"], job["truncation_steps"], job["num_steps"])
        peak = max(phases, key=phases.get)
        return {"predicted_peak_mb": phases[peak] / MIB, "predicted_phase": peak,
                "predicted_resident_mb": (sum(planner.weights.values()) + planner.optimizer_state) / MIB,
                "predicted_total_mb": planner.total(job["batch_size"], job["truncation_steps"], job["num_steps"]) / MIB}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="cpu-sd", choices=("cpu-sd", "sd15", "sdxl"))
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--resolution", type=int, default=None, help="image side in pixels (default: the model's)")
    parser.add_argument("--batch-size", type=int, default=1)
    parser.add_argument("--mixed-precision", default="no", choices=("no", "fp16", "bf16"))
    parser.add_argument("--steps", type=int, nargs="+", default=[10, 25, 50], help="chain lengths T")
    parser.add_argument("--truncation", nargs="+", default=["1", "4", "16", "all"], help="K values ('all' = T)")
    parser.add_argument("--training", nargs="+", default=["lora", "full"], choices=("lora", "full"))
    parser.add_argument("--full-ft-steps", type=int, nargs="*", default=[50], help="T values for full fine-tuning rows")
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=VARIANTS)
    parser.add_argument("--naive-at", type=int, nargs="*", default=[50], help="T values for the naive rows (empty: all)")
    parser.add_argument("--plain-at", type=int, nargs="*", default=[], help="T values for our rows without checkpointing (empty: all)")
    parser.add_argument("--timed-steps", type=int, default=3, help="timed steps per row after warm-up and the memory step")
    parser.add_argument("--timed-at", type=int, nargs="*", default=[10, 25, 50], help="T values whose rows are timed")
    parser.add_argument("--threads", type=int, default=1, help="torch threads per worker")
    parser.add_argument("--max-load", type=float, default=1.2, help="wait for the 1-min load average to fall below this before a timed row")
    parser.add_argument("--max-wait", type=float, default=600.0, help="longest wait for a quiet machine, in seconds")
    parser.add_argument("--only", type=int, default=None, help="run only the first N jobs (smoke test)")
    parser.add_argument("--out", required=True, help="JSON file to write")
    parser.add_argument("--resume", action="store_true", help="keep the rows already in --out and run only the missing ones")
    parser.add_argument("--repredict", action="store_true", help="recompute the planner's predictions in --out and exit")
    args = parser.parse_args(argv)
    if args.repredict:
        return _repredict(args.out)

    jobs = _jobs(args)[: args.only]
    predict = Predictor(args.model)
    payload = new_payload("reward_backprop", __file__, argv, args.device, args.threads)
    done: set = set()
    if args.resume:
        payload, done = resume_payload(args.out, payload)
        jobs = [j for j in jobs if row_key(j) not in done]
    payload["settings"] = {"guidance_scale": GUIDANCE, "lora_rank": LORA_RANK, "prompts": PROMPTS, "reward": "brightness",
                           "sampler": "ddim eta=0", "optimizer": "AdamW, grad clip 1.0"}
    capacity = _device_memory_mb(args.device)
    for n, job in enumerate(jobs, 1):
        prediction = predict(job)
        if capacity is not None and prediction["predicted_total_mb"] > capacity:
            row = {**job, **prediction, "skipped": f"predicted {prediction['predicted_total_mb']:,.0f} MB > "
                                                   f"{capacity:,.0f} MB of device memory"}
        else:
            load_before = wait_for_quiet(args.device, args.max_load, args.max_wait) if job["timed_steps"] else load_average()[0]
            started = time.time()
            result = run_worker(__file__, job)
            row = {**job, **result, **prediction, "load_before": load_before, "load_after": load_average()[0],
                   "wall_s": time.time() - started}
        payload["rows"].append(row)
        write_results(args.out, payload)
        print(_describe(n, len(jobs), row), flush=True)
    return 0


def _device_memory_mb(device: str) -> float | None:
    """Total memory of a CUDA device (rows predicted not to fit are skipped rather than run out of memory)."""
    if torch.device(device).type != "cuda":
        return None
    return torch.cuda.get_device_properties(device).total_memory / MIB


def _repredict(path: str) -> int:
    """Refresh the planner predictions of an existing result file (after a planner change)."""
    import json

    payload = json.loads(Path(path).read_text())
    predictors: dict[str, Predictor] = {}
    for row in payload["rows"]:
        if row["model"] not in predictors:
            predictors[row["model"]] = Predictor(row["model"])
        row.update(predictors[row["model"]](row))
    write_results(path, payload)
    print(f"updated the predictions of {len(payload['rows'])} rows in {path}")
    return 0


def _describe(n: int, total: int, row: dict[str, Any]) -> str:
    name = f"{row['variant']}{'' if row['variant'] != 'ours' else ('+ckpt' if row['gradient_checkpointing'] else ' no-ckpt')}"
    head = f"[{n}/{total}] {name:<14} {row['training']:<4} T={row['num_steps']:<3} K={row['truncation_steps']:<3}"
    if "skipped" in row:
        return f"{head} skipped: {row['skipped']}"
    if "error" in row:
        return f"{head} ERROR {row['error']} {row.get('log', '')}"
    time_s = f"{row['step_time_s']:.2f}s" if row.get("step_time_s") else "-"
    text = f"{head} peak {row['peak_mb']:8.1f} MB (plan {row['predicted_peak_mb']:8.1f}) time {time_s}"
    if "lower_bound" in row and row["lower_bound"].get("step_time_s"):
        text += f" lower bound {row['lower_bound']['step_time_s']:.2f}s"
    return text + f" load {row['load_before']:.2f}"


if __name__ == "__main__":
    if not worker_main(run_job):
        sys.exit(main())
