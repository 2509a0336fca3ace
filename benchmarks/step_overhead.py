"""jaxkd's train step against a minimal hand-written JAX KD step.

Same models, initial params, optimizer (SGD with momentum) and batch; both
jitted with the student state donated; timed in alternating rounds. The jaxkd
step also returns its metrics (entropies, agreement, gradient and param norms)
and splits a PRNG key: that is the overhead this figure bounds.

    python -m benchmarks.step_overhead [--smoke] [--json PATH]
"""

from __future__ import annotations

import sys

from benchmarks import _kd
from benchmarks._report import Config, Result, Target, main
from benchmarks._timing import chain, interleave
from benchmarks.models import PairSpec, pairs

NAME = "step_overhead"
TARGET = Target("<=", 1.03)


def measure(spec: PairSpec, config: Config) -> Result:
    """The ratio of step times, jaxkd / hand-written, for one pair."""
    problem = _kd.build_problem(spec)
    runners = {
        "jaxkd": chain(
            _kd.jitted_jaxkd_step(problem),
            _kd.jaxkd_state(problem),
            problem.teacher_variables,
            problem.batch,
        ),
        "hand": chain(
            _kd.hand_step(problem),
            _kd.hand_state(problem),
            problem.teacher_variables,
            problem.batch,
        ),
    }
    times = interleave(runners, rounds=config.reps(41), min_round_seconds=config.round_seconds(0.1))
    return Result(
        benchmark=NAME,
        figure=f"{spec.name}: jaxkd step / hand-written step",
        ratio=times.ratio("jaxkd", "hand"),
        target=TARGET,
        times=times.medians(),
    )


def run(config: Config) -> list[Result]:
    """One row per pair (MLP, CNN)."""
    specs = pairs(smoke=config.smoke)
    results = [measure(spec, config) for spec in specs]
    results[0].note = "pairs: " + "; ".join(spec.describe() for spec in specs)
    return results


if __name__ == "__main__":
    sys.exit(main(NAME, run, __doc__.splitlines()[0]))
