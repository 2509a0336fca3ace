"""Elementwise divergence terms between softened distributions, accurate when close.

A divergence here is ``T^2`` times a sum over classes of elementwise terms. At a
large temperature the student's and the teacher's distributions are close, and the
textbook terms ``p_t (log p_t - log p_s)`` subtract two separately rounded
log-probabilities; the functions here keep float32 precision there (see the
comment above :func:`softened_pair`). :mod:`jaxkd.losses._divergences` builds the public
losses from them.

The class axis may also be sharded: inside ``jax.shard_map``, with
``vocab_axis_name`` naming the mesh axis over which each device holds a slice of the
classes, every reduction over classes (:func:`class_max`, :func:`class_sum`,
:func:`class_any`) is completed across that axis (``lax.pmax``, ``lax.psum``), so
the same terms give the values of the gathered logits on every device of the axis,
at the same precision. With ``vocab_axis_name=None`` nothing is communicated.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import jax
import jax.numpy as jnp

from jaxkd import _checks
from jaxkd.losses._distributions import _as_compute_dtype, prepare_logits


def class_max(arrays, axis: int, vocab_axis_name=None):
    """Each array's maximum over the class axis (keepdims), held constant for the gradient.

    A row without finite maximum gives 0. With ``vocab_axis_name``, the local maxima
    are reduced with one ``lax.pmax`` across that mesh axis (which has no derivative:
    they are constant before it).

    Args:
      arrays: a tuple of float arrays.
      axis: the class axis.
      vocab_axis_name: ``None`` or the mesh axis over which the classes are sharded.

    Returns:
      A tuple of arrays of each input's shape with size 1 along ``axis``.
    """
    maxima = tuple(jnp.max(x, axis=axis, keepdims=True) for x in arrays)
    if vocab_axis_name is not None:
        maxima = jax.lax.pmax(jax.lax.stop_gradient(maxima), vocab_axis_name)
    return tuple(jax.lax.stop_gradient(jnp.where(jnp.isfinite(m), m, 0.0)) for m in maxima)


def class_sum(arrays, axis: int, vocab_axis_name=None, *, keepdims: bool = False):
    """Each array's sum over the class axis; with ``vocab_axis_name``, one ``psum`` of them all.

    Args:
      arrays: a tuple of arrays.
      axis: the class axis.
      vocab_axis_name: ``None`` or the mesh axis over which the classes are sharded.
      keepdims: keep ``axis`` with size 1.

    Returns:
      A tuple of the sums, the same on every device of ``vocab_axis_name``.
    """
    totals = tuple(jnp.sum(x, axis=axis, keepdims=keepdims) for x in arrays)
    return totals if vocab_axis_name is None else jax.lax.psum(totals, vocab_axis_name)


def class_any(masks, axis: int, vocab_axis_name=None):
    """Each bool array's ``any`` over the class axis (a ``psum`` of counts when sharded)."""
    if vocab_axis_name is None:
        return tuple(jnp.any(m, axis=axis) for m in masks)
    counts = class_sum(tuple(m.astype(jnp.int32) for m in masks), axis, vocab_axis_name)
    return tuple(count > 0 for count in counts)


def kl_terms(log_p: jax.Array, log_q: jax.Array) -> jax.Array:
    r"""Elementwise :math:`p (\log p - \log q)`, exactly 0 where :math:`p = 0`.

    Inputs where ``log_p`` is ``-inf`` are replaced before the arithmetic so that
    neither the value nor the gradient sees ``inf - inf``.
    """
    present = log_p > -jnp.inf
    safe_log_p = jnp.where(present, log_p, 0.0)
    safe_log_q = jnp.where(present, log_q, 0.0)
    return jnp.where(present, jnp.exp(safe_log_p) * (safe_log_p - safe_log_q), 0.0)


def log_mixture(log_p: jax.Array, log_q: jax.Array, weight) -> jax.Array:
    r""":math:`\log(w\,p + (1 - w)\,q)` computed from log-probabilities.

    Entries where both ``p`` and ``q`` are 0 give ``-inf`` with finite gradients.
    """
    support = (log_p > -jnp.inf) | (log_q > -jnp.inf)
    safe_log_p = jnp.where(support, log_p, 0.0)
    safe_log_q = jnp.where(support, log_q, 0.0)
    weight = jnp.asarray(weight, log_p.dtype)
    mixed = jnp.logaddexp(jnp.log(weight) + safe_log_p, jnp.log1p(-weight) + safe_log_q)
    return jnp.where(support, mixed, -jnp.inf)


# Accurate divergences at high temperature.
#
# At a large temperature p_t and p_s are close, and a divergence is a sum of terms
# p_t,i (log p_t,i - log p_s,i) of size |u| ~ |z_t - z_s| / T whose sum is of size
# u**2: subtracting two separately rounded log-probabilities loses about eps / |u|
# of relative precision (5e-3 at T = 100 in float32). Here, on the classes where
# p_t / p_s lies in (1/e, e) ("near" classes), the log-ratio
# u = log p_t - log p_s = (z_t - z_s) / T - (lse_t - lse_s) is computed from the
# difference of the logits, and each divergence is written as a sum of terms that
# are each O(u**2), p_s * f(u), e.g. f(u) = u e^u - e^u + 1 for KL(p_t || p_s): the
# added -p_t + p_s sum to 0 over the classes and remove the cancellation. Other
# classes use the textbook formulas, which are accurate there. An error d in the
# constant lse_t - lse_s changes these KL sums by d times their value (the forward
# KL and the mixtures) or by O(d**2) (the reverse KL), but the total variation by
# about d itself: for it the constant is refined (``refine=True``).


# Taylor series for |x| <= 1 (the near classes):
#   x e^x - e^x + 1 = sum_k (k - 1) x^k / k!,   e^x - 1 - x = sum_k x^k / k!,   k >= 2,
# cut where the next term is below the dtype's precision (relative to the value at
# |x| = 1): k <= 12 in float32, k <= 19 in float64.
def _coefficients(term, dtype) -> tuple[float, ...]:
    last = 12 if jnp.finfo(dtype).bits <= 32 else 19
    return tuple(term(k) for k in range(2, last + 1))


def _series(x: jax.Array, coefficients) -> jax.Array:
    """``sum_k c_k x**k`` over ``k = 2, 3, ...`` by Horner's rule."""
    total = jnp.zeros_like(x)
    for coefficient in reversed(coefficients):
        total = total * x + coefficient
    return total * x * x


@jax.custom_jvp
def _kl_integrand(u: jax.Array) -> jax.Array:
    r""":math:`u e^u - e^u + 1 \ge 0` for :math:`|u| \le 1`: :math:`\mathrm{KL}(q e^u \| q) / q`."""
    return _series(u, _coefficients(lambda k: (k - 1) / math.factorial(k), u.dtype))


@_kl_integrand.defjvp
def _kl_integrand_jvp(primals, tangents):
    (u,), (du,) = primals, tangents
    return _kl_integrand(u), u * jnp.exp(u) * du


@jax.custom_jvp
def _reverse_kl_integrand(u: jax.Array) -> jax.Array:
    r""":math:`e^u - 1 - u \ge 0` for :math:`|u| \le 1`: :math:`\mathrm{KL}(q \| q e^u) / q`."""
    return _series(u, _coefficients(lambda k: 1 / math.factorial(k), u.dtype))


@_reverse_kl_integrand.defjvp
def _reverse_kl_integrand_jvp(primals, tangents):
    (u,), (du,) = primals, tangents
    return _reverse_kl_integrand(u), jnp.expm1(u) * du


def _kl_terms_pair(near, near_terms, p, log_p, r, log_r):
    r"""Two elementwise forms of :math:`\mathrm{KL}(p \| r)`: ``(balanced, plain)``.

    ``plain`` is :math:`p \log(p / r)`. ``balanced`` is :math:`p \log(p / r) - p + r
    \ge 0`, ``near_terms`` on ``near`` classes: the added terms sum to 0 when both
    are distributions, and make every term small where :math:`p \approx r`. Presence
    is read from the logs, so an underflowed probability with a finite log counts.
    Both give 0 where :math:`p = 0` (``balanced``: :math:`r`) and ``inf`` where only
    :math:`r = 0`; gradients stay finite.
    """
    has_p = log_p > -jnp.inf
    has_r = log_r > -jnp.inf
    both = has_p & has_r
    log_gap = jnp.where(both, log_p, 0.0) - jnp.where(both, log_r, 0.0)
    plain = jnp.where(has_p, jnp.where(has_r, p * log_gap, jnp.inf), 0.0)
    far = jnp.where(both, p * log_gap - p + r, jnp.where(has_r, r, jnp.where(has_p, jnp.inf, 0.0)))
    return jnp.where(near, near_terms, far), plain


class SoftenedPair(NamedTuple):
    """A student's and a teacher's softened distributions over the same classes.

    Attributes:
      p_s, p_t: the probabilities.
      log_p_s, log_p_t: their logs, ``-inf`` exactly where a class is absent.
      near: bool, the classes where both are positive and ``p_t / p_s`` lies in
        ``(1/e, e)``.
      log_ratio: ``log(p_t / p_s)`` on ``near`` classes, to a few ulps of itself; 0
        elsewhere.
      full_rows: bool, the logits' shape without ``axis``: both distributions have
        some class (neither is fully masked or ``-inf``).
      axis: the non-negative class axis.
      vocab_axis_name: ``None``, or the mesh axis over which the classes are sharded
        (the arrays above are then this device's slice of the classes; ``full_rows``
        is global).
    """

    p_s: jax.Array
    p_t: jax.Array
    log_p_s: jax.Array
    log_p_t: jax.Array
    near: jax.Array
    log_ratio: jax.Array
    full_rows: jax.Array
    axis: int
    vocab_axis_name: str | None = None


def softmax_parts(arrays, axis: int, vocab_axis_name=None):
    """``(p, log_p, lse)`` of each array of logits; an empty row has ``p = 0`` and ``lse = 0``.

    ``log_p = (x - max) - log(sum(exp(x - max)))``, the maximum and the sum taken over
    the class axis and, with ``vocab_axis_name``, across that mesh axis too (one
    ``pmax`` and one ``psum`` for all the arrays); ``lse`` (keepdims) is then global.
    ``-inf`` entries give ``p = 0`` and ``log_p = -inf``, never NaN.
    """
    maxima = class_max(arrays, axis, vocab_axis_name)
    unnormalized = tuple(jnp.exp(x - m) for x, m in zip(arrays, maxima, strict=True))
    totals = class_sum(unnormalized, axis, vocab_axis_name, keepdims=True)
    parts = []
    for x, x_max, e, total in zip(arrays, maxima, unnormalized, totals, strict=True):
        safe_total = jnp.where(total > 0, total, 1.0)
        log_total = jnp.log(safe_total)
        parts.append((e / safe_total, (x - x_max) - log_total, x_max + log_total))
    return tuple(parts)


def softened_pair(
    student_logits,
    teacher_logits,
    temperature,
    axis,
    where,
    *,
    refine: bool = False,
    vocab_axis_name=None,
) -> SoftenedPair:
    """Validates a student/teacher pair and returns their :class:`SoftenedPair`.

    On near classes the log-ratio is ``(z_t - z_s) / T - (lse_t - lse_s)``: the
    logits' difference is rounded once. ``lse`` of the softened logits is only exact
    to ``eps * |lse|``; with ``refine=True`` the constant is corrected so that
    ``sum(p_s * exp(log_ratio))`` over near classes equals the student's total mass
    minus the teacher's mass on the other classes, to float precision.

    With ``vocab_axis_name`` (inside ``jax.shard_map``, the mesh axis over which the
    class axis is sharded), ``lse``, ``full_rows`` and the refinement's totals are
    reduced across that axis too, so the log-ratio, the ``near`` classes and every
    term are those of the gathered logits, on this device's slice of the classes.
    """
    _checks.check_same_shape(["student_logits", "teacher_logits"], [student_logits, teacher_logits])
    student, mask, axis = prepare_logits("student_logits", student_logits, temperature, axis, where)
    teacher, _, _ = prepare_logits("teacher_logits", teacher_logits, temperature, axis, where)
    dtype = jnp.promote_types(student.dtype, teacher.dtype)
    student, teacher = student.astype(dtype), teacher.astype(dtype)
    if mask is not None:
        student = jnp.where(mask, student, -jnp.inf)
        teacher = jnp.where(mask, teacher, -jnp.inf)
    (p_s, log_p_s, lse_s), (p_t, log_p_t, lse_t) = softmax_parts(
        (student, teacher), axis, vocab_axis_name
    )
    has_s, has_t = log_p_s > -jnp.inf, log_p_t > -jnp.inf
    both = has_s & has_t
    any_s, any_t = class_any((has_s, has_t), axis, vocab_axis_name)
    full_rows = any_s & any_t

    temperature = jnp.asarray(temperature, dtype)
    raw_s = jnp.where(both, _as_compute_dtype(student_logits).astype(dtype), 0.0)
    raw_t = jnp.where(both, _as_compute_dtype(teacher_logits).astype(dtype), 0.0)
    rough = jnp.where(both, (raw_t - raw_s) / temperature - (lse_t - lse_s), 0.0)
    near = both & (jnp.abs(rough) < 1.0)
    rough = jnp.where(near, rough, 0.0)

    if not refine:
        return SoftenedPair(
            p_s, p_t, log_p_s, log_p_t, near, rough, full_rows, axis, vocab_axis_name
        )
    # On near classes p_s * exp(rough - shift) must add up to the student's total
    # mass minus the teacher's mass elsewhere: shift = log1p(relative excess). The
    # totals are global (one psum when the classes are sharded).
    excess, student_elsewhere, teacher_elsewhere, student_total = class_sum(
        (
            jnp.where(near, p_s * jnp.expm1(rough), 0.0),
            jnp.where(near, 0.0, p_s),
            jnp.where(near, 0.0, p_t),
            p_s,
        ),
        axis,
        vocab_axis_name,
        keepdims=True,
    )
    target = student_total - teacher_elsewhere
    relative = (excess - student_elsewhere + teacher_elsewhere) / jnp.where(target > 0, target, 1.0)
    usable = (target > 0) & (relative > -1.0)
    shift = jnp.where(usable, jnp.log1p(jnp.where(usable, relative, 0.0)), 0.0)
    log_ratio = jnp.where(near, rough - shift, 0.0)
    return SoftenedPair(
        p_s, p_t, log_p_s, log_p_t, near, log_ratio, full_rows, axis, vocab_axis_name
    )


def pair_divergence(
    student_logits,
    teacher_logits,
    temperature,
    axis,
    where,
    terms,
    *,
    refine=False,
    vocab_axis_name=None,
):
    """``T^2 * sum_classes terms``: the frame of the KL-family divergences here.

    ``terms(pair)`` returns ``(balanced, plain)`` elementwise terms; the balanced sum
    is used where both distributions exist, the plain one in the other rows (where
    the balanced terms' added masses would not cancel). With ``vocab_axis_name``
    the pair is global (:func:`softened_pair`) and both sums are ``psum``-ed across
    that axis: the value is the gathered logits', the same on every device.
    """
    pair = softened_pair(
        student_logits,
        teacher_logits,
        temperature,
        axis,
        where,
        refine=refine,
        vocab_axis_name=vocab_axis_name,
    )
    balanced, plain = terms(pair)
    balanced_sum, plain_sum = class_sum((balanced, plain), pair.axis, vocab_axis_name)
    value = jnp.where(pair.full_rows, balanced_sum, plain_sum)
    return jnp.square(jnp.asarray(temperature, value.dtype)) * value


def forward_kl_terms(pair: SoftenedPair):
    near_terms = pair.p_s * _kl_integrand(pair.log_ratio)
    return _kl_terms_pair(pair.near, near_terms, pair.p_t, pair.log_p_t, pair.p_s, pair.log_p_s)


def reverse_kl_terms(pair: SoftenedPair):
    near_terms = pair.p_s * _reverse_kl_integrand(pair.log_ratio)
    return _kl_terms_pair(pair.near, near_terms, pair.p_s, pair.log_p_s, pair.p_t, pair.log_p_t)


def mixture_kl_terms(pair: SoftenedPair, teacher_weight):
    r"""Terms of :math:`\mathrm{KL}(p_t \| m)` and :math:`\mathrm{KL}(p_s \| m)`.

    :math:`m = w p_t + (1 - w) p_s`. On near classes :math:`m = p_s e^v` with
    :math:`v = \log(1 + w (e^u - 1))`, and the terms are :math:`p_s e^v f(u - v)` and
    :math:`p_s g(v)` with the integrands above (:math:`|v|, |u - v| \le |u|`).
    Each is a ``(balanced, plain)`` pair as in :func:`_kl_terms_pair`.
    """
    weight = jnp.asarray(teacher_weight, pair.p_s.dtype)
    lifted = weight * jnp.expm1(pair.log_ratio)  # m / p_s - 1 on near classes
    log_lift = jnp.log1p(lifted)
    log_m = log_mixture(pair.log_p_t, pair.log_p_s, weight)
    m = weight * pair.p_t + (1.0 - weight) * pair.p_s
    near_teacher = pair.p_s * (1.0 + lifted) * _kl_integrand(pair.log_ratio - log_lift)
    near_student = pair.p_s * _reverse_kl_integrand(log_lift)
    return (
        _kl_terms_pair(pair.near, near_teacher, pair.p_t, pair.log_p_t, m, log_m),
        _kl_terms_pair(pair.near, near_student, pair.p_s, pair.log_p_s, m, log_m),
    )


def total_variation_terms(pair: SoftenedPair):
    terms = 0.5 * jnp.where(
        pair.near,
        pair.p_s * jnp.abs(jnp.expm1(pair.log_ratio)),
        jnp.abs(pair.p_t - pair.p_s),
    )
    return terms, terms
