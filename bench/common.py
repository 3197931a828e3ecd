"""Shared pieces of the benchmark scripts: machine description, peak-memory meters, workers.

Every measured configuration runs in a fresh worker process (``python <script> --worker JSON``),
so that one configuration's memory cannot leak into the next one's figure.

Peak memory of one optimiser step:

* CUDA: ``torch.cuda.max_memory_allocated`` after ``reset_peak_memory_stats``, minus the memory
  allocated before the step.
* CPU: there is no allocator counter, so the worker uses the kernel's resident-set high-water mark
  (``VmHWM``), reset before the step through ``/proc/self/clear_refs``, minus the resident set
  before the step.  Workers run with ``MALLOC_MMAP_THRESHOLD_=65536`` so that glibc serves every
  tensor larger than 64 KiB from its own mapping and returns it to the kernel when freed: the
  resident set then follows the live tensor bytes (checked against torch's profiler, which counts
  allocator events, to within 1% on a UNet call).

This module is imported by workers running under other virtual environments (TRL's), so it
imports nothing from the package at module level.
"""

from __future__ import annotations

import json
import os
import platform
import re
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

MIB = 2**20
WORKER_ENV = {"MALLOC_MMAP_THRESHOLD_": "65536", "TOKENIZERS_PARALLELISM": "false", "HF_HUB_OFFLINE": "1"}


def _proc_status() -> dict[str, int]:
    text = Path("/proc/self/status").read_text()
    return {k: int(re.search(rf"{k}:\s+(\d+)", text).group(1)) * 1024 for k in ("VmRSS", "VmHWM")}


class PeakMemory:
    """Peak memory a block of work adds, in bytes (see the module docstring)."""

    def __init__(self, device: torch.device | str):
        self.device = torch.device(device)
        self.method = "torch.cuda.max_memory_allocated" if self.device.type == "cuda" else "VmHWM-VmRSS (clear_refs)"
        self._base = 0

    def start(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            self._base = torch.cuda.memory_allocated(self.device)
        else:
            Path("/proc/self/clear_refs").write_text("5")
            self._base = _proc_status()["VmRSS"]

    def stop(self) -> int:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            return torch.cuda.max_memory_allocated(self.device) - self._base
        return _proc_status()["VmHWM"] - self._base

    def resident(self) -> int:
        """Memory held now (allocated on CUDA, resident set on CPU)."""
        if self.device.type == "cuda":
            return torch.cuda.memory_allocated(self.device)
        return _proc_status()["VmRSS"]


def synchronize(device: torch.device | str) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


def measure_step(step: Callable[[], Any], device: str, *, timed_steps: int, warmup_steps: int = 1) -> dict[str, Any]:
    """Warm up, measure the peak memory of one step, then time ``timed_steps`` more steps.

    Returns peak_mb (of the first step after warm-up), resident_mb (before it) and the step
    times (median and all).
    """
    for _ in range(warmup_steps):
        step()
    meter = PeakMemory(device)
    resident = meter.resident()
    meter.start()
    step()
    peak = meter.stop()
    times = []
    for _ in range(timed_steps):
        synchronize(device)
        start = time.perf_counter()
        step()
        synchronize(device)
        times.append(time.perf_counter() - start)
    return {
        "peak_mb": peak / MIB,
        "resident_mb": resident / MIB,
        "memory_method": meter.method,
        "step_time_s": statistics.median(times) if times else None,
        "step_times_s": times,
    }


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def load_average() -> tuple[float, float, float]:
    return os.getloadavg()


def machine_info(device: str = "cpu", threads: int | None = None) -> dict[str, Any]:
    """What the figures were measured on."""
    import diffusers
    import transformers

    info = {
        "cpu": cpu_model(),
        "cpu_cores": os.cpu_count(),
        "torch_threads": threads if threads is not None else torch.get_num_threads(),
        "memory_gb": round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30, 1),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "diffusers": diffusers.__version__,
        "transformers": transformers.__version__,
        "load_average": load_average(),
        "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
    }
    if torch.device(device).type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
        info["gpu_memory_gb"] = round(torch.cuda.get_device_properties(device).total_memory / 2**30, 1)
        info["cuda"] = torch.version.cuda
    return info


def run_worker(script: str | Path, job: dict[str, Any], *, python: str | None = None, timeout: float = 3600) -> dict[str, Any]:
    """Run ``python script --worker JSON`` in a fresh process and return the JSON it prints last.

    A failed worker returns {"error": ...} with the tail of its output instead of raising, so
    that one failed configuration is recorded rather than ending the run.
    """
    env = {**os.environ, **WORKER_ENV}
    threads = job.get("threads")
    if threads:
        env.update(OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads))
    cmd = [python or sys.executable, str(script), "--worker", json.dumps(job)]
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=timeout)
    except subprocess.TimeoutExpired:
        return {"error": f"timed out after {timeout:.0f} s"}
    lines = [line for line in proc.stdout.splitlines() if line.startswith("{")]
    if proc.returncode != 0 or not lines:
        tail = (proc.stderr or proc.stdout).strip().splitlines()[-8:]
        return {"error": f"worker exited with {proc.returncode}", "log": tail}
    return json.loads(lines[-1])


def worker_main(run: Callable[[dict[str, Any]], dict[str, Any]]) -> bool:
    """If this process is a worker (``--worker JSON``), run the job, print its JSON result and return True."""
    if len(sys.argv) >= 3 and sys.argv[1] == "--worker":
        job = json.loads(sys.argv[2])
        if job.get("threads"):
            torch.set_num_threads(int(job["threads"]))
        result = run(job)
        print(json.dumps(result))
        return True
    return False


def write_results(path: str | Path, payload: dict[str, Any]) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(payload, indent=1) + "\n")
    return path
