"""Runs in subprocesses: interrupted or killed and resumed, and split over two processes.

All must end with the same params as one uninterrupted single-process run of the
same config and global batch. The runs use plain SGD (see ``SHORT_RUN``), so a
gradient scaled by the process or device count would fail the comparison.
"""

from __future__ import annotations

import json
import re
import signal
import subprocess
import time

import jax
import numpy as np
import pytest
from subprocess_runs import REPO, command, environment, final_params, free_port

RUNS = ("teacher", "scratch", "distilled")


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    return str(tmp_path_factory.mktemp("tfds"))


@pytest.fixture(scope="module")
def reference(tmp_path_factory, data_dir):
    """One uninterrupted single-process, single-device run."""
    workdir = tmp_path_factory.mktemp("reference")
    subprocess.run(
        command(workdir),
        cwd=REPO,
        env=environment(data_dir),
        check=True,
        timeout=300,
        capture_output=True,
    )
    return workdir


def _metric_steps(path):
    return [(r["split"], r["step"]) for r in map(json.loads, path.read_text().splitlines())]


def _start_and_signal(workdir, env, marker, signal_number, **popen):
    """Starts the short run, sends ``signal_number`` once ``marker`` exists; returns it."""
    process = subprocess.Popen(command(workdir), cwd=REPO, env=env, **popen)
    deadline = time.time() + 300
    while not marker.exists() and process.poll() is None and time.time() < deadline:
        time.sleep(0.02)
    assert process.poll() is None, "the run finished before it could be interrupted"
    process.send_signal(signal_number)
    return process


def _assert_same_params(reference, workdir):
    for run in RUNS:
        jax.tree.map(
            np.testing.assert_array_equal, final_params(reference, run), final_params(workdir, run)
        )


def test_interrupted_then_killed_run_resumes_to_the_same_params(tmp_path, data_dir, reference):
    """Ctrl-C during the scratch student, SIGKILL during the distilled one, then a rerun.

    One chain of three processes, to keep the subprocess time down.
    """
    env = environment(data_dir)
    scratch = tmp_path / "seed_0" / "scratch" / "checkpoints" / "10"
    process = _start_and_signal(
        tmp_path, env, scratch, signal.SIGINT, stdout=subprocess.PIPE, stderr=subprocess.PIPE
    )
    _, stderr = process.communicate(timeout=300)
    stderr = stderr.decode()
    assert process.returncode == 130, stderr[-3000:]
    last_line = stderr.strip().splitlines()[-1]
    assert re.fullmatch(
        r"interrupted at step (\d+) of seed_0/(scratch|distilled); "
        "rerun the same command to resume",
        last_line,
    ), stderr[-3000:]
    assert "Traceback" not in stderr and "Error" not in stderr, stderr[-3000:]
    assert not (tmp_path / "seed_0" / "distilled" / "result.json").exists()

    distilled = tmp_path / "seed_0" / "distilled" / "checkpoints" / "10"
    process = _start_and_signal(
        tmp_path,
        env,
        distilled,
        signal.SIGKILL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    process.wait()
    assert (tmp_path / "seed_0" / "scratch" / "result.json").exists()
    assert not (tmp_path / "seed_0" / "distilled" / "result.json").exists()

    completed = subprocess.run(
        command(tmp_path), cwd=REPO, env=env, timeout=300, capture_output=True, text=True
    )
    assert completed.returncode == 0, completed.stderr[-3000:]
    assert (tmp_path / "results.md").exists()
    _assert_same_params(reference, tmp_path)
    # Each step is logged once, exactly as in the uninterrupted run.
    for run in ("scratch", "distilled"):
        metrics = f"seed_0/{run}/metrics.jsonl"
        assert _metric_steps(tmp_path / metrics) == _metric_steps(reference / metrics)


def test_two_processes_match_one_process(tmp_path, data_dir, reference):
    port = free_port()
    processes = [
        subprocess.Popen(
            command(
                tmp_path,
                "--distributed",
                f"--coordinator_address=127.0.0.1:{port}",
                "--num_processes=2",
                f"--process_id={index}",
            ),
            cwd=REPO,
            env=environment(data_dir),
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        for index in range(2)
    ]
    outputs = [p.communicate(timeout=300)[0] for p in processes]
    for index, (process, output) in enumerate(zip(processes, outputs, strict=True)):
        assert process.returncode == 0, f"process {index}:\n{output[-3000:]}"
    # Not bit-identical: the gradient is reduced in another order (two half-batch
    # sums, then a cross-process sum). A gradient off by the process count would
    # move the params by about 0.1 (checked by doubling the learning rate).
    for run in RUNS:
        jax.tree.map(
            lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6),
            final_params(reference, run),
            final_params(tmp_path, run),
        )
    assert (tmp_path / "results.md").exists()
