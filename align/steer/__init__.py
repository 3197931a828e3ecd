"""Inference-time control: Feynman-Kac steering (:mod:`~align.steer.fk`, potentials, resampling),
best-of-N and gradient guidance (:mod:`~align.steer.guidance`), RL guidance (:mod:`~align.steer.rlg`)
and plain seeded sampling (:mod:`~align.steer.generate`), all on the one sampling loop
:func:`align.core.chain.run_chain`, with the particles' shared pieces in :mod:`~align.steer.particles`."""
