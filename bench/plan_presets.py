"""What ``align plan`` predicts for the GPU rows: SD1.5 at 512 px and SDXL at 1024 px.

Predictions, not measurements: they are published beside the (pending) GPU measurements so that
the planner's error there can be read off once those run.  Each row also gives the largest batch
size and K that fit 24 GB and 80 GB.

Example::

    python bench/plan_presets.py --out bench/results/plan_presets.json
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from bench.common import new_payload, write_results  # noqa: E402

MIB = 2**20


def main(argv: list[str] | None = None) -> int:
    from align.train.plan import MemoryPlanner, PlanConfig

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", nargs="+", default=["sd15", "sdxl"])
    parser.add_argument("--truncation", type=int, nargs="+", default=[1, 4, 16, 50])
    parser.add_argument("--precisions", nargs="+", default=["no", "bf16"])
    parser.add_argument("--out", required=True)
    args = parser.parse_args(argv)

    payload = new_payload("plan_presets", __file__, argv, "cpu", None)
    for model in args.models:
        for precision in args.precisions:
            for lora in (True, False):
                for ckpt in (True, False):
                    config = PlanConfig(model=model, num_steps=50, truncation_steps=1, lora=lora, lora_rank=4,
                                        gradient_checkpointing=ckpt, mixed_precision=precision, guidance=True)
                    planner = MemoryPlanner(config)
                    for k in args.truncation:
                        phases = planner.phases(1, k)
                        peak = max(phases, key=phases.get)
                        row: dict[str, Any] = {
                            "model": model, "resolution": planner.height, "mixed_precision": precision,
                            "training": "lora" if lora else "full", "gradient_checkpointing": ckpt, "num_steps": 50,
                            "truncation_steps": k, "predicted_peak_mb": phases[peak] / MIB, "predicted_phase": peak,
                            "predicted_total_mb": planner.total(1, k) / MIB,
                        }
                        if k == 1:
                            for budget in (24, 80):
                                fit = planner.fit(budget)
                                row[f"max_batch_{budget}gb"] = fit.max_batch_size
                                row[f"max_k_{budget}gb"] = fit.max_truncation_steps
                        payload["rows"].append(row)
                    write_results(args.out, payload)
                    print(f"{model} {precision} {'lora' if lora else 'full'} ckpt={ckpt}: "
                          f"K=1 {payload['rows'][-len(args.truncation)]['predicted_total_mb'] / 1024:.1f} GB", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
