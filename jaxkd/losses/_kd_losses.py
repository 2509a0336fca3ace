"""Composite distillation objectives: Hinton's loss, DKD and DIST."""

from __future__ import annotations

import jax
import jax.numpy as jnp

from jaxkd import _checks
from jaxkd.losses._distributions import masked_logsumexp, prepare_logits, scaled_log_softmax
from jaxkd.losses._divergence_terms import kl_terms
from jaxkd.losses._divergences import kl_divergence, softened_log_probs
from jaxkd.parallel._reductions import gather_examples


def _label_masks(labels, mask, num_classes: int, axis: int):
    """``(is_label, bad_label)`` for integer labels against (masked) classes.

    ``is_label`` is the one-hot bool mask ``[..., C, ...]`` (class axis at ``axis``)
    restricted to kept classes. ``bad_label`` (the labels' shape) is True for kept
    examples whose label names no kept class: out of ``[0, C)`` or a masked class.
    Eager calls raise on those (:func:`jaxkd._checks.check_labels`); under ``jit``
    the loss is NaN there instead, as in optax, so that a bad label can never pass
    for a loss of 0.
    """
    one_hot = jax.nn.one_hot(labels, num_classes, dtype=jnp.bool_, axis=-1)
    is_label = jnp.moveaxis(one_hot, -1, axis)
    kept = True
    if mask is not None:
        is_label = is_label & mask
        kept = jnp.any(mask, axis=axis)
    return is_label, kept & ~jnp.any(is_label, axis=axis)


def _poison(bad, loss: jax.Array, logits: jax.Array, axis: int) -> jax.Array:
    """``loss`` with NaN where ``bad``, in its value and in its gradient.

    A NaN in the value alone (``jnp.where``) would leave the update finite, and
    training would go on around the bad label: the NaN is multiplied into a term
    that depends on ``logits`` (a sum of their finite entries), 0 elsewhere.
    """
    finite = jnp.sum(jnp.where(jnp.isfinite(logits), logits, 0.0), axis=axis)
    return loss + jnp.where(bad, jnp.nan, 0.0).astype(loss.dtype) * finite


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
      Array of the labels' shape. A kept example whose label is out of range (or
      names a masked class) raises when the labels are concrete and gives NaN under
      ``jit``, in the value and in the gradient: never a silent 0.
    """
    scaled, mask, axis = prepare_logits("logits", logits, 1.0, axis, where)
    _checks.check_labels(labels, scaled.shape, axis, where)
    log_p = scaled_log_softmax(scaled, axis, mask)
    is_label, bad_label = _label_masks(labels, mask, scaled.shape[axis], axis)
    loss = -jnp.sum(jnp.where(is_label, log_p, 0.0), axis=axis)
    return _poison(bad_label, loss, scaled, axis)


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
      Non-negative array of the labels' shape; NaN under ``jit`` for a kept example
      with an out-of-range label (concrete labels raise instead).

    References:
      Zhao, Cui, Song, Qiu and Liang, "Decoupled Knowledge Distillation",
      CVPR 2022. https://arxiv.org/abs/2203.08679
    """
    _checks.check_non_negative("alpha", alpha)
    _checks.check_non_negative("beta", beta)
    log_p_s, log_p_t, mask, axis = softened_log_probs(
        student_logits, teacher_logits, temperature, axis, where
    )
    _checks.check_labels(labels, log_p_s.shape, axis, where)
    is_label, bad_label = _label_masks(labels, mask, log_p_s.shape[axis], axis)
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
    return _poison(bad_label, temperature_squared * (alpha * tckd + beta * nckd), log_p_s, axis)


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
    axis_name: str | None = None,
) -> jax.Array:
    r"""DIST: match inter-class and intra-class Pearson correlations.

    With :math:`Y_s, Y_t \in \mathbb{R}^{B \times C}` the softened probabilities and
    :math:`d(u, v) = 1 - \rho_{\text{Pearson}}(u, v)`:

    .. math::
      T^2 \left[\beta\,\frac1B \sum_i d(Y_{s,i:}, Y_{t,i:})
        + \gamma\,\frac1C \sum_j d(Y_{s,:j}, Y_{t,:j})\right]

    The intra-class term correlates each class's probabilities across the batch,
    so the loss is a property of the whole batch and returns a scalar. Under data
    parallelism pass ``axis_name``: the logits and the mask are gathered over that
    axis, so that the value and the gradient are those of the global batch, equal
    to one device's (the intra-class correlation of one shard is not).

    Args:
      student_logits: float array ``[B, C]``.
      teacher_logits: float array ``[B, C]``.
      beta: weight of the inter-class (per-example) term.
      gamma: weight of the intra-class (per-class, across the batch) term.
      temperature: positive scalar ``T``.
      where: optional bool ``[B]`` mask of examples taking part; with none kept
        the loss is 0.
      eps: added to the product of norms in the correlation.
      axis_name: the data-parallel axis to gather the batch over, or ``None``.

    Returns:
      A scalar (the same on every device of ``axis_name``).

    References:
      Huang, You, Wang, Qian and Xu, "Knowledge Distillation from A Stronger
      Teacher", NeurIPS 2022. https://arxiv.org/abs/2205.10536
    """
    _checks.check_non_negative("beta", beta)
    _checks.check_non_negative("gamma", gamma)
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
    student_logits, teacher_logits, where = (
        gather_examples(x, axis_name) for x in (student_logits, teacher_logits, where)
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
