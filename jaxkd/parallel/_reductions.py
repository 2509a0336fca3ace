"""Reductions that give the same value on one device and on many.

A mean over a data-parallel batch is a ratio of two sums: the sum of the kept
values and the number of kept entries, each summed over the data axis. Averaging
per-device means instead (``pmean`` of masked means) weighs every device equally,
whatever its number of real examples or tokens, and is wrong whenever masks are
uneven. Every function here takes an optional ``axis_name``: ``None`` on one
device, or the name of the data-parallel axis of ``jax.pmap`` / ``jax.shard_map``,
in which case the value returned on every device is the one a single device would
compute on the global batch.

Several means are reduced with one collective (:func:`masked_means`), and
:func:`pmean_packed` averages a whole pytree in one variadic all-reduce.

Gradients flow through these reductions. Under ``jax.pmap`` and under
``jax.shard_map(..., check_vma=False)``, the transpose of ``psum`` is ``psum``, so
differentiating the global mean on every device and then averaging the gradients
with ``pmean`` gives the gradient of the global mean.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp

PyTree = Any


def _check_mask(where, values: jax.Array, name: str = "where") -> jax.Array:
    """A bool mask of ``values``' rank, broadcast to its shape (size-1 dims only)."""
    where = jnp.asarray(where)
    if where.dtype != jnp.bool_:
        raise TypeError(f"`{name}` must be a boolean mask, got dtype {where.dtype}.")
    compatible = where.ndim == values.ndim and all(
        w in (1, v) for w, v in zip(where.shape, values.shape, strict=True)
    )
    if not compatible:
        raise ValueError(
            f"`{name}` has shape {where.shape}; expected the values' shape {values.shape}, "
            "or that shape with some dimensions of size 1 (no change of rank)."
        )
    return jnp.broadcast_to(where, values.shape)


def masked_sum_and_count(values, where=None) -> tuple[jax.Array, jax.Array]:
    """``(sum of kept values, number of kept entries)`` as float32 (or float64) scalars.

    Args:
      values: float array of any shape, e.g. per-example ``[B]`` or per-token
        ``[B, L]`` losses.
      where: optional bool mask of the values' rank whose dimensions equal theirs
        or are 1 (e.g. ``[B, 1]`` for ``[B, L]``).

    Returns:
      ``(total, count)``: masked entries are excluded from both (their values may
      be NaN or inf without effect, on the value and on the gradient).
    """
    values = jnp.asarray(values)
    dtype = jnp.promote_types(values.dtype, jnp.float32)
    values = values.astype(dtype)
    if where is None:
        return jnp.sum(values), jnp.asarray(values.size, dtype)
    where = _check_mask(where, values)
    total = jnp.sum(jnp.where(where, values, 0))
    return total, jnp.sum(where).astype(dtype)


def masked_means(
    named: Mapping[str, tuple[Any, Any]], *, axis_name: str | None = None
) -> dict[str, jax.Array]:
    """Several masked means with a single ``psum`` over ``axis_name``.

    Args:
      named: ``{name: (values, where)}``, each as in :func:`masked_sum_and_count`
        (``where`` may be ``None``).
      axis_name: the data-parallel axis, or ``None`` on one device.

    Returns:
      ``{name: mean}``: sums and counts are added over the axis before dividing;
      a mean with nothing kept anywhere is 0, not NaN.
    """
    if not named:
        return {}
    pairs = [masked_sum_and_count(values, where) for values, where in named.values()]
    dtype = jnp.result_type(*(total for total, _ in pairs))
    stacked = jnp.stack([x.astype(dtype) for pair in pairs for x in pair])
    if axis_name is not None:
        stacked = jax.lax.psum(stacked, axis_name)
    totals, counts = stacked[0::2], stacked[1::2]
    means = totals / jnp.maximum(counts, 1)
    return {name: means[k] for k, name in enumerate(named)}


def masked_mean(values, where=None, *, axis_name: str | None = None) -> jax.Array:
    """Mean of ``values`` over the entries where ``where`` is True.

    Args:
      values: float array of any shape, e.g. per-example or per-token losses.
      where: optional bool mask of the values' rank, each dimension equal to the
        values' or 1 (``[B, 1]`` masks whole rows of ``[B, L]``); a mask of another
        rank is an error, never a silent broadcast.
      axis_name: the data-parallel axis to reduce over (``jax.pmap`` or
        ``jax.shard_map``), or ``None``. With it, every device gets
        ``psum(sum) / psum(count)``: the mean over the global batch.

    Returns:
      A scalar; 0 (not NaN) when every entry is masked.

    Examples:
      >>> import jax.numpy as jnp, jaxkd
      >>> jaxkd.masked_mean(jnp.array([1.0, 2.0, 9.0]), jnp.array([True, True, False]))
      Array(1.5, dtype=float32)
    """
    return masked_means({"mean": (values, where)}, axis_name=axis_name)["mean"]


def gather_examples(x, axis_name: str | None):
    """The global batch of ``x`` (leading axis), gathered over ``axis_name``.

    ``None`` returns ``x``. Batch-level losses (DIST, RKD, similarity-preserving,
    PKT) call this so that their value, and their gradient, are those of the whole
    data-parallel batch rather than of one shard. Gathering is in device order,
    which is the order of the global batch under ``shard_map`` and ``pmap``.
    """
    if axis_name is None or x is None:
        return x
    return jax.lax.all_gather(x, axis_name, axis=0, tiled=True)


def pmean_packed(tree: PyTree, axis_name: str) -> PyTree:
    """``lax.pmean`` of the floating leaves of ``tree`` as one collective.

    All floating leaves go to a single variadic ``psum`` (one all-reduce of a tuple
    in the compiled program, not one per leaf); integer, bool and PRNG-key leaves
    are returned unchanged.
    """
    leaves, treedef = jax.tree.flatten(tree)
    floating = [
        index
        for index, leaf in enumerate(leaves)
        if jnp.issubdtype(jnp.result_type(leaf), jnp.floating)
    ]
    averaged = jax.lax.pmean([leaves[index] for index in floating], axis_name)
    leaves = list(leaves)
    for index, value in zip(floating, averaged, strict=True):
        leaves[index] = value
    return jax.tree.unflatten(treedef, leaves)
