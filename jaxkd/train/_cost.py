"""Compiled cost figures from XLA, for reports and benchmarks."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any


def flops_from_cost_analysis(analysis: Any) -> float | None:
    """The ``flops`` entry of a ``cost_analysis()`` result, or None.

    Backends return ``None``, a dict, or a list of dicts (one per program); the
    list's entries are summed. Negative values (unknown) count as missing.
    """
    if analysis is None:
        return None
    if isinstance(analysis, Mapping):
        value = analysis.get("flops")
        return None if value is None or value < 0 else float(value)
    known = [v for v in map(flops_from_cost_analysis, analysis) if v is not None]
    return sum(known) if known else None


def compiled_flops(compiled: Any) -> float | None:
    """FLOPs of a compiled computation (``jax.jit(f).lower(...).compile()``), or None.

    None where the backend has no cost analysis or reports no FLOP count.
    """
    try:
        return flops_from_cost_analysis(compiled.cost_analysis())
    except NotImplementedError:  # backends without a cost model
        return None
