"""The experiment runner: end to end, bad configs, every config's smoke run, resume."""

from __future__ import annotations

import json
import subprocess
import sys

import jax
import numpy as np
import pytest
import tensorflow_datasets as tfds
from subprocess_runs import REPO

from experiments import train
from experiments.configs import cifar10, cifar100, digits, fashion_mnist, mnist, mnist1d


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
    # Deep CIFAR models take minutes to compile with full XLA optimization on a
    # 2-core CPU; one step on mock data needs the code path, not fast kernels.
    jax.config.update("jax_disable_most_optimizations", True)
    try:
        with tfds.testing.mock_data(num_examples=32):
            results = train.train_and_evaluate(config, str(tmp_path))
    finally:
        jax.config.update("jax_disable_most_optimizations", False)
    assert [r["run"] for r in results] == ["teacher", "scratch", "distilled"]
    assert all(np.isfinite(r["cross_entropy"]) for r in results)
