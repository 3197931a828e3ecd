"""Composition: weighted sums, ensembles, running normalisation, TextNorm; analytic answers."""

import numpy as np
import pytest
import torch

from align.core.errors import AlignError, ConfigError
from rewards import Ensemble, Reward, RunningNorm, TextNorm, WeightedSum, build_reward
from rewards.compose import word_drop_contrastives
from rewards.testing import tiny_rewards


def grey(levels) -> torch.Tensor:
    """One uniform grey image per level: brightness == level exactly."""
    return torch.tensor(levels, dtype=torch.float32).view(-1, 1, 1, 1).expand(-1, 3, 4, 4).clone()


class WordsTimesBrightness(Reward):
    """A text-image reward with a known answer: brightness * number of words in the prompt."""

    name = "words_x_brightness"

    def _score(self, images, prompts):
        words = torch.tensor([len(p.split()) for p in prompts], dtype=images.dtype)
        return images.mean((1, 2, 3)) * words


def test_weighted_sum_from_spec_logs_components():
    images = grey([0.2, 0.9]).requires_grad_()
    reward = build_reward({"brightness": 2.0, "darkness": {"weight": -1.0}})
    out = reward.score(images)
    torch.testing.assert_close(out.scores, torch.tensor([2 * 0.2 - 0.8, 2 * 0.9 - 0.1]))
    torch.testing.assert_close(out.info["brightness"], torch.tensor([0.2, 0.9]))
    torch.testing.assert_close(out.info["darkness"], torch.tensor([0.8, 0.1]))
    out.scores.sum().backward()  # d/dx (2 b - (1 - b)) = 3 d b/dx
    assert torch.allclose(images.grad.sum((1, 2, 3)), torch.tensor([3.0, 3.0]))


def test_spec_labels_and_bad_specs():
    reward = build_reward({"red": {"reward": "target_color", "color": [1, 0, 0]},
                           "blue": {"reward": "target_color", "color": [0, 0, 1], "weight": 0.5}})
    out = reward.score(grey([0.0]))
    assert out.info["red"].item() == pytest.approx(-1 / 3) and out.scores.item() == pytest.approx(-0.5)
    with pytest.raises(AlignError, match="weight='x' must be a number"):
        build_reward({"brightness": {"weight": "x"}})
    with pytest.raises(AlignError, match="must be a weight"):
        build_reward({"brightness": "heavy"})
    with pytest.raises(AlignError, match="empty"):
        build_reward({})


@pytest.mark.parametrize(
    "objective, expected",
    [
        ("mean", lambda b: 0.5 * torch.ones_like(b)),
        ("worst_case", lambda b: torch.minimum(b, 1 - b)),
        ("uncertainty", lambda b: 0.5 - 2.0 * (b - 0.5) ** 2),  # population variance of {b, 1 - b}
    ],
)
def test_ensemble_objectives(objective, expected):
    b = torch.tensor([0.1, 0.5, 0.8])
    reward = build_reward("ensemble", members=["brightness", "darkness"], objective=objective, uncertainty_weight=2.0)
    out = reward.score(grey(b.tolist()))
    torch.testing.assert_close(out.scores, expected(b))
    torch.testing.assert_close(out.info["ensemble/std"], (b - 0.5).abs())
    assert set(out.info) >= {"brightness", "darkness"}


def test_ensemble_worst_case_gradient_follows_the_worst_member():
    images = grey([0.2, 0.9]).requires_grad_()
    Ensemble([build_reward("brightness"), build_reward("darkness")], objective="worst_case")(images).sum().backward()
    # image 0: brightness (0.2) is the worst, d/dx = +1/48 per pixel; image 1: darkness, -1/48
    signs = images.grad.sum((1, 2, 3))
    torch.testing.assert_close(signs, torch.tensor([1.0, -1.0]))


def test_ensemble_validates():
    with pytest.raises(ConfigError, match="objective='median'"):
        Ensemble([build_reward("brightness"), build_reward("darkness")], objective="median")
    with pytest.raises(AlignError, match="at least 2 members"):
        Ensemble([build_reward("brightness")])


def test_running_norm_matches_population_statistics_and_freezes_in_eval():
    norm = RunningNorm(build_reward("brightness"))
    batches = [[0.1, 0.4, 0.5], [0.9], [0.3, 0.35, 0.8, 0.2]]
    seen = []
    for levels in batches:
        out = norm.score(grey(levels))
        seen += levels
        mean, std = np.mean(seen), np.std(seen)
        torch.testing.assert_close(out.scores, ((torch.tensor(levels) - mean) / (std + 1e-6)).float())
        torch.testing.assert_close(out.info["raw"], torch.tensor(levels))
    assert norm.count.item() == len(seen)
    norm.eval()
    frozen = norm.score(grey([1.0])).scores
    assert norm.count.item() == len(seen)
    assert frozen.item() == pytest.approx((1.0 - np.mean(seen)) / (np.std(seen) + 1e-6), rel=1e-5)
    restored = RunningNorm(build_reward("brightness"))
    restored.load_state_dict(norm.state_dict())
    restored.eval()
    torch.testing.assert_close(restored.score(grey([1.0])).scores, frozen)


def test_running_norm_skips_dropped_samples_and_keeps_float64_statistics():
    class Holes(Reward):
        name = "holes"

        def _score(self, images, prompts):
            scores = images.mean((1, 2, 3)).clone()
            scores[0] = float("nan")
            return scores

    norm = RunningNorm(Holes(on_invalid="drop"))
    out = norm.score(grey([0.0, 0.2, 0.6]).double())
    assert out.valid.tolist() == [False, True, True] and norm.count.item() == 2
    assert norm.mean.dtype == torch.float64 and norm.mean.item() == pytest.approx(0.4)
    norm.score(grey([0.5]).half().float())
    assert norm.mean.dtype == torch.float64


def test_normalize_flag_in_spec_and_train_mode_flows_through_composites():
    reward = build_reward({"brightness": {"weight": 1.0, "normalize": True}, "saturation": 0.0})
    norm = reward.components["brightness"]
    assert isinstance(norm, RunningNorm) and isinstance(reward, WeightedSum)
    reward.score(grey([0.2, 0.4]))
    assert norm.count.item() == 2
    reward.eval()
    reward.score(grey([0.9]))
    assert norm.count.item() == 2 and not norm.training
    reward.train()
    assert norm.training


def test_word_drop_contrastives():
    assert word_drop_contrastives("a red cat on a mat", 8) == ["a cat on a mat", "a red on a mat", "a red cat on a"]
    assert word_drop_contrastives("a red cat on a mat", 1) == ["a cat on a mat"]
    assert word_drop_contrastives("cat", 8) == []


def test_textnorm_is_the_softmax_over_contrastive_prompts():
    images = grey([0.4, 0.7])
    reward = TextNorm(WordsTimesBrightness(), temperature=0.5)
    prompts = ["a red cat", "a dog"]
    assert reward.candidates("a red cat", prompts) == ["a red cat", "a dog", "a cat", "a red"]
    out = reward.score(images, prompts)
    # image 0: scores 0.4 * [3, 2, 2, 2] -> 1 / (1 + 3 exp(-0.4 / 0.5))
    # image 1: "a dog" against ["a red cat"] (batch) and ["a"] (word drop): 0.7 * [2, 3, 1]
    s1 = torch.tensor([2.0, 3.0, 1.0]) * 0.7 / 0.5
    expected = torch.tensor([1 / (1 + 3 * np.exp(-0.8)), torch.softmax(s1, 0)[0].item()], dtype=torch.float32)
    torch.testing.assert_close(out.scores, expected)
    torch.testing.assert_close(out.info["raw"], torch.tensor([0.4 * 3, 0.7 * 2]))


def test_textnorm_contrastive_sources():
    base = WordsTimesBrightness()
    fixed = TextNorm(base, contrastive=["x", "y y"])
    assert fixed.candidates("a b", ["a b"]) == ["a b", "x", "y y"]
    mapping = TextNorm(base, contrastive={"a b": ["c"]})
    assert mapping.candidates("a b", []) == ["a b", "c"]
    with pytest.raises(AlignError, match="no contrastive prompts given for prompt 'z'"):
        mapping.candidates("z", [])
    with pytest.raises(AlignError, match="no contrastive prompt for 'cat'"):
        TextNorm(base)(grey([0.5]), "cat")
    assert TextNorm(base, contrastive=lambda p: [p + " too"]).candidates("a", []) == ["a", "a too"]
    with pytest.raises(AlignError, match="contrastive='llm'"):
        TextNorm(base, contrastive="llm")


def test_textnorm_on_a_clip_reward_encodes_each_image_once_and_matches_the_generic_path():
    pickscore = tiny_rewards()["pickscore"]
    torch.manual_seed(0)
    images = torch.rand(2, 3, 32, 32, requires_grad=True)
    prompts = ["a red cat on a mat", "a blue dog"]
    sets = [["a red cat on a mat", "a blue dog", "a cat"], ["a blue dog", "a red cat on a mat"]]
    fast = pickscore.score_candidates(images, sets)
    generic = Reward.score_candidates(pickscore, images, sets)
    for f, g in zip(fast, generic):
        torch.testing.assert_close(f, g, atol=1e-5, rtol=1e-5)
    calibrated = build_reward("textnorm", reward=pickscore, temperature=2.0)
    out = calibrated.score(images, prompts)
    assert ((out.scores > 0) & (out.scores < 1)).all()
    out.scores.sum().backward()
    assert (images.grad.abs().sum((1, 2, 3)) > 0).all()
