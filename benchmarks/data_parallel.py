"""``pmap_step`` and ``shard_step`` on 8 simulated CPU devices against 1 device.

The global batch is the same in all three runs: one device steps it whole
(``jax.jit``), eight devices step an eighth each (``jaxkd.pmap_step`` over a
``[8, B/8, ...]`` batch, ``jaxkd.shard_step`` over a sharded one) and average
their gradients. On a CPU host the 8 devices share its cores, so these are
overhead figures, not speedups: time(8 devices) / time(1 device) measures what
splitting the batch and the gradient all-reduce cost, and shard_map / pmap
compares the two runners.

The 8 devices need ``XLA_FLAGS=--xla_force_host_platform_device_count=8`` before
JAX starts, so the measurement runs in a subprocess with that flag (and
``JAX_PLATFORMS=cpu``); the calling process, and the other benchmarks in it,
keep their single device.

    python -m benchmarks.data_parallel [--smoke] [--json PATH]
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

from benchmarks._report import Config, Result, Target, main

NAME = "data_parallel"
NUM_DEVICES = 8
DEVICE_FLAG = f"--xla_force_host_platform_device_count={NUM_DEVICES}"
REPO_ROOT = Path(__file__).resolve().parent.parent
SHARD_VS_PMAP_TARGET = Target("<=", 1.1)


def _worker(config: Config) -> list[Result]:
    """The measurement itself; runs in the subprocess with 8 devices."""
    import jax

    import jaxkd
    from benchmarks import _kd
    from benchmarks._timing import chain, interleave
    from benchmarks.models import mlp_pair

    if jax.device_count() != NUM_DEVICES:
        raise RuntimeError(f"Expected {NUM_DEVICES} devices, got {jax.devices()}.")
    spec = mlp_pair(smoke=config.smoke)
    problem = _kd.build_problem(spec)
    batch = jax.device_get(problem.batch)
    mesh = jaxkd.data_mesh()
    one = jax.jit(_kd.jaxkd_step(problem), donate_argnums=(0,))
    runners = {
        "1 device": chain(one, _kd.jaxkd_state(problem), problem.teacher_variables, problem.batch),
        "pmap": chain(
            jaxkd.pmap_step(_kd.jaxkd_step(problem, axis_name="batch"), axis_name="batch"),
            jaxkd.replicate(_kd.jaxkd_state(problem)),
            jaxkd.replicate(problem.teacher_variables),
            jax.device_put(jaxkd.split_for_pmap(batch)),
        ),
        "shard_map": chain(
            jaxkd.shard_step(_kd.jaxkd_step(problem, axis_name="data"), mesh),
            jaxkd.replicate_on_mesh(_kd.jaxkd_state(problem), mesh),
            jaxkd.replicate_on_mesh(problem.teacher_variables, mesh),
            jaxkd.shard_batch(batch, mesh),
        ),
    }
    times = interleave(runners, rounds=config.reps(21), min_round_seconds=config.round_seconds(0.1))
    medians = times.medians()
    rows = [
        Result(
            benchmark=NAME,
            figure=f"{spec.name}: {runner} on 8 devices / 1 device",
            ratio=times.ratio(runner, "1 device"),
            times={runner: medians[runner], "1 device": medians["1 device"]},
        )
        for runner in ("pmap", "shard_map")
    ]
    rows.append(
        Result(
            benchmark=NAME,
            figure=f"{spec.name}: shard_map / pmap (8 devices)",
            ratio=times.ratio("shard_map", "pmap"),
            target=SHARD_VS_PMAP_TARGET,
            times={"shard_map": medians["shard_map"], "pmap": medians["pmap"]},
        )
    )
    rows[0].note = (
        f"{NUM_DEVICES} simulated CPU devices share the host's cores (subprocess with "
        f"{DEVICE_FLAG}); global batch {spec.batch_size}, {spec.batch_size // NUM_DEVICES} "
        "per device: an overhead figure, not a speedup"
    )
    return rows


def run(config: Config) -> list[Result]:
    """Runs :func:`_worker` in a subprocess with 8 simulated devices."""
    env = dict(os.environ)
    env["XLA_FLAGS"] = f"{env.get('XLA_FLAGS', '')} {DEVICE_FLAG}".strip()
    env["JAX_PLATFORMS"] = "cpu"
    env["PYTHONPATH"] = os.pathsep.join(
        path for path in (str(REPO_ROOT), env.get("PYTHONPATH")) if path
    )
    with tempfile.TemporaryDirectory() as workdir:
        output = Path(workdir) / "data_parallel.json"
        command = [sys.executable, "-m", "benchmarks.data_parallel", "--worker", str(output)]
        if config.smoke:
            command.append("--smoke")
        completed = subprocess.run(
            command, env=env, cwd=REPO_ROOT, capture_output=True, text=True, check=False
        )
        if completed.returncode != 0 or not output.exists():
            sys.stderr.write(completed.stderr)
            lines = completed.stderr.strip().splitlines() or ["no output"]
            raise RuntimeError(f"the 8-device subprocess failed: {lines[-1]}")
        rows = json.loads(output.read_text())
    return [Result.from_json(row) for row in rows]


def _worker_main(argv: list[str]) -> int:
    """``--worker OUTPUT [--smoke]``: measure here and write the rows as JSON."""
    output = Path(argv[argv.index("--worker") + 1])
    rows = _worker(Config(smoke="--smoke" in argv))
    output.write_text(json.dumps([row.to_json() for row in rows]))
    return 0


if __name__ == "__main__":
    if "--worker" in sys.argv:
        sys.exit(_worker_main(sys.argv[1:]))
    sys.exit(main(NAME, run, __doc__.splitlines()[0]))
