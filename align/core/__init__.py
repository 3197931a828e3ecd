"""What every phase stands on: the sampler step (:mod:`~align.core.sampling`), model loading and the
denoiser calling convention (:mod:`~align.core.models`, :mod:`~align.core.denoisers`), LoRA
(:mod:`~align.core.lora`), configuration (:mod:`~align.core.config`), errors, images and prompt sets."""
