"""diffusion-align: align diffusers models with reward functions.

Train time: reward backpropagation (DRaFT, DRaFT-LV, AlignProp, ReFL) into LoRA weights
(:mod:`align.train.trainer`, :mod:`align.train.backprop`, :mod:`align.train.truncation`, :mod:`align.train.methods`).
Inference time: Feynman-Kac steering, best-of-N, gradient guidance (:mod:`align.steer.fk`,
:mod:`align.steer.guidance`) and RL guidance (:mod:`align.steer.rlg`).  Rewards live in the ``rewards``
package, diffusers pipelines in ``pipelines``; the command line is ``align``.
"""

import logging as _logging

__version__ = "0.1.0"


class _DropNotice(_logging.Filter):
    """Drop one library notice that says nothing to this toolkit's users."""

    def __init__(self, text: str):
        super().__init__()
        self.text = text

    def filter(self, record: _logging.LogRecord) -> bool:
        return self.text not in record.getMessage()


# transformers announces at import that its image processors fall back to PIL without
# torchvision; the toolkit never uses them (rewards preprocess in torch).
_logging.getLogger("transformers.utils.import_utils").addFilter(_DropNotice("requires torchvision (not installed)"))
# diffusers warns on every dtype cast of a model, even when the list of modules it names is empty.
_logging.getLogger("diffusers.models.modeling_utils").addFilter(_DropNotice("should be kept in float32: []"))
# diffusers warns, on every LoRA load, that a LoRA without text-encoder layers has none for the text encoder.
_logging.getLogger("diffusers.loaders.lora_base").addFilter(_DropNotice("No LoRA keys associated to"))
