"""Caches a teacher's outputs on every training example, for distillation without it.

Language models (per token of every training window)::

    .venv/bin/python -m experiments.cache_teacher \\
        --config=experiments/configs/lm_stdlib.py:quick --workdir=/tmp/jaxkd-runs/lm-quick

loads the teacher of ``WORKDIR`` (the one :mod:`experiments.distill_lm` trains under
``WORKDIR/teacher/``; trained first when missing, unless ``--train_teacher=false``),
runs it over every training window in batches of ``config.cache.batch_size``
(one compiled forward, data-parallel over the local devices) and writes, under
``WORKDIR/teacher_cache/k<k>/`` (``full/`` for ``config.cache.k=0``), the teacher's
top-k log-probabilities at ``config.kd.temperature``, their indices and the log tail
mass per token (:mod:`experiments.data.teacher_cache`), then prints the bytes per
token. Record ``i`` is window ``i`` of the training windows.

Classifiers (per example)::

    .venv/bin/python -m experiments.cache_teacher \\
        --config=experiments/configs/digits.py:quick --workdir=/tmp/jaxkd-runs/digits-quick

does the same for every seed's teacher of :mod:`experiments.distill`
(``WORKDIR/seed_<s>/teacher/``), over the runner's training split (the validation
examples held out, in the split's stored order: record ``i`` is example ``i`` of
``train.Experiment.train_arrays``), writing under ``WORKDIR/seed_<s>/teacher_cache/``
the full logits (``config.cache.k=0``, the default: few classes) or the top-k
log-probabilities at ``config.distill.temperature``. The ``distilled_cached`` run
of :mod:`experiments.train` trains from it (and writes it when missing).

The write is atomic (a ``.partial`` directory, renamed when complete) and resumes
from its finished shards when rerun. A cache already there is reused if it matches
the teacher, data, tokenizer and settings, and refused (exit status 2, naming
each field) otherwise, unless ``--overwrite`` rebuilds it. Config overrides work as
for the runner: ``--config.cache.k=8 --config.cache.dtype=bfloat16``.
"""

from __future__ import annotations

import os
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags, logging
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P
from ml_collections import config_flags
from tqdm.auto import tqdm

import jaxkd
from experiments.checks import check_workdir
from experiments.data import loader
from experiments.data.teacher_cache import (
    LOGITS_KEY,
    TOP_K_KEYS,
    CacheMismatchError,
    CacheSpec,
    TeacherCache,
    TeacherCacheWriter,
    arrays_fingerprint,
    packed_windows_fingerprint,
    params_fingerprint,
)
from experiments.errors import ExperimentError, run_command
from experiments.run_config import StaleRunError
from jaxkd.losses._sparse_teacher import top_k_teacher


def cache_path(workdir: str, k: int | None) -> str:
    """``WORKDIR/teacher_cache/k<k>`` (``full`` for the full logits)."""
    return os.path.join(workdir, "teacher_cache", "full" if k is None else f"k{k}")


def is_lm_config(config) -> bool:
    """Whether ``config`` is a language-model config (else a classification one)."""
    return "corpus" in config


def cache_settings(config) -> dict[str, Any]:
    """``k`` (None for 0: full logits), ``dtype`` and ``temperature`` of a config's cache.

    The temperature of top-k log-probs is the distillation's: ``kd.temperature``
    for a language model, ``distill.temperature`` for a classifier.
    """
    k = int(config.cache.k) or None
    kd = config.kd if is_lm_config(config) else config.distill
    return {
        "k": k,
        "dtype": config.cache.dtype,
        "temperature": None if k is None else float(kd.temperature),
    }


def lm_cache_spec(windows, tokenizer, teacher_variables, *, k, dtype, temperature) -> CacheSpec:
    """The spec of a cache of ``teacher_variables``'s outputs on ``windows`` (PackedWindows).

    Raises:
      ExperimentError: settings the cache cannot hold (``k`` above the vocabulary, ...).
    """
    try:
        return CacheSpec(
            teacher_fingerprint=params_fingerprint(teacher_variables),
            dataset_fingerprint=packed_windows_fingerprint(windows),
            tokenizer_fingerprint=tokenizer.fingerprint,
            vocab_size=int(tokenizer.vocab_size),
            k=k,
            dtype=dtype,
            temperature=temperature,
            seq_len=windows.length,
            num_records=len(windows),
            augmentation_seed=None,  # token windows are not augmented
        )
    except ValueError as error:
        raise ExperimentError(f"Bad cache settings (config.cache): {error}") from None


def classification_cache_spec(
    arrays, teacher_variables, *, num_classes, name, k, dtype, temperature
) -> CacheSpec:
    """The spec of a cache of a classifier's outputs on examples ``arrays`` ``{key: [N, ...]}``.

    One record per example, without a token axis (``seq_len=None``); its
    ``vocab_size`` is ``num_classes``. The dataset fingerprint is ``name`` (for
    people reading a mismatch) and :func:`arrays_fingerprint` of ``arrays``: the
    examples and their order. The classification datasets are not augmented:
    ``augmentation_seed`` is None (see :mod:`experiments.data.teacher_cache`).

    Raises:
      ExperimentError: settings the cache cannot hold (``k`` above ``num_classes``, ...).
    """
    count = len(next(iter(arrays.values())))
    try:
        return CacheSpec(
            teacher_fingerprint=params_fingerprint(teacher_variables),
            dataset_fingerprint=f"{name}, {count} examples, sha256 {arrays_fingerprint(arrays)}",
            tokenizer_fingerprint=None,
            vocab_size=int(num_classes),
            k=k,
            dtype=dtype,
            temperature=temperature,
            seq_len=None,
            num_records=count,
            augmentation_seed=None,  # no augmentation in experiments.data
        )
    except ValueError as error:
        raise ExperimentError(f"Bad cache settings (config.cache): {error}") from None


def teacher_outputs_fn(teacher_apply, spec: CacheSpec):
    """``outputs(teacher_variables, inputs [B, ...]) -> {key: [B, ...]}`` in stored dtypes.

    Inputs ``[B, L]`` give ``[B, L, ...]`` per token; a classifier's ``[B, C]`` logits
    give ``[B, ...]`` per example.
    """
    dtype = jnp.dtype(spec.dtype)

    def outputs(teacher_variables, inputs):
        logits = jaxkd.logits_of(teacher_apply(teacher_variables, inputs))
        if spec.k is None:
            return {LOGITS_KEY: logits.astype(dtype)}
        sparse = top_k_teacher(logits, spec.k, temperature=spec.temperature)
        return dict(
            zip(
                TOP_K_KEYS,
                (
                    sparse.log_probs.astype(dtype),
                    sparse.indices.astype(jnp.dtype(spec.index_dtype)),
                    sparse.log_tail.astype(jnp.float32),
                ),
                strict=True,
            )
        )

    return outputs


def write_cache(
    path: str,
    spec: CacheSpec,
    windows,
    teacher_apply,
    teacher_variables,
    **kwargs,
) -> TeacherCache:
    """Runs the LM teacher over every window and writes its outputs to ``path``.

    Args:
      path, spec, teacher_apply, teacher_variables: as for :func:`write_outputs`
        (``spec`` e.g. :func:`lm_cache_spec`).
      windows: random-access ``{"tokens": [L + 1], "mask": [L + 1]}`` windows.
      **kwargs: ``batch_size``, ``mesh``, ``overwrite``, ``progress`` of
        :func:`write_outputs`.
    """

    def read_inputs(indices):
        tokens = loader.read(windows, indices, keys=("tokens",))["tokens"]
        return jaxkd.lm.shift_tokens(tokens)["inputs"].astype(np.int32)

    return write_outputs(
        path, spec, read_inputs, teacher_apply, teacher_variables, unit="window", **kwargs
    )


def write_outputs(
    path: str,
    spec: CacheSpec,
    read_inputs,
    teacher_apply,
    teacher_variables,
    *,
    batch_size: int,
    mesh=None,
    overwrite: bool = False,
    progress: bool = True,
    unit: str = "example",
) -> TeacherCache:
    """Runs the teacher over the inputs of every record and writes its outputs to ``path``.

    Resumes an unfinished write of the same spec. The forward is compiled once
    for batches of ``batch_size`` examples (rounded up to a multiple of the mesh's
    devices; the last batch is padded with example 0 and its padding dropped).

    Args:
      path: the cache directory.
      spec: the cache's :class:`CacheSpec`.
      read_inputs: ``read_inputs(indices int64 [B]) -> inputs [B, ...]``: the teacher's
        inputs of examples ``indices``, as training feeds them (record ``i`` is
        the teacher's outputs on ``read_inputs([i])``).
      teacher_apply: ``teacher_apply(variables, inputs [B, ...]) -> logits [B, ..., V]``.
      teacher_variables: the teacher's variables.
      batch_size: examples per forward pass.
      mesh: a one-axis data mesh; default all devices.
      overwrite: replace a finished cache at ``path``.
      progress: show a tqdm bar.
      unit: what a record is, for the bar.
    """
    if jax.process_count() > 1:
        raise ExperimentError("Write the teacher cache from a single process.")
    mesh = jaxkd.data_mesh() if mesh is None else mesh
    devices = mesh.devices.size
    batch_size = -(-int(batch_size) // devices) * devices
    replicated = NamedSharding(mesh, P())
    teacher_variables = jax.device_put(teacher_variables, replicated)
    inputs_sharding = NamedSharding(mesh, P(mesh.axis_names[0]))
    first = np.asarray(read_inputs(np.zeros(1, np.int64)))
    example = jax.ShapeDtypeStruct(
        (batch_size, *first.shape[1:]), first.dtype, sharding=inputs_sharding
    )
    forward = (
        jax.jit(teacher_outputs_fn(teacher_apply, spec)).lower(teacher_variables, example).compile()
    )
    with TeacherCacheWriter(path, spec) as writer:
        bar = tqdm(
            total=spec.num_records,
            initial=writer.num_written,
            desc=f"caching the teacher ({os.path.basename(path)})",
            unit=unit,
            disable=not progress,
            leave=False,
        )
        with bar:
            for start in range(writer.num_written, spec.num_records, batch_size):
                count = min(batch_size, spec.num_records - start)
                indices = np.zeros(batch_size, np.int64)
                indices[:count] = np.arange(start, start + count)
                inputs = jax.device_put(np.asarray(read_inputs(indices)), inputs_sharding)
                outputs = jax.device_get(forward(teacher_variables, inputs))
                writer.write({key: value[:count] for key, value in outputs.items()})
                bar.update(count)
        return writer.finish(overwrite=overwrite)


def ensure_cache(
    path: str,
    spec: CacheSpec,
    data,
    teacher_apply,
    teacher_variables,
    *,
    write=write_cache,
    **kwargs,
) -> TeacherCache:
    """The cache at ``path`` if it matches ``spec``; else written by ``write``.

    ``write(path, spec, data, teacher_apply, teacher_variables, **kwargs)`` is
    :func:`write_cache` (``data``: the LM windows) or :func:`write_outputs`
    (``data``: ``read_inputs``).

    Raises:
      CacheMismatchError: a finished cache at ``path`` made for another spec,
        unless ``overwrite=True`` is among ``kwargs`` (then it is rebuilt).
    """
    if os.path.exists(os.path.join(path, "manifest.json")):
        try:
            return TeacherCache.open(path, expect=spec.identity())
        except CacheMismatchError as error:
            if not kwargs.get("overwrite"):
                raise CacheMismatchError(
                    f"{error}\nRerun experiments.cache_teacher with --overwrite to rebuild it."
                ) from None
    return write(path, spec, data, teacher_apply, teacher_variables, **kwargs)


def load_teacher(config, workdir: str, *, train_teacher: bool = True):
    """The LM experiment of ``config`` and the trained teacher's variables of ``workdir``.

    The teacher is the runner's (``WORKDIR/teacher/``): restored from its final
    checkpoint, or trained there first when missing and ``train_teacher``.

    Returns:
      ``(experiment, teacher_variables)``: an ``lm_train.LmExperiment`` and
      ``{"params": ...}`` on the host.

    Raises:
      ExperimentError: a bad config or workdir; no trained teacher and not
        ``train_teacher``; a teacher trained with other config fields.
    """
    from experiments import lm_train  # the runner imports this module

    lm_train.validate_config(config, jax.device_count())
    check_workdir(workdir)
    if not train_teacher and not os.path.exists(os.path.join(workdir, "teacher", "result.json")):
        raise ExperimentError(
            f"No trained teacher in {workdir}. Train it first with\n"
            f"  python -m experiments.distill_lm --config=CONFIG --workdir={workdir}\n"
            "(the same config), or rerun without --train_teacher=false to train it here."
        )
    experiment = lm_train.LmExperiment(config, workdir)
    os.makedirs(workdir, exist_ok=True)
    _, state = experiment.run("teacher", config.teacher.seed)
    return experiment, {"params": jax.device_get(state.params)}


def experiment_cache(
    experiment, teacher_variables, *, overwrite: bool = False, progress: bool = True
) -> TeacherCache:
    """The cache of the teacher's outputs on the experiment's training windows.

    Reused when it matches, written otherwise (see :func:`ensure_cache`), under
    :func:`cache_path` of the experiment's workdir and ``config.cache.k``.
    """
    config = experiment.config
    settings = cache_settings(config)
    spec = lm_cache_spec(
        experiment.data.train, experiment.data.tokenizer, teacher_variables, **settings
    )
    return ensure_cache(
        cache_path(experiment.workdir, settings["k"]),
        spec,
        experiment.data.train,
        jaxkd.linen_teacher_apply(experiment.models["teacher"], train_kwarg=None),
        teacher_variables,
        batch_size=config.cache.batch_size,
        mesh=experiment.mesh,
        overwrite=overwrite,
        progress=progress and experiment.is_chief,
    )


def load_classification_teachers(config, workdir: str, *, train_teacher: bool = True):
    """The classification experiment of ``config`` and its teachers, one per seed.

    Each seed's teacher is the runner's (``WORKDIR/seed_<s>/teacher/``): restored
    from its final checkpoint, or trained there first when missing and
    ``train_teacher``.

    Returns:
      ``(experiment, teachers)``: a ``train.Experiment`` and ``{seed: (teacher_apply,
      teacher_variables)}``.

    Raises:
      ExperimentError: a bad config or workdir; a seed without a trained teacher and
        not ``train_teacher``; a teacher trained with other config fields.
    """
    from experiments import train  # the runner imports this module

    train.validate(config, jax.device_count())
    check_workdir(workdir)
    seeds = [int(seed) for seed in config.seeds]
    missing = [
        seed
        for seed in seeds
        if not os.path.exists(os.path.join(workdir, f"seed_{seed}", "teacher", "result.json"))
    ]
    if not train_teacher and missing:
        raise ExperimentError(
            f"No trained teacher for seed(s) {missing} in {workdir}. Train it first with\n"
            f"  python -m experiments.distill --config=CONFIG --workdir={workdir}\n"
            "(the same config), or rerun without --train_teacher=false to train it here."
        )
    experiment = train.Experiment(config, workdir)
    os.makedirs(workdir, exist_ok=True)
    return experiment, {seed: experiment.teacher(seed)[1] for seed in seeds}


def classification_cache(
    experiment, seed: int, teacher, *, overwrite: bool = False, progress: bool = True
) -> TeacherCache:
    """The cache of seed ``seed``'s teacher on the runner's training split.

    Reused when it matches, written otherwise (see :func:`ensure_cache`), under
    :func:`cache_path` of ``WORKDIR/seed_<seed>`` and ``config.cache.k``. The teacher
    runs on batches of ``config.cache.batch_size`` examples, or by default (0) of
    the training ``batch_size``: the shape of the online teacher's forward in the
    ``distilled`` step, whose logits the cached float32 logits then equal bit for bit
    (a matmul's rounding may depend on the batch size).

    Args:
      experiment: a ``train.Experiment``.
      seed: the run seed whose teacher it is.
      teacher: ``(teacher_apply, teacher_variables)``.
      overwrite: rebuild a cache made for another teacher, data or setting.
      progress: show a tqdm bar while writing.
    """
    config = experiment.config
    settings = cache_settings(config)
    teacher_apply, teacher_variables = teacher
    teacher_variables = jax.device_get(teacher_variables)
    name = (
        f"{config.dataset}/{experiment.spec.train_split} without its validation_fraction="
        f"{config.validation_fraction} (validation_seed={config.validation_seed})"
    )
    spec = classification_cache_spec(
        experiment.train_arrays,
        teacher_variables,
        num_classes=experiment.spec.num_classes,
        name=name,
        **settings,
    )
    return ensure_cache(
        cache_path(os.path.join(experiment.workdir, f"seed_{seed}"), settings["k"]),
        spec,
        experiment.train_inputs,
        teacher_apply,
        teacher_variables,
        write=write_outputs,
        batch_size=int(config.cache.batch_size) or config.batch_size,
        mesh=experiment.mesh,
        overwrite=overwrite,
        progress=progress and experiment.is_chief,
    )


def cache_teacher(
    config, workdir: str, *, overwrite: bool = False, train_teacher: bool = True
) -> list[TeacherCache]:
    """The command: loads (or trains) the teachers of ``workdir``, then caches each.

    One cache for a language model (:func:`load_teacher`, :func:`experiment_cache`);
    one per seed for a classifier (:func:`load_classification_teachers`,
    :func:`classification_cache`).
    """
    runner = "distill_lm" if is_lm_config(config) else "distill"
    try:
        if is_lm_config(config):
            experiment, teacher_variables = load_teacher(
                config, workdir, train_teacher=train_teacher
            )
            return [experiment_cache(experiment, teacher_variables, overwrite=overwrite)]
        experiment, teachers = load_classification_teachers(
            config, workdir, train_teacher=train_teacher
        )
    except StaleRunError as error:  # the teacher's run, not a cache: the runner retrains it
        message = str(error).split("\nRerun with --overwrite")[0]
        raise StaleRunError(
            f"{message}\nThe teacher was trained with other config fields. Retrain it with\n"
            f"  python -m experiments.{runner} --config=CONFIG --workdir={workdir} --overwrite\n"
            "(with the same overrides), or use another --workdir; --overwrite here rebuilds "
            "caches only."
        ) from None
    return [
        classification_cache(experiment, seed, teacher, overwrite=overwrite)
        for seed, teacher in teachers.items()
    ]


def describe(cache: TeacherCache) -> str:
    """Where a cache is, what it holds and its bytes per token (per example)."""
    spec = cache.spec
    what = "full logits" if spec.k is None else f"top-{spec.k} log-probs (T={spec.temperature})"
    if spec.seq_len is None:
        return (
            f"{cache.path}: {what} in {spec.dtype}, {spec.num_records:,} examples of "
            f"{spec.vocab_size} classes, {cache.manifest['bytes']:,} bytes in "
            f"{len(cache.manifest['shards'])} shard(s)\n"
            f"bytes/example: {cache.bytes_per_record:.1f} on disk "
            f"({spec.record_bytes} per record's layout)"
        )
    raw = spec.record_bytes / spec.seq_len
    return (
        f"{cache.path}: {what} in {spec.dtype}, {spec.num_records:,} windows of "
        f"{spec.seq_len} tokens, {cache.manifest['bytes']:,} bytes in "
        f"{len(cache.manifest['shards'])} shard(s)\n"
        f"bytes/token: {cache.bytes_per_token:.1f} on disk ({raw:.1f} per record's layout)"
    )


def _define_flags() -> dict[str, flags.FlagHolder]:
    """The command's flags (defined only when run as a script: the runner imports this)."""
    holders = {
        "config": config_flags.DEFINE_config_file(
            "config", None, "Path to an experiment config (classification or LM)."
        ),
        "workdir": flags.DEFINE_string("workdir", None, "The experiment's workdir."),
        "overwrite": flags.DEFINE_bool(
            "overwrite", False, "Rebuild a cache made for another teacher, data or setting."
        ),
        "train_teacher": flags.DEFINE_bool(
            "train_teacher", True, "Train the workdir's teacher when it is missing (else refuse)."
        ),
    }
    flags.mark_flags_as_required(["config", "workdir"])
    return holders


def main(argv, holders: dict[str, flags.FlagHolder]) -> None:
    del argv
    logging.set_verbosity(logging.WARNING)
    caches = run_command(
        cache_teacher,
        holders["config"].value,
        holders["workdir"].value,
        overwrite=holders["overwrite"].value,
        train_teacher=holders["train_teacher"].value,
    )
    print("\n".join(describe(cache) for cache in caches))


if __name__ == "__main__":
    _holders = _define_flags()
    app.run(lambda argv: main(argv, _holders))
