"""What ships with the package to run offline: the built-in ``shapes`` model (folder ``shapes/``) and
its synthetic world (:mod:`~align.builtin.shapes_world`), the analytic Gaussian-mixture toy
(:mod:`~align.builtin.toy`) and tiny models built from config for tests (:mod:`~align.builtin.testing`)."""
