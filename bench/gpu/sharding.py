"""The prepared GPU check of sharded full fine-tuning: per-GPU memory of an SDXL-architecture UNet trained whole,
unsharded and with FSDP2 over P processes, beside ``align plan``'s prediction.

One GPU stands in for P of them: the worker joins a *fake* process group of world size P as rank 0
(``torch.testing._internal.distributed.fake_pg``: every collective returns at once, nothing is exchanged),
so FSDP2 builds the shards, gathers and gradient buffers of a real P-process run with their real sizes on
this GPU, and ``torch.cuda.max_memory_allocated`` is what each GPU of a P-GPU run would hold.  The numbers
the run computes are not a real run's (the collectives do nothing); only its memory is measured.

Each row runs in a fresh worker process: SDXL's UNet, VAE and text encoders at full size with random
weights (:mod:`bench.models`), bf16, DRaFT-K (K = 1, CFG, gradient checkpointing) at 1024 px, batch 1 per
GPU; two optimiser steps (the first creates the AdamW state), the peak of the second.

    python bench/gpu/sharding.py --out DIR                 # on one GPU, about 4 minutes: DIR/gpu_sharding.json
    python bench/gpu/sharding.py --smoke --out DIR         # on the CPU: the tiny SDXL pipeline at 64 px, P in (1, 8)

``python bench/report.py DIR/gpu_sharding.json`` renders it; copy it to bench/results/ and run
``python bench/report.py --update BENCHMARKS.md`` to publish it.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[2]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from bench.common import MIB, WORKER_ENV, new_payload, write_results  # noqa: E402

#: (processes, sharding) of the rows, in the order they run
ROWS = ((1, "none"), (8, "fsdp"), (2, "fsdp"))
ROW_TIMEOUT_S = 300


def worker(job: dict[str, Any]) -> dict[str, Any]:
    """One row: train two steps on this device as rank 0 of ``processes``; the second step's peak."""
    import torch

    processes = job["processes"]
    if processes > 1:
        import torch.distributed as dist
        from torch.testing._internal.distributed.fake_pg import FakeStore

        os.environ.update(WORLD_SIZE=str(processes), RANK="0", LOCAL_RANK="0", LOCAL_WORLD_SIZE=str(processes),
                          MASTER_ADDR="127.0.0.1", MASTER_PORT="29599")
        dist.init_process_group("fake", store=FakeStore(), rank=0, world_size=processes)
    from align.core.config import from_dict
    from align.core.models import DiffusionModel
    from align.train.trainer import TrainConfig, Trainer
    from bench.models import bench_pipeline

    device = job["device"]
    config = from_dict(TrainConfig, {
        "output_dir": job["output_dir"], "device": device, "lora": {"enabled": False}, "sharding": job["sharding"],
        "mixed_precision": job["mixed_precision"], "prompts": ["a photo of a cat"], "batch_size": job["batch_size"],
        "max_steps": 2, "checkpoint_every": 0, "sample_every": 0, "num_samples": 1, "model_recommendations": False,
        "height": job["resolution"], "width": job["resolution"], "reward": "brightness",
        "draft": {"num_steps": job["num_steps"], "truncation_steps": 1, "guidance_scale": 5.0, "learning_rate": 1e-6},
    })
    trainer = Trainer(config, model=DiffusionModel(bench_pipeline(job["model"], device="cpu")), progress=False)
    trainer.setup()
    on_gpu = torch.device(device).type == "cuda"
    first = trainer.train_step()
    resident = torch.cuda.memory_allocated() / MIB if on_gpu else None
    start = time.perf_counter()
    second = trainer.train_step()
    return {
        "processes": processes, "sharding": trainer.sharding, "peak_mb": second["peak_memory_mb"],
        "resident_mb": resident, "step_time_s": time.perf_counter() - start,
        "finite": all(v == v for v in (first["loss"], second["loss"])),
    }


def predict(job: dict[str, Any]) -> dict[str, float]:
    """``align plan``'s per-GPU figures for the row."""
    from align.train.plan import MemoryPlanner, ModelSpec, PlanConfig
    from bench.models import bench_pipeline

    spec = ModelSpec.from_pipeline(bench_pipeline(job["model"], device="meta" if job["model"] != "tiny-sdxl" else "cpu"))
    config = PlanConfig(
        model=job["model"], method="draft", num_steps=job["num_steps"], truncation_steps=1, batch_size=job["batch_size"],
        resolution=job["resolution"], guidance=True, lora=False, mixed_precision=job["mixed_precision"],
        device="cuda" if job["device"].startswith("cuda") else "cpu", processes=job["processes"], sharding=job["sharding"],
    )
    planner = MemoryPlanner(config, spec)
    return {"predicted_total_mb": planner.total(job["batch_size"], 1) / MIB,
            "predicted_state_mb": (planner.weights["denoiser"] + planner.gradients + planner.optimizer_state) / MIB}


def run_row(job: dict[str, Any]) -> dict[str, Any]:
    env = {**os.environ, **WORKER_ENV}
    try:
        proc = subprocess.run([sys.executable, __file__, "--worker", json.dumps(job)], capture_output=True, text=True,
                              env=env, timeout=ROW_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        return {**job, "error": f"over the row's {ROW_TIMEOUT_S} s"}
    if proc.returncode != 0:
        tail = proc.stderr.strip().splitlines()[-1:] or ["failed"]
        return {**job, "error": tail[0][:300]}
    return {**job, **json.loads(proc.stdout.strip().splitlines()[-1])}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--smoke", action="store_true", help="the tiny SDXL pipeline on the CPU at 64 px")
    parser.add_argument("--out", default=str(ROOT / "bench" / "results"))
    args = parser.parse_args(argv)
    if args.smoke:
        common = {"model": "tiny-sdxl", "device": "cpu", "mixed_precision": "no", "resolution": 64, "num_steps": 2}
        rows = ROWS[:2]
    else:
        common = {"model": "sdxl", "device": "cuda", "mixed_precision": "bf16", "resolution": 1024, "num_steps": 4}
        rows = ROWS
    name = "gpu_sharding_smoke" if args.smoke else "gpu_sharding"
    payload = new_payload("gpu_sharding", __file__, argv, common["device"], None)
    payload["settings"] = {**common, "method": "draft K=1, CFG, gradient checkpointing, batch 1 per GPU"}
    out = Path(args.out) / f"{name}.json"
    with tempfile.TemporaryDirectory() as tmp:
        for processes, sharding in rows:
            job = {**common, "processes": processes, "sharding": sharding, "batch_size": 1,
                   "output_dir": str(Path(tmp) / f"{sharding}-{processes}")}
            row = run_row(job)
            if "error" not in row:
                row.update(predict(job))
            payload["rows"].append(row)
            write_results(out, payload)
            print(json.dumps({k: v for k, v in row.items() if k != "output_dir"}), flush=True)
    return 1 if any("error" in r for r in payload["rows"]) else 0


if __name__ == "__main__":
    if len(sys.argv) >= 3 and sys.argv[1] == "--worker":
        print(json.dumps(worker(json.loads(sys.argv[2]))))
    else:
        sys.exit(main())
