"""Peak live tensor bytes of one optimiser step: ours (checkpointed) next to TRL's AlignProp.

The CPU memory figures of bench/reward_backprop.py and bench/trl_alignprop.py are resident-set
peaks: they include the C heap and Python objects, which differ between two code bases by a few
MB whatever their tensors do.  This benchmark counts tensor storages only (the planner's
:class:`align.train.plan.LiveBytes` dispatch mode, which sees every storage created and freed, backward
included), so the two trainers' tensor memory compares exactly and independently of the load.
Each row runs one warm-up step and one counted step in a fresh process: ours under this
environment, TRL's under TRL's (see bench/trl_alignprop.py), on the same saved model.

Example::

    python bench/tensor_peaks.py --out bench/results/tensor_peaks_cpu.json
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from bench.common import (  # noqa: E402
    MIB,
    load_average,
    new_payload,
    run_worker,
    truncation_grid,
    worker_main,
    write_results,
)
from bench.trl_alignprop import DEFAULT_PYTHON  # noqa: E402


def _counted_step(step, device, *, timed_steps: int = 0, warmup_steps: int = 1) -> dict[str, Any]:
    """Stand-in for bench.common.measure_step: warm up, then count one step's live tensor bytes."""
    from align.train.plan import LiveBytes

    for _ in range(warmup_steps):
        step()
    with LiveBytes() as live:
        step()
        peak = live.peak
    return {"peak_mb": peak / MIB, "resident_mb": 0.0, "memory_method": "live tensor bytes", "step_times_s": []}


def run_job(job: dict[str, Any]) -> dict[str, Any]:
    import torch

    torch.set_num_threads(1)
    if job["variant"] == "ours":
        import bench.reward_backprop as bench_module
    else:
        import bench.trl_alignprop as bench_module
    bench_module.measure_step = _counted_step  # the scripts' own step, counted instead of timed
    result = bench_module.run_job(job)
    return {"peak_mb": result["peak_mb"], "memory_method": result["memory_method"]}


def main(argv: list[str] | None = None) -> int:
    from bench.models import save_bench_pipeline

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--python", default=os.environ.get("TRL_PYTHON", DEFAULT_PYTHON), help="TRL's interpreter")
    parser.add_argument("--steps", type=int, nargs="+", default=[10])
    parser.add_argument("--truncation", nargs="+", default=["1", "4", "all"])
    parser.add_argument("--training", nargs="+", default=["lora", "full"], choices=("lora", "full"))
    parser.add_argument("--out", required=True)
    args = parser.parse_args(argv)

    payload = new_payload("tensor_peaks", __file__, argv, "cpu", 1)
    with tempfile.TemporaryDirectory() as tmp:
        pipeline_dir = str(save_bench_pipeline("cpu-sd", Path(tmp) / "cpu-sd"))
        for training in args.training:
            for steps, k in truncation_grid(args.steps, args.truncation):
                base = {"model": "cpu-sd", "device": "cpu", "num_steps": steps, "truncation_steps": k, "training": training,
                        "batch_size": 1, "mixed_precision": "no", "resolution": None, "threads": 1, "timed_steps": 0}
                for variant, python in (("ours", None), ("trl_alignprop", args.python)):
                    if python is not None and not Path(python).exists():
                        row = {**base, "variant": variant, "error": f"not installed: {python} does not exist"}
                    else:
                        job = {**base, "variant": variant, "gradient_checkpointing": variant == "ours", "pipeline_dir": pipeline_dir}
                        started = time.time()
                        row = {**{k: v for k, v in job.items() if k != "pipeline_dir"}, **run_worker(__file__, job, python=python),
                               "wall_s": time.time() - started, "load_after": load_average()[0]}
                    payload["rows"].append(row)
                    write_results(args.out, payload)
                    peak = f"{row['peak_mb']:.2f} MB" if "peak_mb" in row else f"ERROR {row['error']} {row.get('log', '')}"
                    print(f"{variant:<14} {training:<4} T={steps} K={k}: {peak}", flush=True)
    return 0


if __name__ == "__main__":
    if not worker_main(run_job):
        sys.exit(main())
