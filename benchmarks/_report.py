"""Results, targets, the printed table, the JSON file and the command line.

Every benchmark module exposes ``NAME`` and ``run(config) -> list[Result]``;
:func:`main` turns such a module into a script, and ``run_all`` prints the
results of all of them as one table.
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib.metadata
import json
import math
import os
import platform
import tempfile
import time
import traceback
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any


@dataclasses.dataclass(frozen=True)
class Config:
    """How big and how long a benchmark run is.

    Attributes:
      smoke: tiny models and one or two repetitions: checks that the scripts run,
        measures nothing worth reading.
    """

    smoke: bool = False

    def reps(self, full: int) -> int:
        """``full`` repetitions, or at most 2 in a smoke run."""
        return min(2, full) if self.smoke else full

    def round_seconds(self, full: float) -> float:
        """Least work per timed round: ``full`` seconds, or one call in a smoke run."""
        return 0.0 if self.smoke else full


def apply_smoke_settings() -> None:
    """Makes XLA compile fast rather than well, for a smoke run.

    A smoke run spends most of its time compiling tiny steps; with most XLA
    optimizations off that is about three times faster. The environment
    variable reaches subprocesses (``data_parallel``'s); the config update covers
    a JAX already imported here.
    """
    os.environ["JAX_DISABLE_MOST_OPTIMIZATIONS"] = "1"
    import jax

    jax.config.update("jax_disable_most_optimizations", True)


@dataclasses.dataclass(frozen=True)
class Target:
    """A bound on a ratio: ``ratio <= value`` or ``ratio >= value``.

    Attributes:
      op: ``"<="`` or ``">="``.
      value: the bound.
    """

    op: str
    value: float

    def __post_init__(self) -> None:
        if self.op not in ("<=", ">="):
            raise ValueError(f"`op` must be '<=' or '>=', got {self.op!r}.")

    def met(self, ratio: float) -> bool:
        """Whether ``ratio`` meets the target."""
        return ratio <= self.value if self.op == "<=" else ratio >= self.value

    def __str__(self) -> str:
        return f"{self.op} {self.value:g}"


@dataclasses.dataclass
class Result:
    """One row of the table.

    Attributes:
      benchmark: the module that measured it, e.g. ``"step_overhead"``.
      figure: what the ratio is, e.g. ``"mlp: jaxkd / hand-written"``.
      ratio: the measured ratio; ``None`` when skipped or failed.
      target: the bound the ratio should meet; ``None`` for figures reported for
        information only.
      times: the absolute quantities beside the ratio, as ``name -> value``,
        seconds unless ``units`` says otherwise.
      units: ``name -> unit`` for the entries of ``times`` that are not seconds:
        ``"B"`` (bytes), ``"flop"``, ``"flop/s"``, ``"1/s"`` or ``"x"`` (a factor).
      note: a short remark printed under the table.
      skipped: why the figure was not measured, if it was not.
      error: the exception that stopped the benchmark, if one did.
    """

    benchmark: str
    figure: str
    ratio: float | None = None
    target: Target | None = None
    times: dict[str, float] = dataclasses.field(default_factory=dict)
    units: dict[str, str] = dataclasses.field(default_factory=dict)
    note: str = ""
    skipped: str | None = None
    error: str | None = None

    @property
    def status(self) -> str:
        """``PASS``, ``MISS``, ``info``, ``skipped`` or ``ERROR``."""
        if self.error is not None:
            return "ERROR"
        if self.skipped is not None:
            return "skipped"
        if self.target is None or self.ratio is None:
            return "info"
        return "PASS" if self.target.met(self.ratio) else "MISS"

    def to_json(self) -> dict[str, Any]:
        """A JSON-ready dict of the row."""
        return {
            "benchmark": self.benchmark,
            "figure": self.figure,
            "ratio": self.ratio,
            "target": None if self.target is None else str(self.target),
            "status": self.status,
            "times": self.times,
            "units": self.units,
            "note": self.note,
            "skipped": self.skipped,
            "error": self.error,
        }

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> Result:
        """The row written by :meth:`to_json` (e.g. by a benchmark's subprocess)."""
        target = None
        if data.get("target"):
            op, value = data["target"].split()
            target = Target(op, float(value))
        return cls(
            benchmark=data["benchmark"],
            figure=data["figure"],
            ratio=data.get("ratio"),
            target=target,
            times=dict(data.get("times") or {}),
            units=dict(data.get("units") or {}),
            note=data.get("note") or "",
            skipped=data.get("skipped"),
            error=data.get("error"),
        )


def skipped(benchmark: str, figure: str, reason: str) -> Result:
    """A row for a benchmark that could not run here."""
    return Result(benchmark=benchmark, figure=figure, skipped=reason)


def _format_quantity(value: float, units: str) -> str:
    if units == "s":
        if value >= 1.0:
            return f"{value:.2f} s"
        if value >= 1e-3:
            return f"{value * 1e3:.2f} ms"
        return f"{value * 1e6:.1f} us"
    if units == "B":
        return f"{value / 2**20:.2f} MiB"
    if units in ("flop", "flop/s"):
        scaled = value / 1e9
        return f"{scaled:.3g} G{'FLOP' if units == 'flop' else 'FLOP/s'}"
    if units == "1/s":
        return f"{value:.1f}/s"
    if units == "x":
        return f"{value:.3f}x"
    return f"{value:g} {units}"


def format_times(result: Result) -> str:
    """``name value, ...`` for the table's last column."""
    if result.skipped is not None:
        return result.skipped
    if result.error is not None:
        return result.error
    return ", ".join(
        f"{name} {_format_quantity(value, result.units.get(name, 's'))}"
        for name, value in result.times.items()
    )


def format_ratio(ratio: float | None) -> str:
    """Three significant decimals, or ``-``."""
    if ratio is None or not math.isfinite(ratio):
        return "-"
    return f"{ratio:.3f}"


def format_table(results: Sequence[Result]) -> str:
    """The results as one plain-text table, notes numbered underneath."""
    header = ("benchmark", "figure", "ratio", "target", "result", "absolute (median)")
    rows = []
    notes = []
    for result in results:
        status = result.status
        if result.note:
            notes.append(result.note)
            status = f"{status} [{len(notes)}]"
        rows.append(
            (
                result.benchmark,
                result.figure,
                format_ratio(result.ratio),
                "-" if result.target is None else str(result.target),
                status,
                format_times(result),
            )
        )
    widths = [max(len(row[i]) for row in (header, *rows)) for i in range(len(header))]

    def line(cells: Sequence[str]) -> str:
        return " | ".join(cell.ljust(width) for cell, width in zip(cells, widths, strict=True))

    lines = [line(header), "-+-".join("-" * width for width in widths)]
    lines += [line(row) for row in rows]
    lines += [f"[{i}] {note}" for i, note in enumerate(notes, start=1)]
    return "\n".join(line.rstrip() for line in lines)


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _version(package: str) -> str | None:
    """The installed version of ``package``, without importing it."""
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return None


def cpu_cores() -> int:
    """Cores this process may run on (its CPU affinity): XLA's CPU thread count."""
    if hasattr(os, "sched_getaffinity"):
        return len(os.sched_getaffinity(0))
    return os.cpu_count() or 1


def machine_info() -> dict[str, Any]:
    """CPU, core count and library versions, for the JSON file and the table."""
    return {
        "cpu": _cpu_model(),
        "cores": cpu_cores(),
        "python": platform.python_version(),
        "jax": _version("jax"),
        "jaxlib": _version("jaxlib"),
        "flax": _version("flax"),
        "optax": _version("optax"),
        "torch": _version("torch"),
        "xla_flags": os.environ.get("XLA_FLAGS", ""),
    }


def default_json_path(name: str) -> Path:
    """Where results go when no ``--json`` is given: outside the repository."""
    return Path(tempfile.gettempdir()) / "jaxkd_benchmarks" / f"{name}.json"


def write_json(path: Path, results: Sequence[Result], **meta: Any) -> None:
    """Writes the rows and the run's metadata to ``path``."""
    path.parent.mkdir(parents=True, exist_ok=True)
    payload = {
        "meta": {**machine_info(), **meta},
        "results": [result.to_json() for result in results],
    }
    path.write_text(json.dumps(payload, indent=2, sort_keys=False) + "\n")


def parse_args(description: str, argv: Sequence[str] | None = None) -> argparse.Namespace:
    """The options every benchmark script takes: ``--smoke`` and ``--json``."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--smoke", action="store_true", help="tiny sizes, 1-2 repetitions")
    parser.add_argument("--json", type=Path, default=None, help="where to write the results")
    return parser.parse_args(argv)


def guarded_run(name: str, run: Callable[[Config], list[Result]], config: Config) -> list[Result]:
    """``run(config)``, or one ERROR row if it raises (so other benchmarks still run)."""
    try:
        return run(config)
    except Exception as error:  # noqa: BLE001 - reported in the table and the exit code
        traceback.print_exc()
        message = f"{type(error).__name__}: {error}".splitlines()[0][:200]
        return [Result(benchmark=name, figure="-", error=message)]


def report(name: str, results: Sequence[Result], json_path: Path | None, **meta: Any) -> int:
    """Prints the table, writes the JSON file, returns the exit code (1 on an ERROR)."""
    print(format_table(results))
    path = default_json_path(name) if json_path is None else json_path
    write_json(path, results, **meta)
    print(f"\nresults written to {path}")
    return 1 if any(result.status == "ERROR" for result in results) else 0


def main(
    name: str,
    run: Callable[[Config], list[Result]],
    description: str,
    argv: Sequence[str] | None = None,
) -> int:
    """Runs one benchmark module as a script."""
    args = parse_args(description, argv)
    config = Config(smoke=args.smoke)
    if config.smoke:
        apply_smoke_settings()
    start = time.perf_counter()
    results = guarded_run(name, run, config)
    elapsed = time.perf_counter() - start
    code = report(name, results, args.json, smoke=config.smoke, seconds=elapsed)
    print(f"{name}: {elapsed:.1f} s{' (smoke)' if config.smoke else ''}")
    return code
