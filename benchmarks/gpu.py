"""Steps/s and achieved FLOP/s of the CNN pair on a GPU, in float32 and bfloat16.

Teacher and student compute in the given dtype (params stay float32, logits
come back as float32); the batch is larger than on the CPU (512). FLOPs come
from XLA's cost analysis of each compiled step, so the two rates count the same
work. Without a GPU (``jax.devices()[0].platform != "gpu"``) the table says
``skipped: no GPU``.

    python -m benchmarks.gpu [--smoke] [--json PATH]
"""

from __future__ import annotations

import dataclasses
import sys

import jax
import jax.numpy as jnp

from benchmarks import _kd
from benchmarks._report import Config, Result, main, skipped
from benchmarks._timing import chain, compiled_flops, interleave, require_flops
from benchmarks.models import cnn_pair

NAME = "gpu"
GPU_BATCH = 512
DTYPES = {"f32": jnp.float32, "bf16": jnp.bfloat16}


def measure(config: Config) -> list[Result]:
    """The f32 and bf16 rows, and bf16 step time / f32 step time, on ``jax.devices()[0]``."""
    device = jax.devices()[0]
    spec = cnn_pair(smoke=config.smoke)
    if not config.smoke:
        spec = dataclasses.replace(spec, batch_size=GPU_BATCH)
    runners, flops = {}, {}
    for name, dtype in DTYPES.items():
        problem = _kd.build_problem(spec, dtype=dtype)
        step = _kd.jitted_jaxkd_step(problem)
        state = _kd.jaxkd_state(problem)
        compiled = step.lower(state, problem.teacher_variables, problem.batch).compile()
        flops[name] = require_flops(compiled_flops(compiled), f"the {name} step")
        runners[name] = chain(step, state, problem.teacher_variables, problem.batch)
    times = interleave(runners, rounds=config.reps(21), min_round_seconds=config.round_seconds(0.2))
    rows = []
    for name in DTYPES:
        seconds = times.median(name)
        rows.append(
            Result(
                benchmark=NAME,
                figure=f"{spec.name} {name}: steps/s (batch {spec.batch_size})",
                times={
                    "step": seconds,
                    "steps/s": 1.0 / seconds,
                    "achieved": flops[name] / seconds,
                },
                units={"steps/s": "1/s", "achieved": "flop/s"},
            )
        )
    rows.append(
        Result(
            benchmark=NAME,
            figure=f"{spec.name}: bf16 step / f32 step",
            ratio=times.ratio("bf16", "f32"),
            times={"bf16": times.median("bf16"), "f32": times.median("f32")},
        )
    )
    rows[0].note = f"device: {device.device_kind} ({device.platform})"
    return rows


def run(config: Config) -> list[Result]:
    """The GPU rows, or one skip row without a GPU."""
    if jax.devices()[0].platform != "gpu":
        return [skipped(NAME, "cnn: steps/s and FLOP/s, f32 and bf16", "skipped: no GPU")]
    return measure(config)


if __name__ == "__main__":
    sys.exit(main(NAME, run, __doc__.splitlines()[0]))
