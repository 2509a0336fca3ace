"""Ready-made objectives for the train step, with scheduled hyper-parameters.

An objective has the signature
``objective(student_out, teacher_out, batch, step) -> (loss, metrics)``: it sees the
student's and the teacher's outputs (logits ``[B, C]``, or a mapping with a
``"logits"`` entry), the batch (for labels and masks) and the step (for schedules),
and returns a scalar loss and a dict of scalar metrics.

A hyper-parameter given as a number is constant; given as a callable (any Optax
schedule, ``step -> value``) it is evaluated at the state's step inside the jitted
step, so fixed, linear and exponential-decay schedules are just
``optax.constant_schedule``, ``optax.linear_schedule`` and
``optax.exponential_decay``.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import jax
import jax.numpy as jnp

from jaxkd import _checks
from jaxkd._divergences import (
    generalized_jsd,
    kl_divergence,
    logit_mse,
    reverse_kl_divergence,
    skew_kl_divergence,
    skew_reverse_kl_divergence,
    soft_cross_entropy,
    total_variation,
)
from jaxkd._kd_losses import (
    cross_entropy_with_integer_labels,
    dist_loss,
    dkd_loss,
    masked_mean,
)

Objective = Callable[[Any, Any, Mapping[str, jax.Array], jax.Array], tuple[jax.Array, dict]]
Scalar = float | Callable[[jax.Array], jax.Array]


def logits_of(outputs) -> jax.Array:
    """The logits of a model output: the array itself or ``outputs["logits"]``."""
    if outputs is None:
        raise ValueError(
            "This objective needs the teacher's outputs: pass a `teacher_apply` to "
            "make_train_step, or put cached teacher logits in the batch."
        )
    if isinstance(outputs, Mapping):
        if "logits" not in outputs:
            raise KeyError(f"Model output mapping has no 'logits' entry: {sorted(outputs)}.")
        return outputs["logits"]
    return outputs


def value_at(hyper_parameter: Scalar, step: jax.Array) -> jax.Array:
    """A constant, or a schedule evaluated at ``step``, as a float32 scalar."""
    value = hyper_parameter(step) if callable(hyper_parameter) else hyper_parameter
    return jnp.asarray(value, jnp.float32)


# name -> (function, kind). Kinds: "soft" per-example and tempered; "untempered"
# per-example without temperature; "labelled" per-example, needs labels; "batch"
# returns a scalar for the whole batch.
_DISTILLATION_LOSSES: dict[str, tuple[Callable, str]] = {
    "kl": (kl_divergence, "soft"),
    "reverse_kl": (reverse_kl_divergence, "soft"),
    "soft_cross_entropy": (soft_cross_entropy, "soft"),
    "jsd": (generalized_jsd, "soft"),
    "skew_kl": (skew_kl_divergence, "soft"),
    "skew_reverse_kl": (skew_reverse_kl_divergence, "soft"),
    "total_variation": (total_variation, "soft"),
    "logit_mse": (logit_mse, "untempered"),
    "dkd": (dkd_loss, "labelled"),
    "dist": (dist_loss, "batch"),
}


def _kd_term(name, student_logits, teacher_logits, labels, mask, temperature, kwargs):
    """The mean distillation term of a batch for a loss from the table above."""
    loss_fn, kind = _DISTILLATION_LOSSES[name]
    if kind == "batch":
        return loss_fn(
            student_logits, teacher_logits, temperature=temperature, where=mask, **kwargs
        )
    if kind == "soft":
        values = loss_fn(
            student_logits, teacher_logits, temperature=temperature, where=mask, **kwargs
        )
    elif kind == "untempered":
        values = loss_fn(student_logits, teacher_logits, where=mask, **kwargs)
    else:
        values = loss_fn(
            student_logits, teacher_logits, labels, temperature=temperature, where=mask, **kwargs
        )
    return masked_mean(values, mask)


def distillation_objective(
    loss: str = "kl",
    *,
    alpha: Scalar = 0.9,
    temperature: Scalar = 4.0,
    label_key: str | None = "label",
    mask_key: str = "mask",
    **loss_kwargs,
) -> Objective:
    r"""``alpha * distillation_loss + (1 - alpha) * cross_entropy(labels)``.

    With ``loss="kl"`` this is Hinton et al.'s objective,
    :math:`\alpha T^2 \mathrm{KL}(p_t^T \| p_s^T) + (1 - \alpha) \mathrm{CE}(y, p_s)`.
    Per-example terms are averaged over the batch (over examples where
    ``batch[mask_key]`` is True, when the batch has that key).

    Args:
      loss: one of ``"kl"``, ``"reverse_kl"``, ``"soft_cross_entropy"``, ``"jsd"``,
        ``"skew_kl"``, ``"skew_reverse_kl"``, ``"total_variation"``, ``"logit_mse"``,
        ``"dkd"`` (needs labels), ``"dist"`` (a batch-level loss).
      alpha: weight of the distillation term in ``[0, 1]``: a float or a schedule.
      temperature: positive temperature: a float or a schedule.
      label_key: batch key of the integer labels ``[B]``; ``None`` for pure
        distillation without labels (then ``alpha`` must be 1).
      mask_key: batch key of an optional bool ``[B]`` mask of real examples.
      **loss_kwargs: extra keyword arguments of the loss (``beta`` for ``"jsd"``,
        ``"dkd"`` and ``"dist"``, ``alpha`` of skew KL as ``skew_alpha``...).

    Returns:
      An objective ``(student_out, teacher_out, batch, step) -> (loss, metrics)``
      with metrics ``loss``, ``kd_loss``, ``ce_loss``, ``alpha``, ``temperature``.
    """
    if loss not in _DISTILLATION_LOSSES:
        raise ValueError(f"Unknown `loss` {loss!r}; known: {sorted(_DISTILLATION_LOSSES)}.")
    if label_key is None and (callable(alpha) or alpha != 1.0):
        raise ValueError("Without `label_key` there is no cross-entropy term: set alpha=1.0.")
    if label_key is None and _DISTILLATION_LOSSES[loss][1] == "labelled":
        raise ValueError(f"`loss`={loss!r} needs labels: `label_key` must not be None.")
    for name in ("alpha", "temperature"):
        value = {"alpha": alpha, "temperature": temperature}[name]
        if not callable(value) and not isinstance(value, int | float):
            raise TypeError(f"`{name}` must be a number or a schedule, got {type(value)}.")
    if not callable(temperature):
        _checks.check_positive_scalar("temperature", temperature)
    if not callable(alpha):
        _checks.check_unit_interval("alpha", alpha)
    if "skew_alpha" in loss_kwargs:
        loss_kwargs["alpha"] = loss_kwargs.pop("skew_alpha")

    def objective(student_out, teacher_out, batch, step):
        student_logits = logits_of(student_out)
        teacher_logits = jax.lax.stop_gradient(logits_of(teacher_out))
        mask = batch.get(mask_key)
        labels = None if label_key is None else batch[label_key]
        alpha_now = value_at(alpha, step)
        temperature_now = value_at(temperature, step)
        kd = _kd_term(
            loss, student_logits, teacher_logits, labels, mask, temperature_now, loss_kwargs
        )
        if labels is None:
            ce = jnp.zeros((), kd.dtype)
        else:
            ce = masked_mean(
                cross_entropy_with_integer_labels(student_logits, labels, where=mask), mask
            )
        total = alpha_now * kd + (1.0 - alpha_now) * ce
        metrics = {
            "loss": total,
            "kd_loss": kd,
            "ce_loss": ce,
            "alpha": alpha_now,
            "temperature": temperature_now,
        }
        return total, metrics

    return objective


def hinton_objective(
    *, alpha: Scalar = 0.9, temperature: Scalar = 4.0, label_key: str = "label"
) -> Objective:
    """Hinton et al.'s ``alpha * T^2 KL + (1 - alpha) * CE``; see
    :func:`distillation_objective`.

    References:
      Hinton, Vinyals and Dean, "Distilling the Knowledge in a Neural Network",
      2015. https://arxiv.org/abs/1503.02531
    """
    return distillation_objective("kl", alpha=alpha, temperature=temperature, label_key=label_key)


def cross_entropy_objective(*, label_key: str = "label", mask_key: str = "mask") -> Objective:
    """Plain supervised training: a teacher, or a student from scratch.

    The teacher output is ignored: use it with ``teacher_apply=None`` and batches
    without teacher logits, and :func:`jaxkd.make_train_step` runs no teacher.
    """

    def objective(student_out, teacher_out, batch, step):
        del teacher_out, step
        mask = batch.get(mask_key)
        ce = masked_mean(
            cross_entropy_with_integer_labels(logits_of(student_out), batch[label_key], where=mask),
            mask,
        )
        return ce, {"loss": ce, "ce_loss": ce}

    return objective
