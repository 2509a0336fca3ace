"""Temperature-softened distributions over classes.

All functions work in log space and in at least float32: bfloat16/float16 logits are
upcast before dividing by the temperature, and results are returned in float32.
Masked classes (``where`` False) and ``-inf`` logits get probability exactly 0
(log-probability ``-inf``); a row with every class masked is all ``-inf`` / all 0,
never NaN, and its gradients are finite.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from jaxkd import _checks


def _as_compute_dtype(logits: jax.Array) -> jax.Array:
    """Upcasts half-precision logits to float32; keeps float32/float64."""
    logits = jnp.asarray(logits)
    return logits.astype(jnp.promote_types(logits.dtype, jnp.float32))


def _max_and_log_total(x: jax.Array, axis: int) -> tuple[jax.Array, jax.Array]:
    """``(m, log(sum(exp(x - m))))`` along ``axis``, with keepdims.

    ``m`` is the row's finite maximum (0 for a row without finite entries), held
    constant for the gradient; the log-total of an empty row is ``-inf``.
    """
    x_max = jnp.max(x, axis=axis, keepdims=True)
    x_max = jax.lax.stop_gradient(jnp.where(jnp.isfinite(x_max), x_max, 0.0))
    total = jnp.sum(jnp.exp(x - x_max), axis=axis, keepdims=True)
    log_total = jnp.where(total > 0, jnp.log(jnp.where(total > 0, total, 1.0)), -jnp.inf)
    return x_max, log_total


def masked_logsumexp(x: jax.Array, axis: int, mask=None, keepdims: bool = False):
    """``log(sum(exp(x)))`` over unmasked entries, ``-inf`` (not NaN) when empty.

    Args:
      x: float array.
      axis: non-negative axis to reduce.
      mask: ``None`` or bool array of ``x``'s shape.
      keepdims: keep the reduced axis with size 1.

    Returns:
      Array of ``x``'s shape without ``axis`` (or with size 1 there).
    """
    if mask is not None:
        x = jnp.where(mask, x, -jnp.inf)
    x_max, log_total = _max_and_log_total(x, axis)
    result = log_total + x_max
    return result if keepdims else jnp.squeeze(result, axis)


def scaled_log_softmax(scaled_logits: jax.Array, axis: int, mask) -> jax.Array:
    """Log-softmax of already scaled logits with an optional full-shape mask.

    Computed as ``(x - max) - log(sum(exp(x - max)))``, which keeps float32
    precision for large logits. Masked entries and entries of an all-masked row
    are ``-inf``, without NaN.

    Args:
      scaled_logits: float array ``[..., C, ...]`` (logits / temperature).
      axis: non-negative class axis.
      mask: ``None`` or bool array of the same shape.

    Returns:
      Log-probabilities, same shape and dtype as ``scaled_logits``.
    """
    x = scaled_logits if mask is None else jnp.where(mask, scaled_logits, -jnp.inf)
    x_max, log_total = _max_and_log_total(x, axis)
    return (x - x_max) - jnp.where(jnp.isfinite(log_total), log_total, 0.0)


def prepare_logits(name: str, logits, temperature, axis: int, where):
    """Validates ``logits``, and returns ``(scaled_logits, mask, axis)``.

    ``scaled_logits`` is ``logits / temperature`` in the compute dtype, ``mask`` a
    full-shape bool mask or ``None`` and ``axis`` non-negative.
    """
    _checks.check_floating(name, logits)
    _checks.check_positive_scalar("temperature", temperature)
    logits = _as_compute_dtype(logits)
    axis = _checks.normalize_axis(axis, logits.ndim)
    mask = _checks.class_mask(where, logits.shape, axis)
    return logits / jnp.asarray(temperature, logits.dtype), mask, axis


def log_softmax(logits, *, temperature=1.0, axis: int = -1, where=None) -> jax.Array:
    r"""Temperature-softened log-probabilities.

    .. math::
      \log p_i = z_i / T - \log \sum_j \exp(z_j / T)

    where the sum runs over unmasked classes; masked classes get ``-inf``.

    Args:
      logits: float array ``[..., C]`` (class axis ``axis``).
      temperature: positive scalar ``T``; larger values give softer distributions.
      axis: the class axis.
      where: optional bool mask. Either of the logits' rank with each dimension equal
        to the logits' or 1 (broadcast as numpy does, without adding dimensions):
        ``[B, C]`` masks classes, ``[1, C]`` the same classes in every example,
        ``[B, 1]`` whole examples; or of the logits' shape without ``axis``, a
        per-example mask (``[B, L]`` for ``[B, L, V]``). Masked classes get
        ``-inf``; a masked example is all ``-inf``.

    Returns:
      float32 (or float64) array of the logits' shape.

    Examples:
      >>> import jax.numpy as jnp, jaxkd
      >>> jnp.exp(jaxkd.log_softmax(jnp.array([0.0, jnp.log(3.0)]))).round(2)
      Array([0.25, 0.75], dtype=float32)

    References:
      Hinton, Vinyals and Dean, "Distilling the Knowledge in a Neural Network",
      2015. https://arxiv.org/abs/1503.02531
    """
    scaled, mask, axis = prepare_logits("logits", logits, temperature, axis, where)
    return scaled_log_softmax(scaled, axis, mask)


def softmax(logits, *, temperature=1.0, axis: int = -1, where=None) -> jax.Array:
    r"""Temperature-softened probabilities, :math:`p_i \propto \exp(z_i / T)`.

    Args:
      logits: float array ``[..., C]`` (class axis ``axis``).
      temperature: positive scalar ``T``.
      axis: the class axis.
      where: optional bool mask as in :func:`log_softmax`; masked classes get 0.

    Returns:
      float32 (or float64) array of the logits' shape, summing to 1 along ``axis``
      (0 for a fully masked row).

    Examples:
      >>> import jax.numpy as jnp, jaxkd
      >>> jaxkd.softmax(jnp.array([1.0, 1.0, 9.0]), where=jnp.array([True, True, False]))
      Array([0.5, 0.5, 0. ], dtype=float32)
    """
    return jnp.exp(log_softmax(logits, temperature=temperature, axis=axis, where=where))


def entropy(logits, *, temperature=1.0, axis: int = -1, where=None) -> jax.Array:
    r"""Shannon entropy (nats) of the softened distribution, one value per example.

    .. math::
      H(p) = -\sum_i p_i \log p_i, \qquad 0 \log 0 = 0.

    Args:
      logits: float array ``[..., C]``.
      temperature: positive scalar ``T``.
      axis: the class axis.
      where: optional bool mask as in :func:`log_softmax`.

    Returns:
      Array of the logits' shape without ``axis``.
    """
    scaled, mask, axis = prepare_logits("logits", logits, temperature, axis, where)
    log_p = scaled_log_softmax(scaled, axis, mask)
    present = log_p > -jnp.inf
    safe_log_p = jnp.where(present, log_p, 0.0)
    return -jnp.sum(jnp.where(present, jnp.exp(safe_log_p) * safe_log_p, 0.0), axis=axis)


def standardize_logits(
    logits, *, axis: int = -1, where=None, epsilon: float = 1e-7, ddof: int = 1
) -> jax.Array:
    r"""Z-score logits along the class axis (logit standardization).

    .. math::
      \mathcal{Z}(z)_i = \frac{z_i - \bar z}{\sigma(z) + \epsilon}

    with the mean :math:`\bar z` and the standard deviation

    .. math::
      \sigma(z) = \sqrt{\frac{1}{n - \mathrm{ddof}} \sum_i (z_i - \bar z)^2}

    over the :math:`n` unmasked, finite classes of each row. Dividing the result by a
    base temperature and using it in any KD loss gives the logit-standardized variant
    of that loss. Masked or ``-inf`` entries are returned unchanged so that a later
    ``where`` (or the ``-inf``) still excludes them.

    A constant row has :math:`\sigma = 0` and gives zeros. A row with
    :math:`n \le \mathrm{ddof}` kept classes (for ``ddof=1``, a single class) has
    no defined spread; its kept entries are 0 as well, never NaN or ``inf``, and
    their gradients are 0.

    Args:
      logits: float array ``[..., C]``.
      axis: the class axis.
      where: optional bool mask, as in :func:`log_softmax`.
      epsilon: small constant added to the standard deviation.
      ddof: delta degrees of freedom, a non-negative int: the squared deviations are
        divided by ``n - ddof`` for ``n`` kept classes. ``1`` (the default) is the
        Bessel-corrected sample standard deviation that the authors' code computes
        (``torch.Tensor.std``); ``0`` is the population standard deviation, with
        which each row has unit (population) standard deviation.

    Returns:
      float32 (or float64) array of the logits' shape.

    References:
      Sun, Ren, Li, Wang and Cao, "Logit Standardization in Knowledge Distillation",
      CVPR 2024. https://arxiv.org/abs/2403.01427
    """
    _checks.check_floating("logits", logits)
    if isinstance(ddof, bool) or not isinstance(ddof, int | np.integer) or ddof < 0:
        raise ValueError(f"`ddof` must be a non-negative int, got {ddof!r}.")
    logits = _as_compute_dtype(logits)
    axis = _checks.normalize_axis(axis, logits.ndim)
    mask = _checks.class_mask(where, logits.shape, axis)
    valid = jnp.isfinite(logits) if mask is None else mask & jnp.isfinite(logits)
    safe = jnp.where(valid, logits, 0.0)
    count = jnp.sum(valid, axis=axis, keepdims=True)
    mean = jnp.sum(safe, axis=axis, keepdims=True) / jnp.maximum(count, 1)
    centered = jnp.where(valid, safe - mean, 0.0)
    # n - ddof <= 0: no defined spread; those rows give 0 (see the docstring).
    defined = count > int(ddof)
    dof = jnp.where(defined, count - int(ddof), 1).astype(logits.dtype)
    variance = jnp.where(defined, jnp.sum(centered**2, axis=axis, keepdims=True) / dof, 0.0)
    # sqrt has an infinite derivative at 0: keep constant rows' gradients finite.
    std = jnp.where(variance > 0, jnp.sqrt(jnp.where(variance > 0, variance, 1.0)), 0.0)
    standardized = jnp.where(defined, centered / (std + epsilon), 0.0)
    return jnp.where(valid, standardized, logits)
