"""Inference-time control: Feynman-Kac steering (:mod:`~align.steer.fk`, potentials, resampling),
best-of-N and gradient guidance (:mod:`~align.steer.guidance`), RL guidance (:mod:`~align.steer.rlg`)
and plain seeded sampling (:mod:`~align.steer.generate`), all on the one sampling loop of
:mod:`~align.steer.particles`."""
