"""The benchmark suite runs end to end on tiny sizes (``run_all --smoke``).

A guard against the scripts rotting as the library changes: every benchmark
must run and report a numeric ratio or a skip reason. Nothing here looks at a
timing; the figures of a smoke run mean nothing.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parent.parent
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


@pytest.fixture(scope="module")
def smoke_results(tmp_path_factory) -> dict:
    """The JSON written by ``python -m benchmarks.run_all --smoke``."""
    output = tmp_path_factory.mktemp("benchmarks") / "smoke.json"
    env = dict(os.environ)
    # The suite sets up its own devices: drop the 8 simulated ones of conftest.py.
    env.pop("XLA_FLAGS", None)
    env["PYTHONPATH"] = os.pathsep.join(
        path for path in (str(REPO_ROOT), env.get("PYTHONPATH")) if path
    )
    completed = subprocess.run(
        [sys.executable, "-m", "benchmarks.run_all", "--smoke", "--json", str(output)],
        cwd=REPO_ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
    )
    assert completed.returncode == 0, completed.stdout[-4000:] + completed.stderr[-4000:]
    return json.loads(output.read_text())


@pytest.mark.slow
def test_every_benchmark_reports_a_ratio_or_a_skip_reason(smoke_results):
    rows = smoke_results["results"]
    assert {row["benchmark"] for row in rows} == set(BENCHMARKS)
    for name in BENCHMARKS:
        own = [row for row in rows if row["benchmark"] == name]
        assert not [row for row in own if row["error"]], own
        measured = [
            row
            for row in own
            if isinstance(row["ratio"], int | float) and math.isfinite(row["ratio"])
        ]
        skips = [row for row in own if row["skipped"]]
        assert measured or skips, f"{name} reported neither a ratio nor a skip reason: {own}"


@pytest.mark.slow
def test_rows_are_complete(smoke_results):
    for row in smoke_results["results"]:
        assert row["figure"], row
        assert row["status"] in ("PASS", "MISS", "info", "skipped"), row
        if row["ratio"] is not None:
            assert row["times"], row
        if row["target"] is not None:
            assert row["target"].split()[0] in ("<=", ">="), row


@pytest.mark.slow
def test_metadata_names_the_machine(smoke_results):
    meta = smoke_results["meta"]
    assert meta["smoke"] is True
    assert meta["cores"] >= 1
    assert meta["jax"]


# The utilities the figures rest on, without running any benchmark.


def test_flops_from_cost_analysis_accepts_every_backend_shape():
    from benchmarks._timing import flops_from_cost_analysis

    assert flops_from_cost_analysis(None) is None
    assert flops_from_cost_analysis({"flops": 12.0, "bytes accessed": 3.0}) == 12.0
    assert flops_from_cost_analysis({"bytes accessed": 3.0}) is None
    assert flops_from_cost_analysis([{"flops": 2.0}, {"flops": 3.0}]) == 5.0
    assert flops_from_cost_analysis([]) is None


def test_paired_ratio_is_the_median_of_per_round_ratios():
    from benchmarks._timing import Measurements

    times = Measurements(
        seconds={"a": [2.0, 4.0, 30.0], "b": [1.0, 4.0, 10.0]}, calls_per_round={"a": 1, "b": 1}
    )
    assert times.ratio("a", "b") == 2.0
    assert times.median("a") == 4.0


def test_a_result_survives_the_json_round_trip():
    from benchmarks._report import Result, Target

    row = Result(
        benchmark="step_overhead",
        figure="mlp: jaxkd / hand",
        ratio=1.01,
        target=Target("<=", 1.03),
        times={"jaxkd": 0.05, "bytes": 1024.0},
        units={"bytes": "B"},
    )
    again = Result.from_json(row.to_json())
    assert again == row
    assert again.status == "PASS"
    assert Result(benchmark="x", figure="y", ratio=1.2, target=Target(">=", 1.5)).status == "MISS"
