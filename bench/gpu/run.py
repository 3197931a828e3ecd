"""The prepared GPU check: DRaFT-K memory and time on SD1.5 and SDXL, the half-precision paths, FK steering.

Run it through ``bench/gpu/run.sh`` (which installs diffusers from ``.whl/`` where it is missing);
``python bench/gpu/run.py [--smoke] [--out DIR]`` is the same run without the installation step.

What runs, each row in a fresh worker process (bench/common.py); on the GPU the most wanted rows go
first (SD1.5's precision cases, FK, the checkpointed draft rows), then SDXL's precision case and the
rows without checkpointing:

1. ``precision``: for each case (model, fp16 / bf16, ``upcast_vae``), DRaFT LoRA training steps and a
   sampled image: every loss, gradient norm, LoRA weight and pixel finite, and the VAE decoder's
   convolutions (hooked, forward and checkpoint recomputation) computing in float32 exactly when the
   VAE is upcast (``upcast_vae``, or float16 with the VAE's ``force_upcast``), in the low dtype otherwise.
2. ``fk``: FK steering over plain batched sampling of the same particles, decode and reward time
   excluded (:mod:`bench.steering`'s worker).
3. ``draft``: one DRaFT-K LoRA optimiser step with gradient checkpointing at T = 50 and K in {1, 10, 50},
   bf16, SD1.5 at 512 px and SDXL at 1024 px: peak memory and time (:mod:`bench.reward_backprop`'s
   worker), beside the memory planner's prediction (:class:`bench.reward_backprop.Predictor`).  Rows
   without checkpointing at K = T follow: SDXL's is predicted not to fit, SD1.5's checks the planner at
   about 80 GB.

Memory.  A ``draft`` row whose predicted total exceeds the memory budget (90% of the GPU's memory) is
recorded as skipped, with the prediction as its reason, instead of being run into an out-of-memory
error.  The predictions are traced on the meta device in parallel workers (one per model; about a
minute of CPU for SDXL) while the first rows run.

Time.  The GPU run ends inside 8 minutes: every row has a time cap (its worker is killed past it and the
row recorded as failed), no row starts with less than ``MIN_START_S`` left before the deadline (440 s
after the start), and rows not started are recorded as skipped with the reason.  The results file is
rewritten after every row.

``--smoke`` runs every code path on the CPU at toy sizes (the tiny SD and SDXL pipelines at 64 px,
T = 2, K in {1, 2}, FK with 4 steps): six worker processes, one to two minutes on two CPU cores, most
of it importing diffusers.  Its memory budget (4 GB) makes one row (batch 4096) a planner skip.
tests/test_bench_gpu.py runs it.

Results: ``DIR/gpu_check.json`` (``gpu_check_smoke.json`` with ``--smoke``), rendered into
BENCHMARKS.md by ``python bench/report.py --update BENCHMARKS.md`` once copied to bench/results/.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import contextlib
import hashlib
import math
import os
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[2]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from bench import reward_backprop, steering  # noqa: E402
from bench.common import MIB, new_payload, run_worker, worker_main, write_results  # noqa: E402

MIN_START_S = 20.0  # a row is not started with less time than this left before the deadline
BUDGET_FRACTION = 0.9  # of the GPU's memory: allocator fragmentation, the CUDA context and cuDNN workspaces
SOURCE_DIRS = ("align", "bench", "rewards", "pipelines")


# ---------------------------------------------------------------------------------------------
# the plan: rows as data
# ---------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Unit:
    """One worker launch: its kind, the job it runs, its time cap, and the ids of the rows it yields."""

    kind: str  # precision | fk | draft
    job: dict[str, Any]
    cap_s: float
    row_ids: tuple[str, ...]


@dataclass(frozen=True)
class Profile:
    """Sizes of one run: the GPU check or its CPU smoke version."""

    name: str
    device: str
    threads: int | None
    result_file: str
    deadline_s: float
    memory_budget_mb: float | None  # None: BUDGET_FRACTION of the CUDA device's memory
    prediction_workers: int  # planner workers tracing in parallel (each traces one model's rows)
    units: tuple[Unit, ...]


def draft_id(job: dict[str, Any]) -> str:
    tail = "" if job["gradient_checkpointing"] else "/no-ckpt"
    batch = f"/batch{job['batch_size']}" if job["batch_size"] != 1 else ""
    return f"draft/{job['model']}/{job['resolution']}px/T{job['num_steps']}/K{job['truncation_steps']}{tail}{batch}"


def precision_id(case: dict[str, Any]) -> str:
    upcast = "+upcast_vae" if case["upcast_vae"] else ""
    return f"precision/{case['model']}/{case['resolution']}px/{case['mixed_precision']}{upcast}"


def _draft(device: str, threads: int | None, model: str, resolution: int, steps: int, k: int, *, cap_s: float,
           timed_steps: int, checkpointing: bool = True, batch_size: int = 1) -> Unit:
    job = {
        "model": model, "device": device, "num_steps": steps, "truncation_steps": k, "training": "lora",
        "batch_size": batch_size, "mixed_precision": "bf16", "resolution": resolution, "threads": threads,
        "variant": "ours", "gradient_checkpointing": checkpointing, "timed_steps": timed_steps, "with_lower_bound": False,
    }
    return Unit("draft", job, cap_s, (draft_id(job),))


def _precision(device: str, threads: int | None, cases: list[tuple[str, int, str, bool]], *, steps: int, k: int,
               train_steps: int, cap_s: float) -> Unit:
    case_dicts = [{"model": m, "resolution": r, "mixed_precision": p, "upcast_vae": u} for m, r, p, u in cases]
    job = {"kind": "precision", "device": device, "threads": threads, "num_steps": steps, "truncation_steps": k,
           "train_steps": train_steps, "cases": case_dicts}
    return Unit("precision", job, cap_s, tuple(precision_id(c) for c in case_dicts))


def _fk(device: str, threads: int | None, model: str, steps: int, particles: int, repeats: int, cap_s: float) -> Unit:
    job = {"kind": "fk", "model": model, "device": device, "threads": threads, "num_steps": steps,
           "particles": particles, "repeats": repeats}
    return Unit("fk", job, cap_s, (f"fk/{model}/{steps}steps/{particles}particles",))


def gpu_profile() -> Profile:
    """One H200, under 8 minutes: the order puts the cheap rows first, while the planner traces."""
    d, t = "cuda", None
    sd15 = [_draft(d, t, "sd15", 512, 50, k, cap_s=90, timed_steps=2) for k in (1, 10, 50)]
    sdxl = [_draft(d, t, "sdxl", 1024, 50, k, cap_s=150, timed_steps=1) for k in (1, 10, 50)]  # one timed step: the longest rows
    units = (
        _precision(d, t, [("sd15", 512, "fp16", False), ("sd15", 512, "bf16", False), ("sd15", 512, "bf16", True)],
                   steps=10, k=2, train_steps=2, cap_s=120),
        _fk(d, t, "sd15", 20, 4, 2, cap_s=90),
        _fk(d, t, "sd15", 20, 8, 2, cap_s=90),
        *sd15,
        *sdxl,
        _draft(d, t, "sdxl", 1024, 50, 50, cap_s=150, timed_steps=1, checkpointing=False),  # predicted ~550 GB
        _precision(d, t, [("sdxl", 1024, "fp16", False)], steps=4, k=1, train_steps=2, cap_s=120),
        _draft(d, t, "sd15", 512, 50, 50, cap_s=90, timed_steps=1, checkpointing=False),  # predicted ~80 GB
    )
    return Profile("gpu", d, t, "gpu_check.json", deadline_s=440.0, memory_budget_mb=None, prediction_workers=2,
                   units=units)


def smoke_profile() -> Profile:
    """Every code path of the GPU check on the CPU at toy sizes."""
    d, t = "cpu", 1
    units = (
        _precision(d, t, [("tiny-sd", 64, "fp16", False), ("tiny-sd", 64, "bf16", False), ("tiny-sd", 64, "bf16", True),
                          ("tiny-sdxl", 64, "fp16", False)], steps=2, k=1, train_steps=2, cap_s=120),
        _fk(d, t, "tiny-sd", 4, 2, 1, cap_s=120),
        _draft(d, t, "tiny-sd", 64, 2, 1, cap_s=120, timed_steps=1),
        _draft(d, t, "tiny-sd", 64, 2, 2, cap_s=120, timed_steps=1),
        _draft(d, t, "tiny-sdxl", 64, 2, 2, cap_s=120, timed_steps=1),
        _draft(d, t, "tiny-sd", 64, 2, 2, cap_s=120, timed_steps=1, batch_size=4096),  # over the 4 GB budget
    )
    # one planner worker: the CPU is what the rows run on
    return Profile("smoke", d, t, "gpu_check_smoke.json", deadline_s=300.0, memory_budget_mb=4096.0, prediction_workers=1,
                   units=units)


# ---------------------------------------------------------------------------------------------
# worker side
# ---------------------------------------------------------------------------------------------
@contextlib.contextmanager
def conv_dtypes(module) -> Iterator[list[tuple[str, str, str]]]:
    """Within the context, the (input, weight, output) dtypes of every Conv2d call under ``module``."""
    import torch

    seen: list[tuple[str, str, str]] = []

    def hook(conv, args, output):
        seen.append((str(args[0].dtype), str(conv.weight.dtype), str(output.dtype)))

    handles = [m.register_forward_hook(hook) for m in module.modules() if isinstance(m, torch.nn.Conv2d)]
    try:
        yield seen
    finally:
        for h in handles:
            h.remove()


def expected_decode_dtype(mixed_precision: str, upcast_vae: bool, force_upcast: bool) -> str:
    """The dtype the VAE decoder computes in, by the documented rule (stated here independently of
    :meth:`align.core.models.DiffusionModel.decodes_in_fp32`): float32 with ``upcast_vae``, or for
    float16 with the VAE's ``force_upcast`` (diffusers' rule); otherwise the low dtype."""
    if upcast_vae or (mixed_precision == "fp16" and force_upcast):
        return "torch.float32"
    return {"fp16": "torch.float16", "bf16": "torch.bfloat16"}[mixed_precision]


def _finite(x: float | None) -> bool:
    return x is not None and math.isfinite(x)


def precision_case(job: dict[str, Any], case: dict[str, Any]) -> dict[str, Any]:
    """Train ``train_steps`` DRaFT LoRA steps and sample two images in one precision case; check them."""
    import torch

    from align.core.models import DiffusionModel
    from bench.models import bench_pipeline

    torch.manual_seed(0)
    model = DiffusionModel(bench_pipeline(case["model"], seed=0, device=job["device"]))
    force_upcast = bool(getattr(model.pipe.vae.config, "force_upcast", False))
    expected = expected_decode_dtype(case["mixed_precision"], case["upcast_vae"], force_upcast)
    low = {"fp16": torch.float16, "bf16": torch.bfloat16}[case["mixed_precision"]]
    train_job = {**case, "device": job["device"], "num_steps": job["num_steps"], "truncation_steps": job["truncation_steps"],
                 "training": "lora", "batch_size": 1}
    with tempfile.TemporaryDirectory() as workdir:
        trainer = reward_backprop.build_trainer(train_job, model, workdir, checkpointing=True)
        initial = [p.detach().clone() for p in trainer.params]
        with conv_dtypes(model.pipe.vae) as train_convs:
            steps = [trainer.train_step() for _ in range(job["train_steps"])]
        with conv_dtypes(model.pipe.vae) as sample_convs:
            images = trainer.evaluation_images(reward_backprop.PROMPTS[:2], [0, 1])
        params = [p.detach() for p in trainer.params]
    records = [{"loss": s["loss"], "grad_norm": s["grad_norm"], "skipped": s["skipped"]} for s in steps]
    applied = [r for r in records if not r["skipped"]]
    # fp16's loss scaler may skip a step whose scaled gradients overflowed (its documented behaviour); the last
    # step must then apply.  bf16 has no scaler: every step must apply with finite gradients.
    gradients_ok = bool(applied) and all(_finite(r["grad_norm"]) for r in applied) and not records[-1]["skipped"]
    if case["mixed_precision"] != "fp16":
        gradients_ok = gradients_ok and len(applied) == len(records)

    def computed_in(convs: list[tuple[str, str, str]]) -> bool:
        return bool(convs) and {c[2] for c in convs} == {expected} and {c[1] for c in convs} == {expected}

    checks = {
        "loss_finite": all(_finite(r["loss"]) for r in records),
        "gradients_finite": gradients_ok,
        "lora_weights_finite": all(bool(torch.isfinite(p).all()) for p in params),
        "lora_weights_updated": any(not torch.equal(a, p) for a, p in zip(initial, params)),
        "images_finite": bool(torch.isfinite(images).all()),
        "decode_dtype_in_training": computed_in(train_convs),
        "decode_dtype_in_sampling": computed_in(sample_convs),
        "model_rule_agrees": model.decodes_in_fp32(low) == (expected == "torch.float32"),
    }
    return {
        **case, "kind": "precision", "id": precision_id(case), "device": job["device"], "num_steps": job["num_steps"],
        "truncation_steps": job["truncation_steps"], "vae_force_upcast": force_upcast, "expected_decode_dtype": expected,
        "training_conv_dtypes": sorted({c[2] for c in train_convs}), "training_conv_calls": len(train_convs),
        "sampling_conv_dtypes": sorted({c[2] for c in sample_convs}), "sampling_conv_calls": len(sample_convs),
        "steps": records, "image_range": [float(images.min()), float(images.max())],
        "denoiser_dtype": str(model.dtype), "checks": checks, "passed": all(checks.values()),
    }


def _precision_job(job: dict[str, Any]) -> dict[str, Any]:
    return {"cases": [precision_case(job, case) for case in job["cases"]]}


def _predict_job(job: dict[str, Any]) -> dict[str, Any]:
    predictors: dict[str, reward_backprop.Predictor] = {}
    predictions = {}
    for row in job["jobs"]:
        if row["model"] not in predictors:
            predictors[row["model"]] = reward_backprop.Predictor(row["model"])
        predictions[draft_id(row)] = predictors[row["model"]](row)
    return {"predictions": predictions}


WORKER_JOBS = {"precision": _precision_job, "predict": _predict_job}


def run_job(job: dict[str, Any]) -> dict[str, Any]:
    return WORKER_JOBS[job["kind"]](job)


# ---------------------------------------------------------------------------------------------
# parent side
# ---------------------------------------------------------------------------------------------
def source_digest(root: Path = ROOT) -> str:
    """SHA-256 of the Python sources that ran (``git`` may be absent where the check runs); compare it
    with ``python bench/gpu/run.py --digest`` in a checkout."""
    digest = hashlib.sha256()
    for folder in SOURCE_DIRS:
        for path in sorted((root / folder).rglob("*.py")):
            digest.update(path.relative_to(root).as_posix().encode() + b"\0" + path.read_bytes() + b"\0")
    return digest.hexdigest()[:16]


def memory_budget_mb(profile: Profile) -> float | None:
    if profile.memory_budget_mb is not None:
        return profile.memory_budget_mb
    import torch

    if profile.device.startswith("cuda"):
        return BUDGET_FRACTION * torch.cuda.get_device_properties(profile.device).total_memory / MIB
    return None


def over_budget(prediction: dict[str, Any], budget_mb: float | None) -> str | None:
    """The reason to skip a row predicted not to fit, or None."""
    if budget_mb is None or prediction["predicted_total_mb"] <= budget_mb:
        return None
    return f"predicted {prediction['predicted_total_mb']:,.0f} MB > the {budget_mb:,.0f} MB memory budget"


def worker_timeout(cap_s: float, remaining_s: float) -> float | None:
    """How long a unit may run: its cap, cut to the time left; None when too little is left to start it."""
    if remaining_s < MIN_START_S:
        return None
    return min(cap_s, remaining_s)


class Predictions:
    """The planner's predictions for the draft rows, traced in worker processes while the rows run.

    Each worker traces whole models, in the order the rows need them; with several workers the models
    are dealt out round-robin.
    """

    def __init__(self, profile: Profile, pool: concurrent.futures.Executor, timeout_s: float):
        by_model: dict[str, list[dict[str, Any]]] = {}
        for unit in profile.units:
            if unit.kind == "draft":
                by_model.setdefault(unit.job["model"], []).append(unit.job)
        shares: list[list[str]] = [[] for _ in range(max(1, profile.prediction_workers))]
        for n, model in enumerate(by_model):
            shares[n % len(shares)].append(model)
        self.futures: dict[str, concurrent.futures.Future] = {}
        for models in filter(None, shares):
            job = {"kind": "predict", "jobs": [j for m in models for j in by_model[m]], "threads": profile.threads}
            future = pool.submit(run_worker, Path(__file__), job, timeout=timeout_s)
            self.futures.update(dict.fromkeys(models, future))

    def get(self, job: dict[str, Any], wait_s: float) -> dict[str, Any]:
        """The prediction for ``job``, or {"prediction_error": ...}."""
        try:
            result = self.futures[job["model"]].result(timeout=max(wait_s, 0.0))
        except concurrent.futures.TimeoutError:
            return {"prediction_error": "the planner's prediction was not ready in time"}
        if "error" in result:
            return {"prediction_error": f"{result['error']} {' | '.join(result.get('log', []))}"}
        return result["predictions"][draft_id(job)]


def _rows_of(unit: Unit, result: dict[str, Any], extra: dict[str, Any]) -> list[dict[str, Any]]:
    """The rows a unit yields: one per precision case, else one; a failed or skipped unit marks each of its rows."""
    if unit.kind == "precision":
        if "cases" in result:
            return [{**row, **extra} for row in result["cases"]]
        cases = unit.job["cases"]
        base = {k: v for k, v in unit.job.items() if k not in ("cases", "kind")}
        return [{**base, **case, "kind": "precision", "id": rid, **result, **extra} for case, rid in zip(cases, unit.row_ids)]
    job = {k: v for k, v in unit.job.items() if k != "kind"}
    return [{**job, "kind": unit.kind, "id": unit.row_ids[0], **result, **extra}]


def run_unit(unit: Unit, remaining_s: float, predictions: Predictions | None, budget_mb: float | None) -> list[dict[str, Any]]:
    """Run (or skip) one unit and return its rows."""
    timeout = worker_timeout(unit.cap_s, remaining_s)
    if timeout is None:
        return _rows_of(unit, {"skipped": f"{max(remaining_s, 0):.0f} s left before the deadline; a row needs "
                                          f"{MIN_START_S:.0f} s to start",
                               "skip_kind": "time"}, {})
    prediction: dict[str, Any] = {}
    if unit.kind == "draft" and predictions is not None:
        started = time.monotonic()
        prediction = predictions.get(unit.job, remaining_s - MIN_START_S)
        timeout = worker_timeout(unit.cap_s, remaining_s - (time.monotonic() - started))
        reason = over_budget(prediction, budget_mb) if "predicted_total_mb" in prediction else None
        if reason:
            return _rows_of(unit, {"skipped": reason, "skip_kind": "memory"}, prediction)
        if timeout is None:
            return _rows_of(unit, {"skipped": "no time left after waiting for the planner", "skip_kind": "time"}, prediction)
    script = Path(steering.__file__) if unit.kind == "fk" else Path(reward_backprop.__file__) if unit.kind == "draft" else Path(__file__)
    started = time.monotonic()
    result = run_worker(script, unit.job, timeout=timeout)
    return _rows_of(unit, result, {**prediction, "wall_s": time.monotonic() - started, "timeout_s": timeout})


def status(row: dict[str, Any]) -> str:
    if "skipped" in row:
        return f"skipped ({row.get('skip_kind', 'memory')})"
    if "error" in row:
        return "failed"
    if row["kind"] == "precision" and not row.get("passed"):
        return "failed"
    return "ok"


def describe(row: dict[str, Any]) -> str:
    """One line per row for the console."""
    head = f"{row['id']:<48}"
    if "skipped" in row:
        return f"{head} skipped: {row['skipped']}"
    if "error" in row:
        return f"{head} FAILED: {row['error']} {' | '.join(row.get('log', []))}"
    if row["kind"] == "draft":
        plan = f"plan {row['predicted_peak_mb']:,.0f} MB" if "predicted_peak_mb" in row else row.get("prediction_error", "")
        step = f"{row['step_time_s']:.2f} s/step" if row.get("step_time_s") else "untimed"
        return f"{head} peak {row['peak_mb']:,.0f} MB ({plan}), {step}"
    if row["kind"] == "precision":
        failed = [name for name, ok in row["checks"].items() if not ok]
        text = "passed" if row["passed"] else "FAILED: " + ", ".join(failed)
        return f"{head} decode in {row['expected_decode_dtype']}, losses {[round(s['loss'], 4) for s in row['steps']]}: {text}"
    return f"{head} FK / plain {row['ratio']:.3f}x ({row['fk_net_s']:.2f} s / {row['plain_net_s']:.2f} s)"


def run(profile: Profile, out_dir: Path, argv: list[str] | None, deadline_s: float | None = None) -> dict[str, Any]:
    """Run the profile's units in order within the deadline; write and return the payload."""
    start = time.monotonic()
    deadline = profile.deadline_s if deadline_s is None else deadline_s
    payload = new_payload("gpu_check", __file__, argv, profile.device, profile.threads)
    payload["command"] = " ".join(["python bench/gpu/run.py", *(sys.argv[1:] if argv is None else argv)])
    payload["machine"]["code"] = payload["machine"]["code"] or os.environ.get("ALIGN_CODE_REVISION")
    budget = memory_budget_mb(profile)
    payload["settings"] = {
        "profile": profile.name, "deadline_s": deadline, "min_start_s": MIN_START_S, "memory_budget_mb": budget,
        "source_digest": source_digest(), "guidance_scale": reward_backprop.GUIDANCE, "lora_rank": reward_backprop.LORA_RANK,
        "prompts": reward_backprop.PROMPTS, "reward": "brightness", "sampler": "ddim eta=0", "optimizer": "AdamW, grad clip 1.0",
    }
    path = out_dir / profile.result_file
    with concurrent.futures.ThreadPoolExecutor(max_workers=4) as pool:
        predictions = Predictions(profile, pool, timeout_s=deadline) if deadline >= MIN_START_S else None
        for unit in profile.units:
            rows = run_unit(unit, deadline - (time.monotonic() - start), predictions, budget)
            payload["rows"] += rows
            payload["elapsed_s"] = time.monotonic() - start
            write_results(path, payload)
            for row in rows:
                print(describe(row), flush=True)
    payload["elapsed_s"] = time.monotonic() - start
    write_results(path, payload)
    return payload


def summary(payload: dict[str, Any]) -> str:
    counts: dict[str, int] = {}
    for row in payload["rows"]:
        counts[status(row)] = counts.get(status(row), 0) + 1
    parts = ", ".join(f"{n} {name}" for name, n in sorted(counts.items()))
    return (f"{payload['settings']['profile']} check: {len(payload['rows'])} rows in {payload['elapsed_s']:.0f} s "
            f"(deadline {payload['settings']['deadline_s']:.0f} s): {parts}")


def _preflight(profile: Profile) -> str | None:
    """Why the run cannot start (a missing package, no CUDA device), or None."""
    try:
        import diffusers  # noqa: F401
        import peft  # noqa: F401
        import torch

        from align.train.trainer import Trainer  # noqa: F401
        from rewards import build_reward  # noqa: F401
    except ImportError as exc:
        return f"cannot import what the check needs: {exc}"
    if profile.device.startswith("cuda") and not torch.cuda.is_available():
        return "no CUDA device is visible; run `bash bench/gpu/run.sh --smoke` for the CPU version"
    return None


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--smoke", action="store_true", help="every code path on the CPU at toy sizes (one to two minutes)")
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results", help="folder for the JSON results")
    parser.add_argument("--deadline-s", type=float, default=None,
                        help="no row starts later than this many seconds after the start (default: 440 on the GPU, 300 smoke)")
    parser.add_argument("--digest", action="store_true", help="print the digest of the sources and exit")
    args = parser.parse_args(argv)
    if args.digest:
        print(source_digest())
        return 0
    if args.deadline_s is not None and args.deadline_s < 0:
        parser.error(f"--deadline-s={args.deadline_s}; accepted: a number of seconds >= 0")
    profile = smoke_profile() if args.smoke else gpu_profile()
    problem = _preflight(profile)
    if problem:
        print(f"error: {problem}", file=sys.stderr)
        return 2
    payload = run(profile, args.out, argv, args.deadline_s)
    print(summary(payload))
    print(f"wrote {args.out / profile.result_file}")
    return 0 if all(status(r) in ("ok", "skipped (memory)", "skipped (time)") for r in payload["rows"]) else 1


if __name__ == "__main__":
    if not worker_main(run_job):
        sys.exit(main())

