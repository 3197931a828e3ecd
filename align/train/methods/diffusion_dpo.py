"""Diffusion-DPO (Wallace et al., "Diffusion Model Alignment Using Direct Preference Optimization").

Preference pairs (winner, loser, caption) are noised with a shared timestep and noise; the loss
-log sigmoid(-beta / 2 ((e_model(w) - e_model(l)) - (e_ref(w) - e_ref(l)))) compares the trained
model's denoising errors with the frozen reference's (the same network with its LoRA disabled)
(:mod:`align.train.dpo`).  Pairs come from an offline data set (``data``: JSONL, a folder, a
``datasets`` folder, Parquet or a hub id in Pick-a-Pic's columns; optionally encoded once into a
latent cache) or, with ``data`` unset, online from the model's own samples ranked by the run's
reward (black-box allowed) within each prompt's group (:mod:`align.train.preference_data`).

Defaults: beta per family (:data:`align.train.dpo.DPO_BETA`: 5000 for SD 1.x/2.x and SDXL as in the
original launchers; 100 for SD3 from Flow-GRPO's SD3.5-M DPO config; 2000 for FLUX, unverified),
uniform timesteps over all the training levels (``noisiest_fraction`` 1) for UNet models and
logit-normal ones for flow models, 20 % empty captions
(the original's ``proportion_empty_prompts``), horizontal flips on, centre crops, AdamW weight
decay 1e-2.  The original fine-tunes the full UNet at lr 2.048e-5 (1e-8 x effective batch 2048);
with LoRA, diffusers' DPO example uses lr 1e-5 at rank 8, the default here (Flow-GRPO's online
SD3 DPO: 3e-4).  Online defaults follow Flow-GRPO's single-node SD3 DPO run: 40 steps, CFG 4.5 (the
method's ``num_steps`` and ``guidance_scale``), a group of 24 per prompt, one prompt per rollout,
best-versus-worst pairs.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from align.core.errors import ConfigError, check_choice, check_range
from align.core.models import FLOW_FAMILIES
from align.train.dpo import TIMESTEP_WEIGHTINGS, dpo_beta
from align.train.methods.base import MethodConfig
from align.train.preference_data import ON_BAD_ROW, PAIRINGS, PreferenceColumns


@dataclass
class DiffusionDPOConfig(MethodConfig):
    """Diffusion-DPO.

    Attributes:
        num_steps: sampling steps of the online rollouts and of the evaluation grids (Flow-GRPO's DPO: 40).
        guidance_scale: classifier-free guidance of the online rollouts and the evaluation grids (4.5).
        beta: KL strength of the -beta / 2 form; None: the model family's default (``dpo_beta``).
        timestep_weighting: how the shared training timestep of a pair is drawn: "auto" (uniform for UNet
            models, logit-normal for SD3 / FLUX), "uniform" or "logit_normal".
        noisiest_fraction: train at the noisiest fraction of the training timesteps only (drawn by
            ``timestep_weighting`` among them); 1: all of them (the original).
        empty_prompt_fraction: fraction of pairs trained with an empty caption (the original's 0.2).
        data: the offline preference data set (a .jsonl file, a folder with metadata.jsonl, a folder written
            by datasets' save_to_disk, .parquet file(s) or a Hugging Face hub id); None: online pairs.
        data_split: the split of a Hugging Face data set.
        image_0_column: the column of the first image (Pick-a-Pic: jpg_0): bytes, an image or a path.
        image_1_column: the column of the second image (jpg_1).
        label_column: the preference label (label_0): 1 when the first image is preferred, 0 when the second is,
            0.5 or "tie" for a tie (ties are dropped).
        caption_column: the caption (caption).
        on_bad_row: a row with a bad label, caption or image: "error" (stop, naming the row) or "skip" (count it).
        resolution: side of the square training images; None: the model's default resolution.
        random_crop: crop at random instead of in the centre.
        hflip: flip each image horizontally with probability 1/2.
        latent_cache: a folder where the encoded data set is written once and read back every epoch
            (None: encode on the fly). The crop and flip drawn when it is built are kept.
        group_size: online: samples per prompt, ranked by the reward within the group (at least 2).
        rollout_prompts: online: prompts (groups) sampled per rollout, over all processes.
        pairing: online: "best_worst" (one pair per group), "halves" (k-th best with k-th worst) or "all".
        min_reward_margin: online: a pair is kept only when the winner's reward exceeds the loser's by more
            than this (ties never make a pair).
        kl_weight: must stay 0: beta is DPO's tie to the reference.
    """

    name: ClassVar[str] = "diffusion_dpo"
    #: the trainer objective that will run it (registered with the integration)
    objective: ClassVar[str] = "diffusion_dpo"
    needs_reward_gradient: ClassVar[bool] = False

    learning_rate: float = 1e-5
    weight_decay: float = 1e-2
    num_steps: int = 40
    guidance_scale: float = 4.5
    beta: float | None = None
    timestep_weighting: str = "auto"
    noisiest_fraction: float = 1.0
    empty_prompt_fraction: float = 0.2
    data: str | None = None
    data_split: str = "train"
    image_0_column: str = "jpg_0"
    image_1_column: str = "jpg_1"
    label_column: str = "label_0"
    caption_column: str = "caption"
    on_bad_row: str = "error"
    resolution: int | None = None
    random_crop: bool = False
    hflip: bool = True
    latent_cache: str | None = None
    group_size: int = 24
    rollout_prompts: int = 1
    pairing: str = "best_worst"
    min_reward_margin: float = 0.0

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.kl_weight != 0:
            raise ConfigError(
                f"{self.name}.kl_weight={self.kl_weight!r} does not apply: beta is DPO's tie to the reference; accepted: 0"
            )
        if self.beta is not None:
            check_range("beta", self.beta, 0.0, None, low_inclusive=False)
        check_choice("timestep_weighting", self.timestep_weighting, ("auto", *TIMESTEP_WEIGHTINGS))
        check_range("noisiest_fraction", self.noisiest_fraction, 0.0, 1.0, low_inclusive=False)
        check_range("empty_prompt_fraction", self.empty_prompt_fraction, 0.0, 1.0)
        for field in ("image_0_column", "image_1_column", "label_column", "caption_column", "data_split"):
            if not isinstance(getattr(self, field), str) or not getattr(self, field):
                raise ConfigError(f"{self.name}.{field}={getattr(self, field)!r} must be a non-empty string")
        if len(set(self.columns.required)) < 4:
            raise ConfigError(f"{self.name}: the four data columns must differ; got {self.columns.required}")
        check_choice("on_bad_row", self.on_bad_row, ON_BAD_ROW)
        if self.resolution is not None:
            check_range("resolution", self.resolution, 8, None, integer=True)
        if self.latent_cache is not None and self.data is None:
            raise ConfigError(
                f"{self.name}.latent_cache={self.latent_cache!r} needs an offline data set; accepted: set data, or "
                "latent_cache=null for online pairs"
            )
        check_range("group_size", self.group_size, 2, None, integer=True)
        check_range("rollout_prompts", self.rollout_prompts, 1, None, integer=True)
        check_choice("pairing", self.pairing, PAIRINGS)
        check_range("min_reward_margin", self.min_reward_margin, 0.0, None)

    @property
    def online(self) -> bool:
        """Pairs from the model's own samples (no offline data set): the run needs a reward."""
        return self.data is None

    @property
    def columns(self) -> PreferenceColumns:
        return PreferenceColumns(self.image_0_column, self.image_1_column, self.label_column, self.caption_column)

    def beta_for(self, family: str) -> float:
        """beta for a model family: the configured one, or the family's default."""
        return float(self.beta) if self.beta is not None else dpo_beta(family)

    def timestep_weighting_for(self, family: str) -> str:
        """The timestep weighting for a model family ("auto": logit-normal for flow models, else uniform)."""
        if self.timestep_weighting != "auto":
            return self.timestep_weighting
        return "logit_normal" if family in FLOW_FAMILIES else "uniform"
