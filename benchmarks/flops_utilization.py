"""Achieved FLOP/s of the jaxkd step over a matmul peak measured in the same run.

The step's FLOPs come from XLA's cost analysis of the compiled step; the peak is
a ``[2048, 2048] @ [2048, 2048]`` float32 ``jnp.dot`` (``2 n^3`` FLOPs), timed in
rounds alternating with the step's, so both see the same machine load:

    utilization = (F_step / t_step) / (F_matmul / t_matmul)

    python -m benchmarks.flops_utilization [--smoke] [--json PATH]
"""

from __future__ import annotations

import sys

from benchmarks import _kd
from benchmarks._report import Config, Result, Target, main
from benchmarks._timing import chain, compiled_flops, interleave, matmul_peak, require_flops
from benchmarks.models import PairSpec, pairs

NAME = "flops_utilization"
TARGET = Target(">=", 0.5)
PEAK_SIZE = 2048
SMOKE_PEAK_SIZE = 128


def step_flops(problem: _kd.Problem) -> float:
    """XLA's FLOP count of the compiled (donating) jaxkd step."""
    step = _kd.jitted_jaxkd_step(problem)
    compiled = step.lower(
        _kd.jaxkd_state(problem), problem.teacher_variables, problem.batch
    ).compile()
    return require_flops(compiled_flops(compiled), "the jaxkd step")


def measure(spec: PairSpec, config: Config) -> Result:
    """Utilization of one pair's step against the matmul peak."""
    problem = _kd.build_problem(spec)
    flops = step_flops(problem)
    matmul, matmul_flops = matmul_peak(SMOKE_PEAK_SIZE if config.smoke else PEAK_SIZE)
    runners = {
        "step": chain(
            _kd.jitted_jaxkd_step(problem),
            _kd.jaxkd_state(problem),
            problem.teacher_variables,
            problem.batch,
        ),
        "matmul": matmul,
    }
    times = interleave(runners, rounds=config.reps(15), min_round_seconds=config.round_seconds(0.2))
    # (F_step / t_step) / (F_mm / t_mm) with the paired ratio t_step / t_mm.
    utilization = (flops / matmul_flops) / times.ratio("step", "matmul")
    step_seconds, matmul_seconds = times.median("step"), times.median("matmul")
    result = Result(
        benchmark=NAME,
        figure=f"{spec.name}: step FLOP/s / matmul FLOP/s",
        ratio=utilization,
        target=TARGET,
        times={
            "step": step_seconds,
            "step rate": flops / step_seconds,
            "matmul": matmul_seconds,
            "peak": matmul_flops / matmul_seconds,
        },
        units={"step rate": "flop/s", "peak": "flop/s"},
    )
    if not TARGET.met(utilization):
        work = (
            "batch-256 matmuls with softmaxes and elementwise work"
            if spec.name == "mlp"
            else "3x3 convolutions of 16-128 channels with BatchNorm and elementwise work"
        )
        result.note = (
            f"{spec.name}: the step's {flops / 1e9:.3g} GFLOP are {work}, which XLA's CPU "
            f"backend runs at {utilization:.0%} of its large-GEMM rate"
        )
    return result


def run(config: Config) -> list[Result]:
    """One row per pair (MLP, CNN)."""
    return [measure(spec, config) for spec in pairs(smoke=config.smoke)]


if __name__ == "__main__":
    sys.exit(main(NAME, run, __doc__.splitlines()[0]))
