"""What each run depends on, recorded in its directory, so that a changed config is noticed.

A run's directory holds ``run_config.json``: the config fields its results depend
on, with the seed and the sizes of its training and validation data. A finished
run is reused, and an unfinished one resumed, only when those fields are the same
as in the config at hand; otherwise the runner refuses with an error that names
the fields, or, when asked to start afresh (``--overwrite``), deletes the runs
that no longer match and trains them again. The teacher depends on the data,
optimization and teacher fields alone, so a changed student field keeps it.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Mapping
from typing import Any

import jax
import ml_collections

from experiments import jsonfiles
from experiments.errors import ExperimentError

FILENAME = "run_config.json"

_DATA = ("dataset", "dataset_kwargs", "validation_fraction", "validation_seed")
_OPTIMIZATION = ("batch_size", "optimizer", "schedule", "warmup_steps")
_MEASUREMENT = ("throughput_batch_size",)
_TEACHER = ("teacher.model", "teacher.model_kwargs", "teacher.steps", "teacher.learning_rate")
_STUDENT = ("student.model", "student.model_kwargs", "steps", "learning_rate")
_DISTILL = ("distill.loss", "distill.alpha", "distill.temperature", "distill.loss_kwargs")


class StaleRunError(ExperimentError):
    """The workdir holds runs made with other values of the fields they depend on."""


def _field(config: ml_collections.ConfigDict, name: str) -> Any:
    value = config
    for part in name.split("."):
        value = value[part]
    if isinstance(value, ml_collections.ConfigDict):
        value = value.to_dict()
    return value


def run_fields(
    config: ml_collections.ConfigDict, kind: str, seed: int, data_sizes: Mapping[str, int]
) -> dict[str, Any]:
    """The fields a run's results depend on, as a flat JSON-able dict of dotted names.

    Args:
      config: the experiment config.
      kind: ``"teacher"``, ``"scratch"`` or ``"distilled"``. The students are
        evaluated against the teacher, so they depend on its fields too.
      seed: the run's seed.
      data_sizes: examples per split, e.g. ``{"train": 9000, "validation": 1000}``.
    """
    names = [*_DATA, *_OPTIMIZATION, *_MEASUREMENT, *_TEACHER]
    if config.optimizer == "sgd":
        names.append("momentum")
    if config.optimizer in ("sgd", "adamw"):
        names.append("weight_decay")
    if config.optimizer == "sgd" and "nesterov" in config:
        names.append("nesterov")
    if config.schedule == "step":
        names += ["decay_steps", "decay_factor"]
    if kind != "teacher":
        names += _STUDENT
    if kind == "distilled":
        names += _DISTILL
    fields = {"seed": int(seed), **{name: _field(config, name) for name in names}}
    fields.update({f"examples.{split}": int(size) for split, size in data_sizes.items()})
    return jsonfiles.strict(fields)


def differences(recorded: Mapping[str, Any], current: Mapping[str, Any]) -> list[str]:
    """``"name: recorded -> current"`` for every field whose value changed."""
    missing = "(not recorded)"
    return [
        f"{name}: {recorded.get(name, missing)} -> {current.get(name, missing)}"
        for name in sorted(set(recorded) | set(current))
        if recorded.get(name, missing) != current.get(name, missing)
    ]


def record(rundir: str, fields: Mapping[str, Any]) -> None:
    """Writes the fields of a run that is about to train into its directory."""
    jsonfiles.write(os.path.join(rundir, FILENAME), fields)


def stale_runs(planned: Mapping[str, Mapping[str, Any]]) -> dict[str, list[str]]:
    """For every planned ``{rundir: fields}`` whose directory holds a run made with
    other fields (or with no record of them): the differences."""
    stale = {}
    for rundir, fields in planned.items():
        if not os.path.isdir(rundir) or not os.listdir(rundir):
            continue
        recorded = jsonfiles.read(os.path.join(rundir, FILENAME))
        if recorded is None:
            stale[rundir] = ["no record of the config it was run with"]
        elif changed := differences(recorded, fields):
            stale[rundir] = changed
    return stale


def check_runs(
    planned: Mapping[str, Mapping[str, Any]], workdir: str, *, overwrite: bool
) -> list[str]:
    """Refuses stale runs, or with ``overwrite`` deletes them; returns their directories.

    Raises:
      StaleRunError: naming each stale run and its changed fields, unless ``overwrite``.
    """
    stale = stale_runs(planned)
    if stale and not overwrite:
        by_change: dict[tuple[str, ...], list[str]] = {}
        for rundir, changed in stale.items():
            by_change.setdefault(tuple(changed), []).append(os.path.relpath(rundir, workdir))
        lines = [
            f"  {', '.join(rundirs)}: {'; '.join(changed)}"
            for changed, rundirs in by_change.items()
        ]
        raise StaleRunError(
            f"{workdir} holds runs made with another config (recorded -> now):\n"
            + "\n".join(lines)
            + "\nRerun with --overwrite to delete these runs and train them again, "
            "or use another --workdir."
        )
    if stale and jax.process_index() == 0:
        for rundir in stale:
            shutil.rmtree(rundir)
    if jax.process_count() > 1:  # no process trains before the chief has deleted
        from jax.experimental import multihost_utils

        multihost_utils.sync_global_devices("experiments.run_config.check_runs")
    return list(stale)
