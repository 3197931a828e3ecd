"""Fine-tuning: the one training loop (:mod:`~align.train.trainer`), its checkpoints, the per-method configs
(:mod:`~align.train.methods`) and the per-family objectives that turn a batch into a loss
(:mod:`~align.train.objectives`): reward backpropagation through the sampling chain (:mod:`~align.train.backprop`,
:mod:`~align.train.truncation`) and policy gradient over rollouts (:mod:`~align.train.policy_gradient`,
:mod:`~align.train.rollout`, :mod:`~align.train.stochastic_steps`); and the memory planner (:mod:`~align.train.plan`)."""
