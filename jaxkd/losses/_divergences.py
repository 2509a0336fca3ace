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
  log-probabilities (see :func:`jaxkd.losses._divergence_terms.softened_pair`).
* ``0 log 0 = 0``: classes to which a distribution gives probability 0 (masked,
  ``-inf`` logits or underflow) contribute nothing and give finite gradients.
* Nothing stops gradients into ``teacher_logits``: the train step never
  differentiates the teacher, and symmetric uses (mutual learning) stay possible.
* ``vocab_axis_name`` (all but :func:`logit_mse`): inside ``jax.shard_map``, the
  logits may be a slice of the classes on each device of a mesh axis (a vocabulary
  shard ``[..., V/m]``); naming that axis completes every maximum and sum over
  classes across it (``lax.pmax``, ``lax.psum``), so each device gets the value of
  the gathered logits, at the same precision, without gathering them.
  :func:`jaxkd.losses.vocab_parallel_divergence` dispatches to these functions.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from jaxkd import _checks
from jaxkd.losses._distributions import prepare_logits, scaled_log_softmax
from jaxkd.losses._divergence_terms import (
    class_sum,
    forward_kl_terms,
    mixture_kl_terms,
    pair_divergence,
    reverse_kl_terms,
    softmax_parts,
    total_variation_terms,
)


def softened_log_probs(
    student_logits, teacher_logits, temperature, axis, where, *, vocab_axis_name=None
):
    """Validates a student/teacher pair; returns ``(log_p_s, log_p_t, mask, axis)``.

    ``mask`` is the full-shape bool mask of classes taking part (or ``None``). With
    ``vocab_axis_name`` the log-probabilities are this device's slice of the global
    ones (:func:`jaxkd.losses._divergence_terms.softmax_parts`).
    """
    _checks.check_same_shape(["student_logits", "teacher_logits"], [student_logits, teacher_logits])
    student, mask, axis = prepare_logits("student_logits", student_logits, temperature, axis, where)
    teacher, _, _ = prepare_logits("teacher_logits", teacher_logits, temperature, axis, where)
    dtype = jnp.promote_types(student.dtype, teacher.dtype)
    student, teacher = student.astype(dtype), teacher.astype(dtype)
    if vocab_axis_name is None:
        log_p_s = scaled_log_softmax(student, axis, mask)
        log_p_t = scaled_log_softmax(teacher, axis, mask)
        return log_p_s, log_p_t, mask, axis
    if mask is not None:
        student = jnp.where(mask, student, -jnp.inf)
        teacher = jnp.where(mask, teacher, -jnp.inf)
    (_, log_p_s, _), (_, log_p_t, _) = softmax_parts((student, teacher), axis, vocab_axis_name)
    return log_p_s, log_p_t, mask, axis


def _tempered_divergence(
    student_logits, teacher_logits, temperature, axis, where, terms, *, vocab_axis_name=None
):
    """``T^2 * sum_classes terms(log_p_s, log_p_t)``, for terms without cancellation.

    Args:
      terms: elementwise function of the two log-probability arrays.
      vocab_axis_name: ``None`` or the mesh axis over which the classes are sharded.
    """
    log_p_s, log_p_t, _, axis = softened_log_probs(
        student_logits, teacher_logits, temperature, axis, where, vocab_axis_name=vocab_axis_name
    )
    (value,) = class_sum((terms(log_p_s, log_p_t),), axis, vocab_axis_name)
    return jnp.square(jnp.asarray(temperature, value.dtype)) * value


def kl_divergence(
    student_logits,
    teacher_logits,
    *,
    temperature=1.0,
    axis: int = -1,
    where=None,
    vocab_axis_name=None,
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
      vocab_axis_name: inside ``jax.shard_map``, the name of a mesh axis over which
        the class axis is sharded: the value is the gathered logits', on every device
        of that axis (module docstring). ``None`` (default): the class axis is whole.

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
    return pair_divergence(
        student_logits,
        teacher_logits,
        temperature,
        axis,
        where,
        forward_kl_terms,
        vocab_axis_name=vocab_axis_name,
    )


def reverse_kl_divergence(
    student_logits,
    teacher_logits,
    *,
    temperature=1.0,
    axis: int = -1,
    where=None,
    vocab_axis_name=None,
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
      vocab_axis_name: inside ``jax.shard_map``, the name of a mesh axis over which
        the class axis is sharded: the value is the gathered logits', on every device
        of that axis (module docstring). ``None`` (default): the class axis is whole.

    Returns:
      Non-negative array of the logits' shape without ``axis``.

    References:
      Gu, Dong, Wei and Huang, "MiniLLM: Knowledge Distillation of Large Language
      Models", ICLR 2024. https://arxiv.org/abs/2306.08543
    """
    return pair_divergence(
        student_logits,
        teacher_logits,
        temperature,
        axis,
        where,
        reverse_kl_terms,
        vocab_axis_name=vocab_axis_name,
    )


def soft_cross_entropy(
    student_logits,
    teacher_logits,
    *,
    temperature=1.0,
    axis: int = -1,
    where=None,
    vocab_axis_name=None,
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
      vocab_axis_name: inside ``jax.shard_map``, the name of a mesh axis over which
        the class axis is sharded: the value is the gathered logits', on every device
        of that axis (module docstring). ``None`` (default): the class axis is whole.

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

    return _tempered_divergence(
        student_logits,
        teacher_logits,
        temperature,
        axis,
        where,
        terms,
        vocab_axis_name=vocab_axis_name,
    )


def generalized_jsd(
    student_logits,
    teacher_logits,
    *,
    beta: float = 0.5,
    temperature=1.0,
    axis: int = -1,
    where=None,
    vocab_axis_name=None,
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
      beta: scalar in ``[0, 1]``, the teacher's weight in the mixture. A Python
        float picks the endpoint formula statically; a traced scalar (a schedule
        inside a jitted step) computes all three and selects, and is NaN outside
        ``[0, 1]``.
      temperature: positive scalar ``T``.
      axis: the class axis.
      where: optional bool mask, per class or per example (module docstring).
      vocab_axis_name: inside ``jax.shard_map``, the name of a mesh axis over which
        the class axis is sharded: the value is the gathered logits', on every device
        of that axis (module docstring). ``None`` (default): the class axis is whole.

    Returns:
      Non-negative array of the logits' shape without ``axis``.

    References:
      Agarwal et al., "On-Policy Distillation of Language Models: Learning from
      Self-Generated Mistakes" (GKD), ICLR 2024. https://arxiv.org/abs/2306.13649
    """
    _checks.check_unit_interval("beta", beta)
    kwargs = dict(temperature=temperature, axis=axis, where=where, vocab_axis_name=vocab_axis_name)
    if not _checks.is_concrete(beta):
        return _generalized_jsd_traced(student_logits, teacher_logits, beta, **kwargs)
    beta = float(beta)
    if beta == 0.0:
        return kl_divergence(student_logits, teacher_logits, **kwargs)
    if beta == 1.0:
        return reverse_kl_divergence(student_logits, teacher_logits, **kwargs)
    return _mixture_jsd(student_logits, teacher_logits, beta, **kwargs)


def _mixture_jsd_terms(pair, beta):
    """Terms of ``beta KL(p_t || m) + (1 - beta) KL(p_s || m)``, as ``(balanced, plain)``."""
    teacher_terms, student_terms = mixture_kl_terms(pair, beta)
    return tuple(
        beta * t + (1 - beta) * s for t, s in zip(teacher_terms, student_terms, strict=True)
    )


def _mixture_jsd(
    student_logits, teacher_logits, beta, *, temperature, axis, where, vocab_axis_name
):
    """``beta KL(p_t || m) + (1 - beta) KL(p_s || m)`` for any ``beta`` in [0, 1]."""
    return pair_divergence(
        student_logits,
        teacher_logits,
        temperature,
        axis,
        where,
        lambda pair: _mixture_jsd_terms(pair, beta),
        vocab_axis_name=vocab_axis_name,
    )


def _generalized_jsd_traced(
    student_logits, teacher_logits, beta, *, temperature, axis, where, vocab_axis_name
):
    """:func:`generalized_jsd` for a traced ``beta`` (e.g. a schedule in a jitted step).

    The endpoints' terms (forward KL, reverse KL) and the mixture's are computed
    from one softened pair and selected with ``jnp.where``; a ``beta`` outside
    ``[0, 1]`` gives NaN rather than a silent value.
    """
    beta = jnp.asarray(beta, jnp.float32)

    def terms(pair):
        candidates = zip(
            forward_kl_terms(pair),
            reverse_kl_terms(pair),
            _mixture_jsd_terms(pair, beta),
            strict=True,
        )
        return tuple(
            jnp.where(beta == 0.0, forward, jnp.where(beta == 1.0, reverse, mixture))
            for forward, reverse, mixture in candidates
        )

    value = pair_divergence(
        student_logits,
        teacher_logits,
        temperature,
        axis,
        where,
        terms,
        vocab_axis_name=vocab_axis_name,
    )
    return jnp.where((beta >= 0.0) & (beta <= 1.0), value, jnp.nan)


def skew_kl_divergence(
    student_logits,
    teacher_logits,
    *,
    alpha=0.1,
    temperature=1.0,
    axis: int = -1,
    where=None,
    vocab_axis_name=None,
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
      vocab_axis_name: inside ``jax.shard_map``, the name of a mesh axis over which
        the class axis is sharded: the value is the gathered logits', on every device
        of that axis (module docstring). ``None`` (default): the class axis is whole.

    Returns:
      Non-negative array of the logits' shape without ``axis``.

    References:
      Ko, Kim, Chen and Yun, "DistiLLM: Towards Streamlined Distillation for Large
      Language Models", ICML 2024. https://arxiv.org/abs/2402.03898
    """
    _checks.check_unit_interval("alpha", alpha)
    return pair_divergence(
        student_logits,
        teacher_logits,
        temperature,
        axis,
        where,
        lambda pair: mixture_kl_terms(pair, alpha)[0],
        vocab_axis_name=vocab_axis_name,
    )


def skew_reverse_kl_divergence(
    student_logits,
    teacher_logits,
    *,
    alpha=0.1,
    temperature=1.0,
    axis: int = -1,
    where=None,
    vocab_axis_name=None,
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
      vocab_axis_name: inside ``jax.shard_map``, the name of a mesh axis over which
        the class axis is sharded: the value is the gathered logits', on every device
        of that axis (module docstring). ``None`` (default): the class axis is whole.

    Returns:
      Non-negative array of the logits' shape without ``axis``.

    References:
      Ko, Kim, Chen and Yun, "DistiLLM: Towards Streamlined Distillation for Large
      Language Models", ICML 2024. https://arxiv.org/abs/2402.03898
    """
    _checks.check_unit_interval("alpha", alpha)
    return pair_divergence(
        student_logits,
        teacher_logits,
        temperature,
        axis,
        where,
        lambda pair: mixture_kl_terms(pair, 1.0 - jnp.asarray(alpha))[1],
        vocab_axis_name=vocab_axis_name,
    )


def total_variation(
    student_logits,
    teacher_logits,
    *,
    temperature=1.0,
    axis: int = -1,
    where=None,
    vocab_axis_name=None,
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
      vocab_axis_name: inside ``jax.shard_map``, the name of a mesh axis over which
        the class axis is sharded: the value is the gathered logits', on every device
        of that axis (module docstring). ``None`` (default): the class axis is whole.

    Returns:
      Non-negative array of the logits' shape without ``axis``.

    References:
      Wen, Li, Du and Mou, "f-Divergence Minimization for Sequence-Level Knowledge
      Distillation", ACL 2023. https://arxiv.org/abs/2307.15190
    """
    return pair_divergence(
        student_logits,
        teacher_logits,
        temperature,
        axis,
        where,
        total_variation_terms,
        refine=True,
        vocab_axis_name=vocab_axis_name,
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


# The divergences by name: the core set that the fused (chunked) and the
# vocabulary-parallel losses compute, and a part of the objectives' names.
DIVERGENCES = {
    "kl": kl_divergence,
    "reverse_kl": reverse_kl_divergence,
    "soft_cross_entropy": soft_cross_entropy,
    "jsd": generalized_jsd,
    "skew_kl": skew_kl_divergence,
    "skew_reverse_kl": skew_reverse_kl_divergence,
    "total_variation": total_variation,
}
