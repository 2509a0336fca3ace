"""Dynamic distillation: the temperature or the weights adapted as the student learns.

Three objectives, each ``alpha * T^2 KL(p_t^T || p_s^T) + (1 - alpha) CE(y, p_s)``
with one hyper-parameter set by a rule instead of by hand:

* :func:`ctkd_objective`: a learned global temperature trained *against* the student
  through a gradient-reversal layer whose strength follows a curriculum (CTKD).
* :func:`confidence_temperature_objective`: a temperature per example, higher where
  the teacher is confident (its soft targets then carry least information at T=1).
* :func:`gap_alpha_objective`: the KD weight set from the current teacher-student gap.

Every mean is over the real examples of the global batch (``(sum, count)`` reduced
over ``axis_name``), so one device and eight agree, as in the other objectives.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp

from jaxkd import _checks
from jaxkd.losses._distributions import entropy
from jaxkd.losses._divergences import kl_divergence
from jaxkd.losses._kd_losses import cross_entropy_with_integer_labels
from jaxkd.parallel._reductions import masked_means
from jaxkd.train._objectives import Objective, example_mask, kd_metrics, logits_of


def _hinton(student_out, teacher_out, batch, temperature, alpha, keys, axis_name):
    """``(alpha * kd + (1 - alpha) * ce, kd, ce)``, means over the global batch;
    ``temperature`` a scalar or ``[B]``; ``keys`` the batch's ``(label_key, mask_key)``.

    A per-example temperature ``T_i`` gives ``T_i^2 KL(p_t^{T_i} || p_s^{T_i})``:
    both logit rows divided by ``T_i`` at temperature 1, then scaled by ``T_i^2``.
    """
    label_key, mask_key = keys
    student_logits = logits_of(student_out)
    teacher_logits = jax.lax.stop_gradient(logits_of(teacher_out))
    mask = batch.get(mask_key)
    kept = example_mask(mask, student_logits)
    temperature = jnp.asarray(temperature, jnp.float32)
    if temperature.ndim == 0:
        kd = kl_divergence(student_logits, teacher_logits, temperature=temperature, where=mask)
    else:
        scale = temperature[..., None]
        kd = jnp.square(temperature) * kl_divergence(
            student_logits / scale, teacher_logits / scale, where=mask
        )
    ce = cross_entropy_with_integer_labels(student_logits, batch[label_key], where=mask)
    means = masked_means({"kd": (kd, kept), "ce": (ce, kept)}, axis_name=axis_name)
    return alpha * means["kd"] + (1.0 - alpha) * means["ce"], means["kd"], means["ce"]


@jax.custom_vjp
def _reverse_gradient(x, strength):
    return x


def _reverse_forward(x, strength):
    return x, strength


def _reverse_backward(strength, gradient):
    return -strength * gradient, jnp.zeros_like(strength)


_reverse_gradient.defvjp(_reverse_forward, _reverse_backward)


def reverse_gradient(x: jax.Array, strength) -> jax.Array:
    """The identity, whose gradient is multiplied by ``-strength`` (Ganin and
    Lempitsky, 2015): a parameter behind it ascends the loss the rest descends."""
    return _reverse_gradient(x, jnp.asarray(strength, jnp.float32))


def cosine_ramp(step, *, steps: int, maximum: float = 1.0) -> jax.Array:
    """``maximum * (1 - cos(pi * min(step / steps, 1))) / 2``: 0 at step 0, rising
    smoothly to ``maximum`` at ``steps`` (CTKD's curriculum for the reversal)."""
    progress = jnp.clip(jnp.asarray(step, jnp.float32) / steps, 0.0, 1.0)
    return maximum * 0.5 * (1.0 - jnp.cos(jnp.pi * progress))


def ctkd_objective(
    *,
    alpha: float = 0.9,
    initial_temperature: float = 4.0,
    min_temperature: float = 1.0,
    max_temperature: float = 21.0,
    curriculum_steps: int = 1000,
    max_strength: float = 1.0,
    label_key: str = "label",
    mask_key: str = "mask",
) -> Objective:
    r"""Curriculum temperature: a learned temperature that makes distillation harder.

    The temperature :math:`T = T_{min} + (T_{max} - T_{min})\,\sigma(\theta)` has one
    trainable parameter :math:`\theta` in ``distill_params["temperature"]``. It enters
    the loss through a gradient-reversal layer of strength :math:`\lambda(s)`, which
    rises from 0 to ``max_strength`` over ``curriculum_steps`` on a cosine
    (:func:`cosine_ramp`): the student minimizes the loss while :math:`\theta` takes a
    step that *increases* the KD term, the more so as training goes on, which is
    CTKD's easy-to-hard curriculum. The student's gradient is that of Hinton's loss at
    the current :math:`T`.

    Args:
      alpha: weight of the KD term in ``[0, 1]``.
      initial_temperature: :math:`T` at initialization, inside the open range.
      min_temperature, max_temperature: the range of :math:`T` (CTKD: 1 and 21).
      curriculum_steps: steps over which the reversal strength ramps up.
      max_strength: the strength reached (CTKD: 1).
      label_key, mask_key: batch keys of the labels and of the optional mask.

    Returns:
      An objective with ``init`` (:func:`jaxkd.init_distillation`), reporting
      ``temperature`` (the learned :math:`T`) and ``reversal_strength``.

    References:
      Li, Li, Yang, Jiang, Cheng, Yang, "Curriculum Temperature for Knowledge
      Distillation", AAAI 2023. https://arxiv.org/abs/2211.16231
    """
    _checks.check_unit_interval("alpha", alpha)
    _checks.check_positive_scalar("min_temperature", min_temperature)
    if not min_temperature < initial_temperature < max_temperature:
        raise ValueError(
            f"`initial_temperature`={initial_temperature} must lie strictly between "
            f"`min_temperature`={min_temperature} and `max_temperature`={max_temperature}."
        )
    if not isinstance(curriculum_steps, int) or curriculum_steps < 1:
        raise ValueError(f"`curriculum_steps` must be an int >= 1, got {curriculum_steps!r}.")
    _checks.check_non_negative("max_strength", max_strength)
    span = max_temperature - min_temperature
    fraction = (initial_temperature - min_temperature) / span
    theta0 = math.log(fraction / (1.0 - fraction))

    def init(rng, student_out, teacher_out, batch):
        del rng, student_out, teacher_out, batch
        return {"temperature": jnp.asarray(theta0, jnp.float32)}, {}

    keys = (label_key, mask_key)

    def objective(student_out, teacher_out, batch, step, *, axis_name=None, distill_params):
        strength = cosine_ramp(step, steps=curriculum_steps, maximum=max_strength)
        theta = reverse_gradient(distill_params["temperature"], strength)
        temperature = min_temperature + span * jax.nn.sigmoid(theta)
        total, kd, ce = _hinton(
            student_out, teacher_out, batch, temperature, alpha, keys, axis_name
        )
        metrics = kd_metrics(total, kd, ce, jnp.float32(alpha), temperature)
        return total, {**metrics, "reversal_strength": strength}

    objective.init = init
    return objective


def confidence_temperatures(
    teacher_logits, *, min_temperature: float, max_temperature: float
) -> jax.Array:
    r"""Per-example temperatures ``[...]`` from the teacher's confidence.

    .. math::
      T_i = T_{min} + (T_{max} - T_{min}) \left(1 - \frac{H(p_t(x_i))}{\log C}\right)

    A confident teacher (entropy near 0), whose plain soft targets are nearly one-hot,
    is softened most; a teacher already uncertain over all ``C`` classes keeps
    :math:`T_{min}`. Computed from the teacher alone, without gradient.
    """
    num_classes = jnp.shape(teacher_logits)[-1]
    if num_classes < 2:
        raise ValueError(
            f"`teacher_logits` needs >= 2 classes, got shape {jnp.shape(teacher_logits)}."
        )
    confidence = 1.0 - entropy(teacher_logits) / math.log(num_classes)
    confidence = jnp.clip(jax.lax.stop_gradient(confidence), 0.0, 1.0)
    return min_temperature + (max_temperature - min_temperature) * confidence


def confidence_temperature_objective(
    *,
    alpha: float = 0.9,
    min_temperature: float = 1.0,
    max_temperature: float = 8.0,
    label_key: str = "label",
    mask_key: str = "mask",
) -> Objective:
    r"""Hinton's objective with a temperature per example, from the teacher's confidence.

    ``alpha * mean_i T_i^2 KL(p_t^{T_i} || p_s^{T_i}) + (1 - alpha) * CE``, with
    :math:`T_i` from :func:`confidence_temperatures`. Reports the mean ``temperature``
    of the batch's real examples.
    """
    _checks.check_unit_interval("alpha", alpha)
    _checks.check_positive_scalar("min_temperature", min_temperature)
    if not (math.isfinite(max_temperature) and max_temperature >= min_temperature):
        raise ValueError(
            f"`max_temperature`={max_temperature} must be >= `min_temperature`={min_temperature}."
        )

    keys = (label_key, mask_key)

    def objective(student_out, teacher_out, batch, step, *, axis_name=None):
        del step
        teacher_logits = logits_of(teacher_out)
        temperatures = confidence_temperatures(
            teacher_logits, min_temperature=min_temperature, max_temperature=max_temperature
        )
        total, kd, ce = _hinton(
            student_out, teacher_out, batch, temperatures, alpha, keys, axis_name
        )
        kept = example_mask(batch.get(mask_key), teacher_logits)
        mean_temperature = masked_means({"t": (temperatures, kept)}, axis_name=axis_name)["t"]
        return total, kd_metrics(total, kd, ce, jnp.float32(alpha), mean_temperature)

    return objective


def gap_alpha(gap, *, max_alpha: float, scale: float) -> jax.Array:
    r""":math:`\alpha = \alpha_{max} (1 - e^{-g / s})` for a teacher-student gap
    :math:`g \ge 0`: 0 when the student already matches the teacher, approaching
    :math:`\alpha_{max}` as it falls behind."""
    return max_alpha * (1.0 - jnp.exp(-jnp.maximum(gap, 0.0) / scale))


def gap_alpha_objective(
    *,
    temperature: float = 4.0,
    max_alpha: float = 0.9,
    scale: float = 0.5,
    label_key: str = "label",
    mask_key: str = "mask",
) -> Objective:
    r"""Hinton's objective whose KD weight follows the teacher-student gap.

    The gap :math:`g` is the plain (T=1) :math:`\mathrm{KL}(p_t \| p_s)` averaged over
    the real examples of the global batch, without gradient, and
    :math:`\alpha = ` :func:`gap_alpha` of it: far from the teacher, the student is
    mostly distilled; close to it, the labels take over. Reports ``alpha`` and
    ``gap``.
    """
    _checks.check_positive_scalar("temperature", temperature)
    _checks.check_unit_interval("max_alpha", max_alpha)
    _checks.check_positive_scalar("scale", scale)

    keys = (label_key, mask_key)

    def objective(student_out, teacher_out, batch, step, *, axis_name=None):
        del step
        student_logits = jax.lax.stop_gradient(logits_of(student_out))
        teacher_logits = logits_of(teacher_out)
        mask = batch.get(mask_key)
        gap = kl_divergence(student_logits, teacher_logits, where=mask)
        kept = example_mask(mask, student_logits)
        gap = masked_means({"gap": (gap, kept)}, axis_name=axis_name)["gap"]
        alpha = gap_alpha(gap, max_alpha=max_alpha, scale=scale)
        total, kd, ce = _hinton(
            student_out, teacher_out, batch, temperature, alpha, keys, axis_name
        )
        metrics = kd_metrics(total, kd, ce, alpha, jnp.float32(temperature), gap=gap)
        return total, metrics

    return objective


DYNAMIC_OBJECTIVES = {
    "ctkd": ctkd_objective,
    "confidence_temperature": confidence_temperature_objective,
    "gap_alpha": gap_alpha_objective,
}
