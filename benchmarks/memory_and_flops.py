"""Compiled memory of the step with and without donation, and its FLOPs.

Memory, from ``jax.jit(step).lower(...).compile().memory_analysis()``:

- ``aliased / state``: bytes of outputs that reuse a donated input buffer over
  the bytes of the student's ``TrainState``. With the state donated the whole
  state should be updated in place: target >= 0.99.
- ``peak donated / not donated``: peak = arguments + outputs + temporaries -
  aliased bytes; for information (it drops by about the state's size).

FLOPs, from XLA's cost analysis: the step over (student forward and backward +
teacher forward). The teacher is not differentiated, so the step costs no more
than that plus the optimizer and metrics: target <= 1.05. The note gives the
ratio a differentiated teacher would have had.

    python -m benchmarks.memory_and_flops [--smoke] [--json PATH]
"""

from __future__ import annotations

import sys

import jax

from benchmarks import _kd
from benchmarks._report import Config, Result, Target, main
from benchmarks._timing import compiled_flops, memory_stats, require_flops
from benchmarks.models import PairSpec, pairs

NAME = "memory_and_flops"
ALIAS_TARGET = Target(">=", 0.99)
FLOPS_TARGET = Target("<=", 1.05)


def _nbytes(tree) -> int:
    return sum(leaf.nbytes for leaf in jax.tree.leaves(tree))


def compile_step(problem: _kd.Problem, *, donate: bool):
    """The compiled jaxkd step (donating the state or not)."""
    step = _kd.jitted_jaxkd_step(problem, donate=donate)
    return step.lower(_kd.jaxkd_state(problem), problem.teacher_variables, problem.batch).compile()


def memory_results(problem: _kd.Problem) -> list[Result]:
    """The aliasing and peak-memory rows of one pair."""
    name = problem.spec.name
    donated = memory_stats(compile_step(problem, donate=True))
    plain = memory_stats(compile_step(problem, donate=False))
    state_bytes = _nbytes(_kd.jaxkd_state(problem))
    aliased = Result(
        benchmark=NAME,
        figure=f"{name}: aliased bytes / state bytes (donated)",
        ratio=donated["alias_size_in_bytes"] / state_bytes,
        target=ALIAS_TARGET,
        times={
            "aliased": donated["alias_size_in_bytes"],
            "state": state_bytes,
            "aliased without donation": plain["alias_size_in_bytes"],
        },
        units=dict.fromkeys(("aliased", "state", "aliased without donation"), "B"),
    )
    peak = Result(
        benchmark=NAME,
        figure=f"{name}: peak bytes, donated / not donated",
        ratio=donated["peak_bytes"] / plain["peak_bytes"],
        times={
            "donated": donated["peak_bytes"],
            "not donated": plain["peak_bytes"],
            "arguments": donated["argument_size_in_bytes"],
            "outputs": donated["output_size_in_bytes"],
            "temporaries": donated["temp_size_in_bytes"],
        },
        units=dict.fromkeys(("donated", "not donated", "arguments", "outputs", "temporaries"), "B"),
    )
    return [aliased, peak]


def flops_result(problem: _kd.Problem) -> Result:
    """The step's FLOPs over student forward+backward plus teacher forward."""
    step = require_flops(compiled_flops(compile_step(problem, donate=True)), "the jaxkd step")
    student = _kd.student_fwd_bwd_flops(problem)
    teacher = _kd.teacher_forward_flops(problem)
    teacher_differentiated = _kd.teacher_fwd_bwd_flops(problem)
    return Result(
        benchmark=NAME,
        figure=f"{problem.spec.name}: step FLOPs / (student fwd+bwd + teacher fwd)",
        ratio=step / (student + teacher),
        target=FLOPS_TARGET,
        times={"step": step, "student fwd+bwd": student, "teacher fwd": teacher},
        units=dict.fromkeys(("step", "student fwd+bwd", "teacher fwd"), "flop"),
        note=(
            f"{problem.spec.name}: a step that also differentiated the teacher would cost "
            f"{(student + teacher_differentiated) / (student + teacher):.2f}x "
            "(student fwd+bwd + teacher fwd+bwd)"
        ),
    )


def measure(spec: PairSpec) -> list[Result]:
    """Memory and FLOP rows of one pair."""
    problem = _kd.build_problem(spec)
    return [*memory_results(problem), flops_result(problem)]


def run(config: Config) -> list[Result]:
    """Three rows per pair (MLP, CNN); nothing is timed."""
    return [row for spec in pairs(smoke=config.smoke) for row in measure(spec)]


if __name__ == "__main__":
    sys.exit(main(NAME, run, __doc__.splitlines()[0]))
