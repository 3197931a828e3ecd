"""Plain (grad-free) text-to-image sampling with the toolkit's loop, seeded per image.

Each image has its own seed, so an image depends only on (prompt, seed, settings), never on
the batch it was drawn in; the same seeds give the same images before and after fine-tuning,
which is what before/after comparisons need.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor
from tqdm.auto import tqdm

from align.core.models import DiffusionModel
from align.core.sampling import guided_prediction


def seeded_generators(seeds: Sequence[int], device: str | torch.device = "cpu") -> list[torch.Generator]:
    """One torch.Generator per seed (on ``device``; CPU generators work for any model device)."""
    return [torch.Generator(device=device).manual_seed(int(s)) for s in seeds]


@torch.no_grad()
def generate(
    model: DiffusionModel,
    prompts: Sequence[str],
    seeds: Sequence[int],
    *,
    num_steps: int = 50,
    guidance_scale: float = 7.5,
    sampler: str = "auto",
    eta: float = 0.0,
    height: int | None = None,
    width: int | None = None,
    negative_prompt: str | None = None,
    batch_size: int = 8,
    return_latents: bool = False,
    progress: bool = False,
    max_sequence_length: int | None = None,
) -> Tensor:
    """Images [N, 3, H, W] in [0, 1] for ``prompts[i]`` with ``seeds[i]`` (lists of equal length)."""
    prompts, seeds = list(prompts), list(seeds)
    if len(prompts) != len(seeds):
        raise ValueError(f"got {len(prompts)} prompts and {len(seeds)} seeds; pass one seed per prompt")
    h, w = (height, width) if height and width else model.default_resolution()
    schedule = model.schedule(num_steps, sampler=sampler, eta=eta, height=h, width=w)
    outputs = []
    batches = range(0, len(prompts), batch_size)
    for start in tqdm(batches, desc="sampling", disable=not progress, leave=False):
        chunk = prompts[start : start + batch_size]
        gens = seeded_generators(seeds[start : start + batch_size])
        pc = model.encode_prompts(
            chunk, guidance=guidance_scale != 1.0, negative_prompt=negative_prompt, height=h, width=w,
            max_sequence_length=max_sequence_length,
        )
        x = schedule.initial_noise(model.latent_shape(len(chunk), h, w), gens, model.device, model.dtype)
        for i in range(schedule.num_steps):
            t = schedule.model_timestep(i, x.shape[0], x.device)
            out = guided_prediction(model.denoiser, x, t, pc.cond, pc.uncond, guidance_scale)
            x = schedule.step(i, x, out, generator=gens).prev_sample
        outputs.append(x if return_latents else model.decode(x))
    return torch.cat(outputs)
