"""Half precision as real weights need it: the VAE's float32 decode, the float32 modules a library keeps,
one loader and dtype rule for every command, and FLUX sampled with its distilled guidance, without CFG."""

import math

import pytest
import torch

from align.builtin.testing import tiny_pipeline
from align.core.config import from_dict
from align.core.errors import AlignError, ConfigError
from align.core.models import DiffusionModel, cast_module, fp32_module_names, load_model, resolve_dtype
from align.train.trainer import TrainConfig, Trainer, resolve_mixed_precision

PROMPTS = ["a red circle", "a blue square"]


def _record_convs(module: torch.nn.Module) -> tuple[list[tuple[torch.dtype, torch.dtype, torch.dtype]], list]:
    """(input, weight, output) dtypes of every Conv2d call under ``module`` (forward and recomputation)."""
    seen = []

    def hook(conv, args, output):
        seen.append((args[0].dtype, conv.weight.dtype, output.dtype))

    handles = [m.register_forward_hook(hook) for m in module.modules() if isinstance(m, torch.nn.Conv2d)]
    return seen, handles


def _dtypes(module: torch.nn.Module) -> dict[str, torch.dtype]:
    return {n: t.dtype for n, t in [*module.named_parameters(), *module.named_buffers()] if t.is_floating_point()}


def _train_config(tmp_path, **overrides):
    method = overrides.pop("draft", {})
    data = {
        "method": "draft", "output_dir": str(tmp_path / "run"), "max_steps": 3, "batch_size": 2, "prompts": PROMPTS,
        "reward": "brightness", "checkpoint_every": 0, "sample_every": 0, "num_samples": 2, "lora": {"rank": 2},
        "device": "cpu", "draft": {"num_steps": 3, "learning_rate": 1e-2, "guidance_scale": 3.0, **method},
        **overrides,
    }
    return from_dict(TrainConfig, data)


# ---------------------------------------------------------------------------------------------
# 1. the VAE decodes in float32, outside autocast, when it is upcast


DECODE_CASES = [
    # autocast dtype, upcast_vae, the VAE config's force_upcast, the dtype the decoder's convolutions compute in
    (torch.bfloat16, True, True, torch.float32),
    (torch.bfloat16, False, True, torch.bfloat16),  # bfloat16 has float32's range: upcast only when asked
    (torch.float16, False, True, torch.float32),  # diffusers' rule (SDXL's VAE)
    (torch.float16, False, False, torch.float16),  # an fp16-fixed VAE
    (torch.float16, True, False, torch.float32),
]


@pytest.mark.parametrize("low,upcast,force_upcast,expected", DECODE_CASES)
def test_decode_under_autocast_runs_the_decoder_in_float32_exactly_when_upcast(low, upcast, force_upcast, expected):
    reference = DiffusionModel(tiny_pipeline("sd"))
    pipe = tiny_pipeline("sd")  # the same seeded weights
    pipe.vae.register_to_config(force_upcast=force_upcast)
    model = DiffusionModel(pipe, upcast_vae=upcast)
    model.cast(low)
    for m in (model, reference):
        m.pipe.vae.requires_grad_(False)
    z = torch.randn(reference.latent_shape(2, 32, 32), generator=torch.Generator().manual_seed(0))
    weight = torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(1))

    x_ref = z.clone().requires_grad_(True)
    ref = reference.decode(x_ref, gradient_checkpointing=True)
    (ref * weight).sum().backward()

    seen, handles = _record_convs(model.pipe.vae)
    x = z.clone().requires_grad_(True)
    with torch.autocast("cpu", dtype=low):
        images = model.decode(x, gradient_checkpointing=True)
    forward_calls = len(seen)
    (images * weight).sum().backward()  # the checkpointed blocks recompute here, after the autocast region
    for h in handles:
        h.remove()

    assert forward_calls > 0 and len(seen) > forward_calls
    assert {s[2] for s in seen} == {expected}, "the convolutions' compute dtype, forward and recomputation"
    assert {s[1] for s in seen} == {expected}, "the VAE's weights"
    assert images.dtype == torch.float32 and x.grad.dtype == torch.float32
    if expected == torch.float32:
        # the VAE was never rounded to the low dtype and ran in float32: the float32 decode, bit for bit
        assert {s[0] for s in seen} == {torch.float32}
        torch.testing.assert_close(images, ref, rtol=0, atol=0)
        torch.testing.assert_close(x.grad, x_ref.grad, rtol=0, atol=0)
    else:
        assert not torch.equal(images, ref)
        assert (images - ref).abs().max() < 0.05
        assert torch.isfinite(x.grad).all() and (x.grad - x_ref.grad).abs().max() < 0.05 * x_ref.grad.abs().max()


TRAINER_DECODE_CASES = [("fp16", False, torch.float32), ("bf16", True, torch.float32), ("bf16", False, torch.bfloat16)]


@pytest.mark.parametrize("precision,upcast,expected", TRAINER_DECODE_CASES)
def test_trainer_decodes_in_the_dtype_of_the_one_upcast_rule(tmp_path, precision, upcast, expected):
    cfg = _train_config(tmp_path, mixed_precision=precision, upcast_vae=upcast, max_steps=1)
    trainer = Trainer(cfg, model=DiffusionModel(tiny_pipeline("sd")), progress=False)
    trainer.setup()
    low = {"fp16": torch.float16, "bf16": torch.bfloat16}[precision]
    assert trainer.model.module.conv_in.weight.dtype == low
    seen, handles = _record_convs(trainer.model.pipe.vae)
    metrics = trainer.train_step()  # decodes inside accelerator.autocast()
    for h in handles:
        h.remove()
    assert seen and {s[2] for s in seen} == {expected} and {s[1] for s in seen} == {expected}
    assert math.isfinite(metrics["loss"]) and metrics["skipped"] == 0


# ---------------------------------------------------------------------------------------------
# 2. modules a library keeps in float32 stay so (T5's wo)


@pytest.mark.parametrize("precision,dtype", [("fp16", torch.float16), ("bf16", torch.bfloat16)])
def test_trainer_casts_the_pipeline_as_from_pretrained_loads_it(tmp_path, precision, dtype):
    tiny_pipeline("flux").save_pretrained(tmp_path / "flux")
    loaded = load_model(str(tmp_path / "flux"), dtype=dtype, device="cpu", offline=True)
    original = tiny_pipeline("flux")
    cfg = _train_config(tmp_path, mixed_precision=precision, height=32, width=32, max_sequence_length=8)
    trainer = Trainer(cfg, model=DiffusionModel(tiny_pipeline("flux")), progress=False)
    trainer.setup()
    pipe = trainer.model.pipe
    for name in ("text_encoder", "text_encoder_2", "vae"):
        assert _dtypes(getattr(pipe, name)) == _dtypes(getattr(loaded.pipe, name)), name
    t5 = _dtypes(pipe.text_encoder_2)
    wo = {n for n in t5 if ".wo." in n}
    # transformers keeps T5's wo in float32 for float16 (its activations overflow there), not for bfloat16
    assert wo and {t5[n] for n in wo} == {torch.float32 if dtype == torch.float16 else dtype}
    assert {t5[n] for n in t5 if n not in wo} == {dtype}
    # a kept weight is cast once, from float32: not rounded through the low dtype
    if dtype == torch.float16:
        for n, p in pipe.text_encoder_2.named_parameters():
            if n in wo:
                assert torch.equal(p, original.text_encoder_2.get_parameter(n))
    frozen = {p.dtype for n, p in trainer.model.module.named_parameters() if not p.requires_grad}
    assert frozen == {dtype} and {p.dtype for p in trainer.params} == {torch.float32}


def test_strict_fp32_modules_are_kept_for_bfloat16_too():
    t5 = tiny_pipeline("flux").text_encoder_2
    assert fp32_module_names(t5, torch.float16) == {"wo"}
    assert fp32_module_names(t5, torch.bfloat16) == frozenset()
    assert fp32_module_names(t5, torch.float32) == frozenset()
    t5._keep_in_fp32_modules_strict = {"wo"}
    assert fp32_module_names(t5, torch.bfloat16) == {"wo"}
    cast_module(t5, torch.bfloat16)
    dtypes = _dtypes(t5)
    assert all(d == (torch.float32 if ".wo." in n else torch.bfloat16) for n, d in dtypes.items())


def test_steering_pipeline_from_pipe_keeps_the_float32_parts():
    from pipelines import FKSteeringPipeline

    model = DiffusionModel(tiny_pipeline("flux"))
    model.cast(torch.float16)  # the VAE (force_upcast) and T5's wo stay float32
    before = {n: _dtypes(m) for n, m in model.pipe.components.items() if isinstance(m, torch.nn.Module)}
    assert model.pipe.vae.dtype == torch.float32
    pipe = FKSteeringPipeline.from_pipe(model.pipe)
    after = {n: _dtypes(m) for n, m in pipe.components.items() if isinstance(m, torch.nn.Module)}
    assert after == before
    assert {n: _dtypes(m) for n, m in model.pipe.components.items() if isinstance(m, torch.nn.Module)} == before


# ---------------------------------------------------------------------------------------------
# 3. one loader, one dtype rule


def test_dtype_rule(monkeypatch):
    assert resolve_dtype("auto", "cpu") == torch.float32
    assert resolve_dtype("bfloat16", "cpu") == torch.bfloat16
    assert resolve_dtype(torch.float16) == torch.float16
    assert resolve_mixed_precision("auto", "cpu") == "no"
    assert resolve_mixed_precision("bf16", "cpu") == "bf16"
    with pytest.raises(ConfigError, match=r"dtype='half' is not supported; accepted: 'auto', 'float32', 'float16', 'bfloat16'"):
        resolve_dtype("half")
    with pytest.raises(AlignError, match="dtype=torch.float64 is not supported"):
        resolve_dtype(torch.float64)
    # on CUDA: bfloat16 where the device supports it natively, else float16
    import contextlib

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device", lambda device: contextlib.nullcontext())
    for native, expected, name in ((True, torch.bfloat16, "bf16"), (False, torch.float16, "fp16")):
        monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda including_emulation=True, n=native: n)
        assert resolve_dtype("auto", "cuda") == expected
        assert resolve_dtype("auto", "cuda:1") == expected
        assert resolve_mixed_precision("auto", "auto") == name


@pytest.fixture(scope="module")
def sd_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("m") / "sd"
    tiny_pipeline("sd").save_pretrained(path)
    return path


def test_every_command_loads_through_the_one_loader_with_its_dtype(sd_dir, tmp_path, monkeypatch):
    import align.core.models as models
    from align.commands._inference import load_config_model
    from align.commands.guide import GuideConfig
    from align.commands.steer import SteerConfig
    from align.evaluate import EvalConfig, SampleConfig, evaluate, sample_to_folder

    loaded = []
    real = models.load_model

    def recording(*args, **kwargs):
        loaded.append(real(*args, **kwargs))
        return loaded[-1]

    monkeypatch.setattr(models, "load_model", recording)
    common = {"model": str(sd_dir), "num_steps": 2, "device": "cpu", "offline": True}
    sample_to_folder(SampleConfig(**common, prompts=["a red circle"], dtype="bfloat16", output_dir=str(tmp_path / "s")),
                     progress=False)
    evaluate(EvalConfig(**common, prompts=["a red circle"], dtype="bfloat16", rewards=["brightness"],
                        output_dir=str(tmp_path / "e")), progress=False)
    load_config_model(SteerConfig(**common, dtype="bfloat16"))
    load_config_model(GuideConfig(**common, dtype="bfloat16", lora="unused"))
    trainer = Trainer(_train_config(tmp_path, model=str(sd_dir), mixed_precision="bf16"), progress=False)
    trainer.setup()
    assert len(loaded) == 5 and loaded[-1] is trainer.model
    for model in loaded:
        assert model.module.dtype == torch.bfloat16 and model.pipe.text_encoder.dtype == torch.bfloat16
        assert model.pipe.vae.dtype == torch.bfloat16  # bfloat16 is not upcast unless asked
    # float16 reads the VAE in float32 (force_upcast): full-precision weights, not upcast from rounded ones
    fp16 = real(str(sd_dir), dtype="float16", device="cpu", offline=True)
    assert fp16.module.dtype == torch.float16 and fp16.pipe.vae.dtype == torch.float32
    reference = real(str(sd_dir), dtype="float32", device="cpu", offline=True)
    for a, b in zip(fp16.pipe.vae.parameters(), reference.pipe.vae.parameters()):
        assert torch.equal(a, b)
    auto = real(str(sd_dir), device="cpu", offline=True)
    assert auto.module.dtype == torch.float32  # auto on the CPU


def test_bad_dtype_is_a_config_error(tmp_path):
    from align.evaluate import SampleConfig

    with pytest.raises(ConfigError, match="dtype='fp8' is not supported"):
        SampleConfig(dtype="fp8")
    with pytest.raises(ConfigError, match="true_cfg=true asks for classifier-free guidance but guidance_scale=1.0"):
        SampleConfig(true_cfg=True, guidance_scale=1.0)
    with pytest.raises(ConfigError, match="distilled_guidance=-1"):
        _train_config(tmp_path, draft={"distilled_guidance": -1.0})


# ---------------------------------------------------------------------------------------------
# 4. FLUX: the distilled guidance, no classifier-free doubling unless asked


def _record_transformer(model) -> tuple[list[tuple[int, torch.Tensor]], object]:
    calls = []

    def hook(module, args, kwargs):
        calls.append((kwargs["hidden_states"].shape[0], kwargs["guidance"].detach().clone()))

    return calls, model.module.register_forward_pre_hook(hook, with_kwargs=True)


@pytest.mark.parametrize("true_cfg,batch", [(False, 2), (True, 4)])
def test_flux_training_samples_with_the_distilled_guidance_and_no_cfg(tmp_path, caplog, true_cfg, batch):
    model = DiffusionModel(tiny_pipeline("flux"))
    cfg = _train_config(
        tmp_path, height=32, width=32, max_sequence_length=8, gradient_checkpointing=False,
        draft={"guidance_scale": 7.5, "distilled_guidance": 2.5, "true_cfg": true_cfg},
    )
    trainer = Trainer(cfg, model=model, progress=False)
    with caplog.at_level("WARNING", logger="align.core.models"):
        trainer.setup()
    notice = "is guidance-distilled: sampling with its embedded distilled_guidance=2.5 and no classifier-free guidance"
    assert (notice in caplog.text) == (not true_cfg)
    assert "guidance_scale=7.5 is not used (set true_cfg=true" in caplog.text or true_cfg
    calls, handle = _record_transformer(model)
    before = [p.detach().clone() for p in trainer.params]
    for _ in range(cfg.max_steps):
        metrics = trainer.train_step()
        assert math.isfinite(metrics["loss"]) and metrics["skipped"] == 0
    handle.remove()
    # one transformer call per sampling step, each on the batch (doubled only with true_cfg)
    assert len(calls) == cfg.max_steps * cfg.draft.num_steps
    assert {b for b, _ in calls} == {batch}
    assert all(torch.equal(g, torch.full((batch,), 2.5)) for _, g in calls)
    assert any(not torch.equal(a, p) for a, p in zip(before, trainer.params))


def test_flux_sample_uses_the_distilled_guidance(tmp_path):
    from align.evaluate import SampleConfig, sample_to_folder

    model = DiffusionModel(tiny_pipeline("flux"))
    calls, handle = _record_transformer(model)
    config = SampleConfig(prompts=["a red circle", "a blue square"], num_steps=2, height=32, width=32,
                          distilled_guidance=4.0, output_dir=str(tmp_path / "s"))
    _, records, images = sample_to_folder(config, model=model, progress=False)
    handle.remove()
    assert len(records) == 2 and torch.isfinite(images).all()
    assert len(calls) == 2 and {b for b, _ in calls} == {2}
    assert all(torch.equal(g, torch.full((2,), 4.0)) for _, g in calls)


def test_steer_and_guide_pass_flux_its_distilled_guidance():
    from align.commands._inference import pipeline_guidance_scale
    from align.commands.guide import GuideConfig
    from align.commands.steer import SteerConfig

    flux, sd = DiffusionModel(tiny_pipeline("flux")), DiffusionModel(tiny_pipeline("sd"))
    assert pipeline_guidance_scale(flux, SteerConfig(distilled_guidance=2.0)) == 2.0
    assert pipeline_guidance_scale(flux, GuideConfig(lora="x")) == 3.5
    assert pipeline_guidance_scale(sd, SteerConfig(guidance_scale=6.0, distilled_guidance=2.0)) == 6.0
    assert pipeline_guidance_scale(sd, SteerConfig()) is None  # the family default
    with pytest.raises(ConfigError, match="guidance_scale=5.0 asks for classifier-free guidance.*distilled_guidance"):
        pipeline_guidance_scale(flux, SteerConfig(guidance_scale=5.0))
