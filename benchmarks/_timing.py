"""Side-by-side timing and XLA cost and memory analysis.

A *runner* is a function ``run(n)`` that performs ``n`` calls of something (a
train step, a matmul) and returns once the results are ready. :func:`interleave`
times several runners in alternating rounds, so that slow phases of a shared
machine hit all of them alike, and reports per-call medians and paired ratios.
"""

from __future__ import annotations

import dataclasses
import math
import statistics
import time
from collections.abc import Callable, Mapping
from typing import Any

import jax
import jax.numpy as jnp

from jaxkd.train._cost import compiled_flops, flops_from_cost_analysis  # noqa: F401 (re-export)

Runner = Callable[[int], None]
"""``run(n)``: performs ``n`` calls and returns when their results are ready."""


@dataclasses.dataclass(frozen=True)
class Measurements:
    """Seconds per call of each runner, one value per round.

    Attributes:
      seconds: ``name -> [seconds per call in round 0, round 1, ...]``.
      calls_per_round: ``name -> calls timed together in each round``.
    """

    seconds: dict[str, list[float]]
    calls_per_round: dict[str, int]

    def median(self, name: str) -> float:
        """Median seconds per call of ``name``."""
        return statistics.median(self.seconds[name])

    def medians(self) -> dict[str, float]:
        """Median seconds per call of every runner."""
        return {name: self.median(name) for name in self.seconds}

    def ratio(self, numerator: str, denominator: str) -> float:
        """Median over rounds of ``time(numerator) / time(denominator)``.

        Each round's two times were taken back to back, so the paired ratio is
        less sensitive to the machine's load changing during the run than the
        ratio of the two medians.
        """
        pairs = zip(self.seconds[numerator], self.seconds[denominator], strict=True)
        return statistics.median(a / b for a, b in pairs)


def interleave(
    runners: Mapping[str, Runner],
    *,
    rounds: int,
    min_round_seconds: float = 0.05,
    warmup: int = 2,
) -> Measurements:
    """Times ``runners`` in alternating rounds.

    Each runner is first called ``warmup`` times (compilation, caches), then
    timed once to choose how many calls make up one of its rounds (at least
    ``min_round_seconds`` of work). Round ``r`` runs every runner once, in the
    given order for even ``r`` and in reverse order for odd ``r`` (A B, B A, ...),
    so that neither always follows the other.

    Args:
      runners: ``name -> runner``; at least one.
      rounds: number of rounds (samples per runner).
      min_round_seconds: least time one runner's round should take.
      warmup: untimed calls of each runner before timing.

    Returns:
      The per-call seconds of every round.
    """
    if not runners or rounds < 1:
        raise ValueError("Need at least one runner and one round.")
    names = list(runners)
    calls = {}
    for name in names:
        runners[name](warmup)
        start = time.perf_counter()
        runners[name](1)
        once = time.perf_counter() - start
        calls[name] = max(1, math.ceil(min_round_seconds / max(once, 1e-9)))
    seconds: dict[str, list[float]] = {name: [] for name in names}
    for index in range(rounds):
        for name in names if index % 2 == 0 else reversed(names):
            start = time.perf_counter()
            runners[name](calls[name])
            seconds[name].append((time.perf_counter() - start) / calls[name])
    return Measurements(seconds=seconds, calls_per_round=calls)


def chain(step: Callable[..., tuple[Any, Any]], state: Any, *args: Any) -> Runner:
    """A runner of ``state, out = step(state, *args)``, feeding each state to the next call.

    The step may donate its state: the runner only ever passes the newest one.
    """
    holder = [state]

    def run(n: int) -> None:
        current, out = holder[0], None
        for _ in range(n):
            current, out = step(current, *args)
        holder[0] = current
        jax.block_until_ready((current, out))

    return run


def repeat(fn: Callable[..., Any], *args: Any) -> Runner:
    """A runner of ``fn(*args)``, waiting for every result."""

    def run(n: int) -> None:
        for _ in range(n):
            jax.block_until_ready(fn(*args))

    return run


def flops_of(fn: Callable[..., Any], *args: Any) -> float | None:
    """FLOPs of ``jax.jit(fn)(*args)`` from XLA's cost analysis, or None."""
    return compiled_flops(jax.jit(fn).lower(*args).compile())


def require_flops(value: float | None, what: str) -> float:
    """``value``, or a clear error when the backend gave no cost analysis."""
    if value is None or value <= 0:
        raise RuntimeError(f"XLA's cost analysis gave no FLOP count for {what} on this backend.")
    return value


MEMORY_FIELDS = (
    "argument_size_in_bytes",
    "output_size_in_bytes",
    "alias_size_in_bytes",
    "temp_size_in_bytes",
)


def memory_stats(compiled: Any) -> dict[str, int]:
    """The compiled computation's memory analysis, and its peak.

    ``peak_bytes`` is arguments + outputs + temporaries - aliased bytes: an
    output that reuses a donated argument's buffer is counted once.
    """
    analysis = compiled.memory_analysis()
    if analysis is None:
        raise RuntimeError("memory_analysis() is not available on this backend.")
    stats = {field: int(getattr(analysis, field)) for field in MEMORY_FIELDS}
    stats["peak_bytes"] = (
        stats["argument_size_in_bytes"]
        + stats["output_size_in_bytes"]
        + stats["temp_size_in_bytes"]
        - stats["alias_size_in_bytes"]
    )
    return stats


def matmul_peak(size: int, *, dtype: Any = jnp.float32) -> tuple[Runner, float]:
    """A runner of one ``[size, size] @ [size, size]`` matmul and its FLOPs, ``2 size^3``."""
    keys = jax.random.split(jax.random.key(0))
    a = jax.random.normal(keys[0], (size, size), dtype)
    b = jax.random.normal(keys[1], (size, size), dtype)
    matmul = jax.jit(jnp.dot)
    return repeat(matmul, a, b), 2.0 * size**3
