"""How fast each FK potential approaches the reward-tilted target as the particles grow.

On the analytic 1-D Gaussian mixture of :mod:`align.builtin.toy` (the data law p with its exact
denoiser) and the linear reward r(x) = x (``--reward quadratic``: r(x) = -(x - c)^2 / 2), the tilted
target p(x) exp(lambda r(x)) / Z is again a mixture, so its mean and variance are known in closed
form.  For the linear reward the intermediate reward of the decoded x0-prediction,
r(E[x0 | x_t]) = E[r(x0) | x_t], is the exact look-ahead; for the quadratic one it is not.  For every tilt lambda, potential and
number k of particles per prompt, :func:`align.steer.fk.fk_sample` runs G independent prompt groups
(G * k = ``--total-particles``), and the figures describe the law of what FK returns for one prompt,
one of its k final particles picked by its weight (:func:`align.builtin.toy.weighted_law_moments`):

* ``bias``: that law's mean minus the target's mean;
* ``variance_ratio``: that law's variance over the target's;
* ``ess_fraction``: the effective sample size 1 / sum w^2 of the final weights over k, averaged
  over the groups (1: equal weights; 1/k: one particle carries everything).

Each configuration runs with ``--seeds`` seeds; a row holds every seed's figures and their mean
and standard deviation.  FK is exact only as k -> infinity, and then only for the sampler's own
law, which time discretisation moves away from p: the ``limit`` row of each lambda is that
k -> infinity value: the plain sampler's draws (lambda = 0, ``--limit-particles`` per seed,
pooled) tilted by exact importance weights exp(lambda r(x)), with the standard error of its bias.

The sampler is DDIM with eta = 1 (the FK paper's), potentials at 20%, 40%, 60% and 80% of the
steps (the paper's [20, 80] every 20 of 100, scaled to ``--steps``), systematic resampling at
every potential step.  One torch thread; about three minutes of one CPU core with the defaults.

Examples::

    python bench/fk_potentials.py --out bench/results/fk_potentials.json
    python bench/fk_potentials.py --reward quadratic --lambdas 4 --out bench/results/fk_potentials_quadratic.json
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from bench.common import new_payload, write_results  # noqa: E402

#: the data law: 70% N(-1, 0.5^2) + 30% N(1.5, 0.4^2) (the analytic tests' mixture)
MIXTURE = {"weights": [0.7, 0.3], "means": [[-1.0], [1.5]], "stds": [0.5, 0.4]}
LAMBDAS = [1.0, 2.0, 4.0]
PARTICLES = [16, 64, 256, 1024, 4096]


def fk_config(potential: str, lam: float, k: int, seed: int, steps: int):
    """FK with the paper's schedule scaled to ``steps``: potentials at 20%, 40%, 60%, 80% of the chain."""
    from align.steer.fk import FKConfig

    interval = steps // 5
    return FKConfig(
        num_particles=k, lambda_=lam, potential=potential, resampler="systematic", resample_start=interval,
        resample_end=4 * interval, resample_interval=interval, seed=seed,
    )


def law_figures(samples: Tensor, log_weights: Tensor, reward, lam: float) -> dict[str, float]:
    """Bias, variance ratio and ESS / k of 'one particle per group, picked by weight' against the exact tilt.

    ``samples`` [G, k] (1-D), ``log_weights`` [G, k] normalised per group.
    """
    from align.builtin.toy import weighted_law_moments
    from align.steer.resampling import effective_sample_size

    target = reward.tilt(_mixture(), lam)
    mean, variance = weighted_law_moments(samples, log_weights)
    return {
        "bias": mean - float(target.mean()[0]),
        "variance_ratio": variance / float(target.variance()[0]),
        "ess_fraction": float(effective_sample_size(log_weights).mean()) / samples.shape[1],
    }


def _mixture():
    from align.builtin.toy import GaussianMixture

    return GaussianMixture.create(**MIXTURE)


def make_reward(name: str, center: float):
    """The linear reward r(x) = x, or the quadratic r(x) = -(x - center)^2 / 2."""
    from align.builtin.toy import LinearReward, QuadraticReward

    return LinearReward([1.0]) if name == "linear" else QuadraticReward([center])


def run_fk(reward, potential: str, lam: float, k: int, groups: int, seed: int, steps: int):
    """One FK run of ``groups`` prompt groups of ``k`` particles: (samples [G, k], log-weights [G, k], seconds)."""
    from align.builtin.toy import MixtureDenoiser, toy_scheduler
    from align.core.sampling import SamplingSchedule
    from align.steer.fk import fk_sample

    scheduler = toy_scheduler("ddim")
    schedule = SamplingSchedule.from_scheduler(scheduler, steps, eta=1.0)
    began = time.perf_counter()
    result = fk_sample(MixtureDenoiser(_mixture(), scheduler), schedule, reward, fk_config(potential, lam, k, seed, steps),
                       sample_shape=(1,), num_prompts=groups, dtype=torch.float64)
    return result.samples.view(groups, k), result.log_weights, time.perf_counter() - began


def summarise(runs: list[dict[str, float]]) -> dict[str, Any]:
    """Mean and standard deviation over seeds of every figure, beside the per-seed values."""
    out: dict[str, Any] = {}
    for key in runs[0]:
        values = [r[key] for r in runs]
        out[key] = {"mean": statistics.fmean(values), "std": statistics.stdev(values) if len(values) > 1 else 0.0,
                    "seeds": values}
    return out


def main(argv: list[str] | None = None) -> int:
    from align.steer.potentials import POTENTIALS

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--potentials", nargs="+", default=sorted(POTENTIALS), choices=sorted(POTENTIALS))
    parser.add_argument("--reward", default="linear", choices=("linear", "quadratic"))
    parser.add_argument("--center", type=float, default=0.0, help="c of the quadratic reward")
    parser.add_argument("--lambdas", type=float, nargs="+", default=LAMBDAS, help="tilt strengths lambda")
    parser.add_argument("--particles", type=int, nargs="+", default=PARTICLES, help="particles per prompt k")
    parser.add_argument("--total-particles", type=int, default=16384, help="G * k per run (G prompt groups)")
    parser.add_argument("--limit-particles", type=int, default=65536, help="plain-sampler draws per seed for the limit rows")
    parser.add_argument("--seeds", type=int, default=4)
    parser.add_argument("--steps", type=int, default=500, help="DDIM (eta = 1) sampler steps")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", required=True)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)

    payload = new_payload("fk_potentials", __file__, argv, "cpu", args.threads)
    payload["setup"] = {
        "mixture": MIXTURE, "reward": "r(x) = x" if args.reward == "linear" else f"r(x) = -(x - {args.center:g})^2 / 2",
        "sampler": "ddim eta=1", "steps": args.steps,
        "potential_steps": fk_config("max", 1.0, 1, 0, args.steps).potential_steps(args.steps),
        "resampler": "systematic", "total_particles": args.total_particles, "limit_particles": args.limit_particles,
        "seeds": args.seeds,
    }
    seeds = range(args.seeds)
    reward = make_reward(args.reward, args.center)
    began = time.perf_counter()
    # the sampler's own law tilted by exact weights: FK's k -> infinity limit, with its standard error
    base = torch.cat([run_fk(reward, "max", 0.0, args.limit_particles, 1, seed, args.steps)[0] for seed in seeds], 1)
    for lam in args.lambdas:
        log_w = torch.log_softmax(lam * reward(base.view(-1, 1)).view(1, -1), -1)
        figures = law_figures(base, log_w, reward, lam)
        ess = figures["ess_fraction"] * base.numel()
        target_variance = float(reward.tilt(_mixture(), lam).variance()[0])
        payload["rows"].append({"kind": "limit", "lambda": lam, "particles": base.numel(), **figures,
                                "bias_standard_error": (figures["variance_ratio"] * target_variance / ess) ** 0.5})
    for lam in args.lambdas:
        for potential in args.potentials:
            for k in args.particles:
                groups = max(1, args.total_particles // k)
                runs = []
                for seed in seeds:
                    samples, log_w, seconds = run_fk(reward, potential, lam, k, groups, seed, args.steps)
                    runs.append({**law_figures(samples, log_w, reward, lam), "seconds": seconds})
                row = {"kind": "fk", "lambda": lam, "potential": potential, "particles": k, "groups": groups,
                       **summarise(runs)}
                payload["rows"].append(row)
                write_results(args.out, payload)
                print(f"lambda {lam:g} {potential:10s} k {k:5d}: bias {row['bias']['mean']:+.4f} "
                      f"+- {row['bias']['std']:.4f}, variance ratio {row['variance_ratio']['mean']:.3f}, "
                      f"ESS/k {row['ess_fraction']['mean']:.3f}", flush=True)
    payload["seconds"] = time.perf_counter() - began
    write_results(args.out, payload)
    return 0


if __name__ == "__main__":
    sys.exit(main())
