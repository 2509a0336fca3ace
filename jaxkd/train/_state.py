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
      distill_params: trainable parameters that belong to the distillation, not to
        the student: hint regressors, projectors, contrastive embedding heads, a
        learned temperature. Differentiated and updated with the student's
        (``{}`` when the objective has none), never part of the exported student
        (:func:`export_student`).
      distill_state: non-trainable state of the distillation, e.g. a contrastive
        memory bank; updated by the objective, the same on every device.
    """

    step: jax.Array
    params: PyTree
    opt_state: optax.OptState
    model_state: PyTree
    rng: jax.Array
    distill_params: PyTree = struct.field(default_factory=dict)
    distill_state: PyTree = struct.field(default_factory=dict)

    @classmethod
    def create(
        cls,
        *,
        params: PyTree,
        optimizer: optax.GradientTransformation,
        model_state: PyTree | None = None,
        rng: jax.Array | int = 0,
        distill_params: PyTree | None = None,
        distill_state: PyTree | None = None,
    ) -> TrainState:
        """Builds the initial state.

        Without ``distill_params`` the optimizer sees the student's params alone;
        with them, it sees ``{"student": params, "distill": distill_params}`` (the
        tree the train step updates), so one optimizer trains both, or
        :func:`distillation_optimizer` gives each its own.

        Args:
          params: the student's trainable parameters.
          optimizer: the Optax transformation that the train step will use.
          model_state: mutable collections such as BatchNorm statistics.
          rng: a PRNG key or an int seed.
          distill_params: the distillation's trainable parameters, e.g. from
            :func:`init_distillation`; ``None`` or ``{}`` for none.
          distill_state: the distillation's non-trainable state.
        """
        if isinstance(rng, int):
            rng = jax.random.key(rng)
        distill_params = {} if distill_params is None else distill_params
        state = cls(
            step=jnp.zeros((), jnp.int32),
            params=params,
            opt_state=None,
            model_state={} if model_state is None else model_state,
            rng=rng,
            distill_params=distill_params,
            distill_state={} if distill_state is None else distill_state,
        )
        return state.replace(opt_state=optimizer.init(state.trainable()))

    def trainable(self) -> PyTree:
        """What the optimizer updates: the student's params, and beside them the
        distillation's under ``{"student": ..., "distill": ...}`` when it has any."""
        if not jax.tree.leaves(self.distill_params):
            return self.params
        return {"student": self.params, "distill": self.distill_params}

    def split_trainable(self, trainable: PyTree) -> tuple[PyTree, PyTree]:
        """``(params, distill_params)`` of a tree in :meth:`trainable`'s layout."""
        if not jax.tree.leaves(self.distill_params):
            return trainable, self.distill_params
        return trainable["student"], trainable["distill"]

    def with_trainable(self, trainable: PyTree) -> TrainState:
        """The state with the parameters of :meth:`trainable`'s layout replaced."""
        params, distill_params = self.split_trainable(trainable)
        return self.replace(params=params, distill_params=distill_params)


def export_student(state: TrainState) -> dict[str, PyTree]:
    """The student's variables alone, as a linen variables dict.

    ``{"params": state.params, **state.model_state}``: no optimizer state, no
    distillation parameters (hint regressors, projectors, embedding heads) and no
    distillation state (memory banks). For an NNX student, ``nnx.merge(graphdef,
    state.params, state.model_state)`` is the model.
    """
    return {"params": state.params, **state.model_state}


def distillation_optimizer(
    student: optax.GradientTransformation, distill: optax.GradientTransformation
) -> optax.GradientTransformation:
    """One optimizer for a state with ``distill_params``: ``student`` updates the
    student's params and ``distill`` the distillation's (e.g. a larger learning rate
    for a freshly initialized regressor), through ``optax.multi_transform``.

    Use it with :meth:`TrainState.create` given ``distill_params``.
    """

    def labels(tree):
        if not isinstance(tree, dict) or set(tree) != {"student", "distill"}:
            raise ValueError(
                "distillation_optimizer needs a state with `distill_params` (its parameters "
                "are then {'student': ..., 'distill': ...}); without them use the student's "
                "optimizer alone."
            )
        return {name: jax.tree.map(lambda _, name=name: name, tree[name]) for name in tree}

    return optax.multi_transform({"student": student, "distill": distill}, labels)
