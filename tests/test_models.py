"""The toolkit's sampling loop reproduces each family's diffusers pipeline; loading errors are clear."""

import pytest
import torch

from align.builtin.testing import tiny_pipeline
from align.core.errors import AlignError
from align.core.models import DiffusionModel, load_model, resolve_model
from align.core.sampling import guided_prediction

PROMPTS = ["a red circle", "a blue square on a green background"]


def _our_sample(model, latents, steps, guidance, height, width, **encode):
    sched = model.schedule(steps, height=height, width=width)
    pc = model.encode_prompts(PROMPTS, guidance=guidance > 1.0, height=height, width=width, **encode)
    x = latents.clone()
    for i in range(steps):
        t = sched.model_timestep(i, x.shape[0], x.device)
        x = sched.step(i, x, guided_prediction(model.denoiser, x, t, pc.cond, pc.uncond, guidance)).prev_sample
    return model.decode(x)


@pytest.mark.floor
@pytest.mark.parametrize(
    "family,height,width,guidance",
    [("sd", 32, 32, 5.0), ("sd", 32, 48, 1.0), ("sdxl", 32, 32, 5.0), ("sd3", 32, 48, 4.0), ("flux", 32, 32, 1.0)],
)
@torch.no_grad()
def test_sampling_loop_matches_pipeline(family, height, width, guidance):
    pipe = tiny_pipeline(family)
    if family == "sdxl":
        from diffusers import DDIMScheduler

        pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config)
    model = DiffusionModel(pipe)
    shape = model.latent_shape(2, height, width)
    latents = torch.randn(shape, generator=torch.Generator().manual_seed(0))
    extra = {"max_sequence_length": 8} if family in ("sd3", "flux") else {}
    ours = _our_sample(model, latents, 4, guidance, height, width, **extra)
    call_latents = model.denoiser.pack(latents) if family == "flux" else latents
    ref = pipe(
        PROMPTS, latents=call_latents, num_inference_steps=4, guidance_scale=3.5 if family == "flux" else guidance,
        height=height, width=width, output_type="pt", **extra,
    ).images
    assert ours.shape == (2, 3, height, width)
    torch.testing.assert_close(ours, ref.float(), atol=2e-5, rtol=1e-4)


def test_resolution_is_checked():
    model = DiffusionModel(tiny_pipeline("sd"))
    with pytest.raises(AlignError, match="height=30.*multiples of 4"):
        model.latent_shape(1, 30, 32)


def test_missing_model_path_is_named(tmp_path):
    missing = tmp_path / "no-such-model"
    with pytest.raises(AlignError, match="does not exist"):
        resolve_model(str(missing))
    with pytest.raises(AlignError, match="without model_index.json"):
        resolve_model(str(tmp_path))


def test_offline_hub_id_not_cached(monkeypatch, tmp_path):
    monkeypatch.setenv("HF_HOME", str(tmp_path))
    with pytest.raises(AlignError, match="not in the local Hugging Face cache, and offline mode is on"):
        load_model("someone/not-a-cached-model", offline=True)


def test_local_folder_roundtrip(tmp_path):
    pipe = tiny_pipeline("sd")
    pipe.save_pretrained(tmp_path / "m")
    model = load_model(str(tmp_path / "m"), device="cpu", offline=True)
    assert model.family == "sd"
    for a, b in zip(model.module.parameters(), pipe.unet.parameters()):
        assert torch.equal(a, b)


def test_pickle_weights_refused(tmp_path):
    pipe = tiny_pipeline("sd")
    pipe.save_pretrained(tmp_path / "m", safe_serialization=False)
    with pytest.raises(AlignError, match="pickle checkpoints are refused"):
        load_model(str(tmp_path / "m"), device="cpu", offline=True)
    model = load_model(str(tmp_path / "m"), device="cpu", offline=True, allow_pickle=True)
    assert model.family == "sd"


def test_unsupported_sampler_for_family():
    with pytest.raises(AlignError, match="sampler='ddim' does not apply to the flow-matching family sd3"):
        DiffusionModel(tiny_pipeline("sd3")).schedule(4, sampler="ddim")
    with pytest.raises(AlignError, match="sampler='euler'.*accepted"):
        DiffusionModel(tiny_pipeline("sd")).schedule(4, sampler="euler")


@pytest.mark.parametrize("family", ["sd", "sd3"])
def test_block_checkpointed_decode_has_exact_gradients_and_a_lower_backward_peak(family):
    from align.train.plan import trace_call

    model = DiffusionModel(tiny_pipeline(family, seed=0))
    model.pipe.vae.requires_grad_(False)
    z = torch.randn(model.latent_shape(2, 64, 64), generator=torch.Generator().manual_seed(0))
    weight = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(1))
    grads, traces = [], []
    for checkpointed in (False, True):
        x = z.clone().requires_grad_(True)
        (model.decode(x, gradient_checkpointing=checkpointed) * weight).sum().backward()
        grads.append(x.grad)
        traces.append(trace_call(lambda x, c=checkpointed: model.decode(x, gradient_checkpointing=c), z))
    torch.testing.assert_close(grads[1], grads[0], rtol=0, atol=0)
    plain, blocks = traces
    # kept for the backward: only block inputs, far less than every activation
    assert blocks.kept < 0.5 * plain.kept
    assert blocks.backward < plain.backward
    # nothing stays patched after the decode
    assert not any("forward" in vars(m) for m in model.pipe.vae.modules())


def test_block_checkpointing_keeps_a_forward_hook_a_block_already_had():
    # accelerate's offload hooks replace a module's forward on the instance; it must survive the decode
    model = DiffusionModel(tiny_pipeline("sd", seed=0))
    model.pipe.vae.requires_grad_(False)
    block = model.pipe.vae.decoder.up_blocks[0].resnets[0]
    calls = []
    original = block.forward

    def hooked(*args, **kwargs):
        calls.append(1)
        return original(*args, **kwargs)

    block.forward = hooked
    z = torch.randn(model.latent_shape(1, 32, 32), generator=torch.Generator().manual_seed(0)).requires_grad_(True)
    model.decode(z, gradient_checkpointing=True).sum().backward()
    assert vars(block)["forward"] is hooked
    assert len(calls) == 2  # the forward, then its recomputation in the backward
    assert z.grad is not None and torch.isfinite(z.grad).all()


class _BrokenXformersPipe:
    """A pipeline on a GPU whose xformers build cannot run (no real GPU needed: only the device is read)."""

    device = torch.device("cuda")

    def __init__(self, error):
        self.error, self.calls = error, 0

    def enable_xformers_memory_efficient_attention(self):
        self.calls += 1
        raise self.error


def test_xformers_failure_is_logged_once_with_the_reason(monkeypatch, caplog):
    import sys
    import types

    from align.core import models

    monkeypatch.setitem(sys.modules, "xformers", types.ModuleType("xformers"))
    monkeypatch.setattr(models.enable_memory_efficient_attention, "reported", set(), raising=False)
    error = RuntimeError("No operator found for `memory_efficient_attention_forward` with inputs")
    pipe = _BrokenXformersPipe(error)
    with caplog.at_level("WARNING", logger="align.core.models"):
        assert models.enable_memory_efficient_attention(pipe) is False
        assert models.enable_memory_efficient_attention(pipe) is False  # a second model load: no second warning
        other = _BrokenXformersPipe(NotImplementedError("xformers was built for torch 2.4"))
        assert models.enable_memory_efficient_attention(other) is False
    assert pipe.calls == 2 and other.calls == 1
    messages = [r.getMessage() for r in caplog.records if r.name == "align.core.models"]
    assert messages == [
        "xformers is installed but could not be enabled (RuntimeError: No operator found for "
        "`memory_efficient_attention_forward` with inputs); using PyTorch's scaled-dot-product attention",
        "xformers is installed but could not be enabled (NotImplementedError: xformers was built for torch 2.4); "
        "using PyTorch's scaled-dot-product attention",
    ]
    assert all(r.levelname == "WARNING" for r in caplog.records if r.name == "align.core.models")


def test_unreachable_hub_is_said_in_our_words(tmp_path):
    """Offline without HF_HUB_OFFLINE: no diffusers stack-trace talk, no local_files_only hint; the model
    id and what to do (a local folder, or download on a connected machine)."""
    import subprocess
    import sys

    env = {k: v for k, v in __import__("os").environ.items() if k != "HF_HUB_OFFLINE"}
    env.update(HF_ENDPOINT="http://127.0.0.1:9", HF_HOME=str(tmp_path / "hf"))  # a closed port: connection refused
    proc = subprocess.run([sys.executable, "-m", "align", "sample", "model=stable-diffusion-v1-5/stable-diffusion-v1-5",
                           f"output_dir={tmp_path / 'out'}"], capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 2
    err = proc.stderr.strip().splitlines()[-1]
    assert "model='stable-diffusion-v1-5/stable-diffusion-v1-5' is not in the local Hugging Face cache and the " \
           "Hugging Face hub cannot be reached" in err
    assert "hf download stable-diffusion-v1-5/stable-diffusion-v1-5" in err and "local diffusers folder" in err
    for theirs in ("stacktrace", "local_files_only", "outgoing traffic"):
        assert theirs not in proc.stderr


def test_load_failures_are_explained_from_the_exception_chain():
    from align.core.hub import explain_load_failure

    class GatedRepoError(OSError):
        pass

    class Response:
        status_code = 404

    class HTTPError(OSError):
        response = Response()

    def chained(outer: BaseException, inner: BaseException) -> BaseException:
        outer.__cause__ = inner
        return outer

    assert "is gated" in str(explain_load_failure("a/b", chained(OSError("x"), GatedRepoError()), offline=False))
    assert "is not a model on the Hugging Face hub" in str(explain_load_failure("a/b", HTTPError(), offline=False))
    offline = str(explain_load_failure("a/b", OSError("outgoing traffic has been disabled"), offline=True))
    assert "offline mode is on" in offline and "outgoing traffic" not in offline
    other = str(explain_load_failure("a/b", OSError("disk full"), offline=False))
    assert other == "model='a/b' could not be loaded: disk full"
