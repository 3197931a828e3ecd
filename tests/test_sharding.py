"""Sharded full fine-tuning (FSDP2 over gloo on the CPU), its checkpoints, and runs that cannot hang.

One torchrun launch of two processes runs every FSDP check (starting processes is the slow part):
reward backprop with EMA, a stop-and-resume of the same run, GRPO, DiffusionNFT (its old policy a
sharded copy) with a stop-and-resume, and offline Diffusion-DPO (its frozen reference a sharded copy);
one plain process with the same global batch runs the references.
"""

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from _distributed import free_port, stall_one_rank
from safetensors.torch import load_file
from test_dpo_training import preference_folder

from align.builtin.testing import tiny_pipeline
from align.core.config import from_dict
from align.core.errors import ConfigError
from align.core.models import DiffusionModel
from align.train.sharding import FSDPSettings, resolve_sharding, wrap_units
from align.train.trainer import TrainConfig

PROMPTS = ["a red circle", "a blue square"]

DRIVER = textwrap.dedent(
    """
    import json, sys
    from safetensors.torch import save_file
    from align.core.config import from_dict
    from align.train.sharding import full_tensor
    from align.train.trainer import TrainConfig, Trainer

    def weights(trainer):
        full = {n: full_tensor(p.detach()).contiguous() for n, p in zip(trainer.param_names, trainer.params)}
        copies = {"ema": trainer.ema, "old": getattr(trainer.objective, "old", None),
                  "frozen": getattr(trainer.objective, "frozen", None)}
        for prefix, copy in copies.items():  # the weight copies, gathered whole
            if copy is not None:
                full.update({f"{prefix}.{n}": full_tensor(w).contiguous() for n, w in zip(trainer.param_names, copy)})
        return full

    def swap_check():
        # a unit that keeps its gathered weights after a forward (reshard_after_forward=False): forwards before,
        # inside and after swapping zeros in, without and with the trainer's reshard: [before ok, max |inside|,
        # after ok] each
        import copy, torch
        from align.train.sharding import FSDPSettings, shard_denoiser
        from align.train.trainer import _swapped

        torch.manual_seed(0)
        found = {}
        for resharded in (False, True):
            net = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Linear(8, 2))
            plain = copy.deepcopy(net)
            shard_denoiser(net, FSDPSettings(reshard_after_forward=False))
            params = list(net.parameters())
            x = torch.ones(3, 4)
            with torch.no_grad():
                before = net(x)
                with _swapped(params, [torch.zeros_like(p) for p in params], net if resharded else None):
                    inside = net(x)
                after = net(x)
                want = plain(x)
            found[str(resharded)] = [torch.equal(before, want), float(inside.abs().max()), torch.equal(after, want)]
        return found

    for name, config in json.loads(sys.argv[1]).items():
        trainer = Trainer(from_dict(TrainConfig, config), progress=False)
        trainer.train()
        final = weights(trainer)  # a collective under FSDP: every process gathers
        if trainer.is_main:
            save_file(final, f"{sys.argv[2]}/{name}.safetensors")
            with open(f"{sys.argv[2]}/{name}.json", "w") as fh:
                json.dump({"sharding": trainer.sharding, "processes": trainer.num_processes}, fh)
    if trainer.sharding == "fsdp":
        found = swap_check()
        if trainer.is_main:
            with open(f"{sys.argv[2]}/swap.json", "w") as fh:
                json.dump(found, fh)
    """
)


#: the weight copies the driver saves beside the trained weights (EMA, NFT's old policy, DPO's frozen reference)
COPIES = ("ema.", "old.", "frozen.")


def _runs(tmp_path, model: str, batch_size: int, out: str, resume: bool, preferences: str) -> dict:
    base = {
        "model": model, "device": "cpu", "prompts": PROMPTS, "sample_every": 0, "num_samples": 2,
        "lora": {"enabled": False}, "sharding": "fsdp", "batch_size": batch_size,
    }
    draft = {**base, "method": "draft", "ema_decay": 0.5, "checkpoint_every": 2,
             "draft": {"num_steps": 3, "learning_rate": 1e-3, "guidance_scale": 3.0}}
    grpo = {**base, "method": "grpo", "reward": "jpeg_compressibility", "checkpoint_every": 0,
            "grpo": {"num_steps": 3, "eval_num_steps": 3, "learning_rate": 1e-3, "group_size": 2,
                     "rollout_prompts": 2}}
    # rollouts of 4 samples, each serving 2 optimiser steps of one micro-batch over all processes; the old policy
    # follows the trained weights softly at each new rollout (decay 0.3 x the step)
    nft = {**base, "method": "diffusion_nft", "reward": "jpeg_compressibility", "checkpoint_every": 0,
           "diffusion_nft": {"num_steps": 2, "eval_num_steps": 2, "learning_rate": 1e-3, "group_size": 2,
                             "rollout_prompts": 2, "optimizer_steps_per_rollout": 2, "old_decay_rate": 0.3,
                             "kl_weight": 0.0}}
    # 4 preference pairs, 2 per optimiser step over all processes
    dpo = {**base, "method": "diffusion_dpo", "checkpoint_every": 0,
           "diffusion_dpo": {"data": preferences, "num_steps": 2, "learning_rate": 1e-3, "guidance_scale": 1.0}}
    runs = {
        "draft": {**draft, "max_steps": 4, "output_dir": str(tmp_path / out / "draft")},
        "grpo": {**grpo, "max_steps": 2, "output_dir": str(tmp_path / out / "grpo")},
        "nft": {**nft, "max_steps": 3, "output_dir": str(tmp_path / out / "nft")},
        "dpo": {**dpo, "max_steps": 2, "output_dir": str(tmp_path / out / "dpo")},
    }
    if resume:  # the same runs stopped part-way, then resumed from their checkpoints. NFT stops inside its first
        # rollout (each process resumes with its own rows of it and the old policy restored), and its second rollout
        # then updates the restored old policy toward the resumed weights
        runs["draft_half"] = {**draft, "max_steps": 2, "output_dir": str(tmp_path / out / "resumed")}
        runs["draft_resumed"] = {**draft, "max_steps": 4, "resume": "latest", "output_dir": str(tmp_path / out / "resumed")}
        runs["nft_half"] = {**nft, "max_steps": 1, "output_dir": str(tmp_path / out / "nft_resumed")}
        runs["nft_resumed"] = {**nft, "max_steps": 3, "resume": "latest", "output_dir": str(tmp_path / out / "nft_resumed")}
    return runs


def _norm(tensors: dict[str, torch.Tensor]) -> float:
    """The L2 norm of all the tensors together."""
    return float(torch.cat([t.flatten() for t in tensors.values()]).norm())


def _mean_abs(tensors: dict[str, torch.Tensor]) -> float:
    """The mean absolute entry of all the tensors together."""
    return float(torch.cat([t.flatten() for t in tensors.values()]).abs().mean())


@pytest.fixture(scope="module")
def fsdp_runs(tmp_path_factory):
    """Every run on two FSDP processes (torchrun, gloo) with batch 1 each and on one plain process with batch 2."""
    tmp_path = tmp_path_factory.mktemp("fsdp")
    tiny_pipeline("sd").save_pretrained(tmp_path / "model")
    script = tmp_path / "driver.py"
    script.write_text(DRIVER)
    (tmp_path / "two").mkdir()
    (tmp_path / "one").mkdir()
    model = str(tmp_path / "model")
    preferences = str(preference_folder(tmp_path / "preferences", DiffusionModel(tiny_pipeline("sd")), "brightness",
                                        PROMPTS, 4, num_steps=2))
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    two = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(free_port()),
         str(script), json.dumps(_runs(tmp_path, model, 1, "two", resume=True, preferences=preferences)), str(tmp_path / "two")],
        capture_output=True, text=True, timeout=600, env=env,
    )
    assert two.returncode == 0, two.stderr[-4000:]
    one = subprocess.run(
        [sys.executable, str(script), json.dumps(_runs(tmp_path, model, 2, "one", resume=False, preferences=preferences)), str(tmp_path / "one")],
        capture_output=True, text=True, timeout=600, env=env,
    )
    assert one.returncode == 0, one.stderr[-4000:]
    return tmp_path


def _load(root, run: str) -> dict[str, torch.Tensor]:
    return load_file(root / f"{run}.safetensors")


def test_two_fsdp_processes_train_what_one_plain_process_trains(fsdp_runs):
    two, one = fsdp_runs / "two", fsdp_runs / "one"
    assert json.loads((two / "draft.json").read_text()) == {"sharding": "fsdp", "processes": 2}
    assert json.loads((one / "draft.json").read_text()) == {"sharding": "none", "processes": 1}  # one: unsharded
    initial = load_file(fsdp_runs / "model" / "unet" / "diffusion_pytorch_model.safetensors")
    for run in ("draft", "grpo", "nft", "dpo"):
        got, want = _load(two, run), _load(one, run)
        assert got.keys() == want.keys()
        trained = [k for k in want if not k.startswith(COPIES)]
        update = {k: want[k] - initial[k.removeprefix("denoiser.")] for k in trained}
        difference = {k: got[k] - want[k] for k in want}
        moved = _norm(update)
        apart = _norm(difference) / moved
        # equal up to float32 summation order (a reduce-scatter instead of one batch), which Adam amplifies on
        # weights whose gradient is near zero (relative L2 2e-4 of the update measured for GRPO and NFT, 5e-6 DRaFT,
        # 4e-3 DPO: 10 of its 2e5 weights move up to 2 lr apart); other samples, or a gradient not reduced, would
        # differ by O(1) of the update. So DPO is also held to the mean difference (2e-4 of the mean update measured)
        assert moved > 0.1 and apart < (2e-2 if run == "dpo" else 1e-3), (run, moved, apart)
        mean_apart = _mean_abs(difference) / _mean_abs(update)
        assert mean_apart < 2e-3, (run, mean_apart)
    # the sharded copies: NFT's old policy moved (it followed the trained weights), DPO's reference did not
    for side in (two, one):
        nft, dpo = _load(side, "nft"), _load(side, "dpo")
        assert _norm({k: nft[k] - initial[k.removeprefix("old.denoiser.")] for k in nft if k.startswith("old.")}) > 0.01
        assert all(torch.equal(v, initial[k.removeprefix("frozen.denoiser.")]) for k, v in dpo.items()
                   if k.startswith("frozen.")), side


def test_fsdp_resume_is_exact_and_the_checkpoint_holds_full_weights(fsdp_runs):
    two = fsdp_runs / "two"
    for run in ("draft", "nft"):
        straight, resumed = _load(two, run), _load(two, f"{run}_resumed")
        assert straight.keys() == resumed.keys()
        for k in straight:
            assert torch.equal(straight[k], resumed[k]), (run, k)  # weights, EMA and the old policy, bitwise
    # the NFT checkpoint the resumed run continued from holds the whole old policy (gathered)
    nft_ckpt = load_file(two / "nft_resumed" / "checkpoints" / "step-00000001" / "extra.safetensors")
    old = {k.removeprefix("objective."): v for k, v in nft_ckpt.items() if k.startswith("objective.old.")}
    half = _load(two, "nft_half")
    assert old.keys() == {k for k in half if k.startswith("old.")}
    assert all(torch.equal(v, half[k]) for k, v in old.items())
    straight = _load(two, "draft")
    ckpt = two / "draft" / "checkpoints" / "step-00000004"
    saved = load_file(ckpt / "trainable.safetensors")
    assert {k: v.shape for k, v in saved.items()} == {k: v.shape for k, v in straight.items() if not k.startswith("ema.")}
    for k, v in saved.items():
        assert torch.equal(v, straight[k]), k  # the full (gathered) weights, not a shard
    optimizer = torch.load(ckpt / "optimizer.pt", weights_only=True)
    assert set(optimizer["state"]) == {k.removeprefix("denoiser.") for k in saved}  # full state, keyed by name
    assert json.loads((ckpt / "state.json").read_text())["sharding"] == "fsdp"


def test_a_swapped_copy_is_gathered_anew_when_units_keep_their_gathered_weights(fsdp_runs):
    """With fsdp_reshard_after_forward=false a unit keeps its gathered weights after a no_grad forward: swapping a copy
    in (EMA, old policy, reference) must reshard, or the next forward reuses the stale gathered weights."""
    found = json.loads((fsdp_runs / "two" / "swap.json").read_text())
    assert found["True"] == [True, 0.0, True]  # the trainer's swap: zeros in, the weights back out
    stale, inside, _ = found["False"]
    assert stale and inside > 0.1  # without resharding the swapped-in zeros are not seen


def test_fsdp_saves_the_full_denoiser_in_diffusers_format(fsdp_runs):
    from diffusers import UNet2DConditionModel

    for side in ("two", "one"):
        unet = UNet2DConditionModel.from_pretrained(fsdp_runs / side / "draft" / "unet")
        ema = {k.removeprefix("ema.denoiser."): v for k, v in _load(fsdp_runs / side, "draft").items()
               if k.startswith("ema.")}
        for k, v in unet.state_dict().items():
            assert torch.equal(v, ema[k]), (side, k)  # the saved denoiser is the EMA


# ---------------------------------------------------------------------------------------------- no hangs

@pytest.mark.slow  # two process launches with a timeout each: about 40 s apiece on 2 shared cores
@pytest.mark.parametrize("fate", ["killed", "hung"])
def test_a_dead_or_hung_process_stops_the_others_within_the_timeout(tmp_path, fate):
    """Rank 1 stalls before its first step and is then killed (SIGKILL) or left hanging (SIGSTOP): rank 0, waiting in a
    collective, exits with an error naming distributed_timeout_s instead of waiting forever."""
    tiny_pipeline("sd").save_pretrained(tmp_path / "model")
    timeout = 8
    config = {
        "model": str(tmp_path / "model"), "device": "cpu", "prompts": PROMPTS, "sample_every": 0, "num_samples": 1,
        "checkpoint_every": 0, "max_steps": 4, "batch_size": 1, "lora": {"enabled": False}, "sharding": "fsdp",
        "distributed_timeout_s": timeout, "output_dir": str(tmp_path / "run"), "draft": {"num_steps": 2},
    }
    waited = stall_one_rank(tmp_path, config, fate, timeout)
    print(f"{fate}: rank 0 stopped {waited:.1f} s after rank 1 stalled (timeout {timeout} s)")


# ---------------------------------------------------------------------------------------------- selection


def test_sharding_follows_the_launch_and_lora_keeps_its_light_path():
    assert resolve_sharding("auto", "FSDP", 8, lora_enabled=False) == "fsdp"
    assert resolve_sharding("auto", "DEEPSPEED", 8, lora_enabled=False) == "deepspeed"
    assert resolve_sharding("auto", "MULTI_GPU", 8, lora_enabled=False) == "none"
    assert resolve_sharding("auto", "MULTI_GPU", 8, lora_enabled=True) == "none"  # LoRA: one all-reduce
    with pytest.raises(ConfigError, match="LoRA trains unsharded"):
        resolve_sharding("auto", "FSDP", 8, lora_enabled=True)
    assert resolve_sharding("fsdp", "MULTI_CPU", 2, lora_enabled=False) == "fsdp"
    assert resolve_sharding("fsdp", "NO", 1, lora_enabled=False) == "none"  # one process: nothing to shard
    with pytest.raises(ConfigError, match="DeepSpeed config"):
        resolve_sharding("deepspeed", "MULTI_GPU", 8, lora_enabled=False)
    with pytest.raises(ConfigError, match="launched with an accelerate FSDP config"):
        resolve_sharding("none", "FSDP", 8, lora_enabled=False)
    with pytest.raises(ConfigError, match="launched with an accelerate DEEPSPEED config"):
        resolve_sharding("fsdp", "DEEPSPEED", 8, lora_enabled=False)


@pytest.mark.parametrize(
    ("overrides", "match"),
    [
        ({"sharding": "fsdp"}, "LoRA weights are small"),
        ({"sharding": "zero"}, "sharding"),
        ({"sharding": "fsdp", "lora": {"enabled": False}, "mixed_precision": "fp16"}, "accepted: bf16"),
        ({"distributed_timeout_s": 0}, "distributed_timeout_s"),
    ],
)
def test_bad_sharding_settings_are_refused(overrides, match):
    with pytest.raises(ConfigError, match=match):
        from_dict(TrainConfig, {"output_dir": "runs/x", **overrides})


@pytest.mark.parametrize("family", ["sd", "sdxl", "sd3", "flux"])
def test_the_wrapping_units_are_the_denoisers_blocks(family):
    pipe = tiny_pipeline(family)
    module = pipe.transformer if family in ("sd3", "flux") else pipe.unet
    units = wrap_units(module)
    names = {id(m): n for n, m in module.named_modules()}
    unit_names = [names[id(u)] for u in units]
    assert len(set(unit_names)) == len(unit_names)
    inside = {id(p) for u in units for p in u.parameters()}
    # most of the weights live in some unit (what is left is the root: embeddings, in/out projections)
    total = sum(p.numel() for p in module.parameters())
    assert sum(p.numel() for p in module.parameters() if id(p) in inside) > 0.6 * total
    if family in ("sd", "sdxl"):
        assert {"mid_block", "down_blocks.0", "up_blocks.0", "down_blocks.0.resnets.0"} <= set(unit_names)
    else:
        assert "transformer_blocks.0" in unit_names
    if family == "flux":
        assert "single_transformer_blocks.0" in unit_names
    # innermost first: no unit contains a unit that comes after it (FSDP2 shards sub-units before their parent)
    for i, name in enumerate(unit_names):
        assert not any(later.startswith(name + ".") for later in unit_names[i + 1 :]), name


def test_fsdp_settings_default_without_an_fsdp_launch():
    class State:
        fsdp_plugin = None

    class Acc:
        state = State()

    from align.train.sharding import fsdp_settings

    assert fsdp_settings(Acc(), torch.bfloat16) == FSDPSettings(param_dtype=torch.bfloat16)


# ---------------------------------------------------------------------------------------------- example configs
ACCELERATE_CONFIGS = Path(__file__).resolve().parents[1] / "examples" / "accelerate"


def _launch_args(path: Path):
    """What ``accelerate launch --config_file path -m align train`` resolves the file to."""
    from accelerate.commands.launch import _validate_launch_command, launch_command_parser

    args = launch_command_parser().parse_args(["--config_file", str(path), "-m", "align", "train"])
    return _validate_launch_command(args)[0]


@pytest.mark.parametrize(("name", "machines"), [("fsdp2_1node_8gpu.yaml", 1), ("fsdp2_2node_8gpu.yaml", 2)])
def test_fsdp_example_configs_give_the_trainer_fsdp2_settings(name, machines, monkeypatch):
    from accelerate.utils import FullyShardedDataParallelPlugin
    from accelerate.utils.launch import prepare_multi_gpu_env

    from align.train.sharding import fsdp_settings

    args = _launch_args(ACCELERATE_CONFIGS / name)
    assert args.use_fsdp and (args.num_machines, args.num_processes) == (machines, 8 * machines)
    env = prepare_multi_gpu_env(args)  # the environment accelerate launch gives each process
    assert env["FSDP_CPU_RAM_EFFICIENT_LOADING"] == "false" and env["ACCELERATE_MIXED_PRECISION"] == "bf16"
    for key, value in env.items():
        if key.startswith(("FSDP_", "ACCELERATE_USE_FSDP")):
            monkeypatch.setenv(key, value)
    monkeypatch.setenv("FSDP_SYNC_MODULE_STATES", "false")  # its check asks for a GPU; the trainer does not read it

    class Acc:
        class state:  # noqa: N801 (accelerate's attribute name)
            fsdp_plugin = FullyShardedDataParallelPlugin()

    settings = fsdp_settings(Acc(), torch.bfloat16)
    assert settings == FSDPSettings(param_dtype=torch.bfloat16, reshard_after_forward=True, offload_params=False)
    assert resolve_sharding("auto", "FSDP", 8 * machines, lora_enabled=False) == "fsdp"
    monkeypatch.setenv("FSDP_VERSION", "1")
    Acc.state.fsdp_plugin = FullyShardedDataParallelPlugin()
    with pytest.raises(ConfigError, match="fsdp_version=1"):
        fsdp_settings(Acc(), torch.bfloat16)


@pytest.mark.parametrize("stage", [2, 3])
@pytest.mark.parametrize("machines", [1, 2])
def test_deepspeed_example_configs(stage, machines):
    args = _launch_args(ACCELERATE_CONFIGS / f"deepspeed_zero{stage}_{machines}node_8gpu.yaml")
    assert args.use_deepspeed and (args.num_machines, args.num_processes) == (machines, 8 * machines)
    assert int(args.zero_stage) == stage and int(args.gradient_accumulation_steps) == 1
    assert float(args.gradient_clipping) == 1.0 and args.mixed_precision == "bf16"


# ---------------------------------------------------------------------------------------------- align plan
def test_plan_divides_weights_gradients_and_adam_state_by_the_processes():
    from align.train.plan import MemoryPlanner, ModelSpec, PlanConfig
    from align.train.sharding import unit_sizes

    spec = ModelSpec.from_pipeline(tiny_pipeline("sd"))
    common = {"model": "tiny-sd", "num_steps": 4, "resolution": 64, "lora": False, "mixed_precision": "bf16",
              "device": "cpu", "budgets_gb": [1.0]}
    plain = MemoryPlanner(PlanConfig(**common), spec)
    sharded = MemoryPlanner(PlanConfig(**common, processes=8, sharding="fsdp"), spec)
    n = plain.trainable
    assert sharded.trainable == n
    # fp32 master weights, fp32 gradients, two fp32 Adam moments, each an eighth per process
    assert sharded.weights["denoiser"] == 4 * n / 8
    assert sharded.gradients == 4 * n / 8 and sharded.optimizer_state == 8 * n / 8
    assert plain.weights["denoiser"] == 2 * n and plain.optimizer_state == 4 * n  # unsharded: bf16 weights and state
    assert sharded.weights["vae"] == plain.weights["vae"]  # the frozen parts are not sharded
    # the largest block, gathered in bf16 while it runs (it and the next); in its backward its bf16 gradient and
    # the fp32 copy that is reduce-scattered
    unit = max(unit_sizes(plain.model.module))
    a, b = plain.phases(1, 1), sharded.phases(1, 1)
    assert b["grad steps forward"] - a["grad steps forward"] == 2 * unit * 2
    # unsharded, the first backward allocates every gradient of the denoiser (its trace counts them); sharded, a
    # block's gradient is freed once reduce-scattered, and the gathered blocks are counted instead
    profiles = plain.profiles
    all_gradients = profiles.first_backward.at(1).backward - profiles.denoiser.at(1).backward
    assert all_gradients > 0
    assert b["denoiser backward"] == a["denoiser backward"] - all_gradients + 2 * unit * 2 + unit * (2 + 4)
    assert b["decode forward"] == a["decode forward"]  # no block is gathered while the VAE decodes
    assert sharded.total(1, 1) < plain.total(1, 1)


def test_deepspeed_layouts_in_closed_form():
    from align.train.sharding import ShardedMemory, sharded_memory

    n, u = 1000, 10
    # ZeRO-2: bf16 weights replicated, fp32 master weights, bf16 gradients and fp32 Adam state partitioned
    assert sharded_memory(n, 4, 2, "zero2", u) == ShardedMemory(2 * n + 4 * n / 4, 2 * n / 4, 8 * n / 4, 4 * n / 4, 0, 0)
    # ZeRO-3: the bf16 weights partitioned too, gathered per block as they run
    assert sharded_memory(n, 4, 2, "zero3", u) == ShardedMemory(
        2 * n / 4 + 4 * n / 4, 2 * n / 4, 8 * n / 4, 4 * n / 4, 2 * u * 2, 2 * u * 2 + u * 2
    )
    assert sharded_memory(n, 4, 4, "zero3", u).weights == 4 * n / 4  # fp32: no separate master copy
    with pytest.raises(ConfigError, match="sharding='none'"):
        sharded_memory(n, 4, 2, "none", u)


@pytest.mark.parametrize(
    ("overrides", "match"), [({"sharding": "fsdp", "processes": 8}, "full-finetune"), ({"sharding": "zero1"}, "sharding"),
                             ({"processes": 0}, "processes")],
)
def test_plan_refuses_bad_sharding(overrides, match):
    from align.train.plan import PlanConfig

    with pytest.raises(ConfigError, match=match):
        PlanConfig(model="sd15", **overrides)


def test_plan_cli_prints_per_process_figures(capsys):
    from align.cli import main

    assert main(["plan", "--model", "builtin", "--device", "cpu", "--full-finetune", "--mixed-precision", "bf16",
                 "--processes", "8", "--sharding", "fsdp", "--budget", "1GB", "--json"]) == 0
    plan = json.loads(capsys.readouterr().out)
    assert plan["config"]["sharding"] == "fsdp" and plan["config"]["processes"] == 8
    assert plan["optimizer_state_bytes"] == 8 * plan["trainable_parameters"] / 8


# ---------------------------------------------------------------------------------------------- benchmarks
def test_the_published_sharding_benchmark_halves_each_process_state():
    from bench.report import render

    payload = json.loads((Path(__file__).resolve().parents[1] / "bench" / "results" / "sharding_cpu.json").read_text())
    rows = {r["variant"]: r for r in payload["rows"]}
    assert set(rows) == {"plain-1", "replicated-2", "fsdp-2"} and not any("error" in r for r in rows.values())
    plain = rows["plain-1"]["ranks"][0]
    for rank in rows["fsdp-2"]["ranks"]:
        for key in ("weights_mb", "gradients_mb", "adam_mb"):
            assert rank[key] == pytest.approx(plain[key] / 2, rel=1e-3), key  # even shards (dim 0 split in two)
    for rank in rows["replicated-2"]["ranks"]:
        assert rank["weights_mb"] == plain["weights_mb"]
    assert "| fsdp-2 | 2 | fsdp |" in render("sharding_cpu")


@pytest.mark.slow
def test_gpu_sharding_check_runs_on_the_cpu(tmp_path):
    """bench/gpu/sharding.py --smoke: the fake 8-process group shards the tiny SDXL UNet; the planner's state is 1/8."""
    proc = subprocess.run([sys.executable, "bench/gpu/sharding.py", "--smoke", "--out", str(tmp_path)],
                          cwd=Path(__file__).resolve().parents[1], capture_output=True, text=True, timeout=600,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = json.loads((tmp_path / "gpu_sharding_smoke.json").read_text())["rows"]
    assert [(r["processes"], r["sharding"]) for r in rows] == [(1, "none"), (8, "fsdp")]
    assert all(r["finite"] for r in rows)
    assert rows[1]["predicted_state_mb"] == pytest.approx(rows[0]["predicted_state_mb"] / 8, rel=1e-9)
