"""The experiment runner: end to end, bad configs and workdirs, every config's smoke run."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys

import jax
import numpy as np
import pytest
import tensorflow_datasets as tfds
from subprocess_runs import REPO, final_params

from experiments import data, models, train
from experiments.configs import cifar10, cifar100, digits, fashion_mnist, mnist, mnist1d
from experiments.errors import ExperimentError
from experiments.run_config import StaleRunError


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


# Two seeds of a short digits run, shared by the tests that read or rerun a finished workdir.
FINISHED = dict(seeds=(0, 1), steps=20, teacher__steps=20, eval_every=10, checkpoint_every=10)


@pytest.fixture(scope="module")
def finished(tmp_path_factory, data_dir):
    """``(config, workdir, results)`` of a finished run; tests copy it before changing it."""
    workdir = tmp_path_factory.mktemp("finished")
    config = _tiny(digits, data_dir, **FINISHED)
    return config, workdir, train.train_and_evaluate(config, str(workdir))


def _copy(workdir, tmp_path):
    copy = tmp_path / "copy"
    shutil.copytree(workdir, copy)
    return copy


def _strict_json(path):
    def refuse(constant):
        raise ValueError(f"{path} holds {constant}, which is not JSON")

    return json.loads(path.read_text(), parse_constant=refuse)


def test_digits_quick_writes_results(finished):
    _, workdir, results = finished
    assert [r["run"] for r in results] == ["teacher", "scratch", "distilled"] * 2
    for name in ("results.md", "results.json", "training_curves.png", "config.json"):
        assert (workdir / name).exists(), name
    table = (workdir / "results.md").read_text()
    for title in ("teacher", "student from scratch", "distilled student", "FLOPs/example"):
        assert title in table
    for title in ("validation accuracy", "test accuracy", "compile time (s)", "train time (s)"):
        assert f"| {title} |" in table
    assert "1,293 train / 144 validation / 360 test" in table
    summary = _strict_json(workdir / "results.json")["summary"]
    assert summary["distilled"]["params"]["mean"] == summary["scratch"]["params"]["mean"]
    assert summary["teacher"]["params"]["mean"] > summary["scratch"]["params"]["mean"]
    assert summary["teacher"]["flops_per_example"]["mean"] > 0
    assert 0.0 <= summary["distilled"]["agreement"]["mean"] <= 1.0
    assert 0.0 <= summary["distilled"]["validation_accuracy"]["mean"] <= 1.0
    # A teacher has no agreement with itself: NaN in memory, null in strict JSON.
    assert summary["teacher"]["agreement"]["mean"] is None
    assert summary["teacher"]["mutual_information"]["mean"] is None
    assert 0.0 <= summary["distilled"]["normalized_mutual_information"]["mean"] <= 1.0
    assert "| MI(teacher; student) (nats) | normalized MI |" in table
    records = [
        json.loads(line)
        for line in (workdir / "seed_0" / "distilled" / "metrics.jsonl").read_text().splitlines()
    ]
    assert [(r["split"], r["step"]) for r in records if r["split"] != "train"] == [
        ("validation", 10),
        ("test", 10),
        ("validation", 20),
        ("test", 20),
    ]
    first_train = next(r for r in records if r["split"] == "train")
    assert {"loss", "kd_loss", "ce_loss", "agreement", "grad_norm"} <= set(first_train)
    for result in results:
        _strict_json(workdir / f"seed_{result['seed']}" / result["run"] / "result.json")


def test_train_time_excludes_compilation(finished):
    _, _, results = finished
    for result in results:
        # Every run compiles its own step, ahead of time and outside the timer:
        # 20 steps of these MLPs take a fraction of the time compiling one does,
        # and a train time that included the compile could not be below it.
        assert result["compile_time_s"] > 0, result
        assert result["train_time_s"] < result["compile_time_s"], result


def _log_softmax(logits):
    shifted = logits - logits.max(axis=-1, keepdims=True)
    return shifted - np.log(np.exp(shifted).sum(axis=-1, keepdims=True))


def test_kl_column_is_the_plain_kl_at_temperature_one(finished):
    config, workdir, results = finished
    distilled = next(r for r in results if r["run"] == "distilled" and r["seed"] == 0)
    assert config.distill.temperature == 4.0
    test = data.load_split("digits", "test", config.data_dir)
    logits = {}
    for run, role in (("teacher", "teacher"), ("distilled", "student")):
        kwargs = dict(config[role].model_kwargs)
        kwargs["hidden_sizes"] = tuple(kwargs["hidden_sizes"])
        model = models.get_model(config[role].model, 10, **kwargs)
        params = final_params(workdir, run)
        logits[run] = np.asarray(model.apply({"params": params}, test["image"], train=False))
    log_p = {run: _log_softmax(value.astype(np.float64)) for run, value in logits.items()}
    kl = np.sum(np.exp(log_p["teacher"]) * (log_p["teacher"] - log_p["distilled"]), axis=-1)
    np.testing.assert_allclose(distilled["kl"], kl.mean(), rtol=1e-4)
    assert "| KL(teacher ‖ student) at T=1 |" in (workdir / "results.md").read_text()


def test_changed_config_is_refused_naming_the_fields(tmp_path, finished):
    config, workdir, _ = finished
    copy = _copy(workdir, tmp_path)
    before = (copy / "results.json").read_text()
    changed = config.copy_and_resolve_references()
    changed.distill.temperature = 2.0
    changed.steps = 30
    with pytest.raises(StaleRunError) as error:
        train.train_and_evaluate(changed, str(copy))
    message = str(error.value)
    assert (
        "seed_0/distilled, seed_1/distilled: distill.temperature: 4.0 -> 2.0; steps: 20 -> 30"
        in message
    )
    assert "seed_0/scratch, seed_1/scratch: steps: 20 -> 30" in message
    assert "teacher" not in message  # the teacher depends on no changed field
    assert "--overwrite" in message
    assert (copy / "results.json").read_text() == before


def test_changed_config_from_the_command_line_exits_with_a_message(tmp_path, finished):
    config, workdir, _ = finished
    copy = _copy(workdir, tmp_path)
    completed = subprocess.run(
        [
            sys.executable,
            "-m",
            "experiments.distill",
            "--config=experiments/configs/digits.py:quick",
            f"--config.data_dir={config.data_dir}",
            "--config.steps=20",
            "--config.teacher.steps=50",
            f"--workdir={copy}",
        ],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert completed.returncode == 2, completed.stderr[-3000:]
    assert "seed_0/teacher, seed_0/scratch, seed_0/distilled: teacher.steps: 20 -> 50" in (
        completed.stderr
    )
    assert "Traceback" not in completed.stderr


def test_overwrite_trains_the_changed_runs_again_and_keeps_the_others(tmp_path, finished):
    config, workdir, results = finished
    copy = _copy(workdir, tmp_path)
    kept = {
        run: (copy / "seed_0" / run / "result.json").read_text() for run in ("teacher", "scratch")
    }
    changed = config.copy_and_resolve_references()
    changed.distill.temperature = 2.0
    again = train.train_and_evaluate(changed, str(copy), overwrite=True)
    for run, text in kept.items():  # they depend on no changed field
        assert (copy / "seed_0" / run / "result.json").read_text() == text
    old, new = (
        next(r for r in rs if r["run"] == "distilled" and r["seed"] == 0) for rs in (results, again)
    )
    assert new["accuracy"] != old["accuracy"] or new["kl"] != old["kl"]
    records = (copy / "seed_0" / "distilled" / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(r)["temperature"] for r in records if '"train"' in r] == [2.0]
    assert "T=2.0" in (copy / "results.md").read_text()


def test_workdir_that_is_a_file_is_refused(tmp_path, data_dir):
    path = tmp_path / "results"
    path.write_text("not a directory")
    with pytest.raises(ExperimentError, match="is an existing file, not a directory"):
        train.train_and_evaluate(_tiny(digits, data_dir), str(path))


def _fake_split(num_examples, offset=0):
    """Digits-shaped arrays whose every pixel is the example's id ``offset + i``."""
    ids = offset + np.arange(num_examples, dtype=np.float32)
    images = np.broadcast_to(ids[:, None, None, None], (num_examples, 8, 8, 1)).copy()
    return {"image": images, "label": np.arange(num_examples, dtype=np.int32) % 10}


def test_training_never_sees_the_validation_examples(monkeypatch, data_dir):
    splits = {"train": _fake_split(200), "test": _fake_split(50, offset=1000)}
    monkeypatch.setattr(data, "load_split", lambda name, split, *a, **k: splits[split])
    experiment = train.Experiment(_tiny(digits, data_dir, batch_size=16), "/nonexistent")
    validation = experiment.eval_arrays["validation"]["image"][:, 0, 0, 0]
    assert len(validation) == 20 and set(experiment.eval_arrays) == {"validation", "test"}
    loader = experiment.loader(seed=0)
    seen = np.concatenate(
        [next(loader)["image"][:, 0, 0, 0] for _ in range(loader.batches_per_epoch)]
    )
    assert not set(seen) & set(validation)
    assert set(experiment.train_arrays["image"][:, 0, 0, 0]) | set(validation) == set(range(200))
    assert experiment.data_sizes == {"train": 180, "validation": 20, "test": 50}
    # The same split for every run seed and every process.
    again = train.Experiment(_tiny(digits, data_dir, batch_size=16), "/nonexistent")
    np.testing.assert_array_equal(again.eval_arrays["validation"]["image"][:, 0, 0, 0], validation)


def test_out_of_range_labels_stop_before_training(tmp_path, monkeypatch, data_dir):
    splits = {"train": _fake_split(200), "test": _fake_split(50)}
    splits["train"]["label"][[3, 7, 9]] = [-1, 12, 12]
    monkeypatch.setattr(data, "load_split", lambda name, split, *a, **k: splits[split])
    with pytest.raises(
        ExperimentError, match=r"'digits/train' split has 3 labels outside \[0, 10\): -1, 12"
    ):
        train.train_and_evaluate(_tiny(digits, data_dir, batch_size=16), str(tmp_path))
    assert not list(tmp_path.glob("seed_*"))


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
    # The teacher and the distilled student: the student from scratch runs the
    # teacher's code path (labels alone), which the offline configs cover.
    config = _tiny(module, None, student_runs=("distilled",), **ONE_STEP)
    # Deep CIFAR models take minutes to compile with full XLA optimization on a
    # 2-core CPU; one step on mock data needs the code path, not fast kernels.
    jax.config.update("jax_disable_most_optimizations", True)
    try:
        with tfds.testing.mock_data(num_examples=32):
            results = train.train_and_evaluate(config, str(tmp_path))
    finally:
        jax.config.update("jax_disable_most_optimizations", False)
    assert [r["run"] for r in results] == ["teacher", "distilled"]
    assert all(np.isfinite(r["cross_entropy"]) for r in results)
