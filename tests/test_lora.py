"""LoRA through peft: adapters land on each text-encoder family's attention projections, switch off
and back exactly, train, and round-trip through a plain diffusers (and transformers) reload."""

import json

import pytest
import torch
from _threads import one_thread  # noqa: F401
from safetensors import safe_open

from align.builtin.testing import tiny_pipeline
from align.core.config import from_dict
from align.core.errors import AlignError
from align.core.lora import (
    LORA_FILE,
    LoRAConfig,
    adapters_disabled,
    add_lora,
    has_adapters,
    load_lora,
    named_text_encoders,
    save_lora,
    tuner_layers,
)
from align.core.models import DiffusionModel
from align.train.trainer import TrainConfig, Trainer

PROMPTS = ["a red circle", "a blue square"]
CLIP = {"q_proj", "k_proj", "v_proj", "out_proj"}
T5 = {"q", "k", "v", "o"}


def _adapted_names(module) -> set[str]:
    """Leaf names (q_proj, q, ...) of the modules that carry adapter layers."""
    names = {id(m): n for n, m in module.named_modules()}
    return {names[id(layer)].rsplit(".", 1)[-1] for layer in tuner_layers(module)}


def _perturb(params, scale: float = 0.3) -> None:
    """LoRA B starts at zero (adapters are a no-op); give every adapter weight a value."""
    with torch.no_grad():
        for i, p in enumerate(params):
            p.add_(scale * torch.randn(p.shape, generator=torch.Generator().manual_seed(i)))


def _encode(pipe, name: str) -> torch.Tensor:
    tokenizer = pipe.tokenizer_2 if name == "text_encoder_2" and "T5" in type(pipe.text_encoder_2).__name__ else pipe.tokenizer
    ids = tokenizer(PROMPTS, padding="max_length", max_length=8, truncation=True, return_tensors="pt").input_ids
    with torch.no_grad():
        return getattr(pipe, name)(ids)[0]


@pytest.mark.floor
@pytest.mark.parametrize(
    "family,expected",
    [
        ("sd", {"text_encoder": CLIP}),
        ("sdxl", {"text_encoder": CLIP, "text_encoder_2": CLIP}),  # CLIPTextModel, CLIPTextModelWithProjection
        ("flux", {"text_encoder": CLIP, "text_encoder_2": T5}),  # CLIPTextModel, T5EncoderModel
    ],
)
def test_text_encoder_adapters_land_on_the_family_attention_projections(family, expected):
    model = DiffusionModel(tiny_pipeline(family))
    params = add_lora(model, LoRAConfig(rank=2, text_encoder=True))
    encoders = named_text_encoders(model.pipe)
    assert {name: _adapted_names(enc) for name, enc in encoders.items()} == expected
    for name, enc in encoders.items():
        layers = enc.config.num_hidden_layers if "clip" in enc.config.model_type else enc.config.num_layers
        assert len(tuner_layers(enc)) == 4 * layers, name
        # exactly the adapter weights train, as float32; the encoder's own weights stay frozen
        trainable = [n for n, p in enc.named_parameters() if p.requires_grad]
        assert len(trainable) == 2 * 4 * layers and all(".lora_A." in n or ".lora_B." in n for n in trainable)
    assert _adapted_names(model.module) == {"to_q", "to_k", "to_v", "0"}  # to_out.0
    assert len(params) == sum(p.requires_grad for m in [model.module, *encoders.values()] for p in m.parameters())
    assert all(p.dtype == torch.float32 for p in params)


def test_one_text_encoder_target_list_covers_clip_and_t5():
    model = DiffusionModel(tiny_pipeline("flux"))
    add_lora(model, LoRAConfig(rank=2, text_encoder=True, text_encoder_target_modules=["q_proj", "v_proj", "q", "v"]))
    assert _adapted_names(model.pipe.text_encoder) == {"q_proj", "v_proj"}
    assert _adapted_names(model.pipe.text_encoder_2) == {"q", "v"}


@pytest.mark.parametrize(
    "family,targets,message",
    [
        ("sd", ["query"], r"\['query'\] match no module of text_encoder \(CLIPTextModel\); linear layer names it has: "
                          r"fc1, fc2, k_proj, out_proj, q_proj, v_proj"),
        ("flux", ["q_proj"], r"\['q_proj'\] match no module of text_encoder_2 \(T5EncoderModel\); linear layer names "
                             r"it has: k, o, q, v, wi, wo"),
        ("flux", ["q_proj", "q", "qkv"], r"\['qkv'\] match no module of any text encoder"),
    ],
)
def test_text_encoder_targets_that_match_nothing_name_the_layers_there_are(family, targets, message):
    model = DiffusionModel(tiny_pipeline(family))
    with pytest.raises(AlignError, match=message):
        add_lora(model, LoRAConfig(text_encoder=True, text_encoder_target_modules=targets))
    # checked before any adapter is added
    assert not any(has_adapters(m) for m in [model.module, *named_text_encoders(model.pipe).values()])


def test_text_encoder_of_an_unknown_family_asks_for_targets():
    model = DiffusionModel(tiny_pipeline("sd"))
    model.pipe.text_encoder.config.model_type = "bert"
    with pytest.raises(AlignError, match=r"CLIPTextModel \(model_type='bert'\).*text_encoder_target_modules.*q_proj"):
        add_lora(model, LoRAConfig(text_encoder=True))
    add_lora(model, LoRAConfig(text_encoder=True, text_encoder_target_modules=["q_proj"]))
    assert _adapted_names(model.pipe.text_encoder) == {"q_proj"}


def test_empty_text_encoder_target_list_is_refused():
    with pytest.raises(AlignError, match=r"text_encoder_target_modules=\[\] is empty"):
        LoRAConfig(text_encoder_target_modules=[])


@pytest.mark.floor
def test_adapters_disabled_runs_the_base_model_and_restores_every_layer_state():
    pipe = tiny_pipeline("flux")
    base = {name: _encode(pipe, name) for name in ("text_encoder", "text_encoder_2")}
    model = DiffusionModel(pipe)
    _perturb(add_lora(model, LoRAConfig(rank=2, text_encoder=True)))
    adapted = {name: _encode(pipe, name) for name in base}
    for name, enc in named_text_encoders(pipe).items():
        assert (adapted[name] - base[name]).abs().max() > 1e-2
        with adapters_disabled(enc):
            assert torch.equal(_encode(pipe, name), base[name])  # the base layer's own forward, bit for bit
        assert torch.equal(_encode(pipe, name), adapted[name])
    # a frozen LoRA (as diffusers loads one) stays frozen; a layer switched off before stays off
    enc = pipe.text_encoder_2
    for p in enc.parameters():
        p.requires_grad_(False)
    first, *rest = tuner_layers(enc)
    first.enable_adapters(False)
    with adapters_disabled(enc):
        assert all(layer.disable_adapters for layer in tuner_layers(enc))
    assert first.disable_adapters and not any(layer.disable_adapters for layer in rest)
    assert not any(p.requires_grad for p in enc.parameters())
    # the denoiser, through a DiffusionModel, alike
    trainable = [p for p in model.module.parameters() if p.requires_grad]
    with adapters_disabled(model):
        assert all(layer.disable_adapters for layer in tuner_layers(model.module))
    assert not any(layer.disable_adapters for layer in tuner_layers(model.module))
    assert [p for p in model.module.parameters() if p.requires_grad] == trainable


@pytest.mark.floor
def test_saved_lora_with_text_encoder_reloads_in_plain_diffusers(tmp_path):
    """rank 4 with alpha 8: a reload that lost the metadata would halve every update."""
    model = DiffusionModel(tiny_pipeline("sd"))
    _perturb(add_lora(model, LoRAConfig(rank=4, alpha=8.0, text_encoder=True)))
    save_lora(model, tmp_path / "lora")
    with safe_open(str(tmp_path / "lora" / LORA_FILE), "pt") as f:
        keys, metadata = list(f.keys()), f.metadata()
    assert any(k.startswith("text_encoder.") for k in keys) and any(k.startswith("unet.") for k in keys)
    configs = json.loads(metadata["lora_adapter_metadata"])  # diffusers: {"<component>.<field>": value}
    for name in ("unet", "text_encoder"):
        assert (configs[f"{name}.r"], configs[f"{name}.lora_alpha"]) == (4, 8.0), name
    fresh = tiny_pipeline("sd")
    common = dict(num_inference_steps=3, guidance_scale=3.0, output_type="pt")
    with torch.no_grad():
        base = fresh(PROMPTS, generator=torch.Generator().manual_seed(0), **common).images
        ours = model.pipe(PROMPTS, generator=torch.Generator().manual_seed(0), **common).images
        fresh.load_lora_weights(str(tmp_path / "lora"))
        reloaded = fresh(PROMPTS, generator=torch.Generator().manual_seed(0), **common).images
    torch.testing.assert_close(_encode(fresh, "text_encoder"), _encode(model.pipe, "text_encoder"), atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(reloaded, ours, atol=2e-5, rtol=1e-4)
    assert (base - ours).abs().max() > 1e-2


def _flux_run(tmp_path) -> TrainConfig:
    return from_dict(TrainConfig, {
        "method": "draft", "output_dir": str(tmp_path / "run"), "max_steps": 1, "batch_size": 2, "prompts": PROMPTS,
        "reward": "brightness", "checkpoint_every": 0, "sample_every": 0, "num_samples": 2,
        "lora": {"rank": 2, "alpha": 4.0, "text_encoder": True}, "max_sequence_length": 8,
        "draft": {"num_steps": 3, "learning_rate": 1e-2, "guidance_scale": 3.0},
    })


@pytest.mark.floor
def test_t5_lora_trains_and_reloads(tmp_path):
    """FLUX's T5 (text_encoder_2): one training step moves its q/k/v/o adapters; diffusers' loader
    skips T5 encoders, so the saved folder carries that adapter in peft's format beside the file."""
    model = DiffusionModel(tiny_pipeline("flux"))
    trainer = Trainer(_flux_run(tmp_path), model=model, progress=False)
    trainer.train()
    t5 = model.pipe.text_encoder_2
    moved = [p for n, p in t5.named_parameters() if ".lora_B." in n]
    assert len(moved) == 4 and all(p.detach().abs().max() > 0 for p in moved)  # B starts at zero
    folder = tmp_path / "run" / "lora"
    assert (folder / "text_encoder_2" / "adapter_config.json").is_file()

    common = dict(num_inference_steps=3, guidance_scale=3.0, height=32, width=32, max_sequence_length=8, output_type="pt")

    def sample(pipe):
        with torch.no_grad():
            return pipe(PROMPTS, generator=torch.Generator().manual_seed(0), **common).images

    ours = sample(model.pipe)
    plain = tiny_pipeline("flux")
    plain.load_lora_weights(str(folder))
    without_t5 = sample(plain)
    plain.text_encoder_2.load_adapter(str(folder / "text_encoder_2"))  # plain transformers
    torch.testing.assert_close(sample(plain), ours, atol=2e-5, rtol=1e-4)
    assert (without_t5 - ours).abs().max() > 1e-4  # the T5 part carries weight

    reloaded = DiffusionModel(tiny_pipeline("flux"))
    load_lora(reloaded, folder)
    assert _adapted_names(reloaded.pipe.text_encoder_2) == T5
    torch.testing.assert_close(sample(reloaded.pipe), ours, atol=2e-5, rtol=1e-4)
