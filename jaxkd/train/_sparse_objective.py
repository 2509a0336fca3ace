"""An objective for distillation from a cached sparse (top-k) teacher.

The teacher's outputs were computed once and stored per token as its top-k
log-probabilities, their vocabulary indices and the log of its tail mass (see
:class:`jaxkd.losses._sparse_teacher.SparseTeacher`). The batch carries them; the
step runs no teacher (``make_train_step(..., teacher_apply=None, ...)``).
"""

from __future__ import annotations

from collections.abc import Mapping

import jax
import jax.numpy as jnp

from jaxkd import _checks
from jaxkd.losses._kd_losses import cross_entropy_with_integer_labels
from jaxkd.losses._sparse_teacher import SparseTeacher, tail_bucket_kl, top_k_kl
from jaxkd.parallel._reductions import masked_means
from jaxkd.train._objectives import (
    Objective,
    Scalar,
    _check_hyper_parameter,
    _in_unit_interval,
    _is_real_scalar,
    _scheduled,
    example_mask,
    kd_metrics,
    logits_of,
    value_at,
)

SPARSE_LOSSES = {"tail_kl": tail_bucket_kl, "top_k_kl": top_k_kl}
_FIELDS = ("log_probs", "indices", "log_tail")


def _check_temperature(temperature, cache_temperature) -> float:
    """The one temperature of the run: a number equal to the cache's."""
    for name, value in (("temperature", temperature), ("cache_temperature", cache_temperature)):
        if callable(value) or not _is_real_scalar(value):
            raise TypeError(
                f"`{name}` must be a number, got {type(value).__name__}: a cached sparse "
                "teacher fixes the temperature, so it cannot follow a schedule."
            )
        _checks.check_positive_scalar(name, value)
    if float(temperature) != float(cache_temperature):
        raise ValueError(
            f"`temperature`={float(temperature)} differs from `cache_temperature`="
            f"{float(cache_temperature)}: the cached tail mass log(1 - sum_k p_i) holds at the "
            "cache's temperature only (re-tempering the k log-probabilities cannot give the "
            "tail at another one). Distill at the cache's temperature, or rebuild the cache."
        )
    return float(temperature)


def sparse_teacher_from_batch(batch: Mapping, teacher_prefix: str) -> SparseTeacher:
    """The :class:`SparseTeacher` stored in ``batch`` under ``{teacher_prefix}_<field>``."""
    keys = [f"{teacher_prefix}_{field}" for field in _FIELDS]
    missing = [key for key in keys if key not in batch]
    if missing:
        raise KeyError(
            f"`batch` lacks the cached teacher's {missing}; it has {sorted(batch)}. A sparse "
            f"teacher is stored as {keys}."
        )
    log_probs, indices, log_tail = (batch[key] for key in keys)
    return SparseTeacher(jax.lax.stop_gradient(log_probs), indices, jax.lax.stop_gradient(log_tail))


def sparse_distillation_objective(
    loss: str = "tail_kl",
    *,
    alpha: Scalar = 0.9,
    temperature: float = 1.0,
    cache_temperature: float = 1.0,
    label_key: str | None = "targets",
    mask_key: str = "mask",
    teacher_prefix: str = "teacher_top_k",
) -> Objective:
    r"""``alpha * sparse_kd + (1 - alpha) * cross_entropy(labels)`` from a cached teacher.

    The teacher is read from the batch: ``batch[f"{teacher_prefix}_log_probs"]`` and
    ``batch[f"{teacher_prefix}_indices"]`` (``[..., k]``) and
    ``batch[f"{teacher_prefix}_log_tail"]`` (``[...]``), as
    :func:`jaxkd.top_k_teacher` makes them; the step's teacher
    output is ignored, so build the step with ``teacher_apply=None``. Per-token terms
    are averaged over the real tokens of the global batch (``sum / count`` reduced
    over ``axis_name``), so 8 devices with uneven masks equal one.

    The temperature is the cache's. A cache holds the teacher's distribution at one
    temperature (usually 1): the ``k`` log-probabilities could be re-tempered, but
    the tail mass at another temperature depends on the tail's unstored logits.
    ``temperature`` must therefore be a number equal to ``cache_temperature``
    (a schedule, or a different value, raises here).

    Args:
      loss: ``"tail_kl"`` (:func:`~jaxkd.losses._sparse_teacher.tail_bucket_kl`, the
        KL on the top-k classes plus a tail bucket) or ``"top_k_kl"``
        (:func:`jaxkd.top_k_kl`, renormalized on the top
        k, blind to the student's tail).
      alpha: weight of the distillation term in ``[0, 1]``: a number or a schedule
        ``step -> value`` (a schedule leaving ``[0, 1]`` makes the loss NaN).
      temperature: positive number ``T`` of the distillation term (times ``T**2``).
      cache_temperature: the temperature at which the cache was built; must equal
        ``temperature``.
      label_key: batch key of the integer labels (``[B]`` or ``[B, L]``); ``None``
        for pure distillation (then ``alpha`` must be 1).
      mask_key: batch key of an optional per-token bool mask.
      teacher_prefix: prefix of the batch keys of the cached teacher.

    Returns:
      An objective ``(student_out, teacher_out, batch, step, *, axis_name=None) ->
      (loss, metrics)`` with metrics ``loss``, ``kd_loss``, ``ce_loss``, ``alpha``,
      ``temperature`` and ``agreement`` (the student's top-1 class equals the
      teacher's, ``indices[..., 0]``), all of the global batch.

    References:
      Anshumann, Zaidi, Kedia, Ahn, Kwon, Lee, Lee and Lee, "Sparse Logit Sampling:
      Accelerating Knowledge Distillation in LLMs", ACL 2025.
      https://arxiv.org/abs/2503.16870
    """
    if loss not in SPARSE_LOSSES:
        raise ValueError(f"Unknown `loss` {loss!r}; known: {sorted(SPARSE_LOSSES)}.")
    kd_fn = SPARSE_LOSSES[loss]
    _check_hyper_parameter("alpha", alpha, _checks.check_unit_interval)
    temperature = _check_temperature(temperature, cache_temperature)
    if label_key is None and (callable(alpha) or float(alpha) != 1.0):
        raise ValueError("Without `label_key` there is no cross-entropy term: set alpha=1.0.")

    def objective(student_out, teacher_out, batch, step, *, axis_name=None):
        del teacher_out  # the teacher is the cache in the batch
        student_logits = logits_of(student_out)
        teacher = sparse_teacher_from_batch(batch, teacher_prefix)
        mask = batch.get(mask_key)
        alpha_now = _scheduled("alpha", alpha, step, _checks.check_unit_interval, _in_unit_interval)
        kd = kd_fn(student_logits, teacher, temperature=temperature, where=mask)
        kept = example_mask(mask, student_logits)
        agreement = jnp.argmax(student_logits, axis=-1) == teacher.indices[..., 0]
        means = {"kd": (kd, kept), "agreement": (agreement.astype(jnp.float32), kept)}
        if label_key is not None:
            ce = cross_entropy_with_integer_labels(student_logits, batch[label_key], where=mask)
            means["ce"] = (ce, kept)
        means = masked_means(means, axis_name=axis_name)
        kd = means["kd"]
        ce = means.get("ce", jnp.zeros((), kd.dtype))
        total = alpha_now * kd + (1.0 - alpha_now) * ce
        agreement = jax.lax.stop_gradient(means["agreement"])
        temperature_now = value_at(temperature, step)
        return total, kd_metrics(total, kd, ce, alpha_now, temperature_now, agreement=agreement)

    return objective
