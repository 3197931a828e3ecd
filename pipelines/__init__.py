"""diffusers pipelines for inference-time control, for SD 1.x/2.x, SDXL, SD3 and FLUX.

Load them the diffusers way: ``FKSteeringPipeline.from_pretrained(model)`` or, reusing the
components of a pipeline already loaded, ``FKSteeringPipeline.from_pipe(pipe)``.  Both wrap the
toolkit's core samplers (:mod:`align.steer.fk`, :mod:`align.steer.guidance`, :mod:`align.steer.rlg`).
"""

from .base import SteeringPipelineBase
from .fk_steering import FKSteeringPipeline, FKSteeringPipelineOutput
from .rl_guidance import RLGuidancePipeline, RLGuidancePipelineOutput

__all__ = [
    "FKSteeringPipeline",
    "FKSteeringPipelineOutput",
    "RLGuidancePipeline",
    "RLGuidancePipelineOutput",
    "SteeringPipelineBase",
]
