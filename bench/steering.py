"""Inference-time steering: overheads of FK steering and RL guidance, and chunked decoding memory.

Three measurements on the benchmark model (bench/models.py), each in a fresh worker process:

* ``fk``: wall time of :func:`align.steer.fk.fk_sample` over plain batched sampling of the same
  particles (:func:`align.steer.guidance.best_of_n`, which is FK with lambda = 0 minus the potentials)
  at equal steps, with the reward cost excluded: the decoder and the reward are wrapped in timers
  and their time is subtracted from both runs.  The two alternate, so that both see the same
  machine load.  Target: at most 1.05x.
* ``rlg``: one RL-guidance step (:func:`align.steer.rlg.rlg_prediction` with a :class:`~align.steer.rlg.LoRAPair`:
  base and aligned model = the LoRA adapter off / on, each with CFG, rows [u_b, c_b, u_a, c_a])
  against one batched forward of the same rows through the network.  Target: at most 1.05x.
  The two-forward fallback (``batched=False``) is measured beside them.
* ``memory``: peak memory of a whole FK run as the number of particles grows, with decoding,
  scoring and denoiser calls chunked (``chunk_size = model_chunk_size = 4``) and not chunked.

Example::

    python bench/steering.py --out bench/results/steering_cpu.json
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import torch

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from bench.common import (  # noqa: E402
    PeakMemory,
    load_average,
    malloc_mode,
    new_payload,
    run_worker,
    synchronize,
    worker_main,
    write_results,
)

PROMPT = "a red circle"
GUIDANCE = 7.5


class _Timed:
    """Wraps a callable and accumulates its wall time (to exclude decode + reward cost)."""

    def __init__(self, fn, device):
        self.fn, self.device, self.seconds = fn, device, 0.0

    def __call__(self, *args):
        synchronize(self.device)
        start = time.perf_counter()
        out = self.fn(*args)
        synchronize(self.device)
        self.seconds += time.perf_counter() - start
        return out


def _model(job):
    from align.core.models import DiffusionModel
    from bench.models import bench_pipeline

    torch.manual_seed(0)
    return DiffusionModel(bench_pipeline(job["model"], seed=0, device=job["device"]))


def _inputs(model, job, decode, reward):
    h, w = model.default_resolution()
    pc = model.encode_prompts([PROMPT], guidance=True)
    return {
        "sample_shape": model.latent_shape(1, h, w)[1:], "cond": pc.cond, "uncond": pc.uncond,
        "guidance_scale": GUIDANCE, "prompts": [PROMPT], "decode_fn": decode, "device": model.device,
    }


def _fk_job(job: dict[str, Any]) -> dict[str, Any]:
    from align.steer.fk import FKConfig, fk_sample
    from align.steer.guidance import BestOfNConfig, best_of_n
    from rewards import build_reward

    model = _model(job)
    device = job["device"]
    steps, k = job["num_steps"], job["particles"]
    reward = build_reward("brightness").to(device)
    schedule = model.schedule(steps, eta=1.0)
    start, interval = max(1, steps // 5), max(1, steps // 5)
    fk_config = FKConfig(num_particles=k, lambda_=10.0, resample_start=start, resample_end=steps - start,
                         resample_interval=interval, seed=0)
    plain_config = BestOfNConfig(num_samples=k, seed=0)
    fk_times, plain_times, counts = [], [], {}
    malloc_mode("fast")
    with torch.no_grad():
        for repeat in range(job["repeats"] + 1):  # the first round warms up
            for name in ("fk", "plain"):
                decode, score = _Timed(model.decode, device), _Timed(reward, device)
                inputs = _inputs(model, job, decode, score)
                synchronize(device)
                began = time.perf_counter()
                if name == "fk":
                    result = fk_sample(model.denoiser, schedule, score, fk_config, **inputs)
                else:
                    result = best_of_n(model.denoiser, schedule, score, plain_config, **inputs)
                synchronize(device)
                total = time.perf_counter() - began
                excluded = decode.seconds + score.seconds
                if repeat:
                    (fk_times if name == "fk" else plain_times).append({"total_s": total, "decode_reward_s": excluded})
                counts[name] = result.counts.to_dict()
    fk_net = statistics.median(t["total_s"] - t["decode_reward_s"] for t in fk_times)
    plain_net = statistics.median(t["total_s"] - t["decode_reward_s"] for t in plain_times)
    return {"fk_runs": fk_times, "plain_runs": plain_times, "fk_net_s": fk_net, "plain_net_s": plain_net,
            "ratio": fk_net / plain_net, "counts": counts,
            "fk_config": {"lambda": 10.0, "resample_steps": fk_config.potential_steps(steps), "potential": "max"}}


def _rlg_job(job: dict[str, Any]) -> dict[str, Any]:
    from align.core.denoisers import cat_conditioning
    from align.core.lora import LoRAConfig, add_lora
    from align.steer.rlg import LoRAPair, rlg_prediction

    model = _model(job)
    device = job["device"]
    add_lora(model, LoRAConfig(rank=4))
    b = job["samples"]
    h, w = model.default_resolution()
    pc = model.encode_prompts([PROMPT] * b, guidance=True)
    x = torch.randn(model.latent_shape(b, h, w), generator=torch.Generator().manual_seed(0)).to(device)
    t = model.schedule(50).model_timestep(25, b, device)
    rows = cat_conditioning(pc.uncond, pc.cond, pc.uncond, pc.cond)
    batched, unbatched = LoRAPair(model.denoiser), LoRAPair(model.denoiser, batched=False)
    calls = {
        "one_forward": lambda: model.denoiser(torch.cat([x] * 4), torch.cat([t] * 4), rows),
        "rlg_batched": lambda: rlg_prediction(batched, x, t, 2.0, pc.cond, pc.uncond, GUIDANCE),
        "rlg_two_forwards": lambda: rlg_prediction(unbatched, x, t, 2.0, pc.cond, pc.uncond, GUIDANCE),
    }
    times: dict[str, list[float]] = {name: [] for name in calls}
    malloc_mode("fast")
    with torch.no_grad():
        for repeat in range(job["repeats"] + 1):
            for name, call in calls.items():
                synchronize(device)
                began = time.perf_counter()
                call()
                synchronize(device)
                if repeat:
                    times[name].append(time.perf_counter() - began)
    median = {name: statistics.median(v) for name, v in times.items()}
    return {"times_s": times, "median_s": median, "ratio": median["rlg_batched"] / median["one_forward"],
            "ratio_two_forwards": median["rlg_two_forwards"] / median["one_forward"]}


def _memory_job(job: dict[str, Any]) -> dict[str, Any]:
    from align.steer.fk import FKConfig, fk_sample
    from rewards import build_reward

    model = _model(job)
    device = job["device"]
    reward = build_reward("brightness").to(device)
    steps = job["num_steps"]
    schedule = model.schedule(steps, eta=1.0)
    chunk = job["chunk"]
    config = FKConfig(num_particles=job["particles"], lambda_=10.0, resample_start=1, resample_end=steps - 1,
                      resample_interval=2, chunk_size=chunk, model_chunk_size=chunk, seed=0)
    inputs = _inputs(model, job, model.decode, reward)
    meter = PeakMemory(device)
    malloc_mode("measure")
    with torch.no_grad():
        fk_sample(model.denoiser, schedule, reward, FKConfig(**{**vars(config), "num_particles": 1}), **inputs)  # warm-up
        meter.start()
        result = fk_sample(model.denoiser, schedule, reward, config, **inputs)
        peak = meter.stop()
    return {"peak_mb": peak / 2**20, "counts": result.counts.to_dict(), "memory_method": meter.method}


JOBS = {"fk": _fk_job, "rlg": _rlg_job, "memory": _memory_job}


def run_job(job: dict[str, Any]) -> dict[str, Any]:
    return JOBS[job["kind"]](job)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="cpu-sd", choices=("cpu-sd", "sd15", "sdxl"))
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--steps", type=int, default=20, help="sampler steps of the FK / plain runs")
    parser.add_argument("--particles", type=int, nargs="+", default=[4], help="particles per prompt for the FK timing")
    parser.add_argument("--memory-particles", type=int, nargs="+", default=[4, 8, 16, 32])
    parser.add_argument("--memory-steps", type=int, default=4)
    parser.add_argument("--rlg-samples", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--kinds", nargs="+", default=list(JOBS), choices=list(JOBS))
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", required=True)
    args = parser.parse_args(argv)

    base = {"model": args.model, "device": args.device, "threads": args.threads}
    jobs = []
    if "rlg" in args.kinds:
        jobs.append({**base, "kind": "rlg", "samples": args.rlg_samples, "repeats": max(args.repeats, 5)})
    if "fk" in args.kinds:
        jobs += [{**base, "kind": "fk", "num_steps": args.steps, "particles": k, "repeats": args.repeats} for k in args.particles]
    if "memory" in args.kinds:
        jobs += [{**base, "kind": "memory", "num_steps": args.memory_steps, "particles": k, "chunk": chunk}
                 for chunk in (None, 4) for k in args.memory_particles]
    payload = new_payload("steering", __file__, argv, args.device, args.threads)
    for n, job in enumerate(jobs, 1):
        load_before = load_average()[0]
        result = run_worker(__file__, job)
        row = {**job, **result, "load_before": load_before, "load_after": load_average()[0]}
        payload["rows"].append(row)
        write_results(args.out, payload)
        summary = result.get("error") or (
            f"ratio {result['ratio']:.3f}" if "ratio" in result else f"peak {result['peak_mb']:.1f} MB"
        )
        print(f"[{n}/{len(jobs)}] {job['kind']} {summary} (load {load_before:.2f})", flush=True)
    return 0


if __name__ == "__main__":
    if not worker_main(run_job):
        sys.exit(main())
