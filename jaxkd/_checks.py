"""Argument checks shared by every loss, run once at trace time.

Each check raises a ``TypeError`` or ``ValueError`` that names the argument and the
shapes or values involved, so that a wrong call fails where it is made instead of
returning a silently broadcast result or a NaN several layers later.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np


def is_concrete(value) -> bool:
    """Whether ``value`` is known at trace time (not a JAX tracer)."""
    return not isinstance(value, jax.core.Tracer)


def check_floating(name: str, array) -> None:
    """Raises ``TypeError`` unless ``array`` has a floating dtype."""
    dtype = jnp.result_type(array)
    if not jnp.issubdtype(dtype, jnp.floating):
        raise TypeError(
            f"`{name}` must have a floating dtype, got {dtype} with shape {jnp.shape(array)}; "
            "cast integer logits explicitly, e.g. `logits.astype(jnp.float32)`."
        )


def check_integer(name: str, array) -> None:
    """Raises ``TypeError`` unless ``array`` has an integer dtype."""
    dtype = jnp.result_type(array)
    if not jnp.issubdtype(dtype, jnp.integer):
        raise TypeError(
            f"`{name}` must hold integer class indices, got dtype {dtype} with shape "
            f"{jnp.shape(array)}."
        )


def check_same_shape(names: Sequence[str], arrays: Sequence) -> None:
    """Raises ``ValueError`` unless all arrays have the same shape."""
    shapes = [jnp.shape(a) for a in arrays]
    if any(s != shapes[0] for s in shapes[1:]):
        described = ", ".join(f"`{n}` {s}" for n, s in zip(names, shapes, strict=True))
        raise ValueError(f"Shapes must match exactly (no broadcasting): got {described}.")


def normalize_axis(axis: int, ndim: int, name: str = "axis") -> int:
    """Returns ``axis`` as a non-negative int, or raises ``ValueError``."""
    if not isinstance(axis, int | np.integer):
        raise TypeError(f"`{name}` must be a single int, got {axis!r}.")
    if not -ndim <= axis < ndim:
        raise ValueError(f"`{name}`={axis} is out of range for an array of rank {ndim}.")
    return int(axis) % ndim


def check_positive_scalar(name: str, value) -> None:
    """Raises unless ``value`` is a scalar; if concrete, it must be finite and > 0.

    Traced values (for example a schedule evaluated at a traced step) are only
    checked for shape: their value is unknown at trace time.
    """
    if jnp.ndim(value) != 0:
        raise ValueError(f"`{name}` must be a scalar, got shape {jnp.shape(value)}.")
    if is_concrete(value):
        number = float(value)
        if not (math.isfinite(number) and number > 0):
            raise ValueError(f"`{name}` must be a positive finite number, got {number}.")


def check_non_negative(name: str, value) -> None:
    """Raises unless ``value`` is a scalar; if concrete, it must be >= 0 (a weight)."""
    if np.ndim(value) != 0:
        raise ValueError(f"`{name}` must be a scalar, got shape {np.shape(value)}.")
    if is_concrete(value) and not float(value) >= 0:
        raise ValueError(f"`{name}` must be a non-negative weight, got {float(value)}.")


def check_unit_interval(name: str, value, *, open_interval: bool = False) -> None:
    """Raises unless ``value`` is a scalar; if concrete, it must lie in [0, 1]."""
    if jnp.ndim(value) != 0:
        raise ValueError(f"`{name}` must be a scalar, got shape {jnp.shape(value)}.")
    if is_concrete(value):
        number = float(value)
        if open_interval:
            ok = 0.0 < number < 1.0
            interval = "(0, 1)"
        else:
            ok = 0.0 <= number <= 1.0
            interval = "[0, 1]"
        if not ok:
            raise ValueError(f"`{name}` must lie in {interval}, got {number}.")


def normalize_where(where, logits_shape: tuple[int, ...], axis: int):
    """Validates a ``where`` mask and returns it in one of two canonical shapes.

    Accepted, as optax takes them (numpy broadcasting without rank promotion):

    * a mask of the logits' rank whose every dimension equals the logits' or is 1,
      e.g. ``[B, L, 1]`` or ``[1, 1, V]`` for logits ``[B, L, V]``;
    * a mask of the logits' shape without ``axis`` (one entry per example).

    Args:
      where: ``None`` or a boolean array as above.
      logits_shape: shape of the logits.
      axis: non-negative class axis.

    Returns:
      ``None`` when ``where`` is ``None``; an array of the logits' shape without
      ``axis`` when the mask is per example (its class dimension, if any, is 1);
      else a bool array of exactly ``logits_shape`` (a per-class mask).

    Raises:
      TypeError: ``where`` is not boolean.
      ValueError: any other shape, naming it and the logits' shape.
    """
    if where is None:
        return None
    where = jnp.asarray(where)
    if where.dtype != jnp.bool_:
        raise TypeError(f"`where` must be a boolean mask, got dtype {where.dtype}.")
    logits_shape = tuple(logits_shape)
    example_shape = logits_shape[:axis] + logits_shape[axis + 1 :]
    if where.shape == example_shape:
        return where
    broadcastable = where.ndim == len(logits_shape) and all(
        size in (1, full) for size, full in zip(where.shape, logits_shape, strict=True)
    )
    if not broadcastable:
        per_example = logits_shape[:axis] + (1,) + logits_shape[axis + 1 :]
        raise ValueError(
            f"`where` has shape {where.shape}; expected the logits' shape {logits_shape} "
            f"(a per-class mask), a shape of the same rank whose dimensions are those or 1 "
            f"(broadcast, e.g. {per_example} per example), or {example_shape} (a "
            f"per-example mask)."
        )
    if where.shape[axis] == 1:
        return jnp.broadcast_to(jnp.squeeze(where, axis), example_shape)
    return jnp.broadcast_to(where, logits_shape)


def class_mask(where, logits_shape: tuple[int, ...], axis: int):
    """Turns a ``where`` argument into a boolean mask of the logits' shape.

    Accepts the shapes of :func:`normalize_where`: a per-example mask
    (the logits' shape without ``axis``, or size 1 along ``axis``) is expanded along
    ``axis``, so a masked example has every class masked; a mask of the logits' rank
    is broadcast with ``jnp.broadcast_to``. A mask of any other rank or with a
    dimension that is neither 1 nor the logits' raises ``ValueError``.

    Args:
      where: ``None`` or a boolean array.
      logits_shape: shape of the logits.
      axis: non-negative class axis.

    Returns:
      ``None`` when ``where`` is ``None``, else a bool array of shape ``logits_shape``.
    """
    where = normalize_where(where, logits_shape, axis)
    if where is None or where.shape == tuple(logits_shape):
        return where
    return jnp.broadcast_to(jnp.expand_dims(where, axis), tuple(logits_shape))


def check_labels(labels, logits_shape: tuple[int, ...], axis: int, where=None) -> None:
    """Checks integer ``labels`` against logits, and their range when concrete.

    Labels of masked-out examples (``where`` False, per-example mask) may hold any
    padding value; with a per-class mask, a label must not name a masked class
    (rows with every class masked count as masked examples).
    """
    check_integer("labels", labels)
    example_shape = logits_shape[:axis] + logits_shape[axis + 1 :]
    if jnp.shape(labels) != example_shape:
        raise ValueError(
            f"`labels` has shape {jnp.shape(labels)}; expected {example_shape}: the logits' "
            f"shape {tuple(logits_shape)} without the class axis {axis}."
        )
    if not is_concrete(labels) or (where is not None and not is_concrete(where)):
        return
    # Any accepted mask shape; computed now, even inside a trace (concrete inputs).
    with jax.ensure_compile_time_eval():
        where = normalize_where(where, logits_shape, axis)
    num_classes = logits_shape[axis]
    values = np.asarray(labels)
    kept_classes = None
    if where is not None and np.shape(where) == example_shape:
        values = values[np.asarray(where)]
    elif where is not None:
        kept_classes = np.moveaxis(np.asarray(where), axis, -1)
        kept_examples = kept_classes.any(axis=-1)
        values, kept_classes = values[kept_examples], kept_classes[kept_examples]
    if values.size and (values.min() < 0 or values.max() >= num_classes):
        raise ValueError(
            f"`labels` must lie in [0, {num_classes}) for logits with {num_classes} classes "
            f"along axis {axis}; got values in [{values.min()}, {values.max()}]."
        )
    if kept_classes is not None and values.size:
        on_masked = ~np.take_along_axis(kept_classes, values[:, None], axis=-1)[:, 0]
        if on_masked.any():
            raise ValueError(
                f"`labels` name classes that `where` masks out: labels "
                f"{values[on_masked].tolist()} of examples that keep other classes."
            )
