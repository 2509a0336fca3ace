"""What the runner checks before it builds data or trains: the config and the workdir.

Every check raises :class:`ExperimentError` naming the field and the value, which
the command-line scripts print before exiting with status 2.
"""

from __future__ import annotations

import os

import jax
import ml_collections

import jaxkd
from experiments import data, models
from experiments.errors import ExperimentError

OPTIMIZERS = ("adam", "adamw", "sgd")
SCHEDULES = ("cosine", "constant", "step")


def validate_config(config: ml_collections.ConfigDict, num_devices: int) -> None:
    """Raises ``ExperimentError`` naming the field for any value the run cannot use."""

    def fail(message):
        raise ExperimentError(f"Bad config: {message}")

    if config.dataset not in data.DATASETS:
        fail(f"dataset={config.dataset!r} is unknown; known: {sorted(data.DATASETS)}.")
    for role in ("teacher", "student"):
        name = config[role].model
        if name not in models.MODEL_NAMES:
            fail(f"{role}.model={name!r} is unknown; known: {list(models.MODEL_NAMES)}.")
    for field in ("batch_size", "eval_batch_size"):
        size = config[field]
        if size <= 0 or size % num_devices:
            fail(f"{field}={size} must be a positive multiple of the {num_devices} devices.")
        if size % jax.process_count():
            fail(f"{field}={size} must divide over {jax.process_count()} processes.")
    for field in ("steps", "teacher.steps"):
        value = config.teacher.steps if field == "teacher.steps" else config.steps
        if value <= 0:
            fail(f"{field}={value} must be positive.")
    for field in ("eval_every", "log_every"):
        if config[field] <= 0:
            fail(f"{field}={config[field]} must be positive.")
    if config.checkpoint_every < 0:
        fail(f"checkpoint_every={config.checkpoint_every} must be >= 0 (0: final only).")
    if not config.distill.temperature > 0:
        fail(f"distill.temperature={config.distill.temperature} must be > 0.")
    if not 0.0 <= config.distill.alpha <= 1.0:
        fail(f"distill.alpha={config.distill.alpha} must lie in [0, 1].")
    if config.optimizer not in OPTIMIZERS:
        fail(f"optimizer={config.optimizer!r} is unknown; known: {OPTIMIZERS}.")
    if not 0.0 <= config.momentum < 1.0:
        fail(f"momentum={config.momentum} must lie in [0, 1).")
    if not 0.0 <= config.validation_fraction < 1.0:
        fail(f"validation_fraction={config.validation_fraction} must lie in [0, 1).")
    if config.schedule not in SCHEDULES:
        fail(f"schedule={config.schedule!r} is unknown; known: {SCHEDULES}.")
    if not config.seeds:
        fail("seeds is empty.")
    # The objective checks its own loss name and arguments.
    try:
        jaxkd.distillation_objective(
            config.distill.loss,
            alpha=config.distill.alpha,
            temperature=config.distill.temperature,
            loss_kwargs=config.distill.loss_kwargs.to_dict(),
        )
    except (TypeError, ValueError) as error:
        fail(f"distill: {error}")


def check_workdir(workdir: str) -> None:
    """Raises ``ExperimentError`` when ``workdir`` exists and is not a directory."""
    if os.path.exists(workdir) and not os.path.isdir(workdir):
        raise ExperimentError(f"Bad workdir: {workdir} is an existing file, not a directory.")
