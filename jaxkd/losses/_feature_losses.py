"""Feature-level distillation losses, and helpers shared with the relational ones.

Feature losses compare what the two networks compute inside, example by example:
``hint_loss`` (FitNets) and ``attention_transfer_loss`` return one value per example.
The relational losses live in :mod:`jaxkd.losses._relational_losses`.

Conventions shared by these and the relational losses:

* ``where`` is a per-example bool mask of shape ``[B]``. A masked example gives 0
  (per-example losses) or takes part in no pair or triplet (relational losses), and
  its features are replaced by zeros before any arithmetic, so padding holding NaN
  or ``inf`` neither reaches the value nor the gradients. With no example kept the
  loss is 0, with finite gradients.
* bfloat16/float16 inputs are computed, and returned, in float32.
* Norms and normalizations are safe at the zero vector (value and gradient 0, not
  NaN), so coincident embeddings and all-zero feature maps are fine.
* Batch-level matrix products use ``Precision.HIGHEST``: similarities close to 1
  are differences of large numbers, and the matrices are only ``[B, B]`` or
  ``[B, B, B]``.
* Nothing stops gradients into the teacher's features, as in the logit losses.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from jaxkd import _checks
from jaxkd.losses._distributions import _as_compute_dtype
from jaxkd.losses._kd_losses import _safe_norm

_HIGHEST = jax.lax.Precision.HIGHEST


def _check_rank(name: str, array, rank: int | None, layout: str) -> None:
    """Raises ``ValueError`` unless ``array`` has rank ``rank`` (at least 2 if None)."""
    ndim = jnp.ndim(array)
    wrong = ndim < 2 if rank is None else ndim != rank
    if wrong:
        raise ValueError(f"`{name}` must be {layout}, got shape {jnp.shape(array)}.")


def _example_mask(where, batch_size: int):
    """Validates a per-example mask; returns a bool ``[B]`` array (all True if None)."""
    if where is None:
        return jnp.ones((batch_size,), jnp.bool_)
    dtype = jnp.result_type(where)
    if dtype != jnp.bool_:
        raise TypeError(f"`where` must be a boolean mask, got dtype {dtype}.")
    if jnp.shape(where) != (batch_size,):
        raise ValueError(
            f"`where` must be a per-example mask of shape {(batch_size,)}, got {jnp.shape(where)}."
        )
    return jnp.asarray(where)


def _prepare_pair(names, student, teacher, *, rank: int | None, layout: str, where):
    """Checks a student/teacher pair and casts both to one compute dtype.

    Returns ``(student, teacher, kept)`` with masked examples zeroed and ``kept`` the
    bool ``[B]`` mask. Only the batch sizes are compared here.
    """
    student_name, teacher_name = names
    _checks.check_floating(student_name, student)
    _checks.check_floating(teacher_name, teacher)
    _check_rank(student_name, student, rank, layout)
    _check_rank(teacher_name, teacher, rank, layout)
    student_shape, teacher_shape = jnp.shape(student), jnp.shape(teacher)
    if student_shape[0] != teacher_shape[0]:
        raise ValueError(
            f"`{student_name}` {student_shape} and `{teacher_name}` {teacher_shape} must "
            "have the same batch size (axis 0)."
        )
    kept = _example_mask(where, student_shape[0])
    student, teacher = _as_compute_dtype(student), _as_compute_dtype(teacher)
    dtype = jnp.promote_types(student.dtype, teacher.dtype)

    def zero_masked(x):
        mask = kept.reshape(kept.shape + (1,) * (x.ndim - 1))
        return jnp.where(mask, x.astype(dtype), 0)

    return zero_masked(student), zero_masked(teacher), kept


def _safe_normalize(x: jax.Array, axis: int = -1) -> jax.Array:
    """``x / ||x||`` along ``axis``; the zero vector maps to 0 with gradient 0."""
    norm = jnp.expand_dims(_safe_norm(x, axis), axis)
    positive = norm > 0
    return jnp.where(positive, x / jnp.where(positive, norm, 1.0), 0.0)


def _safe_divide(numerator: jax.Array, denominator: jax.Array) -> jax.Array:
    """``numerator / denominator``, 0 where the denominator is 0."""
    positive = denominator > 0
    return jnp.where(positive, numerator / jnp.where(positive, denominator, 1.0), 0.0)


def _pair_mask(kept: jax.Array) -> jax.Array:
    """``[B, B]``: both examples kept and distinct."""
    distinct = ~jnp.eye(kept.shape[0], dtype=jnp.bool_)
    return kept[:, None] & kept[None, :] & distinct


def hint_loss(student_features, teacher_features, *, where=None) -> jax.Array:
    r"""FitNets hint loss: mean squared error between intermediate features.

    .. math::
      \frac1n \sum_{k} \left(u_k - r(v)_k\right)^2

    per example, the mean over all ``n`` non-batch entries, with :math:`u` the
    teacher's hint and :math:`r(v)` the student's guided layer mapped to the
    teacher's shape. That regressor :math:`r` (in the paper a convolution) is part of
    the student model and trained with it: apply it before calling this function,
    whose inputs must have exactly the same shape. The paper writes
    :math:`\frac12 \|u - r(v)\|^2`, which is this value times ``n / 2``.

    Args:
      student_features: float array ``[B, ...]``, the regressor's output.
      teacher_features: float array of the same shape.
      where: optional bool ``[B]`` mask; masked examples give 0.

    Returns:
      Non-negative array ``[B]``.

    Examples:
      >>> import jax.numpy as jnp, jaxkd
      >>> s = jnp.array([[1.0, 2.0], [0.0, 0.0]]); t = jnp.array([[1.0, 0.0], [1.0, 1.0]])
      >>> jaxkd.hint_loss(s, t)
      Array([2., 1.], dtype=float32)

    References:
      Romero, Ballas, Kahou, Chassang, Gatta and Bengio, "FitNets: Hints for Thin
      Deep Nets", ICLR 2015. https://arxiv.org/abs/1412.6550
    """
    names = ("student_features", "teacher_features")
    _checks.check_same_shape(names, [student_features, teacher_features])
    student, teacher, kept = _prepare_pair(
        names,
        student_features,
        teacher_features,
        rank=None,
        layout="[batch, features, ...]",
        where=where,
    )
    values = jnp.mean(jnp.square(student - teacher), axis=tuple(range(1, student.ndim)))
    return jnp.where(kept, values, 0.0)


def _attention_map(features: jax.Array, p) -> jax.Array:
    """``[B, H*W]`` unit-norm map of :math:`\\sum_c |A_c|^p`."""
    energy = jnp.sum(jnp.abs(features) ** p, axis=-1)
    return _safe_normalize(energy.reshape(energy.shape[0], -1))


def attention_transfer_loss(student_features, teacher_features, *, p=2, where=None) -> jax.Array:
    r"""Activation-based attention transfer between feature maps.

    With :math:`Q = \mathrm{vec}\left(\sum_c |A_c|^p\right) \in \mathbb{R}^{HW}` the
    spatial attention map of a feature map :math:`A \in \mathbb{R}^{H \times W \times C}`:

    .. math::
      \left\| \frac{Q_s}{\|Q_s\|_2} - \frac{Q_t}{\|Q_t\|_2} \right\|_2

    per example: the paper's form (its norm with ``p = 2``), without its weight
    :math:`\beta / 2`. The authors' code instead takes the mean of the squared
    differences, :math:`\frac{1}{HW}\|\cdot\|_2^2`: the square of this value divided
    by ``H * W`` (the same minimizer and direction of the gradient, a different
    scale). Summing or averaging over channels gives the same normalized map, so
    student and teacher may have different channel counts. An all-zero feature map
    has the zero attention map.

    Args:
      student_features: float array ``[B, H, W, C_s]`` (channels last, as in Flax).
      teacher_features: float array ``[B, H, W, C_t]``.
      p: positive exponent applied to the absolute activations (the paper uses 2).
        ``p >= 1`` keeps the gradient finite at zero activations.
      where: optional bool ``[B]`` mask; masked examples give 0.

    Returns:
      Non-negative array ``[B]``, at most :math:`\sqrt 2`.

    Examples:
      >>> import jax.numpy as jnp, jaxkd
      >>> a = jnp.arange(16.0).reshape(1, 2, 2, 4)
      >>> jaxkd.attention_transfer_loss(3.0 * a[..., :2], a).round(4)
      Array([0.0466], dtype=float32)

    References:
      Zagoruyko and Komodakis, "Paying More Attention to Attention: Improving the
      Performance of Convolutional Neural Networks via Attention Transfer", ICLR 2017.
      https://arxiv.org/abs/1612.03928
    """
    names = ("student_features", "teacher_features")
    _checks.check_positive_scalar("p", p)
    student, teacher, kept = _prepare_pair(
        names,
        student_features,
        teacher_features,
        rank=4,
        layout="[batch, height, width, channels]",
        where=where,
    )
    if student.shape[:3] != teacher.shape[:3]:
        raise ValueError(
            f"`student_features` {student.shape} and `teacher_features` {teacher.shape} "
            "must agree on [batch, height, width]; only the channels may differ."
        )
    if not isinstance(p, int):  # a Python int stays a static integer power
        p = jnp.asarray(p, student.dtype)
    difference = _attention_map(student, p) - _attention_map(teacher, p)
    return jnp.where(kept, _safe_norm(difference, axis=-1), 0.0)
