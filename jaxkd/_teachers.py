"""Several teachers as one: aggregation of their logits, and teacher applies.

Aggregation works on stacked teacher logits ``[K, ..., C]`` (``K`` teachers) and
returns logits ``[..., C]``. Probability-space methods return log-probabilities,
which are valid logits: ``softmax`` of them gives the aggregated distribution back.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from functools import partial
from typing import Any

import jax
import jax.numpy as jnp

from jaxkd import _checks
from jaxkd._distributions import entropy, masked_logsumexp, prepare_logits, scaled_log_softmax

PyTree = Any
AGGREGATIONS = ("mean_logits", "mean_probs", "confidence")


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


def aggregate_teacher_logits(
    teacher_logits,
    *,
    method: str = "mean_logits",
    weights=None,
    temperature: float = 1.0,
    axis: int = -1,
) -> jax.Array:
    r"""Combines ``K`` teachers' logits into one teacher.

    Methods, with teacher weights :math:`w_k` (uniform unless ``weights`` given):

    * ``"mean_logits"``: :math:`\sum_k w_k z_k`.
    * ``"mean_probs"``: :math:`\log \sum_k w_k\,\mathrm{softmax}(z_k)`.
    * ``"confidence"``: per-example weights that favour confident teachers,
      :math:`w_k(x) \propto \exp(-H(\mathrm{softmax}(z_k(x) / T)))`, then
      :math:`\log \sum_k w_k(x)\,\mathrm{softmax}(z_k(x))` (``weights`` not allowed).

    Args:
      teacher_logits: float array ``[K, ..., C]``.
      method: one of ``"mean_logits"``, ``"mean_probs"``, ``"confidence"``.
      weights: optional ``[K]`` non-negative weights summing to 1.
      temperature: temperature of the entropies that set confidence weights.
      axis: the class axis of ``teacher_logits`` (not the teacher axis 0).

    Returns:
      Array ``[..., C]``.

    References:
      You, Xu, Xu and Tao, "Learning from Multiple Teacher Networks", KDD 2017;
      Zhang, Chen and Wang, "Confidence-Aware Multi-Teacher Knowledge
      Distillation", ICASSP 2022. https://arxiv.org/abs/2201.00007
    """
    if method not in AGGREGATIONS:
        raise ValueError(f"Unknown `method` {method!r}; known: {AGGREGATIONS}.")
    _checks.check_floating("teacher_logits", teacher_logits)
    teacher_logits = jnp.asarray(teacher_logits)
    if teacher_logits.ndim < 2:
        raise ValueError(
            f"`teacher_logits` must be stacked [K, ..., C], got shape {teacher_logits.shape}."
        )
    axis = _checks.normalize_axis(axis, teacher_logits.ndim)
    if axis == 0:
        raise ValueError("`axis` 0 is the teacher axis; the class axis must be another one.")
    num_teachers = teacher_logits.shape[0]
    scaled, _, axis = prepare_logits("teacher_logits", teacher_logits, 1.0, axis, None)
    per_teacher = (num_teachers,) + (1,) * (scaled.ndim - 1)
    if method == "confidence":
        if weights is not None:
            raise ValueError("`weights` cannot be combined with method='confidence'.")
        confidence = -entropy(scaled, temperature=temperature, axis=axis)  # [K, ...]
        log_w = jax.nn.log_softmax(confidence, axis=0)
        log_w = jnp.expand_dims(log_w, axis)
    else:
        w = _teacher_weights(weights, num_teachers, scaled.dtype)
        if method == "mean_logits":
            return jnp.sum(w.reshape(per_teacher) * scaled, axis=0)
        log_w = jnp.log(w).reshape(per_teacher)
    log_p = scaled_log_softmax(scaled, axis, None)
    return masked_logsumexp(log_w + log_p, 0)


def stacked_teacher_apply(teacher_apply: Callable, **aggregate_kwargs) -> Callable:
    """Teachers of one architecture with params stacked on a leading ``K`` axis.

    Runs ``teacher_apply`` under ``jax.vmap`` over the stacked params, then
    :func:`aggregate_teacher_logits`. Outputs must be logits.

    Returns:
      ``apply(stacked_params, inputs) -> logits [B, C]``.
    """
    aggregate = partial(aggregate_teacher_logits, **aggregate_kwargs)

    def apply(stacked_params, inputs):
        return aggregate(jax.vmap(teacher_apply, in_axes=(0, None))(stacked_params, inputs))

    return apply


def multi_teacher_apply(teacher_applies: Sequence[Callable], **aggregate_kwargs) -> Callable:
    """Teachers of different architectures, params given as a sequence.

    Returns:
      ``apply(params_sequence, inputs) -> logits [B, C]``, running each teacher and
      aggregating their stacked logits with :func:`aggregate_teacher_logits`.
    """
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
