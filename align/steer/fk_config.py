"""Configuration of Feynman-Kac steering (kept free of heavy imports for the CLI's --help)."""

from __future__ import annotations

from dataclasses import dataclass

from align.core.errors import ConfigError, check_choice, check_range

INTERMEDIATE_REWARDS = ("x0", "x0_samples", "custom")
PROPOSALS = ("base", "gradient")


def check_chunks_and_seed(config) -> None:
    """Validate the optional ``chunk_size``/``model_chunk_size`` (>= 1) and ``seed`` (>= 0) fields."""
    for name in ("chunk_size", "model_chunk_size"):
        value = getattr(config, name, None)
        if value is not None:
            check_range(name, value, 1, None, integer=True)
    if config.seed is not None:
        check_range("seed", config.seed, 0, None, integer=True)


@dataclass
class FKConfig:
    """Feynman-Kac (SMC) steering: sample p(x0) exp(lambda r(x0)) / Z with particles (exactly as k -> infinity).

    Paper defaults (Singhal et al.): 4 particles, lambda 10, potential max, resampling every 20 of
    100 DDIM (eta=1) steps in [20, 80], i.e. every 20% of the chain from 20% to 80%: the window is
    given as fractions of the chain, so it scales with num_steps (absolute steps are accepted too).  Resampling needs a stochastic sampler (DDIM eta > 0, DDPM,
    or the flow-matching SDE step, eta > 0).

    Attributes:
        num_particles: particles per prompt k (paper: 4).
        lambda_: tilt strength lambda >= 0 of the target p(x0) exp(lambda r(x0)); 0 is the base sampler.
        potential: how intermediate rewards become potentials: max (paper default), difference, sum,
            immediate.  Thanks to the final correction every choice targets the tilted law, but only
            as num_particles -> infinity; at practical k max and difference converge (difference best
            for strong tilts of a nearly linear reward, max on the quadratic toy reward) while sum's
            weights degenerate (at lambda 2 on the toy its error grows from k = 16 to 4096): do not
            use sum.  Figures in :mod:`align.steer.potentials` and BENCHMARKS.md.
        resampler: systematic (default, lowest variance), stratified, residual or multinomial (the
            public code's only choice).
        resample_start: where potentials start: a fraction of the chain (a float in [0, 1]: step
            round(fraction * num_steps)) or an absolute 0-based step (an integer).
        resample_end: the last step (inclusive) at which potentials may be applied, as a fraction or a step.
        resample_interval: apply potentials every this many steps from resample_start to resample_end, as a
            fraction of the chain (at least one step) or a number of steps.
        ess_threshold: resample a prompt's particles only when their effective sample size is below
            ess_threshold * num_particles; 1.0 resamples at every scheduled step (paper). Skipped
            steps carry the weights forward.
        final_resample: resample once more by the final weights, returning equally weighted particles
            (a plain sample of the target); off by default, which keeps every final particle and
            returns its log-weight (best-of selection should not lose particles).
        intermediate_reward: x0 (reward of the decoded x0-prediction, default), x0_samples
            (log-mean-exp of rewards of intermediate_samples draws around the x0-prediction) or custom
            (a user function passed to the sampler).
        intermediate_samples: number of x0 draws for intermediate_reward=x0_samples.
        proposal: base (the sampler itself) or gradient (each stochastic step's mean shifted along the
            reward gradient at the x0-prediction, with the importance-weight correction).
        proposal_scale: multiplier of the gradient shift of proposal=gradient (1.0: the linearised
            optimal twist).
        chunk_size: particles decoded and scored at once (bounds peak memory; None: all at once).
        model_chunk_size: particles per denoiser call (None: all particles in one batched call).
        seed: random seed of the initial noise, the sampler noise and the resampling (None: random).
        ess_warning: warn (LowESSWarning, once per call) when a prompt's final ESS / num_particles,
            before any final resampling, is below this fraction; 0 disables the warning.  ESS / k
            cannot fall below 1 / k, so the default 0.3 fires at the paper's k = 4 when one particle
            holds nearly all the weight (ESS < 1.2), and at k = 16 when ESS < 4.8.
    """

    num_particles: int = 4
    lambda_: float = 10.0
    potential: str = "max"
    resampler: str = "systematic"
    resample_start: int | float = 0.2
    resample_end: int | float = 0.8
    resample_interval: int | float = 0.2
    ess_threshold: float = 1.0
    final_resample: bool = False
    intermediate_reward: str = "x0"
    intermediate_samples: int = 4
    proposal: str = "base"
    proposal_scale: float = 1.0
    chunk_size: int | None = None
    model_chunk_size: int | None = None
    seed: int | None = 0
    ess_warning: float = 0.3

    def __post_init__(self) -> None:
        from align.steer.potentials import POTENTIALS
        from align.steer.resampling import RESAMPLERS

        check_range("num_particles", self.num_particles, 1, None, integer=True)
        check_range("lambda_", self.lambda_, 0.0, None)
        check_choice("potential", self.potential, sorted(POTENTIALS))
        check_choice("resampler", self.resampler, sorted(RESAMPLERS))
        for name in ("resample_start", "resample_end", "resample_interval"):
            _check_window_value(name, getattr(self, name))
        if isinstance(self.resample_interval, int) and self.resample_interval < 1:
            raise ConfigError(f"resample_interval={self.resample_interval!r} steps must be at least 1")
        if type(self.resample_start) is type(self.resample_end) and self.resample_end < self.resample_start:
            raise ConfigError(
                f"resample_end={self.resample_end!r} is before resample_start={self.resample_start!r}; "
                "accepted: resample_end >= resample_start"
            )
        check_range("ess_threshold", self.ess_threshold, 0.0, 1.0)
        check_choice("intermediate_reward", self.intermediate_reward, INTERMEDIATE_REWARDS)
        check_range("intermediate_samples", self.intermediate_samples, 1, None, integer=True)
        check_choice("proposal", self.proposal, PROPOSALS)
        check_range("proposal_scale", self.proposal_scale, 0.0, None)
        check_chunks_and_seed(self)
        check_range("ess_warning", self.ess_warning, 0.0, 1.0)

    def potential_steps(self, num_steps: int) -> list[int]:
        """The sampler steps (0-based, of ``num_steps``) at which potentials are applied."""
        start = _window_step(self.resample_start, num_steps)
        if start >= num_steps:
            raise ConfigError(
                f"resample_start={self.resample_start} is not a step of the {num_steps}-step sampler; "
                f"accepted: 0..{num_steps - 1}, or a fraction of the chain such as 0.2"
            )
        end = min(_window_step(self.resample_end, num_steps), num_steps - 1)
        if end < start:
            raise ConfigError(
                f"resample_end={self.resample_end!r} (step {end}) is before resample_start={self.resample_start!r} "
                f"(step {start}) of the {num_steps}-step sampler"
            )
        interval = max(1, _window_step(self.resample_interval, num_steps))
        return list(range(start, end + 1, interval))


def _check_window_value(name: str, value: int | float) -> None:
    """A window point is a fraction of the chain (float in [0, 1]) or an absolute step (integer >= 0)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ConfigError(f"{name}={value!r} must be a fraction of the chain (e.g. 0.2) or a step number (e.g. 20)")
    if isinstance(value, float) and not 0.0 <= value <= 1.0:
        raise ConfigError(
            f"{name}={value!r} is a fraction of the chain and must lie in [0, 1]; write an integer for an "
            "absolute step (e.g. 20)"
        )
    if isinstance(value, int) and value < 0:
        raise ConfigError(f"{name}={value!r} is out of range; accepted: a step >= 0 or a fraction in [0, 1]")


def _window_step(value: int | float, num_steps: int) -> int:
    return round(value * num_steps) if isinstance(value, float) else value
