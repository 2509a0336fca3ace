"""The experiment runner: end to end, bad configs, every config's smoke run, resume."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest
import tensorflow_datasets as tfds

from experiments import train
from experiments.configs import cifar10, cifar100, digits, fashion_mnist, mnist, mnist1d

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    return str(tmp_path_factory.mktemp("tfds"))


def _tiny(module, data_dir, **overrides):
    config = module.get_config("quick")
    config.data_dir = data_dir
    for key, value in overrides.items():
        node = config
        *parents, leaf = key.split("__")
        for parent in parents:
            node = node[parent]
        node[leaf] = value
    return config


def test_digits_quick_writes_results(tmp_path, data_dir):
    config = _tiny(digits, data_dir, steps=40, teacher__steps=40, eval_every=20)
    results = train.train_and_evaluate(config, str(tmp_path))
    assert [r["run"] for r in results] == ["teacher", "scratch", "distilled"]
    for name in ("results.md", "results.json", "training_curves.png", "config.json"):
        assert (tmp_path / name).exists(), name
    table = (tmp_path / "results.md").read_text()
    for title in ("teacher", "student from scratch", "distilled student", "FLOPs/example"):
        assert title in table
    summary = json.loads((tmp_path / "results.json").read_text())["summary"]
    assert summary["distilled"]["params"]["mean"] == summary["scratch"]["params"]["mean"]
    assert summary["teacher"]["params"]["mean"] > summary["scratch"]["params"]["mean"]
    assert summary["teacher"]["flops_per_example"]["mean"] > 0
    assert 0.0 <= summary["distilled"]["agreement"]["mean"] <= 1.0
    records = [
        json.loads(line)
        for line in (tmp_path / "seed_0" / "distilled" / "metrics.jsonl").read_text().splitlines()
    ]
    assert [r["step"] for r in records if r["split"] == "test"] == [20, 40]
    first_train = next(r for r in records if r["split"] == "train")
    assert {"loss", "kd_loss", "ce_loss", "agreement", "grad_norm"} <= set(first_train)


@pytest.mark.parametrize(
    "overrides, match",
    [
        (dict(dataset="imagenet21k"), "dataset='imagenet21k' is unknown"),
        (dict(student__model="vit_huge"), "student.model='vit_huge' is unknown"),
        (dict(teacher__model="nope"), "teacher.model='nope' is unknown"),
        (dict(batch_size=60), "batch_size=60 must be a positive multiple of the 8 devices"),
        (dict(distill__temperature=0.0), "distill.temperature=0.0 must be > 0"),
        (dict(distill__temperature=-1.0), "distill.temperature=-1.0 must be > 0"),
        (dict(distill__alpha=1.5), r"distill.alpha=1.5 must lie in \[0, 1\]"),
        (dict(distill__loss="l7"), "Unknown `loss`"),
        (dict(optimizer="lamb"), "optimizer='lamb' is unknown"),
        (dict(steps=0), "steps=0 must be positive"),
    ],
)
def test_bad_config_stops_before_training(tmp_path, data_dir, overrides, match):
    config = _tiny(digits, data_dir, **overrides)
    with pytest.raises(ValueError, match=match):
        train.train_and_evaluate(config, str(tmp_path / "run"))
    assert not (tmp_path / "run").exists()


def test_bad_config_from_the_command_line_exits_with_a_message(tmp_path):
    completed = subprocess.run(
        [
            sys.executable,
            "-m",
            "experiments.distill",
            "--config=experiments/configs/digits.py:quick",
            "--config.distill.temperature=0",
            f"--workdir={tmp_path / 'run'}",
        ],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert completed.returncode == 2
    assert "distill.temperature=0" in completed.stderr
    assert not (tmp_path / "run").exists()


def test_unknown_config_argument():
    with pytest.raises(ValueError, match="Unknown config argument 'fast'"):
        digits.get_config("fast")


ONE_STEP = dict(steps=1, teacher__steps=1, eval_every=1, log_every=1, checkpoint_every=1)


@pytest.mark.parametrize("module", [digits, mnist1d], ids=["digits", "mnist1d"])
def test_offline_config_one_step(tmp_path, data_dir, module):
    config = _tiny(module, data_dir, **ONE_STEP)
    results = train.train_and_evaluate(config, str(tmp_path))
    assert len(results) == 3
    assert all(np.isfinite(r["accuracy"]) for r in results)


@pytest.mark.parametrize(
    "module", [mnist, fashion_mnist, cifar10, cifar100], ids=lambda m: m.__name__.split(".")[-1]
)
def test_real_dataset_config_one_step_under_mock_data(tmp_path, module):
    config = _tiny(module, None, **ONE_STEP)
    with tfds.testing.mock_data(num_examples=32):
        results = train.train_and_evaluate(config, str(tmp_path))
    assert [r["run"] for r in results] == ["teacher", "scratch", "distilled"]
    assert all(np.isfinite(r["cross_entropy"]) for r in results)


# Resume: kill a run mid-way, restart it, compare with an uninterrupted run. ---------


def _command(workdir, extra=()):
    return [
        sys.executable,
        "-m",
        "experiments.distill",
        "--config=experiments/configs/digits.py:quick",
        "--config.steps=30",
        "--config.teacher.steps=30",
        "--config.checkpoint_every=5",
        "--config.eval_every=15",
        "--config.log_every=5",
        f"--workdir={workdir}",
        *extra,
    ]


def _env(devices=1, data_dir=None):
    env = dict(os.environ)
    env["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={devices}"
    env["JAX_PLATFORMS"] = "cpu"
    env["PYTHONPATH"] = REPO + os.pathsep + env.get("PYTHONPATH", "")
    if data_dir:
        env["TFDS_DATA_DIR"] = data_dir
    return env


def _final_params(workdir, run):
    directory = os.path.join(workdir, "seed_0", run, "checkpoints")
    manager = ocp.CheckpointManager(directory)
    restored = manager.restore(
        manager.latest_step(), args=ocp.args.Composite(state=ocp.args.StandardRestore())
    )
    manager.close()
    return restored["state"]["params"]


@pytest.mark.slow
def test_killed_run_resumes_to_the_same_params(tmp_path, data_dir):
    env = _env(data_dir=data_dir)
    reference = tmp_path / "reference"
    subprocess.run(_command(reference), cwd=REPO, env=env, check=True, timeout=300,
                   capture_output=True)

    interrupted = tmp_path / "interrupted"
    marker = interrupted / "seed_0" / "distilled" / "checkpoints" / "10"
    process = subprocess.Popen(_command(interrupted), cwd=REPO, env=env,
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 300
    while not marker.exists() and process.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    assert process.poll() is None, "the run finished before it could be interrupted"
    process.send_signal(signal.SIGKILL)
    process.wait()
    assert not (interrupted / "seed_0" / "distilled" / "result.json").exists()

    completed = subprocess.run(_command(interrupted), cwd=REPO, env=env, timeout=300,
                               capture_output=True, text=True)
    assert completed.returncode == 0, completed.stderr[-3000:]
    for run in ("teacher", "scratch", "distilled"):
        jax.tree.map(np.testing.assert_array_equal,
                     _final_params(reference, run), _final_params(interrupted, run))
    # The metrics log has each step once, as if nothing had happened.
    lines = (interrupted / "seed_0" / "distilled" / "metrics.jsonl").read_text().splitlines()
    reference_lines = (reference / "seed_0" / "distilled" / "metrics.jsonl").read_text()
    steps = [(json.loads(line)["split"], json.loads(line)["step"]) for line in lines]
    assert steps == [
        (json.loads(line)["split"], json.loads(line)["step"])
        for line in reference_lines.splitlines()
    ]
