"""Aesthetic predictor v2.5: SigLIP preprocessing against the processor, the released head's layout, the
score against an independent computation, gradients, and loading from folders, files and URLs offline."""

import copy

import pytest
import torch
import torch.nn.functional as F
from _threads import one_thread  # noqa: F401

from align.core.errors import AlignError
from rewards import build_reward
from rewards.loading import resolve_file
from rewards.preprocess import PARITY_TOLERANCE, ImagePreprocess
from rewards.zoo.aesthetic import AESTHETIC_V25_HEAD, AestheticV25
from rewards.zoo.jpeg import to_uint8_images

SIDE = 32


def released_head_state(width: int, seed: int = 0) -> dict:
    """A head state dict in the released file's layout: scoring_head.{0,2,4,6,8}, bfloat16."""
    g = torch.Generator().manual_seed(seed)
    sizes = [width, 1024, 128, 64, 16, 1]
    state = {}
    for i, (a, b) in enumerate(zip(sizes[:-1], sizes[1:])):
        state[f"scoring_head.{2 * i}.weight"] = (torch.randn(b, a, generator=g) / a**0.5).bfloat16()
        state[f"scoring_head.{2 * i}.bias"] = torch.randn(b, generator=g).bfloat16()
    return state


def affine_head(state: dict, x: torch.Tensor) -> torch.Tensor:
    """The head computed from the raw state dict: five affine layers, no activation (dropout is off)."""
    for i in range(5):
        x = x @ state[f"scoring_head.{2 * i}.weight"].to(x.dtype).T + state[f"scoring_head.{2 * i}.bias"].to(x.dtype)
    return x.squeeze(-1)


@pytest.fixture(scope="module")
def siglip():
    from transformers import SiglipVisionConfig, SiglipVisionModel

    torch.manual_seed(0)
    config = SiglipVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                                image_size=SIDE, patch_size=8)
    return SiglipVisionModel(config).eval()


@pytest.mark.parametrize("size", [(20, 28), (64, 48), (SIDE, SIDE), (200, 90)])
def test_siglip_preprocessing_matches_the_processor(size):
    from transformers.models.siglip.image_processing_pil_siglip import SiglipImageProcessorPil

    processor = SiglipImageProcessorPil(size={"height": SIDE, "width": SIDE})
    ours = ImagePreprocess.from_processor_config(processor.to_dict())
    assert ours.resize_mode == "stretch" and ours.output_size == SIDE and ours.mean == (0.5, 0.5, 0.5)
    torch.manual_seed(0)
    images = (torch.rand(2, 3, *size) * 255).round() / 255
    reference = processor(to_uint8_images(images), return_tensors="pt").pixel_values
    assert (ours(images) - reference).abs().max().item() < (1e-5 if size == (SIDE, SIDE) else PARITY_TOLERANCE)


def test_score_is_the_released_head_on_normalised_pooled_siglip(siglip):
    state = released_head_state(32)
    reward = AestheticV25(siglip, head=state)
    assert reward.differentiable and reward.name == "aesthetic_v2.5"
    images = torch.rand(3, 3, 40, 40)
    with torch.no_grad():
        pooled = siglip(pixel_values=reward.preprocess(images)).pooler_output
        expected = affine_head(state, F.normalize(pooled, dim=-1))
    torch.testing.assert_close(reward(images), expected, rtol=1e-5, atol=1e-5)


def test_gradient_matches_finite_differences(siglip):
    reward = AestheticV25(copy.deepcopy(siglip), head=released_head_state(32)).double()
    torch.manual_seed(2)
    x = (0.3 + 0.4 * torch.rand(2, 3, 36, 36, dtype=torch.float64)).requires_grad_()
    reward(x).sum().backward()
    assert (x.grad.abs().sum((1, 2, 3)) > 0).all()
    v = torch.randn_like(x)
    h = 1e-6
    with torch.no_grad():
        numeric = (reward(x + h * v).sum() - reward(x - h * v).sum()).item() / (2 * h)
    assert (x.grad * v).sum().item() == pytest.approx(numeric, rel=1e-5)


def test_a_head_of_another_layout_is_refused(siglip):
    v2_layout = {k.replace("scoring_head.8", "scoring_head.7"): v for k, v in released_head_state(32).items()}
    with pytest.raises(AlignError, match="do not fit the predictor's layout"):
        AestheticV25(siglip, head=v2_layout)


def test_loads_from_a_folder_and_a_cached_url_offline(siglip, tmp_path, monkeypatch):
    from transformers.models.siglip.image_processing_pil_siglip import SiglipImageProcessorPil

    folder = tmp_path / "siglip"
    siglip.save_pretrained(folder)
    SiglipImageProcessorPil(size={"height": SIDE, "width": SIDE}).save_pretrained(folder)
    state = released_head_state(32)
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    with pytest.raises(AlignError, match="offline mode is on .* not in the cache"):
        resolve_file(AESTHETIC_V25_HEAD, offline=True)
    cached = tmp_path / "torch" / "hub" / "checkpoints" / "aesthetic_predictor_v2_5.pth"
    cached.parent.mkdir(parents=True)
    torch.save(state, cached)  # what torch.hub's download would have left there
    assert resolve_file(AESTHETIC_V25_HEAD, offline=True) == cached
    reward = build_reward("aesthetic_v2.5", model=str(folder), offline=True)
    images = torch.rand(2, 3, 48, 40)
    torch.testing.assert_close(reward(images), AestheticV25(siglip, head=state)(images))
