"""Checkpoints of a run: the student's TrainState plus the loader's position.

A run killed at any point restarts from its last checkpoint with the same data
position, so that it ends with the same parameters as an uninterrupted run.
Checkpoints are written synchronously and committed atomically by Orbax, so a
kill during a save leaves the previous checkpoint intact.
"""

from __future__ import annotations

import os
from typing import Any

import jax
import orbax.checkpoint as ocp

import jaxkd


def _to_storable(state: jaxkd.TrainState) -> jaxkd.TrainState:
    """Typed PRNG keys are stored as their raw uint32 data."""
    return state.replace(rng=jax.random.key_data(state.rng))


def _from_storable(state: jaxkd.TrainState, like: jaxkd.TrainState) -> jaxkd.TrainState:
    return state.replace(
        rng=jax.random.wrap_key_data(state.rng, impl=jax.random.key_impl(like.rng))
    )


class RunCheckpointer:
    """Saves and restores ``(TrainState, extra JSON)`` under ``directory``.

    Args:
      directory: where the checkpoints of one run live.
      max_to_keep: how many recent checkpoints to keep.
    """

    def __init__(self, directory: str | os.PathLike, *, max_to_keep: int = 2):
        self._manager = ocp.CheckpointManager(
            os.path.abspath(directory),
            options=ocp.CheckpointManagerOptions(
                max_to_keep=max_to_keep, enable_async_checkpointing=False, create=True
            ),
        )

    def latest_step(self) -> int | None:
        """The step of the newest complete checkpoint, or None."""
        return self._manager.latest_step()

    def save(self, step: int, state: jaxkd.TrainState, extra: dict[str, Any]) -> None:
        """Writes a checkpoint of ``state`` and ``extra`` (JSON-serializable) at ``step``."""
        if self._manager.latest_step() == step:
            return
        self._manager.save(
            step,
            args=ocp.args.Composite(
                state=ocp.args.StandardSave(_to_storable(state)), extra=ocp.args.JsonSave(extra)
            ),
        )
        self._manager.wait_until_finished()

    def restore(self, like: jaxkd.TrainState) -> tuple[jaxkd.TrainState, dict] | None:
        """The newest checkpoint as ``(state, extra)``, shaped and sharded like ``like``."""
        step = self._manager.latest_step()
        if step is None:
            return None
        restored = self._manager.restore(
            step,
            args=ocp.args.Composite(
                state=ocp.args.StandardRestore(_to_storable(like)), extra=ocp.args.JsonRestore()
            ),
        )
        return _from_storable(restored["state"], like), dict(restored["extra"])

    def close(self) -> None:
        self._manager.close()
