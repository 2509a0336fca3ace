"""Caches the LM teacher's outputs on every training window, for distillation without it.

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

The write is atomic (a ``.partial`` directory, renamed when complete) and resumes
from its finished shards when rerun. A cache already there is reused if it matches
the teacher, windows, tokenizer and settings, and refused (exit status 2, naming
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
    packed_windows_fingerprint,
    params_fingerprint,
)
from experiments.errors import ExperimentError, run_command
from jaxkd.losses._sparse_teacher import top_k_teacher


def cache_path(workdir: str, k: int | None) -> str:
    """``WORKDIR/teacher_cache/k<k>`` (``full`` for the full logits)."""
    return os.path.join(workdir, "teacher_cache", "full" if k is None else f"k{k}")


def cache_settings(config) -> dict[str, Any]:
    """``k`` (None for 0: full logits), ``dtype`` and ``temperature`` of a config's cache."""
    k = int(config.cache.k) or None
    return {
        "k": k,
        "dtype": config.cache.dtype,
        "temperature": None if k is None else float(config.kd.temperature),
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


def teacher_outputs_fn(teacher_apply, spec: CacheSpec):
    """``outputs(teacher_variables, inputs [B, L]) -> {key: [B, L, ...]}`` in stored dtypes."""
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
    *,
    batch_size: int,
    mesh=None,
    overwrite: bool = False,
    progress: bool = True,
) -> TeacherCache:
    """Runs the teacher over every window and writes its outputs to ``path``.

    Resumes an unfinished write of the same spec. The forward is compiled once
    for batches of ``batch_size`` windows (rounded up to a multiple of the mesh's
    devices; the last batch is padded with window 0 and its padding dropped).

    Args:
      path: the cache directory.
      spec: the cache's :class:`CacheSpec` (e.g. :func:`lm_cache_spec`).
      windows: random-access ``{"tokens": [L + 1], "mask": [L + 1]}`` windows.
      teacher_apply: ``teacher_apply(variables, inputs [B, L]) -> logits [B, L, V]``.
      teacher_variables: the teacher's variables.
      batch_size: windows per forward pass.
      mesh: a one-axis data mesh; default all devices.
      overwrite: replace a finished cache at ``path``.
      progress: show a tqdm bar.
    """
    if jax.process_count() > 1:
        raise ExperimentError("Write the teacher cache from a single process.")
    mesh = jaxkd.data_mesh() if mesh is None else mesh
    devices = mesh.devices.size
    batch_size = -(-int(batch_size) // devices) * devices
    replicated = NamedSharding(mesh, P())
    teacher_variables = jax.device_put(teacher_variables, replicated)
    inputs_sharding = NamedSharding(mesh, P(mesh.axis_names[0]))
    example = jax.ShapeDtypeStruct((batch_size, spec.seq_len), jnp.int32, sharding=inputs_sharding)
    forward = (
        jax.jit(teacher_outputs_fn(teacher_apply, spec)).lower(teacher_variables, example).compile()
    )
    with TeacherCacheWriter(path, spec) as writer:
        bar = tqdm(
            total=spec.num_records,
            initial=writer.num_written,
            desc=f"caching the teacher ({os.path.basename(path)})",
            unit="window",
            disable=not progress,
            leave=False,
        )
        with bar:
            for start in range(writer.num_written, spec.num_records, batch_size):
                count = min(batch_size, spec.num_records - start)
                indices = np.zeros(batch_size, np.int64)
                indices[:count] = np.arange(start, start + count)
                tokens = loader.read(windows, indices, keys=("tokens",))["tokens"]
                inputs = jax.device_put(
                    jaxkd.lm.shift_tokens(tokens)["inputs"].astype(np.int32), inputs_sharding
                )
                outputs = jax.device_get(forward(teacher_variables, inputs))
                writer.write({key: value[:count] for key, value in outputs.items()})
                bar.update(count)
        return writer.finish(overwrite=overwrite)


def ensure_cache(
    path: str, spec: CacheSpec, windows, teacher_apply, teacher_variables, **kwargs
) -> TeacherCache:
    """The cache at ``path`` if it matches ``spec``; else written by :func:`write_cache`.

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
    return write_cache(path, spec, windows, teacher_apply, teacher_variables, **kwargs)


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


def cache_teacher(
    config, workdir: str, *, overwrite: bool = False, train_teacher: bool = True
) -> TeacherCache:
    """The command: :func:`load_teacher`, then :func:`experiment_cache`."""
    experiment, teacher_variables = load_teacher(config, workdir, train_teacher=train_teacher)
    return experiment_cache(experiment, teacher_variables, overwrite=overwrite)


def describe(cache: TeacherCache) -> str:
    """Where a cache is, what it holds and its bytes per token."""
    spec = cache.spec
    what = "full logits" if spec.k is None else f"top-{spec.k} log-probs (T={spec.temperature})"
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
            "config", None, "Path to an LM experiment config."
        ),
        "workdir": flags.DEFINE_string("workdir", None, "The LM experiment's workdir."),
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
    cache = run_command(
        cache_teacher,
        holders["config"].value,
        holders["workdir"].value,
        overwrite=holders["overwrite"].value,
        train_teacher=holders["train_teacher"].value,
    )
    print(describe(cache))


if __name__ == "__main__":
    _holders = _define_flags()
    app.run(lambda argv: main(argv, _holders))
