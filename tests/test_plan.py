"""The memory planner: exact byte counts on known ops, presets of the published sizes, predictions
within 20% of the peak measured on the CPU, budget search, CLI."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from align.builtin.testing import tiny_pipeline
from align.core.errors import ConfigError
from align.core.sampling import guided_prediction
from align.train.plan import (
    GB,
    LiveBytes,
    MemoryPlanner,
    ModelSpec,
    PlanConfig,
    format_plan,
    load_spec,
    parse_memory,
    plan_memory,
    trace_call,
)

ROOT = Path(__file__).resolve().parents[1]
N = 1 << 12  # elements of the test tensors
F32 = 4


def test_live_bytes_counts_new_storages_once_and_frees_them_with_their_last_view():
    x = torch.ones(N)  # made outside: not counted
    with LiveBytes() as live:
        a = x * 2
        view = a[10:]  # a view: no new memory
        b = a.exp()
        assert live.live == 2 * N * F32
        del a
        assert live.live == 2 * N * F32  # the view keeps a's storage alive
        del view
        assert live.live == N * F32
        x.mul_(3)  # in place on an outside tensor: nothing new
        del b
        assert live.live == 0
    assert live.peak == 2 * N * F32


def test_trace_call_counts_what_autograd_keeps():
    """(2 x).sin(): the grad-free forward peaks at two tensors; with grad, sin keeps its input
    (2 x), and exp keeps its output, so exp(x) keeps nothing beyond the output."""
    x = torch.ones(N, device="meta")
    sin = trace_call(lambda v: (v * 2).sin(), x)
    assert sin.forward == 2 * N * F32
    assert sin.output == N * F32
    assert sin.kept == N * F32
    assert sin.backward >= sin.kept + sin.output
    exp = trace_call(torch.exp, x)
    assert exp.kept == 0 and exp.output == N * F32


def test_fused_attention_keeps_no_attention_matrix():
    """Traced attention keeps the output and the log-sum-exp, as the fused kernels do; without the
    patch the meta device would keep the N x N attention matrix."""
    b, h, n, d = 1, 2, 1024, 8
    q = torch.zeros(b, h, n, d, device="meta")
    call = trace_call(lambda v: torch.nn.functional.scaled_dot_product_attention(v, q, q), q)
    assert call.output == b * h * n * d * F32
    assert call.kept == b * h * n * F32  # the log-sum-exp
    with LiveBytes() as live:  # outside fused_attention the meta device takes the math path
        torch.nn.functional.scaled_dot_product_attention(q.requires_grad_(), q, q)
    assert live.peak >= b * h * n * n * F32


# published parameter counts of the architectures the presets describe
PUBLISHED = [
    ("sd15", "denoiser", 859_520_964),
    ("sd15", "vae", 83_653_863),
    ("sd15", "text_encoder", 123_060_480),
    ("sdxl", "denoiser", 2_567_463_684),
    ("sdxl", "text_encoder_2", 694_659_840),
    ("sd3", "text_encoder_3", 4_762_310_656),
    ("flux", "denoiser", 11_901_408_320),
]


@pytest.fixture(scope="module")
def preset_weights():
    from align.core.lora import freeze_pipeline
    from align.train.plan import _meta_model, _text_encoder_parameters

    out = {}
    for name in sorted({p[0] for p in PUBLISHED}):
        spec = load_spec(name)
        model = _meta_model(spec, torch.float32, torch.float32)
        freeze_pipeline(model.pipe)
        out[name] = {
            "denoiser": sum(p.numel() for p in model.module.parameters()),
            "vae": sum(p.numel() for p in model.pipe.vae.parameters()),
            **{enc: _text_encoder_parameters(spec, enc) for enc in spec.text_encoders},
        }
    return out


@pytest.mark.parametrize("preset,component,count", PUBLISHED, ids=[f"{p}-{c}" for p, c, _ in PUBLISHED])
def test_presets_have_the_published_sizes(preset_weights, preset, component, count):
    assert preset_weights[preset][component] == count


def test_preset_plan_counts_weights_lora_and_adam_state():
    plan = plan_memory(PlanConfig(model="sd15", resolution=256, lora_rank=4, budgets_gb=[24.0, 80.0]))
    assert plan.weights["denoiser"] == 859_520_964 * F32  # the frozen base; LoRA weights are listed apart
    # SD 1.5's 16 transformer blocks with attn1/attn2 to_q, to_k, to_v, to_out.0 at rank 4
    assert plan.trainable_parameters == 797_184
    assert plan.gradients == plan.trainable_parameters * F32
    assert plan.optimizer_state == 2 * plan.gradients
    assert plan.peak_phase in plan.phases and plan.total > sum(plan.weights.values())
    text = format_plan(plan)
    assert "predicted peak" in text and "<- peak" in text and "budget 80 GB: batch_size <=" in text


# --------------------------------------------------------------------------- measured vs predicted
CASES = [
    # family, lora, checkpointing, K, T, mixed precision
    ("sd", True, True, 1, 4, "no"),
    ("sd", True, False, 3, 4, "no"),
    ("sd", False, True, 3, 4, "no"),
    ("sd", False, False, 2, 4, "no"),
    ("sd", True, False, 3, 4, "bf16"),
    ("sd3", True, True, 2, 3, "no"),
]
SIZE = {"sd": 96, "sd3": 192}  # images large enough that activations dominate the measured peak

# One process measures every case in turn (each model is freed before the next is built; with
# glibc's mmap threshold pinned, freed tensors go back to the kernel, so each case's resident
# high-water mark above its own starting point is its peak).
WORKER = r"""
import gc, json, sys, tempfile
import torch
sys.path.insert(0, {root!r})
from bench.common import measure_step
from align.core.config import from_dict
from align.core.models import DiffusionModel
from align.builtin.testing import tiny_pipeline
from align.core.errors import ConfigError
from align.train.trainer import TrainConfig, Trainer
torch.set_num_threads(1)
peaks = []
for family, lora, ckpt, k, steps, precision in json.loads(sys.argv[1]):
    model = DiffusionModel(tiny_pipeline(family))
    with tempfile.TemporaryDirectory() as tmp:
        cfg = from_dict(TrainConfig, {{
            "method": "draft", "draft": {{"num_steps": steps, "truncation_steps": k, "guidance_scale": 3.0}},
            "output_dir": tmp, "batch_size": 1, "prompts": ["a red circle"], "reward": "brightness",
            "lora": {{"rank": 4, "enabled": lora}}, "gradient_checkpointing": ckpt, "device": "cpu",
            "mixed_precision": precision, "checkpoint_every": 0, "sample_every": 0,
            "height": {size}[family], "width": {size}[family],
            "max_sequence_length": 8 if family == "sd3" else None,
        }})
        trainer = Trainer(cfg, model=model, progress=False)
        trainer.setup()
        peaks.append(measure_step(trainer.train_step, "cpu", timed_steps=0)["peak_mb"])
    del trainer, model
    gc.collect()
print(json.dumps(peaks))
"""


@pytest.fixture(scope="module")
def measured_peaks() -> dict[tuple, float]:
    sys.path.insert(0, str(ROOT))
    from bench.common import WORKER_ENV

    env = {**os.environ, **WORKER_ENV, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(
        [sys.executable, "-c", WORKER.format(root=str(ROOT), size=SIZE), json.dumps(CASES)],
        capture_output=True, text=True, env=env, timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    return dict(zip(CASES, json.loads(proc.stdout.strip().splitlines()[-1])))


@pytest.mark.parametrize("case", CASES, ids=["-".join(map(str, c)) for c in CASES])
def test_prediction_within_20_percent_of_the_measured_cpu_peak(measured_peaks, case):
    family, lora, ckpt, k, steps, precision = case
    measured = measured_peaks[case]
    spec = ModelSpec.from_pipeline(tiny_pipeline(family))
    config = PlanConfig(
        model=f"tiny-{family}", num_steps=steps, truncation_steps=k, batch_size=1, resolution=SIZE[family], guidance=True,
        lora=lora, lora_rank=4, gradient_checkpointing=ckpt, mixed_precision=precision, device="cpu",
        max_sequence_length=8 if family == "sd3" else None,
    )
    predicted = plan_memory(config, spec).step_peak / 2**20
    assert measured > 10, "the configuration is too small to test against"
    assert abs(predicted - measured) <= 0.2 * measured, f"predicted {predicted:.1f} MB, measured {measured:.1f} MB"


# --------------------------------------------------------------------------- structure and search
@pytest.fixture(scope="module")
def tiny_planner():
    spec = ModelSpec.from_pipeline(tiny_pipeline("sd"))
    config = PlanConfig(model="tiny-sd", num_steps=20, truncation_steps=1, resolution=64, gradient_checkpointing=False, device="cpu")
    return MemoryPlanner(config, spec)


def test_affine_batch_model_matches_a_direct_trace(tiny_planner):
    model = tiny_planner.model
    from align.train.plan import _conditioning

    cond = _conditioning(model, tiny_planner.spec, 3, 64, 64, None)
    x = torch.zeros(model.latent_shape(3, 64, 64), device="meta")
    t = torch.full((3,), 500.0, device="meta")
    direct = trace_call(lambda v: guided_prediction(model.denoiser, v, t, cond, cond, 7.5), x)
    interpolated = tiny_planner.profiles.denoiser.at(3)
    for field in ("forward", "kept", "backward"):
        assert getattr(interpolated, field) == pytest.approx(getattr(direct, field), rel=0.01), field


def test_memory_grows_with_k_without_checkpointing_and_stays_flat_with_it(tiny_planner):
    plain = [max(tiny_planner.phases(1, k).values()) for k in (1, 2, 4, 8)]
    steps = [b - a for a, b in zip(plain, plain[1:])]
    assert all(s > 0 for s in steps)
    # each extra grad step keeps one call's activations: the increments are K-proportional
    assert steps[1] == pytest.approx(2 * steps[0], rel=1e-6) and steps[2] == pytest.approx(4 * steps[0], rel=1e-6)
    ckpt = MemoryPlanner(PlanConfig(model="tiny-sd", num_steps=20, resolution=64, device="cpu"), tiny_planner.spec)
    flat = [max(ckpt.phases(1, k).values()) for k in (1, 20)]
    assert flat[1] < 1.05 * flat[0]
    assert flat[1] < plain[0] + steps[0]  # checkpointing 20 steps costs less than keeping 2


def test_fit_returns_the_largest_setting_within_the_budget(tiny_planner):
    base = tiny_planner.total(1, 1)
    budget_gb = (base + 0.5 * (tiny_planner.total(9, 1) - base)) / GB  # somewhere between batch 1 and 9
    fit = tiny_planner.fit(budget_gb)
    b = fit.max_batch_size
    assert 1 <= b < 9
    assert tiny_planner.total(b, 1) <= budget_gb * GB < tiny_planner.total(b + 1, 1)
    k = fit.max_truncation_steps
    assert tiny_planner.total(1, k) <= budget_gb * GB and (k == 20 or tiny_planner.total(1, k + 1) > budget_gb * GB)
    assert tiny_planner.fit(base / GB * 0.5).max_batch_size is None


def test_methods_plan_their_windows():
    spec = ModelSpec.from_pipeline(tiny_pipeline("sd"))
    common = {"model": "tiny", "resolution": 32, "device": "cpu", "budgets_gb": []}
    assert PlanConfig(method="alignprop", **common).grad_steps == 18  # cut-off at 0.84 - 2 * 0.1 of 50 steps
    lv = plan_memory(PlanConfig(method="draft_lv", lv_copies=2, **common), spec)
    k1 = plan_memory(PlanConfig(method="draft", truncation_steps=1, **common), spec)
    assert "re-noised copies forward" in lv.phases and lv.step_peak > k1.step_peak
    refl = plan_memory(PlanConfig(method="refl", **common), spec)
    assert refl.config.steps == 40 and refl.config.grad_steps == 1


@pytest.mark.parametrize("family", ["sdxl", "flux"])
def test_other_families_plan(family):
    spec = ModelSpec.from_pipeline(tiny_pipeline(family))
    plan = plan_memory(PlanConfig(model=family, resolution=32, device="cpu", max_sequence_length=8, budgets_gb=[1.0]), spec)
    assert plan.family == family and plan.step_peak > 0 and plan.fits[0].max_batch_size >= 1


def test_local_folder_plans_like_the_pipeline(tmp_path):
    pipe = tiny_pipeline("sd")
    pipe.save_pretrained(tmp_path / "model")
    config = PlanConfig(model=str(tmp_path / "model"), resolution=32, device="cpu", budgets_gb=[])
    from_folder = plan_memory(config)
    from_pipe = plan_memory(config, ModelSpec.from_pipeline(pipe))
    assert from_folder.phases == from_pipe.phases
    assert from_folder.weights["denoiser"] == from_pipe.weights["denoiser"]


def test_parse_memory():
    assert parse_memory("24GB") == 24.0
    assert parse_memory("80 GiB") == 80.0
    assert parse_memory("512MB") == 0.5
    assert parse_memory(16) == 16.0  # a Python number is GB (budgets_gb)
    assert parse_memory("1TB") == 1024.0
    with pytest.raises(ConfigError, match="no unit; write 24GB or 24MB"):
        parse_memory("24")  # --budget 24 used to be read silently as GB
    with pytest.raises(ConfigError, match="memory size .24 parsecs. is not understood"):
        parse_memory("24 parsecs")


# --------------------------------------------------------------------------- CLI
def _cli(*args):
    return subprocess.run(
        [sys.executable, "-m", "align", "plan", *args], capture_output=True, text=True, timeout=300,
        env={**os.environ, "HF_HUB_OFFLINE": "1"},
    )


def test_cli_plans_a_preset_offline():
    proc = _cli("--model", "sd15", "--method", "draft", "--truncation-steps", "4", "--steps", "50", "--resolution", "256",
                "--budget", "24GB", "--json")
    assert proc.returncode == 0, proc.stderr
    plan = json.loads(proc.stdout)
    assert plan["grad_steps"] == 4 and plan["num_steps"] == 50 and plan["resolution"] == [256, 256]
    assert plan["fits"][0]["budget_gb"] == 24.0 and plan["fits"][0]["max_batch_size"] >= 1
    assert plan["total_bytes"] == pytest.approx(
        sum(plan["weights_bytes"].values()) + plan["optimizer_state_bytes"] + plan["step_peak_bytes"]
    )


BAD = [
    (["--model", "someorg/somemodel"], "offline mode is on (HF_HUB_OFFLINE=1) and model_index.json is not in the local"),
    (["--model", "sd15", "--method", "dpo"], "method='dpo' is not supported"),
    (["--model", "sd15", "--method", "grpo"], "method='grpo': align plan models the reward-backprop methods"),
    (["--model", "sd15", "--truncation-steps", "60"], "truncation_steps=60 exceeds num_steps=50; accepted: 1..50"),
    (["--model", "sd15", "--resolution", "500"], "height=500 is not supported by this sd model; accepted: positive multiples of 64"),
    (["--model", "sd15", "--budget", "lots"], "memory size 'lots' is not understood"),
    (["--model", "sd15", "--budget", "24"], "memory size '24' has no unit; write 24GB or 24MB"),  # was silently GB
]


@pytest.mark.parametrize("args,message", BAD, ids=[b[1][:24] for b in BAD])
def test_cli_bad_input_is_a_clear_error(args, message):
    proc = _cli(*args)
    assert proc.returncode == 2, proc.stderr
    assert message in proc.stderr and "Traceback" not in proc.stderr
