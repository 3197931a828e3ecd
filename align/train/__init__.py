"""Fine-tuning: the training loop (:mod:`~align.train.trainer`), its checkpoints, the per-method
losses (:mod:`~align.train.methods`), reward backpropagation through the sampling chain
(:mod:`~align.train.backprop`, :mod:`~align.train.truncation`) and the memory planner
(:mod:`~align.train.plan`)."""
