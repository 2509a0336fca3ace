"""The teacher cache of a classifier: per example, read with the training split.

One short digits run (plain SGD, as ``subprocess_runs.SHORT_RUN``) trains a
teacher, the online ``distilled`` student and ``distilled_cached``, which writes
the cache and trains from it; the other tests read that workdir.
"""

from __future__ import annotations

import dataclasses
import os
import subprocess
import sys

import jax
import numpy as np
import pytest
from subprocess_runs import REPO, final_params

from experiments import cache_teacher, data, jsonfiles, train
from experiments.configs import digits
from experiments.data.teacher_cache import (
    LOGITS_KEY,
    TOP_K_KEYS,
    CacheMismatchError,
    params_fingerprint,
)
from experiments.errors import ExperimentError

SHORT = dict(
    steps=8,
    optimizer="sgd",
    momentum=0.0,
    learning_rate=0.2,
    eval_every=8,
    log_every=1,
    checkpoint_every=0,
    student_runs=("distilled", "distilled_cached"),
)


def _config(data_dir, **overrides):
    config = digits.get_config("quick")
    config.data_dir = data_dir
    config.update(SHORT)
    config.teacher.update(steps=8, learning_rate=0.2)
    config.update(overrides)
    return config


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """``(config, workdir, results, experiment, teacher)`` of the short run."""
    config = _config(str(tmp_path_factory.mktemp("tfds")))
    workdir = str(tmp_path_factory.mktemp("digits"))
    results = train.train_and_evaluate(config, workdir)
    experiment = train.Experiment(config, workdir)
    _, teacher = experiment.teacher(0)  # the finished teacher, loaded
    return config, workdir, results, experiment, teacher


def _cache_dir(workdir, seed=0, name="full"):
    return os.path.join(workdir, f"seed_{seed}", "teacher_cache", name)


def test_distilled_cached_trains_exactly_as_distilled(trained):
    _, workdir, results, _, _ = trained
    assert [r["run"] for r in results] == ["teacher", "distilled", "distilled_cached"]
    online, cached = (final_params(workdir, run) for run in ("distilled", "distilled_cached"))
    jax.tree.map(np.testing.assert_array_equal, online, cached)
    assert jax.tree.leaves(online)[0].shape  # params, not an empty tree

    def train_records(run):
        lines = jsonfiles.read_lines(os.path.join(workdir, "seed_0", run, "metrics.jsonl"))
        return [r for r in lines if r["split"] == "train"]

    # The logged losses may differ in their last bit (XLA fuses the online teacher's
    # logits into the loss's reductions), the gradients do not (the params are equal).
    assert len(train_records("distilled")) == 8
    for a, b in zip(train_records("distilled"), train_records("distilled_cached"), strict=True):
        for key in ("loss", "kd_loss", "ce_loss", "agreement", "teacher_entropy", "grad_norm"):
            np.testing.assert_allclose(a[key], b[key], rtol=1e-6, err_msg=key)
    distilled, distilled_cached = results[1:]
    assert distilled_cached["accuracy"] == distilled["accuracy"]
    assert distilled_cached["kl"] == distilled["kl"]  # evaluated against the online teacher
    assert (distilled_cached["cache_k"], distilled_cached["cache_dtype"]) == (None, "float32")
    assert distilled_cached["cache_bytes_per_example"] > 0
    fields = jsonfiles.read(os.path.join(workdir, "seed_0", "distilled_cached", "run_config.json"))
    assert (fields["cache.k"], fields["cache.dtype"]) == (0, "float32")
    assert fields["distill.temperature"] == 4.0


def test_the_cache_holds_the_teachers_logits_on_the_training_split(trained):
    config, workdir, _, experiment, (teacher_apply, teacher_variables) = trained
    shard = os.path.join(_cache_dir(workdir), "records-00000-of-00001.array_record")
    written = os.stat(shard).st_mtime_ns
    (cache,) = cache_teacher.cache_teacher(config, workdir)  # the runner's, reused
    assert cache.path == _cache_dir(workdir) and os.stat(shard).st_mtime_ns == written
    spec = cache.spec
    assert spec.num_records == experiment.data_sizes["train"] == 1293  # validation held out
    assert (spec.seq_len, spec.vocab_size, spec.k, spec.dtype) == (None, 10, None, "float32")
    assert (spec.temperature, spec.tokenizer_fingerprint, spec.augmentation_seed) == (None,) * 3
    assert spec.teacher_fingerprint == params_fingerprint(jax.device_get(teacher_variables))
    assert spec.dataset_fingerprint.startswith("digits/train without its validation_fraction=0.1")
    assert cache.bytes_per_record == cache.manifest["bytes"] / 1293
    assert "bytes/example" in cache_teacher.describe(cache)
    # Record i is the teacher's logits on training example i, in the split's order.
    logits = cache.read(np.arange(len(cache)))[LOGITS_KEY]
    images = experiment.train_inputs(np.arange(len(cache)))
    expected = jax.jit(teacher_apply)(jax.device_get(teacher_variables), images)
    np.testing.assert_allclose(logits, expected, rtol=1e-5, atol=1e-5)
    # The cached loader's batch k: TrainLoader's batch k, with those examples' records.
    plain = experiment.loader(seed=0)
    with_teacher = experiment.loader(seed=0, teacher_cache=cache)
    step = plain.batches_per_epoch + 3  # the second epoch's order
    batch, expected_batch = with_teacher.dataset[step], plain.dataset[step]
    assert set(batch) == {"image", "label", LOGITS_KEY}
    for key in ("image", "label"):
        np.testing.assert_array_equal(batch[key], expected_batch[key])
    indices = plain.global_indices(1, 3)
    np.testing.assert_array_equal(batch[LOGITS_KEY], logits[indices])
    plain.close()
    with_teacher.close()


def test_a_cache_for_another_teacher_dataset_or_num_classes_is_refused(
    trained, tmp_path, monkeypatch
):
    config, workdir, _, experiment, (teacher_apply, teacher_variables) = trained
    other_teacher = (teacher_apply, jax.tree.map(lambda leaf: leaf * 0.5, teacher_variables))
    with pytest.raises(CacheMismatchError) as error:
        cache_teacher.classification_cache(experiment, 0, other_teacher, progress=False)
    message = str(error.value)
    assert "teacher_fingerprint: the cache has" in message and "--overwrite" in message
    assert "dataset_fingerprint" not in message
    # Another number of classes (another dataset's head), same teacher and examples.
    twelve_classes = dataclasses.replace(experiment.spec, num_classes=12)
    monkeypatch.setattr(experiment, "spec", twelve_classes)
    with pytest.raises(CacheMismatchError) as error:
        cache_teacher.classification_cache(experiment, 0, (teacher_apply, teacher_variables))
    assert "vocab_size: the cache has 10, expected 12 (the number of classes)" in str(error.value)
    monkeypatch.undo()
    # Another dataset (other examples of the same shape), with the cache at its path.
    os.makedirs(tmp_path / "seed_0" / "teacher_cache")
    os.symlink(_cache_dir(workdir), tmp_path / "seed_0" / "teacher_cache" / "full")
    rng = np.random.default_rng(0)
    splits = {
        split: {
            "image": rng.integers(0, 17, (size, 8, 8, 1)).astype(np.float32),
            "label": rng.integers(0, 10, size).astype(np.int32),
        }
        for split, size in (("train", 200), ("test", 50))
    }
    monkeypatch.setattr(data, "load_split", lambda name, split, *a, **k: splits[split])
    other = train.Experiment(config, str(tmp_path))
    with pytest.raises(CacheMismatchError) as error:
        cache_teacher.classification_cache(other, 0, (teacher_apply, teacher_variables))
    message = str(error.value)
    assert "dataset_fingerprint: the cache has 'digits/train" in message
    assert "num_records: the cache has 1293, expected 180" in message
    assert "teacher_fingerprint" not in message


def test_a_top_k_cache_holds_the_teachers_top_k_log_probs(trained, tmp_path):
    config, _, _, _, (teacher_apply, teacher_variables) = trained
    config = config.copy_and_resolve_references()
    config.cache.update(k=3, dtype="float16")
    experiment = train.Experiment(config, str(tmp_path))
    teacher = (teacher_apply, jax.device_get(teacher_variables))
    cache = cache_teacher.classification_cache(experiment, 0, teacher, progress=False)
    assert cache.path == _cache_dir(str(tmp_path), name="k3")
    assert (cache.spec.k, cache.spec.temperature) == (3, 4.0)  # at distill.temperature
    indices = np.array([0, 5, 1292])
    batch = cache.read(indices)
    assert [batch[key].shape for key in TOP_K_KEYS] == [(3, 3), (3, 3), (3,)]
    logits = np.asarray(teacher_apply(teacher[1], experiment.train_inputs(indices)), np.float64)
    shifted = logits / 4.0 - np.max(logits / 4.0, axis=-1, keepdims=True)
    log_p = shifted - np.log(np.sum(np.exp(shifted), axis=-1, keepdims=True))
    np.testing.assert_array_equal(batch[TOP_K_KEYS[1]], np.argsort(-log_p, axis=-1)[:, :3])
    top = np.take_along_axis(log_p, batch[TOP_K_KEYS[1]], -1)
    np.testing.assert_allclose(batch[TOP_K_KEYS[0]], top, rtol=2.0**-11, atol=1e-6)
    # The distilled_cached objective reads it from the loader's batches.
    loader = experiment.loader(seed=0, teacher_cache=cache)
    objective = train.cached_objective(config)
    student_logits = np.zeros((config.batch_size, 10), np.float32)
    loss, metrics = objective(student_logits, None, next(loader), 0)
    loader.close()
    assert np.isfinite(loss) and float(metrics["kd_loss"]) > 0


@pytest.mark.parametrize(
    "overrides, message",
    [
        (dict(student_runs=("distilled", "kd")), "student_runs=\\('distilled', 'kd'\\)"),
        (dict(student_runs=()), "student_runs=\\(\\)"),
        (dict(cache__k=11), r"cache.k=11 must lie in \[0, 10\]"),
        (dict(cache__dtype="int8"), "cache.dtype='int8'"),
        (dict(cache__batch_size=-1), "cache.batch_size=-1"),
        (dict(cache__loss="mse"), "cache.loss='mse'"),
    ],
)
def test_bad_cache_settings_are_refused_before_anything_runs(tmp_path, overrides, message):
    config = _config(str(tmp_path / "tfds"))
    for name, value in overrides.items():
        node, *leaf = name.split("__")
        if leaf:
            config[node][leaf[0]] = value
        else:
            config[node] = value
    for run in (train.train_and_evaluate, cache_teacher.cache_teacher):
        with pytest.raises(ExperimentError, match=message):
            run(config, str(tmp_path / "run"))
    assert not (tmp_path / "run").exists()


def test_the_command_refuses_a_workdir_without_a_teacher(tmp_path):
    env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=REPO)
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "experiments.cache_teacher",
            "--config=experiments/configs/digits.py:quick",
            f"--workdir={tmp_path / 'empty'}",
            "--train_teacher=false",
        ],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 2, result.stderr
    assert "No trained teacher for seed(s) [0]" in result.stderr
    assert "python -m experiments.distill --config=CONFIG" in result.stderr
    assert not (tmp_path / "empty").exists()
