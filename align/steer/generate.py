"""Plain (grad-free) text-to-image sampling with the toolkit's chain, seeded per image.

Each image has its own seed: its initial noise and step noise come from a generator of its own
(:func:`align.core.chain.seeded_generators`), so an image depends only on (prompt, seed,
settings), never on the batch it was drawn in; the same seeds give the same images before and
after fine-tuning, which is what before/after comparisons need.  The chain is
:func:`align.core.chain.run_chain` with a float32 state (only the model's input is cast to the
model's dtype), the same chain and noise layout as the particle samplers: best-of-N, FK steering
at lambda = 0 and RL guidance at w = 0 reproduce these images bitwise under the same seeds.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor
from tqdm.auto import tqdm

from align.core.chain import model_output, run_chain, seeded_generators
from align.core.models import DiffusionModel

__all__ = ["generate", "seeded_generators"]


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
    """Images [N, 3, H, W] in [0, 1] for ``prompts[i]`` with ``seeds[i]`` (lists of equal length).

    ``return_latents``: the final latents (float32) instead of the decoded images.
    """
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
        x_T = schedule.initial_noise(model.latent_shape(len(chunk), h, w), gens, model.device, torch.float32)

        def predict(i: int, x: Tensor, cond=pc.cond, uncond=pc.uncond) -> Tensor:
            return model_output(model.denoiser, schedule, i, x, cond, uncond, guidance_scale, model.dtype)

        x = run_chain(schedule, predict, x_T, gens)
        outputs.append(x if return_latents else model.decode(x))
    return torch.cat(outputs)
