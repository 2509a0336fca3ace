"""Divergences between the teacher's and the student's softened distributions.

Every function here takes ``(student_logits, teacher_logits, *, temperature=1.0,
axis=-1, where=None)`` of equal shape ``[..., C, ...]`` and returns one value per
example: the input shape without ``axis`` (so ``[batch]`` for ``[batch, classes]``
and ``[batch, time]`` for token logits ``[batch, time, vocab]``). The caller
reduces, e.g. with :func:`jaxkd.masked_mean`.

Conventions shared by all of them:

* ``p_t = softmax(teacher_logits / T)``, ``p_s = softmax(student_logits / T)``.
* Each divergence is multiplied by ``T**2`` (Hinton et al., 2015) so that the
  gradients' magnitude stays comparable as the temperature changes: the gradient of
  ``T**2 * KL(p_t || p_s)`` with respect to the student logits is ``T * (p_s - p_t)``.
* ``where`` is a bool mask as optax takes them: of the logits' rank with each
  dimension equal to the logits' or 1 (``[B, L, V]`` masks classes, e.g. padded
  vocabulary entries, which get probability 0 in both distributions; ``[1, 1, V]``
  the same classes everywhere; ``[B, L, 1]`` whole tokens), or of the output's
  shape (``[B, L]``, per example). A masked example, or one with every class
  masked, gives 0 with zero gradients.
* In float32 the KL family (forward, reverse, skew, JSD) and the total variation
  keep about 1e-6 relative precision at any temperature: the log-ratio of close
  distributions is taken from the logits' difference, not from two rounded
  log-probabilities (see ``softened_pair``).
* ``0 log 0 = 0``: classes to which a distribution gives probability 0 (masked,
  ``-inf`` logits or underflow) contribute nothing and give finite gradients.
* Nothing stops gradients into ``teacher_logits``: the train step never
  differentiates the teacher, and symmetric uses (mutual learning) stay possible.
"""

from __future__ import annotations

import functools
import math
from typing import NamedTuple

import jax
import jax.numpy as jnp

from jaxkd import _checks
from jaxkd._distributions import _as_compute_dtype, prepare_logits, scaled_log_softmax


def softened_log_probs(student_logits, teacher_logits, temperature, axis, where):
    """Validates a student/teacher pair; returns ``(log_p_s, log_p_t, mask, axis)``.

    ``mask`` is the full-shape bool mask of classes taking part (or ``None``).
    """
    _checks.check_same_shape(["student_logits", "teacher_logits"], [student_logits, teacher_logits])
    student, mask, axis = prepare_logits("student_logits", student_logits, temperature, axis, where)
    teacher, _, _ = prepare_logits("teacher_logits", teacher_logits, temperature, axis, where)
    dtype = jnp.promote_types(student.dtype, teacher.dtype)
    log_p_s = scaled_log_softmax(student.astype(dtype), axis, mask)
    log_p_t = scaled_log_softmax(teacher.astype(dtype), axis, mask)
    return log_p_s, log_p_t, mask, axis


def _tempered_divergence(student_logits, teacher_logits, temperature, axis, where, terms):
    """``T^2 * sum_classes terms(log_p_s, log_p_t)``: the frame of every divergence here.

    Args:
      terms: elementwise function of the two log-probability arrays.
    """
    log_p_s, log_p_t, _, axis = softened_log_probs(
        student_logits, teacher_logits, temperature, axis, where
    )
    value = jnp.sum(terms(log_p_s, log_p_t), axis=axis)
    return jnp.square(jnp.asarray(temperature, value.dtype)) * value


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
    """

    p_s: jax.Array
    p_t: jax.Array
    log_p_s: jax.Array
    log_p_t: jax.Array
    near: jax.Array
    log_ratio: jax.Array
    full_rows: jax.Array
    axis: int


def _softmax_parts(x: jax.Array, axis: int):
    """``(p, log_p, lse)`` of a row of logits; an empty row has ``p = 0`` and ``lse = 0``."""
    x_max = jnp.max(x, axis=axis, keepdims=True)
    x_max = jax.lax.stop_gradient(jnp.where(jnp.isfinite(x_max), x_max, 0.0))
    unnormalized = jnp.exp(x - x_max)
    total = jnp.sum(unnormalized, axis=axis, keepdims=True)
    safe_total = jnp.where(total > 0, total, 1.0)
    log_total = jnp.log(safe_total)
    return unnormalized / safe_total, (x - x_max) - log_total, x_max + log_total


def softened_pair(
    student_logits, teacher_logits, temperature, axis, where, *, refine: bool = False
) -> SoftenedPair:
    """Validates a student/teacher pair and returns their :class:`SoftenedPair`.

    On near classes the log-ratio is ``(z_t - z_s) / T - (lse_t - lse_s)``: the
    logits' difference is rounded once. ``lse`` of the softened logits is only exact
    to ``eps * |lse|``; with ``refine=True`` the constant is corrected so that
    ``sum(p_s * exp(log_ratio))`` over near classes equals the student's total mass
    minus the teacher's mass on the other classes, to float precision.
    """
    _checks.check_same_shape(["student_logits", "teacher_logits"], [student_logits, teacher_logits])
    student, mask, axis = prepare_logits("student_logits", student_logits, temperature, axis, where)
    teacher, _, _ = prepare_logits("teacher_logits", teacher_logits, temperature, axis, where)
    dtype = jnp.promote_types(student.dtype, teacher.dtype)
    student, teacher = student.astype(dtype), teacher.astype(dtype)
    if mask is not None:
        student = jnp.where(mask, student, -jnp.inf)
        teacher = jnp.where(mask, teacher, -jnp.inf)
    p_s, log_p_s, lse_s = _softmax_parts(student, axis)
    p_t, log_p_t, lse_t = _softmax_parts(teacher, axis)
    has_s, has_t = log_p_s > -jnp.inf, log_p_t > -jnp.inf
    both = has_s & has_t
    full_rows = jnp.any(has_s, axis=axis) & jnp.any(has_t, axis=axis)

    temperature = jnp.asarray(temperature, dtype)
    raw_s = jnp.where(both, _as_compute_dtype(student_logits).astype(dtype), 0.0)
    raw_t = jnp.where(both, _as_compute_dtype(teacher_logits).astype(dtype), 0.0)
    rough = jnp.where(both, (raw_t - raw_s) / temperature - (lse_t - lse_s), 0.0)
    near = both & (jnp.abs(rough) < 1.0)
    rough = jnp.where(near, rough, 0.0)

    if not refine:
        return SoftenedPair(p_s, p_t, log_p_s, log_p_t, near, rough, full_rows, axis)
    # On near classes p_s * exp(rough - shift) must add up to the student's total
    # mass minus the teacher's mass elsewhere: shift = log1p(relative excess).
    total = functools.partial(jnp.sum, axis=axis, keepdims=True)
    excess = total(jnp.where(near, p_s * jnp.expm1(rough), 0.0))
    student_elsewhere = total(jnp.where(near, 0.0, p_s))
    teacher_elsewhere = total(jnp.where(near, 0.0, p_t))
    target = total(p_s) - teacher_elsewhere
    relative = (excess - student_elsewhere + teacher_elsewhere) / jnp.where(target > 0, target, 1.0)
    usable = (target > 0) & (relative > -1.0)
    shift = jnp.where(usable, jnp.log1p(jnp.where(usable, relative, 0.0)), 0.0)
    log_ratio = jnp.where(near, rough - shift, 0.0)
    return SoftenedPair(p_s, p_t, log_p_s, log_p_t, near, log_ratio, full_rows, axis)


def _pair_divergence(
    student_logits, teacher_logits, temperature, axis, where, terms, *, refine=False
):
    """``T^2 * sum_classes terms``: the frame of the KL-family divergences here.

    ``terms(pair)`` returns ``(balanced, plain)`` elementwise terms; the balanced sum
    is used where both distributions exist, the plain one in the other rows (where
    the balanced terms' added masses would not cancel).
    """
    pair = softened_pair(student_logits, teacher_logits, temperature, axis, where, refine=refine)
    balanced, plain = terms(pair)
    value = jnp.where(
        pair.full_rows, jnp.sum(balanced, axis=pair.axis), jnp.sum(plain, axis=pair.axis)
    )
    return jnp.square(jnp.asarray(temperature, value.dtype)) * value


def _forward_kl_terms(pair: SoftenedPair):
    near_terms = pair.p_s * _kl_integrand(pair.log_ratio)
    return _kl_terms_pair(pair.near, near_terms, pair.p_t, pair.log_p_t, pair.p_s, pair.log_p_s)


def _reverse_kl_terms(pair: SoftenedPair):
    near_terms = pair.p_s * _reverse_kl_integrand(pair.log_ratio)
    return _kl_terms_pair(pair.near, near_terms, pair.p_s, pair.log_p_s, pair.p_t, pair.log_p_t)


def _mixture_kl_terms(pair: SoftenedPair, teacher_weight):
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


def _total_variation_terms(pair: SoftenedPair):
    terms = 0.5 * jnp.where(
        pair.near,
        pair.p_s * jnp.abs(jnp.expm1(pair.log_ratio)),
        jnp.abs(pair.p_t - pair.p_s),
    )
    return terms, terms


def kl_divergence(
    student_logits, teacher_logits, *, temperature=1.0, axis: int = -1, where=None
) -> jax.Array:
    r"""Hinton's soft-target loss: :math:`T^2\,\mathrm{KL}(p_t \,\|\, p_s)`.

    .. math::
      T^2 \sum_i p_{t,i} \left(\log p_{t,i} - \log p_{s,i}\right)

    At ``temperature=1`` this equals
    ``optax.losses.kl_divergence_with_log_targets(log_softmax(s), log_softmax(t))``.
    Its gradient with respect to ``student_logits`` is ``T * (p_s - p_t)``; as ``T``
    grows it tends to ``mean((s - t)**2) / 2`` for zero-mean logits (logit matching).

    Args:
      student_logits: float array ``[..., C]``.
      teacher_logits: float array, same shape.
      temperature: positive scalar ``T``.
      axis: the class axis.
      where: optional bool mask, per class or per example (module docstring).

    Returns:
      Non-negative array of the logits' shape without ``axis``.

    Examples:
      >>> import jax.numpy as jnp, jaxkd
      >>> s = jnp.array([[1.0, 2.0, 3.0]]); t = jnp.array([[3.0, 2.0, 1.0]])
      >>> jaxkd.kl_divergence(s, t, temperature=2.0).round(4)
      Array([1.2806], dtype=float32)

    References:
      Hinton, Vinyals and Dean, "Distilling the Knowledge in a Neural Network",
      2015. https://arxiv.org/abs/1503.02531
    """
    return _pair_divergence(
        student_logits, teacher_logits, temperature, axis, where, _forward_kl_terms
    )


def reverse_kl_divergence(
    student_logits, teacher_logits, *, temperature=1.0, axis: int = -1, where=None
) -> jax.Array:
    r"""Mode-seeking reverse KL: :math:`T^2\,\mathrm{KL}(p_s \,\|\, p_t)`.

    .. math::
      T^2 \sum_i p_{s,i} \left(\log p_{s,i} - \log p_{t,i}\right)

    Args:
      student_logits: float array ``[..., C]``.
      teacher_logits: float array, same shape.
      temperature: positive scalar ``T``.
      axis: the class axis.
      where: optional bool mask, per class or per example (module docstring).

    Returns:
      Non-negative array of the logits' shape without ``axis``.

    References:
      Gu, Dong, Wei and Huang, "MiniLLM: Knowledge Distillation of Large Language
      Models", ICLR 2024. https://arxiv.org/abs/2306.08543
    """
    return _pair_divergence(
        student_logits, teacher_logits, temperature, axis, where, _reverse_kl_terms
    )


def soft_cross_entropy(
    student_logits, teacher_logits, *, temperature=1.0, axis: int = -1, where=None
) -> jax.Array:
    r"""Soft-target cross entropy: :math:`T^2\,H(p_t, p_s)`.

    .. math::
      -T^2 \sum_i p_{t,i} \log p_{s,i} = T^2 \left(\mathrm{KL}(p_t \| p_s) + H(p_t)\right)

    Same gradient as :func:`kl_divergence` (the teacher's entropy is constant in the
    student), but its minimum is ``T**2 * H(p_t)`` rather than 0.

    Args:
      student_logits: float array ``[..., C]``.
      teacher_logits: float array, same shape.
      temperature: positive scalar ``T``.
      axis: the class axis.
      where: optional bool mask, per class or per example (module docstring).

    Returns:
      Non-negative array of the logits' shape without ``axis``.

    References:
      Hinton, Vinyals and Dean, "Distilling the Knowledge in a Neural Network",
      2015. https://arxiv.org/abs/1503.02531
    """

    def terms(log_p_s, log_p_t):
        present = log_p_t > -jnp.inf
        safe_log_p_t = jnp.where(present, log_p_t, 0.0)
        safe_log_p_s = jnp.where(present, log_p_s, 0.0)
        return jnp.where(present, -jnp.exp(safe_log_p_t) * safe_log_p_s, 0.0)

    return _tempered_divergence(student_logits, teacher_logits, temperature, axis, where, terms)


def generalized_jsd(
    student_logits,
    teacher_logits,
    *,
    beta: float = 0.5,
    temperature=1.0,
    axis: int = -1,
    where=None,
) -> jax.Array:
    r"""Generalized Jensen-Shannon divergence with mixing weight ``beta``.

    For :math:`0 < \beta < 1`, with :math:`m = \beta p_t + (1 - \beta) p_s`:

    .. math::
      \mathrm{JSD}_\beta = T^2 \left[\beta\,\mathrm{KL}(p_t \| m)
        + (1 - \beta)\,\mathrm{KL}(p_s \| m)\right]

    ``beta=0.5`` is the symmetric Jensen-Shannon divergence, bounded by
    ``T**2 * log 2``. As :math:`\beta \to 0`, :math:`\mathrm{JSD}_\beta / \beta`
    tends to the forward :math:`\mathrm{KL}(p_t \| p_s)`, and as :math:`\beta \to 1`,
    :math:`\mathrm{JSD}_\beta / (1 - \beta)` tends to the reverse
    :math:`\mathrm{KL}(p_s \| p_t)`. Following GKD, the endpoints are defined by
    these limits: ``beta=0`` returns :func:`kl_divergence` and ``beta=1`` returns
    :func:`reverse_kl_divergence` (both times ``T**2``). The function is therefore
    not continuous at the endpoints: it interpolates between forward and reverse KL
    in behaviour, not in value.

    Args:
      student_logits: float array ``[..., C]``.
      teacher_logits: float array, same shape.
      beta: static float in ``[0, 1]``, the teacher's weight in the mixture.
      temperature: positive scalar ``T``.
      axis: the class axis.
      where: optional bool mask, per class or per example (module docstring).

    Returns:
      Non-negative array of the logits' shape without ``axis``.

    References:
      Agarwal et al., "On-Policy Distillation of Language Models: Learning from
      Self-Generated Mistakes" (GKD), ICLR 2024. https://arxiv.org/abs/2306.13649
    """
    if not _checks.is_concrete(beta):
        raise TypeError("`beta` must be a concrete Python float, not a traced value.")
    _checks.check_unit_interval("beta", beta)
    beta = float(beta)
    kwargs = dict(temperature=temperature, axis=axis, where=where)
    if beta == 0.0:
        return kl_divergence(student_logits, teacher_logits, **kwargs)
    if beta == 1.0:
        return reverse_kl_divergence(student_logits, teacher_logits, **kwargs)

    def terms(pair):
        teacher_terms, student_terms = _mixture_kl_terms(pair, beta)
        return tuple(
            beta * t + (1 - beta) * s for t, s in zip(teacher_terms, student_terms, strict=True)
        )

    return _pair_divergence(student_logits, teacher_logits, temperature, axis, where, terms)


def skew_kl_divergence(
    student_logits,
    teacher_logits,
    *,
    alpha=0.1,
    temperature=1.0,
    axis: int = -1,
    where=None,
) -> jax.Array:
    r"""Skew KL: :math:`T^2\,\mathrm{KL}(p_t \,\|\, \alpha p_t + (1 - \alpha) p_s)`.

    Mixing a little of the teacher into the student's distribution bounds the loss
    (by :math:`-T^2 \log \alpha`) and smooths its gradients. ``alpha=0`` is
    :func:`kl_divergence`; ``alpha=1`` is identically 0.

    Args:
      student_logits: float array ``[..., C]``.
      teacher_logits: float array, same shape.
      alpha: scalar in ``[0, 1]``, the teacher's weight inside the second argument.
      temperature: positive scalar ``T``.
      axis: the class axis.
      where: optional bool mask, per class or per example (module docstring).

    Returns:
      Non-negative array of the logits' shape without ``axis``.

    References:
      Ko, Kim, Chen and Yun, "DistiLLM: Towards Streamlined Distillation for Large
      Language Models", ICML 2024. https://arxiv.org/abs/2402.03898
    """
    _checks.check_unit_interval("alpha", alpha)
    return _pair_divergence(
        student_logits,
        teacher_logits,
        temperature,
        axis,
        where,
        lambda pair: _mixture_kl_terms(pair, alpha)[0],
    )


def skew_reverse_kl_divergence(
    student_logits,
    teacher_logits,
    *,
    alpha=0.1,
    temperature=1.0,
    axis: int = -1,
    where=None,
) -> jax.Array:
    r"""Skew reverse KL: :math:`T^2\,\mathrm{KL}(p_s \,\|\, \alpha p_s + (1 - \alpha) p_t)`.

    ``alpha=0`` is :func:`reverse_kl_divergence`; ``alpha=1`` is identically 0.

    Args:
      student_logits: float array ``[..., C]``.
      teacher_logits: float array, same shape.
      alpha: scalar in ``[0, 1]``, the student's weight inside the second argument.
      temperature: positive scalar ``T``.
      axis: the class axis.
      where: optional bool mask, per class or per example (module docstring).

    Returns:
      Non-negative array of the logits' shape without ``axis``.

    References:
      Ko, Kim, Chen and Yun, "DistiLLM: Towards Streamlined Distillation for Large
      Language Models", ICML 2024. https://arxiv.org/abs/2402.03898
    """
    _checks.check_unit_interval("alpha", alpha)
    return _pair_divergence(
        student_logits,
        teacher_logits,
        temperature,
        axis,
        where,
        lambda pair: _mixture_kl_terms(pair, 1.0 - jnp.asarray(alpha))[1],
    )


def total_variation(
    student_logits, teacher_logits, *, temperature=1.0, axis: int = -1, where=None
) -> jax.Array:
    r"""Total variation distance, times :math:`T^2` like the other divergences.

    .. math::
      T^2 \cdot \tfrac12 \sum_i \left| p_{t,i} - p_{s,i} \right|

    Before the :math:`T^2` factor it lies in ``[0, 1]``.

    Args:
      student_logits: float array ``[..., C]``.
      teacher_logits: float array, same shape.
      temperature: positive scalar ``T``.
      axis: the class axis.
      where: optional bool mask, per class or per example (module docstring).

    Returns:
      Non-negative array of the logits' shape without ``axis``.

    References:
      Wen, Li, Du and Mou, "f-Divergence Minimization for Sequence-Level Knowledge
      Distillation", ACL 2023. https://arxiv.org/abs/2307.15190
    """
    return _pair_divergence(
        student_logits,
        teacher_logits,
        temperature,
        axis,
        where,
        _total_variation_terms,
        refine=True,
    )


def logit_mse(student_logits, teacher_logits, *, axis: int = -1, where=None) -> jax.Array:
    r"""Mean squared difference of logits over classes (logit matching).

    .. math::
      \frac{1}{C} \sum_i (z_{s,i} - z_{t,i})^2

    over unmasked classes where both logits are finite. This is twice the high
    temperature limit of :func:`kl_divergence` for zero-mean logits.

    Args:
      student_logits: float array ``[..., C]``.
      teacher_logits: float array, same shape.
      axis: the class axis.
      where: optional bool mask, per class or per example (module docstring).

    Returns:
      Non-negative array of the logits' shape without ``axis``.

    References:
      Ba and Caruana, "Do Deep Nets Really Need to be Deep?", NeurIPS 2014.
      https://arxiv.org/abs/1312.6184
    """
    _checks.check_same_shape(["student_logits", "teacher_logits"], [student_logits, teacher_logits])
    student, mask, axis = prepare_logits("student_logits", student_logits, 1.0, axis, where)
    teacher, _, _ = prepare_logits("teacher_logits", teacher_logits, 1.0, axis, where)
    valid = jnp.isfinite(student) & jnp.isfinite(teacher)
    if mask is not None:
        valid = valid & mask
    diff = jnp.where(valid, jnp.where(valid, student, 0.0) - jnp.where(valid, teacher, 0.0), 0.0)
    count = jnp.maximum(jnp.sum(valid, axis=axis), 1).astype(diff.dtype)
    return jnp.sum(jnp.square(diff), axis=axis) / count
