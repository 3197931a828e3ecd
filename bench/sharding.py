"""The cost of sharding full fine-tuning: FSDP2 and DeepSpeed ZeRO-2/3 over 2 processes against the unsharded paths,
on the CPU (gloo).

Ways to train the whole denoiser with DRaFT-K on the same global batch:

* ``plain-1``: one process, the whole batch;
* ``replicated-2``: two processes, each holding the whole model (``sharding=none``: one flat all-reduce of
  every gradient per step);
* ``fsdp-2``: two processes with ``sharding=fsdp`` (each block's weights gathered while it runs, gradients
  reduce-scattered, weights / gradients / AdamW state halved);
* ``zero2-2``, ``zero3-2``: two processes with ``sharding=deepspeed`` (DeepSpeed ZeRO-2: the fp32 master weights,
  gradients and AdamW state partitioned, the module's weights whole on every process; ZeRO-3: those partitioned
  too).  Run them into their own file (``--variants plain-1 zero2-2 zero3-2``): DeepSpeed is an optional extra.

Per process: the median optimiser-step time, the bytes of trained state it holds (weights, gradients, AdamW
moments: its shards under FSDP; counted from the tensors, so exact; under DeepSpeed the weights are the module's
(whole, or ZeRO-3's partitions) plus the fp32 master partition, and the gradients the fp32 partition DeepSpeed
reduces them into, the master partition's size), and its resident-set high-water mark
during the steps (``VmHWM``, everything the process holds: the frozen VAE and text encoder, activations,
gloo buffers).  The global batch and the samples are the same in every row (the trainer's seeds), so the
rows differ only in how the work is split.

Example::

    python bench/sharding.py --out bench/results/sharding_cpu.json
    python bench/sharding.py --model sd15 --resolution 256 --steps 3 --out bench/results/sharding_sd15_cpu.json
    python bench/sharding.py --steps 8 --variants plain-1 zero2-2 zero3-2 --out bench/results/sharding_deepspeed_cpu.json
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from bench.common import MIB, WORKER_ENV, load_average, new_payload, write_results  # noqa: E402

#: variant -> (processes, sharding, ZeRO stage)
VARIANTS = {"plain-1": (1, "none", 0), "replicated-2": (2, "none", 0), "fsdp-2": (2, "fsdp", 0),
            "zero2-2": (2, "deepspeed", 2), "zero3-2": (2, "deepspeed", 3)}
#: the variants run by default (DeepSpeed's need the optional extra: --variants)
DEFAULT_VARIANTS = ["plain-1", "replicated-2", "fsdp-2"]
PROMPTS = ["a red circle", "a blue square", "a green triangle", "a yellow star"]


def _hwm_mb() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024.0
    return float("nan")


def _reset_hwm() -> None:
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        pass


def _local_bytes(tensors) -> int:
    from align.train.sharding import is_sharded

    return sum((t.to_local() if is_sharded(t) else t).numel() * t.element_size() for t in tensors if t is not None)


def worker(job: dict[str, Any]) -> None:
    """One process of a variant (under torchrun for two): train, time, measure; rank 0 writes the result file."""
    import torch

    from align.core.config import from_dict
    from align.train.trainer import TrainConfig, Trainer

    torch.set_num_threads(1)
    trainer = Trainer(from_dict(TrainConfig, job["config"]), progress=False)
    trainer.setup()
    trainer.train_step()  # warm-up: the optimiser state is created
    adam = _local_bytes([v for s in trainer.optimizer.state.values() for v in s.values() if torch.is_tensor(v) and v.dim()])
    if trainer.engine is None:
        state = {"weights": _local_bytes(trainer.params), "gradients": _local_bytes(trainer.params), "adam": adam}
    else:
        from align.train.sharding import master_partitions

        # a gradient has its weight's shape and dtype (FSDP), or that of DeepSpeed's fp32 master partition
        master = _local_bytes(master_partitions(trainer.engine))
        module = _local_bytes([getattr(p, "ds_tensor", p) for p in trainer.params])  # ZeRO-3: the partitions
        state = {"weights": module + master, "gradients": master, "adam": adam}
    _reset_hwm()
    times = []
    for _ in range(job["steps"]):
        start = time.perf_counter()
        metrics = trainer.train_step()
        times.append(time.perf_counter() - start)
        assert metrics["skipped"] == 0
    row = {
        "rank": trainer.rank, "step_time_s": statistics.median(times), "step_times_s": times,
        "weights_mb": state["weights"] / MIB, "gradients_mb": state["gradients"] / MIB, "adam_mb": state["adam"] / MIB,
        "rss_peak_mb": _hwm_mb(), "sharding": trainer.sharding, "processes": trainer.num_processes,
    }
    rows = [None] * trainer.num_processes
    if trainer.num_processes > 1:
        torch.distributed.all_gather_object(rows, row)
    else:
        rows = [row]
    if trainer.is_main:
        Path(job["result"]).write_text(json.dumps(rows))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_variant(name: str, model: str, args, folder: Path) -> dict[str, Any]:
    processes, sharding, stage = VARIANTS[name]
    config = {
        "model": model, "device": "cpu", "method": "draft", "prompts": PROMPTS, "reward": "brightness",
        "lora": {"enabled": False}, "sharding": sharding, "batch_size": args.global_batch // processes,
        "max_steps": args.steps + 1, "checkpoint_every": 0, "sample_every": 0, "num_samples": 1,
        "output_dir": str(folder / name), "model_recommendations": False,
        "draft": {"num_steps": args.num_steps, "truncation_steps": 1, "learning_rate": 1e-5, "guidance_scale": 4.0},
    }
    if args.resolution:
        config.update(height=args.resolution, width=args.resolution)
    if stage:
        ds_config = folder / f"zero{stage}.json"
        zero = {"stage": stage, **({"stage3_param_persistence_threshold": 0} if stage == 3 else {})}  # all partitioned
        ds_config.write_text(json.dumps({"zero_optimization": zero}))
        config["deepspeed_config"] = str(ds_config)
    job = {"config": config, "steps": args.steps, "result": str(folder / f"{name}.json")}
    launcher = [sys.executable] if processes == 1 else [
        sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(processes), "--master_port", str(_free_port())]
    env = {**os.environ, **WORKER_ENV, "OMP_NUM_THREADS": "1"}
    load = load_average()[0]
    proc = subprocess.run([*launcher, __file__, "--worker", json.dumps(job)], capture_output=True, text=True,
                          env=env, timeout=3600)
    if proc.returncode != 0:
        return {"variant": name, "error": proc.stderr.strip().splitlines()[-1][:300] if proc.stderr.strip() else "failed"}
    ranks = json.loads((folder / f"{name}.json").read_text())
    return {"variant": name, "processes": processes, "sharding": sharding, "load_before": load, "ranks": ranks}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="builtin", help="builtin (the shipped shapes model), a preset-free folder or hub id")
    parser.add_argument("--resolution", type=int, default=None)
    parser.add_argument("--num-steps", type=int, default=4, help="sampling steps T (K = 1)")
    parser.add_argument("--global-batch", type=int, default=2)
    parser.add_argument("--steps", type=int, default=5, help="timed optimiser steps (after one warm-up step)")
    parser.add_argument("--variants", nargs="*", default=DEFAULT_VARIANTS, choices=list(VARIANTS))
    parser.add_argument("--out", default="bench/results/sharding_cpu.json")
    args = parser.parse_args(argv)
    payload = new_payload("sharding", __file__, argv, "cpu", 1)
    payload["settings"] = {"model": args.model, "sampling steps": args.num_steps, "global batch": args.global_batch,
                           "timed steps": args.steps, "method": "draft, K=1, full fine-tuning, fp32"}
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.variants:
            row = run_variant(name, args.model, args, Path(tmp))
            payload["rows"].append(row)
            print(json.dumps(row)[:400], flush=True)
    write_results(args.out, payload)
    return 0


if __name__ == "__main__":
    if len(sys.argv) >= 3 and sys.argv[1] == "--worker":
        worker(json.loads(sys.argv[2]))
    else:
        sys.exit(main())
