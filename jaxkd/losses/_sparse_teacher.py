r"""Distillation from a sparse teacher: its top-k log-probabilities and its tail mass.

A cached teacher (one whose outputs are computed once and read back during training,
so that training runs no teacher forward) cannot store ``[tokens, V]`` distributions
for a large vocabulary. Caches therefore keep, per token, the teacher's ``k`` largest
log-probabilities and their vocabulary indices (as Arcee's DistillKit does, and
as Peng et al., "Pre-training Distillation for Large Language Models: A Design
Space Exploration", 2024, https://arxiv.org/abs/2410.16215, do with truncated
teacher logits). :class:`SparseTeacher` adds one number: the log of the tail mass
``log(1 - sum_k p_i)``, which turns the ``k`` classes into a distribution on
``k + 1`` bins.

Two losses compare a student's full logits with such a teacher:

* :func:`tail_bucket_kl`: the KL divergence between the two distributions on the
  ``k + 1`` bins (the teacher's classes and one bucket for the rest). It is a KL
  between distributions, hence never negative, equals the full KL at ``k = V`` and
  never exceeds it (data-processing inequality: the bins are a function of the
  class).
* :func:`top_k_kl`: both distributions restricted to the teacher's ``k`` classes and
  renormalized. It is blind to the mass the student puts outside those classes, a
  bias that Anshumann et al. (2025) show for top-k distillation.

Conventions: the class axis is last; the teacher's fields have the student's leading
shape (``[N]`` or ``[B, L]``); ``where`` is a per-token mask of that leading shape,
and masked tokens give 0 with zero gradients whatever their teacher entries hold
(out-of-range indices, NaN). The teacher's log-probabilities must be softened at the
loss's ``temperature`` (build them with :func:`top_k_teacher` at that temperature):
the tail mass at one temperature does not determine the tail mass at another.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from jaxkd import _checks
from jaxkd.losses._distributions import (
    _as_compute_dtype,
    masked_logsumexp,
    prepare_logits,
    scaled_log_softmax,
)
from jaxkd.losses._divergence_terms import _kl_integrand, _kl_terms_pair
from jaxkd.losses._kd_losses import _poison


class SparseTeacher(NamedTuple):
    """A teacher's softened distribution, kept sparse: top-k classes and tail mass.

    Attributes:
      log_probs: float array ``[..., k]``, the teacher's log-probabilities of its
        ``k`` largest classes, sorted in decreasing order.
      indices: int array ``[..., k]``, those classes' vocabulary indices, distinct
        within a token and in ``[0, V)``.
      log_tail: float array ``[...]``, ``log(1 - sum(exp(log_probs)))``: the log of
        the mass on every other class (``-inf`` when ``k = V``).
    """

    log_probs: jax.Array
    indices: jax.Array
    log_tail: jax.Array


def top_k_teacher(
    teacher_logits, k: int, *, temperature=1.0, axis: int = -1, where=None
) -> SparseTeacher:
    r"""The sparse form of a teacher: its top-k log-probabilities and its log tail mass.

    With :math:`p = \mathrm{softmax}(z / T)` and :math:`K` the ``k`` classes of largest
    :math:`p`:

    .. math::
      \log \tau = \log \sum_{i \notin K} p_i
        = \operatorname{logsumexp}_{i \notin K}(z_i / T) - \operatorname{logsumexp}_i(z_i / T)

    computed as a masked log-sum-exp over the classes outside the top k, not as
    ``log1p(-sum(p_K))``, which cancels to 0 (or ``-inf``) when the tail holds less
    than float32's epsilon of the mass. A tail of ``1e-30`` keeps its relative
    precision.

    Args:
      teacher_logits: float array ``[..., V, ...]`` (class axis ``axis``).
      k: number of classes kept, an int in ``[1, V]``.
      temperature: positive scalar ``T``: the returned log-probabilities are those of
        ``softmax(teacher_logits / T)``.
      axis: the class axis; the outputs' class axis is last.
      where: optional bool mask as :func:`jaxkd.log_softmax` takes it: per class
        (padded vocabulary entries are never chosen before kept ones, and get
        log-probability ``-inf`` when fewer than ``k`` classes are kept) or per
        token (a masked token has every log-probability and its log tail ``-inf``).

    Returns:
      A :class:`SparseTeacher` with ``log_probs`` (float32, or float64 for float64
      logits) and ``indices`` (int32) of shape ``[..., k]`` and ``log_tail`` of
      shape ``[...]``: the logits' shape without ``axis``. ``k = V`` gives
      ``log_tail = -inf``. Ties between equal logits go to the lower index.

    Examples:
      >>> import jax.numpy as jnp, jaxkd
      >>> sparse = jaxkd.top_k_teacher(jnp.log(jnp.array([0.1, 0.6, 0.3])), 2)
      >>> jnp.exp(sparse.log_probs).round(3), sparse.indices, jnp.exp(sparse.log_tail).round(3)
      (Array([0.6, 0.3], dtype=float32), Array([1, 2], dtype=int32), Array(0.1, dtype=float32))
    """
    scaled, mask, axis = prepare_logits("teacher_logits", teacher_logits, temperature, axis, where)
    num_classes = scaled.shape[axis]
    _check_k(k, num_classes)
    scaled = jnp.moveaxis(scaled, axis, -1)
    mask = None if mask is None else jnp.moveaxis(mask, axis, -1)
    log_p = scaled_log_softmax(scaled, scaled.ndim - 1, mask)
    # A fully masked row is all -inf; -inf entries then tie and go to the lowest index.
    log_probs, indices = jax.lax.top_k(log_p, k)
    indices = indices.astype(jnp.int32)
    outside = ~_in_top_k(indices, num_classes)
    if mask is not None:
        outside = outside & mask
    log_tail = masked_logsumexp(log_p, axis=scaled.ndim - 1, mask=outside)
    return SparseTeacher(log_probs, indices, log_tail)


def tail_bucket_kl(
    student_logits, teacher: SparseTeacher, *, temperature=1.0, where=None
) -> jax.Array:
    r"""KL divergence on the teacher's top-k classes plus one bucket for the rest.

    With :math:`p_s = \mathrm{softmax}(z_s / T)`, the teacher's classes
    :math:`i_1, \dots, i_k` and the tail masses
    :math:`\tau = 1 - \sum_j p_{i_j}` of each distribution:

    .. math::
      T^2 \left[\sum_{j=1}^{k} p_{t,i_j} \log \frac{p_{t,i_j}}{p_{s,i_j}}
        + \tau_t \log \frac{\tau_t}{\tau_s}\right]

    The student's tail is computed from its full logits as a log-sum-exp over the
    classes outside the teacher's ``k`` (never as ``1 - sum``, which cancels). This is
    the KL between two distributions on ``k + 1`` bins: never negative, equal to
    :func:`jaxkd.kl_divergence` at ``k = V``, and never above it for any ``k``
    (data-processing inequality). Unlike :func:`top_k_kl`, it penalizes a student
    that puts the teacher's tail mass anywhere other than outside the top k.

    Each bin contributes :math:`p \log(p/q) - p + q \ge 0` (the added terms sum to 0
    when the teacher's bins sum to 1), so the value is non-negative even when the
    stored teacher is off by a rounding error; the gradient is that of the KL. The
    gradient with respect to ``student_logits`` is :math:`T (p_s - \tilde p)`, where
    :math:`\tilde p` spreads the teacher's tail mass over the student's tail classes
    in the student's proportions.

    Args:
      student_logits: float array ``[..., V]`` (bfloat16 is computed in float32).
      teacher: a :class:`SparseTeacher` with ``log_probs`` and ``indices`` ``[..., k]``
        and ``log_tail`` ``[...]``, softened at ``temperature``
        (:func:`top_k_teacher`); ``1 <= k <= V``.
      temperature: positive scalar ``T`` of the student's softmax (and of the
        teacher's, which must have been built at it).
      where: optional bool per-token mask ``[...]`` (or ``[..., 1]``). Masked tokens
        give 0 with zero gradients whatever their teacher entries hold.

    Returns:
      float32 array ``[...]``. A kept token with an index outside ``[0, V)`` raises
      when the inputs are concrete and gives NaN under ``jit``; repeated indices
      within a token raise when concrete and are not detected under ``jit`` (the
      value is then wrong: build the teacher with :func:`top_k_teacher`).

    References:
      Anshumann, Zaidi, Kedia, Ahn, Kwon, Lee, Lee and Lee, "Sparse Logit Sampling:
      Accelerating Knowledge Distillation in LLMs", ACL 2025.
      https://arxiv.org/abs/2503.16870

      Cover and Thomas, "Elements of Information Theory", 2nd ed., 2006, section 2.8
      (data-processing inequality).
    """
    parts = _sparse_parts(student_logits, teacher, temperature, where)
    log_p_s = scaled_log_softmax(parts.student, parts.student.ndim - 1, None)
    log_q = jnp.take_along_axis(log_p_s, parts.indices, axis=-1)
    log_q_tail = masked_logsumexp(
        log_p_s, axis=log_p_s.ndim - 1, mask=~_in_top_k(parts.indices, log_p_s.shape[-1])
    )
    log_p = jnp.concatenate([parts.log_probs, parts.log_tail[..., None]], axis=-1)
    log_q = jnp.concatenate([log_q, log_q_tail[..., None]], axis=-1)
    return _finish(_bin_kl(log_p, log_q), parts, temperature)


def top_k_kl(student_logits, teacher: SparseTeacher, *, temperature=1.0, where=None) -> jax.Array:
    r"""KL divergence of the two distributions restricted to the teacher's top k.

    Both distributions are restricted to the teacher's classes
    :math:`i_1, \dots, i_k` and renormalized there:

    .. math::
      \hat p_j = \frac{p_{i_j}}{\sum_{l=1}^{k} p_{i_l}}, \qquad
      T^2 \sum_{j=1}^{k} \hat p_{t,j} \log \frac{\hat p_{t,j}}{\hat p_{s,j}}

    It is non-negative and equals :func:`jaxkd.kl_divergence` at ``k = V``; ``k = 1``
    gives 0. Bias: it ignores how much mass the student puts outside the teacher's
    top k. A student whose probabilities on those ``k`` classes are proportional to
    the teacher's has loss 0 whatever its tail (even with almost all its mass
    there), so the student is never taught the teacher's tail mass, and its
    calibration suffers; Anshumann et al. (2025) show that top-k distillation gives
    biased estimates of the teacher's distribution. :func:`tail_bucket_kl` keeps
    the tail as one more bin.

    The teacher's log-probabilities are expected at ``temperature``, as in
    :func:`tail_bucket_kl`. (Only here could another temperature be recovered: after
    the renormalization, ``log_probs * T_0 / T`` of a teacher softened at ``T_0``
    gives the same loss as one softened at ``T``.)

    Args:
      student_logits: float array ``[..., V]`` (bfloat16 is computed in float32).
      teacher: a :class:`SparseTeacher` (its ``log_tail`` is not used, but must have
        the leading shape ``[...]``).
      temperature: positive scalar ``T``.
      where: optional bool per-token mask ``[...]`` (or ``[..., 1]``). Masked tokens
        give 0 with zero gradients whatever their teacher entries hold.

    Returns:
      float32 array ``[...]``. A kept token with an index outside ``[0, V)`` raises
      when the inputs are concrete and gives NaN under ``jit``; repeated indices
      within a token raise when concrete and are not detected under ``jit`` (the
      value is then wrong: build the teacher with :func:`top_k_teacher`).

    References:
      Anshumann, Zaidi, Kedia, Ahn, Kwon, Lee, Lee and Lee, "Sparse Logit Sampling:
      Accelerating Knowledge Distillation in LLMs", ACL 2025.
      https://arxiv.org/abs/2503.16870
    """
    parts = _sparse_parts(student_logits, teacher, temperature, where)
    chosen = jnp.take_along_axis(parts.student, parts.indices, axis=-1)
    return _finish(
        _bin_kl(_renormalized(parts.log_probs), _renormalized(chosen)), parts, temperature
    )


# Shared pieces.


class _SparseParts(NamedTuple):
    """Validated inputs with every masked or bad token made harmless.

    ``student`` is ``logits / T`` in float32 (0 at masked tokens); ``indices`` are
    in range and distinct everywhere (``0..k-1`` at masked and bad tokens);
    ``log_probs`` and ``log_tail`` are finite-safe placeholders at masked tokens.
    """

    student: jax.Array
    log_probs: jax.Array
    indices: jax.Array
    log_tail: jax.Array
    kept: jax.Array | None
    bad: jax.Array


def _check_k(k, num_classes: int) -> None:
    if isinstance(k, bool) or not isinstance(k, int | np.integer):
        raise TypeError(f"`k` must be an int, got {k!r}.")
    if not 1 <= int(k) <= num_classes:
        raise ValueError(f"`k` must lie in [1, V] = [1, {num_classes}], got {k}.")


def _in_top_k(indices: jax.Array, num_classes: int) -> jax.Array:
    """Bool ``[..., V]``: True at the classes named in ``indices [..., k]``."""
    flat = indices.reshape(-1, indices.shape[-1])
    rows = jnp.arange(flat.shape[0])[:, None]
    hits = jnp.zeros((flat.shape[0], num_classes), bool).at[rows, flat].set(True, mode="drop")
    return hits.reshape(indices.shape[:-1] + (num_classes,))


def _check_sparse_teacher(student_logits, teacher) -> tuple[int, int]:
    """Dtypes and shapes of a student/teacher pair; returns ``(k, V)``."""
    if not isinstance(teacher, SparseTeacher):
        raise TypeError(
            "`teacher` must be a SparseTeacher(log_probs, indices, log_tail) "
            f"(see top_k_teacher), got {type(teacher).__name__}."
        )
    _checks.check_floating("student_logits", student_logits)
    _checks.check_floating("teacher.log_probs", teacher.log_probs)
    _checks.check_integer("teacher.indices", teacher.indices)
    _checks.check_floating("teacher.log_tail", teacher.log_tail)
    student_shape = jnp.shape(student_logits)
    if len(student_shape) < 1:
        raise ValueError("`student_logits` must have a class axis [..., V], got a scalar.")
    leading, num_classes = student_shape[:-1], student_shape[-1]
    shapes = {
        "teacher.log_probs": jnp.shape(teacher.log_probs),
        "teacher.indices": jnp.shape(teacher.indices),
        "teacher.log_tail": jnp.shape(teacher.log_tail),
    }
    k_shape = shapes["teacher.log_probs"]
    if (
        len(k_shape) != len(student_shape)
        or k_shape[:-1] != leading
        or shapes["teacher.indices"] != k_shape
        or shapes["teacher.log_tail"] != leading
    ):
        described = ", ".join(f"`{name}` {shape}" for name, shape in shapes.items())
        raise ValueError(
            f"For `student_logits` {student_shape} the teacher's fields must be "
            f"log_probs and indices {leading + ('k',)} and log_tail {leading}; got {described}."
        )
    k = k_shape[-1]
    if not 1 <= k <= num_classes:
        raise ValueError(
            f"The teacher keeps k={k} classes (`teacher.log_probs` {k_shape}); k must lie in "
            f"[1, V] for `student_logits` with V={num_classes} classes."
        )
    return k, num_classes


def _token_mask(where, student_shape):
    """``where`` as a per-token bool mask of the leading shape, or ``None``."""
    if where is None:
        return None
    axis = len(student_shape) - 1
    mask = _checks.normalize_where(where, student_shape, axis)
    if mask.shape != tuple(student_shape[:-1]):
        raise ValueError(
            f"`where` must be a per-token mask of shape {tuple(student_shape[:-1])} (or with "
            f"a trailing 1), got {jnp.shape(where)}: a sparse teacher has no per-class mask "
            "(give padded vocabulary entries -inf logits instead)."
        )
    return mask


def _check_index_values(indices, mask, num_classes: int) -> None:
    """Range and distinctness of the indices of kept tokens, when concrete."""
    if not _checks.is_concrete(indices) or (mask is not None and not _checks.is_concrete(mask)):
        return
    values = np.asarray(indices).reshape(-1, np.shape(indices)[-1])
    if mask is not None:
        values = values[np.asarray(mask).reshape(-1)]
    if not values.size:
        return
    if values.min() < 0 or values.max() >= num_classes:
        raise ValueError(
            f"`teacher.indices` must lie in [0, {num_classes}) for `student_logits` with "
            f"{num_classes} classes at kept tokens; got values in [{values.min()}, "
            f"{values.max()}]."
        )
    ordered = np.sort(values, axis=-1)
    repeated = np.any(ordered[:, 1:] == ordered[:, :-1], axis=-1)
    if repeated.any():
        raise ValueError(
            f"`teacher.indices` must name distinct classes within a token; "
            f"{int(repeated.sum())} kept token(s) repeat a class, e.g. "
            f"{values[np.argmax(repeated)].tolist()}."
        )


def _sparse_parts(student_logits, teacher, temperature, where) -> _SparseParts:
    k, num_classes = _check_sparse_teacher(student_logits, teacher)
    _checks.check_positive_scalar("temperature", temperature)
    kept = _token_mask(where, jnp.shape(student_logits))
    _check_index_values(teacher.indices, kept, num_classes)
    student = _as_compute_dtype(student_logits)
    log_probs = _as_compute_dtype(teacher.log_probs).astype(student.dtype)
    log_tail = _as_compute_dtype(teacher.log_tail).astype(student.dtype)
    indices = jnp.asarray(teacher.indices)
    in_range = jnp.all((indices >= 0) & (indices < num_classes), axis=-1)
    bad = ~in_range if kept is None else kept & ~in_range
    usable = in_range if kept is None else in_range & kept
    placeholder = jnp.broadcast_to(jnp.arange(k, dtype=indices.dtype), indices.shape)
    indices = jnp.where(usable[..., None], indices, placeholder)
    if kept is not None:
        # Masked tokens: a finite uniform student, a uniform teacher on the k bins and
        # an empty tail, so that every term and every gradient there is finite.
        student = jnp.where(kept[..., None], student, 0.0)
        log_probs = jnp.where(kept[..., None], log_probs, -math.log(k))
        log_tail = jnp.where(kept, log_tail, -jnp.inf)
    student = student / jnp.asarray(temperature, student.dtype)
    return _SparseParts(student, log_probs, indices, log_tail, kept, bad)


def _renormalized(log_weights: jax.Array) -> jax.Array:
    """``log_weights - logsumexp(log_weights)`` over the last axis; all ``-inf`` stays."""
    total = masked_logsumexp(log_weights, axis=log_weights.ndim - 1, keepdims=True)
    return log_weights - jnp.where(jnp.isfinite(total), total, 0.0)


def _bin_kl(log_p: jax.Array, log_q: jax.Array) -> jax.Array:
    r"""``sum_bins p log(p/q) - p + q`` over the last axis: KL when both sum to 1.

    Each term is :math:`\ge 0`; where the ratio is within ``(1/e, e)`` it is
    ``q * f(log p - log q)`` with ``f(u) = u e^u - e^u + 1`` summed as a series, so
    close distributions keep their relative precision.
    """
    both = (log_p > -jnp.inf) & (log_q > -jnp.inf)
    ratio = jnp.where(both, log_p, 0.0) - jnp.where(both, log_q, 0.0)
    near = both & (jnp.abs(ratio) < 1.0)
    ratio = jnp.where(near, ratio, 0.0)
    p, q = jnp.exp(log_p), jnp.exp(log_q)
    balanced, _ = _kl_terms_pair(near, q * _kl_integrand(ratio), p, log_p, q, log_q)
    return jnp.sum(balanced, axis=-1)


def _finish(value: jax.Array, parts: _SparseParts, temperature) -> jax.Array:
    """``T^2 * value``: 0 at masked tokens, NaN (value and gradient) at bad ones."""
    value = jnp.square(jnp.asarray(temperature, value.dtype)) * value
    if parts.kept is not None:
        value = jnp.where(parts.kept, value, 0.0)
    return _poison(parts.bad, value, parts.student, parts.student.ndim - 1)
