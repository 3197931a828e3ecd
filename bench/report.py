"""Render benchmark JSON files as the markdown tables of BENCHMARKS.md.

``python bench/report.py --update BENCHMARKS.md`` rewrites every block between
``<!-- BEGIN GENERATED name -->`` and ``<!-- END GENERATED name -->`` from
``bench/results/name.json`` (blocks whose file is missing say so), so the published figures are
always the measured ones.  ``python bench/report.py bench/results/x.json`` prints one file's tables
(any folder: ``python bench/report.py $OUT/gpu_check.json`` previews the GPU check's).
"""

from __future__ import annotations

import argparse
import json
import re
import statistics
import sys
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "bench" / "results"

#: targets of the reward-backprop benchmark
MEMORY_RATIO_TARGET = 1.3  # checkpointed peak at K = T = 50 over K = 1
TIME_RATIO_TARGET = 1.25  # checkpointed step over the lower bound
PLAN_ERROR_TARGET = 0.20
STEERING_TARGET = 1.05
#: targets of the policy-gradient benchmark
PG_TIME_TARGET = 1.25  # step over its denoiser calls
PG_MEMORY_TARGET = 1.3  # peak at the largest T over the smallest


def _mb(value: float | None) -> str:
    return "-" if value is None else f"{value:,.1f}"


def _s(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f}"


def _table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    return "\n".join(lines)


def _machine(payload: dict[str, Any]) -> str:
    m = payload["machine"]
    loads = [r.get("load_before") for r in payload.get("rows", []) if r.get("load_before") is not None]
    code = f" at commit {m['code']}" if m.get("code") else ""
    gpu = f"; GPU {m['gpu']} ({m['gpu_memory_gb']} GB, CUDA {m['cuda']})" if "gpu" in m else ""
    load = (f"; 1-min load average before the rows: median {statistics.median(loads):.2f}, range "
            f"{min(loads):.2f}-{max(loads):.2f}" if loads else "")
    return (f"Machine: {m['cpu']}, {m['cpu_cores']} cores, {m['memory_gb']} GB RAM{gpu}; torch {m['torch']}, "
            f"diffusers {m['diffusers']}, transformers {m['transformers']}, {m['torch_threads']} torch thread(s); "
            f"run {m['date']}{code}{load}.\n\n" + _commands(payload))


def _machine_and_settings(payload: dict[str, Any]) -> list[str]:
    """The lines opening a table block: the machine line, and the run's settings when the payload has them."""
    out = [_machine(payload), ""]
    settings = payload.get("settings", {})
    if settings:
        out += ["Settings: " + "; ".join(f"{k} {v}" for k, v in settings.items()) + ".", ""]
    return out


def _commands(payload: dict[str, Any]) -> str:
    runs = payload.get("runs")
    if not runs:
        return f"Command: `{payload['command']}`"
    lines = [f"* `{r['command']}` ({r['machine']['date']}" + (f", commit {r['machine']['code']}" if r["machine"].get("code") else "")
             + ")" for r in runs]
    return "Commands (one file, extended with `--resume`):\n\n" + "\n".join(lines)


def _key(row: dict[str, Any]) -> tuple:
    return (row["training"], row["num_steps"], row["truncation_steps"])


def _rb_index(payload: dict[str, Any]) -> dict[tuple, dict[str, dict[str, Any]]]:
    index: dict[tuple, dict[str, dict[str, Any]]] = {}
    for row in payload["rows"]:
        name = row["variant"]
        if name == "ours":
            name = "ckpt" if row["gradient_checkpointing"] else "plain"
        index.setdefault(_key(row), {})[name] = row
    return index


def _trl_index(trl: dict[str, Any] | None) -> dict[tuple, dict[str, Any]]:
    if not trl:
        return {}
    return {_key(r): r for r in trl.get("rows", [])}


def _peak(row: dict[str, Any] | None) -> float | None:
    return None if row is None or "error" in row else row.get("peak_mb")


def _peak_cell(row: dict[str, Any] | None) -> str:
    if row is not None and "skipped" in row:
        if row.get("skip_kind", "memory") != "memory":
            return "not run (time budget)"
        return f"skipped (plan: {row['predicted_total_mb'] / 1024:,.0f} GB)"
    if row is not None and "error" in row:
        return "failed"
    return _mb(_peak(row))


def _time(row: dict[str, Any] | None) -> float | None:
    return None if row is None or "error" in row else row.get("step_time_s")


def _err(row: dict[str, Any] | None) -> str:
    if row is None or "error" in row or not row.get("peak_mb"):
        return "-"
    return f"{(row['predicted_peak_mb'] - row['peak_mb']) / row['peak_mb']:+.0%}"


def reward_backprop_tables(payload: dict[str, Any], trl: dict[str, Any] | None = None) -> str:
    index, trl_rows = _rb_index(payload), _trl_index(trl)
    out = [_machine(payload), ""]
    for training in ("lora", "full"):
        keys = sorted(k for k in index if k[0] == training)
        if not keys:
            continue
        title = "LoRA (rank 4)" if training == "lora" else "full fine-tuning"
        rows = []
        for key in keys:
            r = index[key]
            t = trl_rows.get(key)
            rows.append([
                str(key[1]), str(key[2]),
                _peak_cell(r.get("ckpt")), f"{_mb(r['ckpt']['predicted_peak_mb'])} ({_err(r.get('ckpt'))})" if "ckpt" in r else "-",
                _peak_cell(r.get("plain")), f"{_mb(r['plain']['predicted_peak_mb'])} ({_err(r.get('plain'))})" if "plain" in r else "-",
                _peak_cell(r.get("naive")), _peak_cell(t) if t else "-",
            ])
        out += [f"**Peak memory per optimiser step, MB above the resident weights and optimizer state, {title}**", "",
                _table(["T", "K", "ours, checkpointed", "planner (error)", "ours, no checkpointing", "planner (error)",
                        "naive", "TRL AlignProp"], rows), ""]
        rows = []
        for key in keys:
            r = index[key]
            ckpt = r.get("ckpt")
            lower = (ckpt or {}).get("lower_bound") or {}
            ratio = (_time(ckpt) / lower["step_time_s"]) if _time(ckpt) and lower.get("step_time_s") else None
            rows.append([
                str(key[1]), str(key[2]), _s(_time(ckpt)), _s(lower.get("step_time_s")),
                "-" if ratio is None else f"{ratio:.2f}x {'pass' if ratio <= TIME_RATIO_TARGET else 'FAIL'}",
                _s(_time(r.get("plain"))), _s(_time(r.get("naive"))), _s(_time(trl_rows.get(key))),
            ])
        if not any(_time(r) for key in keys for r in index[key].values()):
            continue  # a memory-only run
        out += [f"**Time per optimiser step, seconds (median), {title}**", "",
                _table(["T", "K", "ours, checkpointed", "lower bound", f"ratio (target <= {TIME_RATIO_TARGET}x)",
                        "ours, no checkpointing", "naive", "TRL AlignProp"], rows), ""]
    return "\n".join(out)


def targets_table(payload: dict[str, Any], trl: dict[str, Any] | None = None, tensors: dict[str, Any] | None = None) -> str:
    index, trl_rows = _rb_index(payload), _trl_index(trl)
    rows = []
    for training in ("lora", "full"):
        k1, k50 = index.get((training, 50, 1), {}).get("ckpt"), index.get((training, 50, 50), {}).get("ckpt")
        if _peak(k1) and _peak(k50):
            ratio = _peak(k50) / _peak(k1)
            rows.append([f"peak memory K=T=50 / K=1, checkpointed, {training}", f"<= {MEMORY_RATIO_TARGET}x",
                         f"{ratio:.2f}x ({_mb(_peak(k50))} / {_mb(_peak(k1))} MB)", "pass" if ratio <= MEMORY_RATIO_TARGET else "FAIL"])
            if k1.get("predicted_resident_mb"):  # weights + AdamW state, counted from the parameters
                base = k1["predicted_resident_mb"]
                total = (base + _peak(k50)) / (base + _peak(k1))
                rows.append([f"the same with the weights and AdamW state ({_mb(base)} MB) included", f"<= {MEMORY_RATIO_TARGET}x",
                             f"{total:.2f}x", "pass" if total <= MEMORY_RATIO_TARGET else "FAIL"])
        ratios = []
        for key, r in index.items():
            lower = (r.get("ckpt") or {}).get("lower_bound") or {}
            if key[0] == training and _time(r.get("ckpt")) and lower.get("step_time_s"):
                ratios.append(_time(r["ckpt"]) / lower["step_time_s"])
        if ratios:
            worst = max(ratios)
            rows.append([f"step time / lower bound, checkpointed, {training} (worst of {len(ratios)} rows)",
                         f"<= {TIME_RATIO_TARGET}x", f"{worst:.2f}x (median {statistics.median(ratios):.2f}x)",
                         "pass" if worst <= TIME_RATIO_TARGET else "FAIL"])
        mem_vs, time_vs = [], []
        for key, t in trl_rows.items():
            ours = index.get(key, {}).get("ckpt")
            if key[0] == training and _peak(t) and _peak(ours):
                mem_vs.append(_peak(ours) / _peak(t))
            if key[0] == training and _time(t) and _time(ours):
                time_vs.append(_time(ours) / _time(t))
        if mem_vs:
            rows.append([f"peak memory ours / TRL AlignProp, {training}, resident set (worst of {len(mem_vs)} rows)", "<= 1.0x",
                         f"{max(mem_vs):.2f}x (median {statistics.median(mem_vs):.2f}x)", "pass" if max(mem_vs) <= 1.0 else "FAIL"])
        tensor_vs = _tensor_ratios(tensors, training)
        if tensor_vs:
            rows.append([f"peak memory ours / TRL AlignProp, {training}, live tensor bytes (worst of {len(tensor_vs)} rows)",
                         "<= 1.0x", f"{max(tensor_vs):.3f}x (median {statistics.median(tensor_vs):.3f}x)",
                         "pass" if max(tensor_vs) <= 1.0 else "FAIL"])
        if time_vs:
            rows.append([f"step time ours / TRL AlignProp, {training} (worst of {len(time_vs)} rows)", "<= 1.0x",
                         f"{max(time_vs):.2f}x (median {statistics.median(time_vs):.2f}x)", "pass" if max(time_vs) <= 1.0 else "FAIL"])
    errors = [abs(r["predicted_peak_mb"] - r["peak_mb"]) / r["peak_mb"] for r in payload["rows"] if _peak(r)]
    if errors:
        worst = max(errors)
        rows.append([f"planner error on the measured step peaks ({len(errors)} rows)", f"<= {PLAN_ERROR_TARGET:.0%}",
                     f"worst {worst:.1%}, median {statistics.median(errors):.1%}", "pass" if worst <= PLAN_ERROR_TARGET else "FAIL"])
    if "gpu" in payload["machine"]:  # on CUDA the resident memory is weights + state only: totals compare too
        totals = [abs(r["predicted_total_mb"] - r["resident_mb"] - r["peak_mb"]) / (r["resident_mb"] + r["peak_mb"])
                  for r in payload["rows"] if _peak(r)]
        if totals:
            worst = max(totals)
            rows.append([f"planner error on the total peak ({len(totals)} rows)", f"<= {PLAN_ERROR_TARGET:.0%}",
                         f"worst {worst:.1%}, median {statistics.median(totals):.1%}", "pass" if worst <= PLAN_ERROR_TARGET else "FAIL"])
    return _table(["target", "goal", "measured", "result"], rows)


def _tensor_ratios(tensors: dict[str, Any] | None, training: str) -> list[float]:
    by: dict[tuple, dict[str, dict[str, Any]]] = {}
    for r in (tensors or {}).get("rows", []):
        by.setdefault(_key(r), {})[r["variant"]] = r
    return [_peak(v["ours"]) / _peak(v["trl_alignprop"]) for k, v in by.items()
            if k[0] == training and _peak(v.get("ours")) and _peak(v.get("trl_alignprop"))]


def trl_status(trl: dict[str, Any] | None) -> str:
    if trl is None:
        return "TRL AlignProp: no result file."
    status = trl.get("status", "unknown")
    ok = [r for r in trl.get("rows", []) if "error" not in r]
    failed = [r for r in trl.get("rows", []) if "error" in r]
    versions = sorted({r.get("trl_version") for r in ok if r.get("trl_version")})
    text = f"TRL AlignProp: {status}; {len(ok)} rows ran" + (f" (trl {', '.join(versions)})" if versions else "")
    moved = [r["weight_change_l1"] for r in ok if r.get("weight_change_l1") is not None]
    if moved:
        text += (f"; its trainable weights moved in {sum(m > 0 for m in moved)} of {len(moved)} rows "
                 f"(smallest L1 change {min(moved):.3g})")
    if failed:
        text += f"; {len(failed)} rows failed: {failed[0]['error']} {' | '.join(failed[0].get('log', []))}"
    return text + "."


def steering_tables(payload: dict[str, Any]) -> str:
    out = [_machine(payload), ""]
    out += _fk_table(payload["rows"])
    rlg = [r for r in payload["rows"] if r["kind"] == "rlg" and "error" not in r]
    if rlg:
        rows = [[str(r["samples"]), f"{r['median_s']['one_forward'] * 1e3:.0f}", f"{r['median_s']['rlg_batched'] * 1e3:.0f}",
                 f"{r['ratio']:.3f}x {'pass' if r['ratio'] <= STEERING_TARGET else 'FAIL'}",
                 f"{r['median_s']['rlg_two_forwards'] * 1e3:.0f} ({r['ratio_two_forwards']:.3f}x)"] for r in rlg]
        out += ["**RL guidance, one step (base and aligned model, each with CFG) vs one batched forward of the same rows**", "",
                _table(["samples", "one batched forward, ms", "RLG step (one forward, row-masked LoRA), ms",
                        f"ratio (target <= {STEERING_TARGET}x)", "two-forward fallback, ms (ratio)"], rows), ""]
    mem = [r for r in payload["rows"] if r["kind"] == "memory" and "error" not in r]
    if mem:
        particles = sorted({r["particles"] for r in mem})
        by = {(r["chunk"], r["particles"]): r["peak_mb"] for r in mem}
        rows = [[f"chunks of {c}" if c else "not chunked"] + [_mb(by.get((c, k))) for k in particles]
                for c in sorted({r["chunk"] for r in mem}, key=lambda c: c or 0)]
        out += ["**Peak memory of a whole FK run (MB above the loaded model) as particles grow**", "",
                _table(["decode, reward and denoiser calls"] + [f"{k} particles" for k in particles], rows), ""]
    failed = [r for r in payload["rows"] if "error" in r]
    if failed:
        out.append(f"{len(failed)} rows failed: " + "; ".join(f"{r['kind']}: {r['error']}" for r in failed))
    return "\n".join(out)


def _fk_table(rows: list[dict[str, Any]]) -> list[str]:
    """FK steering over plain sampling, one line per measured FK row (none: no lines)."""
    fk = [r for r in rows if r["kind"] == "fk" and "ratio" in r]
    if not fk:
        return []
    lines = [[str(r["particles"]), str(r["num_steps"]), str(r["fk_config"]["resample_steps"]), _s(r["fk_net_s"]),
              _s(r["plain_net_s"]), f"{r['ratio']:.3f}x {'pass' if r['ratio'] <= STEERING_TARGET else 'FAIL'}"] for r in fk]
    return ["**FK steering over plain batched sampling of the same particles, equal steps, decode + reward time excluded**",
            "", _table(["particles", "steps", "potential steps", "FK, s", "plain, s", f"ratio (target <= {STEERING_TARGET}x)"], lines), ""]


def tensor_peaks_table(payload: dict[str, Any]) -> str:
    """Ours vs TRL in live tensor bytes, row by row, with the worst ratio."""
    by: dict[tuple, dict[str, dict[str, Any]]] = {}
    for r in payload["rows"]:
        by.setdefault(_key(r), {})[r["variant"]] = r
    rows, ratios = [], []
    for key in sorted(by):
        ours, trl = by[key].get("ours"), by[key].get("trl_alignprop")
        ratio = _peak(ours) / _peak(trl) if _peak(ours) and _peak(trl) else None
        if ratio is not None:
            ratios.append(ratio)
        rows.append(["LoRA (rank 4)" if key[0] == "lora" else "full", str(key[1]), str(key[2]), _peak_cell(ours), _peak_cell(trl),
                     "-" if ratio is None else f"{ratio:.3f}x {'pass' if ratio <= 1.0 else 'FAIL'}"])
    out = [_machine(payload), "", _table(["training", "T", "K", "ours, checkpointed, MB", "TRL AlignProp, MB",
                                          "ours / TRL (target <= 1.0x)"], rows)]
    if ratios:
        out += ["", f"Worst ratio {max(ratios):.3f}x over {len(ratios)} rows ({'pass' if max(ratios) <= 1.0 else 'FAIL'})."]
    return "\n".join(out)


def plan_presets_table(payload: dict[str, Any]) -> str:
    rows = []
    for r in payload["rows"]:
        fits = ""
        if "max_batch_24gb" in r:
            fits = " / ".join(
                f"batch {r[f'max_batch_{b}gb'] or 'none'}, K {r[f'max_k_{b}gb'] or 'none'}" for b in (24, 80)
            )
        rows.append([
            f"{r['model']} {r['resolution']} px", {"no": "fp32", "bf16": "bf16", "fp16": "fp16"}[r["mixed_precision"]],
            "LoRA" if r["training"] == "lora" else "full", "on" if r["gradient_checkpointing"] else "off",
            str(r["truncation_steps"]), f"{r['predicted_peak_mb'] / 1024:.2f}", r["predicted_phase"],
            f"{r['predicted_total_mb'] / 1024:.1f}", fits,
        ])
    return (f"Command: `{payload['command']}`\n\n"
            + _table(["model", "precision", "training", "checkpointing", "K (T=50)", "step peak, GB", "peak phase",
                      "total, GB", "fits 24 GB / 80 GB at K=1 (largest batch, largest K)"], rows))


def _spread(figure: dict[str, Any], digits: int, sign: str = "") -> str:
    return f"{figure['mean']:{sign}.{digits}f} ± {figure['std']:.{digits}f}"


def fk_potentials_tables(payload: dict[str, Any]) -> str:
    """Bias, variance ratio and ESS/k of each FK potential by tilt and particles, beside the k -> infinity limit."""
    setup = payload["setup"]
    rows = [r for r in payload["rows"] if r["kind"] == "fk"]
    limits = {r["lambda"]: r for r in payload["rows"] if r["kind"] == "limit"}
    particles = sorted({r["particles"] for r in rows})
    by = {(r["lambda"], r["potential"], r["particles"]): r for r in rows}
    keys = sorted({(r["lambda"], r["potential"]) for r in rows})
    mixture = " + ".join(f"{w:g} N({m[0]:g}, {sd:g}^2)" for w, m, sd in
                         zip(setup["mixture"]["weights"], setup["mixture"]["means"], setup["mixture"]["stds"]))
    out = [_machine(payload), "",
           f"Data {mixture}, reward {setup['reward']}, {setup['sampler']} with {setup['steps']} steps, potentials at steps "
           f"{setup['potential_steps']}, {setup['resampler']} resampling; {setup['total_particles']} particles per run "
           f"(G = {setup['total_particles']} / k prompt groups), mean ± standard deviation over {setup['seeds']} seeds. "
           f"Last column: the k -> infinity limit of every potential, the sampler's own law tilted by exact weights "
           f"({setup['limit_particles']} draws per seed, pooled; ± its standard error).", ""]

    def cells(lam: float, potential: str, key: str, digits: int) -> list[str]:
        sign = "+" if key == "bias" else ""
        return [_spread(by[(lam, potential, k)][key], digits, sign) if (lam, potential, k) in by else "-" for k in particles]

    def limit(lam: float, key: str, digits: int) -> list[str]:
        row = limits.get(lam)
        if row is None:
            return []
        if key == "bias":
            return [f"{row[key]:+.{digits}f} ± {row['bias_standard_error']:.{digits}f}"]
        return [f"{row[key]:.{digits}f}"]

    head = ["lambda", "potential"] + [f"k = {k}" for k in particles]
    tail = ["k -> infinity"] if limits else []
    out += ["**Bias of the mean: FK's law minus the exact tilted target**", "",
            _table(head + tail, [[f"{lam:g}", p, *cells(lam, p, "bias", 3), *limit(lam, "bias", 3)] for lam, p in keys]), ""]
    out += ["**Variance of FK's law over the target's**", "",
            _table(head + tail, [[f"{lam:g}", p, *cells(lam, p, "variance_ratio", 2), *limit(lam, "variance_ratio", 2)]
                                 for lam, p in keys]), ""]
    out += ["**Effective sample size of the final weights over k**", "",
            _table(head, [[f"{lam:g}", p, *cells(lam, p, "ess_fraction", 3)] for lam, p in keys]), ""]
    return "\n".join(out)


def reward_server_table(payload: dict[str, Any]) -> str:
    """Throughput, latency and accounting of the reward server under concurrent clients, batching off and on."""
    settings = payload["settings"]
    groups: dict[tuple, list[dict[str, Any]]] = {}
    for r in payload["rows"]:
        groups.setdefault((r["reward"], r["max_batch_size"]), []).append(r)
    rows = []
    for (reward, max_batch), runs in groups.items():
        def median(key: str, runs: list[dict[str, Any]] = runs) -> float:
            return statistics.median(r[key] for r in runs)

        speeds = [r["images_per_second"] for r in runs]
        batching = "off (one request per call)" if max_batch == 1 else f"up to {max_batch} images, {runs[0]['max_delay_ms']:g} ms"
        rows.append([
            reward, batching, f"{median('images_per_second'):.0f} ({min(speeds):.0f}-{max(speeds):.0f})",
            f"{median('latency_p50_ms'):.0f}", f"{median('latency_p99_ms'):.0f}", f"{median('mean_batch_images'):.1f}",
            " / ".join(str(sum(r[k] for r in runs)) for k in ("lost", "duplicated", "mismatched")),
            f"{max(r['max_difference'] for r in runs):.1e}",
        ])
    header = (f"{settings['clients']} client processes x {settings['requests']} requests x {settings['images']} images "
              f"({settings['size']}x{settings['size']}) per run, {settings.get('repeats', 1)} runs per row (alternating "
              f"batching off and on; medians, images/s with its range), every answer checked against the in-process "
              f"reward (tolerance {settings['tolerance']:g}; lost, duplicated and mismatched summed over the runs).")
    return "\n".join([_machine(payload), "", header, "", _table(
        ["reward", "batching", "images/s (range)", "p50 latency, ms", "p99 latency, ms", "images per call",
         "lost / duplicated / mismatched", "max abs. difference"], rows)])


def _gpu_draft_tables(rows: list[dict[str, Any]], on_gpu: bool) -> list[str]:
    """DRaFT-K rows of the GPU check: measured peak and time beside the planner, then the targets."""
    draft = [r for r in rows if r["kind"] == "draft"]
    if not draft:
        return []
    lines = []
    for r in draft:
        planned = f"{_mb(r['predicted_peak_mb'])} ({_err(r)})" if "predicted_peak_mb" in r else "-"
        total = _mb(r.get("predicted_total_mb"))
        lines.append([f"{r['model']} {r['resolution']} px", str(r["num_steps"]), str(r["truncation_steps"]),
                      "on" if r["gradient_checkpointing"] else "off", str(r["batch_size"]), _peak_cell(r), planned, total,
                      _s(_time(r))])
    precision = {r["mixed_precision"] for r in draft}.pop() if len({r["mixed_precision"] for r in draft}) == 1 else "mixed"
    out = [f"**DRaFT-K LoRA (rank 4) optimiser step, {precision}, CFG 7.5: peak memory above the weights and AdamW state, "
           "and time per step (median)**", "",
           _table(["model", "T", "K", "checkpointing", "batch", "peak, MB", "planner, MB (error)", "planner total, MB",
                   "step, s"], lines), ""]
    targets = []
    for model in dict.fromkeys(r["model"] for r in draft):
        ckpt = {r["truncation_steps"]: r for r in draft if r["model"] == model and r["gradient_checkpointing"]
                and r["batch_size"] == 1 and r["truncation_steps"] in (1, r["num_steps"])}
        low, high = ckpt.get(1), ckpt.get(max(ckpt, default=1))
        if low is not high and _peak(low) and _peak(high):
            ratio = _peak(high) / _peak(low)
            targets.append([f"{model}: peak at K = T = {high['truncation_steps']} over K = 1, checkpointed",
                            f"<= {MEMORY_RATIO_TARGET}x", f"{ratio:.2f}x", "pass" if ratio <= MEMORY_RATIO_TARGET else "FAIL"])
    measured = [r for r in draft if _peak(r) and "predicted_peak_mb" in r]
    if measured:
        errors = [abs(r["predicted_peak_mb"] - r["peak_mb"]) / r["peak_mb"] for r in measured]
        targets.append([f"planner error on the step peak ({len(errors)} rows)", f"<= {PLAN_ERROR_TARGET:.0%}",
                        f"worst {max(errors):.1%}, median {statistics.median(errors):.1%}",
                        "pass" if max(errors) <= PLAN_ERROR_TARGET else "FAIL"])
        if on_gpu:  # on CUDA the resident memory is the weights and optimizer state: totals compare too
            totals = [abs(r["predicted_total_mb"] - r["resident_mb"] - r["peak_mb"]) / (r["resident_mb"] + r["peak_mb"])
                      for r in measured]
            targets.append([f"planner error on the total peak ({len(totals)} rows)", f"<= {PLAN_ERROR_TARGET:.0%}",
                            f"worst {max(totals):.1%}, median {statistics.median(totals):.1%}",
                            "pass" if max(totals) <= PLAN_ERROR_TARGET else "FAIL"])
    if targets:
        out += ["**Targets**", "", _table(["target", "goal", "measured", "result"], targets), ""]
    return out


def _gpu_precision_table(rows: list[dict[str, Any]]) -> list[str]:
    """The half-precision checks: finite training and sampling, the VAE decoder's compute dtype."""
    checks = [r for r in rows if r["kind"] == "precision"]
    if not checks:
        return []
    lines = []
    for r in checks:
        short = {"torch.float32": "fp32", "torch.float16": "fp16", "torch.bfloat16": "bf16"}
        if "checks" not in r:
            lines.append([f"{r['model']} {r['resolution']} px", r["mixed_precision"], "yes" if r["upcast_vae"] else "no",
                          "-", "-", "-", "-", "-", _peak_cell(r) if "skipped" in r else f"failed: {r.get('error', '')}"])
            continue
        seen = "/".join(",".join(short.get(d, d) for d in r[k]) for k in ("training_conv_dtypes", "sampling_conv_dtypes"))
        failed = [name for name, ok in r["checks"].items() if not ok]
        lines.append([
            f"{r['model']} {r['resolution']} px", r["mixed_precision"], "yes" if r["upcast_vae"] else "no",
            "yes" if r["vae_force_upcast"] else "no", f"{short[r['expected_decode_dtype']]} / {seen}",
            ", ".join(f"{s['loss']:.4f}" for s in r["steps"]), ", ".join(f"{s['grad_norm']:.3g}" for s in r["steps"]),
            f"{r['image_range'][0]:.3f}..{r['image_range'][1]:.3f}", "pass" if r["passed"] else "FAIL: " + ", ".join(failed),
        ])
    return ["**Half precision: DRaFT LoRA steps and sampled images; the VAE decoder's convolutions (hooked, forward and "
            "checkpoint recomputation) compute in float32 exactly when the VAE is upcast**", "",
            _table(["model", "precision", "upcast_vae", "VAE force_upcast", "decoder dtype: expected / seen (training/sampling)",
                    "losses", "gradient norms", "pixels", "result"], lines), ""]


def gpu_check_tables(payload: dict[str, Any]) -> str:
    """The prepared GPU check (bench/gpu/run.py): DRaFT-K rows, precision checks, FK overhead, what did not run."""
    rows, settings = payload["rows"], payload["settings"]
    budget = settings.get("memory_budget_mb")
    out = [_machine(payload), "",
           f"Profile `{settings['profile']}`: {len(rows)} rows in {payload.get('elapsed_s', 0):.0f} s (no row starts past "
           f"{settings['deadline_s']:.0f} s); memory budget {'none' if budget is None else f'{budget:,.0f} MB'}; "
           f"sources digest `{settings['source_digest']}`.", ""]
    out += _gpu_draft_tables(rows, "gpu" in payload["machine"])
    out += _gpu_precision_table(rows)
    out += _fk_table(rows)
    not_run = [r for r in rows if "skipped" in r or "error" in r]
    if not_run:
        out.append("Not measured: " + "; ".join(f"`{r['id']}`: {r.get('skipped') or r.get('error')}" for r in not_run) + ".")
    return "\n".join(out).rstrip()


def policy_gradient_tables(payload: dict[str, Any]) -> str:
    """Time split and memory of policy-gradient steps, ours next to the lower bound and the naive loop, per T."""
    out = _machine_and_settings(payload)
    ok = [r for r in payload["rows"] if "error" not in r]
    rows = [r for r in ok if not r.get("reward_latency") and not r.get("sequential")]
    by = {(r["variant"], r["num_steps"]): r for r in rows}
    steps = sorted({r["num_steps"] for r in rows})
    timed = [t for t in steps if by.get(("ours", t), {}).get("split")]
    if timed:
        table = []
        for t in timed:
            ours, naive = by[("ours", t)], by.get(("naive", t))
            sp = ours["split"]
            ratio = sp["step_s"] / ours["lower_bound_s"]
            table.append([str(t), str(ours["micro_steps"]), _s(sp["rollout_s"]), _s(sp["reward_wait_s"]),
                          _s(sp["reward_busy_s"]), _s(sp["train_s"]), _s(sp["step_s"]), _s(ours["lower_bound_s"]),
                          f"{ratio:.2f}x {'pass' if ratio <= PG_TIME_TARGET else 'FAIL'}",
                          _s(naive.get("step_time_s")) if naive else "-"])
        out += ["**Time per optimiser step (median, seconds): one rollout and its training pass**", "",
                _table(["T", "micro-steps", "rollout (sampling + decode)", "waiting for the reward", "reward (worker)",
                        "training pass", "step", "lower bound", f"step / lower bound (target <= {PG_TIME_TARGET}x)",
                        "naive step"], table), ""]
    mem = [t for t in steps if ("ours", t) in by]
    if mem:
        base = by[("ours", mem[0])]["peak_mb"]
        table = [[str(t), str(by[("ours", t)]["micro_steps"]), _mb(by[("ours", t)]["peak_mb"]),
                  f"{by[('ours', t)]['peak_mb'] / base:.2f}x", _mb(by.get(("naive", t), {}).get("peak_mb"))] for t in mem]
        flat = by[("ours", mem[-1])]["peak_mb"] / base
        out += [f"**Peak memory per optimiser step, MB above the resident weights and optimizer state** (ours at T={mem[-1]} "
                f"over T={mem[0]}: {flat:.2f}x, target <= {PG_MEMORY_TARGET}x: {'pass' if flat <= PG_MEMORY_TARGET else 'FAIL'})",
                "", _table(["T", "micro-steps (trained steps x micro-batches)", "ours", "ours / smallest T", "naive"], table), ""]
    remote = [r for r in ok if r.get("reward_latency") and r.get("split")]
    if remote:
        table = [[str(r["num_steps"]), f"{r['reward_latency']:g}", "main thread" if r.get("sequential") else "worker",
                  _s(r["split"]["rollout_s"]), _s(r["split"]["reward_busy_s"]), _s(r["split"]["reward_wait_s"]),
                  _s(r["split"]["step_s"])] for r in sorted(remote, key=lambda r: (r["num_steps"], bool(r.get("sequential"))))]
        out += ["**A slow (remote-like) reward: seconds added per reward call, scored in the worker while the next chunk "
                "is sampled, or on the main thread after each chunk**", "",
                _table(["T", "added latency per call, s", "scored on", "rollout (sampling + decode)", "reward (busy)",
                        "waiting for the reward", "step"], table), ""]
    failed = [r for r in payload["rows"] if "error" in r]
    if failed:
        out.append(f"{len(failed)} rows failed: " + "; ".join(f"{r['variant']} T={r['num_steps']}: {r['error']}" for r in failed))
    return "\n".join(out)


def sharding_tables(payload: dict[str, Any]) -> str:
    """Per-process step time, trained state and resident peak of FSDP against the unsharded paths."""
    out = _machine_and_settings(payload)
    ok = [r for r in payload["rows"] if "error" not in r]
    base = next((r for r in ok if r["variant"] == "plain-1"), None)
    table = []
    for r in ok:
        ranks = r["ranks"]
        step = max(x["step_time_s"] for x in ranks)  # a step ends when its slowest process does
        state = max(x["weights_mb"] + x["gradients_mb"] + x["adam_mb"] for x in ranks)
        rss = max(x["rss_peak_mb"] for x in ranks)
        vs = f"{step / max(x['step_time_s'] for x in base['ranks']):.2f}x" if base else "-"
        table.append([r["variant"], str(r["processes"]), r["sharding"], _s(step), vs,
                      _mb(max(x["weights_mb"] for x in ranks)), _mb(max(x["gradients_mb"] for x in ranks)),
                      _mb(max(x["adam_mb"] for x in ranks)), _mb(state), _mb(rss)])
    out += ["**Per process: median optimiser-step time and memory (MB)**", "",
            _table(["variant", "processes", "sharding", "step, s", "step / plain-1", "weights", "gradients",
                    "AdamW state", "trained state", "resident peak (VmHWM)"], table), ""]
    failed = [r for r in payload["rows"] if "error" in r]
    if failed:
        out.append(f"{len(failed)} rows failed: " + "; ".join(f"{r['variant']}: {r['error']}" for r in failed))
    return "\n".join(out)


def gpu_sharding_table(payload: dict[str, Any]) -> str:
    """Per-GPU peak of full fine-tuning, unsharded and FSDP over P processes, beside align plan's prediction."""
    out = _machine_and_settings(payload)
    table = []
    for r in payload["rows"]:
        if "error" in r:
            table.append([str(r["processes"]), r["sharding"], "failed: " + r["error"], "-", "-", "-", "-"])
            continue
        err = (r["predicted_total_mb"] - r["peak_mb"]) / r["peak_mb"]
        table.append([str(r["processes"]), r["sharding"], _mb(r["peak_mb"]), _mb(r["predicted_total_mb"]), f"{err:+.0%}",
                      _mb(r["predicted_state_mb"]), _s(r["step_time_s"])])
    out += ["**Per-GPU memory of full fine-tuning (MB): measured peak of an optimiser step and align plan's prediction**",
            "", _table(["processes", "sharding", "measured peak", "predicted peak", "prediction error",
                        "predicted weights + gradients + AdamW", "step, s (collectives faked)"], table)]
    return "\n".join(out)


def _load(name: str, folder: Path = RESULTS) -> dict[str, Any] | None:
    path = folder / f"{name}.json"
    return json.loads(path.read_text()) if path.is_file() else None


def render(name: str, folder: Path = RESULTS) -> str:
    """The markdown of one generated block: ``folder/name.json`` (and its companion files there)."""
    data = _load(name, folder)
    if data is None:
        return f"*Pending: `bench/results/{name}.json` has not been produced yet (see the command above).*"
    if data["benchmark"] == "reward_backprop":
        trl = _load(name.replace("reward_backprop", "trl_alignprop"), folder)
        tensors = _load(name.replace("reward_backprop", "tensor_peaks"), folder)
        parts = [reward_backprop_tables(data, trl)] + ([trl_status(trl)] if trl else [])
        return "\n\n".join(parts + ["**Targets**", targets_table(data, trl, tensors)])
    if data["benchmark"] == "steering":
        return steering_tables(data)
    if data["benchmark"] == "trl_alignprop":
        return trl_status(data)
    if data["benchmark"] == "tensor_peaks":
        return tensor_peaks_table(data)
    if data["benchmark"] == "plan_presets":
        return plan_presets_table(data)
    if data["benchmark"] == "fk_potentials":
        return fk_potentials_tables(data)
    if data["benchmark"] == "reward_server":
        return reward_server_table(data)
    if data["benchmark"] == "gpu_check":
        return gpu_check_tables(data)
    if data["benchmark"] == "policy_gradient":
        return policy_gradient_tables(data)
    if data["benchmark"] == "method_comparison":
        return method_comparison_table(data)
    if data["benchmark"] == "sharding":
        return sharding_tables(data)
    if data["benchmark"] == "gpu_sharding":
        return gpu_sharding_table(data)
    raise ValueError(f"unknown benchmark {data['benchmark']!r}")


def method_comparison_table(payload: dict[str, Any]) -> str:
    """Held-out reward reached against denoiser forward passes, one column per method."""
    out = [_machine(payload), ""]
    rows = [r for r in payload["rows"] if "error" not in r]
    out += [f"Reward {payload['reward']}, {payload['num_steps']} sampling steps, no CFG, budget {payload['budget']:,} "
            f"forward passes per method; held-out reward: mean of {payload['heldout_seeds']} fixed seeds.", ""]
    table = []
    for r in rows:
        first, last = r["curve"][0], r["curve"][-1]
        best = max(p["heldout_reward"] for p in r["curve"])
        table.append([r["variant"], f"{r['forward_passes_first_step']:,}", str(last["steps"]), f"{last['seconds']:.0f}",
                      f"{first['heldout_reward']:.4f}", f"{last['heldout_reward']:.4f}",
                      f"{last['heldout_reward'] - first['heldout_reward']:+.4f}", f"{best:.4f}"])
    out.append(_table(["method", "forward passes / step", "steps", "train s", "held-out before", "held-out after",
                       "gain", "best along the way"], table))
    curve = []
    for r in rows:
        curve.append([r["variant"]] + [f"{p['forward_passes']:,}: {p['heldout_reward']:.4f}" for p in r["curve"]])
    width = max(len(c) for c in curve)
    out += ["", "**Held-out reward along the budget (forward passes: reward)**", "",
            _table(["method"] + [f"point {k}" for k in range(width - 1)], [c + ["-"] * (width - len(c)) for c in curve])]
    return "\n".join(out)


BLOCK = re.compile(r"(<!-- BEGIN GENERATED (\S+) -->\n)(.*?)(<!-- END GENERATED \2 -->)", re.S)


def update(path: Path) -> int:
    text = path.read_text()
    new = BLOCK.sub(lambda m: m.group(1) + render(m.group(2)) + "\n" + m.group(4), text)
    path.write_text(new)
    print(f"updated {len(BLOCK.findall(text))} generated blocks in {path}")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("names", nargs="*", help="result names under bench/results (without .json) to print")
    parser.add_argument("--update", type=Path, help="rewrite the generated blocks of this markdown file")
    args = parser.parse_args(argv)
    if args.update:
        return update(args.update)
    for name in args.names:
        path = Path(name)
        print(render(path.stem, path.parent if path.suffix == ".json" else RESULTS))
    return 0


if __name__ == "__main__":
    sys.exit(main())
