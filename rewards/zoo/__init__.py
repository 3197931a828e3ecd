"""Built-in rewards. Importing this package registers them (nothing is downloaded here).

stats: brightness, darkness, saturation, colorfulness, target_color (differentiable, no weights);
jpeg: jpeg_compressibility, jpeg_incompressibility (black-box);
clip: clipscore, pickscore; aesthetic: aesthetic; hps: hpsv2, hpsv2.1; imagereward: imagereward;
vlm: vlm_judge (black-box, an OpenAI-compatible endpoint).
"""

from . import aesthetic, clip, hps, imagereward, jpeg, stats, vlm  # noqa: F401
