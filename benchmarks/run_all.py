"""Runs every benchmark and prints one table; writes the rows as JSON.

    python -m benchmarks.run_all [--smoke] [--json PATH]

The benchmarks run one after another in this process, except ``data_parallel``,
which starts a subprocess with 8 simulated devices (see its docstring), so that
every other figure is measured on a single, unshared CPU device. Progress goes
to stderr; the table to stdout. The exit code is 1 if a benchmark raised (its
row says ERROR), else 0: a missed target is a result, not a failure.
"""

from __future__ import annotations

import importlib
import os
import sys
import time
from collections.abc import Callable, Sequence

from benchmarks._report import (
    Config,
    Result,
    apply_smoke_settings,
    guarded_run,
    machine_info,
    parse_args,
    report,
)

BENCHMARKS = (
    "step_overhead",
    "flops_utilization",
    "torch_comparison",
    "cached_teacher",
    "memory_and_flops",
    "chunked_loss",
    "data_parallel",
    "gpu",
)


def _load_average() -> float | None:
    try:
        return os.getloadavg()[0]
    except OSError:
        return None


def _runner(name: str) -> Callable[[Config], list[Result]]:
    """``benchmarks.<name>.run``, imported when called (so an import error is a row)."""

    def run(config: Config) -> list[Result]:
        return importlib.import_module(f"benchmarks.{name}").run(config)

    return run


def run_benchmarks(config: Config) -> tuple[list[Result], dict[str, float]]:
    """Every benchmark's rows, in order, and the seconds each took."""
    results: list[Result] = []
    seconds: dict[str, float] = {}
    for name in BENCHMARKS:
        print(f"running {name} ...", file=sys.stderr, flush=True)
        start = time.perf_counter()
        results += guarded_run(name, _runner(name), config)
        seconds[name] = time.perf_counter() - start
        print(f"  {name}: {seconds[name]:.1f} s", file=sys.stderr, flush=True)
    return results, seconds


def header(info: dict, load_start: float | None, load_end: float | None) -> str:
    """One line naming the machine, the library versions and the load."""
    torch = info["torch"] or "not installed"
    load = "" if load_start is None else f"; 1-min load average {load_start:.2f} -> {load_end:.2f}"
    return (
        f"{info['cpu']}, {info['cores']} cores; jax {info['jax']}, flax {info['flax']}, "
        f"optax {info['optax']}, torch {torch}{load}"
    )


def main(argv: Sequence[str] | None = None) -> int:
    """Runs the suite; returns the exit code."""
    args = parse_args("Run every jaxkd benchmark and print one table.", argv)
    config = Config(smoke=args.smoke)
    if config.smoke:
        apply_smoke_settings()
    load_start = _load_average()
    start = time.perf_counter()
    results, seconds = run_benchmarks(config)
    elapsed = time.perf_counter() - start
    load_end = _load_average()
    print(header(machine_info(), load_start, load_end))
    print()
    code = report(
        "run_all",
        results,
        args.json,
        smoke=config.smoke,
        seconds=elapsed,
        seconds_per_benchmark=seconds,
        load_average=[load_start, load_end],
    )
    print(f"total: {elapsed:.1f} s{' (smoke)' if config.smoke else ''}")
    return code


if __name__ == "__main__":
    sys.exit(main())
