"""What every phase stands on: the sampler step (:mod:`~align.core.sampling`), the one sampling loop
with its hooks (:mod:`~align.core.chain`), model loading and the denoiser calling convention
(:mod:`~align.core.models`, :mod:`~align.core.denoisers`), LoRA (:mod:`~align.core.lora`),
configuration (:mod:`~align.core.config`), errors, images and prompt sets."""
