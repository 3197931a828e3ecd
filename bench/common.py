"""Shared pieces of the benchmark scripts: machine description, peak-memory meters, workers.

Every measured configuration runs in a fresh worker process (``python <script> --worker JSON``),
so that one configuration's memory cannot leak into the next one's figure.

Peak memory of one optimiser step:

* CUDA: ``torch.cuda.max_memory_allocated`` after ``reset_peak_memory_stats``, minus the memory
  allocated before the step.
* CPU: there is no allocator counter, so the worker uses the kernel's resident-set high-water mark
  (``VmHWM``), reset before the step through ``/proc/self/clear_refs``, minus the resident set
  before the step.  For that step glibc is told (``mallopt``) to serve every allocation larger than
  64 KiB from its own mapping and to return it to the kernel when freed, so that the resident set
  follows the live tensor bytes (checked against torch's profiler, which counts allocator events,
  to within 1% on a UNet call).  Timed steps run with glibc keeping freed blocks for reuse (as its
  default does once warmed up, and as CUDA's caching allocator does): returning every tensor to
  the kernel would add page faults that inflate CPU step times by about a third.

This module is imported by workers running under other virtual environments (TRL's), so it
imports nothing from the package at module level.
"""

from __future__ import annotations

import ctypes
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
WORKER_ENV = {"TOKENIZERS_PARALLELISM": "false", "HF_HUB_OFFLINE": "1"}
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3  # glibc mallopt parameters
MALLOC_MODES = {"measure": (64 * 1024, 128 * 1024), "fast": (32 * MIB, 64 * MIB)}  # (mmap, trim) thresholds


def malloc_mode(mode: str) -> bool:
    """Set glibc's allocation policy for 'measure' (memory) or 'fast' (timing); see the module docstring.

    Returns False where glibc's ``mallopt`` is not available (then nothing changes).
    """
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:
        return False
    mmap_threshold, trim_threshold = MALLOC_MODES[mode]
    return bool(libc.mallopt(_M_MMAP_THRESHOLD, mmap_threshold)) and bool(libc.mallopt(_M_TRIM_THRESHOLD, trim_threshold))


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


def time_step(step: Callable[[], Any], device: str) -> float:
    """Wall time of one call of ``step``, in seconds (synchronised on CUDA)."""
    synchronize(device)
    start = time.perf_counter()
    step()
    synchronize(device)
    return time.perf_counter() - start


def measure_step(step: Callable[[], Any], device: str, *, timed_steps: int, warmup_steps: int = 1) -> dict[str, Any]:
    """Warm up, measure the peak memory of one step, then time ``timed_steps`` more steps.

    Returns peak_mb (of the first step after warm-up), resident_mb (before it) and the step
    times (median and all).  Timing starts with one more untimed step, after the switch of the
    allocation policy.
    """
    malloc_mode("measure")
    for _ in range(warmup_steps):
        step()
    meter = PeakMemory(device)
    resident = meter.resident()
    meter.start()
    step()
    peak = meter.stop()
    times = []
    if timed_steps:
        malloc_mode("fast")
        step()
        times = [time_step(step, device) for _ in range(timed_steps)]
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


def code_revision() -> str | None:
    """The git commit of this checkout ('+changes' when the tree has uncommitted edits), if known."""
    root = Path(__file__).resolve().parents[1]
    try:
        head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=root, capture_output=True, text=True, timeout=10)
        # results and their write-ups change while a benchmark runs; they are not code
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no", "--", ".", ":!bench/results", ":!*.md"],
                               cwd=root, capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return None
    if head.returncode:
        return None
    return head.stdout.strip() + ("+changes" if dirty.stdout.strip() else "")


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
        "code": code_revision(),
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


def truncation_grid(steps: list[int], truncation: list[str]) -> list[tuple[int, int]]:
    """(T, K) pairs: every T with every K ('all' = T), skipping K > T."""
    pairs = []
    for t in steps:
        for k in truncation:
            k = t if k == "all" else int(k)
            if k <= t:
                pairs.append((t, k))
    return pairs


def wait_for_quiet(device: str, max_load: float, max_wait: float) -> float:
    """On CPU, wait (at most ``max_wait`` s) for the 1-min load average to fall below ``max_load``; return it."""
    start = time.time()
    while torch.device(device).type == "cpu" and load_average()[0] > max_load and time.time() - start < max_wait:
        time.sleep(15)
    return load_average()[0]


def new_payload(benchmark: str, script: str, argv: list[str] | None, device: str, threads: int | None) -> dict[str, Any]:
    """The header of a result file: what ran, how to rerun it, and on what."""
    root = Path(script).resolve().parents[1]
    args = argv if argv is not None else sys.argv[1:]
    return {
        "benchmark": benchmark,
        "command": "python " + " ".join([os.path.relpath(Path(script).resolve(), root), *args]),
        "machine": machine_info(device, threads),
        "rows": [],
    }


ROW_KEY = ("variant", "gradient_checkpointing", "training", "num_steps", "truncation_steps", "batch_size",
           "mixed_precision", "model", "device", "resolution", "reward_latency", "sequential")


def resume_payload(path: str | Path, payload: dict[str, Any]) -> tuple[dict[str, Any], set[tuple]]:
    """With ``--resume``: the rows already in ``path`` (kept) and the keys of those that ran without error.

    A long benchmark interrupted part-way, or extended with more rows by a second command, goes on
    where it stopped instead of starting again; every invocation's command and machine are kept.
    """
    path = Path(path)
    if not path.is_file():
        return payload, set()
    old = json.loads(path.read_text())
    old.setdefault("runs", [{"command": old["command"], "machine": old["machine"]}])
    old["runs"].append({"command": payload["command"], "machine": payload["machine"]})
    old["rows"] = [r for r in old["rows"] if "error" not in r]
    return old, {row_key(r) for r in old["rows"]}


def row_key(row: dict[str, Any]) -> tuple:
    return tuple(row.get(k) for k in ROW_KEY)


def write_results(path: str | Path, payload: dict[str, Any]) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(payload, indent=1) + "\n")
    return path
