"""The reward server under load: throughput and latency with and without dynamic batching.

One server (``rewards.server``, uvicorn on a thread of this process) serves a reward; ``--clients``
client processes (spawned, as training workers would be) each send ``--requests`` requests of
``--images`` images one after the other, all starting together.  Every answer is checked against
the in-process reward on the same images, and every request is accounted for (lost: no answer;
duplicated: images scored beyond those sent, from the server's counter).  Rows:

* ``brightness``: a reward with negligible compute, so the figures are the server's own overhead
  (HTTP, safetensors, batching);
* ``clipscore (tiny)``: the toy CLIP of ``rewards.testing`` (two layers, 32 px), a model whose cost
  grows slower than linearly with the batch, where batching pays;

each with batching off (``max_batch_size=1``) and on (``max_batch_size=32``, ``max_delay_ms=10``),
the two alternating, ``--repeats`` times (on a shared machine one run's figures are noise; the
report gives medians and the range).

Example::

    python bench/reward_server.py --out bench/results/reward_server_cpu.json
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from bench.common import load_average, new_payload, write_results  # noqa: E402


def build(name: str):
    from rewards import build_reward
    from rewards.testing import tiny_rewards

    return tiny_rewards(0)["clipscore"] if name == "clipscore (tiny)" else build_reward(name)


def run_row(name: str, max_batch_size: int, args) -> dict:
    from rewards.server import ServeConfig, ServerThread, create_app, load_test

    reward = build(name)
    config = ServeConfig(rewards=["served"], max_batch_size=max_batch_size, max_delay_ms=args.delay_ms,
                         device="cpu", token_env="")
    load_before = load_average()[0]
    with ServerThread(create_app({"served": reward}, config)) as server:
        result = load_test(server.url, "served", clients=args.clients, requests=args.requests,
                           images_per_request=args.images, size=args.size, reference=reward,
                           tolerance=args.tolerance, processes=True, start_delay=args.start_delay)
    return {"reward": name, "max_batch_size": max_batch_size, "max_delay_ms": args.delay_ms, "size": args.size,
            "load_before": load_before, **result.summary()}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "reward_server_cpu.json")
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--requests", type=int, default=20)
    parser.add_argument("--images", type=int, default=4, help="images per request")
    parser.add_argument("--size", type=int, default=32, help="image side in pixels")
    parser.add_argument("--delay-ms", type=float, default=10.0, help="batching window when batching is on")
    parser.add_argument("--tolerance", type=float, default=1e-5,
                        help="largest |remote - in-process| accepted (model kernels may sum in another order by batch)")
    parser.add_argument("--start-delay", type=float, default=15.0, help="seconds for the client processes to start")
    parser.add_argument("--rewards", nargs="+", default=["brightness", "clipscore (tiny)"])
    parser.add_argument("--repeats", type=int, default=3, help="runs of each configuration, alternating")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    payload = new_payload("reward_server", __file__, argv, "cpu", 1)
    payload["settings"] = {k: getattr(args, k) for k in ("clients", "requests", "images", "size", "delay_ms", "tolerance",
                                                         "repeats")}
    for name in args.rewards:
        for repeat in range(args.repeats):
            for max_batch_size in (1, 32):
                row = {"repeat": repeat, **run_row(name, max_batch_size, args)}
                payload["rows"].append(row)
            print(f"{name:18s} batch<={max_batch_size:3d}: {row['images_per_second']:8.1f} images/s, "
                  f"p50 {row['latency_p50_ms']:7.1f} ms, p99 {row['latency_p99_ms']:7.1f} ms, "
                  f"{row['mean_batch_images']:5.1f} images/batch, lost {row['lost']}, duplicated {row['duplicated']}, "
                  f"mismatched {row['mismatched']}", flush=True)
    write_results(args.out, payload)
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
