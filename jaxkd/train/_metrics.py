"""Evaluation metrics: accuracy, teacher/student agreement, mutual information of predictions."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

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


# Classes up to which make_eval_step's default ("auto") sums the dense [C, C] joint:
# 1024 x 1024 float32 counts are 4 MiB, psum-ed once per eval batch.
DENSE_JOINT_MAX_CLASSES = 1024


def _checked_where(student_logits, teacher_logits, where):
    """Checks two logits arrays and returns ``where`` as a per-example mask (or None)."""
    _checks.check_same_shape(["student_logits", "teacher_logits"], [student_logits, teacher_logits])
    _checks.check_floating("student_logits", student_logits)
    _checks.check_floating("teacher_logits", teacher_logits)
    shape = jnp.shape(student_logits)
    if len(shape) < 1:
        raise ValueError(f"The logits need a class axis, got shape {shape}.")
    where = _checks.normalize_where(where, shape, len(shape) - 1)
    if where is not None and jnp.ndim(where) == len(shape):
        raise ValueError(
            f"`where` must mark examples, with shape {shape[:-1]} (or {shape[:-1] + (1,)}); "
            f"got a per-class mask of shape {jnp.shape(where)}."
        )
    return where


def _predicted_labels(student_logits, teacher_logits, where):
    """Flat ``(teacher_labels, student_labels, weights)`` of the logits' examples."""
    teacher_labels = jnp.argmax(teacher_logits, axis=-1).reshape(-1)
    student_labels = jnp.argmax(student_logits, axis=-1).reshape(-1)
    if where is None:
        weights = jnp.ones(teacher_labels.shape, jnp.float32)
    else:
        weights = jnp.reshape(where, (-1,)).astype(jnp.float32)
    return teacher_labels, student_labels, weights


def prediction_joint_counts(student_logits, teacher_logits, *, where=None) -> jax.Array:
    """Counts of (teacher's top-1 class, student's top-1 class) pairs.

    .. math::
      N_{ts} = \\#\\{n : \\arg\\max_c z^T_{n,c} = t,\\ \\arg\\max_c z^S_{n,c} = s,\\
        \\text{where}_n\\}

    The empirical joint distribution of the two models' predicted labels is
    ``N / N.sum()``; :func:`mutual_information` reads it. Counts are exact
    integers in float32 up to 2**24 per cell, and add up over batches and devices
    (``lax.psum``).

    Args:
      student_logits: float array ``[..., C]``, e.g. ``[B, C]`` or ``[B, L, V]``;
        classes on the last axis.
      teacher_logits: float array, same shape.
      where: optional bool mask of the examples (tokens) to count, of the logits'
        shape without the class axis (``[B]``, ``[B, L]``) or with it of size 1;
        masked examples count 0.

    Returns:
      float32 ``[C, C]``: row = the teacher's label, column = the student's.
    """
    where = _checked_where(student_logits, teacher_logits, where)
    return _joint_counts(student_logits, teacher_logits, where)


@jax.jit
def _joint_counts(student_logits, teacher_logits, where):
    teacher_labels, student_labels, weights = _predicted_labels(
        student_logits, teacher_logits, where
    )
    num_classes = jnp.shape(student_logits)[-1]
    joint = jnp.zeros((num_classes, num_classes), jnp.float32)
    return joint.at[teacher_labels, student_labels].add(weights)


def prediction_pairs(student_logits, teacher_logits, *, where=None) -> jax.Array:
    """The (teacher's top-1, student's top-1) label pair of every example, flattened.

    The sparse counterpart of :func:`prediction_joint_counts` for large
    vocabularies, whose ``[V, V]`` joint would not fit: gather the pairs and count
    them on the host with :func:`mutual_information_of_labels`.

    Args:
      student_logits: float array ``[..., C]``; classes on the last axis.
      teacher_logits: float array, same shape.
      where: optional bool mask of the examples, as in :func:`prediction_joint_counts`.

    Returns:
      int32 ``[N, 2]`` with ``N`` the number of examples (``B`` or ``B * L``):
      column 0 the teacher's label, column 1 the student's; ``-1`` in both columns
      where ``where`` is False.
    """
    where = _checked_where(student_logits, teacher_logits, where)
    return _pairs(student_logits, teacher_logits, where)


@jax.jit
def _pairs(student_logits, teacher_logits, where):
    teacher_labels, student_labels, weights = _predicted_labels(
        student_logits, teacher_logits, where
    )
    pairs = jnp.stack([teacher_labels, student_labels], axis=-1).astype(jnp.int32)
    return jnp.where(weights[:, None] > 0, pairs, -1)


def mutual_information(joint_counts) -> tuple[jax.Array, jax.Array]:
    """Mutual information of two labelings from their joint counts, and its normalization.

    With ``p = joint_counts / joint_counts.sum()``, ``p_t`` its row sums and
    ``p_s`` its column sums, in nats:

    .. math::
      I(T; S) = \\sum_{t, s:\\ p_{ts} > 0} p_{ts} \\log \\frac{p_{ts}}{p_t\\, p_s},
      \\qquad
      \\mathrm{NMI}(T; S) = \\frac{I(T; S)}{\\sqrt{H(T)\\, H(S)}}

    with ``H`` the Shannon entropy of a marginal (the geometric-mean normalization
    of Strehl and Ghosh). ``I`` is 0 for independent labelings and ``H(T) = H(S)``
    when each label determines the other; it is unchanged by a relabeling
    (permutation) of either side. ``NMI`` lies in ``[0, 1]`` and is 1 exactly when
    the labels correspond one to one.

    Degenerate cases (never NaN): where an entropy is 0 (a labeling with one
    class), ``I = 0`` and ``NMI`` is defined as **1 if both labelings have a single
    class** (they correspond one to one: both put every example in one group) and
    **0 if only one does** (a constant carries no information about the other).
    An all-zero joint (nothing counted) gives ``(0, 0)``. Both values are clipped to
    their ranges against rounding (``I >= 0``, ``0 <= NMI <= 1``).

    Args:
      joint_counts: non-negative ``[C_T, C_S]`` counts or weights, integer or
        float (e.g. :func:`prediction_joint_counts`'s ``[C, C]``); rows index the
        first labeling (the teacher's), columns the second (the student's).

    Returns:
      ``(mi, normalized_mi)``: float scalars (float32 unless x64 is enabled).

    References:
      Cluster Ensembles -- A Knowledge Reuse Framework for Combining Multiple
      Partitions, A. Strehl and J. Ghosh, JMLR 3, 2002,
      https://www.jmlr.org/papers/v3/strehl02a.html

      Information Theoretic Measures for Clusterings Comparison: Variants,
      Properties, Normalization and Correction for Chance, N. X. Vinh, J. Epps and
      J. Bailey, JMLR 11, 2010, https://www.jmlr.org/papers/v11/vinh10a.html
    """
    dtype = jnp.result_type(joint_counts)
    if dtype == jnp.bool_ or not (
        jnp.issubdtype(dtype, jnp.integer) or jnp.issubdtype(dtype, jnp.floating)
    ):
        raise TypeError(f"`joint_counts` must hold integer or float counts, got dtype {dtype}.")
    if jnp.ndim(joint_counts) != 2:
        raise ValueError(
            f"`joint_counts` must be a [C_T, C_S] matrix, got shape {jnp.shape(joint_counts)}."
        )
    if _checks.is_concrete(joint_counts) and np.any(np.asarray(joint_counts) < 0):
        raise ValueError("`joint_counts` must be non-negative counts; got a negative entry.")
    return _mutual_information(jnp.asarray(joint_counts).astype(jnp.result_type(float)))


@jax.jit  # one compiled program, not one per operation, when called eagerly
def _mutual_information(counts):
    total = jnp.sum(counts)
    joint = counts / jnp.where(total > 0, total, 1.0)
    teacher_marginal = jnp.sum(joint, axis=1)
    student_marginal = jnp.sum(joint, axis=0)
    present = joint > 0
    log_ratio = (
        jnp.log(jnp.where(present, joint, 1.0))
        - jnp.log(jnp.where(teacher_marginal > 0, teacher_marginal, 1.0))[:, None]
        - jnp.log(jnp.where(student_marginal > 0, student_marginal, 1.0))[None, :]
    )
    mi = jnp.maximum(jnp.sum(jnp.where(present, joint * log_ratio, 0.0)), 0.0)
    teacher_classes = jnp.sum(teacher_marginal > 0)
    student_classes = jnp.sum(student_marginal > 0)
    denominator = jnp.sqrt(_entropy_of(teacher_marginal) * _entropy_of(student_marginal))
    ratio = jnp.clip(mi / jnp.where(denominator > 0, denominator, 1.0), 0.0, 1.0)
    normalized = jnp.where(
        (teacher_classes > 1) & (student_classes > 1),
        ratio,
        jnp.where((teacher_classes == 1) & (student_classes == 1), 1.0, 0.0),
    )
    return mi, normalized.astype(mi.dtype)


def _entropy_of(probabilities):
    """``-sum p log p`` over ``p > 0``, in nats."""
    present = probabilities > 0
    return -jnp.sum(
        jnp.where(present, probabilities * jnp.log(jnp.where(present, probabilities, 1.0)), 0.0)
    )


def mutual_information_of_labels(
    teacher_labels, student_labels, *, where=None
) -> tuple[float, float]:
    """:func:`mutual_information` of two integer labelings, counted on the host.

    For vocabularies whose ``[V, V]`` joint is too large to hold: only the label
    pairs that occur are counted (``np.unique``), so memory grows with the number
    of examples, not with ``V**2``. Same definitions and degenerate cases as
    :func:`mutual_information`, computed in float64 numpy (not jit-able).

    Args:
      teacher_labels: int array ``[N]`` (any shape; flattened), e.g. column 0 of
        :func:`prediction_pairs` accumulated over batches.
      student_labels: int array of the same shape.
      where: optional bool array of the same shape: the examples to count.

    Returns:
      ``(mi, normalized_mi)`` as Python floats, in nats.
    """
    teacher_labels = np.asarray(teacher_labels)
    student_labels = np.asarray(student_labels)
    for name, labels in (("teacher_labels", teacher_labels), ("student_labels", student_labels)):
        if not np.issubdtype(labels.dtype, np.integer):
            raise TypeError(f"`{name}` must hold integer labels, got dtype {labels.dtype}.")
    if teacher_labels.shape != student_labels.shape:
        raise ValueError(
            f"Shapes must match exactly: `teacher_labels` {teacher_labels.shape}, "
            f"`student_labels` {student_labels.shape}."
        )
    if where is not None:
        where = np.asarray(where)
        if where.dtype != np.bool_ or where.shape != teacher_labels.shape:
            raise ValueError(
                f"`where` must be a bool mask of the labels' shape {teacher_labels.shape}, "
                f"got {where.dtype} {where.shape}."
            )
        teacher_labels, student_labels = teacher_labels[where], student_labels[where]
    teacher_labels = teacher_labels.reshape(-1)
    student_labels = student_labels.reshape(-1)
    total = teacher_labels.size
    if total == 0:
        return 0.0, 0.0
    _, teacher_index, teacher_counts = np.unique(
        teacher_labels, return_inverse=True, return_counts=True
    )
    _, student_index, student_counts = np.unique(
        student_labels, return_inverse=True, return_counts=True
    )
    # Pair codes over the classes that occur: at most total**2, within int64.
    codes = teacher_index.astype(np.int64) * student_counts.size + student_index
    pair_codes, pair_counts = np.unique(codes, return_counts=True)
    teacher_of = teacher_counts[pair_codes // student_counts.size].astype(np.float64)
    student_of = student_counts[pair_codes % student_counts.size].astype(np.float64)
    pair_counts = pair_counts.astype(np.float64)
    terms = pair_counts / total * np.log(pair_counts * total / (teacher_of * student_of))
    mi = max(float(np.sum(terms)), 0.0)
    if teacher_counts.size == 1 or student_counts.size == 1:
        both_constant = teacher_counts.size == 1 and student_counts.size == 1
        return mi, 1.0 if both_constant else 0.0

    def entropy_of(counts):
        p = counts / total
        return float(-np.sum(p * np.log(p)))

    denominator = np.sqrt(entropy_of(teacher_counts) * entropy_of(student_counts))
    if denominator == 0:
        return mi, 0.0
    return mi, float(np.clip(mi / denominator, 0.0, 1.0))
