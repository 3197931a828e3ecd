"""The zoo: every reward end to end on tiny models, faithful formulas, gradients, loading."""

import io
import os

import numpy as np
import pytest
import torch
from PIL import Image

from align.builtin.testing import DEFAULT_WORDS
from align.core.errors import AlignError
from rewards import available_rewards, build_reward
from rewards.loading import import_optional, load_state_dict, resolve_file
from rewards.testing import OpenClipLayoutCLIP, tiny_clip, tiny_openclip_checkpoint, tiny_rewards
from rewards.zoo.aesthetic import Aesthetic, AestheticHead
from rewards.zoo.clip import ClipScore, PickScore
from rewards.zoo.hps import HPSv2, openclip_as_transformers, openclip_to_transformers

PROMPTS = ["a red cat", "a blue dog", "a photo of a green bird"]
EXPECTED_NAMES = {
    "aesthetic", "brightness", "clipscore", "colorfulness", "darkness", "ensemble", "hpsv2", "hpsv2.1",
    "imagereward", "jpeg_compressibility", "jpeg_incompressibility", "pickscore", "saturation",
    "target_color", "textnorm", "vlm_judge",
}


@pytest.fixture(scope="module")
def tiny():
    torch.manual_seed(0)
    return tiny_rewards(seed=0)


def test_registry_lists_the_zoo():
    assert EXPECTED_NAMES <= set(available_rewards())


def test_unknown_name_suggests():
    with pytest.raises(AlignError, match=r"unknown reward 'pickscor'.*Did you mean 'pickscore'"):
        build_reward("pickscor")


# -- image statistics: analytic values --------------------------------------------------------
def solid(rgb, size=8):
    return torch.tensor(rgb, dtype=torch.float32).view(1, 3, 1, 1).expand(1, 3, size, size).clone()


@pytest.mark.parametrize(
    "name, image, expected",
    [
        ("brightness", solid([0.25, 0.25, 0.25]), 0.25),
        ("brightness", solid([1.0, 0.0, 0.0]), 0.299),
        ("darkness", solid([0.0, 0.0, 1.0]), 1 - 0.114),
        ("saturation", solid([1.0, 0.0, 0.0]), 1.0),
        ("saturation", solid([0.3, 0.3, 0.3]), 0.0),
        ("colorfulness", solid([0.4, 0.4, 0.4]), 0.0),
        ("colorfulness", solid([1.0, 0.0, 0.0]), 0.3 * 1.25**0.5),  # rg = 1, yb = 0.5, no spread
        # half red, half blue: rg in {1, 0}, yb in {0.5, -1}: sqrt(0.25 + 0.5625) + 0.3 sqrt(0.25 + 0.0625)
        ("colorfulness", torch.cat([solid([1.0, 0, 0]), solid([0, 0, 1.0])], dim=-1), 0.8125**0.5 + 0.3 * 0.3125**0.5),
        ("target_color", solid([1.0, 0.0, 0.0]), 0.0),
        ("target_color", solid([0.0, 0.0, 0.0]), -1 / 3),
    ],
)
def test_image_statistics(name, image, expected):
    assert build_reward(name)(image).item() == pytest.approx(expected, abs=1e-5)


def test_target_color_validates():
    with pytest.raises(AlignError, match="three numbers in"):
        build_reward("target_color", color=(2, 0, 0))


# -- JPEG -----------------------------------------------------------------------------------------
def test_jpeg_size_is_ddpo_quality_95_in_kb():
    torch.manual_seed(0)
    noise, flat = torch.rand(1, 3, 64, 64), torch.full((1, 3, 64, 64), 0.5)
    images = torch.cat([noise, flat])
    compress = build_reward("jpeg_compressibility")
    incompress = build_reward("jpeg_incompressibility")
    assert not compress.differentiable and not incompress.differentiable
    scores = compress(images)
    torch.testing.assert_close(incompress(images), -scores)
    buffer = io.BytesIO()
    Image.fromarray((noise[0] * 255).round().byte().permute(1, 2, 0).numpy()).save(buffer, "JPEG", quality=95)
    assert -scores[0].item() == pytest.approx(buffer.tell() / 1000)
    assert scores[1] > scores[0]  # a flat image compresses far better than noise
    assert -scores[1].item() < 1.5 < -scores[0].item()


# -- CLIP family on tiny models ------------------------------------------------------------------
MODEL_REWARDS = ["clipscore", "pickscore", "aesthetic", "hpsv2", "hpsv2.1"]


@pytest.mark.parametrize("name", MODEL_REWARDS)
def test_model_reward_end_to_end_and_gradient_reaches_pixels(tiny, name):
    reward = tiny[name]
    assert reward.differentiable
    torch.manual_seed(1)
    images = (0.2 + 0.6 * torch.rand(3, 3, 40, 48)).requires_grad_()
    out = reward.score(images, PROMPTS)
    assert out.scores.shape == (3,) and torch.isfinite(out.scores).all() and out.valid.all()
    assert all(not p.requires_grad for p in reward.parameters())
    out.scores.sum().backward()
    grad_per_image = images.grad.abs().sum((1, 2, 3))
    assert torch.isfinite(images.grad).all()
    positive = out.info["cosine"] > 0 if name == "clipscore" else torch.ones(3, dtype=torch.bool)
    assert (grad_per_image[positive] > 0).all()  # clipscore is flat where the cosine is clipped at 0
    if name == "clipscore":
        assert (grad_per_image[~positive] == 0).all()


@pytest.mark.parametrize("name", MODEL_REWARDS)
def test_gradient_matches_finite_differences(tiny, name):
    """Gradcheck-style: <grad, v> against central differences along random directions, in float64."""
    reward = tiny[name]
    torch.manual_seed(2)
    x = (0.3 + 0.4 * torch.rand(2, 3, 36, 36, dtype=torch.float64)).requires_grad_()
    prompts = PROMPTS[:2]
    if name == "clipscore":  # stay where the cosine is positive (max(cos, 0) has a kink at 0)
        prompts = next([p, p] for p in DEFAULT_WORDS if reward.score(x.detach(), [p, p]).info["cosine"].min() > 0.01)
    reward(x, prompts).sum().backward()
    for _ in range(3):
        v = torch.randn_like(x)
        h = 1e-5
        f_plus, f_minus = reward(x.detach() + h * v, prompts).sum(), reward(x.detach() - h * v, prompts).sum()
        numeric = (f_plus - f_minus) / (2 * h)
        analytic = (x.grad * v).sum()
        assert analytic.item() == pytest.approx(numeric.item(), rel=1e-4, abs=1e-9)
    assert next(reward.parameters()).dtype == torch.float64
    reward(x.detach().float(), prompts)  # back to float32 for the other tests


def _processor_pixels(images, size=32):
    from transformers import CLIPImageProcessorPil

    processor = CLIPImageProcessorPil(size={"shortest_edge": size}, crop_size={"height": size, "width": size})
    arrays = [(im * 255).round().byte().permute(1, 2, 0).numpy() for im in images]
    return torch.from_numpy(np.asarray(processor(images=arrays, return_tensors="np")["pixel_values"]))


def test_clipscore_and_pickscore_match_reference_formulas():
    """Scores equal the reference computations with transformers' own CLIP forward and processor."""
    clip, tokenizer = tiny_clip(seed=5)
    torch.manual_seed(3)
    images = torch.rand(3, 3, 32, 32).mul(255).round().div(255)  # model resolution: no resize
    tokens = tokenizer(PROMPTS, padding="max_length", max_length=16, return_tensors="pt")
    with torch.no_grad():
        ref = clip(input_ids=tokens.input_ids, attention_mask=tokens.attention_mask,
                   pixel_values=_processor_pixels(images))
    logits = ref.logits_per_image.diagonal()  # exp(logit_scale) * cos
    cos = logits / clip.logit_scale.exp()
    pick = PickScore(clip, tokenizer=tokenizer, processor=None)(images, PROMPTS)
    torch.testing.assert_close(pick, logits, atol=1e-4, rtol=1e-4)
    score = ClipScore(clip, tokenizer=tokenizer)(images, PROMPTS)
    torch.testing.assert_close(score, 2.5 * cos.clamp(min=0), atol=1e-5, rtol=1e-4)
    # a resized input stays within what the preprocessing tolerance allows
    big = torch.nn.functional.interpolate(images, size=(64, 80), mode="nearest")
    torch.testing.assert_close(PickScore(clip, tokenizer=tokenizer, processor=None)(big, PROMPTS),
                               clip(input_ids=tokens.input_ids, pixel_values=_processor_pixels(big))
                               .logits_per_image.diagonal().detach(), atol=0.05, rtol=0)


def test_aesthetic_matches_reference_formula():
    vision, _ = tiny_clip(seed=6, vision_only=True)
    torch.manual_seed(4)
    head = AestheticHead(16)
    images = torch.rand(2, 3, 32, 32).mul(255).round().div(255)
    with torch.no_grad():
        embeds = vision(pixel_values=_processor_pixels(images)).image_embeds
        expected = head.eval()(embeds / embeds.norm(dim=-1, keepdim=True))
    torch.testing.assert_close(Aesthetic(vision, head=head)(images), expected, atol=1e-5, rtol=1e-4)
    # the released head layout: Linear indices 0, 2, 4, 6, 7 (dropouts between, no activation)
    keys = [k for k in AestheticHead(768).state_dict() if k.endswith("weight")]
    assert keys == [f"layers.{i}.weight" for i in (0, 2, 4, 6, 7)]


def test_text_embeddings_cached_per_prompt(tiny):
    backbone = tiny["clipscore"].backbone
    calls = []
    original = backbone._text_features
    backbone._text_features = lambda prompts: calls.append(list(prompts)) or original(prompts)
    try:
        backbone._text_cache.clear()
        images = torch.rand(3, 3, 32, 32)
        first = tiny["clipscore"](images, ["a cat", "a dog", "a cat"])
        second = tiny["clipscore"](images, ["a cat", "a dog", "a cat"])
        tiny["clipscore"](images, ["a cat", "a bird", "a dog"])
    finally:
        del backbone._text_features
    assert calls == [["a cat", "a dog"], ["a bird"]]
    torch.testing.assert_close(first, second)


# -- HPSv2: the open_clip -> transformers remap -------------------------------------------------
def test_openclip_remap_reproduces_openclip_forward():
    _, tokenizer = tiny_clip()
    torch.manual_seed(7)
    reference = OpenClipLayoutCLIP(len(tokenizer)).eval()
    state = {k: v.clone() for k, v in reference.state_dict().items()}
    model = openclip_as_transformers(state, vision_heads=4, text_heads=4)
    pixels = torch.randn(2, 3, 32, 32)
    tokens = tokenizer(PROMPTS, padding="max_length", max_length=16, return_tensors="pt").input_ids
    with torch.no_grad():
        image = model.visual_projection(model.vision_model(pixel_values=pixels).pooler_output)
        text = model.text_projection(model.text_model(input_ids=tokens).pooler_output)
        torch.testing.assert_close(image, reference.encode_image(pixels), atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(text, reference.encode_text(tokens), atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(model.logit_scale, reference.logit_scale)
        # the comparison is sensitive to the q/k/v order: swapping q and k breaks it
        remapped = openclip_to_transformers(state)
        prefix = "vision_model.encoder.layers.0.self_attn."
        remapped[prefix + "q_proj.weight"], remapped[prefix + "k_proj.weight"] = (
            remapped[prefix + "k_proj.weight"], remapped[prefix + "q_proj.weight"])
        model.load_state_dict(remapped, strict=False)
        swapped = model.visual_projection(model.vision_model(pixel_values=pixels).pooler_output)
        assert (swapped - image).abs().max() > 1e-3


def test_openclip_remap_rejects_unknown_layouts():
    state = dict(tiny_openclip_checkpoint(60))
    state["visual.attnpool.weight"] = torch.zeros(1)
    with pytest.raises(AlignError, match="visual.attnpool.weight"):
        openclip_to_transformers(state)


def test_hpsv2_loads_a_checkpoint_file_and_uses_longest_side_padding(tmp_path):
    _, tokenizer = tiny_clip()
    state = tiny_openclip_checkpoint(len(tokenizer), seed=8)
    path = tmp_path / "HPS_tiny.pt"
    torch.save({"state_dict": {f"module.{k}": v for k, v in state.items()}}, path)
    reward = HPSv2("v2.1", checkpoint=str(path), tokenizer=tokenizer, vision_heads=4, text_heads=4)
    assert reward.name == "hpsv2.1" and reward.backbone.preprocess.resize_mode == "longest"
    reference = OpenClipLayoutCLIP(len(tokenizer)).eval()
    reference.load_state_dict(state)
    images = torch.rand(2, 3, 32, 32)
    with torch.no_grad():
        img = reference.encode_image(reward.backbone.preprocess(images))
        txt = reference.encode_text(tokenizer(PROMPTS[:2], padding="max_length", max_length=16,
                                              return_tensors="pt").input_ids)
    expected = torch.nn.functional.cosine_similarity(img, txt)  # HPS: cosine, no logit scale
    torch.testing.assert_close(reward(images, PROMPTS[:2]), expected, atol=1e-5, rtol=1e-4)


# -- loading: safe, offline-friendly --------------------------------------------------------------
class NotATensor:
    pass


def test_safe_loading(tmp_path):
    from safetensors.torch import save_file

    head = AestheticHead(16).state_dict()
    save_file(head, tmp_path / "head.safetensors")
    torch.save(head, tmp_path / "head.pth")
    torch.save({"state_dict": head, "optimizer": NotATensor()}, tmp_path / "pickled.pth")
    for name in ("head.safetensors", "head.pth"):
        loaded = load_state_dict(tmp_path / name)
        assert loaded.keys() == head.keys() and all(torch.equal(loaded[k], head[k]) for k in head)
    with pytest.raises(AlignError, match=r"refusing to load .*pickled.pth.*allow_pickle=True"):
        load_state_dict(tmp_path / "pickled.pth")
    assert load_state_dict(tmp_path / "pickled.pth", allow_pickle=True).keys() == head.keys()
    vision, _ = tiny_clip(vision_only=True)
    reward = Aesthetic(vision, head=str(tmp_path / "head.safetensors"))
    assert torch.equal(reward.head.layers[0].weight, head["layers.0.weight"])


def test_offline_errors_name_what_is_missing(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(AlignError, match=r"'openai/clip-vit-base-patch32'.*offline mode is on"):
        build_reward("clipscore")
    with pytest.raises(AlignError, match=r"'HPS_v2.1_compressed.pt'.*'xswu/HPSv2'.*offline"):
        build_reward("hpsv2.1")
    with pytest.raises(AlignError, match="does not exist"):
        resolve_file("./no/such/file.pt")


def _importable(module: str) -> bool:
    try:
        __import__(module)
    except Exception:
        return False
    return True


def test_optional_extras_name_the_extra():
    with pytest.raises(AlignError, match=r"pip install diffusion-align\[clip\]"):
        import_optional("no_such_module_for_diffusion_align", "clip", "the open_clip backend")
    with pytest.raises(AlignError, match=r"TorchScript/pickle archive.*allow_pickle=True"):
        ClipScore("ViT-B/32", backend="openai")
    if not _importable("open_clip"):
        with pytest.raises(AlignError, match=r"'open_clip'.*diffusion-align\[clip\]"):
            HPSv2(checkpoint=tiny_openclip_checkpoint(60), backend="open_clip")
    if not _importable("clip"):
        with pytest.raises(AlignError, match=r"'clip'.*diffusion-align\[clip\]"):
            ClipScore("ViT-B/32", backend="openai", allow_pickle=True)
    if not _importable("ImageReward"):
        with pytest.raises(AlignError, match=r"'ImageReward'.*diffusion-align\[imagereward\]"):
            build_reward("imagereward")


def test_open_clip_backend_when_installed():
    pytest.importorskip("open_clip")
    reward = ClipScore("ViT-B-32", backend="open_clip")  # random weights: no pretrained tag
    images = torch.rand(2, 3, 64, 64, requires_grad=True)
    reward(images, PROMPTS[:2]).sum().backward()
    assert images.grad.abs().sum() > 0


def test_openclip_remap_matches_real_open_clip_when_installed():
    open_clip = pytest.importorskip("open_clip")
    torch.manual_seed(0)
    reference = open_clip.create_model("ViT-B-16", pretrained=None).eval()  # exact GELU, like ViT-H-14
    model = openclip_as_transformers(reference.state_dict(), vision_heads=12, text_heads=8)
    pixels = torch.randn(1, 3, 224, 224)
    tokens = open_clip.get_tokenizer("ViT-B-16")(PROMPTS)
    with torch.no_grad():
        image = model.visual_projection(model.vision_model(pixel_values=pixels).pooler_output)
        text = model.text_projection(model.text_model(input_ids=tokens).pooler_output)
        torch.testing.assert_close(image, reference.encode_image(pixels), atol=1e-4, rtol=1e-4)
        torch.testing.assert_close(text, reference.encode_text(tokens), atol=1e-4, rtol=1e-4)


def test_openai_clip_backend_when_installed():
    pytest.importorskip("clip")
    if not os.environ.get("DIFFUSION_ALIGN_OPENAI_CLIP"):
        pytest.skip("needs the ViT-B/32 checkpoint (set DIFFUSION_ALIGN_OPENAI_CLIP to its path)")
    reward = ClipScore(os.environ["DIFFUSION_ALIGN_OPENAI_CLIP"], backend="openai", allow_pickle=True)
    assert reward(torch.rand(1, 3, 224, 224), "a cat").shape == (1,)


def test_imagereward_when_installed():
    pytest.importorskip("ImageReward")
    if not os.environ.get("DIFFUSION_ALIGN_IMAGEREWARD"):
        pytest.skip("needs the ImageReward checkpoint (set DIFFUSION_ALIGN_IMAGEREWARD to its download root)")
    reward = build_reward("imagereward", download_root=os.environ["DIFFUSION_ALIGN_IMAGEREWARD"])
    images = torch.rand(1, 3, 224, 224, requires_grad=True)
    reward(images, "a cat").sum().backward()
    assert images.grad.abs().sum() > 0
