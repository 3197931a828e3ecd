"""What a training method contributes to the trainer's one loop: how a batch becomes a loss.

The trainer (:class:`align.train.trainer.Trainer`) owns everything a run shares: the accelerate
loop, optimiser and learning-rate schedule, gradient all-reduce and clipping, mixed precision,
EMA, checkpoints and exact resume, metrics, sample grids and the monitor.  An objective owns what
differs between method families:

* :meth:`Objective.micro_steps`: how many micro-steps (backward passes) one optimiser step takes;
* :meth:`Objective.loss`: the loss of one micro-step (the trainer backpropagates ``loss / n``);
* :meth:`Objective.state_dict` / :meth:`Objective.load_state_dict`: state that must survive a
  resume (a rollout buffer, running statistics), as tensors and JSON-able values;
* :meth:`Objective.weight_copies`: copies of the trained weights it keeps (DiffusionNFT's old policy),
  which the trainer checkpoints and restores like the EMA (gathered from, and split back into, shards).

One trainer step is one optimiser step whatever the objective.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from torch import Tensor

if TYPE_CHECKING:  # pragma: no cover
    from align.core.sampling import SamplingSchedule
    from align.train.trainer import Trainer


class Objective:
    """Base class: an objective that keeps no state across steps."""

    #: the method's sampling schedule (what the trainer and the benchmarks call the run's schedule)
    schedule: SamplingSchedule

    def __init__(self, trainer: Trainer):
        self.trainer = trainer

    def micro_steps(self, step: int) -> int:
        """Backward passes of optimiser step ``step`` (the trainer divides each micro-step's loss by this)."""
        return self.trainer.config.gradient_accumulation_steps

    def loss(self, step: int, micro: int) -> tuple[Tensor, dict[str, float]]:  # pragma: no cover - abstract
        """(loss, metrics) of micro-step ``micro`` of optimiser step ``step``; a non-finite loss skips the step."""
        raise NotImplementedError

    def state_dict(self) -> tuple[dict[str, Tensor], dict[str, Any]]:
        """(tensors, JSON-able values) to checkpoint; both empty for a stateless objective.

        Every process calls it (it may gather what each process holds); the main process's result is saved and
        every process loads it back."""
        return {}, {}

    def load_state_dict(self, tensors: dict[str, Tensor], state: dict[str, Any]) -> None:
        """Restore what :meth:`state_dict` returned."""

    def weight_copies(self) -> dict[str, list[Tensor]]:
        """{name: one tensor per trainable parameter, like ``trainer.params``} of the weight copies to checkpoint.

        The trainer saves them as ``objective.<name>.<parameter>`` and loads them back before
        :meth:`load_state_dict` (under FSDP the copies are sharded like the parameters)."""
        return {}
