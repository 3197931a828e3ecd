"""Built-in rewards. Importing this package registers them (nothing is downloaded here).

stats: brightness, darkness, saturation, colorfulness, target_color (differentiable, no weights);
jpeg: jpeg_compressibility, jpeg_incompressibility (black-box);
clip: clipscore, pickscore; aesthetic: aesthetic (v2, CLIP), aesthetic_v2.5 (SigLIP); hps: hpsv2, hpsv2.1;
hpsv3: hpsv3 (Qwen2-VL); vqascore: vqascore (Qwen2-VL / Qwen2.5-VL); imagereward: imagereward;
vlm: vlm_judge (black-box, an OpenAI-compatible endpoint; rubric or yes/no log-probability mode);
ocr: ocr (black-box, GOT-OCR 2.0); geneval: geneval (black-box, OWLv2 + CLIP colours).
"""

from . import aesthetic, clip, geneval, hps, hpsv3, imagereward, jpeg, ocr, stats, vlm, vqascore  # noqa: F401
