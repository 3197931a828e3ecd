"""Baseline (c): the last released AlignProp trainer of TRL (versions before 0.24), same model.

TRL runs in its own virtual environment (it is not a dependency of this package, and its code is
not copied here); this script only imports it there.  Set it up once::

    python3 -m venv /work/trl-venv
    /work/trl-venv/bin/pip install torch==2.13.0 "trl<0.24" diffusers transformers peft accelerate

The parent process (any environment with this package) saves the benchmark pipeline as a
diffusers folder, because TRL's ``DefaultDDPOStableDiffusionPipeline`` loads from a path, and
runs each configuration in a fresh worker under TRL's interpreter.  TRL's settings mirror the
rows of bench/reward_backprop.py: DDIM with eta 0, CFG 7.5, fixed truncation (gradients on the
last K of T steps: ``truncated_backprop_rand=False, truncated_backprop_timestep=T-K``), LoRA rank
4 on to_q/to_k/to_v/to_out.0 (TRL's fixed adapter) or full fine-tuning, AdamW, clipping 1.0,
float32, and the same brightness reward (mean luma).  TRL checkpoints every UNet call but not the
VAE decode.  Without that interpreter the rows say "not installed".

Example::

    python bench/trl_alignprop.py --out bench/results/trl_alignprop_cpu.json
"""

from __future__ import annotations

import argparse
import os
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
    load_average,
    measure_step,
    new_payload,
    resume_payload,
    row_key,
    run_worker,
    truncation_grid,
    wait_for_quiet,
    worker_main,
    write_results,
)

DEFAULT_PYTHON = "/work/trl-venv/bin/python"
PROMPTS = ["a red circle", "a blue square", "a photo of a cat", "a green triangle"]
LUMA = (0.299, 0.587, 0.114)


def run_job(job: dict[str, Any]) -> dict[str, Any]:
    """Worker (TRL's interpreter): one configuration."""
    import warnings

    import trl
    from accelerate import PartialState
    from trl import AlignPropConfig, AlignPropTrainer, DefaultDDPOStableDiffusionPipeline

    warnings.filterwarnings("ignore", category=DeprecationWarning)
    # TRL logs through accelerate's logger, which refuses to log before accelerate's state exists
    PartialState()
    torch.manual_seed(0)
    steps, k = job["num_steps"], job["truncation_steps"]
    pipeline = DefaultDDPOStableDiffusionPipeline(job["pipeline_dir"], use_lora=job["training"] == "lora")
    counter = iter(range(10**9))

    def prompt_fn():
        return PROMPTS[next(counter) % len(PROMPTS)], {}

    def reward_fn(images, prompts, metadata):
        luma = images.new_tensor(LUMA).view(1, 3, 1, 1)
        return (images * luma).sum(1).mean((1, 2)), {}

    with tempfile.TemporaryDirectory() as workdir:
        config = AlignPropConfig(
            num_epochs=1, sample_num_steps=steps, sample_eta=0.0, sample_guidance_scale=7.5,
            train_batch_size=job["batch_size"], train_learning_rate=1e-4, train_max_grad_norm=1.0,
            mixed_precision="no" if job["mixed_precision"] == "no" else job["mixed_precision"],
            truncated_backprop_rand=False, truncated_backprop_timestep=steps - k,
            log_with=None, project_kwargs={"project_dir": workdir, "logging_dir": workdir}, logdir=workdir,
        )
        trainer = AlignPropTrainer(config, reward_fn, prompt_fn, pipeline)
        trained = [p for p in pipeline.unet.parameters() if p.requires_grad]
        before = [p.detach().clone() for p in trained]

        def step():
            trainer.step(0, 0)  # epoch 0: TRL saves no checkpoint

        measured = measure_step(step, job["device"], timed_steps=job["timed_steps"])
        # evidence that TRL really trained: its trainable weights moved
        moved = sum(float((p.detach() - b).abs().sum()) for p, b in zip(trained, before))
    return {**measured, "trl_version": trl.__version__, "trained_parameters": sum(p.numel() for p in trained),
            "weight_change_l1": moved}


def _jobs(args, pipeline_dir: str) -> list[dict[str, Any]]:
    jobs = []
    for training in args.training:
        for steps, k in truncation_grid(args.steps if training == "lora" else (args.full_ft_steps or args.steps), args.truncation):
            jobs.append({
                "variant": "trl_alignprop", "model": args.model, "device": args.device, "num_steps": steps,
                "truncation_steps": k, "training": training, "batch_size": args.batch_size,
                "mixed_precision": args.mixed_precision, "threads": args.threads, "pipeline_dir": pipeline_dir,
                "timed_steps": args.timed_steps if steps in args.timed_at else 0,
            })
    return jobs


def main(argv: list[str] | None = None) -> int:
    from bench.models import save_bench_pipeline

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--python", default=os.environ.get("TRL_PYTHON", DEFAULT_PYTHON), help="TRL's interpreter")
    parser.add_argument("--model", default="cpu-sd", choices=("cpu-sd", "sd15"))
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--batch-size", type=int, default=1)
    parser.add_argument("--mixed-precision", default="no", choices=("no", "fp16", "bf16"))
    parser.add_argument("--steps", type=int, nargs="+", default=[10, 25, 50])
    parser.add_argument("--truncation", nargs="+", default=["1", "4", "16", "all"])
    parser.add_argument("--training", nargs="+", default=["lora", "full"], choices=("lora", "full"))
    parser.add_argument("--full-ft-steps", type=int, nargs="*", default=[50])
    parser.add_argument("--timed-steps", type=int, default=3)
    parser.add_argument("--timed-at", type=int, nargs="*", default=[10, 25, 50])
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--max-load", type=float, default=1.2)
    parser.add_argument("--max-wait", type=float, default=600.0)
    parser.add_argument("--only", type=int, default=None)
    parser.add_argument("--out", required=True)
    parser.add_argument("--resume", action="store_true", help="keep the rows already in --out and run only the missing ones")
    args = parser.parse_args(argv)

    payload = new_payload("trl_alignprop", __file__, argv, args.device, args.threads)
    done: set = set()
    if args.resume:
        payload, done = resume_payload(args.out, payload)
    payload["trl_python"] = args.python
    if not Path(args.python).exists():
        payload["status"] = f"not installed: {args.python} does not exist"
        write_results(args.out, payload)
        print(payload["status"])
        return 0
    with tempfile.TemporaryDirectory() as tmp:
        pipeline_dir = str(save_bench_pipeline(args.model, Path(tmp) / args.model))
        jobs = [j for j in _jobs(args, pipeline_dir) if row_key(j) not in done][: args.only]
        for n, job in enumerate(jobs, 1):
            load_before = wait_for_quiet(args.device, args.max_load, args.max_wait) if job["timed_steps"] else load_average()[0]
            started = time.time()
            result = run_worker(__file__, job, python=args.python)
            row = {**{k: v for k, v in job.items() if k != "pipeline_dir"}, **result, "load_before": load_before,
                   "load_after": load_average()[0], "wall_s": time.time() - started}
            payload["rows"].append(row)
            payload["status"] = "ran" if any("error" not in r for r in payload["rows"]) else "failed"
            write_results(args.out, payload)
            if "error" in row:
                print(f"[{n}/{len(jobs)}] {job['training']} T={job['num_steps']} K={job['truncation_steps']} ERROR "
                      f"{row['error']}: {' | '.join(row.get('log', []))}", flush=True)
            else:
                t = f"{row['step_time_s']:.2f}s" if row.get("step_time_s") else "-"
                print(f"[{n}/{len(jobs)}] trl {job['training']} T={job['num_steps']} K={job['truncation_steps']} "
                      f"peak {row['peak_mb']:.1f} MB time {t}", flush=True)
    return 0


if __name__ == "__main__":
    if not worker_main(run_job):
        sys.exit(main())
