"""The prepared GPU check (bench/gpu/run.sh) in its CPU smoke version: every row present, finite
numbers, the planner's prediction beside every measured peak, the precision checks passed; its time and
memory guards; the wheel installation of run.sh; the report renderer."""

import base64
import hashlib
import json
import math
import os
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
RUN_SH = ROOT / "bench" / "gpu" / "run.sh"
sys.path.insert(0, str(ROOT))

from bench import report  # noqa: E402
from bench.gpu import run as gpu  # noqa: E402


def _env(**extra: str) -> dict[str, str]:
    return {**os.environ, "PYTHON": sys.executable, "OMP_NUM_THREADS": "1", **extra}


@pytest.fixture(scope="module")
def smoke(tmp_path_factory) -> dict:
    """One smoke run (one to two minutes on 2 cores), through the entry point run.sh calls."""
    out = tmp_path_factory.mktemp("gpu-smoke")
    assert gpu.main(["--smoke", "--out", str(out)]) == 0
    return json.loads((out / "gpu_check_smoke.json").read_text())


def _ids(profile: gpu.Profile) -> list[str]:
    return [rid for unit in profile.units for rid in unit.row_ids]


def test_every_planned_row_is_present_in_order(smoke):
    assert [r["id"] for r in smoke["rows"]] == _ids(gpu.smoke_profile())
    assert smoke["benchmark"] == "gpu_check" and smoke["command"].startswith("python bench/gpu/run.py --smoke")
    assert smoke["machine"]["cpu_cores"] >= 1 and "code" in smoke["machine"]
    assert smoke["settings"]["source_digest"] == gpu.source_digest()
    assert 0 < smoke["elapsed_s"] < smoke["settings"]["deadline_s"]


def test_measured_draft_rows_have_finite_figures_and_a_prediction_beside_them(smoke):
    measured = [r for r in smoke["rows"] if r["kind"] == "draft" and "skipped" not in r]
    assert {(r["model"], r["truncation_steps"]) for r in measured} == {("tiny-sd", 1), ("tiny-sd", 2), ("tiny-sdxl", 2)}
    for r in measured:
        assert "error" not in r, r
        for key in ("peak_mb", "resident_mb", "step_time_s", "predicted_peak_mb", "predicted_total_mb", "predicted_resident_mb"):
            assert math.isfinite(r[key]) and r[key] > 0, (r["id"], key, r[key])
        assert len(r["step_times_s"]) == 1 and r["gradient_checkpointing"] and r["mixed_precision"] == "bf16"
        # weights + AdamW state + the step's peak: the total is the sum of its parts
        assert r["predicted_total_mb"] == pytest.approx(r["predicted_resident_mb"] + r["predicted_peak_mb"])


def test_a_row_predicted_over_the_memory_budget_is_skipped_not_run(smoke):
    (row,) = [r for r in smoke["rows"] if r.get("batch_size") == 4096]
    budget = smoke["settings"]["memory_budget_mb"]
    assert row["skip_kind"] == "memory" and "peak_mb" not in row and "wall_s" not in row
    assert row["predicted_total_mb"] > budget
    assert row["skipped"] == f"predicted {row['predicted_total_mb']:,.0f} MB > the {budget:,.0f} MB memory budget"


def test_precision_checks_passed_with_the_decoder_in_the_expected_dtype(smoke):
    rows = {r["id"]: r for r in smoke["rows"] if r["kind"] == "precision"}
    expected = {
        "precision/tiny-sd/64px/fp16": "torch.float32",  # the VAE's force_upcast
        "precision/tiny-sd/64px/bf16": "torch.bfloat16",
        "precision/tiny-sd/64px/bf16+upcast_vae": "torch.float32",
        "precision/tiny-sdxl/64px/fp16": "torch.float32",
    }
    assert set(rows) == set(expected)
    for rid, dtype in expected.items():
        r = rows[rid]
        assert r["passed"] and all(r["checks"].values()), (rid, r["checks"])
        assert r["expected_decode_dtype"] == dtype
        assert r["training_conv_dtypes"] == [dtype] and r["sampling_conv_dtypes"] == [dtype]
        # two training steps decode once each, and the checkpointed decoder's blocks run again in the backward
        assert r["training_conv_calls"] > 2 * r["sampling_conv_calls"] > 0
        assert len(r["steps"]) == 2 and all(math.isfinite(s["loss"]) and math.isfinite(s["grad_norm"]) for s in r["steps"])
        assert r["denoiser_dtype"] == {"fp16": "torch.float16", "bf16": "torch.bfloat16"}[r["mixed_precision"]]


def test_fk_row_has_finite_times(smoke):
    (row,) = [r for r in smoke["rows"] if r["kind"] == "fk"]
    assert row["particles"] == 2 and row["num_steps"] == 4
    assert row["fk_net_s"] > 0 and row["plain_net_s"] > 0
    assert row["ratio"] == pytest.approx(row["fk_net_s"] / row["plain_net_s"])
    assert row["counts"]["fk"]["model_calls"] == row["counts"]["plain"]["model_calls"] == 4  # equal steps


def test_report_renders_every_part_of_the_check(smoke, tmp_path):
    (tmp_path / "gpu_check.json").write_text(json.dumps(smoke))
    text = report.render("gpu_check", tmp_path)
    assert "| tiny-sd 64 px | 2 | 1 | on | 1 |" in text and "| tiny-sdxl 64 px | 2 | 2 | on | 1 |" in text
    assert "skipped (plan: " in text and "planner error on the step peak (3 rows)" in text
    precision = text[text.index("**Half precision"):text.index("**FK steering over plain batched sampling")]
    assert precision.count("| pass |") == 4 and "FAIL" not in precision  # the four cases
    assert "Not measured: `draft/tiny-sd/64px/T2/K2/batch4096`: predicted" in text


# --------------------------------------------------------------------------- the guards, without a GPU


def test_run_sh_past_the_deadline_records_every_row_as_not_run(tmp_path):
    proc = subprocess.run(["bash", str(RUN_SH), "--smoke", "--deadline-s", "0", "--out", str(tmp_path)],
                          capture_output=True, text=True, env=_env(), timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    payload = json.loads((tmp_path / "gpu_check_smoke.json").read_text())
    assert [r["id"] for r in payload["rows"]] == _ids(gpu.smoke_profile())
    assert all(r["skip_kind"] == "time" and "wall_s" not in r for r in payload["rows"])
    assert "smoke check: 9 rows" in proc.stdout and "9 skipped (time)" in proc.stdout


def test_worker_time_is_the_cap_cut_to_what_is_left():
    assert gpu.worker_timeout(90, 400) == 90
    assert gpu.worker_timeout(90, 60) == 60
    assert gpu.worker_timeout(90, gpu.MIN_START_S) == gpu.MIN_START_S
    assert gpu.worker_timeout(90, gpu.MIN_START_S - 0.1) is None


def test_memory_budget_rule():
    assert gpu.over_budget({"predicted_total_mb": 100.0}, None) is None
    assert gpu.over_budget({"predicted_total_mb": 100.0}, 100.0) is None
    assert gpu.over_budget({"predicted_total_mb": 100.5}, 100.0) == "predicted 100 MB > the 100 MB memory budget"


def test_gpu_plan_measures_what_the_check_promises():
    profile = gpu.gpu_profile()
    draft = [u.job for u in profile.units if u.kind == "draft"]
    checkpointed = {(j["model"], j["resolution"], j["truncation_steps"]) for j in draft if j["gradient_checkpointing"]}
    assert checkpointed == {(m, r, k) for m, r in (("sd15", 512), ("sdxl", 1024)) for k in (1, 10, 50)}
    assert {(j["mixed_precision"], j["num_steps"], j["training"], j["device"]) for j in draft} == {("bf16", 50, "lora", "cuda")}
    assert len(set(_ids(profile))) == len(_ids(profile))
    # no worker outlives the deadline (each is cut to the time left), and 8 minutes leave room for the install
    assert profile.deadline_s <= 450 and all(u.cap_s <= profile.deadline_s for u in profile.units)
    cases = {precision for u in profile.units if u.kind == "precision" for precision in map(gpu.precision_id, u.job["cases"])}
    assert {"precision/sd15/512px/fp16", "precision/sd15/512px/bf16", "precision/sd15/512px/bf16+upcast_vae"} <= cases


class _RecordingPool:
    """Stands in for the thread pool: records what the planner workers would be asked to trace."""

    def __init__(self):
        self.jobs = []

    def submit(self, fn, script, job, timeout):
        from concurrent.futures import Future

        self.jobs.append(job)
        future = Future()
        future.set_result({"predictions": {gpu.draft_id(j): {"predicted_total_mb": float(j["truncation_steps"])}
                                           for j in job["jobs"]}})
        return future


@pytest.mark.parametrize("workers,expected", [(1, [["sd15", "sdxl"]]), (2, [["sd15"], ["sdxl"]]), (3, [["sd15"], ["sdxl"]])])
def test_planner_workers_share_the_models_and_answer_every_draft_row(workers, expected):
    import dataclasses

    profile = dataclasses.replace(gpu.gpu_profile(), prediction_workers=workers)
    pool = _RecordingPool()
    predictions = gpu.Predictions(profile, pool, timeout_s=10)
    assert [list(dict.fromkeys(j["model"] for j in job["jobs"])) for job in pool.jobs] == expected
    draft = [u.job for u in profile.units if u.kind == "draft"]
    assert sum(len(job["jobs"]) for job in pool.jobs) == len(draft)
    assert [predictions.get(j, 0)["predicted_total_mb"] for j in draft] == [float(j["truncation_steps"]) for j in draft]


@pytest.mark.parametrize("precision", ["fp16", "bf16"])
@pytest.mark.parametrize("upcast", [False, True])
@pytest.mark.parametrize("force_upcast", [False, True])
def test_the_stated_decode_rule_is_the_models(precision, upcast, force_upcast):
    from align.builtin.testing import tiny_pipeline
    from align.core.models import DiffusionModel

    pipe = tiny_pipeline("sd")
    pipe.vae.register_to_config(force_upcast=force_upcast)
    model = DiffusionModel(pipe, upcast_vae=upcast)
    low = {"fp16": torch.float16, "bf16": torch.bfloat16}[precision]
    expected = gpu.expected_decode_dtype(precision, upcast, force_upcast)
    assert expected == ("torch.float32" if model.decodes_in_fp32(low) else str(low))


def test_precision_check_fails_when_the_decoder_is_not_upcast(monkeypatch):
    """The check has teeth: a model that ignores upcast_vae decodes in bfloat16 and the case fails."""
    from align.core.models import DiffusionModel

    monkeypatch.setattr(DiffusionModel, "decodes_in_fp32", lambda self, dtype: False)
    torch.set_num_threads(1)
    job = {"device": "cpu", "num_steps": 2, "truncation_steps": 1, "train_steps": 1}
    row = gpu.precision_case(job, {"model": "tiny-sd", "resolution": 32, "mixed_precision": "bf16", "upcast_vae": True})
    assert not row["passed"]
    assert row["training_conv_dtypes"] == ["torch.bfloat16"] and row["sampling_conv_dtypes"] == ["torch.bfloat16"]
    failed = {name for name, ok in row["checks"].items() if not ok}
    assert failed == {"decode_dtype_in_training", "decode_dtype_in_sampling", "model_rule_agrees"}


# --------------------------------------------------------------------------- run.sh's installation of diffusers


def _wheel(folder: Path, name: str, version: str, files: dict[str, str]) -> Path:
    """A minimal pure-Python wheel holding ``files``."""
    info = f"{name}-{version}.dist-info"
    contents = {**files, f"{info}/METADATA": f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n",
                f"{info}/WHEEL": "Wheel-Version: 1.0\nGenerator: test\nRoot-Is-Purelib: true\nTag: py3-none-any\n"}
    record = []
    for path, text in contents.items():
        digest = base64.urlsafe_b64encode(hashlib.sha256(text.encode()).digest()).rstrip(b"=").decode()
        record.append(f"{path},sha256={digest},{len(text.encode())}")
    record.append(f"{info}/RECORD,,")
    path = folder / f"{name}-{version}-py3-none-any.whl"
    with zipfile.ZipFile(path, "w") as whl:
        for name_in_zip, text in contents.items():
            whl.writestr(name_in_zip, text)
        whl.writestr(f"{info}/RECORD", "\n".join(record) + "\n")
    return path


def _blocked_diffusers(tmp_path: Path) -> Path:
    """A folder whose diffusers package fails to import, as on a machine without diffusers."""
    shim = tmp_path / "shim" / "diffusers"
    shim.mkdir(parents=True)
    (shim / "__init__.py").write_text("raise ImportError('no diffusers here')\n")
    return shim.parent


def test_run_sh_installs_the_wheels_when_diffusers_does_not_import(tmp_path):
    wheels = tmp_path / "wheels"
    wheels.mkdir()
    _wheel(wheels, "diffusers", "0.0.1", {"diffusers/__init__.py": "UNet2DConditionModel = object\n"})
    site = tmp_path / "site"
    env = _env(PYTHONPATH=str(_blocked_diffusers(tmp_path)), ALIGN_WHEELS=str(wheels), ALIGN_SITE=str(site))
    proc = subprocess.run(["bash", str(RUN_SH), "--digest"], capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    # diffusers is installed in this environment, so the 'missing' pass installs nothing; the second pass installs all
    assert proc.stdout.count("installing into") == 1 and "diffusers-0.0.1-py3-none-any.whl" in proc.stdout
    assert (site / "diffusers" / "__init__.py").read_text() == "UNet2DConditionModel = object\n"
    assert proc.stdout.strip().splitlines()[-1] == gpu.source_digest()


def test_run_sh_without_wheels_says_what_to_do(tmp_path):
    empty = tmp_path / "wheels"
    empty.mkdir()
    env = _env(PYTHONPATH=str(_blocked_diffusers(tmp_path)), ALIGN_WHEELS=str(empty), ALIGN_SITE=str(tmp_path / "site"))
    proc = subprocess.run(["bash", str(RUN_SH), "--smoke"], capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 3
    assert f"diffusers is not importable and {empty}/ holds no wheels; see the top of bench/gpu/run.sh" in proc.stderr
