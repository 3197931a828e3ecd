"""The reward protocol: input checks, chunking, freezing, device/dtype following, faults."""

import time

import pytest
import torch
from torch import nn

from align.core.errors import AlignError, ConfigError, RewardCrash, RewardError, RewardUnavailable
from rewards import Reward, RewardOutput, WeightedSum, build_reward, require_differentiable


class Linear(Reward):
    """score = w . mean pixel + b, with a real (freezable, dtype-following) parameter."""

    name = "linear"

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.proj = nn.Linear(3, 1)
        self.dropout = nn.Dropout(0.5)
        self.calls = 0

    def _score(self, images, prompts):
        self.calls += 1
        return self.proj(self.dropout(images.mean((2, 3)))).squeeze(-1)


class Scripted(Reward):
    """Black-box reward that fails, hangs or returns NaN as scripted, then returns the brightness."""

    name = "scripted"
    differentiable = False

    def __init__(self, failures=0, hang=0.0, nan_at=(), **kwargs):
        super().__init__(**kwargs)
        self.failures, self.hang, self.nan_at, self.calls = failures, hang, set(nan_at), 0

    def _score(self, images, prompts):
        self.calls += 1
        if self.calls <= self.failures:
            raise ConnectionError(f"server down (call {self.calls})")
        if self.hang:
            time.sleep(self.hang)
        scores = images.mean((1, 2, 3)).detach().clone()
        for i in self.nan_at:
            if i < len(scores):
                scores[i] = float("nan")
        return scores


def test_scores_shape_and_chunking_equivalence():
    torch.manual_seed(0)
    images = torch.rand(5, 3, 8, 8)
    whole = Linear()
    chunked = Linear(chunk_size=2)
    chunked.load_state_dict(whole.state_dict())
    expected = whole.proj(images.mean((2, 3))).squeeze(-1)
    out = chunked.score(images, "a prompt")
    assert isinstance(out, RewardOutput) and out.scores.shape == (5,) and out.valid.all()
    assert chunked.calls == 3  # ceil(5 / 2)
    torch.testing.assert_close(out.scores, expected.detach())
    torch.testing.assert_close(whole(images), expected.detach())


def test_frozen_by_requires_grad_not_no_grad_and_always_eval():
    reward = Linear()
    images = torch.rand(4, 3, 8, 8, requires_grad=True)
    reward.train()  # a trainer calling .train() on everything must not switch dropout on
    scores = reward(images)
    assert all(not p.requires_grad for p in reward.parameters())
    assert not reward.dropout.training and reward.training
    torch.testing.assert_close(scores, reward(images))  # no dropout noise
    scores.sum().backward()
    # the gradient reaches the pixels: d score / d pixel = w_c / (H W)
    w = reward.proj.weight.detach().view(3)
    torch.testing.assert_close(images.grad, (w / 64).view(1, 3, 1, 1).expand_as(images))


def test_follows_dtype_and_back():
    reward = Linear()
    x64 = torch.rand(2, 3, 8, 8, dtype=torch.float64)
    out = reward(x64)
    assert out.dtype == torch.float64 and reward.proj.weight.dtype == torch.float64
    assert reward(x64.float()).dtype == torch.float32 and reward.proj.weight.dtype == torch.float32


@pytest.mark.parametrize(
    "images, message",
    [
        (torch.rand(2, 4, 8, 8), "[B, 3, H, W]"),
        (torch.rand(3, 8, 8), "[B, 3, H, W]"),
        (torch.randint(0, 255, (2, 3, 8, 8)), "floating point"),
        (torch.rand(2, 3, 8, 8) * 2 - 1, "images / 2 + 0.5"),
        (torch.full((2, 3, 8, 8), float("nan")), "[0, 1]"),
    ],
)
def test_bad_images_name_the_reward(images, message):
    with pytest.raises(RewardError, match="linear") as info:
        Linear()(images)
    assert message in str(info.value)


def test_prompts_must_match_batch():
    with pytest.raises(RewardError, match="3 prompts for 2 images"):
        Linear()(torch.rand(2, 3, 8, 8), ["a", "b", "c"])


@pytest.mark.parametrize(
    "kwargs, field",
    [({"chunk_size": 0}, "chunk_size"), ({"on_invalid": "skip"}, "on_invalid"), ({"timeout": 0}, "timeout"),
     ({"retries": -1}, "retries")],
)
def test_bad_options(kwargs, field):
    with pytest.raises(ConfigError, match=field):
        Linear(**kwargs)


def test_exception_raises_naming_the_reward():
    with pytest.raises(RewardError, match=r"reward 'scripted' failed: ConnectionError: server down"):
        Scripted(failures=1)(torch.rand(2, 3, 4, 4))


def test_retries_with_backoff_then_success():
    reward = Scripted(failures=2, retries=2, retry_backoff=0.01)
    images = torch.rand(3, 3, 4, 4)
    torch.testing.assert_close(reward(images), images.mean((1, 2, 3)))
    assert reward.calls == 3


def test_retries_exhausted_error_counts_attempts():
    reward = Scripted(failures=5, retries=1, retry_backoff=0.0)
    with pytest.raises(RewardError, match=r"'scripted' failed after 2 attempts: ConnectionError"):
        reward(torch.rand(2, 3, 4, 4))


def test_timeout_raises_or_drops():
    images = torch.rand(3, 3, 4, 4)
    start = time.monotonic()
    with pytest.raises(RewardError, match=r"'scripted'.*TimeoutError.*timeout=0.05"):
        Scripted(hang=1.0, timeout=0.05)(images)
    assert time.monotonic() - start < 0.9  # did not wait for the hung call
    dropping = Scripted(hang=1.0, timeout=0.05, on_invalid="drop", chunk_size=2)
    out = dropping.score(images)
    assert not out.valid.any() and torch.isnan(out.scores).all() and dropping.dropped == 3


def test_nan_raises_naming_samples_or_drops_and_counts():
    images = torch.rand(4, 3, 4, 4)
    with pytest.raises(RewardError, match=r"'scripted' returned a non-finite score for samples \[1, 3\]"):
        Scripted(nan_at=(1, 3))(images)
    reward = Scripted(nan_at=(1,), on_invalid="drop")
    out = reward.score(images)
    assert out.valid.tolist() == [True, False, True, True] and reward.dropped == 1 and out.num_dropped == 1
    assert torch.isnan(out.scores[1])  # never a silent zero
    torch.testing.assert_close(out.scores[out.valid], images.mean((1, 2, 3))[[0, 2, 3]])
    torch.testing.assert_close(out.valid_mean(), images.mean((1, 2, 3))[[0, 2, 3]].mean())


def test_composite_keeps_component_drops_without_raising():
    images = torch.rand(3, 3, 4, 4)
    flaky = Scripted(nan_at=(0,), on_invalid="drop")
    total = WeightedSum({"flaky": (flaky, 2.0), "brightness": (build_reward("brightness"), 1.0)})
    out = total.score(images)  # the sum itself is in raise mode: the component's drop is respected
    assert out.valid.tolist() == [False, True, True] and total.dropped == 1 and flaky.dropped == 1
    bright = build_reward("brightness")(images)
    torch.testing.assert_close(out.scores[1:], 2 * images.mean((1, 2, 3))[1:] + bright[1:])
    assert set(out.info) == {"flaky", "brightness"}


def test_require_differentiable():
    require_differentiable(Linear(), "DRaFT")
    with pytest.raises(AlignError, match=r"'scripted' is not differentiable, and DRaFT"):
        require_differentiable(Scripted(), "DRaFT")
    total = WeightedSum({"a": (Linear(), 1.0), "b": (Scripted(), 0.5)})
    assert not total.differentiable
    assert WeightedSum({"a": (Linear(), 1.0), "b": (Scripted(), 0.0)}).differentiable


def test_wrong_shape_is_a_bug_even_in_drop_mode():
    class Wrong(Reward):
        name = "wrong"

        def _score(self, images, prompts):
            return images.mean((2, 3))  # [B, 3]

    with pytest.raises(RewardError, match=r"'wrong' returned shape \(2, 3\); expected \[2\]"):
        Wrong(on_invalid="drop")(torch.rand(2, 3, 4, 4))


def test_dropped_chunk_keeps_the_info_of_the_others():
    class FailsOnDark(Reward):
        name = "fails_on_dark"
        transient_errors = (ValueError,)  # declared: dropped, not a crash

        def _score(self, images, prompts):
            if images.mean() < 0.1:
                raise ValueError("too dark")
            return images.mean((1, 2, 3)), {"max": images.amax((1, 2, 3))}

    images = torch.cat([torch.full((2, 3, 4, 4), 0.5), torch.zeros(1, 3, 4, 4)])
    out = FailsOnDark(on_invalid="drop", chunk_size=2).score(images)
    assert out.valid.tolist() == [True, True, False]
    torch.testing.assert_close(out.info["max"][:2], torch.tensor([0.5, 0.5]))
    assert torch.isnan(out.info["max"][2])


# ---------------------------------------------------------------------------------------------
# faults and bugs: only declared transient faults are retried or dropped


class Raises(Reward):
    """Raises ``error`` on every call, counting the calls."""

    name = "raises"

    def __init__(self, error, **kwargs):
        super().__init__(**kwargs)
        self.error, self.calls = error, 0

    def _score(self, images, prompts):
        self.calls += 1
        raise self.error


@pytest.mark.parametrize("on_invalid", ["raise", "drop"])
@pytest.mark.parametrize(
    "error, hint",
    [(TypeError("unsupported operand type(s) for +: 'Tensor' and 'str'"), "a bug in the reward"),
     (AttributeError("'NoneType' object has no attribute 'encode'"), "a bug in the reward"),
     (torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB"), "out of memory is not a transient"),
     (MemoryError(), "out of memory is not a transient")],
    ids=["TypeError", "AttributeError", "cuda-oom", "cpu-oom"],
)
def test_an_undeclared_exception_is_a_crash_never_retried_or_dropped(error, hint, on_invalid):
    reward = Raises(error, on_invalid=on_invalid, retries=3, retry_backoff=0.0)
    with pytest.raises(RewardCrash) as info:
        reward.score(torch.rand(2, 3, 4, 4))
    message = str(info.value)
    assert message.startswith(f"reward 'raises' raised {type(error).__name__}: {error}; {hint}")
    assert info.value.__cause__ is error and info.value.__cause__.__traceback__ is not None
    assert reward.calls == 1 and reward.dropped == 0


def test_an_align_error_from_the_reward_passes_unchanged():
    error = RewardError("reward 'raises': the API key in $JUDGE_KEY was refused")
    with pytest.raises(RewardError) as info:
        Raises(error, on_invalid="drop", retries=2, retry_backoff=0.0)(torch.rand(2, 3, 4, 4))
    assert info.value is error


@pytest.mark.parametrize(
    "error",
    [RewardUnavailable("judge server is down"), TimeoutError("no reply"), ConnectionRefusedError("refused"),
     KeyError("declared")],
    ids=["unavailable", "timeout", "connection", "declared"],
)
def test_transient_faults_are_retried_then_raised_or_dropped_and_counted(error):
    class Flaky(Raises):
        transient_errors = (KeyError,)

    reward = Flaky(error, retries=2, retry_backoff=0.0)
    with pytest.raises(RewardUnavailable, match=rf"reward 'raises' failed after 3 attempts: {type(error).__name__}") as info:
        reward(torch.rand(2, 3, 4, 4))
    assert reward.calls == 3 and info.value.__cause__ is error
    dropping = Flaky(error, retries=2, retry_backoff=0.0, on_invalid="drop", chunk_size=2)
    out = dropping.score(torch.rand(3, 3, 4, 4))
    assert dropping.calls == 6 and dropping.dropped == 3 and not out.valid.any()
    assert Raises(KeyError("undeclared")).is_transient(KeyError()) is False


def test_composites_keep_a_component_crash_and_drop_its_transient_faults():
    images = torch.rand(2, 3, 4, 4)
    error = TypeError("bad")
    crash = WeightedSum({"buggy": (Raises(error), 1.0), "brightness": (build_reward("brightness"), 1.0)}, on_invalid="drop")
    with pytest.raises(RewardCrash, match=r"^reward 'raises' raised TypeError: bad") as info:
        crash.score(images)
    assert info.value.__cause__ is error  # the component's crash, not re-wrapped by the sum
    down = Raises(RewardUnavailable("judge server is down"))  # raise mode: the sum decides
    total = WeightedSum({"judge": (down, 1.0), "brightness": (build_reward("brightness"), 1.0)}, on_invalid="drop")
    out = total.score(images)
    assert not out.valid.any() and total.dropped == 2


def test_steering_stops_at_a_reward_crash_and_drops_a_transient_fault():
    from align.builtin.toy import GaussianMixture, MixtureDenoiser, toy_scheduler
    from align.core.sampling import SamplingSchedule
    from align.steer.fk import FKConfig, fk_sample

    scheduler = toy_scheduler("ddim")
    denoiser = MixtureDenoiser(GaussianMixture.create([1.0], [[0.0]], [1.0]), scheduler)
    schedule = SamplingSchedule.from_scheduler(scheduler, 10, eta=1.0)

    def steer(reward):
        config = FKConfig(num_particles=4, lambda_=1.0, resample_start=2, resample_end=8, resample_interval=2)
        return fk_sample(denoiser, schedule, reward, config, sample_shape=(1,), num_prompts=2, dtype=torch.float64,
                         decode_fn=lambda x: torch.sigmoid(x.float()).view(-1, 1, 1, 1).expand(-1, 3, 4, 4))

    error = AttributeError("'NoneType' object has no attribute 'encode'")
    with pytest.raises(RewardCrash, match=r"^reward 'raises' raised AttributeError") as info:
        steer(Raises(error, on_invalid="drop"))
    assert info.value.__cause__ is error
    flaky = Scripted(failures=1, retries=1, retry_backoff=0.0)  # the first call fails, its retry answers
    result = steer(flaky)
    assert torch.isfinite(result.rewards).all() and flaky.dropped == 0  # the retry cured the fault
