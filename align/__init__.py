"""diffusion-align: align diffusers models with reward functions.

Train time: reward backpropagation (DRaFT, DRaFT-LV, AlignProp, ReFL) into LoRA weights
(:mod:`align.trainer`, :mod:`align.backprop`, :mod:`align.truncation`, :mod:`align.methods`).
Inference time: Feynman-Kac steering, best-of-N, gradient guidance (:mod:`align.fk`,
:mod:`align.guidance`) and RL guidance (:mod:`align.rlg`).  Rewards live in the ``rewards``
package, diffusers pipelines in ``pipelines``; the command line is ``align``.
"""

import logging as _logging

__version__ = "0.1.0"


class _DropTorchvisionFallbackNotice(_logging.Filter):
    # transformers announces, at import, that its image processors fall back to PIL without
    # torchvision; this toolkit never uses them (rewards preprocess in torch), so the notice is noise.
    def filter(self, record: _logging.LogRecord) -> bool:
        return "requires torchvision (not installed)" not in record.getMessage()


_logging.getLogger("transformers.utils.import_utils").addFilter(_DropTorchvisionFallbackNotice())
