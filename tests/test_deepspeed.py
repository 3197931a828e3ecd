"""Full fine-tuning under DeepSpeed ZeRO-2 and ZeRO-3 (gloo on the CPU): training, checkpoints, the diffusers save.

One torchrun launch of two processes runs every DeepSpeed run (starting processes is the slow part): DRaFT with
gradient accumulation, a learning-rate warm-up and a step whose loss is forced non-finite on one process (skipped
on both), and GRPO, for ZeRO-2 (with an EMA, from the example accelerate config) and ZeRO-3 (every weight
partitioned) each, and both DRaFT runs resumed from their checkpoint at step 2; one plain process with the same
global batch runs the references.
"""

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

pytest.importorskip("deepspeed")

from _distributed import free_port, stall_one_rank  # noqa: E402
from safetensors.torch import load_file  # noqa: E402

from align.builtin.testing import tiny_pipeline  # noqa: E402
from align.core.config import from_dict  # noqa: E402
from align.core.errors import AlignError, ConfigError  # noqa: E402
from align.train.sharding import (  # noqa: E402
    DEEPSPEED_ENGINE_INTERNALS,
    DEEPSPEED_OPTIMIZER_INTERNALS,
    check_deepspeed_config,
    check_deepspeed_internals,
    engine_config,
    load_deepspeed_config,
    resolve_sharding,
)
from align.train.trainer import TrainConfig  # noqa: E402

PROMPTS = ["a red circle", "a blue square"]
ACCELERATE_CONFIGS = Path(__file__).resolve().parents[1] / "examples" / "accelerate"

DRIVER = textwrap.dedent(
    """
    import json, sys
    import deepspeed.ops
    import torch
    from safetensors.torch import save_file
    from align.core.config import from_dict
    from align.train.trainer import TrainConfig, Trainer

    # DeepSpeed's CPU-only shared-memory all-reduce kernel (a 60 s g++ build on first use, for CPU training; GPU runs
    # use NCCL) is left out: the CPU tests reduce over gloo, which gives the same results
    deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False
    runs, out, nonfinite = json.loads(sys.argv[1]), sys.argv[2], json.loads(sys.argv[3])
    for name, config in runs.items():
        trainer = Trainer(from_dict(TrainConfig, config), progress=False)
        trainer.setup()
        if name in nonfinite:  # the last process's loss at this (step, micro-step) is made non-finite
            loss, at = trainer.objective.loss, tuple(nonfinite[name])
            def forced(step, micro, loss=loss, at=at, trainer=trainer):
                value, metrics = loss(step, micro)
                last = trainer.rank == trainer.num_processes - 1
                return (value * float("nan") if (step, micro) == at and last else value), metrics
            trainer.objective.loss = forced
        trainer.train()
        final = {k: v.contiguous() for k, v in trainer._trainable_state().items()}  # a collective when sharded
        if trainer.ema is not None:  # whole on every process (unsharded, ZeRO-2)
            final.update({f"ema.{n}": e.contiguous() for n, e in zip(trainer.param_names, trainer.ema)})
        if trainer.is_main:
            save_file(final, f"{out}/{name}.safetensors")
            stage = trainer.engine.zero_optimization_stage() if trainer.engine is not None else 0
            with open(f"{out}/{name}.json", "w") as fh:
                json.dump({"sharding": trainer.sharding, "processes": trainer.num_processes, "zero_stage": stage,
                           "skipped": trainer.skipped}, fh)
    """
)


def _runs(tmp_path, model: str, batch_size: int, out: str, sharded: bool) -> dict:
    """DRaFT (2 micro-steps per step, warm-up; an EMA but under ZeRO-3) and GRPO runs; sharded: one of each per ZeRO
    stage, and each DRaFT run resumed from its checkpoint at step 2 (into another folder) to its last step."""
    base = {
        "model": model, "device": "cpu", "prompts": PROMPTS, "sample_every": 0, "num_samples": 2,
        "lora": {"enabled": False}, "batch_size": batch_size,
    }
    draft = {**base, "method": "draft", "checkpoint_every": 2, "gradient_accumulation_steps": 2, "max_steps": 3,
             "lr_schedule": "linear", "lr_warmup_steps": 2,
             "draft": {"num_steps": 3, "learning_rate": 1e-3, "guidance_scale": 3.0}}
    grpo = {**base, "method": "grpo", "reward": "jpeg_compressibility", "checkpoint_every": 0, "max_steps": 2,
            "grpo": {"num_steps": 3, "eval_num_steps": 3, "learning_rate": 1e-3, "group_size": 2, "rollout_prompts": 2}}
    if not sharded:
        return {"draft": {**draft, "ema_decay": 0.5, "output_dir": str(tmp_path / out / "draft")},
                "grpo": {**grpo, "output_dir": str(tmp_path / out / "grpo")}}
    runs = {}
    for stage, ds_config, ema in ((2, str(ACCELERATE_CONFIGS / "deepspeed_zero2_1node_8gpu.yaml"), 0.5),
                                  (3, str(tmp_path / "zero3.json"), 0.0)):
        ds = {"deepspeed_config": ds_config}
        runs[f"draft_z{stage}"] = {**draft, **ds, "ema_decay": ema, "output_dir": str(tmp_path / out / f"draft_z{stage}")}
        runs[f"grpo_z{stage}"] = {**grpo, **ds, "output_dir": str(tmp_path / out / f"grpo_z{stage}")}
        runs[f"draft_z{stage}_resumed"] = {
            **runs[f"draft_z{stage}"], "output_dir": str(tmp_path / out / f"resumed_z{stage}"),
            "resume": str(tmp_path / out / f"draft_z{stage}" / "checkpoints" / "step-00000002")}
    return runs


#: ZeRO-3 with every weight partitioned (DeepSpeed keeps weights under 1e5 elements whole by default: all of the tiny
#: model's but a few)
ZERO3 = {"zero_optimization": {"stage": 3, "stage3_param_persistence_threshold": 0}}


#: the (step, micro-step) whose loss is forced non-finite in the DRaFT runs: the step is skipped after its first
#: micro-step's gradients were accumulated
NONFINITE = [1, 1]


@pytest.fixture(scope="module")
def deepspeed_runs(tmp_path_factory):
    """Every run on two DeepSpeed processes (torchrun, gloo) with batch 1 each and on one plain process with batch 2."""
    tmp_path = tmp_path_factory.mktemp("deepspeed")
    tiny_pipeline("sd").save_pretrained(tmp_path / "model")
    (tmp_path / "zero3.json").write_text(json.dumps(ZERO3))
    script = tmp_path / "driver.py"
    script.write_text(DRIVER)
    (tmp_path / "two").mkdir()
    (tmp_path / "one").mkdir()
    model = str(tmp_path / "model")
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    sharded = _runs(tmp_path, model, 1, "two", sharded=True)
    nonfinite = {name: NONFINITE for name in sharded if name.startswith("draft")}
    two = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(free_port()),
         str(script), json.dumps(sharded), str(tmp_path / "two"), json.dumps(nonfinite)],
        capture_output=True, text=True, timeout=900, env=env,
    )
    assert two.returncode == 0, two.stderr[-6000:]
    one = subprocess.run(
        [sys.executable, str(script), json.dumps(_runs(tmp_path, model, 2, "one", sharded=False)), str(tmp_path / "one"),
         json.dumps({"draft": NONFINITE})],
        capture_output=True, text=True, timeout=600, env=env,
    )
    assert one.returncode == 0, one.stderr[-6000:]
    return tmp_path


def _norm(tensors: dict[str, torch.Tensor]) -> float:
    return float(torch.cat([t.flatten() for t in tensors.values()]).norm())


@pytest.mark.parametrize("stage", [2, 3])
def test_two_deepspeed_processes_train_what_one_plain_process_trains(deepspeed_runs, stage):
    two, one = deepspeed_runs / "two", deepspeed_runs / "one"
    assert json.loads((two / f"draft_z{stage}.json").read_text()) == {
        "sharding": "deepspeed", "processes": 2, "zero_stage": stage, "skipped": 1}
    assert json.loads((one / "draft.json").read_text())["skipped"] == 1  # the same step skipped
    initial = load_file(deepspeed_runs / "model" / "unet" / "diffusion_pytorch_model.safetensors")
    for method in ("draft", "grpo"):
        got, want = load_file(two / f"{method}_z{stage}.safetensors"), load_file(one / f"{method}.safetensors")
        if not (method == "draft" and stage == 2):  # the EMA: under ZeRO-2 only
            want = {k: v for k, v in want.items() if not k.startswith("ema.")}
        assert got.keys() == want.keys()
        for part in ("denoiser.", "ema.denoiser."):  # the trained weights, then their EMA
            keys = [k for k in want if k.startswith(part)]
            if not keys:
                continue
            moved = _norm({k: want[k] - initial[k.removeprefix(part)] for k in keys})
            apart = _norm({k: got[k] - want[k] for k in keys}) / moved
            # equal up to float32 summation order (DeepSpeed's reduction instead of one batch), which Adam amplifies
            # on weights whose gradient is near zero; other samples, another learning rate (the warm-up), the
            # gradients of the skipped step's first micro-step kept, or a gradient not reduced: O(1) of the update
            assert moved > 0.1 and apart < 1e-3, (method, stage, part, moved, apart)
    records = [json.loads(line) for line in (two / f"draft_z{stage}" / "metrics.jsonl").read_text().splitlines()]
    lrs = [r["lr"] for r in records if "lr" in r]
    assert lrs == pytest.approx([5e-4, 1e-3, 1e-3])  # warm-up, then linear decay: what the weights followed


@pytest.mark.parametrize("stage", [2, 3])
def test_deepspeed_resume_is_exact_and_the_checkpoint_holds_full_weights(deepspeed_runs, stage):
    two = deepspeed_runs / "two"
    straight = load_file(two / f"draft_z{stage}.safetensors")
    resumed = load_file(two / f"draft_z{stage}_resumed.safetensors")
    assert straight.keys() == resumed.keys()
    for k in straight:
        assert torch.equal(straight[k], resumed[k]), k  # weights (and EMA), bitwise
    ckpt = two / f"draft_z{stage}" / "checkpoints" / "step-00000003"
    saved = load_file(ckpt / "trainable.safetensors")
    assert saved.keys() == {k for k in straight if not k.startswith("ema.")}
    for k, v in saved.items():
        assert torch.equal(v, straight[k]), k  # the full (gathered) weights, not a partition
    optimizer = torch.load(ckpt / "optimizer.pt", weights_only=True)
    assert set(optimizer["state"]) == set(saved)  # full AdamW state, keyed by name
    for k, state in optimizer["state"].items():
        assert state["exp_avg"].shape == saved[k].shape and float(state["step"]) == 2  # 3 steps, one skipped
    assert json.loads((ckpt / "state.json").read_text())["sharding"] == "deepspeed"


@pytest.mark.parametrize("stage", [2, 3])
def test_deepspeed_saves_the_full_denoiser_in_diffusers_format(deepspeed_runs, stage):
    from diffusers import UNet2DConditionModel

    unet = UNet2DConditionModel.from_pretrained(deepspeed_runs / "two" / f"draft_z{stage}" / "unet")
    final = load_file(deepspeed_runs / "two" / f"draft_z{stage}.safetensors")
    prefix = "ema.denoiser." if stage == 2 else "denoiser."  # the EMA when there is one, else the trained weights
    state = unet.state_dict()
    assert state.keys() == {k.removeprefix(prefix) for k in final if k.startswith(prefix)}
    for k, v in state.items():
        assert torch.equal(v, final[prefix + k]), k


# ---------------------------------------------------------------------------------------------- configs
def test_the_example_configs_load_as_deepspeed_configs():
    for stage in (2, 3):
        for machines in (1, 2):
            config = load_deepspeed_config(ACCELERATE_CONFIGS / f"deepspeed_zero{stage}_{machines}node_8gpu.yaml")
            assert check_deepspeed_config(config, max_grad_norm=1.0) == stage
    filled = engine_config(config, batch_size=3, max_grad_norm=1.0, bf16=True)
    assert filled["train_micro_batch_size_per_gpu"] == 3 and filled["gradient_accumulation_steps"] == 1
    assert filled["gradient_clipping"] == 1.0 and filled["bf16"]["enabled"] is True
    assert "train_batch_size" not in filled and "auto" not in json.dumps(filled)  # DeepSpeed derives the rest


DS_OK = {"zero_optimization": {"stage": 2}, "gradient_accumulation_steps": 1, "gradient_clipping": 1.0,
         "bf16": {"enabled": True}}


@pytest.mark.parametrize(
    ("change", "match"),
    [({"zero_optimization": {"stage": 1}}, "zero_stage=1"), ({"gradient_accumulation_steps": 4}, "accumulates"),
     ({"gradient_clipping": 0.5}, "max_grad_norm"), ({"fp16": {"enabled": True}}, "fp16"),
     ({"optimizer": {"type": "Adam"}}, "'optimizer' section"),
     ({"zero_optimization": {"stage": 3, "offload_param": {"device": "cpu"}}}, "offload_param device='cpu'")],
)
def test_deepspeed_configs_are_checked_against_the_trainer(change, match):
    assert check_deepspeed_config(DS_OK, max_grad_norm=1.0) == 2
    assert check_deepspeed_config({**DS_OK, "zero_optimization": {"stage": 3}, "gradient_clipping": "auto"},
                                  max_grad_norm=1.0) == 3
    with pytest.raises(ConfigError, match=match):
        check_deepspeed_config({**DS_OK, **change}, max_grad_norm=1.0)


@pytest.mark.parametrize(
    ("overrides", "match"),
    [({"deepspeed_config": "missing.json"}, "is not a file"),
     ({"deepspeed_config": "{zero2}", "lora": {"enabled": True}}, "LoRA always trains unsharded"),
     ({"deepspeed_config": "{zero2}", "sharding": "fsdp"}, "accepted: 'auto' or 'deepspeed'"),
     ({"deepspeed_config": "{zero3}", "ema_decay": 0.9}, "ema_decay=0.9 with DeepSpeed ZeRO-3"),
     ({"deepspeed_config": "{zero2}", "mixed_precision": "fp16"}, "accepted: bf16"),
     ({"deepspeed_config": "{zero1}"}, "zero_stage=1"),
     ({"deepspeed_config": "{bad_yaml}"}, "unknown key 'zero_stag'"),
     ({"deepspeed_config": "{zero3_init}"}, "zero3_init_flag: true; accepted: false"),
     ({"deepspeed_config": "{zero2}", "draft": {"max_grad_norm": 0.5}, "lora": {"enabled": False}}, "max_grad_norm")],
)
def test_bad_deepspeed_settings_are_refused(tmp_path, overrides, match):
    files = {"zero2": {"zero_optimization": {"stage": 2}}, "zero1": {"zero_optimization": {"stage": 1}}, "zero3": ZERO3}
    for name, content in files.items():
        (tmp_path / f"{name}.json").write_text(json.dumps({**content, "gradient_clipping": 1.0}))
    (tmp_path / "bad_yaml.yaml").write_text("distributed_type: DEEPSPEED\ndeepspeed_config:\n  zero_stag: 2\n")
    (tmp_path / "zero3_init.yaml").write_text("deepspeed_config:\n  zero_stage: 3\n  zero3_init_flag: true\n")
    paths = {"{zero2}": str(tmp_path / "zero2.json"), "{zero1}": str(tmp_path / "zero1.json"),
             "{zero3}": str(tmp_path / "zero3.json"),
             "{bad_yaml}": str(tmp_path / "bad_yaml.yaml"), "{zero3_init}": str(tmp_path / "zero3_init.yaml")}
    overrides = {**overrides, "deepspeed_config": paths.get(overrides["deepspeed_config"], overrides["deepspeed_config"])}
    settings = {"output_dir": "runs/x", "lora": {"enabled": False}, **overrides}
    with pytest.raises(ConfigError, match=match):
        from_dict(TrainConfig, settings)


@pytest.mark.parametrize(
    ("method", "method_args", "what"),
    [("diffusion_nft", {"num_steps": 2, "eval_num_steps": 2, "group_size": 2, "rollout_prompts": 2, "kl_weight": 0.0},
      "the old policy"),
     ("diffusion_dpo", {"num_steps": 2, "group_size": 2, "rollout_prompts": 2, "pairing": "halves"},
      "the frozen reference")],
)
def test_methods_with_a_weight_copy_refuse_deepspeed(tmp_path, method, method_args, what):
    """DiffusionNFT's old policy and Diffusion-DPO's frozen reference are not partitioned by DeepSpeed: refused when
    the objective is built (before any engine), with what is accepted."""
    from align.core.models import DiffusionModel
    from align.train.trainer import Trainer

    (tmp_path / "zero2.json").write_text(json.dumps({"zero_optimization": {"stage": 2}}))
    config = from_dict(TrainConfig, {
        "method": method, "output_dir": str(tmp_path / "run"), "device": "cpu", "prompts": PROMPTS,
        "lora": {"enabled": False}, "deepspeed_config": str(tmp_path / "zero2.json"), "sample_every": 0,
        "model_recommendations": False, method: method_args})
    trainer = Trainer(config, model=DiffusionModel(tiny_pipeline("sd")), progress=False)
    with pytest.raises(ConfigError, match=f"{what} is a copy of the trained weights, not partitioned by DeepSpeed"):
        trainer.setup()


def test_a_deepspeed_without_the_internals_the_trainer_uses_is_refused_at_setup():
    """The trainer drives DeepSpeed's engine through internals (not public API): a release that lacks one fails at
    setup with the missing name and the tested version, not mid-run."""
    from types import SimpleNamespace

    def engine(stage: int, drop: str | None = None):
        optimizer = SimpleNamespace(**{n: None for n in DEEPSPEED_OPTIMIZER_INTERNALS[stage] if n != drop})
        attrs = {n: None for n in DEEPSPEED_ENGINE_INTERNALS if n != drop}
        return SimpleNamespace(optimizer=optimizer, zero_optimization_stage=lambda: stage, **attrs)

    for stage in (2, 3):
        check_deepspeed_internals(engine(stage))  # everything there: accepted
        for missing in (*DEEPSPEED_ENGINE_INTERNALS, *DEEPSPEED_OPTIMIZER_INTERNALS[stage]):
            with pytest.raises(AlignError, match=rf"has no .*\b{missing}\b.*tested with DeepSpeed 0\.19\.8"):
                check_deepspeed_internals(engine(stage, drop=missing))


def test_deepspeed_follows_its_config_or_its_launch():
    assert resolve_sharding("auto", "MULTI_CPU", 2, lora_enabled=False, deepspeed_config=True) == "deepspeed"
    assert resolve_sharding("deepspeed", "NO", 1, lora_enabled=False, deepspeed_config=True) == "deepspeed"
    assert resolve_sharding("auto", "DEEPSPEED", 8, lora_enabled=False) == "deepspeed"
    with pytest.raises(ConfigError, match="set deepspeed_config"):
        resolve_sharding("deepspeed", "MULTI_GPU", 8, lora_enabled=False)
    with pytest.raises(ConfigError, match="drop one of them"):
        resolve_sharding("auto", "DEEPSPEED", 8, lora_enabled=False, deepspeed_config=True)


# ---------------------------------------------------------------------------------------------- benchmark
def test_the_published_deepspeed_benchmark_partitions_each_process_state():
    from bench.report import render

    results = Path(__file__).resolve().parents[1] / "bench" / "results" / "sharding_deepspeed_cpu.json"
    rows = {r["variant"]: r for r in json.loads(results.read_text())["rows"]}
    assert set(rows) == {"plain-1", "zero2-2", "zero3-2"} and not any("error" in r for r in rows.values())
    plain = rows["plain-1"]["ranks"][0]
    half = plain["weights_mb"] / 2  # fp32 training: the master partition is half the fp32 weights
    for name, module in (("zero2-2", plain["weights_mb"]), ("zero3-2", half)):
        for rank in rows[name]["ranks"]:
            assert rank["adam_mb"] == pytest.approx(plain["adam_mb"] / 2, rel=1e-3), name  # the moments partitioned
            assert rank["gradients_mb"] == pytest.approx(half, rel=1e-3), name
            assert rank["weights_mb"] == pytest.approx(module + half, rel=1e-3), name  # the module's + the master
    assert "| zero3-2 | 2 | deepspeed |" in render("sharding_deepspeed_cpu")


# ---------------------------------------------------------------------------------------------- no hangs
@pytest.mark.slow  # two launches with a timeout each: about 40 s apiece on 2 shared cores
@pytest.mark.parametrize("fate", ["killed", "hung"])
def test_a_dead_or_hung_process_stops_the_others_within_the_timeout_under_zero3(tmp_path, fate):
    """Rank 1 stalls before its first step and is then killed (SIGKILL) or left hanging (SIGSTOP); rank 0, waiting in
    ZeRO-3's first all-gather of weights, exits with an error naming distributed_timeout_s instead of waiting forever.
    DeepSpeed's own process group (the one its gradient reductions use; torch would give it the 30-minute default)
    has that timeout too."""

    tiny_pipeline("sd").save_pretrained(tmp_path / "model")
    (tmp_path / "zero3.json").write_text(json.dumps(ZERO3))
    timeout = 8
    config = {
        "model": str(tmp_path / "model"), "device": "cpu", "prompts": PROMPTS, "sample_every": 0, "num_samples": 1,
        "checkpoint_every": 0, "max_steps": 4, "batch_size": 1, "lora": {"enabled": False},
        "deepspeed_config": str(tmp_path / "zero3.json"), "distributed_timeout_s": timeout,
        "output_dir": str(tmp_path / "run"), "draft": {"num_steps": 2},
    }
    waited = stall_one_rank(tmp_path, config, fate, timeout)
    assert float((tmp_path / "rank1-stalled.timeout").read_text()) == timeout
    print(f"{fate}: rank 0 stopped {waited:.1f} s after rank 1 stalled (timeout {timeout} s)")
