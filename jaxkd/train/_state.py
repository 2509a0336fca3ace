"""The student's training state. The teacher is never part of it."""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import optax
from flax import struct

PyTree = Any


@struct.dataclass
class TrainState:
    """Everything that changes while the student trains, as one pytree.

    Teacher parameters are deliberately absent: they are an explicit argument of
    every step, never differentiated, never updated and never checkpointed with the
    student.

    Attributes:
      step: int32 scalar, the number of optimizer updates applied so far.
      params: the student's trainable parameters.
      opt_state: the Optax optimizer state for ``params``.
      model_state: the student's non-trainable, mutable collections, e.g.
        ``{"batch_stats": ...}`` for BatchNorm; ``{}`` when there are none.
      rng: a PRNG key, split once per step (dropout and other stochastic layers).
    """

    step: jax.Array
    params: PyTree
    opt_state: optax.OptState
    model_state: PyTree
    rng: jax.Array

    @classmethod
    def create(
        cls,
        *,
        params: PyTree,
        optimizer: optax.GradientTransformation,
        model_state: PyTree | None = None,
        rng: jax.Array | int = 0,
    ) -> TrainState:
        """Builds the initial state; the optimizer sees the student's params only.

        Args:
          params: the student's trainable parameters.
          optimizer: the Optax transformation that the train step will use.
          model_state: mutable collections such as BatchNorm statistics.
          rng: a PRNG key or an int seed.
        """
        if isinstance(rng, int):
            rng = jax.random.key(rng)
        return cls(
            step=jnp.zeros((), jnp.int32),
            params=params,
            opt_state=optimizer.init(params),
            model_state={} if model_state is None else model_state,
            rng=rng,
        )
