"""The teacher-output cache: storage round trips, the manifest, refusals, and the command.

Storage tests write small random records (no model). The command's tests run the
``quick`` LM config on a tiny corpus of generated modules (a few hundred training
windows) with an untrained teacher, and compare the cached records with a float64
reference computed from the teacher's logits.
"""

from __future__ import annotations

import dataclasses
import os
import shutil
import subprocess
import sys

import jax
import ml_dtypes
import numpy as np
import pytest

import jaxkd
from experiments import cache_teacher, jsonfiles, lm_train
from experiments.configs import lm_stdlib
from experiments.data import loader, text
from experiments.data.teacher_cache import (
    LOGITS_KEY,
    TOP_K_KEYS,
    CacheMismatchError,
    CacheSpec,
    TeacherCache,
    TeacherCacheError,
    TeacherCacheWriter,
    params_fingerprint,
)
from experiments.errors import ExperimentError

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
# Relative spacing of each stored dtype: a stored log-prob is within half of it.
EPSILON = {"float16": 2.0**-10, "bfloat16": 2.0**-7, "float32": 0.0}
NUM_RECORDS, SEQ_LEN, K = 10, 4, 5


def _spec(**changes) -> CacheSpec:
    fields = dict(
        teacher_fingerprint="teacher-a",
        dataset_fingerprint="windows-a",
        tokenizer_fingerprint="bpe-a",
        vocab_size=300,
        k=K,
        dtype="float16",
        temperature=2.0,
        seq_len=SEQ_LEN,
        num_records=NUM_RECORDS,
    )
    return CacheSpec(**{**fields, **changes})


def _top_k_records(spec: CacheSpec, seed: int = 0) -> dict[str, np.ndarray]:
    """Random sparse teachers [N, L, k]: distinct ids, decreasing log-probs, a tail."""
    rng = np.random.default_rng(seed)
    shape = (spec.num_records, spec.seq_len)
    ids = np.argsort(rng.random((*shape, spec.vocab_size)), axis=-1)[..., : spec.k]
    log_probs = -np.sort(rng.exponential(3.0, (*shape, spec.k)), axis=-1)
    return {
        TOP_K_KEYS[0]: log_probs.astype(np.float32),
        TOP_K_KEYS[1]: ids.astype(np.int64),
        TOP_K_KEYS[2]: rng.normal(-1.0, 1.0, shape).astype(np.float32),
    }


def _write(path, spec, records, *, records_per_shard=3, chunk=4):
    with TeacherCacheWriter(path, spec, records_per_shard=records_per_shard) as writer:
        for start in range(writer.num_written, spec.num_records, chunk):
            writer.write({key: value[start : start + chunk] for key, value in records.items()})
        return writer.finish()


# Storage.


@pytest.mark.parametrize("dtype", ["float16", "bfloat16", "float32"])
def test_top_k_records_round_trip_within_the_dtype(tmp_path, dtype):
    spec = _spec(dtype=dtype)
    records = _top_k_records(spec)
    cache = _write(tmp_path / "cache", spec, records)
    order = np.array([9, 0, 3, 3, 5, 2, 8])  # across shards, repeated, unsorted
    batch = cache.read(order)
    assert set(batch) == set(TOP_K_KEYS)
    log_probs = batch[TOP_K_KEYS[0]]
    assert log_probs.dtype == np.float32 and log_probs.shape == (7, SEQ_LEN, K)
    expected = records[TOP_K_KEYS[0]][order].astype(np.float64)
    np.testing.assert_allclose(log_probs, expected, rtol=EPSILON[dtype] / 2, atol=0)
    if dtype != "float32":  # the stored values are rounded, not exact
        assert np.any(log_probs != expected)
    indices = batch[TOP_K_KEYS[1]]
    assert indices.dtype == np.int32
    np.testing.assert_array_equal(indices, records[TOP_K_KEYS[1]][order])
    np.testing.assert_array_equal(batch[TOP_K_KEYS[2]], records[TOP_K_KEYS[2]][order])


def test_full_logits_and_large_vocabularies_round_trip(tmp_path):
    full = _spec(k=None, temperature=None, dtype="bfloat16", vocab_size=7)
    logits = np.random.default_rng(1).normal(0, 5, (NUM_RECORDS, SEQ_LEN, 7)).astype(np.float32)
    logits[0, 0, 3] = -np.inf  # a masked vocabulary entry survives
    cache = _write(tmp_path / "full", full, {LOGITS_KEY: logits})
    read = cache.read(np.arange(NUM_RECORDS))[LOGITS_KEY]
    np.testing.assert_array_equal(read, logits.astype(ml_dtypes.bfloat16).astype(np.float32))
    assert cache.manifest["index_dtype"] is None
    # Ids past uint16 are stored as int32, exactly.
    large = _spec(vocab_size=70_000)
    records = _top_k_records(large)
    records[TOP_K_KEYS[1]][0, 0, 0] = 69_999
    cache = _write(tmp_path / "large", large, records)
    assert cache.manifest["index_dtype"] == "int32"
    np.testing.assert_array_equal(
        cache.read(np.arange(NUM_RECORDS))[TOP_K_KEYS[1]], records[TOP_K_KEYS[1]]
    )
    assert _spec().index_dtype == "uint16"


def test_manifest_records_the_spec_shards_and_measured_bytes_per_token(tmp_path):
    spec = _spec(augmentation_seed=7)
    cache = _write(tmp_path / "cache", spec, _top_k_records(spec))
    manifest = cache.manifest
    for field in dataclasses.fields(CacheSpec):
        assert manifest[field.name] == getattr(spec, field.name), field.name
    assert manifest["format"] == "jaxkd-teacher-cache" and manifest["format_version"] == 1
    assert cache.augmentation_seed == 7
    assert [shard["num_records"] for shard in manifest["shards"]] == [3, 3, 3, 1]
    sizes = [os.path.getsize(tmp_path / "cache" / shard["file"]) for shard in manifest["shards"]]
    assert [shard["bytes"] for shard in manifest["shards"]] == sizes
    assert manifest["bytes"] == sum(sizes)
    assert cache.bytes_per_token == sum(sizes) / (NUM_RECORDS * SEQ_LEN)
    # float16 log-probs, uint16 ids, float32 tail: 2k + 2k + 4 bytes per token.
    assert manifest["record_bytes"] == SEQ_LEN * (4 * K + 4)
    assert sorted(os.listdir(tmp_path)) == ["cache"]  # no .partial left


@pytest.mark.parametrize(
    "field, value",
    [
        ("teacher_fingerprint", "teacher-b"),
        ("dataset_fingerprint", "windows-b"),
        ("tokenizer_fingerprint", "bytes-v1"),
        ("vocab_size", 512),
        ("k", 8),
        ("temperature", 1.0),
        ("seq_len", 64),
        ("dtype", "bfloat16"),
        ("augmentation_seed", 3),
    ],
)
def test_a_cache_made_for_another_run_is_refused_naming_the_field(tmp_path, field, value):
    spec = _spec()
    _write(tmp_path / "cache", spec, _top_k_records(spec))
    expect = {**spec.identity(), field: value}
    with pytest.raises(CacheMismatchError) as error:
        TeacherCache.open(tmp_path / "cache", expect=expect)
    message = str(error.value)
    assert f"{field}: the cache has {getattr(spec, field)!r}, expected {value!r}" in message
    assert message.count("the cache has") == 1  # only the changed field
    TeacherCache.open(tmp_path / "cache", expect=spec.identity())  # the same run is fine


def test_missing_unfinished_damaged_or_foreign_caches_are_refused(tmp_path):
    spec = _spec()
    records = _top_k_records(spec)
    with pytest.raises(TeacherCacheError, match="No teacher cache"):
        TeacherCache.open(tmp_path / "nothing")
    with TeacherCacheWriter(tmp_path / "cache", spec, records_per_shard=3) as writer:
        writer.write({key: value[:4] for key, value in records.items()})
    with pytest.raises(TeacherCacheError, match="unfinished write"):
        TeacherCache.open(tmp_path / "cache")
    with pytest.raises(TypeError, match="unknown fields \\['kk'\\]"):
        TeacherCache.open(tmp_path / "cache", expect={"kk": 3})
    cache = _write(tmp_path / "cache", spec, records)
    shard = os.path.join(cache.path, cache.manifest["shards"][1]["file"])
    with open(shard, "r+b") as f:
        f.truncate(100)
    with pytest.raises(TeacherCacheError, match="100 bytes on disk"):
        TeacherCache.open(cache.path)
    manifest = dict(cache.manifest, format_version=99)
    jsonfiles.write(os.path.join(cache.path, "manifest.json"), manifest)
    with pytest.raises(TeacherCacheError, match="format_version: the cache has 99, expected 1"):
        TeacherCache.open(cache.path)


def test_an_interrupted_write_resumes_from_its_finished_shards(tmp_path):
    spec = _spec()
    records = _top_k_records(spec)
    path = tmp_path / "cache"
    with TeacherCacheWriter(path, spec, records_per_shard=3) as writer:
        writer.write({key: value[:7] for key, value in records.items()})  # 2 shards and 1 record
    with TeacherCacheWriter(path, spec, records_per_shard=3) as writer:
        assert writer.num_written == 6
    resumed = _write(path, spec, records)
    np.testing.assert_array_equal(
        resumed.read(np.arange(NUM_RECORDS))[TOP_K_KEYS[2]], records[TOP_K_KEYS[2]]
    )
    # A partial write for another spec is discarded, not resumed.
    with TeacherCacheWriter(tmp_path / "other", spec, records_per_shard=3) as writer:
        writer.write({key: value[:7] for key, value in records.items()})
    with TeacherCacheWriter(tmp_path / "other", _spec(k=4), records_per_shard=3) as writer:
        assert writer.num_written == 0


def test_bad_records_specs_and_indices_raise_naming_the_argument(tmp_path):
    spec = _spec()
    records = _top_k_records(spec)
    writer = TeacherCacheWriter(tmp_path / "cache", spec)
    bad_shape = {**records, TOP_K_KEYS[2]: records[TOP_K_KEYS[2]][:, :2]}
    with pytest.raises(ValueError, match=r"teacher_top_k_log_tail must have shape \[B, 4\]"):
        writer.write(bad_shape)
    bad_ids = {key: value.copy() for key, value in records.items()}
    bad_ids[TOP_K_KEYS[1]][3, 1, 2] = 300
    with pytest.raises(ValueError, match=r"\[0, vocab_size=300\), got ids from 0 to 300"):
        writer.write(bad_ids)
    with pytest.raises(ValueError, match="must have the keys"):
        writer.write({TOP_K_KEYS[0]: records[TOP_K_KEYS[0]]})
    writer.write(records)
    with pytest.raises(ValueError, match="would exceed num_records=10"):
        writer.write({key: value[:1] for key, value in records.items()})
    cache = writer.finish()
    with pytest.raises(IndexError, match=r"\[0, 10\), got 0 to 10"):
        cache.read(np.array([0, 10]))
    with pytest.raises(ValueError, match="1-D integer array"):
        cache.read(np.array([[0, 1]]))
    short = TeacherCacheWriter(tmp_path / "short", spec)
    with pytest.raises(ValueError, match="0 of num_records=10 records written"):
        short.finish()
    for changes, message in [
        ({"k": 301}, "k=301 exceeds vocab_size=300"),
        ({"temperature": 0.0}, "temperature must be > 0"),
        ({"dtype": "int8"}, "dtype must be one of"),
        ({"k": None}, "temperature must be None for full logits"),
        ({"seq_len": 0}, "seq_len must be a positive int"),
    ]:
        with pytest.raises(ValueError, match=message):
            _spec(**changes)


# The command, on the quick config and a tiny corpus.


def _log_softmax(scaled: np.ndarray) -> np.ndarray:
    shifted = scaled - scaled.max(axis=-1, keepdims=True)
    return shifted - np.log(np.sum(np.exp(shifted), axis=-1, keepdims=True))


def _tiny_stdlib(root) -> None:
    """Generated modules: 24 in train, 3 in validation, 3 in test (split by path hash)."""
    wanted = {"train": 24, "validation": 3, "test": 3}
    index = 0
    while any(wanted.values()):
        name = f"module_{index}.py"
        split = text.split_of(name)
        if wanted[split]:
            wanted[split] -= 1
            lines = [
                f"def function_{index}_{j}(value, scale={j}):\n"
                f'    """Returns value times {j} plus {index}."""\n'
                f"    return value * scale + {index * j}\n"
                for j in range(12)
            ]
            (root / name).write_text("\n".join(lines))
        index += 1


def _teacher_apply(experiment):
    return jaxkd.linen_teacher_apply(experiment.models["teacher"], train_kwarg=None)


@pytest.fixture(scope="module")
def cached(tmp_path_factory):
    """The command's cache of an untrained teacher (the runner trains the real one)."""
    root = tmp_path_factory.mktemp("stdlib")
    _tiny_stdlib(root)
    data_dir = str(tmp_path_factory.mktemp("tfds"))
    text.prepare_text("small", data_dir, stdlib_root=root)  # then reused by the runner
    config = lm_stdlib.get_config("quick")
    config.data_dir = data_dir
    config.kd.temperature = 2.0
    config.cache.k = 16
    config.cache.batch_size = 64
    config.update(steps=1, warmup_steps=0, schedule="constant")  # a one-step student
    experiment = lm_train.LmExperiment(config, str(tmp_path_factory.mktemp("lm")))
    tokens = loader.read(experiment.data.train, np.arange(2), keys=("tokens",))["tokens"]
    teacher_variables = jax.jit(experiment.models["teacher"].init)(
        jax.random.key(0), tokens[:, :-1]
    )
    cache = cache_teacher.experiment_cache(experiment, teacher_variables, progress=False)
    return experiment, teacher_variables, cache


def test_the_cache_holds_the_teachers_top_k_of_every_training_window(cached):
    experiment, teacher_variables, cache = cached
    windows = experiment.data.train
    assert cache.path == os.path.join(experiment.workdir, "teacher_cache", "k16")
    assert len(cache) == len(windows) > 64  # more than one batch: the last one is padded
    spec = cache.spec
    assert spec.teacher_fingerprint == params_fingerprint(teacher_variables)
    assert spec.tokenizer_fingerprint == experiment.data.tokenizer.fingerprint
    assert (spec.k, spec.temperature, spec.seq_len) == (16, 2.0, experiment.config.seq_len)
    indices = np.array([0, 63, 64, len(windows) - 1])
    tokens = loader.read(windows, indices, keys=("tokens",))["tokens"]
    logits = jax.jit(_teacher_apply(experiment))(teacher_variables, tokens[:, :-1])
    log_p = _log_softmax(np.asarray(logits, np.float64) / 2.0)
    batch = cache.read(indices)
    ids = batch[TOP_K_KEYS[1]]
    assert np.all(np.diff(np.sort(ids, axis=-1), axis=-1) > 0)  # distinct per token
    eps = EPSILON["float16"] / 2
    stored = batch[TOP_K_KEYS[0]]
    np.testing.assert_allclose(stored, np.take_along_axis(log_p, ids, -1), rtol=eps, atol=1e-6)
    top = -np.sort(-log_p, axis=-1)[..., :16]
    np.testing.assert_allclose(stored, top, rtol=eps, atol=1e-6)
    outside = np.ones(log_p.shape, bool)
    np.put_along_axis(outside, ids, False, axis=-1)
    tail = np.log(np.sum(np.where(outside, np.exp(log_p), 0.0), axis=-1))
    np.testing.assert_allclose(batch[TOP_K_KEYS[2]], tail, rtol=1e-5)


def test_a_matching_cache_is_reused_and_another_refused_or_rebuilt(cached, tmp_path):
    experiment, teacher_variables, cache = cached
    shard = os.path.join(cache.path, cache.manifest["shards"][0]["file"])
    written = os.stat(shard).st_mtime_ns
    again = cache_teacher.experiment_cache(experiment, teacher_variables, progress=False)
    assert again.manifest == cache.manifest and os.stat(shard).st_mtime_ns == written
    # Another teacher, same settings: refused naming the field, rebuilt with overwrite.
    path = str(tmp_path / "k16")
    shutil.copytree(cache.path, path)
    other = jax.tree.map(lambda leaf: leaf * 0.5, teacher_variables)
    spec = dataclasses.replace(cache.spec, teacher_fingerprint=params_fingerprint(other))
    args = (path, spec, experiment.data.train, _teacher_apply(experiment), other)
    with pytest.raises(CacheMismatchError, match="teacher_fingerprint: the cache has") as error:
        cache_teacher.ensure_cache(*args, batch_size=64, progress=False)
    assert "--overwrite" in str(error.value)
    rebuilt = cache_teacher.ensure_cache(*args, batch_size=64, overwrite=True, progress=False)
    assert rebuilt.spec == spec and rebuilt.manifest["bytes"] > 0
    assert not os.path.exists(f"{path}.partial")


def test_kd_cached_batches_carry_the_teacher_of_their_own_windows(cached):
    experiment, teacher_variables, cache = cached
    teacher = (_teacher_apply(experiment), teacher_variables)
    source, keys, transform = experiment.train_source("kd_cached", teacher)
    dataset = loader.train_dataset(
        source, global_batch_size=8, seed=3, keys=keys, transform=transform
    )
    batch = dataset[5]  # shuffled windows of a later step
    assert set(batch) == {"inputs", "targets", "mask", *TOP_K_KEYS}
    logits = jax.jit(teacher[0])(teacher_variables, batch["inputs"])
    log_p = _log_softmax(np.asarray(logits, np.float64) / 2.0)
    np.testing.assert_allclose(
        batch[TOP_K_KEYS[0]],
        np.take_along_axis(log_p, batch[TOP_K_KEYS[1]], -1),
        rtol=EPSILON["float16"] / 2,
        atol=1e-6,
    )


def test_a_kd_cached_run_trains_from_the_cache_and_reports_beside_kd(cached):
    experiment, teacher_variables, cache = cached
    teacher = (_teacher_apply(experiment), teacher_variables)
    result, _ = experiment.run("kd_cached", 0, teacher)
    assert result["run"] == "kd_cached" and result["steps"] == 1
    assert np.isfinite(result["perplexity"]) and np.isfinite(result["kl"])
    assert result["cache_k"] == 16 and result["cache_bytes_per_token"] == cache.bytes_per_token
    rundir = experiment.rundir("kd_cached", 0)
    (train,) = [r for r in jsonfiles.read_lines(f"{rundir}/metrics.jsonl") if r["split"] == "train"]
    assert np.isfinite(train["kd_loss"]) and train["kd_loss"] > 0
    fields = jsonfiles.read(f"{rundir}/run_config.json")
    assert fields["cache.k"] == 16 and fields["kd.temperature"] == 2.0
    text_out = lm_train.write_report(
        [result], experiment.config, experiment.workdir, experiment.data.tokens
    )
    assert f"| {lm_train.CACHED_RUN_TITLE} |" in text_out
    assert f"cached top-16 log-probs (float16, {cache.bytes_per_token:.1f} bytes/token" in text_out


def test_the_command_refuses_a_workdir_without_a_teacher(tmp_path):
    env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=REPO)
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "experiments.cache_teacher",
            "--config=experiments/configs/lm_stdlib.py:quick",
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
    assert "No trained teacher" in result.stderr
    assert "python -m experiments.distill_lm" in result.stderr
    assert not (tmp_path / "empty").exists()


def test_the_command_rejects_a_bad_config(tmp_path):
    config = lm_stdlib.get_config("quick")
    config.batch_size = 3
    with pytest.raises(ExperimentError, match="batch_size=3"):
        cache_teacher.cache_teacher(config, str(tmp_path / "run"))


@pytest.mark.parametrize(
    "field, value, message",
    [
        ("student_runs", ("kd", "distill"), "student_runs=\\('kd', 'distill'\\)"),
        ("cache.k", -1, "cache.k=-1 must be >= 0"),
        ("cache.dtype", "int8", "cache.dtype='int8'"),
        ("cache.loss", "mse", "cache.loss='mse'"),
    ],
)
def test_bad_cache_settings_are_refused_before_anything_runs(tmp_path, field, value, message):
    config = lm_stdlib.get_config("quick")
    node, *leaf = field.split(".")
    if leaf:
        config[node][leaf[0]] = value
    else:
        config[node] = value
    with pytest.raises(ExperimentError, match=message):
        lm_train.train_and_evaluate(config, str(tmp_path / "run"))
    assert not (tmp_path / "run").exists()


def test_only_kd_cached_depends_on_the_cache_settings():
    config = lm_stdlib.get_config("quick")

    def fields():
        return {
            kind: lm_train.run_fields(config, kind, 0, "corpus") for kind in lm_train.STUDENT_RUNS
        }

    before = fields()
    config.cache.batch_size = 7  # speed only
    assert fields() == before
    config.cache.k = 8
    after = fields()
    assert after["kd_cached"]["cache.k"] == 8 and before["kd_cached"]["cache.k"] == 32
    assert all(after[kind] == before[kind] for kind in ("scratch", "kd", "gkd"))
