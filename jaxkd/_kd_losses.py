"""Composite distillation objectives: Hinton's loss, DKD and DIST, and reductions."""

from __future__ import annotations

import jax
import jax.numpy as jnp

from jaxkd import _checks
from jaxkd._distributions import masked_logsumexp, prepare_logits, scaled_log_softmax
from jaxkd._divergences import kl_divergence, kl_terms, softened_log_probs


def masked_mean(values, where=None) -> jax.Array:
    """Mean of ``values`` over the entries where ``where`` is True.

    Args:
      values: float array of any shape, e.g. per-example or per-token losses.
      where: optional bool array of exactly the same shape (no broadcasting).

    Returns:
      A scalar; 0 (not NaN) when every entry is masked.

    Examples:
      >>> import jax.numpy as jnp, jaxkd
      >>> jaxkd.masked_mean(jnp.array([1.0, 2.0, 9.0]), jnp.array([True, True, False]))
      Array(1.5, dtype=float32)
    """
    values = jnp.asarray(values)
    if where is None:
        return jnp.mean(values)
    where = jnp.asarray(where)
    if where.dtype != jnp.bool_:
        raise TypeError(f"`where` must be a boolean mask, got dtype {where.dtype}.")
    _checks.check_same_shape(["values", "where"], [values, where])
    total = jnp.sum(jnp.where(where, values, 0))
    count = jnp.sum(where)
    return total / jnp.maximum(count, 1).astype(total.dtype)


def _label_mask(labels, num_classes: int, axis: int) -> jax.Array:
    """One-hot bool mask ``[..., C, ...]`` with the class axis at ``axis``."""
    one_hot = jax.nn.one_hot(labels, num_classes, dtype=jnp.bool_, axis=-1)
    return jnp.moveaxis(one_hot, -1, axis)


def cross_entropy_with_integer_labels(logits, labels, *, axis: int = -1, where=None) -> jax.Array:
    r"""Cross entropy of ``softmax(logits)`` against integer labels, per example.

    .. math::
      -\log p_{y}, \qquad p = \mathrm{softmax}(z)

    Args:
      logits: float array ``[..., C]``.
      labels: int array of the logits' shape without ``axis``, values in ``[0, C)``.
      axis: the class axis.
      where: optional bool mask, per class or per example (masked examples give 0
        and may hold any label value).

    Returns:
      Array of the labels' shape.
    """
    scaled, mask, axis = prepare_logits("logits", logits, 1.0, axis, where)
    _checks.check_labels(labels, scaled.shape, axis, where)
    log_p = scaled_log_softmax(scaled, axis, mask)
    is_label = _label_mask(labels, scaled.shape[axis], axis)
    if mask is not None:
        is_label = is_label & mask
    return -jnp.sum(jnp.where(is_label, log_p, 0.0), axis=axis)


def hinton_loss(
    student_logits,
    teacher_logits,
    labels,
    *,
    alpha,
    temperature,
    axis: int = -1,
    where=None,
) -> jax.Array:
    r"""The classic distillation objective of Hinton et al.

    .. math::
      \alpha\, T^2\, \mathrm{KL}(p_t^T \| p_s^T) + (1 - \alpha)\, \mathrm{CE}(y, p_s^1)

    The soft term uses temperature ``T`` on both models; the hard term is the
    student's ordinary cross entropy at temperature 1 against integer labels.

    Args:
      student_logits: float array ``[..., C]``.
      teacher_logits: float array, same shape.
      labels: int array of the logits' shape without ``axis``.
      alpha: scalar in ``[0, 1]``, the weight of the soft term (may be traced, e.g.
        a schedule's value).
      temperature: positive scalar ``T`` (may be traced).
      axis: the class axis.
      where: optional bool mask, per class or per example.

    Returns:
      Array of the labels' shape.

    Examples:
      >>> import jax.numpy as jnp, jaxkd
      >>> s = jnp.array([[2.0, 0.0]]); t = jnp.array([[2.0, 0.0]])
      >>> jaxkd.hinton_loss(s, t, jnp.array([0]), alpha=0.5, temperature=4.0).round(4)
      Array([0.0635], dtype=float32)

    References:
      Hinton, Vinyals and Dean, "Distilling the Knowledge in a Neural Network",
      2015. https://arxiv.org/abs/1503.02531
    """
    _checks.check_unit_interval("alpha", alpha)
    soft = kl_divergence(
        student_logits, teacher_logits, temperature=temperature, axis=axis, where=where
    )
    hard = cross_entropy_with_integer_labels(student_logits, labels, axis=axis, where=where)
    alpha = jnp.asarray(alpha, soft.dtype)
    return alpha * soft + (1 - alpha) * hard


def dkd_loss(
    student_logits,
    teacher_logits,
    labels,
    *,
    alpha=1.0,
    beta=8.0,
    temperature=4.0,
    axis: int = -1,
    where=None,
) -> jax.Array:
    r"""Decoupled knowledge distillation: target and non-target terms.

    With :math:`b = (p_y, 1 - p_y)` the binary target/rest distribution and
    :math:`\hat p` the distribution over the non-target classes only (the softmax
    of the logits with the target class removed), both at temperature ``T``:

    .. math::
      T^2 \left[\alpha\,\mathrm{KL}(b_t \| b_s) + \beta\,\mathrm{KL}(\hat p_t \| \hat p_s)\right]

    (TCKD and NCKD). Classic KD is the special case in which NCKD is weighted by
    :math:`1 - p_{t,y}`. Computed in log space; the target class is excluded from
    the non-target softmax exactly, not by subtracting a large constant.

    Args:
      student_logits: float array ``[..., C]``.
      teacher_logits: float array, same shape.
      labels: int array of the logits' shape without ``axis``.
      alpha: weight of the target-class term (TCKD).
      beta: weight of the non-target term (NCKD).
      temperature: positive scalar ``T``.
      axis: the class axis.
      where: optional bool mask, per class or per example.

    Returns:
      Non-negative array of the labels' shape.

    References:
      Zhao, Cui, Song, Qiu and Liang, "Decoupled Knowledge Distillation",
      CVPR 2022. https://arxiv.org/abs/2203.08679
    """
    log_p_s, log_p_t, mask, axis = softened_log_probs(
        student_logits, teacher_logits, temperature, axis, where
    )
    _checks.check_labels(labels, log_p_s.shape, axis, where)
    is_label = _label_mask(labels, log_p_s.shape[axis], axis)
    if mask is not None:
        is_label = is_label & mask
    not_label = ~is_label if mask is None else mask & ~is_label

    def binary(log_p):
        # (log p_y, log(1 - p_y)); the latter as a log-sum over the other classes.
        log_target = jnp.sum(jnp.where(is_label, log_p, 0.0), axis=axis)
        log_rest = masked_logsumexp(log_p, axis, not_label)
        return jnp.stack([log_target, log_rest], axis=-1)

    tckd = jnp.sum(kl_terms(binary(log_p_t), binary(log_p_s)), axis=-1)

    def non_target(log_p):
        # Renormalizing log-probabilities equals a softmax of the logits over them.
        return scaled_log_softmax(log_p, axis, not_label)

    nckd = jnp.sum(kl_terms(non_target(log_p_t), non_target(log_p_s)), axis=axis)
    temperature_squared = jnp.square(jnp.asarray(temperature, tckd.dtype))
    return temperature_squared * (alpha * tckd + beta * nckd)


def _pearson_distance_centered(x: jax.Array, y: jax.Array, axis: int, eps: float):
    """``1 - cosine(x, y)`` along ``axis`` for already centred ``x`` and ``y``."""
    norms = _safe_norm(x, axis) * _safe_norm(y, axis)
    return 1.0 - jnp.sum(x * y, axis=axis) / (norms + eps)


def _safe_norm(x: jax.Array, axis: int) -> jax.Array:
    """Euclidean norm whose gradient is 0, not NaN, at the zero vector."""
    squares = jnp.sum(jnp.square(x), axis=axis)
    positive = squares > 0
    return jnp.where(positive, jnp.sqrt(jnp.where(positive, squares, 1.0)), 0.0)


def _pearson_distance(x: jax.Array, y: jax.Array, axis: int, eps: float) -> jax.Array:
    """``1 - pearson(x, y)`` along ``axis``."""
    x = x - jnp.mean(x, axis=axis, keepdims=True)
    y = y - jnp.mean(y, axis=axis, keepdims=True)
    return _pearson_distance_centered(x, y, axis, eps)


def dist_loss(
    student_logits,
    teacher_logits,
    *,
    beta=1.0,
    gamma=1.0,
    temperature=1.0,
    where=None,
    eps: float = 1e-8,
) -> jax.Array:
    r"""DIST: match inter-class and intra-class Pearson correlations.

    With :math:`Y_s, Y_t \in \mathbb{R}^{B \times C}` the softened probabilities and
    :math:`d(u, v) = 1 - \rho_{\text{Pearson}}(u, v)`:

    .. math::
      T^2 \left[\beta\,\frac1B \sum_i d(Y_{s,i:}, Y_{t,i:})
        + \gamma\,\frac1C \sum_j d(Y_{s,:j}, Y_{t,:j})\right]

    The intra-class term correlates each class's probabilities across the batch,
    so the loss is a property of the whole batch and returns a scalar.

    Args:
      student_logits: float array ``[B, C]``.
      teacher_logits: float array ``[B, C]``.
      beta: weight of the inter-class (per-example) term.
      gamma: weight of the intra-class (per-class, across the batch) term.
      temperature: positive scalar ``T``.
      where: optional bool ``[B]`` mask of examples taking part; with none kept
        the loss is 0.
      eps: added to the product of norms in the correlation.

    Returns:
      A scalar.

    References:
      Huang, You, Wang, Qian and Xu, "Knowledge Distillation from A Stronger
      Teacher", NeurIPS 2022. https://arxiv.org/abs/2205.10536
    """
    for name, logits in (("student_logits", student_logits), ("teacher_logits", teacher_logits)):
        if jnp.ndim(logits) != 2:
            raise ValueError(f"`{name}` must be [batch, classes], got shape {jnp.shape(logits)}.")
    if where is not None and jnp.result_type(where) != jnp.bool_:
        raise TypeError(f"`where` must be a boolean mask, got dtype {jnp.result_type(where)}.")
    if where is not None and jnp.shape(where) != jnp.shape(student_logits)[:1]:
        raise ValueError(
            f"`where` must be a per-example mask of shape {jnp.shape(student_logits)[:1]}, "
            f"got {jnp.shape(where)}."
        )
    log_p_s, log_p_t, _, _ = softened_log_probs(
        student_logits, teacher_logits, temperature, -1, None
    )
    y_s, y_t = jnp.exp(log_p_s), jnp.exp(log_p_t)
    if where is None:
        where = jnp.ones(y_s.shape[:1], jnp.bool_)
    kept = jnp.asarray(where, jnp.bool_)
    weights = kept.astype(y_s.dtype)[:, None]
    count = jnp.maximum(jnp.sum(weights), 1.0)
    inter = _pearson_distance(y_s, y_t, axis=1, eps=eps)
    inter_mean = jnp.sum(jnp.where(kept, inter, 0.0)) / count
    # Intra-class correlation over the kept examples only: masked rows contribute 0.
    x = (y_s - jnp.sum(y_s * weights, axis=0, keepdims=True) / count) * weights
    y = (y_t - jnp.sum(y_t * weights, axis=0, keepdims=True) / count) * weights
    intra = _pearson_distance_centered(x, y, axis=0, eps=eps)
    temperature_squared = jnp.square(jnp.asarray(temperature, inter.dtype))
    loss = temperature_squared * (beta * inter_mean + gamma * jnp.mean(intra))
    return jnp.where(jnp.any(kept), loss, 0.0)  # nothing kept: 0, like masked_mean
