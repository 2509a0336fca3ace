"""Several teachers as one: aggregation of their logits, and teacher applies.

Aggregation works on stacked teacher logits ``[K, ..., C]`` (``K`` teachers) and
returns logits ``[..., C]``. Probability-space methods return log-probabilities
(times the temperature, for ``"ca_mkd"``), which are valid logits: ``softmax`` of
them gives the aggregated distribution back.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from functools import partial
from typing import Any

import jax
import jax.numpy as jnp

from jaxkd import _checks
from jaxkd.losses._distributions import (
    entropy,
    masked_logsumexp,
    prepare_logits,
    scaled_log_softmax,
)

PyTree = Any
AGGREGATIONS = ("mean_logits", "mean_probs", "entropy", "ca_mkd")
# Methods that need the ground-truth labels, which a teacher apply does not see.
LABEL_AWARE = ("ca_mkd",)


def _teacher_weights(weights, num_teachers: int, dtype) -> jax.Array:
    if weights is None:
        return jnp.full((num_teachers,), 1.0 / num_teachers, dtype)
    weights = jnp.asarray(weights, dtype)
    if weights.shape != (num_teachers,):
        raise ValueError(
            f"`weights` must have shape ({num_teachers},), one per teacher; got {weights.shape}."
        )
    if _checks.is_concrete(weights) and (
        bool(jnp.any(weights < 0)) or not bool(jnp.isclose(jnp.sum(weights), 1.0))
    ):
        raise ValueError(f"`weights` must be non-negative and sum to 1; got {weights}.")
    return weights


def _stacked(teacher_logits, axis: int) -> tuple[jax.Array, int]:
    """Validates stacked logits ``[K, ..., C]``; returns them and the class axis (>= 1)."""
    _checks.check_floating("teacher_logits", teacher_logits)
    teacher_logits = jnp.asarray(teacher_logits)
    if teacher_logits.ndim < 2:
        raise ValueError(
            f"`teacher_logits` must be stacked [K, ..., C], got shape {teacher_logits.shape}."
        )
    axis = _checks.normalize_axis(axis, teacher_logits.ndim)
    if axis == 0:
        raise ValueError("`axis` 0 is the teacher axis; the class axis must be another one.")
    return teacher_logits, axis


def _teacher_mask(where, teacher_shape: tuple[int, ...], axis: int):
    """A ``where`` for one teacher's logits, as a full-shape mask ``[K, ..., C]`` or None."""
    mask = _checks.class_mask(where, teacher_shape[1:], axis - 1)
    return None if mask is None else jnp.broadcast_to(mask, teacher_shape)


def ca_mkd_weights(teacher_logits, labels, *, axis: int = -1, where=None) -> jax.Array:
    r"""CA-MKD's label-aware teacher weights, one set per example.

    Each teacher's cross entropy against the ground truth,
    :math:`L_{CE}^k = -\log \mathrm{softmax}(z_k)_y` (temperature 1), sets

    .. math::
      w_k = \frac{1}{K - 1} \left(1 - \frac{\exp(L_{CE}^k)}{\sum_j \exp(L_{CE}^j)}\right),

    so that teachers closer to the one-hot label weigh more. The weights are
    non-negative and sum to 1 over the teachers. They are per example, as in the
    paper ("sample-wise reliability") and the authors' code, whose cross entropy
    is computed with ``reduction='none'``; for token logits ``[K, B, L, V]`` that is
    per token. A teacher with an infinite cross entropy (probability 0 on the label)
    gets weight 0.

    Args:
      teacher_logits: float array ``[K, ..., C]``, ``K >= 2`` teachers.
      labels: int array ``[...]``, the logits' shape without ``K`` and the class axis.
      axis: the class axis of ``teacher_logits`` (not the teacher axis 0).
      where: optional bool mask of one teacher's logits, as for every loss (e.g.
        ``[..., C]``, ``[..., 1]`` or ``[...]``). Masked examples get the uniform
        weights ``1 / K`` and their labels are not read; a per-class mask restricts
        the cross entropies to the kept classes.

    Returns:
      float32 (or float64) array ``[K, ...]``.

    References:
      Zhang, Chen and Wang, "Confidence-Aware Multi-Teacher Knowledge
      Distillation", ICASSP 2022, eq. (2). https://arxiv.org/abs/2201.00007
    """
    teacher_logits, axis = _stacked(teacher_logits, axis)
    num_teachers = teacher_logits.shape[0]
    if num_teachers < 2:
        raise ValueError(
            f"CA-MKD weights need at least 2 teachers (they are divided by K - 1); got "
            f"teacher_logits of shape {teacher_logits.shape}."
        )
    one_teacher = teacher_logits.shape[1:]
    example_mask = _checks.normalize_where(where, one_teacher, axis - 1)
    _checks.check_labels(labels, one_teacher, axis - 1, example_mask)
    scaled, _, axis = prepare_logits("teacher_logits", teacher_logits, 1.0, axis, None)
    mask = _teacher_mask(where, scaled.shape, axis)
    log_p = scaled_log_softmax(scaled, axis, mask)
    num_classes = scaled.shape[axis]
    safe_labels = jnp.clip(jnp.asarray(labels), 0, num_classes - 1)
    is_label = jnp.moveaxis(jax.nn.one_hot(safe_labels, num_classes, dtype=jnp.bool_), -1, axis - 1)
    is_label = jnp.broadcast_to(jnp.expand_dims(is_label, 0), scaled.shape)
    log_p_label = jnp.sum(jnp.where(is_label, log_p, 0.0), axis=axis)  # [K, ...]
    cross_entropy = -log_p_label  # inf where a teacher gives the label probability 0
    # Shift by the best teacher's (the weights are shift-invariant) and cap the gaps at
    # 1e3, beyond which exp(-gap) is 0 even in float64: such a teacher gets weight 0,
    # not NaN, and a label that every teacher rules out gives uniform weights.
    best = jnp.min(cross_entropy, axis=0, keepdims=True)
    gaps = jnp.where(jnp.isfinite(best), jnp.minimum(cross_entropy - best, 1e3), 0.0)
    # 1 - softmax_k(L) = sum_{j != k} exp(L_j) / sum_j exp(L_j), in log space: computing
    # 1 - softmax directly would lose the small weights of confident teachers to rounding.
    others = jnp.where(
        jnp.eye(num_teachers, dtype=bool).reshape(
            (num_teachers, num_teachers) + (1,) * (gaps.ndim - 1)
        ),
        -jnp.inf,
        jnp.expand_dims(gaps, 0),
    )  # [K, K, ...]: row k holds the other teachers' gaps
    log_rest = masked_logsumexp(others, 1) - masked_logsumexp(gaps, 0, keepdims=True)
    weights = jnp.exp(log_rest) / (num_teachers - 1)
    if mask is None:
        return weights
    kept = jnp.any(mask, axis=axis)  # [K, ...], the same for every teacher
    return jnp.where(kept, weights, 1.0 / num_teachers)


def aggregate_teacher_logits(
    teacher_logits,
    *,
    method: str = "mean_logits",
    weights=None,
    temperature: float = 1.0,
    labels=None,
    axis: int = -1,
    where=None,
) -> jax.Array:
    r"""Combines ``K`` teachers' logits into one teacher.

    Methods, with teacher weights :math:`w_k` (uniform unless ``weights`` given):

    * ``"mean_logits"``: :math:`\sum_k w_k z_k`.
    * ``"mean_probs"``: :math:`\log \sum_k w_k\,\mathrm{softmax}(z_k)`.
    * ``"entropy"``: per-example weights that favour low-entropy teachers,
      :math:`w_k(x) \propto \exp(-H(\mathrm{softmax}(z_k(x) / T)))`, then
      :math:`\log \sum_k w_k(x)\,\mathrm{softmax}(z_k(x))` (``weights`` not allowed).
      A label-free heuristic: a confident teacher is not necessarily a right one.
    * ``"ca_mkd"``: CA-MKD's label-aware per-example weights
      (:func:`ca_mkd_weights`, which needs ``labels``), then the mixture of the
      teachers' softened distributions,
      :math:`T \log \sum_k w_k(x)\,\mathrm{softmax}(z_k(x) / T)`, whose softmax at
      temperature ``T`` is that mixture. Pass the KD loss's temperature: then
      ``kl_divergence(student, aggregated, temperature=T)`` has the same gradient in
      the student as the paper's :math:`\sum_k w_k T^2\,\mathrm{KL}(p_k \| p_s)`
      (the paper weighs the per-teacher losses). In value the paper's sum is larger
      by a term that does not depend on the student, the teachers' spread
      :math:`T^2 (H(\sum_k w_k p_k) - \sum_k w_k H(p_k)) \ge 0`.

    CA-MKD needs the batch's labels, which a teacher apply never sees: use it
    inside an objective, on the stacked teacher logits, e.g.
    ``aggregate_teacher_logits(stacked, method="ca_mkd", labels=batch["label"],
    temperature=T)``; :func:`stacked_teacher_apply` and :func:`multi_teacher_apply`
    take the label-free methods only.

    Args:
      teacher_logits: float array ``[K, ..., C]``.
      method: one of ``"mean_logits"``, ``"mean_probs"``, ``"entropy"``, ``"ca_mkd"``.
      weights: optional ``[K]`` non-negative weights summing to 1 (not with
        ``"entropy"`` or ``"ca_mkd"``, which set their own).
      temperature: for ``"entropy"``, the temperature of the entropies that set the
        weights; for ``"ca_mkd"``, the temperature of the mixed distributions (the
        KD loss's). Unused by the other methods.
      labels: int array ``[...]`` (the logits' shape without ``K`` and the class
        axis): the ground truth, required by ``"ca_mkd"`` and refused by the others.
      axis: the class axis of ``teacher_logits`` (not the teacher axis 0).
      where: optional bool mask of one teacher's logits (as for every loss), only
        for ``"ca_mkd"``: see :func:`ca_mkd_weights`; masked classes get ``-inf``
        and masked examples are all ``-inf``, as in :func:`jaxkd.log_softmax`.

    Returns:
      Array ``[..., C]``.

    Examples:
      >>> import jax.numpy as jnp, jaxkd
      >>> right = jnp.array([[9.0, 0.0]]); wrong = jnp.array([[0.0, 9.0]])
      >>> stacked = jnp.stack([right, wrong])  # [K=2, B=1, C=2]; the label is class 0
      >>> mixed = jaxkd.aggregate_teacher_logits(stacked, method="ca_mkd", labels=jnp.array([0]))
      >>> jaxkd.softmax(mixed).round(2)
      Array([[1., 0.]], dtype=float32)

    References:
      You, Xu, Xu and Tao, "Learning from Multiple Teacher Networks", KDD 2017;
      Zhang, Chen and Wang, "Confidence-Aware Multi-Teacher Knowledge
      Distillation", ICASSP 2022. https://arxiv.org/abs/2201.00007
    """
    if method not in AGGREGATIONS:
        raise ValueError(f"Unknown `method` {method!r}; known: {AGGREGATIONS}.")
    if method in LABEL_AWARE and labels is None:
        raise ValueError(
            f"method={method!r} weighs the teachers by their cross entropy against the "
            "ground truth: pass `labels` (int, the logits' shape without K and the class "
            "axis), e.g. from the batch inside an objective."
        )
    if method not in LABEL_AWARE and (labels is not None or where is not None):
        raise ValueError(f"`labels` and `where` are only used by method='ca_mkd', not {method!r}.")
    if method in ("entropy", "ca_mkd") and weights is not None:
        raise ValueError(f"`weights` cannot be combined with method={method!r}.")
    teacher_logits, axis = _stacked(teacher_logits, axis)
    num_teachers = teacher_logits.shape[0]
    scaled, _, axis = prepare_logits("teacher_logits", teacher_logits, 1.0, axis, None)
    per_teacher = (num_teachers,) + (1,) * (scaled.ndim - 1)
    if method == "ca_mkd":
        _checks.check_positive_scalar("temperature", temperature)
        log_w = jnp.log(ca_mkd_weights(scaled, labels, axis=axis, where=where))
        softened = scaled / jnp.asarray(temperature, scaled.dtype)
        log_p = scaled_log_softmax(softened, axis, _teacher_mask(where, scaled.shape, axis))
        mixture = masked_logsumexp(jnp.expand_dims(log_w, axis) + log_p, 0)
        return jnp.asarray(temperature, scaled.dtype) * mixture
    if method == "entropy":
        confidence = -entropy(scaled, temperature=temperature, axis=axis)  # [K, ...]
        log_w = jnp.expand_dims(jax.nn.log_softmax(confidence, axis=0), axis)
    else:
        w = _teacher_weights(weights, num_teachers, scaled.dtype)
        if method == "mean_logits":
            return jnp.sum(w.reshape(per_teacher) * scaled, axis=0)
        log_w = jnp.log(w).reshape(per_teacher)
    log_p = scaled_log_softmax(scaled, axis, None)
    return masked_logsumexp(log_w + log_p, 0)


def _label_free(aggregate_kwargs) -> None:
    method = aggregate_kwargs.get("method", "mean_logits")
    if method in LABEL_AWARE:
        raise ValueError(
            f"method={method!r} needs the batch's labels, which a teacher apply does not "
            "see. Return the stacked logits from the teachers (e.g. "
            "`jax.vmap(teacher_apply, in_axes=(0, None))`) and call "
            f"`aggregate_teacher_logits(stacked, method={method!r}, labels=...)` in the "
            "objective."
        )


def stacked_teacher_apply(teacher_apply: Callable, **aggregate_kwargs) -> Callable:
    """Teachers of one architecture with params stacked on a leading ``K`` axis.

    Runs ``teacher_apply`` under ``jax.vmap`` over the stacked params, then
    :func:`aggregate_teacher_logits` with a label-free method (``"mean_logits"``,
    ``"mean_probs"`` or ``"entropy"``). Outputs must be logits.

    Returns:
      ``apply(stacked_params, inputs) -> logits [B, C]``.
    """
    _label_free(aggregate_kwargs)
    aggregate = partial(aggregate_teacher_logits, **aggregate_kwargs)

    def apply(stacked_params, inputs):
        return aggregate(jax.vmap(teacher_apply, in_axes=(0, None))(stacked_params, inputs))

    return apply


def multi_teacher_apply(teacher_applies: Sequence[Callable], **aggregate_kwargs) -> Callable:
    """Teachers of different architectures, params given as a sequence.

    Label-free methods only, as in :func:`stacked_teacher_apply`.

    Returns:
      ``apply(params_sequence, inputs) -> logits [B, C]``, running each teacher and
      aggregating their stacked logits with :func:`aggregate_teacher_logits`.
    """
    _label_free(aggregate_kwargs)
    teacher_applies = tuple(teacher_applies)
    aggregate = partial(aggregate_teacher_logits, **aggregate_kwargs)

    def apply(params_sequence, inputs):
        if len(params_sequence) != len(teacher_applies):
            raise ValueError(
                f"Got {len(params_sequence)} teacher params for {len(teacher_applies)} teachers."
            )
        logits = [f(p, inputs) for f, p in zip(teacher_applies, params_sequence, strict=True)]
        _checks.check_same_shape([f"teacher {k} logits" for k in range(len(logits))], logits)
        return aggregate(jnp.stack(logits))

    return apply


def stack_params(params_sequence: Sequence[PyTree]) -> PyTree:
    """Stacks identically structured params on a new leading axis."""
    return jax.tree.map(lambda *leaves: jnp.stack(leaves), *params_sequence)
