"""Vocabulary-parallel distillation losses, for logits sharded over a mesh axis.

Inside ``jax.shard_map`` over a mesh with a ``model`` axis of size ``m``, each
device holds a vocabulary shard ``[N, V/m]`` of the student's and of the teacher's
logits (e.g. ``output_logits(hidden, kernel_shard)`` with a ``[d, V/m]`` shard of
the output projection, :func:`jaxkd.output_logits`). The
functions here compute the same per-token values as the full-vocabulary losses
(:func:`jaxkd.kl_divergence`, :func:`jaxkd.generalized_jsd`, ...,
:func:`jaxkd.cross_entropy_with_integer_labels`) without gathering the logits: the
row maximum is reduced with ``lax.pmax``, the softmax normalizer and the sums over
classes with ``lax.psum``, so each device exchanges a few numbers per token.
:func:`vocab_parallel_divergence` is those very functions, called with
``vocab_axis_name=axis_name`` (:mod:`jaxkd.losses._divergences`): the same terms,
the same code.

Conventions:

* Logits ``[..., V/m]``, the vocabulary shard last; every device of the axis holds
  a shard of the same size, device ``i`` classes ``[i V/m, (i + 1) V/m)``.
* Values ``[...]`` are identical on every device of the axis (invariant), so they
  leave ``shard_map`` with ``out_specs=P()`` (or ``P("data")`` when tokens are also
  sharded over a data axis). The ``T^2`` factor is included, as in
  :func:`jaxkd.kl_divergence`.
* ``where`` is a per-token bool mask of the values' shape: masked tokens give
  exactly 0 with zero gradient, whatever their logits (huge or NaN) and labels.
* ``-inf`` logits (a padded vocabulary, whose tail shard may be all ``-inf``) get
  probability 0, with ``0 log 0 = 0`` and finite gradients.
* bfloat16/float16 logits are computed in float32.
* The full-vocabulary functions' precision: about 1e-6 relative in float32 however
  close the two distributions are (on classes where they are close, the log-ratio
  is taken from the logits' difference and the global log-sum-exp difference,
  :mod:`jaxkd.losses._divergence_terms`), not an absolute ``T**2 * 5e-7`` per token
  as plain log-space terms would give.

Gradients: differentiate from outside the ``shard_map`` (the usual way), or inside
its body, with ``check_vma=True`` (the default): there the transpose of ``psum`` is
an identity on each device, and each device gets the gradient of its own shard.
Under ``check_vma=False`` differentiating from outside is also right, but
differentiating *inside* the body over-counts by the axis size (the transpose of
``psum`` is then a ``psum``); the tests pin all three. The row maximum is held
constant (``stop_gradient``) before ``pmax``, which has no derivative.

Example::

    import jax, numpy as np
    from jax.sharding import Mesh, PartitionSpec as P

    mesh = Mesh(np.array(jax.devices()), ("model",))

    def per_token(student_logits, teacher_logits):  # each [N, V / m] on a device
        return vocab_parallel_divergence(
            student_logits, teacher_logits, loss="kl", axis_name="model", temperature=2.0
        )

    loss = jax.shard_map(
        per_token, mesh=mesh, in_specs=(P(None, "model"), P(None, "model")), out_specs=P()
    )
    grads = jax.grad(lambda s, t: loss(s, t).mean())(student_logits, teacher_logits)

References:
  Shoeybi, Patwary, Puri, LeGresley, Casper and Catanzaro, "Megatron-LM: Training
  Multi-Billion Parameter Language Models Using Model Parallelism", 2019 (the output
  layer split over the vocabulary, fused with the loss so that only per-token scalars
  are communicated). https://arxiv.org/abs/1909.08053
"""

from __future__ import annotations

import inspect
from collections.abc import Mapping

import jax
import jax.numpy as jnp

from jaxkd import _checks
from jaxkd.losses._distributions import _as_compute_dtype
from jaxkd.losses._divergence_terms import softmax_parts
from jaxkd.losses._divergences import DIVERGENCES

# Arguments every divergence takes that are not among a loss's own options.
_COMMON_ARGUMENTS = ("temperature", "axis", "where", "vocab_axis_name")


def _own_options(fn) -> dict[str, float]:
    """The keyword-only options of a divergence with their defaults (``beta=0.5``, ...)."""
    return {
        name: parameter.default
        for name, parameter in inspect.signature(fn).parameters.items()
        if parameter.kind is parameter.KEYWORD_ONLY and name not in _COMMON_ARGUMENTS
    }


# Each loss and its options (loss_kwargs) with their defaults, read from the full-vocab
# functions themselves.
_LOSS_OPTIONS: dict[str, dict[str, float]] = {
    name: _own_options(fn) for name, fn in DIVERGENCES.items()
}


def _check_logits(name: str, logits) -> None:
    _checks.check_floating(name, logits)
    if jnp.ndim(logits) < 1:
        raise ValueError(
            f"`{name}` must be [..., V_local] with the vocabulary shard last, got a scalar."
        )


def _check_token_mask(where, token_shape: tuple[int, ...]):
    """A bool mask of exactly the per-token shape (nothing broadcast), or ``None``."""
    if where is None:
        return None
    where = jnp.asarray(where)
    if where.dtype != jnp.bool_:
        raise TypeError(f"`where` must be a boolean mask, got dtype {where.dtype}.")
    if where.shape != token_shape:
        raise ValueError(
            f"`where` has shape {where.shape}; expected the per-token shape {token_shape} "
            "(the logits' shape without the vocabulary axis)."
        )
    return where


def _keep_tokens(logits: jax.Array, where) -> jax.Array:
    """Masked tokens' logits replaced by 0, so that garbage there never reaches a NaN."""
    if where is None:
        return logits
    return jnp.where(jnp.expand_dims(where, -1), logits, 0.0)


def _global_log_softmax(scaled: jax.Array, axis_name) -> jax.Array:
    """This device's shard of the global log-softmax, with one ``pmax`` and one ``psum``.

    ``(x - max) - log(sum(exp(x - max)))`` with the maximum and the sum taken over
    the whole vocabulary (:func:`jaxkd.losses._divergence_terms.softmax_parts`). The
    maximum is a constant for the gradient (0 for a row without finite entries);
    ``-inf`` entries stay ``-inf``, and a row without finite entries is all
    ``-inf``, never NaN.
    """
    ((_, log_p, _),) = softmax_parts((scaled,), scaled.ndim - 1, axis_name)
    return log_p


def vocab_parallel_log_softmax(logits, *, axis_name, temperature=1.0) -> jax.Array:
    r"""This device's shard of the global, temperature-softened log-probabilities.

    .. math::
      \log p_i = z_i / T - \log \sum_{j \in \text{all shards}} \exp(z_j / T)

    Call inside ``jax.shard_map`` (or ``jax.pmap``) with ``axis_name`` bound.

    Args:
      logits: float array ``[..., V/m]``, this device's vocabulary shard.
      axis_name: the mesh axis the vocabulary is split over.
      temperature: positive scalar ``T`` (may be traced).

    Returns:
      float32 (or float64) array ``[..., V/m]``: ``-inf`` where the logits are.
    """
    _check_logits("logits", logits)
    _checks.check_positive_scalar("temperature", temperature)
    logits = _as_compute_dtype(logits)
    return _global_log_softmax(logits / jnp.asarray(temperature, logits.dtype), axis_name)


def _loss_options(loss, loss_kwargs) -> dict:
    """The options of ``loss``: its defaults updated with ``loss_kwargs``, validated."""
    if not isinstance(loss, str) or loss not in _LOSS_OPTIONS:
        raise ValueError(f"`loss` must be one of {sorted(_LOSS_OPTIONS)}, got {loss!r}.")
    defaults = _LOSS_OPTIONS[loss]
    if loss_kwargs is None:
        return dict(defaults)
    if not isinstance(loss_kwargs, Mapping):
        raise TypeError(
            f"`loss_kwargs` must be a mapping or None, got {type(loss_kwargs).__name__}."
        )
    unknown = sorted(set(loss_kwargs) - set(defaults))
    if unknown:
        accepted = sorted(defaults) if defaults else "no options"
        raise ValueError(
            f"`loss_kwargs` for loss={loss!r} accepts {accepted}; got unknown {unknown}."
        )
    options = {**defaults, **loss_kwargs}
    for name, value in options.items():  # beta, alpha: weights in [0, 1]
        _checks.check_unit_interval(name, value)
    return options


def vocab_parallel_divergence(
    student_logits,
    teacher_logits,
    *,
    loss: str = "kl",
    axis_name,
    temperature=1.0,
    where=None,
    loss_kwargs: Mapping | None = None,
) -> jax.Array:
    r"""A divergence between softened distributions whose vocabulary is sharded.

    With :math:`p_t = \mathrm{softmax}(z_t / T)` and :math:`p_s = \mathrm{softmax}(z_s / T)`
    over the whole vocabulary, each device computes the terms of its shard from the
    global log-probabilities, and the row sum is its local sum ``psum``-ed:

    .. math::
      T^2 \sum_{\text{shards}} \sum_{i \in \text{shard}} f(p_{s,i}, p_{t,i})

    ``loss`` (options in ``loss_kwargs``, which may be traced scalars):

    * ``"kl"``: :math:`\mathrm{KL}(p_t \| p_s)`, as :func:`jaxkd.kl_divergence`;
    * ``"reverse_kl"``: :math:`\mathrm{KL}(p_s \| p_t)`, as
      :func:`jaxkd.reverse_kl_divergence`;
    * ``"soft_cross_entropy"``: :math:`H(p_t, p_s)`, as :func:`jaxkd.soft_cross_entropy`;
    * ``"jsd"`` (``beta=0.5``): :math:`\beta\,\mathrm{KL}(p_t \| m) + (1 - \beta)\,
      \mathrm{KL}(p_s \| m)`, :math:`m = \beta p_t + (1 - \beta) p_s`; ``beta=0`` is
      ``"kl"`` and ``beta=1`` is ``"reverse_kl"``, as :func:`jaxkd.generalized_jsd`
      (a traced ``beta`` computes all three and selects; NaN outside ``[0, 1]``);
    * ``"skew_kl"`` (``alpha=0.1``): :math:`\mathrm{KL}(p_t \| \alpha p_t + (1 - \alpha) p_s)`;
    * ``"skew_reverse_kl"`` (``alpha=0.1``):
      :math:`\mathrm{KL}(p_s \| \alpha p_s + (1 - \alpha) p_t)`;
    * ``"total_variation"``: :math:`\tfrac12 \sum_i |p_{t,i} - p_{s,i}|`.

    This is ``DIVERGENCES[loss](student_logits, teacher_logits, ...,
    vocab_axis_name=axis_name)``, e.g. :func:`jaxkd.kl_divergence` with the
    vocabulary axis named: the same terms, about 1e-6 relative precision in float32
    however close the distributions (module docstring).

    Args:
      student_logits: float array ``[..., V/m]``, this device's vocabulary shard.
      teacher_logits: float array, same shape.
      loss: one of the names above.
      axis_name: the mesh axis the vocabulary is split over (keyword, required).
      temperature: positive scalar ``T`` (may be traced).
      where: optional bool mask ``[...]`` (per token): masked tokens give 0 with zero
        gradient, whatever their logits.
      loss_kwargs: optional mapping of the loss's options (``beta`` or ``alpha``).

    Returns:
      float32 (or float64) array ``[...]``, the same on every device of the axis.

    References:
      Hinton, Vinyals and Dean, "Distilling the Knowledge in a Neural Network",
      2015. https://arxiv.org/abs/1503.02531

      Agarwal et al., "On-Policy Distillation of Language Models: Learning from
      Self-Generated Mistakes" (GKD), ICLR 2024. https://arxiv.org/abs/2306.13649

      Ko, Kim, Chen and Yun, "DistiLLM: Towards Streamlined Distillation for Large
      Language Models", ICML 2024 (skew KL). https://arxiv.org/abs/2402.03898
    """
    options = _loss_options(loss, loss_kwargs)
    _check_logits("student_logits", student_logits)
    _check_logits("teacher_logits", teacher_logits)
    _checks.check_same_shape(["student_logits", "teacher_logits"], [student_logits, teacher_logits])
    _checks.check_positive_scalar("temperature", temperature)
    where = _check_token_mask(where, jnp.shape(student_logits)[:-1])

    student = _keep_tokens(_as_compute_dtype(student_logits), where)
    teacher = _keep_tokens(_as_compute_dtype(teacher_logits), where)
    value = DIVERGENCES[loss](
        student,
        teacher,
        temperature=temperature,
        axis=-1,
        where=where,  # per token: a masked token has no class, and gives 0
        vocab_axis_name=axis_name,
        **options,
    )
    return value if where is None else jnp.where(where, value, 0.0)


def vocab_parallel_cross_entropy(logits, labels, *, axis_name, where=None) -> jax.Array:
    r"""Cross entropy against integer labels, with the vocabulary sharded.

    .. math::
      -\log p_y = \log \sum_{j \in \text{all shards}} \exp(z_j) - z_y

    Labels are global ids in ``[0, V)``; the device whose shard holds the label
    (offset ``lax.axis_index(axis_name) * V/m``) contributes its log-probability,
    the others 0, and the ``psum`` gives every device the value of
    :func:`jaxkd.cross_entropy_with_integer_labels` on the full logits.

    Args:
      logits: float array ``[..., V/m]``, this device's vocabulary shard.
      labels: int array ``[...]`` of global class ids.
      axis_name: the mesh axis the vocabulary is split over.
      where: optional bool mask ``[...]``: masked tokens give 0 with zero gradient
        and may hold any label.

    Returns:
      float32 (or float64) array ``[...]``, the same on every device of the axis. A
      kept token whose label lies outside ``[0, V)`` gives NaN, in its value and its
      gradient (labels are traced here, so they cannot be checked when tracing), as
      :func:`jaxkd.cross_entropy_with_integer_labels` does under ``jit``.

    References:
      Shoeybi et al., "Megatron-LM: Training Multi-Billion Parameter Language Models
      Using Model Parallelism", 2019. https://arxiv.org/abs/1909.08053
    """
    _check_logits("logits", logits)
    _checks.check_integer("labels", labels)
    token_shape = jnp.shape(logits)[:-1]
    if jnp.shape(labels) != token_shape:
        raise ValueError(
            f"`labels` has shape {jnp.shape(labels)}; expected {token_shape}: the logits' "
            f"shape {jnp.shape(logits)} without the vocabulary axis."
        )
    where = _check_token_mask(where, token_shape)

    logits = _keep_tokens(_as_compute_dtype(logits), where)
    log_p = _global_log_softmax(logits, axis_name)
    local_size = logits.shape[-1]
    local_labels = labels - jax.lax.axis_index(axis_name) * local_size
    is_label = jax.nn.one_hot(local_labels, local_size, dtype=jnp.bool_)  # all False off-shard
    picked = jnp.sum(jnp.where(is_label, log_p, 0.0), axis=-1)
    found = jnp.sum(is_label, axis=-1, dtype=jnp.int32)
    finite = jnp.sum(jnp.where(jnp.isfinite(logits), logits, 0.0), axis=-1)
    picked, found, finite = jax.lax.psum((picked, found, finite), axis_name)
    # A kept token's label on no shard: NaN in the value and, through the logits, in
    # the gradient (masked tokens get a poison of exactly 0, so their gradient stays 0).
    bad = found == 0 if where is None else (found == 0) & where
    loss = -picked + jnp.where(bad, jnp.nan, 0.0).astype(picked.dtype) * finite
    return loss if where is None else jnp.where(where, loss, 0.0)
