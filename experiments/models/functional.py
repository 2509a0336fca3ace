"""The functional face of a linen model: init, parameter count and a pure ``apply``.

The train step is model-agnostic: it calls
``apply(params, model_state, x, *, train, rng) -> (logits, new_model_state)``,
where ``model_state`` holds the non-parameter collections (``{"batch_stats": ...}``
for BatchNorm models, ``{}`` otherwise).
"""

import math
from collections.abc import Callable
from functools import partial
from typing import Any

import flax.linen as nn
import jax

import jaxkd

Params = Any
"""A pytree of parameter arrays (the ``params`` collection)."""

ModelState = dict[str, Any]
"""Non-parameter variable collections, e.g. ``{"batch_stats": ...}`` or ``{}``."""

ApplyFn = Callable[..., tuple[jax.Array, ModelState]]
"""``apply(params, model_state, x, *, train, rng=None) -> (logits, new_model_state)``."""


def init_model(
    model: nn.Module, rng: jax.Array, sample_input: jax.Array
) -> tuple[Params, ModelState]:
    """Initializes a model's variables (jitted) and splits off the parameters.

    The compiled initializer is cached per model (linen modules with hashable
    attributes compare by value), so re-initializing an equal model, e.g. for
    every run of a sweep, does not compile again. Works under ``jax.eval_shape``
    to get shapes without computing values.

    Args:
      model: a linen module called as ``model(x, train=...)``.
      rng: PRNG key for parameter initialization.
      sample_input: a batch with the input shape and dtype, e.g. [2, 32, 32, 3].

    Returns:
      ``(params, model_state)``: the ``params`` collection and a dict of the other
      collections (``{"batch_stats": ...}`` or ``{}``).
    """
    try:
        hash(model)
    except TypeError:  # e.g. a list-valued attribute: compile without the cache
        variables = jax.jit(partial(_init_variables, model))(rng, sample_input)
    else:
        variables = _cached_init_variables(model, rng, sample_input)
    variables = dict(variables)
    params = variables.pop("params")
    return params, variables


def _init_variables(model: nn.Module, rng: jax.Array, sample_input: jax.Array) -> dict:
    return model.init(rng, sample_input, train=False)


_cached_init_variables = jax.jit(_init_variables, static_argnums=0)


def param_count(params: Params) -> int:
    """Number of scalars in a parameter pytree (arrays or ``jax.ShapeDtypeStruct``)."""
    return sum(math.prod(leaf.shape) for leaf in jax.tree.leaves(params))


def make_apply(model: nn.Module) -> ApplyFn:
    """Returns a pure ``apply`` for the train and eval steps.

    The returned function is
    ``apply(params, model_state, x, *, train, rng=None) -> (logits, new_model_state)``:

    - ``train=True``: ``batch_stats`` (when present in ``model_state``) is mutable and
      the updated running statistics come back in ``new_model_state``; other
      collections are returned unchanged.
    - ``train=False``: nothing is mutated and ``model_state`` is returned as is.
    - ``rng`` is passed as the ``dropout`` rng when not None (it must be given in
      train mode for models with dropout; in eval mode dropout is off).

    ``train`` must be a Python bool (static under ``jax.jit``).

    Args:
      model: a linen module called as ``model(x, train=...)``.

    Returns:
      The ``apply`` function described above.
    """

    return jaxkd.linen_apply(model)
