"""An objective on hidden states and output projections: logits a chunk at a time.

With a large vocabulary, the student's ``apply`` returns its last hidden states and
its output projection instead of logits, and
:func:`chunked_distillation_objective` runs
:func:`jaxkd.chunked_distillation_loss` on them, so that neither the forward nor
the backward pass of the train step holds the ``[B, L, V]`` logits. The teacher's
outputs are its logits or, better, its hidden states and projection too.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp

from jaxkd import _checks
from jaxkd.losses._chunked import chunked_distillation_loss, resolve_chunk_size
from jaxkd.losses._divergences import DIVERGENCES
from jaxkd.train._objectives import (
    Objective,
    Scalar,
    _check_hyper_parameter,
    _in_unit_interval,
    _KdTerm,
    _positive,
    _scheduled,
    kd_metrics,
    value_at,
)


def _flat(name: str, array, lead: tuple[int, ...]):
    """``array`` ``[*lead, ...]`` as ``[prod(lead), ...]``, after checking its leading shape."""
    if array is None:
        return None
    shape = jnp.shape(array)
    if shape[: len(lead)] != lead:
        raise ValueError(
            f"`{name}` has shape {shape}; its leading dimensions must be the hidden "
            f"states' token shape {lead}."
        )
    return jnp.reshape(array, (-1, *shape[len(lead) :]))


def _token_mask(key: str, mask, lead: tuple[int, ...]) -> jax.Array:
    """A bool token mask ``[*lead]`` (or ``[*lead, 1]``) flattened to ``[N]``."""
    mask = jnp.asarray(mask)
    if mask.dtype != jnp.bool_:
        raise TypeError(f"`batch[{key!r}]` must be a boolean mask, got dtype {mask.dtype}.")
    if mask.shape == (*lead, 1):
        mask = mask[..., 0]
    if mask.shape != lead:
        raise ValueError(
            f"`batch[{key!r}]` must be a token mask of shape {lead} (or {(*lead, 1)}), got "
            f"{mask.shape}; per-class masks are not supported by the chunked objective."
        )
    return mask.reshape(-1)


def _projection_of(name: str, outputs) -> tuple[Any, Any, Any]:
    if not isinstance(outputs, Mapping) or "hidden" not in outputs or "kernel" not in outputs:
        got = sorted(outputs) if isinstance(outputs, Mapping) else type(outputs).__name__
        raise ValueError(
            f"The {name}'s outputs must be a mapping with 'hidden' [..., d] and 'kernel' "
            f"[d, V] (and optionally 'bias' [V]); got {got}."
        )
    return outputs["hidden"], outputs["kernel"], outputs.get("bias")


def chunked_distillation_objective(
    loss: str = "kl",
    *,
    alpha: Scalar = 0.5,
    temperature: Scalar = 1.0,
    label_key: str | None = "targets",
    mask_key: str = "mask",
    loss_kwargs: Mapping[str, Any] | None = None,
    chunk_size: int | str = "auto",
    logit_scale: float | None = None,
    softcap: float | None = None,
    teacher_logit_scale: float | None = None,
    teacher_softcap: float | None = None,
    with_metrics: bool = True,
) -> Objective:
    r"""``alpha * divergence + (1 - alpha) * CE`` per real token, chunked over tokens.

    The same objective as :func:`jaxkd.distillation_objective` with a divergence
    ``loss``, computed by :func:`jaxkd.chunked_distillation_loss`: the student's
    outputs are ``{"hidden": [B, L, d], "kernel": [d, V], "bias": [V] (optional)}``
    and the teacher's are logits ``[B, L, V]`` (an array or ``{"logits": ...}``)
    or the same kind of mapping. The loss is the mean over the real tokens of the
    global batch (sums and counts reduced over ``axis_name``).

    Args:
      loss: a divergence name: ``"kl"``, ``"reverse_kl"``, ``"soft_cross_entropy"``,
        ``"jsd"``, ``"skew_kl"``, ``"skew_reverse_kl"``, ``"total_variation"``.
      alpha: the divergence's weight in ``[0, 1]``, a number or a schedule.
      temperature: positive temperature, a number or a schedule.
      label_key: batch key of the target ids ``[B, L]``; ``None``: no CE, alpha 1.
      mask_key: batch key of the optional bool token mask ``[B, L]``.
      loss_kwargs: the divergence's options (values may be schedules, reported as
        metrics), checked when the objective is built.
      chunk_size: tokens per chunk, or ``"auto"`` (see
        :func:`jaxkd.chunked_distillation_loss`).
      logit_scale, softcap: the student's output layer (see
        :func:`jaxkd.output_logits`).
      teacher_logit_scale, teacher_softcap: the teacher's, when it gives hidden states.
      with_metrics: also report ``student_entropy``, ``teacher_entropy`` and
        ``agreement``, computed chunk by chunk (the step cannot: it has no logits).

    Returns:
      An objective ``(student_out, teacher_out, batch, step, *, axis_name=None) ->
      (loss, metrics)`` with metrics ``loss``, ``kd_loss``, ``ce_loss``, ``alpha``,
      ``temperature``, each scheduled option and, with ``with_metrics``, the three
      above.
    """
    if loss not in DIVERGENCES:
        raise ValueError(f"Unknown `loss` {loss!r}; known: {sorted(DIVERGENCES)}.")
    _check_hyper_parameter("alpha", alpha, _checks.check_unit_interval)
    _check_hyper_parameter("temperature", temperature, _checks.check_positive_scalar)
    if label_key is None and (callable(alpha) or float(alpha) != 1.0):
        raise ValueError("Without `label_key` there is no cross-entropy term: set alpha=1.0.")
    if chunk_size is None:
        raise ValueError("`chunk_size` must be a positive int or 'auto' (None is unchunked).")
    resolve_chunk_size(chunk_size, 1)
    temperature_now = float(value_at(temperature, jnp.zeros((), jnp.int32)))
    kd_term = _KdTerm(loss, loss_kwargs or {}, temperature_now)

    def objective(student_out, teacher_out, batch, step, *, axis_name=None):
        hidden, kernel, bias = _projection_of("student", student_out)
        lead = jnp.shape(hidden)[:-1]
        if teacher_out is None:
            raise ValueError(
                "This objective needs the teacher's outputs: pass a `teacher_apply` to "
                "make_train_step, or put cached teacher logits in the batch."
            )
        teacher = {}
        if isinstance(teacher_out, Mapping) and "hidden" in teacher_out:
            t_hidden, t_kernel, t_bias = _projection_of("teacher", teacher_out)
            teacher = dict(
                teacher_hidden=_flat("teacher hidden", t_hidden, lead),
                teacher_kernel=t_kernel,
                teacher_bias=t_bias,
                teacher_logit_scale=teacher_logit_scale,
                teacher_softcap=teacher_softcap,
            )
        else:
            logits = teacher_out["logits"] if isinstance(teacher_out, Mapping) else teacher_out
            teacher = dict(teacher_logits=_flat("teacher_logits", logits, lead))
        teacher = jax.lax.stop_gradient(teacher)
        labels = None if label_key is None else _flat(label_key, batch[label_key], lead)
        mask = batch.get(mask_key)
        if mask is not None:
            mask = _token_mask(mask_key, mask, lead)
        alpha_now = _scheduled("alpha", alpha, step, _checks.check_unit_interval, _in_unit_interval)
        temperature_now = _scheduled(
            "temperature", temperature, step, _checks.check_positive_scalar, _positive
        )
        sums = chunked_distillation_loss(
            jnp.reshape(hidden, (-1, jnp.shape(hidden)[-1])),
            kernel,
            labels,
            student_bias=bias,
            loss=loss,
            alpha=alpha_now if label_key is not None else 1.0,
            temperature=temperature_now,
            loss_kwargs=kd_term.options_at(step),
            logit_scale=logit_scale,
            softcap=softcap,
            where=mask,
            chunk_size=chunk_size,
            with_metrics=with_metrics,
            **teacher,
        )
        names = ["loss", "kd", "ce"] + (
            ["student_entropy", "teacher_entropy", "agreement"] if with_metrics else []
        )
        stacked = jnp.stack([getattr(sums, name) for name in names] + [sums.count])
        if axis_name is not None:
            stacked = jax.lax.psum(stacked, axis_name)
        means = stacked[:-1] / jnp.maximum(stacked[-1], 1.0)
        means = dict(zip(names, means, strict=True))
        total, kd, ce = means.pop("loss"), means.pop("kd"), means.pop("ce")
        metrics = kd_metrics(total, kd, ce, alpha_now, temperature_now, kd_term, step, **means)
        return total, metrics

    return objective
