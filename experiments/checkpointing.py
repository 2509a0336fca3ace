"""Checkpoints of a run: the student's TrainState plus the data iterator's state.

A checkpoint at step ``s`` holds three Orbax items:

* ``state``: the TrainState (``StandardSave``);
* ``iterator``: the Grain training iterator's state, written by Grain's own
  Orbax handler (``grain.checkpoint.CheckpointSave``) as one JSON file per
  process, ``process_<i>-of-<n>.json``;
* ``extra``: JSON for the rest of the run (elapsed time).

A run killed at any point restarts from its last checkpoint with the same next
batch, so that it ends with the same parameters as an uninterrupted run.
Checkpoints are written synchronously and committed atomically by Orbax, so a
kill during a save leaves the previous checkpoint intact.
"""

from __future__ import annotations

import os
from typing import Any

import grain
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
    """Saves and restores ``(TrainState, Grain iterator, extra JSON)`` under ``directory``.

    Example::

        checkpointer = RunCheckpointer(rundir / "checkpoints")
        restored = checkpointer.restore(state, iterator)
        if restored is not None:
            state, iterator, extra = restored
        ...
        checkpointer.save(step, state, iterator, {"elapsed": elapsed})

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

    def save(
        self,
        step: int,
        state: jaxkd.TrainState,
        iterator: grain.DatasetIterator,
        extra: dict[str, Any],
    ) -> None:
        """Writes ``state``, ``iterator.get_state()`` and ``extra`` (JSON) at ``step``.

        The iterator's state is its position now: the next batch it yields is the
        first one a restored run reads.
        """
        if self._manager.latest_step() == step:
            return
        self._manager.save(
            step,
            args=ocp.args.Composite(
                state=ocp.args.StandardSave(_to_storable(state)),
                iterator=grain.checkpoint.CheckpointSave(iterator),
                extra=ocp.args.JsonSave(extra),
            ),
        )
        self._manager.wait_until_finished()

    def restore(
        self, like: jaxkd.TrainState, iterator: grain.DatasetIterator
    ) -> tuple[jaxkd.TrainState, grain.DatasetIterator, dict] | None:
        """The newest checkpoint as ``(state, iterator, extra)``, or None if there is none.

        ``state`` is shaped and sharded like ``like``; ``iterator`` (a fresh
        iterator of the run's pipeline) is set, in place, to the saved position.
        A checkpoint written before the Grain loader has no iterator state:
        ``iterator`` is then left as given, and ``extra["loader"]`` holds that
        loader's position ``{"epoch", "index_in_epoch"}``.
        """
        step = self._manager.latest_step()
        if step is None:
            return None
        items = {
            "state": ocp.args.StandardRestore(_to_storable(like)),
            "extra": ocp.args.JsonRestore(),
        }
        if (self._manager.directory / str(step) / "iterator").is_dir():
            items["iterator"] = grain.checkpoint.CheckpointRestore(iterator)
        restored = self._manager.restore(step, args=ocp.args.Composite(**items))
        return _from_storable(restored["state"], like), iterator, dict(restored["extra"])

    def close(self) -> None:
        self._manager.close()
