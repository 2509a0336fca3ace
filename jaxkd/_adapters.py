"""Adapters from Flax linen and Flax NNX models to the step's apply signatures.

Student: ``apply(params, model_state, inputs, *, train, rng) -> (outputs, model_state)``.
Teacher: ``teacher_apply(teacher_params, inputs) -> outputs`` in inference mode,
where ``teacher_params`` holds everything the teacher needs (for linen the whole
variables dict, BatchNorm statistics included; for NNX the full state).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import jax
from flax import linen as nn
from flax import nnx

PyTree = Any


def linen_apply(
    module: nn.Module,
    *,
    train_kwarg: str | None = "train",
    mutable: Sequence[str] = ("batch_stats",),
    rng_collection: str = "dropout",
):
    """Student apply for a linen module called as ``module(inputs, train=...)``.

    Args:
      module: the linen module.
      train_kwarg: name of the module's train/eval keyword argument, or ``None``.
      mutable: collections updated in training when present in ``model_state``.
      rng_collection: the rng stream given ``rng`` in training (dropout).

    Returns:
      ``apply(params, model_state, inputs, *, train, rng)``; ``model_state`` is the
      variables dict without ``"params"`` (e.g. ``{"batch_stats": ...}`` or ``{}``).
    """

    def apply(params, model_state, inputs, *, train: bool, rng=None):
        variables = {"params": params, **model_state}
        kwargs = {} if train_kwarg is None else {train_kwarg: train}
        rngs = {rng_collection: rng} if (train and rng is not None) else None
        updated = [name for name in mutable if name in model_state] if train else []
        if not updated:
            return module.apply(variables, inputs, rngs=rngs, **kwargs), model_state
        outputs, changes = module.apply(variables, inputs, rngs=rngs, mutable=updated, **kwargs)
        return outputs, {**model_state, **changes}

    return apply


def linen_teacher_apply(module: nn.Module, *, train_kwarg: str | None = "train"):
    """Teacher apply for a linen module: ``teacher_apply(variables, inputs)``."""

    def teacher_apply(variables, inputs):
        kwargs = {} if train_kwarg is None else {train_kwarg: False}
        return module.apply(variables, inputs, **kwargs)

    return teacher_apply


def split_linen_variables(variables: PyTree) -> tuple[PyTree, PyTree]:
    """``(params, model_state)`` from a linen variables dict."""
    variables = dict(variables)
    params = variables.pop("params")
    return params, variables


def nnx_split(model: nnx.Module):
    """``(graphdef, params, model_state)`` of an NNX model.

    ``params`` are the ``nnx.Param`` variables (what the optimizer trains);
    ``model_state`` is everything else (BatchNorm statistics, rng counters).
    """
    return nnx.split(model, nnx.Param, ...)


def nnx_apply(graphdef):
    """Student apply for an NNX model split by :func:`nnx_split`.

    Training mode is set with ``model.train()`` / ``model.eval()``; stochastic
    layers draw from the model's own ``nnx.Rngs`` (part of ``model_state``), so
    the ``rng`` argument is unused.
    """

    def apply(params, model_state, inputs, *, train: bool, rng=None):
        del rng
        # copy=True: fresh Variables at the current trace level, so that BatchNorm
        # may update its statistics inside jax.grad.
        model = nnx.merge(graphdef, params, model_state, copy=True)
        if train:
            model.train()
        else:
            model.eval()
        outputs = model(inputs)
        if not train:
            return outputs, model_state
        _, _, model_state = nnx.split(model, nnx.Param, ...)
        return outputs, model_state

    return apply


def nnx_teacher_apply(graphdef):
    """Teacher apply for an NNX model: ``teacher_apply(state, inputs)`` in eval mode,
    where ``state`` is ``nnx.split(model)[1]`` (or params and rest merged)."""

    def teacher_apply(state, inputs):
        model = nnx.merge(graphdef, state, copy=True)
        model.eval()
        return model(inputs)

    return teacher_apply


def count_params(params: PyTree) -> int:
    """Number of scalars in a parameter tree."""
    return int(sum(leaf.size for leaf in jax.tree.leaves(params)))
