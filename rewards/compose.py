"""Composite rewards: weighted sums (each component reported separately)."""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import Tensor, nn

from .base import Reward


class WeightedSum(Reward):
    """sum_i w_i r_i; each component's score is returned in ``info`` under its name."""

    name = "weighted_sum"

    def __init__(self, components: Mapping[str, tuple[Reward, float]], **kwargs):
        super().__init__(**kwargs)
        self.components = nn.ModuleDict({k: r for k, (r, _) in components.items()})
        self.weights = {k: float(w) for k, (_, w) in components.items()}
        self.differentiable = all(r.differentiable for r, w in components.values() if w != 0.0)
        self.name = "+".join(f"{w:g}*{k}" for k, w in self.weights.items())

    def _score(self, images: Tensor, prompts: list[str]):
        total = torch.zeros(images.shape[0], device=images.device)
        info = {}
        for key, reward in self.components.items():
            out = reward.score(images, prompts)
            info[key] = out.scores.detach()
            for sub, value in out.info.items():
                info[f"{key}/{sub}"] = value
            scores = torch.where(out.valid, out.scores, torch.full_like(out.scores, float("nan")))
            total = total + self.weights[key] * scores
        return total, info
