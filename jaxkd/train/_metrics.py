"""Per-example evaluation metrics: accuracy and teacher/student agreement."""

from __future__ import annotations

import jax
import jax.numpy as jnp

from jaxkd import _checks


def top1_agreement(student_logits, teacher_logits, *, axis: int = -1) -> jax.Array:
    """1.0 where the student's top-1 class equals the teacher's, else 0.0.

    Args:
      student_logits: float array ``[..., C]``.
      teacher_logits: float array, same shape.
      axis: the class axis.

    Returns:
      float32 array of the logits' shape without ``axis``.
    """
    _checks.check_same_shape(["student_logits", "teacher_logits"], [student_logits, teacher_logits])
    same = jnp.argmax(student_logits, axis=axis) == jnp.argmax(teacher_logits, axis=axis)
    return same.astype(jnp.float32)


def accuracy(logits, labels, *, axis: int = -1) -> jax.Array:
    """1.0 where ``argmax(logits)`` equals the integer label, else 0.0.

    Args:
      logits: float array ``[..., C]``.
      labels: int array of the logits' shape without ``axis``.
      axis: the class axis.

    Returns:
      float32 array of the labels' shape.
    """
    axis = _checks.normalize_axis(axis, jnp.ndim(logits))
    _checks.check_labels(labels, jnp.shape(logits), axis)
    return (jnp.argmax(logits, axis=axis) == labels).astype(jnp.float32)
