"""Composite rewards: weighted sums, ensembles, running normalisation, TextNorm calibration.

Each composite reports its components' scores in ``RewardOutput.info`` under their names (and
their own info as ``"<name>/<key>"``), so training and evaluation log every component.  A
sample dropped by a component (``on_invalid="drop"``) is invalid in the composite.

* :class:`WeightedSum`: ``sum_i w_i r_i``.
* :class:`Ensemble`: members combined per sample by ``"mean"``, ``"worst_case"`` (minimum) or
  ``"uncertainty"`` (mean - lambda * variance across members; Coste et al. 2024).  Members on
  different scales should be normalised first (:class:`RunningNorm`).
* :class:`RunningNorm`: ``(r - mean) / std`` with running (Welford / Chan) statistics, updated in
  train mode (``reward.train()``) and frozen in eval mode (``reward.eval()``); the statistics
  are buffers, so they are saved and restored with ``state_dict``.
* :class:`TextNorm`: softmax of a text-image reward over the prompt and contrastive prompts
  (Kim et al. 2024, "Confidence-aware reward optimization"): the probability that the image
  matches its own prompt rather than near-miss alternatives.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping, Sequence

import torch
from torch import Tensor, nn

from align.core.errors import AlignError, check_choice, check_range

from .base import Reward, RewardOutput, widen
from .registry import build_reward, register_reward

OBJECTIVES = ("mean", "worst_case", "uncertainty")


def _component_outputs(components: nn.ModuleDict, images: Tensor, prompts: list[str]):
    """Score every component; the samples valid in all of them; info with each component's scores."""
    outputs = {key: reward.score(images, prompts) for key, reward in components.items()}
    valid = torch.ones(images.shape[0], dtype=torch.bool, device=images.device)
    info: dict[str, Tensor] = {}
    for key, out in outputs.items():
        valid = valid & out.valid.to(valid.device)
        info[key] = out.scores.detach()
        for sub, value in out.info.items():
            info[f"{key}/{sub}"] = value
    # invalid samples hold NaN; keep them out of the arithmetic (and its gradient)
    scores = {key: torch.where(valid, out.scores, torch.zeros_like(out.scores)) for key, out in outputs.items()}
    return scores, valid, info


class WeightedSum(Reward):
    """sum_i w_i r_i; each component's score is returned in ``info`` under its name."""

    name = "weighted_sum"

    def __init__(self, components: Mapping[str, tuple[Reward, float]], **kwargs):
        super().__init__(**kwargs)
        if not components:
            raise AlignError("WeightedSum needs at least one component {name: (reward, weight)}")
        self.components = nn.ModuleDict({k: r for k, (r, _) in components.items()})
        self.weights = {k: float(w) for k, (_, w) in components.items()}
        self.differentiable = all(r.differentiable for r, w in components.values() if w != 0.0)
        self.name = "+".join(f"{w:g}*{k}" for k, w in self.weights.items())

    def _score(self, images: Tensor, prompts: list[str]) -> RewardOutput:
        scores, valid, info = _component_outputs(self.components, images, prompts)
        total = sum(self.weights[key] * s for key, s in scores.items())
        return RewardOutput(total, valid, info)


class Ensemble(Reward):
    """Members combined per sample by an objective robust to any single member being wrong.

    Attributes:
        objective: "mean", "worst_case" (min over members) or "uncertainty"
            (mean - uncertainty_weight * population variance over members).
        uncertainty_weight: lambda of the "uncertainty" objective.
    """

    name = "ensemble"

    def __init__(
        self,
        members: Mapping[str, Reward] | Sequence[Reward],
        *,
        objective: str = "mean",
        uncertainty_weight: float = 1.0,
        **kwargs,
    ):
        super().__init__(**kwargs)
        check_choice("objective", objective, OBJECTIVES)
        check_range("uncertainty_weight", uncertainty_weight, 0)
        if not isinstance(members, Mapping):
            members = _unique_names(members)
        if len(members) < 2:
            raise AlignError(f"an ensemble needs at least 2 members; got {len(members)}")
        self.members = nn.ModuleDict(dict(members))
        self.objective = objective
        self.uncertainty_weight = float(uncertainty_weight)
        self.differentiable = all(m.differentiable for m in self.members.values())
        self.name = f"{objective}({','.join(self.members)})"

    def _score(self, images: Tensor, prompts: list[str]) -> RewardOutput:
        scores, valid, info = _component_outputs(self.members, images, prompts)
        stacked = torch.stack([widen(s) for s in scores.values()])  # [M, B]
        variance = stacked.var(0, correction=0)
        info["ensemble/std"] = variance.detach().sqrt()
        if self.objective == "mean":
            total = stacked.mean(0)
        elif self.objective == "worst_case":
            total = stacked.amin(0)
        else:
            total = stacked.mean(0) - self.uncertainty_weight * variance
        return RewardOutput(total, valid, info)


def _unique_names(rewards: Sequence[Reward]) -> dict[str, Reward]:
    named: dict[str, Reward] = {}
    for reward in rewards:
        key, n = reward.name, 1
        while key in named:
            n += 1
            key = f"{reward.name}#{n}"
        named[key] = reward
    return named


class RunningNorm(Reward):
    """``(r - mean) / std`` with running statistics over all valid samples seen in train mode.

    Attributes:
        eps: added to the standard deviation.  Until two samples have been seen the scale is 1
            (and the mean 0 until one has).
    """

    def __init__(self, reward: Reward, *, eps: float = 1e-6, **kwargs):
        super().__init__(**kwargs)
        check_range("eps", eps, 0)
        self.reward = reward
        self.eps = float(eps)
        self.differentiable = reward.differentiable
        self.name = f"normalized({reward.name})"
        # float64: statistics over millions of samples; persistent: saved with the trainer's checkpoint
        self.register_buffer("count", torch.zeros((), dtype=torch.float64))
        self.register_buffer("mean", torch.zeros((), dtype=torch.float64))
        self.register_buffer("m2", torch.zeros((), dtype=torch.float64))

    def _follow(self, images: Tensor) -> None:
        # statistics keep float64 whatever the images' dtype
        if self.count.device != images.device:
            for name in ("count", "mean", "m2"):
                setattr(self, name, getattr(self, name).to(images.device))

    @torch.no_grad()
    def update(self, scores: Tensor) -> None:
        """Merge a batch of scores into the statistics (Chan et al.'s parallel Welford update)."""
        batch = scores.detach().double().flatten()
        n_b = batch.numel()
        if n_b == 0:
            return
        mean_b = batch.mean()
        m2_b = ((batch - mean_b) ** 2).sum()
        n_a = self.count.clone()
        n = n_a + n_b
        delta = mean_b - self.mean
        self.mean += delta * n_b / n
        self.m2 += m2_b + delta**2 * n_a * n_b / n
        self.count.copy_(n)

    @property
    def std(self) -> Tensor:
        if self.count < 2:
            return torch.ones((), dtype=torch.float64, device=self.count.device)
        return (self.m2 / self.count).sqrt()

    def _score(self, images: Tensor, prompts: list[str]) -> RewardOutput:
        out = self.reward.score(images, prompts)
        if self.training:
            self.update(out.scores[out.valid])
        raw = torch.where(out.valid, out.scores, torch.zeros_like(out.scores))
        mean, scale = self.mean.to(raw), (self.std + self.eps).to(raw)
        info = {"raw": out.scores.detach(), **out.info}
        return RewardOutput((raw - mean) / scale, out.valid, info)


_STOPWORDS = frozenset(
    "a an the of on in at to with and or for from by is are was be its it this that as into onto".split()
)


def word_drop_contrastives(prompt: str, limit: int) -> list[str]:
    """Near-miss prompts: ``prompt`` with one content word removed at a time (up to ``limit``)."""
    words = prompt.split()
    out: list[str] = []
    for i, word in enumerate(words):
        if re.sub(r"\W", "", word).lower() in _STOPWORDS or len(words) < 2:
            continue
        variant = " ".join(words[:i] + words[i + 1 :])
        if variant not in out and variant != prompt:
            out.append(variant)
        if len(out) >= limit:
            break
    return out


Contrastive = str | Sequence[str] | Mapping[str, Sequence[str]] | Callable[[str], Sequence[str]]


class TextNorm(Reward):
    """Calibrated text-image reward: ``softmax_k(r(x, y_k) / temperature)`` at the image's own prompt.

    The candidates are the prompt and its contrastive prompts; the score lies in (0, 1].

    Attributes:
        contrastive: how to get contrastive prompts: "auto" (the other prompts of the batch,
            then the prompt with one content word removed at a time), a fixed list of prompts,
            a mapping prompt -> prompts, or a callable prompt -> prompts.
        num_contrastive: at most this many contrastive prompts per sample ("auto" only).
        temperature: softmax temperature (in the reward's units).
    """

    def __init__(
        self,
        reward: Reward,
        *,
        contrastive: Contrastive = "auto",
        num_contrastive: int = 8,
        temperature: float = 1.0,
        **kwargs,
    ):
        super().__init__(**kwargs)
        check_range("temperature", temperature, 0, low_inclusive=False)
        check_range("num_contrastive", num_contrastive, 1, integer=True)
        if isinstance(contrastive, str) and contrastive != "auto":
            raise AlignError(
                f"contrastive={contrastive!r} is not supported; accepted: 'auto', a list of prompts, "
                "a mapping prompt -> prompts, or a callable"
            )
        self.reward = reward
        self.contrastive = contrastive
        self.num_contrastive = num_contrastive
        self.temperature = float(temperature)
        self.differentiable = reward.differentiable
        self.name = f"textnorm({reward.name})"

    def candidates(self, prompt: str, batch_prompts: Sequence[str]) -> list[str]:
        """The prompt followed by its contrastive prompts (distinct, without the prompt itself)."""
        c = self.contrastive
        if c == "auto":
            others = [p for p in dict.fromkeys(batch_prompts) if p != prompt]
            extra = others[: self.num_contrastive]
            extra += [p for p in word_drop_contrastives(prompt, self.num_contrastive) if p not in extra]
            found = extra[: self.num_contrastive]
        elif callable(c):
            found = list(c(prompt))
        elif isinstance(c, Mapping):
            if prompt not in c:
                raise AlignError(f"reward {self.name!r}: no contrastive prompts given for prompt {prompt!r}")
            found = list(c[prompt])
        else:
            found = list(c)
        found = [p for p in dict.fromkeys(found) if p != prompt]
        if not found:
            raise AlignError(
                f"reward {self.name!r}: no contrastive prompt for {prompt!r}; pass contrastive= prompts "
                "(a single-word prompt in a batch of identical prompts has none by default)"
            )
        return [prompt, *found]

    def _score(self, images: Tensor, prompts: list[str]):
        sets = [self.candidates(p, prompts) for p in prompts]
        scores = self.reward.score_candidates(images, sets)
        calibrated = torch.stack([torch.softmax(widen(s) / self.temperature, 0)[0] for s in scores])
        raw = torch.stack([s[0].detach() for s in scores])
        return calibrated, {"raw": raw}


# -- registered factories: build_reward("ensemble", ...), build_reward("textnorm", ...) ---------------
RewardSpec = str | Mapping | Reward


def _build_one(spec: RewardSpec) -> Reward:
    """A single reward from a name, a one-entry mapping {name: kwargs}, or a Reward."""
    if isinstance(spec, Mapping):
        if len(spec) != 1:
            raise AlignError(f"reward spec {dict(spec)!r} must name one reward: {{name: {{arguments}}}}")
        (name, kwargs), = spec.items()
        return build_reward(name, **dict(kwargs or {}))
    return build_reward(spec)


@register_reward("ensemble")
def ensemble(
    members: Sequence[RewardSpec] | Mapping[str, Mapping],
    *,
    objective: str = "mean",
    uncertainty_weight: float = 1.0,
    normalize: bool = False,
    **kwargs,
) -> Ensemble:
    """``build_reward("ensemble", members=["pickscore", "hpsv2"], objective="worst_case", normalize=True)``.

    ``members``: names / ``{name: kwargs}`` specs, or one mapping name -> kwargs.  ``normalize``
    wraps each member in :class:`RunningNorm` so that their scales agree.
    """
    if isinstance(members, Mapping):
        built = {name: build_reward(name, **dict(kw or {})) for name, kw in members.items()}
    else:
        built = _unique_names([_build_one(m) for m in members])
    if normalize:
        built = {name: RunningNorm(r) for name, r in built.items()}
    return Ensemble(built, objective=objective, uncertainty_weight=uncertainty_weight, **kwargs)


@register_reward("textnorm")
def textnorm(reward: RewardSpec = "clipscore", **kwargs) -> TextNorm:
    """``build_reward("textnorm", reward="pickscore", temperature=1.0, contrastive=[...])``."""
    return TextNorm(_build_one(reward), **kwargs)
